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
    ) -> Float[Tensor, "batch coef"]:
        """Each head's output at ``position`` read along its component directions, ``[batch, head * k]``.
        The run stops after the last head's layer (``hooks``: extra interventions in the same run)."""
        layers = sorted({l for l, _ in self.heads})
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
            per_head = [batch.gather(seen[l], position)[:, h].float().cpu() @ self.W_O[i] @ self.directions[i].T
                        for i, (l, h) in enumerate(self.heads)]
            out.append(torch.cat(per_head, dim=-1))
        return torch.cat(out)

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
        back = torch.stack([ch.directions[i] @ torch.linalg.pinv(ch.W_O[i]) for i in range(len(ch.heads))])
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
