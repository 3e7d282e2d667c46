"""The fast path patching, on the engine (see :func:`path_patch_fast_ld` for why it is exact, and
:mod:`headcircuits.path_patching`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from headcircuits import engine
from headcircuits.edits import Edit, at_position
from headcircuits.engine import Read
from headcircuits.models.architecture import hook
from headcircuits.models.core import Head, Model
from headcircuits.path_patching.core import Baseline, Receivers, _receiving_model, baseline
from headcircuits.progress import tqdm
from headcircuits.tasks.base import TaskData


@dataclass(frozen=True, eq=False)
class FrozenHeads(Edit):
    """Path patching's step 2 as an edit: every head of the blocks ``first`` .. ``top`` outputs its clean ``z`` at
    each prompt's ``position``, the ``sender`` its counterfactual one (where ``sender_on``), and with
    ``freeze_mlps`` every MLP its clean output. ``z_clean`` / ``z_corrupt`` / ``mlp_clean``: per block, each
    prompt's values at the position ([batch, head, d_head] / [batch, d_model]).

    Only the position itself is edited, and that is exact: with every head frozen no information moves between
    positions, so the receivers' inputs there depend only on the frozen values there (and on the MLPs and norms
    of that position). The engine then reruns that one token, from the sender's block up, over the earlier
    tokens' clean keys and values, which the frozen heads ignore."""

    sender: Head
    position: str
    first: int
    top: int
    z_clean: list[Tensor]
    z_corrupt: list[Tensor]
    sender_on: Tensor  # [batch] bool: the sender is patched at this prompt's position
    mlp_clean: list[Tensor] | None = None

    #: every head of its blocks set at its position whatever it computes: the engine may skip the attention there
    frozen = True

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(range(self.first, self.top + 1))

    def frozen_at(self, layer: int, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        """What the heads (and, with ``freeze_mlps``, the MLP) of block ``layer`` output at the position, for the
        prompts ``rows``: the engine's frozen mode reads these instead of running the attention."""
        cpu = rows.cpu()
        z = self.z_clean[layer][cpu]
        if layer == self.sender[0]:
            z = z.clone()
            hs = self.sender[1]
            z[:, hs] = torch.where(self.sender_on[cpu, None], self.z_corrupt[layer][cpu, hs], z[:, hs])
        return z, None if self.mlp_clean is None else self.mlp_clean[layer][cpu]

    def hooks(self, data, rows, positions):
        where = at_position(data, self.position, rows, positions)
        r, c = where.nonzero(as_tuple=True)
        ls, hs = self.sender
        cpu = rows.cpu()[r.cpu()]

        def freeze(z, hook, layer):
            z = z.clone()
            frozen = self.z_clean[layer][cpu].to(z)
            if layer == ls:
                frozen[:, hs] = torch.where(self.sender_on[cpu, None].to(z.device), self.z_corrupt[layer][cpu, hs].to(z),
                                            frozen[:, hs])
            z[r, c] = frozen
            return z

        def mlp(x, hook, layer):
            x = x.clone()
            x[r, c] = self.mlp_clean[layer][cpu].to(x)
            return x

        hooks = [(hook("z", l), lambda z, hook, l=l: freeze(z, hook, l)) for l in self.layers]
        if self.mlp_clean is not None:
            hooks += [(hook("mlp_out", l), lambda x, hook, l=l: mlp(x, hook, l)) for l in self.layers]
        return hooks


@dataclass(frozen=True, eq=False)
class ReceiverInputs(Edit):
    """Path patching's step 3 as an edit: the receivers' ``kind`` inputs (q / k / v) of the listed heads, per
    block, set at each prompt's ``position`` to ``values`` (block -> [batch, heads of the block, d_head], in the
    order of ``heads``)."""

    kind: str
    position: str
    heads: dict[int, tuple[int, ...]]  # block -> the (query or K/V) heads whose input is set
    values: dict[int, Tensor]

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.heads))

    def hooks(self, data, rows, positions):
        r, c = at_position(data, self.position, rows, positions).nonzero(as_tuple=True)
        cpu = rows.cpu()[r.cpu()]

        def patch(x, hook, layer):
            x = x.clone()
            x[r, c] = x[r, c].index_copy(1, torch.tensor(self.heads[layer], device=x.device),
                                         self.values[layer][cpu].to(x))
            return x

        return [(hook(self.kind, l), lambda x, hook, l=l: patch(x, hook, l)) for l in self.layers]


@torch.no_grad()
def path_patch_fast_ld(
    model: Model,
    data: TaskData,
    receivers: Receivers,
    senders: list[Head] | None = None,
    *,
    freeze_mlps: bool = False,
    sender_position: str | None = None,
    base: Baseline | None = None,
    chunk: int = 64,
    progress: bool = True,
) -> tuple[dict[Head, Tensor], Baseline]:
    """Path patching, the same experiment as :func:`path_patch_ld`, on the engine (:func:`headcircuits.engine.run`),
    computed on as few tokens and blocks as possible.

    Why that is exact. In step 2 every head is frozen, so no information moves between positions: the receivers'
    inputs at their position P (END for the logits) depend only on the frozen head outputs at P and on per-position
    MLPs and norms. Below a sender's block every head holds its clean output, so the run there is the clean one.
    Step 2 is therefore P alone, from the sender's block up, over the clean keys and values of the earlier tokens
    (which the frozen heads ignore): :class:`FrozenHeads`, the senders of one block side by side as copies of P
    (at most ``chunk`` per engine call). Receivers below a sender's block read their clean input. In step 3 only
    the receivers' inputs at P change (:class:`ReceiverInputs`), so every token before P and every block below
    the lowest receiver above the sender is the clean run: the engine reruns the tokens P..END from that block,
    over the earlier tokens' clean keys and values, one block of rows per sender; it unembeds the answer's and the
    distractor's columns only. Agreement with the reference is tested on every tiny family for logits and
    q / k / v receivers.

    Args:
        model: the model.
        data: the prompts.
        receivers: where the effect is read.
        senders: the heads patched (default: every head that can send).
        freeze_mlps: freeze the MLPs too.
        sender_position: patch the sender at this position only (``None``: every position).
        base: the clean and counterfactual runs (computed if not given).
        chunk: the most senders per engine call in step 2.
        progress: show a progress bar.

    Returns:
        ``({sender: [batch] patched logit differences}, the baseline)``, as :func:`path_patch_ld`.
    """
    receivers.check(model, data)
    model = _receiving_model(model, receivers)
    base = base or baseline(model, data)
    L, H = model.facts.n_layers, model.facts.n_heads
    senders = senders if senders is not None else receivers.senders(L, H)
    B = len(data)
    position = "END" if receivers.kind == "logits" else receivers.position
    where = data.at(position)
    every = torch.arange(B)
    take = lambda t: t[every, where]  # noqa: E731  each prompt's value at P
    z_clean, z_corrupt = [take(z) for z in base.z_clean], [take(z) for z in base.z_corrupt]
    mlp_clean = [take(m) for m in base.mlp_clean] if freeze_mlps else None
    sender_on = torch.ones(B, dtype=torch.bool) if sender_position is None else data.at(sender_position) == where
    columns = torch.stack([data.answer, data.distractor], 1)
    group_size = model.facts.kv_group_size
    per_layer = {l: tuple(sorted({h // group_size for ll, h in receivers.heads if ll == l}) if receivers.kind in ("k", "v")
                          else [h for ll, h in receivers.heads if ll == l]) for l in receivers.layers}
    clean_inputs: dict[int, Tensor] = {}
    ld: dict[Head, Tensor] = {}
    inputs: dict[Head, dict[int, Tensor]] = {}
    if receivers.kind != "logits":
        clean_reads = {l: Read(receivers.kind, l, at=position) for l in receivers.layers}
        clean_run = engine.run(model, data, read=list(clean_reads.values()))[0]
        clean_inputs = {l: clean_run[r][:, list(per_layer[l])] for l, r in clean_reads.items()}
    by_layer: dict[int, list[Head]] = {}
    for s in senders:
        by_layer.setdefault(s[0], []).append(s)
    groups = [(l, ss[i:i + chunk]) for l, ss in sorted(by_layer.items()) for i in range(0, len(ss), chunk)]
    top = L - 1 if receivers.kind == "logits" else max(receivers.layers)
    bar = tqdm(total=len(groups), desc="path patching (fast)", disable=not progress, leave=False)
    for layer, group in groups:
        edits = [[FrozenHeads(s, position, layer, top, z_clean, z_corrupt, sender_on, mlp_clean)] for s in group]
        if receivers.kind == "logits":
            for s, result in zip(group, engine.run(model, data, edits, logits=columns)):
                ld[s] = result.logits[:, 0] - result.logits[:, 1]
        else:
            above = [l for l in receivers.layers if l >= layer]
            reads = {l: Read(receivers.kind, l, at=position) for l in above}
            results = engine.run(model, data, edits, read=list(reads.values())) if above else [None] * len(group)
            for s, result in zip(group, results):
                inputs[s] = {l: clean_inputs[l] if l < layer else result[reads[l]][:, list(per_layer[l])]
                             for l in receivers.layers}
        bar.update()
    bar.close()
    if receivers.kind != "logits":
        ld = _step3(model, data, receivers, per_layer, position, inputs, clean_inputs, base.ld_clean, columns)
    return {s: ld[s] for s in senders}, base


def _step3(model, data, receivers, per_layer, position, inputs, clean_inputs, ld_clean, columns) -> dict[Head, Tensor]:
    """Step 3 on the engine: per sender, the clean prompts with the receivers' inputs at P set to the recorded ones,
    from the lowest receiver block above the sender (below it, the run is the clean one); a sender with no
    receiver above it changes nothing (its LD is the clean one)."""
    entry = {s: min((l for l in receivers.layers if l > s[0]), default=None) for s in inputs}
    out = {s: ld_clean.clone() for s, layer in entry.items() if layer is None}
    by_entry: dict[int, list[Head]] = {}
    for s, layer in entry.items():
        if layer is not None:
            by_entry.setdefault(layer, []).append(s)
    for layer, group in sorted(by_entry.items()):
        mine = [l for l in receivers.layers if l >= layer]
        heads = {l: per_layer[l] for l in mine}
        # the first condition sets the receivers' clean inputs: its LD is the baseline's up to float32 rounding of
        # another order of operations, which is removed from every sender's LD (a sender that changes nothing: 0)
        clean = ReceiverInputs(receivers.kind, position, heads, {l: clean_inputs[l] for l in mine})
        conditions = [[ReceiverInputs(receivers.kind, position, heads, {l: inputs[s][l] for l in mine})]
                      for s in group]
        results = engine.run(model, data, [[clean], *conditions], logits=columns)
        offset = results[0].logits[:, 0] - results[0].logits[:, 1] - ld_clean
        for s, result in zip(group, results[1:]):
            out[s] = result.logits[:, 0] - result.logits[:, 1] - offset
    return out
