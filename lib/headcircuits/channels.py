"""Inhibition channels and the positional subspace (Talking Heads, Merullo et al., NeurIPS 2024).

An inhibition head attends from END to the repeated item and writes into the residual stream a signal that tells
the movers *which* item not to copy. Talking Heads finds that on GPT-2 small this signal lives in a few SVD
components of the inhibition heads' OV circuits (a 3-dimensional subspace) and that it encodes the *position* of
the repeated item in the list rather than its identity.

Our construction (a documented choice; every step is a parameter):

1. **Components.** For each inhibition head, take the top ``per_head`` rank-1 components of its processed OV
   (:func:`headcircuits.svd.head_svd`; component k writes along ``Vh[k]``). The channel's *coefficients* on a
   prompt are, per head and component, the head's output at END read along that direction:
   ``c[h, k] = out_h . Vh_h[k]`` (``out_h = z_h W_O``). Within a head the directions are orthonormal, so the
   coefficients are exact coordinates of the head's output in its top components.
2. **Subspace.** Label prompts by the list position of the answer (IOI: 0 when the indirect object is named
   first, ABBA; 1 when second, BABA; Laundry List: the target position). The positional subspace is spanned by
   the top ``rank`` principal axes of the *class means* of the coefficients (the directions along which the
   positions differ most; between-class PCA), in coefficient space. When lists of several lengths are pooled,
   each length's mean is removed first, so the axes separate positions rather than lengths.
3. **Traversal.** :class:`ChannelShift` adds a vector of coefficients to the heads' outputs at END (through
   their ``z``, so exactly ``out_h + sum_k delta[h, k] Vh_h[k]``), e.g. the difference between the mean
   signal of two positions. Everything downstream, the movers included, is recomputed.
4. **Weight edit.** :class:`headcircuits.interventions.ComponentAblation` with ``scale`` rescales chosen
   components inside a head's OV (``scale=0`` removes them), once, for every prompt and position.

Approximations (stated in the notebook): on rotary models the heads' OV is exact but which positions the
movers *attend* to depends on the rotation; Gemma-3 applies a norm after the attention output, so an added
vector is rescaled with the rest of the output; the offline models are 4-bit quantised (dequantised weights are
what runs, so nothing here is approximate about them, but they are not the original float weights).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from jaxtyping import Float
from torch import Tensor

from headcircuits.metrics import end_is_last, end_only_logits, prefix_groups
from headcircuits.models.blocks import run_copies
from headcircuits.models.core import Head, Model
from headcircuits.svd import fix_signs
from headcircuits.tasks.base import TaskData


@dataclass(frozen=True)
class Channel:
    """The top ``per_head`` OV components of a set of heads, and (after :meth:`fit`) the positional subspace.

    Shapes: ``directions`` [head, k, d_model] (orthonormal rows per head: what each component writes);
    ``W_O`` [head, d_head, d_model] (processed, as in :class:`headcircuits.svd.HeadWeights`); ``axes``
    [rank, head * k] (orthonormal: the positional subspace in coefficient space) and ``center`` [head * k].
    """

    heads: tuple[Head, ...]
    components: tuple[tuple[int, ...], ...]
    directions: Float[Tensor, "head k d_model"]
    W_O: Float[Tensor, "head d_head d_model"]
    singular_values: Float[Tensor, "head k"]
    axes: Float[Tensor, "rank coef"] | None = None
    center: Float[Tensor, " coef"] | None = None
    offsets: Float[Tensor, "head d_head"] | None = None  # constant part of each head's z (svd.value_offsets)

    @classmethod
    def of(cls, weights, heads, per_head: int = 8) -> "Channel":
        """The top ``per_head`` components of each head's OV in ``weights`` (:class:`~headcircuits.svd.HeadWeights`)."""
        from headcircuits.svd import head_svd

        heads = tuple(tuple(h) for h in heads)
        if not heads:
            raise ValueError("a channel needs at least one head (e.g. the circuit's inhibition heads)")
        d_head = weights.W_O.shape[-2]
        if not 1 <= per_head <= d_head:
            raise ValueError(f"per_head must be between 1 and d_head = {d_head}, not {per_head}")
        dirs, svals = [], []
        for layer, head in heads:
            svd = head_svd(weights.OV[layer, head])
            dirs.append(svd.Vh[:per_head])
            svals.append(svd.S[:per_head])
        return cls(heads=heads, components=tuple(tuple(range(per_head)) for _ in heads),
                   directions=torch.stack(dirs), W_O=torch.stack([weights.W_O[l, h] for l, h in heads]),
                   singular_values=torch.stack(svals))

    @classmethod
    def pick(cls, weights, components: dict, offsets=None) -> "Channel":
        """Chosen components of chosen heads, ``{head: [component, ...]}`` (the same number per head), e.g. the
        paper's 3-D subspace ``{(7, 9): [6], (8, 6): [2], (8, 10): [1]}``. ``offsets``: the model's
        :func:`headcircuits.svd.value_offsets`, so that coordinates leave the heads' constant part out."""
        from headcircuits.svd import head_svd

        if not components:
            raise ValueError("pick at least one component of one head, e.g. {(8, 10): [1]}")
        sizes = {len(c) for c in components.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise ValueError(f"give every head the same (non-zero) number of components, not {sizes}")
        d_head = weights.W_O.shape[-2]
        heads = tuple(tuple(h) for h in components)
        dirs, svals = [], []
        for head, comps in components.items():
            if not all(0 <= k < d_head for k in comps):
                raise ValueError(f"components of {head} must be between 0 and {d_head - 1}, not {list(comps)}")
            svd = head_svd(weights.OV[head[0], head[1]])
            index = torch.as_tensor(list(comps), dtype=torch.long)
            dirs.append(svd.Vh[index])
            svals.append(svd.S[index])
        return cls(heads=heads, components=tuple(tuple(int(k) for k in c) for c in components.values()),
                   directions=torch.stack(dirs), W_O=torch.stack([weights.W_O[l, h] for l, h in heads]),
                   singular_values=torch.stack(svals),
                   offsets=None if offsets is None else torch.stack([offsets[l, h] for l, h in heads]))

    def back(self) -> Float[Tensor, "head k d_head"]:
        """``back[h, k] @ W_O[h] == directions[h, k]``: the z that writes exactly one unit along a component."""
        return torch.stack([self.directions[i] @ torch.linalg.pinv(self.W_O[i]) for i in range(len(self.heads))])

    @property
    def per_head(self) -> int:
        return self.directions.shape[1]

    @property
    def labels(self) -> list[str]:
        """``"L.H c k"`` for each coefficient, in coefficient order."""
        return [f"{l}.{h} c{k}" for (l, h), comps in zip(self.heads, self.components) for k in comps]

    # --- reading the channel ----------------------------------------------------------------------------------

    @torch.no_grad()
    def coefficients(
        self, model: Model, data: TaskData, position: str = "END", hooks: list | None = None, batch_size: int = 64,
        *, through: int | None = None,
    ) -> Float[Tensor, "batch coef"]:
        """Each head's output at ``position`` read along its component directions, ``[batch, head * k]``.
        The run stops after the last head's layer (``hooks``: extra interventions in the same run).

        At END (each prompt's last token) with no ``hooks``, the read shares the traversal's pass over the prompts
        (:func:`headcircuits.metrics.prefix_groups`, kept with ``reuse``): the pass keeps the earlier tokens' keys
        and values from the channel's lowest layer through ``through`` (default: its highest), and END alone goes
        on through the channel's layers. Pass the mover's layer as ``through`` and a :func:`traverse` of the same
        prompts up to that mover runs no pass of its own (Talking Heads §5.2 reads the coordinates, then
        traverses); pass the last layer and :func:`end_logits_under` on those prompts (the oracle fix) runs none
        either, while the pass stays kept (:data:`headcircuits.metrics.RECENT_BYTES`). Elsewhere (another
        position, or ``hooks``) the read is a batched run that keeps nothing, and ``through`` is only checked."""
        layers = sorted({l for l, _ in self.heads})
        if through is not None and not layers[-1] <= through < model.facts.n_layers:
            raise ValueError(f"through must lie between the channel's highest layer ({layers[-1]}) and the last "
                             f"layer ({model.facts.n_layers - 1}), not {through}")
        if position == "END" and hooks is None and end_is_last(data):
            return self._end_coefficients(model, data, layers, layers[-1] if through is None else through)
        out = []
        for batch in data.batches(batch_size, device=model.device):
            seen: dict[int, Tensor] = {}

            def record(z, hook, layer):
                seen[layer] = z.detach().clone()
                return z

            record_hooks = [(f"blocks.{l}.attn.hook_z", lambda z, hook, l=l: record(z, hook, l)) for l in layers]
            # extra hooks first: an intervention on a head's z is seen by the recorder on the same hook point
            model.bridge.run_with_hooks(batch.ids, fwd_hooks=[*(hooks or []), *record_hooks],
                                        stop_at_layer=layers[-1] + 1)
            out.append(self._read({l: batch.gather(z, position) for l, z in seen.items()}))
        return torch.cat(out)

    def _read(self, z_of_layer: dict[int, Tensor]) -> Float[Tensor, "batch coef"]:
        """The coefficients from each channel layer's ``z`` at the read position ([batch, head, d_head])."""
        return torch.cat([((z_of_layer[l][:, h].float().cpu() - (0 if self.offsets is None else self.offsets[i]))
                           @ self.W_O[i] @ self.directions[i].T) for i, (l, h) in enumerate(self.heads)], dim=-1)

    def _end_coefficients(self, model: Model, data: TaskData, layers: list[int], through: int) -> Tensor:
        """:meth:`coefficients` at END by the END-only engine: END from the lowest channel layer up, over the
        earlier tokens' cached keys and values (the pass kept for a traversal through ``through``)."""
        from headcircuits.models.blocks import run_blocks

        parts, order = [], []
        for index, length, h, prefix in prefix_groups(model, data, layers[0], range(layers[0], through + 1),
                                                      reuse=True):
            seen: dict[int, Tensor] = {}
            record = [(f"blocks.{l}.attn.hook_z", lambda z, hook, l=l: seen.__setitem__(l, z[:, 0].clone()))
                      for l in layers]
            with model.bridge.hooks(fwd_hooks=record):
                run_blocks(model, h, range(layers[0], layers[-1] + 1), prefix, length - 1)
            parts.append(self._read(seen))
            order.append(index)
        return torch.cat(parts)[torch.cat(order).argsort()]

    def fit(self, coefficients: Float[Tensor, "batch coef"], labels, rank: int = 3, groups=None) -> "Channel":
        """The positional subspace: top ``rank`` principal axes of the per-label means of ``coefficients``
        (between-class PCA). With ``groups`` (e.g. the list length), each group's mean is removed first, so the
        axes separate positions *within* a list rather than lists of different lengths. Returns a copy of the
        channel with ``axes`` and ``center`` set."""
        labels = torch.as_tensor(list(labels))
        classes = labels.unique()
        if len(classes) < 2:
            raise ValueError("fitting a positional subspace needs prompts of at least two answer positions")
        centred = coefficients
        if groups is not None:
            groups = torch.as_tensor(list(groups))
            centred = coefficients.clone()
            for g in groups.unique():
                centred[groups == g] -= coefficients[groups == g].mean(0)
        means = torch.stack([centred[labels == c].mean(0) for c in classes])
        rank = min(rank, len(classes) - 1, coefficients.shape[1])
        U, _, Vh = torch.linalg.svd(means - means.mean(0), full_matrices=False)
        _, Vh = fix_signs(U, Vh)  # an SVD axis has no sign of its own: fix one, so printed correlations are stable
        return replace(self, axes=Vh[:rank].contiguous(), center=coefficients.mean(0))

    def coords(self, coefficients: Float[Tensor, "batch coef"]) -> Float[Tensor, "batch rank"]:
        """Coordinates of coefficient vectors in the positional subspace (after :meth:`fit`)."""
        if self.axes is None:
            raise RuntimeError("fit the channel first: channel = channel.fit(coefficients, positions)")
        return (coefficients - self.center) @ self.axes.T

    def project(self, delta: Float[Tensor, "... coef"]) -> Float[Tensor, "... coef"]:
        """``delta`` restricted to the positional subspace (its component along the fitted axes)."""
        if self.axes is None:
            raise RuntimeError("fit the channel first: channel = channel.fit(coefficients, positions)")
        return (delta @ self.axes.T) @ self.axes

    def loadings(self) -> Float[Tensor, " coef"]:
        """How much each component takes part in the subspace: the norm of its column of ``axes``."""
        if self.axes is None:
            raise RuntimeError("fit the channel first")
        return self.axes.norm(dim=0)

    def top_components(self, n: int) -> list[int]:
        """The ``n`` coefficient indices that load most on the subspace (the components a weight edit targets)."""
        return self.loadings().argsort(descending=True)[:n].tolist()

    def edits(self, weights, chosen, scale: float) -> list:
        """A weight edit: the components at coefficient indices ``chosen`` are multiplied by ``scale`` inside their
        heads' OV, as one :class:`~headcircuits.interventions.ComponentAblation` per head (1 = unedited)."""
        from headcircuits.interventions import ComponentAblation

        chosen = {int(i) for i in chosen}
        edits = []
        for i, head in enumerate(self.heads):
            comps = [self.components[i][k] for k in range(self.per_head) if i * self.per_head + k in chosen]
            if comps:
                edits.append(ComponentAblation.of(weights, head, comps, scale=scale))
        return edits

    def edit(self, weights, chosen, scale: float) -> list:
        """The forward hooks of :meth:`edits`."""
        from headcircuits.interventions import edit_hooks

        return edit_hooks(self.edits(weights, chosen, scale))


@dataclass(frozen=True)
class ChannelShift:
    """Add ``delta`` (coefficients, ``[head * k]`` or one row per prompt ``[batch, head * k]``) to the channel's
    heads' outputs at each prompt's ``position``: head h's output becomes ``out_h + sum_k delta[h, k] Vh_h[k]``
    (exact, done on ``hook_z``), times ``scale``. ``scale=0`` changes nothing."""

    channel: Channel
    delta: Float[Tensor, "... coef"]
    position: str = "END"
    scale: float = 1.0

    def hooks_for(self, data: TaskData):
        """A :data:`headcircuits.metrics.HooksFor` for batched runs over ``data``."""
        ch = self.channel
        k = ch.per_head
        delta = self.delta.reshape(-1, len(ch.heads), k) * self.scale  # [1 or batch, head, k]
        if delta.shape[0] not in (1, len(data)):
            raise ValueError(f"delta has {delta.shape[0]} rows; give one, or one per prompt ({len(data)})")
        # z . back[i] @ W_O == the written directions: back = directions @ pinv(W_O)
        back = ch.back()
        by_layer: dict[int, list[int]] = {}
        for i, (layer, _) in enumerate(ch.heads):
            by_layer.setdefault(layer, []).append(i)

        def hooks(start: int, stop: int) -> list:
            if self.scale == 0:
                return []
            positions = data.at(self.position)[start:stop]
            d = delta if delta.shape[0] == 1 else delta[start:stop]

            def add(z, hook, indices):
                z = z.clone()
                rows, pos = torch.arange(stop - start, device=z.device), positions.to(z.device)
                for i in indices:
                    head = ch.heads[i][1]
                    z[rows, pos, head] += (d[:, i] @ back[i]).to(z)
                return z

            return [(f"blocks.{layer}.attn.hook_z", lambda z, hook, ix=ix: add(z, hook, ix))
                    for layer, ix in sorted(by_layer.items())]

        return hooks


@dataclass(frozen=True)
class ChannelReplacement:
    """Talking Heads' intervention (§4): *replace* each channel head's output at ``position`` by its components'
    directions times ``values`` (``[head * k]``, or one row per prompt ``[batch, head * k]``): head h writes
    ``sum_k values[h, k] Vh_h[k]`` there, whatever it attended to (the paper: α times one component's direction).
    The head's constant part (``Channel.offsets``, the value biases the paper's model keeps in ``b_O``) stays.
    ``mode="set"`` (ours) changes only the chosen coordinates and keeps the rest of what the head wrote. Every
    other position, head and layer runs as usual; everything downstream is recomputed."""

    channel: Channel
    values: Float[Tensor, "... coef"]
    position: str = "END"
    mode: str = "replace"

    def __post_init__(self):
        if self.mode not in ("replace", "set"):
            raise ValueError(f"mode must be 'replace' (the paper's) or 'set', not {self.mode!r}")

    def _parts(self):
        ch = self.channel
        back = ch.back()  # [head, k, d_head]
        read = torch.stack([ch.W_O[i] @ ch.directions[i].T for i in range(len(ch.heads))])  # [head, d_head, k]
        offsets = ch.offsets if ch.offsets is not None else torch.zeros(len(ch.heads), back.shape[-1])
        return back, read, offsets

    def apply(self, z: Tensor, values: Tensor, index: int, parts=None) -> Tensor:
        """Channel head ``index``'s new ``z`` ([rows, d_head]) at the position, given its ``values`` ([rows, k])."""
        back, read, offsets = parts or self._parts()
        written = values.to(z) @ back[index].to(z)
        if self.mode == "replace":
            return written + offsets[index].to(z)
        now = (z - offsets[index].to(z)) @ read[index].to(z)  # the chosen components' current coordinates
        return z + written - now @ back[index].to(z)

    def hooks_for(self, data: TaskData):
        """A :data:`headcircuits.metrics.HooksFor` for batched runs over ``data``."""
        ch = self.channel
        values = torch.as_tensor(self.values, dtype=torch.float32).reshape(-1, len(ch.heads), ch.per_head)
        if values.shape[0] not in (1, len(data)):
            raise ValueError(f"values has {values.shape[0]} rows; give one, or one per prompt ({len(data)})")
        parts = self._parts()
        by_layer: dict[int, list[int]] = {}
        for i, (layer, _) in enumerate(ch.heads):
            by_layer.setdefault(layer, []).append(i)
        positions = data.at(self.position)

        def hooks(start: int, stop: int) -> list:
            v = values if values.shape[0] == 1 else values[start:stop]
            pos = positions[start:stop]

            def replace_z(z, hook, indices):
                z = z.clone()
                rows, p = torch.arange(stop - start, device=z.device), pos.to(z.device)
                for i in indices:
                    head = ch.heads[i][1]
                    z[rows, p, head] = self.apply(z[rows, p, head], v[:, i].expand(len(rows), -1), i, parts)
                return z

            return [(f"blocks.{layer}.attn.hook_z", lambda z, hook, ix=ix: replace_z(z, hook, ix))
                    for layer, ix in sorted(by_layer.items())]

        return hooks


# --- the traversal of Talking Heads §5.2: only END changes, so only END is recomputed ------------------------------

class _Stop(Exception):
    """Raised by the mover's pattern hook: nothing above it is needed."""


def _replacement_hooks(channel: Channel, replacement: "ChannelReplacement", values: Tensor) -> list:
    """Hooks that set the channel heads' END output to ``values`` ([rows, copies, head, k]): in an END-only step
    every position the hooks see is a copy of END (one, or one per traversal point, :func:`run_copies`)."""
    parts = replacement._parts()
    by_layer: dict[int, list[int]] = {}
    for i, (layer, _) in enumerate(channel.heads):
        by_layer.setdefault(layer, []).append(i)

    def replace_z(z, hook, indices):
        z = z.clone()
        for i in indices:
            head = channel.heads[i][1]
            new = replacement.apply(z[:, :, head].flatten(0, 1), values[:, :, i].flatten(0, 1), i, parts)
            z[:, :, head] = new.reshape(z.shape[0], z.shape[1], -1)
        return z

    return [(f"blocks.{layer}.attn.hook_z", lambda z, hook, ix=ix: replace_z(z, hook, ix))
            for layer, ix in sorted(by_layer.items())]


@torch.no_grad()
def traverse(
    model: Model, data: TaskData, channel: Channel, points: Float[Tensor, "point coef"], mover: Head, keys: list[str],
    *, position: str = "END", rows_per_run: int = 2048, mode: str = "replace", progress: bool = True,
) -> Float[Tensor, "point batch key"]:
    """Talking Heads' traversal (§5.2, App. K): for every point of ``points`` (values of the channel's components,
    e.g. a grid over the 3-D subspace), replace the channel heads' outputs at END by the point
    (:class:`ChannelReplacement`) and read ``mover``'s attention from END to each of ``keys`` (e.g. ``ITEM_0`` ...
    ``ITEM_{N-1}``), on every prompt.

    Exact, and fast: the intervention touches END only, so every earlier token's keys and values are the same at
    every point. Each prompt is run once (its cache of keys and values, and END's residual stream below the
    lowest channel layer, up to the mover's layer only); then, per point, END alone goes through the layers from
    the lowest channel head's to the mover's, on the model's own blocks, the points of a run laid side by side as
    copies of END that share the prompt's cache (:func:`headcircuits.models.blocks.run_copies`; tested equal to
    the plain hooked forward pass on every tiny family). The
    prompts' pass is kept for the next traversal of the same prompts and layers (e.g. a control channel in the same
    layer: :func:`headcircuits.metrics.prefix_groups` with ``reuse``). The
    paper reports about 12 hours per dataset on an RTX 3090 for its sweep. ``mode``: as :class:`ChannelReplacement`.
    """
    from headcircuits.progress import tqdm

    points = torch.as_tensor(points, dtype=torch.float32).reshape(-1, len(channel.heads) * channel.per_head)
    first = min(l for l, _ in channel.heads)
    if mover[0] < first:
        raise ValueError(f"the mover {mover} sits below the channel's lowest layer ({first}): nothing to traverse")
    if position != "END":
        raise ValueError("the traversal recomputes END only: position must be 'END'")
    replacement = ChannelReplacement(channel, points[:1], position, mode)
    layers = range(first, mover[0] + 1)
    out = torch.zeros(len(points), len(data), len(keys))
    key_pos = torch.stack([data.at(k) for k in keys], dim=1)  # [batch, key], validated
    bar = tqdm(total=len(points) * len(data), desc="traversal", disable=not progress, unit="prompt")
    for index, length, h, prefix in prefix_groups(model, data, first, layers, reuse=True):
        n = len(index)
        per_run = max(1, rows_per_run // n)
        for start in range(0, len(points), per_run):
            chunk = points[start:start + per_run].reshape(-1, len(channel.heads), channel.per_head)
            p = len(chunk)
            values = chunk.to(model.device)[None].expand(n, -1, -1, -1)  # [prompt, point, head, k]
            pattern: dict[str, Tensor] = {}

            def read(pat, hook):
                pattern["p"] = pat[:, mover[1]].detach()  # [prompt, point, earlier tokens + points]
                raise _Stop

            hooks = [*_replacement_hooks(channel, replacement, values), (f"blocks.{mover[0]}.attn.hook_pattern", read)]
            try:
                with model.bridge.hooks(fwd_hooks=hooks):
                    run_copies(model, h.expand(-1, p, -1), layers, prefix, length - 1)
            except _Stop:
                pass
            # each point's attention to the earlier tokens, then to END itself (its own copy)
            seen = pattern["p"]
            att = torch.cat([seen[..., : length - 1], seen[..., length - 1:].diagonal(dim1=1, dim2=2)[..., None]], -1)
            att = att.float().transpose(0, 1)  # [point, prompt, key position]
            pos = key_pos[index].to(att.device)[None].expand(p, -1, -1)
            out[start:start + p, index] = att.gather(2, pos).cpu()
            bar.update(p * n)
    bar.close()
    return out


@torch.no_grad()
def end_logits_under(
    model: Model, data: TaskData, channel: Channel, values, *, mode: str = "replace",
    columns: Tensor | None = None,
) -> Float[Tensor, "batch vocab"] | list[Tensor]:
    """The logits at END with the channel set to ``values`` (one row, or one per prompt; :class:`ChannelReplacement`),
    computed like :func:`traverse`: each prompt's earlier tokens once, then END alone from the lowest channel layer
    to the unembedding (tested equal to :func:`headcircuits.metrics.end_logits` under the same replacement). Used
    for the oracle fix, where every prompt gets the point of its own answer. A list of value tensors gives a list
    of logits, all from one pass over the earlier tokens (:func:`headcircuits.metrics.end_only_logits`); ``None``
    in the list gives the unedited logits (the "before" of the fix) from the same pass. ``columns``: only these
    logits per prompt (:func:`headcircuits.metrics.end_only_logits`), e.g. the listed items' for the fix's
    accuracy among the items (:func:`headcircuits.metrics.candidate_correct`), sparing the vocabulary's product."""
    several = isinstance(values, (list, tuple))
    sets = [None if v is None else torch.as_tensor(v, dtype=torch.float32).reshape(-1, len(channel.heads), channel.per_head)
            for v in (values if several else [values])]
    for v in sets:
        if v is not None and v.shape[0] not in (1, len(data)):
            raise ValueError(f"values has {v.shape[0]} rows; give one, or one per prompt ({len(data)})")
    replacement = ChannelReplacement(channel, torch.zeros(1, len(channel.heads), channel.per_head), "END", mode)

    def condition(v):
        def hooks(index):
            rows = (v if v.shape[0] == 1 else v[index]).expand(len(index), -1, -1).to(model.device)
            return _replacement_hooks(channel, replacement, rows[:, None])
        return None if v is None else hooks

    first = min(l for l, _ in channel.heads)
    out = end_only_logits(model, data, first, [condition(v) for v in sets], columns)
    return out if several else out[0]


def class_means(coefficients: Float[Tensor, "batch coef"], labels) -> dict[int, Tensor]:
    """Mean coefficient vector of each label (e.g. each answer position)."""
    labels = torch.as_tensor(list(labels))
    return {int(c): coefficients[labels == c].mean(0) for c in labels.unique()}


def random_like(delta: Float[Tensor, "... coef"], seed: int = 0) -> Float[Tensor, "... coef"]:
    """Random vectors with the same norm as each row of ``delta`` (the control of a shift)."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(delta.shape, generator=gen)
    return r / r.norm(dim=-1, keepdim=True) * delta.norm(dim=-1, keepdim=True)


def steer_to(
    channel: Channel, coefficients: Float[Tensor, "batch coef"], means: dict, labels,
) -> Float[Tensor, "batch coef"]:
    """Per-prompt shifts that *set* each prompt's position in the subspace to ``means[label]`` (e.g. the mean signal
    of correctly answered prompts whose answer sits at that position): ``project(means[label_i] - c_i)``. Used with
    :class:`ChannelShift` (``scale`` 1 lands exactly on the target's subspace coordinates). Note that it uses each
    prompt's label: a causal test of what the channel carries, not a fix that could run without the answer."""
    labels = list(labels)  # any hashable label, e.g. (list length, answer position)
    missing = sorted(set(labels) - set(means), key=str)
    if missing:
        raise KeyError(f"no target mean for labels {missing}; compute means for every position (class_means)")
    target = torch.stack([means[x] for x in labels])
    return channel.project(target - coefficients)


# --- the whole recipe, as the notebooks run it -------------------------------------------------------------------------

@dataclass
class Roles:
    """The heads a model uses for IOI, found on that model (never read off GPT-2's indices).

    ``inhibition``: circuit heads that attend from END to S2 (class *inhibition* of :func:`circuits.classify`);
    ``movers``: circuit heads whose path-patching effect on the logits is positive (the movers stage)."""

    inhibition: tuple[Head, ...]
    movers: tuple[Head, ...]
    circuit: object
    classes: dict


def find_roles(model: Model, n_prompts: int = 32, seed: int = 0, fraction: float = 0.02,
               min_effect: float = 0.01) -> Roles:
    """IOI circuit discovery (path patching on ABC prompts, cached on disk) and head classes, as in the chapter
    *The IOI circuit*; the same parameters give the same (cached) circuit."""
    from headcircuits import circuits
    from headcircuits.tasks import ioi

    circuit = circuits.discover(model, ioi.generate(model, n_prompts, seed=seed, counterfactual="abc"),
                                fraction=fraction, min_effect=min_effect)
    classes = circuits.classify(model, ioi.generate(model, 64, seed=seed + 1), sorted(circuit.heads))
    movers = tuple(h for h in circuit.stage("movers") if circuit.tables["movers"][h] > 0)
    return Roles(circuits.heads_of_class(classes, "inhibition"), movers, circuit, classes)


def fit_positional(
    model: Model, weights, heads, *, lengths=(2, 3, 4, 5), n_per_length: int = 40, seed: int = 10,
    per_head: int = 8, rank: int = 3,
) -> Channel:
    """The channel of ``heads`` with its positional subspace fitted on Laundry List prompts of ``lengths``
    (``n_per_length`` each, answer positions balanced; each length's mean removed, see :meth:`Channel.fit`)."""
    from headcircuits.tasks import laundry_list

    fit = laundry_list.generate(model, n_per_length, seed=seed, lengths=list(lengths))
    channel = Channel.of(weights, heads, per_head=per_head)
    return channel.fit(channel.coefficients(model, fit), fit.meta.target_position, rank=rank,
                       groups=fit.meta.list_length)


# --- Talking Heads as the paper ran it: the mover, the channel components, the 3-D subspace, regions -----------

def choose_mover(model: Model, data: TaskData, movers) -> Head:
    """The mover whose inhibition is measured (the paper's 9.9 on GPT-2 small): among ``movers``, the one that
    attends most from END to the indirect object on ``data`` (IOI prompts; our rule, the same on every model).
    Cached on disk."""
    from headcircuits.cache import cached
    from headcircuits.interventions import attention_per_prompt

    movers = [tuple(m) for m in movers]
    if not movers:
        raise ValueError("no mover to choose from: the IOI circuit of this model has no mover")

    def compute():
        return [float(attention_per_prompt(model, data, m, "END", ["IO"]).mean()) for m in movers]

    to_io = cached("choose_mover", {"model": model, "data": data, "movers": movers}, compute)
    return movers[int(torch.tensor(to_io).argmax())]


def channel_components(weights, heads, mover: Head) -> dict[Head, int]:
    """Each head's *channel* component (Talking Heads §3): the rank-1 OV component whose written direction the
    mover's queries read most (:func:`headcircuits.svd.component_scores`, Q-composition), e.g. 8.10.1 for 9.9."""
    from headcircuits.svd import component_scores

    return {tuple(h): int(component_scores(weights, tuple(h), mover, "Q").argmax()) for h in heads if h[0] < mover[0]}


def channel_effects(
    model: Model, data: TaskData, weights, components: dict, mover: Head, offsets=None,
) -> dict[Head, Tensor]:
    """Per head, each prompt's change in the mover's :func:`~headcircuits.interventions.inhibition_score` when the
    head's channel component is set to 0 in the weights (:func:`~headcircuits.interventions.weight_edit`); negative:
    the component carries inhibition. Cached on disk (keyed by the model, the prompts, the weights and the heads)."""
    from headcircuits.cache import cached
    from headcircuits.interventions import inhibition_score, weight_edit
    from headcircuits.svd import value_offsets

    offsets = value_offsets(model) if offsets is None else offsets
    heads = [tuple(h) for h in components]

    def compute():
        base = inhibition_score(model, data, mover)
        return [inhibition_score(model, data, mover, weight_edit(model, weights, head, zero=[components[head]],
                                                                  offsets=offsets).hooks()) - base for head in heads]

    key = {"model": model, "data": data, "weights": weights, "offsets": offsets, "mover": tuple(mover),
           "components": [[list(h), int(components[h])] for h in heads]}
    return dict(zip(heads, cached("channel_effects", key, compute)))


def paper_subspace(weights, components: dict, effects: dict, size: int = 3, offsets=None) -> Channel:
    """The positional subspace as the paper builds it (§5.2): the channel components of the ``size`` heads whose
    removal moves the inhibition score most (the paper: 7.9.6, 8.6.2, 8.10.1; 7.3.1 changes it least and is left
    out). A model with fewer inhibition heads gives a subspace of fewer dimensions (said by the caller)."""
    ranked = sorted(components, key=lambda h: float(effects[h].mean()))  # most negative change first
    return Channel.pick(weights, {h: [components[h]] for h in ranked[:size]}, offsets=offsets)


def grid(coordinates: Float[Tensor, "batch coef"], resolution: int = 10, margin: float = 0.5) -> Float[Tensor, "point coef"]:
    """A regular grid over the channel's coordinates (our choice; the paper's range is not stated): per axis,
    ``resolution`` points from the smallest to the largest coordinate observed on the prompts, widened by
    ``margin`` times that range on each side. Points are ordered as ``torch.cartesian_prod`` (last axis fastest)."""
    if resolution < 2:
        raise ValueError(f"a grid needs at least 2 points per axis, not {resolution}")
    low, high = coordinates.min(0).values, coordinates.max(0).values
    pad = (high - low) * margin
    axes = [torch.linspace(float(a), float(b), resolution) for a, b in zip(low - pad, high + pad)]
    return torch.cartesian_prod(*axes).reshape(-1, len(axes))


def regions(attention: Float[Tensor, "point batch key"]) -> Tensor:
    """The paper's colouring of a traversal: per grid point, the list index the mover attends to most *on average*
    over the prompts."""
    return attention.mean(1).argmax(-1)


def centroids(points: Float[Tensor, "point coef"], labels: Tensor, n: int, attention=None) -> dict[int, Tensor]:
    """The point of each index's region the oracle fix sets (our choice; the paper does not say): the centroid of
    the grid points labelled with that index. An index without a region gets, with ``attention`` given, the grid
    point whose mean attention to it is highest (ours), else no point."""
    out = {}
    for index in range(n):
        members = points[labels == index]
        if len(members):
            out[index] = members.mean(0)
        elif attention is not None:
            out[index] = points[int(attention.mean(1)[:, index].argmax())]
    return out


def pieces(labels: Tensor, shape: tuple[int, ...]) -> dict[int, int]:
    """How many connected pieces each index's region has on the grid (cells sharing a face are connected): 1 is a
    single region, more is a region that fractured (the paper: from about 9-10 items)."""
    grid_labels = labels.reshape(shape).tolist()
    import itertools

    cells = list(itertools.product(*(range(s) for s in shape)))
    seen, count = set(), {}

    def value(cell):
        v = grid_labels
        for i in cell:
            v = v[i]
        return v

    for cell in cells:
        if cell in seen:
            continue
        label = value(cell)
        count[label] = count.get(label, 0) + 1
        stack = [cell]
        seen.add(cell)
        while stack:
            current = stack.pop()
            for axis in range(len(shape)):
                for step in (-1, 1):
                    nxt = list(current)
                    nxt[axis] += step
                    nxt = tuple(nxt)
                    if 0 <= nxt[axis] < shape[axis] and nxt not in seen and value(nxt) == label:
                        seen.add(nxt)
                        stack.append(nxt)
    return count


def duplicate_channel(weights, candidates, receiver: Head, component: int, size: int = 2) -> tuple[Head, list[int]]:
    """The duplicate channel (Talking Heads §4): among ``candidates`` (duplicate-token / induction heads below the
    ``receiver``), the head whose top ``size`` OV components value-compose most with the receiver's channel
    ``component`` (:func:`headcircuits.svd.component_to_component`, summed over the ``size`` best), and those
    components (GPT-2 small: 3.0.1 and 3.0.2 into 7.9.6)."""
    from headcircuits.svd import component_to_component

    best = None
    for head in candidates:
        if head[0] >= receiver[0]:
            continue
        scores = component_to_component(weights, tuple(head), receiver, component, "V")
        top = scores.topk(size)
        if best is None or float(top.values.sum()) > best[0]:
            best = (float(top.values.sum()), tuple(head), sorted(top.indices.tolist()))
    if best is None:
        raise ValueError(f"no candidate head sits below the receiver {receiver}: nothing can feed its values")
    return best[1], best[2]
