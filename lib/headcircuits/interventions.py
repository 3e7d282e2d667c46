"""Interventions on attention: the Colored Objects "repair" of Circuit Component Reuse (Merullo et al. 2024, Sec. 5).

In IOI the inhibition heads (and the negative mover) attend from END to the repeated name S2 and tell the movers
which name *not* to copy. On Colored Objects the same heads are in the circuit, but the model often answers with
a wrong colour of the list. The paper's repair forces these heads, at END, to attend to the *incorrect* colours
(as they would attend to S2 in IOI), so that they inhibit them; on GPT-2 medium accuracy rises from 49.6 % to
93.7 % with four heads (81.5 % with the inhibition heads only, 78.1 % with the negative mover only).

The paper's exact forced pattern is not released. Our documented choice (all of it parameters):

* at each prompt's ``query`` position (END) the chosen heads' attention becomes
  ``(1 - strength) * original + strength * uniform(keys)``, a valid probability distribution; ``strength=1``
  puts all attention on the ``keys`` positions (Colored Objects: ``WRONG_COLOR_0`` and ``WRONG_COLOR_1``, equal
  weight); every other position and head is untouched, and everything downstream is recomputed;
* the control applies the same intervention to random heads (same number, distinct draws from the layers the
  chosen heads span, excluding them and any other excluded heads such as the whole circuit; :func:`control_heads`).

Editing the attention probabilities (``hook_pattern``) changes the head's output exactly as if those were its
attention weights (tested against the value vectors on every tiny family).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from headcircuits import metrics
from headcircuits.models.core import Head, Model
from headcircuits.svd import value_offsets
from headcircuits.tasks.base import TaskData


def forced_row(
    row: Float[Tensor, "batch key"], keys: Int[Tensor, "batch n_keys"], strength: float
) -> Float[Tensor, "batch key"]:
    """One query's attention distribution per prompt, moved towards the ``keys`` positions (Circuit Component
    Reuse §5, the repair): ``(1 - strength) * row + strength * uniform(keys)``. Still a distribution (sums to 1)."""
    target = torch.zeros_like(row)
    target.scatter_add_(1, keys, torch.full(keys.shape, 1.0 / keys.shape[1], dtype=row.dtype, device=row.device))
    return (1 - strength) * row + strength * target


@dataclass(frozen=True)
class ForcedAttention:
    """Force ``heads`` to attend, at each prompt's ``query`` position, to its ``keys`` positions (uniformly),
    mixed with their own pattern: ``(1 - strength) * original + strength * uniform(keys)``."""

    heads: tuple[Head, ...]
    keys: tuple[str, ...]
    query: str = "END"
    strength: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength mixes two distributions and must be in [0, 1], not {self.strength}")
        if not self.keys:
            raise ValueError("name at least one key position to force attention onto (e.g. 'WRONG_COLOR_0')")

    def _prepared(self, data: TaskData) -> tuple[dict[int, list[int]], Tensor]:
        """The forced heads by layer, and each prompt's key positions ([batch, n_keys]); unknown positions refused."""
        missing = [k for k in (*self.keys, self.query) if k not in data.positions]
        if missing:
            raise KeyError(f"positions {missing} are not in this {data.task} TaskData; it has {sorted(data.positions)}")
        by_layer: dict[int, list[int]] = {}
        for layer, head in self.heads:
            by_layer.setdefault(layer, []).append(head)
        return by_layer, torch.stack([data.at(k) for k in self.keys], 1)

    @staticmethod
    def _pattern_hooks(by_layer: dict[int, list[int]], force) -> list:
        return [(f"blocks.{layer}.attn.hook_pattern", lambda p, hook, heads=heads: force(p, heads))
                for layer, heads in sorted(by_layer.items())]

    def hooks_for(self, data: TaskData):
        """A :data:`headcircuits.metrics.HooksFor` for batched runs over ``data``."""
        by_layer, key_pos = self._prepared(data)
        query_pos = data.at(self.query)

        def hooks(start: int, stop: int) -> list:
            def force(pattern, heads):
                pattern = pattern.clone()
                rows = torch.arange(stop - start, device=pattern.device)
                q, keys = query_pos[start:stop].to(pattern.device), key_pos[start:stop].to(pattern.device)
                for h in heads:
                    pattern[rows, h, q] = forced_row(pattern[rows, h, q], keys, self.strength)
                return pattern

            return self._pattern_hooks(by_layer, force)

        return hooks

    def end_hooks(self, data: TaskData) -> metrics.EndHooks:
        """The same intervention for the END-only engine (:func:`headcircuits.metrics.end_only_logits`), where
        each pattern has END's query row only. The query must be END, each prompt's last token."""
        if self.query != "END":
            raise ValueError(f"the END-only engine recomputes END alone; query is {self.query!r}")
        by_layer, key_pos = self._prepared(data)

        def hooks(index: Tensor) -> list:
            def force(pattern, heads):
                pattern = pattern.clone()
                keys = key_pos[index].to(pattern.device)
                for h in heads:
                    pattern[:, h, 0] = forced_row(pattern[:, h, 0], keys, self.strength)
                return pattern

            return self._pattern_hooks(by_layer, force)

        return hooks


@dataclass(frozen=True)
class ResidualAddition:
    """Add ``vector`` ([d_model], or one row per prompt) to the residual stream after block ``layer`` at each
    prompt's ``position`` (e.g. Talking Heads' duplicate channel: a point of the plane of 3.0.1 and 3.0.2 added at
    IO or S1, before the inhibition heads read it). Everything after that block is recomputed."""

    layer: int
    position: str
    vector: Float[Tensor, "... d_model"]

    def hooks_for(self, data: TaskData):
        """A :data:`headcircuits.metrics.HooksFor` for batched runs over ``data``."""
        vector = torch.as_tensor(self.vector, dtype=torch.float32).reshape(-1, self.vector.shape[-1])
        if vector.shape[0] not in (1, len(data)):
            raise ValueError(f"vector has {vector.shape[0]} rows; give one, or one per prompt ({len(data)})")
        positions = data.at(self.position)

        def hooks(start: int, stop: int) -> list:
            v = vector if vector.shape[0] == 1 else vector[start:stop]

            def add(resid, hook):
                resid = resid.clone()
                rows = torch.arange(stop - start, device=resid.device)
                resid[rows, positions[start:stop].to(resid.device)] += v.to(resid)
                return resid

            return [(f"blocks.{self.layer}.hook_resid_post", add)]

        return hooks


@torch.no_grad()
def attention_under(
    model: Model, data: TaskData, heads: list[Head], query: str, keys: list[str],
    intervention: ForcedAttention | None | list[ForcedAttention | None] = None, batch_size: int = 32,
    engine: str = "end-only",
) -> Float[Tensor, "head key"] | list[Tensor]:
    """Mean attention of ``heads`` from ``query`` to each of ``keys`` (rows: heads, columns: keys), with or
    without an intervention in the same forward pass (e.g. the movers' attention to the right and wrong colours
    before and after the repair). A list of interventions (``None``: none) gives a list of results.

    ``engine="end-only"`` (default, for a query at END): each prompt's earlier tokens run once, up to the highest
    read head, then END alone once per intervention (:func:`headcircuits.metrics.prefix_groups`; exact, tested
    equal to ``"full"``, which runs every prompt in full once per intervention)."""
    if engine not in ("end-only", "full"):
        raise ValueError(f"engine must be 'end-only' or 'full', not {engine!r}")
    several = isinstance(intervention, (list, tuple))
    conditions = list(intervention) if several else [intervention]
    if not heads:
        out = [torch.zeros(len(heads), len(keys)) for _ in conditions]
    elif engine == "end-only" and query == "END":
        out = _attention_end_only(model, data, heads, keys, conditions)
    else:
        out = [_attention_full(model, data, heads, query, keys, c, batch_size) for c in conditions]
    return out if several else out[0]


def _attention_full(model, data, heads, query, keys, intervention, batch_size) -> Tensor:
    out = torch.zeros(len(heads), len(keys), device=model.device)
    hooks_for = intervention.hooks_for(data) if intervention else (lambda start, stop: [])
    layers = sorted({l for l, _ in heads})
    for batch in data.batches(batch_size, device=model.device):
        seen: dict[int, Tensor] = {}

        def record(pattern, hook, layer):
            seen[layer] = pattern.detach().clone()
            return pattern

        hooks = hooks_for(batch.start, batch.stop) + [
            (f"blocks.{l}.attn.hook_pattern", lambda p, hook, l=l: record(p, hook, l)) for l in layers]
        model.bridge.run_with_hooks(batch.ids, fwd_hooks=hooks, stop_at_layer=layers[-1] + 1)
        for i, (l, h) in enumerate(heads):
            for j, key in enumerate(keys):
                out[i, j] += seen[l][batch.rows, h, batch.at(query), batch.at(key)].sum()
    return (out / len(data)).cpu()


def _attention_end_only(model, data, heads, keys, conditions) -> list[Tensor]:
    """:func:`attention_under` at END: the earlier tokens once, then END alone from the lowest forced or read
    layer up to the highest read one, once per condition (:func:`headcircuits.models.blocks.run_blocks`)."""
    from headcircuits.models.blocks import run_blocks

    layers = sorted({l for l, _ in heads})
    first = min([layers[0], *(l for c in conditions if c is not None for l, _ in c.heads)])
    blocks = range(first, layers[-1] + 1)
    key_pos = torch.stack([data.at(k) for k in keys], 1)  # [batch, key], validated
    hooks_of = [c.end_hooks(data) if c is not None else None for c in conditions]
    out = [torch.zeros(len(heads), len(keys)) for _ in conditions]
    for index, length, h, prefix in metrics.prefix_groups(model, data, first, blocks):
        for total, condition in zip(out, hooks_of):
            seen: dict[int, Tensor] = {}

            def record(pattern, hook, layer):
                seen[layer] = pattern[:, :, 0].detach()  # END's query row: [prompt, head, key position]
                if layer == layers[-1]:
                    raise metrics._Stop
                return pattern

            hooks = (condition(index) if condition else []) + [
                (f"blocks.{l}.attn.hook_pattern", lambda p, hook, l=l: record(p, hook, l)) for l in layers]
            try:
                with model.bridge.hooks(fwd_hooks=hooks):
                    run_blocks(model, h, blocks, prefix, length - 1)
            except metrics._Stop:
                pass
            pos = key_pos[index].to(model.device)
            for i, (l, hd) in enumerate(heads):
                total[i] += seen[l][:, hd].gather(1, pos).sum(0).float().cpu()
    return [total / len(data) for total in out]


def control_heads(
    n_layers: int, n_heads: int, size: int, n_draws: int, *, exclude: set[Head], layers: range, seed: int = 0,
) -> tuple[list[tuple[Head, ...]], range]:
    """``n_draws`` *distinct* random head sets of ``size`` from ``layers``, none in ``exclude`` (e.g. every
    circuit head). When ``layers`` hold too few heads for that many distinct sets (Gemma-3 has 4 heads per
    layer), the range is widened one layer at a time on both sides; the range used is returned with the sets."""
    while True:
        pool = [(l, h) for l in layers for h in range(n_heads) if (l, h) not in exclude]
        if len(pool) >= size and math.comb(len(pool), size) >= n_draws:
            break
        if layers.start == 0 and layers.stop == n_layers:
            raise ValueError(
                f"only {len(pool)} heads outside the excluded ones: cannot draw {n_draws} distinct sets of {size}; "
                f"ask for fewer controls or a smaller head set")
        layers = range(max(0, layers.start - 1), min(n_layers, layers.stop + 1))
    rng = random.Random(seed)
    draws: list[tuple[Head, ...]] = []
    while len(draws) < n_draws:
        chosen = tuple(sorted(rng.sample(pool, size)))
        if chosen not in draws:
            draws.append(chosen)
    return draws, layers


def repair(
    model: Model,
    data: TaskData,
    heads: dict[str, tuple[Head, ...]],
    keys: tuple[str, ...] = ("WRONG_COLOR_0", "WRONG_COLOR_1"),
    *,
    strength: float = 1.0,
    n_controls: int = 5,
    control_layers: range | None = None,
    exclude: set[Head] | frozenset = frozenset(),
    seed: int = 0,
    batch_size: int = 32,
    per_prompt: bool = False,
    engine: str = "end-only",
) -> pd.DataFrame | tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Accuracy and logit difference of the task with no intervention, with each named head set forced onto
    ``keys`` at END, and with ``n_controls`` distinct random head sets of the size of the largest named set
    (:func:`control_heads`: drawn from ``control_layers``, default the layers the named heads span, widened when
    too few heads remain; never a named head nor one in ``exclude``, e.g. every circuit head).

    One row per condition: ``condition``, ``heads``, ``top1_accuracy``, ``candidate_accuracy`` (among the three
    listed colours), ``logit_diff_mean`` and their standard errors; controls have ``condition='random k'`` and
    ``pool`` names the layers they were drawn from. ``per_prompt=True`` also returns each condition's
    :func:`headcircuits.metrics.evaluate` table (controls as ``random k #i``), for paired comparisons.

    ``engine="end-only"`` (default): the forcing changes END's computation only, so every prompt's earlier tokens
    run once and END alone is rerun per condition from the lowest forced layer
    (:func:`headcircuits.metrics.end_only_logits`; needs END to be the last token); ``"full"``: one full forward
    pass per condition, in batches of ``batch_size``. Both give the same tables (tested)."""
    conditions: list[tuple[str, tuple[Head, ...], str | None]] = [("none", (), None)]
    conditions += [(name, tuple(chosen), None) for name, chosen in heads.items()]
    named = {h for chosen in heads.values() for h in chosen}
    size = max((len(c) for c in heads.values()), default=0)
    if size and n_controls:
        spanned = sorted({l for l, _ in named})
        draws, layers = control_heads(model.facts.n_layers, model.facts.n_heads, size, n_controls,
                                      exclude=named | set(exclude),
                                      layers=control_layers or range(spanned[0], spanned[-1] + 1), seed=seed)
        pool = f"layers {layers.start}-{layers.stop - 1}, excluding {len(named | set(exclude))} heads"
        conditions += [(f"random {size}", chosen, pool) for chosen in draws]
    forcings = [ForcedAttention(chosen, keys, strength=strength) if chosen else None for _, chosen, _ in conditions]
    if engine == "end-only":
        first = min((l for f in forcings if f for l, _ in f.heads), default=model.facts.n_layers - 1)
        logits = metrics.end_only_logits(model, data, first, [f.end_hooks(data) if f else None for f in forcings])
        tables_of = [metrics.evaluate(model, data, logits=l) for l in logits]
    elif engine == "full":
        tables_of = [metrics.evaluate(model, data, batch_size=batch_size, hooks_for=f.hooks_for(data) if f else None)
                     for f in forcings]
    else:
        raise ValueError(f"engine must be 'end-only' or 'full', not {engine!r}")
    rows = []
    tables: dict[str, pd.DataFrame] = {}
    for (condition, chosen, pool), table in zip(conditions, tables_of):
        label = condition if condition not in tables else f"{condition} #{sum(k.startswith(condition) for k in tables)}"
        tables[label] = table
        rows.append({"condition": condition, "heads": " ".join(f"{l}.{h}" for l, h in chosen),
                     **metrics.summarise(table), **({"pool": pool} if pool else {})})
    frame = pd.DataFrame(rows)
    return (frame, tables) if per_prompt else frame


# --- ablating SVD components of a head's output (Talking Heads) ------------------------------------------------------

@dataclass(frozen=True)
class ComponentAblation:
    """Remove rank-1 SVD components of one head's OV circuit from its output (Talking Heads' ablation).

    With the sender's processed OV = W_V W_O = U diag(S) Vh (:func:`headcircuits.svd.head_svd`), component k writes
    along the row ``Vh[k]``. Ablating it projects the head's output off that direction, at every position:
    ``out' = out - (out . Vh[k]) Vh[k]`` (several components: off their span, the rows being orthonormal). It is
    done on the head's ``z`` so the rest of the model runs unchanged: with ``c_k = Vh[k] W_O^+`` (``Vh[k]`` lies
    in W_O's row space), ``z' = z - (z W_O Vh[k]^T) c_k`` gives exactly ``z' W_O = out'``. On LayerNorm models the
    processed W_O is centred; the raw output differs from it by a multiple of the all-ones vector, which every
    following LayerNorm removes, so the ablation is the same as seen by the rest of the model.

    ``scale`` generalises the ablation to a **weight edit** (Talking Heads' intervention on the channel):
    ``out' = out - (1 - scale) (out . Vh[k]) Vh[k]`` multiplies the components by ``scale`` (0 removes them, 1
    changes nothing, 2 doubles them, -1 flips them). It is linear in ``z``, so it is the same as running the
    model with W_O replaced by :meth:`edited_W_O`, once, for every prompt and position.
    """

    layer: int
    head: int
    directions: Float[Tensor, "k d_model"]  # orthonormal rows: the written directions to rescale
    W_O: Float[Tensor, "d_head d_model"]  # the (processed) W_O the directions belong to
    scale: float = 0.0
    offset: Float[Tensor, " d_head"] | None = None  # a constant part of z left untouched (see weight_edit)

    @classmethod
    def of(cls, weights, sender: Head, components, scale: float = 0.0, offset=None) -> "ComponentAblation":
        """Ablation (or, with ``scale``, rescaling) of ``components`` (indices, by decreasing singular value) of
        ``sender``'s OV in ``weights`` (a :class:`headcircuits.svd.HeadWeights`); ``offset``: a constant part of
        the head's ``z`` (its value biases) to leave untouched."""
        from headcircuits.svd import head_svd

        layer, head = sender
        svd = head_svd(weights.OV[layer, head])
        index = torch.as_tensor(list(components), dtype=torch.long)
        return cls(layer, head, svd.Vh[index], weights.W_O[layer, head], scale, offset)

    def _maps(self) -> tuple[Tensor, Tensor]:
        read = self.W_O @ self.directions.T  # [d_head, k]: z . read[:, j] = out . direction_j
        back = self.directions @ torch.linalg.pinv(self.W_O)  # [k, d_head]: back[j] @ W_O = direction_j
        return read, back

    def edited_W_O(self) -> Float[Tensor, "d_head d_model"]:
        """The head's W_O with the components rescaled: ``W_O - (1 - scale) (W_O Vh^T) Vh``."""
        return self.W_O - (1 - self.scale) * (self.W_O @ self.directions.T) @ self.directions

    def hooks(self) -> list:
        """Forward hooks (on ``hook_z``) that apply the ablation / edit (none if it changes nothing)."""
        if len(self.directions) == 0 or self.scale == 1:
            return []
        read, back = self._maps()
        factor = 1 - self.scale

        offset = None if self.offset is None else self.offset

        def ablate(z, hook):
            z = z.clone()
            zh = z[..., self.head, :]
            varying = zh if offset is None else zh - offset.to(z)
            z[..., self.head, :] = zh - factor * (varying @ read.to(z)) @ back.to(z)
            return z

        return [(f"blocks.{self.layer}.attn.hook_z", ablate)]


def edit_hooks(edits: list[ComponentAblation]) -> list:
    """The hooks of several component edits (one hook per edit; edits of one layer compose in order)."""
    return [hook for edit in edits for hook in edit.hooks()]


def attention_at(
    pattern: Float[Tensor, "batch query key"], query: Tensor, keys: list[Tensor],
) -> Float[Tensor, "batch n_keys"]:
    """One head's attention from each prompt's ``query`` position to each of its ``keys`` positions."""
    rows = torch.arange(pattern.shape[0], device=pattern.device)
    q = query.to(pattern.device)
    return torch.stack([pattern[rows, q, k.to(pattern.device)] for k in keys], dim=-1)


_HOOKED_LAYER = re.compile(r"^blocks\.(\d+)\.")


def _lowest_hooked_layer(hooks: list) -> int | None:
    """The lowest block any of ``hooks`` sits in (``None`` without hooks); 0 for a hook outside the blocks."""
    layers = [_HOOKED_LAYER.match(name) for name, _ in hooks]
    return min((int(m.group(1)) if m else 0 for m in layers), default=None)


@torch.no_grad()
def residuals_entering(model: Model, data: TaskData, layer: int, batch_size: int = 64) -> list[Tensor]:
    """The clean residual stream entering block ``layer`` (``blocks.{layer}.hook_resid_pre``), per batch of
    ``data.batches(batch_size)``, on the model's device; kept for the next calls on the same model, prompts and
    layer (:func:`headcircuits.metrics.recent`): every edit at or above ``layer`` starts from it
    (:func:`attention_per_prompt`)."""
    def compute() -> list[Tensor]:
        out: list[Tensor] = []
        for batch in data.batches(batch_size, device=model.device):
            def record(x, hook):
                out.append(x.detach().clone())
                raise metrics._Stop
            try:
                model.bridge.run_with_hooks(batch.ids, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", record)])
            except metrics._Stop:
                pass
        return out

    return metrics.recent(model, data, ("residual entering", layer, batch_size), compute)


@torch.no_grad()
def attention_per_prompt(
    model: Model, data: TaskData, head: Head, query: str, keys: list[str], hooks: list | None = None,
    batch_size: int = 64,
) -> Float[Tensor, "batch n_keys"]:
    """``head``'s attention from ``query`` to each of ``keys``, per prompt (with ``hooks``, e.g. a weight edit, in
    the same run).

    Nothing below the lowest hooked block (or below the head's own block, without hooks) differs from the clean
    run, so the run starts there, from the clean residual stream entering it (:func:`residuals_entering`, computed
    once per prompts and layer), and stops at the head's pattern (:func:`headcircuits.models.blocks.run_sequence`;
    tested equal to the full hooked pass on every tiny family). Hooks outside the blocks run the whole model."""
    from headcircuits.models.blocks import run_sequence

    layer, index = head
    hooks = list(hooks or [])
    first = min(layer, _lowest_hooked_layer(hooks) if hooks else layer)
    seen: dict[str, Tensor] = {}

    def record(pattern, hook):
        seen["p"] = pattern[:, index].detach().clone()
        raise metrics._Stop

    out = []
    starts = residuals_entering(model, data, first, batch_size) if first > 0 else None
    for i, batch in enumerate(data.batches(batch_size, device=model.device)):
        run = hooks + [(f"blocks.{layer}.attn.hook_pattern", record)]
        try:
            if starts is None:
                model.bridge.run_with_hooks(batch.ids, fwd_hooks=run)
            else:
                with model.bridge.hooks(fwd_hooks=run):
                    run_sequence(model, starts[i], range(first, layer + 1))
        except metrics._Stop:
            pass
        out.append(attention_at(seen["p"], batch.at(query), [batch.at(k) for k in keys]).float().cpu())
    return torch.cat(out)


def attention_contrast(
    model: Model, data: TaskData, receiver: Head, repeated: str = "S2", answer: str = "IO", query: str = "END",
    hooks: list | None = None,
) -> Float[Tensor, " batch"]:
    """The receiver's attention from ``query`` to the ``repeated`` token minus its attention to the ``answer``
    token, per prompt (IOI movers: negative when they attend to IO rather than S2)."""
    a = attention_per_prompt(model, data, receiver, query, [repeated, answer], hooks)
    return a[:, 0] - a[:, 1]


def inhibition_score(
    model: Model, data: TaskData, mover: Head, hooks: list | None = None, *, io: str = "IO", s1: str = "S1",
    query: str = "END",
) -> Float[Tensor, " batch"]:
    """Talking Heads' inhibition score (§3), per prompt: the mover's attention at END to the indirect object
    minus its attention to the *first* subject mention S1. From -1 (all on S1) to +1 (all on IO); a mover that
    is told which name to avoid scores high. The paper reads it for mover 9.9 of GPT-2 small on 200 IOI prompts,
    100 with IO first and 100 with S first (:func:`headcircuits.tasks.ioi.generate` alternates the two orders)."""
    a = attention_per_prompt(model, data, mover, query, [io, s1], hooks)
    return a[:, 0] - a[:, 1]


def weight_edit(model: Model, weights, head: Head, *, zero=(), keep=None, offsets=None) -> ComponentAblation:
    """Talking Heads' weight edit of one head's OV (§3, :func:`headcircuits.svd.edit_ov`), as forward hooks on the
    running model: the singular values ``zero`` are set to 0, or with ``keep`` every singular value except those
    (the keep-only ablations of the paper's Fig. 10). Exactly the paper's edit: what the head computes from its
    input loses those components; the constant part of its values (``b_V`` and the LayerNorm bias through W_V,
    folded into ``b_O`` in the paper's TransformerLens model; :func:`headcircuits.svd.value_offsets`) is left as it
    is. ``offsets``: precomputed ``value_offsets(model)``."""
    d_head = weights.W_V.shape[-1]
    if keep is not None:
        keep = {int(k) for k in keep}
        zero = [k for k in range(d_head) if k not in keep]
    offsets = value_offsets(model) if offsets is None else offsets
    return ComponentAblation.of(weights, head, list(zero), scale=0.0, offset=offsets[head[0], head[1]])


def inhibition_scores(
    model: Model, data: TaskData, weights, sender: Head, receiver: Head, components=None,
    repeated: str = "S2", answer: str = "IO",
) -> Float[Tensor, " component"]:
    """*Our* data-based score of each SVD component of ``sender``'s OV on ``receiver`` (kept from before the
    paper's protocol was known): how much ablating the component raises the receiver's attention to the repeated
    token relative to the answer at END (mean change of ``attention_contrast``). Positive: the component makes
    the receiver look away from the repeated token. The paper's own score is :func:`inhibition_score` under
    :func:`weight_edit` (see :func:`component_effects`). ``components`` default: all d_head."""
    base = attention_contrast(model, data, receiver, repeated, answer).mean()
    if components is None:
        components = range(weights.W_V.shape[-1])
    out = []
    for k in components:
        ablation = ComponentAblation.of(weights, sender, [k])
        out.append(attention_contrast(model, data, receiver, repeated, answer, hooks=ablation.hooks()).mean() - base)
    return torch.stack(out)


def component_effects(
    model: Model, data: TaskData, weights, sender: Head, mover: Head, components=None, *, offsets=None,
) -> Float[Tensor, " component"]:
    """The paper's Fig. 2 (data side): for each component of ``sender``'s OV, the change in the mean
    :func:`inhibition_score` of ``mover`` when that one singular value is set to 0 in the weights
    (:func:`weight_edit`). Negative: the component carries inhibition (removing it lowers the score). Cached on
    disk (keyed by the model, the prompts, the weights, the heads and the components)."""
    from headcircuits.cache import cached

    offsets = value_offsets(model) if offsets is None else offsets
    components = list(range(weights.W_V.shape[-1]) if components is None else components)

    def compute():
        base = inhibition_score(model, data, mover).mean()
        return torch.stack([
            inhibition_score(model, data, mover, weight_edit(model, weights, sender, zero=[k], offsets=offsets).hooks()).mean()
            - base for k in components])

    key = {"model": model, "data": data, "weights": weights, "offsets": offsets, "sender": list(sender),
           "mover": list(mover), "components": [int(k) for k in components]}
    return cached("component_effects", key, compute)


# --- choosing an intervention's setting on one half of the prompts, reporting it on the other ----------------------

@dataclass
class HeldOut:
    """The result of :func:`choose_and_hold_out`: the chosen ``setting``, the ``sweep`` that chose it (mean gain
    per group on the choosing half), the two halves, and per-prompt tables on the held-out half: ``before`` (no
    intervention), ``after`` (the chosen setting) and one per control."""

    setting: object
    sweep: pd.DataFrame
    choose: TaskData
    held_out: TaskData
    before: pd.DataFrame
    after: pd.DataFrame
    controls: list[pd.DataFrame]


def choose_and_hold_out(
    data: TaskData,
    run,
    settings,
    *,
    control=None,
    n_controls: int = 0,
    fraction: float = 0.5,
    seed: int = 0,
    by: str = "list_length",
    score: str = "candidate_correct",
) -> HeldOut:
    """Our protocol for an intervention with a free setting (a scale, a factor): split the prompts in two halves,
    each value of ``by`` in both (:meth:`TaskData.split`); on the choosing half, pick the setting with the highest
    gain in ``score`` (mean over the groups of ``by``, so every list length counts alike); report it on the other
    half only, so the reported gain is not inflated by the choice.

    ``run(part, setting)`` returns the per-prompt table (:func:`headcircuits.metrics.evaluate`) of ``part`` under
    the intervention with ``setting`` (``None``: no intervention); ``control(part, setting, i)`` the table of the
    ``i``-th control (e.g. random directions of the same size) on the held-out half.
    """
    settings = list(settings)
    if not settings:
        raise ValueError("give at least one setting to choose from")
    choose, held_out = data.split(fraction, seed=seed, by=by)
    base = run(choose, None).groupby(by)[score].mean()
    rows = []
    for setting in settings:
        gain = run(choose, setting).groupby(by)[score].mean() - base
        rows += [{"setting": setting, by: key, "gain": float(value)} for key, value in gain.items()]
    sweep = pd.DataFrame(rows)
    means = sweep.groupby("setting", sort=False).gain.mean()
    best = means.index[int(means.to_numpy().argmax())]  # the first setting among equals
    controls = [control(held_out, best, i) for i in range(n_controls)] if control is not None else []
    return HeldOut(best, sweep, choose, held_out, run(held_out, None), run(held_out, best), controls)
