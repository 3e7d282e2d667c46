"""Activation patching and path patching (Wang et al. 2022, App. B; Circuit Component Reuse).

Everything is measured with the logit difference LD = logit(answer) - logit(distractor) at each prompt's own END
and reported as the papers' normalised effect

    effect = (LD_patched - LD_clean) / (LD_corrupt - LD_clean)

(0: the patch changes nothing; 1: it moves the model all the way to its behaviour on the counterfactual prompts;
averages over prompts are taken before the ratio, as in the papers).

Path patching measures a *sender* head's effect on a set of *receivers* through the direct path only:

1. run the clean and the counterfactual ("corrupt") prompts and cache every head's output ``z``;
2. run the clean prompts again with every head frozen to its clean ``z`` except the sender, which gets its
   counterfactual ``z`` (at every position, or at one named position); MLPs are recomputed (default) or frozen;
   record the receivers' inputs (the final logits, or the q / k / v of receiver heads at a named position);
3. for q / k / v receivers, run the clean prompts once more with only those inputs replaced, and read LD.

Two implementations compute the same numbers: the *reference* (:func:`path_patch_ld`), a plain loop over senders
that follows those steps literally, and the *fast* one (:func:`path_patch_fast_ld`, any receivers), which
exploits that frozen heads move no information between positions (see its docstring).
On grouped-K/V models (SmolLM2: 3 query heads per K/V head; Gemma-3: one K/V head per layer) a k or v
receiver is, by default, the receiver *query head's own* key or value (``Receivers(kv="head")``, the per-head
stages of Wang et al.): the patch is applied to an exactly equivalent copy of the model with one K/V head per
query head (:func:`headcircuits.models.ungrouped`), so the other query heads of the group keep their clean
keys and values. ``kv="group"`` patches the shared K/V head, which every query head of the group then sees.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from headcircuits.metrics import _Stop, logit_difference, logits_at, unembed
from headcircuits.models import ungrouped
from headcircuits.models.blocks import (PrefixCache, attention_output, clean_pass, final_norm, mlp_only_block,
                                        run_blocks, run_sequence)
from headcircuits.models.core import Head, Model
from headcircuits.progress import tqdm
from headcircuits.tasks.base import TaskData


def normalised_effect(
    ld_patched: Tensor, ld_clean: Tensor, ld_corrupt: Tensor, per_batch: int | None = None
) -> Tensor:
    """The normalised effect of a patch; ``ld_patched`` may have leading dimensions (e.g. [layer, head, batch]);
    the last one is the prompts.

    * ``per_batch=None`` (ours, the default): a ratio of means over all prompts,
      (mean LD_patched - mean LD_clean) / (mean LD_corrupt - mean LD_clean);
    * ``per_batch=25`` (Circuit Component Reuse's code): the same ratio in each consecutive batch of 25 prompts,
      then averaged over batches (a last, smaller batch counts as one batch).
    """
    if per_batch is not None:
        if per_batch < 1:
            raise ValueError(f"per_batch must be a positive batch size (the paper's: 25), not {per_batch}")
        n = ld_clean.shape[-1]
        parts = [normalised_effect(ld_patched[..., i : i + per_batch], ld_clean[i : i + per_batch],
                                   ld_corrupt[i : i + per_batch]) for i in range(0, n, per_batch)]
        return torch.stack(parts).mean(0)
    denominator = ld_corrupt.mean() - ld_clean.mean()
    if abs(float(denominator)) < 1e-6:
        raise ValueError(
            "the clean and counterfactual prompts give the same mean logit difference, so the normalised effect "
            "is undefined; check the counterfactual (or compare raw logit differences instead)"
        )
    return (ld_patched.mean(-1) - ld_clean.mean()) / denominator


@dataclass(frozen=True)
class Receivers:
    """Where a sender's effect is read: ``logits`` (the final residual stream), or the ``q`` / ``k`` / ``v``
    input of the listed receiver heads at a named position of the TaskData (e.g. the movers' queries at END).
    ``kv``: on grouped-K/V models, a k / v receiver is the query head's own key / value (``"head"``, default)
    or its group's shared K/V head (``"group"``); see the module docstring."""

    kind: Literal["logits", "q", "k", "v"] = "logits"
    heads: tuple[Head, ...] = ()
    position: str = "END"
    kv: Literal["head", "group"] = "head"

    def __post_init__(self):
        if self.kind not in ("logits", "q", "k", "v"):
            raise ValueError(f"receiver kind must be logits, q, k or v, not {self.kind!r}")
        if self.kind != "logits" and not self.heads:
            raise ValueError(f"{self.kind} receivers need at least one receiver head")
        if self.kv not in ("head", "group"):
            raise ValueError(f"kv must be 'head' (per query head) or 'group' (the shared K/V head), not {self.kv!r}")

    def check(self, model: Model, data: TaskData) -> None:
        """Refuse receivers that do not exist in this model or at a position these prompts lack."""
        L, H = model.facts.n_layers, model.facts.n_heads
        bad = [h for h in self.heads if not (0 <= h[0] < L and 0 <= h[1] < H)]
        if bad:
            raise ValueError(f"receiver heads {bad} do not exist in {model.name} ({L} layers x {H} heads)")
        data.at(self.position)  # raises with the fix when a prompt lacks the position

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.heads})

    def senders(self, n_layers: int, n_heads: int) -> list[Head]:
        """Every head that can send to these receivers: all heads for logits, else heads below the top receiver
        layer that are not receivers themselves."""
        top = n_layers if self.kind == "logits" else max(self.layers)
        return [(l, h) for l in range(top) for h in range(n_heads) if (l, h) not in self.heads]


@dataclass
class Baseline:
    """The clean and counterfactual runs every patch starts from."""

    ld_clean: Float[Tensor, " batch"]
    ld_corrupt: Float[Tensor, " batch"]
    z_clean: list[Tensor]  # per layer [batch, pos, head, d_head]
    z_corrupt: list[Tensor]
    mlp_clean: list[Tensor]  # per layer [batch, pos, d_model]
    resid_pre_clean: list[Tensor]  # per layer, the clean residual stream entering the block [batch, pos, d_model]
    key: str | None = None  # fingerprint of the model and prompts it was run on (keys cached tables)


def _z(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def _mlp(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


def _check(data: TaskData) -> None:
    if not torch.equal(data.clean.lengths, data.corrupt.lengths):
        raise ValueError(
            "patching needs clean and counterfactual prompts of the same token length (position by position); "
            "this TaskData's counterfactuals change the length of some prompts"
        )


def _ld(model: Model, logits: Tensor, data: TaskData) -> Tensor:
    return logit_difference(logits_at(logits, data.at("END")), data.answer, data.distractor)


@torch.no_grad()
def baseline(model: Model, data: TaskData) -> Baseline:
    """Run clean and counterfactual prompts once, caching every head's ``z`` and every MLP's output (on the
    model's device)."""
    from headcircuits.cache import fingerprint

    _check(data)
    L = model.facts.n_layers
    names = lambda n: n.endswith(("attn.hook_z", "hook_mlp_out", "hook_resid_pre"))  # noqa: E731
    clean_logits, clean = model.bridge.run_with_cache(data.clean.ids.to(model.device), names_filter=names)
    corrupt_logits, corrupt = model.bridge.run_with_cache(data.corrupt.ids.to(model.device), names_filter=names)
    return Baseline(
        key=fingerprint({"model": model, "data": data}),
        ld_clean=_ld(model, clean_logits, data),
        ld_corrupt=_ld(model, corrupt_logits, data),
        z_clean=[clean[_z(l)].clone() for l in range(L)],
        z_corrupt=[corrupt[_z(l)].clone() for l in range(L)],
        mlp_clean=[clean[_mlp(l)].clone() for l in range(L)],
        resid_pre_clean=[clean[f"blocks.{l}.hook_resid_pre"].clone() for l in range(L)],
    )


def _position_mask(data: TaskData, position: str | None, shape: tuple[int, int], device) -> Tensor:
    """[batch, pos] True where a patch applies: every position (None) or each prompt's named position."""
    if position is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    mask[torch.arange(shape[0], device=device), data.at(position).to(device)] = True
    return mask


def zero_by_construction(data: TaskData, position: str) -> bool:
    """True when every prompt's counterfactual has the same tokens as the clean prompt up to and including
    ``position``: then every head's counterfactual output there equals its clean output (attention is causal),
    and since path patching freezes every other head, nothing else reaches the receivers at that position, so
    every sender's effect on receivers read there is exactly 0 (e.g. the S2 -> IO counterfactual and the
    previous-token stage's keys at S1+1)."""
    pos = data.at(position)
    if data.clean.ids.shape != data.corrupt.ids.shape:
        return False  # prompts of other lengths: not the same tokens (and path patching refuses them anyway)
    same = data.clean.ids == data.corrupt.ids
    upto = torch.arange(same.shape[1])[None, :] <= pos[:, None]
    return bool((same | ~upto).all())


def _receiving_model(model: Model, receivers: Receivers) -> Model:
    """The model the experiment runs on: its ungrouped copy for per-head k / v receivers (see the module
    docstring), else itself."""
    if receivers.kind in ("k", "v") and receivers.kv == "head":
        return ungrouped(model)
    return model


@torch.no_grad()
def activation_patch_heads(
    model: Model, data: TaskData, position: str | None = None, base: Baseline | None = None
) -> Float[Tensor, "layer head"]:
    """Normalised effect of replacing one head's output ``z`` by its counterfactual value (all positions, or a
    named position), everything downstream recomputed. One forward pass per head."""
    base = base or baseline(model, data)
    L, H = model.facts.n_layers, model.facts.n_heads
    mask = _position_mask(data, position, tuple(data.clean.ids.shape), model.device)[..., None]
    ids = data.clean.ids.to(model.device)
    ld = torch.zeros(L, H, len(data), device=model.device)
    for layer in tqdm(range(L), desc="activation patching", leave=False):
        for head in range(H):
            def patch(z, hook, layer=layer, head=head):
                z = z.clone()
                z[..., head, :] = torch.where(mask, base.z_corrupt[layer][..., head, :], z[..., head, :])
                return z

            logits = model.bridge.run_with_hooks(ids, fwd_hooks=[(_z(layer), patch)])
            ld[layer, head] = _ld(model, logits, data)
    return normalised_effect(ld, base.ld_clean, base.ld_corrupt).cpu()


@torch.no_grad()
def activation_patch_residual(
    model: Model, data: TaskData, layer: int, position: str | None = None, base: Baseline | None = None
) -> Float[Tensor, ""]:
    """Normalised effect of replacing the residual stream entering ``layer`` (all positions or one) by its
    counterfactual value. At layer 0 and all positions this *is* the counterfactual run (effect 1)."""
    base = base or baseline(model, data)
    name = f"blocks.{layer}.hook_resid_pre"
    _, cache = model.bridge.run_with_cache(data.corrupt.ids.to(model.device), names_filter=lambda n: n == name)
    corrupt = cache[name]
    mask = _position_mask(data, position, tuple(data.clean.ids.shape), model.device)[..., None]
    logits = model.bridge.run_with_hooks(
        data.clean.ids.to(model.device), fwd_hooks=[(name, lambda x, hook: torch.where(mask, corrupt, x))]
    )
    return normalised_effect(_ld(model, logits, data)[None], base.ld_clean, base.ld_corrupt)[0].cpu()


def _receiver_hook_name(kind: str, layer: int) -> str:
    return f"blocks.{layer}.attn.hook_{kind}"


@torch.no_grad()
def path_patch_ld(
    model: Model,
    data: TaskData,
    receivers: Receivers,
    senders: list[Head] | None = None,
    *,
    freeze_mlps: bool = False,
    sender_position: str | None = None,
    base: Baseline | None = None,
    progress: bool = True,
) -> tuple[dict[Head, Tensor], Baseline]:
    """The reference path patching loop: for each sender, its patched logit difference per prompt."""
    receivers.check(model, data)
    model = _receiving_model(model, receivers)
    base = base or baseline(model, data)
    L, H = model.facts.n_layers, model.facts.n_heads
    senders = senders if senders is not None else receivers.senders(L, H)
    group = model.facts.kv_group_size
    device = model.device
    ids = data.clean.ids.to(device)
    sender_mask = _position_mask(data, sender_position, tuple(data.clean.ids.shape), device)[..., None]
    receiver_rows = torch.arange(len(data), device=device)
    receiver_pos = data.at(receivers.position).to(device)
    out: dict[Head, Tensor] = {}
    for sender in tqdm(senders, desc="path patching (reference)", disable=not progress, leave=False):
        ls, hs = sender

        # step 2: freeze every head to clean, sender to counterfactual; record the receivers' inputs
        def freeze(z, hook, layer):
            frozen = base.z_clean[layer].clone()
            if layer == ls:
                frozen[..., hs, :] = torch.where(sender_mask, base.z_corrupt[layer][..., hs, :], frozen[..., hs, :])
            return frozen

        hooks: list[tuple[str, Callable]] = [(_z(l), lambda z, hook, l=l: freeze(z, hook, l)) for l in range(L)]
        if freeze_mlps:
            hooks += [(_mlp(l), lambda x, hook, l=l: base.mlp_clean[l]) for l in range(L)]
        recorded: dict[int, Tensor] = {}
        if receivers.kind != "logits":
            for layer in receivers.layers:
                def record(x, hook, layer=layer):
                    recorded[layer] = x.clone()
                    return x

                hooks.append((_receiver_hook_name(receivers.kind, layer), record))
        logits = model.bridge.run_with_hooks(ids, fwd_hooks=hooks)
        if receivers.kind == "logits":
            out[sender] = _ld(model, logits, data)
            continue

        # step 3: a clean run with only the receivers' inputs replaced, at the receiver position
        patch_hooks = []
        for layer in receivers.layers:
            heads = [h for l, h in receivers.heads if l == layer]
            if receivers.kind in ("k", "v"):
                heads = sorted({h // group for h in heads})  # the shared K/V head of each receiver's group

            def patch(x, hook, layer=layer, heads=heads):
                x = x.clone()
                for h in heads:
                    x[receiver_rows, receiver_pos, h] = recorded[layer][receiver_rows, receiver_pos, h]
                return x

            patch_hooks.append((_receiver_hook_name(receivers.kind, layer), patch))
        logits = model.bridge.run_with_hooks(ids, fwd_hooks=patch_hooks)
        out[sender] = _ld(model, logits, data)
    return out, base


def path_patch(
    model: Model,
    data: TaskData,
    receivers: Receivers,
    senders: list[Head] | None = None,
    *,
    method: Literal["fast", "reference"] = "fast",
    freeze_mlps: bool = False,
    sender_position: str | None = None,
    base: Baseline | None = None,
    progress: bool = True,
    cache: bool = False,
    per_batch: int | None = None,
) -> Float[Tensor, "layer head"]:
    """Normalised path-patching effect of every sender on the receivers, as a [layer, head] table on the CPU (NaN
    for heads that are not senders). See the module docstring for the three steps. ``method='fast'`` and
    ``'reference'`` (the paper's loop) compute the same numbers. ``per_batch``: see :func:`normalised_effect`
    (None: a ratio of means, ours; 25: Circuit Component Reuse's average of per-batch ratios). ``cache=True``
    keeps the table on disk (headcircuits.cache), keyed by the model, the prompts, the baseline it starts from
    and every parameter."""
    if method not in ("fast", "reference"):
        raise ValueError(f"method must be 'fast' or 'reference', not {method!r}")

    def compute() -> Tensor:
        run = path_patch_fast_ld if method == "fast" else path_patch_ld
        lds, b = run(model, data, receivers, senders, freeze_mlps=freeze_mlps, sender_position=sender_position,
                     base=base, progress=progress)
        table = torch.full((model.facts.n_layers, model.facts.n_heads), float("nan"))
        for (layer, head), ld in lds.items():
            table[layer, head] = float(normalised_effect(ld[None], b.ld_clean, b.ld_corrupt, per_batch)[0])
        return table

    if not cache:
        return compute()
    from headcircuits.cache import cached, fingerprint

    base_key = None if base is None else (base.key or fingerprint([base.ld_clean, base.ld_corrupt, base.resid_pre_clean[0],
                                                                     *base.z_clean, *base.z_corrupt]))
    key = {"model": model, "data": data, "receivers": receivers, "senders": senders, "freeze_mlps": freeze_mlps,
           "sender_position": sender_position, "base": base_key, "per_batch": per_batch}
    return cached("path_patch", key, compute)


# --- the fast implementation ----------------------------------------------------------------------------------------

def _two_logit_difference(model: Model, normed: Tensor, answer: Tensor, distractor: Tensor) -> Tensor:
    """logit(answer) - logit(distractor) from the final-norm output, two columns of the unembedding only."""
    both = unembed(model, normed, torch.stack([answer, distractor], 1))
    return both[:, 0] - both[:, 1]


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
    max_rows: int = 256,
    progress: bool = True,
) -> tuple[dict[Head, Tensor], Baseline]:
    """Path patching, the same experiment as :func:`path_patch_ld`, computed on as few tokens and layers as
    possible.

    Why that is exact. In step 2 every head is frozen, so no information moves between positions: the residual
    stream at the receivers' position P (END for the logits) depends only on the frozen head outputs at P and on
    per-position MLPs and norms. Below a sender's layer every head holds its clean output, so the residual there
    is the clean one. Step 2 is therefore a one-token pass per (prompt, sender) that starts at the sender's layer
    from the clean residual entering it at P (the model's own blocks, :func:`headcircuits.models.blocks.run_blocks`)
    and whose heads output their frozen values at P; the senders of one layer share a pass (at most ``chunk``).
    Into the logits, every block's attention output at P is then known (the clean one, or at the senders' layer
    the clean one with the senders' counterfactual ``z``), so only the norms and MLPs run
    (:func:`headcircuits.models.blocks.mlp_only_block`): no query, key or value projection, no attention.
    Receivers below a sender's layer read their clean input. In step 3 only the receivers' inputs at P change, so
    every position before P, and every layer below the lowest receiver at every position, is the clean run: one
    clean pass over all prompts gives the residual entering each receiver layer and every layer's keys and
    values; then, per prompt, its tokens P..END start at the lowest receiver layer from their clean residual, over
    the clean keys and values of the tokens before P, one row per sender (at most ``max_rows`` at a time). A sender
    between receiver layers changes no receiver at or below its own layer, so its row joins at the lowest receiver
    layer above it, from the clean residual there (chapter 03's previous-token stage: 20 % less work). The
    unembedding is skipped: the logit difference needs two columns.
    Agreement with the reference is tested on every tiny family for logits and q / k / v receivers.
    """
    receivers.check(model, data)
    model = _receiving_model(model, receivers)
    base = base or baseline(model, data)
    L, H = model.facts.n_layers, model.facts.n_heads
    senders = senders if senders is not None else receivers.senders(L, H)
    B, S_all = len(data), len(senders)
    device = model.device
    every = torch.arange(B, device=device)
    where = data.at("END" if receivers.kind == "logits" else receivers.position).to(device)  # P per prompt
    take = lambda t: t[every, where]  # noqa: E731  each prompt's value at P: [B, ...]
    resid_pre = [take(r) for r in base.resid_pre_clean]  # the clean residual entering each block, at P
    z_clean = [take(z) for z in base.z_clean]
    z_corrupt = [take(z) for z in base.z_corrupt]
    mlp_clean = [take(m) for m in base.mlp_clean]
    sender_on = take(_position_mask(data, sender_position, tuple(data.clean.ids.shape), device))  # [B]
    ld = torch.zeros(B, S_all, dtype=base.ld_clean.dtype, device=device)
    top = L if receivers.kind == "logits" else max(receivers.layers) + 1  # the blocks step 2 must run
    clean = None if receivers.kind == "logits" else _clean_for_step3(model, data, receivers, where)
    # step 3 of a sender starts at the lowest receiver layer above it: the receivers at or below its layer read
    # their clean input, so below that layer its run is the clean run (None: no receiver above it, no effect)
    entry = [min((r for r in receivers.layers if r > layer), default=None) for layer, _ in senders]
    clean_inputs = {} if clean is None else clean.inputs
    recorded: dict[int, Tensor] = {}  # per receiver layer [B, S_all, heads, d]
    attn_clean = functools.lru_cache(None)(lambda layer: attention_output(model, layer, z_clean[layer]))  # [B, d]
    # senders of one layer share a pass that starts at their layer (at most `chunk` per pass)
    order = sorted(range(S_all), key=lambda s: senders[s][0])
    groups: list[list[int]] = []
    for s in order:
        if groups and senders[groups[-1][0]][0] == senders[s][0] and len(groups[-1]) < chunk:
            groups[-1].append(s)
        else:
            groups.append([s])
    bar = tqdm(total=len(groups) + (0 if receivers.kind == "logits" else B), desc="path patching (fast)",
               disable=not progress, leave=False)
    for group in groups:
        S, first = len(group), senders[group[0]][0]
        rep = lambda t: t.repeat_interleave(S, dim=0)  # noqa: E731  row b*S + s: prompt b, sender group[s]
        heads = [senders[s][1] for s in group]

        # step 2, one token per (prompt, sender) from the senders' layer: below it the frozen run is the clean run;
        # in the senders' layer each row's sender head holds its counterfactual z (where the sender is patched)
        z_first = rep(z_clean[first]).clone()
        for s, hs in enumerate(heads):
            z_first[every * S + s, hs] = torch.where(sender_on[:, None], z_corrupt[first][:, hs], z_clean[first][:, hs])
        h = rep(resid_pre[first])
        if receivers.kind == "logits":
            # every head frozen: each block adds a known attention output, so only its norms and MLP run
            for layer in range(first, L):
                attn = attention_output(model, layer, z_first) if layer == first else rep(attn_clean(layer))
                h = mlp_only_block(model, layer, h, attn, rep(mlp_clean[layer]) if freeze_mlps else None)
            ld[:, group] = _two_logit_difference(model, final_norm(model, h), rep(data.answer),
                                                 rep(data.distractor)).reshape(B, S)
        else:
            def freeze(z, hook, layer):
                return (z_first if layer == first else rep(z_clean[layer]))[:, None]

            hooks: list[tuple[str, Callable]] = [(_z(l), lambda z, hook, l=l: freeze(z, hook, l))
                                                 for l in range(first, top)]
            if freeze_mlps:
                hooks += [(_mlp(l), lambda x, hook, l=l: rep(mlp_clean[l])[:, None]) for l in range(first, top)]
            for layer in receivers.layers:
                if layer < first:  # below the senders: the receivers read their clean input
                    values = clean_inputs[layer][:, None].expand(B, S, *clean_inputs[layer].shape[1:])
                    recorded.setdefault(layer, torch.empty(B, S_all, *values.shape[2:], dtype=values.dtype,
                                                           device=device))[:, group] = values
                    continue

                def record(x, hook, layer=layer, S=S, group=group):
                    x_at = x[:, -1].reshape(B, S, *x.shape[2:])
                    recorded.setdefault(layer, torch.empty(B, S_all, *x_at.shape[2:], dtype=x_at.dtype,
                                                           device=device))[:, group] = x_at
                    if layer == top - 1:
                        raise _Stop
                    return x

                hooks.append((_receiver_hook_name(receivers.kind, layer), record))
            try:
                with model.bridge.hooks(fwd_hooks=hooks):
                    run_blocks(model, h[:, None], range(first, top))
            except _Stop:
                pass
        bar.update()
    if receivers.kind != "logits":
        for b in range(B):
            ld[b] = _step3_one_prompt(model, data, receivers, recorded, clean, b, int(where[b]), max_rows,
                                      base.ld_clean[b], entry)
            bar.update()
    bar.close()
    return {sender: ld[:, s] for s, sender in enumerate(senders)}, base


@dataclass
class _Step3Clean:
    """What step 3 reads from one clean pass: the residual entering each receiver layer at every position,
    every layer's keys and values (each prompt's first P are its prefix's) and the receivers' clean inputs at P."""

    low: int
    resid: dict[int, Tensor]  # per receiver layer, the residual entering it at every position [B, T, d_model]
    kv: list[tuple[Tensor, Tensor]]  # per layer, [B, kv heads, T, d_head]
    inputs: dict[int, Tensor]  # per receiver layer, [B, heads, d]


def _clean_for_step3(model: Model, data: TaskData, receivers: Receivers, where: Tensor) -> _Step3Clean:
    """One clean pass over every prompt (:func:`headcircuits.models.blocks.clean_pass`), recording what step 3 and
    the receivers below a sender's layer need (the residuals from this pass, not the baseline's, so that they and
    the keys and values come from one run)."""
    seen: dict[int, Tensor] = {}
    rows = torch.arange(len(data), device=model.device)

    def record(x, hook, layer):
        seen[layer] = x[rows, where].clone()
        return x

    entering: dict[int, Tensor] = {}

    def keep(x, hook, layer):
        entering[layer] = x.detach().clone()
        return x

    low = min(receivers.layers)
    hooks = [(_receiver_hook_name(receivers.kind, l), lambda x, hook, l=l: record(x, hook, l))
             for l in receivers.layers]
    hooks += [(f"blocks.{l}.hook_resid_pre", lambda x, hook, l=l: keep(x, hook, l))
              for l in receivers.layers if l > low]
    entering[low], kv = clean_pass(model, data.clean.ids, low, hooks)
    return _Step3Clean(low, entering, kv, seen)


def _step3_one_prompt(
    model: Model, data: TaskData, receivers: Receivers, inputs: dict[int, Tensor], clean: _Step3Clean, b: int,
    p: int, max_rows: int, ld_clean: Tensor, entry: list[int | None],
) -> Float[Tensor, " sender"]:
    """Step 3 of the fast path for prompt ``b`` with receiver position ``p``: below the lowest receiver layer
    every token is clean, and so is every token before ``p``; so the tokens p..END start at that layer from their
    clean residual, over the clean keys and values of the tokens before p, one row per sender with the
    receivers' inputs at p replaced by the recorded ones (the model's own blocks,
    :func:`headcircuits.models.blocks.run_sequence`). A sender's row joins at ``entry[sender]``, the lowest
    receiver layer above the sender (below it the row is the clean run); a sender with no receiver above it
    changes nothing (its LD is the clean one)."""
    group_size = model.facts.kv_group_size
    per_layer = {
        layer: sorted({h // group_size for l, h in receivers.heads if l == layer})
        if receivers.kind in ("k", "v") else [h for l, h in receivers.heads if l == layer]
        for layer in receivers.layers
    }
    low, L = clean.low, model.facts.n_layers
    end = int(data.positions["END"][b])
    tail = {layer: r[b : b + 1, p : end + 1] for layer, r in clean.resid.items()}  # [1, T, d_model] per layer
    prefix = PrefixCache({l: (k[b : b + 1, :, :p], v[b : b + 1, :, :p]) for l, (k, v) in enumerate(clean.kv) if l >= low}, p)
    out = ld_clean.expand(len(entry)).clone()
    answer, distractor = data.answer[b : b + 1], data.distractor[b : b + 1]
    # the same run with the receivers' clean inputs: its LD is the baseline's up to float32 rounding of another
    # order of operations, which is removed from every sender's LD (so a sender that changes nothing gives 0)
    h = run_sequence(model, tail[low], range(low, L), prefix if p else None, p)
    offset = _two_logit_difference(model, final_norm(model, h[:, -1]), answer, distractor)[0] - ld_clean
    order = sorted((s for s, layer in enumerate(entry) if layer is not None), key=lambda s: entry[s])
    for c0 in range(0, len(order), max_rows):
        chunk = order[c0 : c0 + max_rows]  # rows in order of entry: the rows present at a layer are a prefix
        joins = sorted({entry[s] for s in chunk})
        h = tail[joins[0]][:0]  # no row yet: [0, T, d_model]
        for j, first in enumerate(joins):
            last = joins[j + 1] if j + 1 < len(joins) else L
            h = torch.cat([h, tail[first].expand(sum(entry[s] == first for s in chunk), -1, -1)])
            rows = torch.tensor(chunk[: len(h)], device=model.device)
            hooks: list[tuple[str, Callable]] = []
            for layer in range(first, last):
                if layer not in per_layer:
                    continue

                def patch(x, hook, layer=layer, heads=per_layer[layer]):
                    x = x.clone()
                    x[:, 0, heads] = inputs[layer][b, rows][:, heads]
                    return x

                hooks.append((_receiver_hook_name(receivers.kind, layer), patch))
            segment = PrefixCache({l: prefix.kv[l] for l in range(first, last)}, p).repeat(len(h)) if p else None
            with model.bridge.hooks(fwd_hooks=hooks):
                h = run_sequence(model, h, range(first, last), segment, p)
        n = len(chunk)
        out[torch.tensor(chunk, device=model.device)] = _two_logit_difference(
            model, final_norm(model, h[:, -1]), answer.expand(n), distractor.expand(n)) - offset
    return out
