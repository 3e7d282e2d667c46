"""Inhibition channels and the positional subspace (Talking Heads, Merullo et al., NeurIPS 2024, §3-5).

An inhibition head attends from END to the repeated item and writes into the residual stream a signal that tells
the movers *which* item not to copy. Talking Heads finds that on GPT-2 small this signal lives in a few SVD
components of the inhibition heads' OV circuits (a 3-dimensional subspace: 7.9.6, 8.6.2, 8.10.1 for mover 9.9)
and that it encodes the *position* of the repeated item in the list rather than its identity.

* :class:`Channel`: chosen rank-1 components of chosen heads (component k of a head writes along ``Vh[k]`` of its
  processed OV, :func:`headcircuits.weights.head_svd`); its *coordinates* on a prompt are the heads' outputs at a
  position read along those directions.
* :func:`channel_components`: each inhibition head's channel component, the one the mover's queries read most
  (Q-composition); :func:`paper_subspace`: the subspace of the heads whose removal moves inhibition most.
* :class:`ChannelReplacement`: the paper's intervention (§4), the heads' outputs at END replaced by a point of the
  channel (an edit of :mod:`headcircuits.edits`, run by the engine).
* :func:`duplicate_channel`: the duplicate-token head's components that feed the channel's values (§4).

Approximations (stated in the chapters): on rotary models the heads' OV is exact but which positions the movers
*attend* to depends on the rotation; Gemma-3 applies a norm after the attention output, so a written vector is
rescaled with the rest of the output; the offline models are 4-bit quantised (the dequantised weights are what
runs, so nothing here is approximate about them, but they are not the original float weights).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from headcircuits import engine
from headcircuits.edits import Edit, at_position, per_row
from headcircuits.engine import Read
from headcircuits.models.architecture import hook as hook_name
from headcircuits.models.core import Head, Model
from headcircuits.tasks.base import TaskData
from headcircuits.weights import head_svd


@dataclass(frozen=True, eq=False)
class Channel:
    """Chosen rank-1 OV components of chosen heads (:meth:`pick`; the same number per head).

    Shapes: ``directions`` [head, k, d_model] (orthonormal rows per head: what each component writes);
    ``W_O`` [head, d_head, d_model] (processed, as in :class:`headcircuits.weights.HeadWeights`);
    ``singular_values`` [head, k]; ``offsets`` [head, d_head] (the constant part of each head's ``z``,
    :func:`headcircuits.weights.value_offsets`, left out of the coordinates).
    """

    heads: tuple[Head, ...]
    components: tuple[tuple[int, ...], ...]
    directions: Float[Tensor, "head k d_model"]
    W_O: Float[Tensor, "head d_head d_model"]
    singular_values: Float[Tensor, "head k"]
    offsets: Float[Tensor, "head d_head"] | None = None

    @classmethod
    def pick(cls, weights, components: dict, offsets=None) -> "Channel":
        """Chosen components of chosen heads, ``{head: [component, ...]}`` (the same number per head), e.g. the
        paper's 3-D subspace ``{(7, 9): [6], (8, 6): [2], (8, 10): [1]}``. ``offsets``: the model's
        :func:`headcircuits.weights.value_offsets`, so that coordinates leave the heads' constant part out."""
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

    @functools.cached_property
    def back(self) -> Float[Tensor, "head k d_head"]:
        """``back[h, k] @ W_O[h] == directions[h, k]``: the z that writes exactly one unit along a component."""
        return torch.stack([self.directions[i] @ torch.linalg.pinv(self.W_O[i]) for i in range(len(self.heads))])

    @functools.cached_property
    def read(self) -> Float[Tensor, "head d_head k"]:
        """``z @ read[h]``: head h's output read along its components (its coordinates)."""
        return torch.stack([self.W_O[i] @ self.directions[i].T for i in range(len(self.heads))])

    @property
    def per_head(self) -> int:
        return self.directions.shape[1]

    @property
    def labels(self) -> list[str]:
        """``"L.H c k"`` for each coordinate, in order."""
        return [f"{l}.{h} c{k}" for (l, h), comps in zip(self.heads, self.components) for k in comps]

    def _offsets(self) -> Tensor:
        return self.offsets if self.offsets is not None else torch.zeros(len(self.heads), self.W_O.shape[1])

    def coefficients(
        self, model: Model, data: TaskData, position: str = "END", edits: Sequence[Edit] = (),
    ) -> Float[Tensor, "batch coef"]:
        """Each head's output at ``position`` read along its component directions (its coordinates in the
        channel), ``[batch, head * k]``, under ``edits`` (none: the model as it is). At END the engine keeps the
        prompts' clean pass, which a :func:`headcircuits.traversal.traverse` or a fix on the same prompts then
        starts from."""
        layers = sorted({l for l, _ in self.heads})
        reads = {l: Read("z", l, at=position) for l in layers}
        result = engine.run(model, data, [list(edits)], read=list(reads.values()))[0]
        return torch.cat([(result[reads[l]][:, h] - self._offsets()[i]) @ self.read[i]
                          for i, (l, h) in enumerate(self.heads)], dim=-1)


@dataclass(frozen=True, eq=False)
class ChannelReplacement(Edit):
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

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({l for l, _ in self.channel.heads}))

    def hooks(self, data, rows, positions):
        ch = self.channel
        values = torch.as_tensor(self.values, dtype=torch.float32).reshape(-1, len(ch.heads), ch.per_head)
        v = per_row(values, len(data), rows, "values")  # [rows, head, k]
        r, c = at_position(data, self.position, rows, positions).nonzero(as_tuple=True)
        back, read, offsets = ch.back, ch.read, ch._offsets()

        def replace_z(z, hook, indices):
            z = z.clone()
            for i in indices:
                head = ch.heads[i][1]
                now = z[r, c, head]  # [m, d_head]
                written = v[r.cpu(), i].to(z) @ back[i].to(z)
                if self.mode == "replace":
                    z[r, c, head] = written + offsets[i].to(z)
                else:  # only the chosen coordinates change
                    z[r, c, head] = now + written - ((now - offsets[i].to(z)) @ read[i].to(z)) @ back[i].to(z)
            return z

        return [(hook_name("z", layer), lambda z, hook, ix=[i for i, (l, _) in enumerate(ch.heads) if l == layer]:
                 replace_z(z, hook, ix)) for layer in self.layers]


def channel_components(weights, heads, mover: Head) -> dict[Head, int]:
    """Each head's *channel* component (Talking Heads §3): the rank-1 OV component whose written direction the
    mover's queries read most (:func:`headcircuits.composition.component_scores`, Q-composition), e.g. 8.10.1 for 9.9.

    Args:
        weights: the model's :class:`~headcircuits.weights.HeadWeights`.
        heads: the inhibition heads.
        mover: the mover whose queries read them.

    Returns:
        ``{head: component}`` for the heads below the mover.
    """
    from headcircuits.composition import component_scores

    return {tuple(h): int(component_scores(weights, tuple(h), mover, "Q").argmax()) for h in heads if h[0] < mover[0]}


def paper_subspace(weights, components: dict, effects: dict, size: int = 3, offsets=None) -> Channel:
    """The positional subspace as the paper builds it (§5.2): the channel components of the ``size`` heads whose
    removal moves the inhibition score most (the paper: 7.9.6, 8.6.2, 8.10.1; 7.3.1 changes it least and is left
    out). A model with fewer inhibition heads gives a subspace of fewer dimensions (said by the caller).

    Args:
        weights: the model's :class:`~headcircuits.weights.HeadWeights`.
        components: ``{head: component}`` (:func:`channel_components`).
        effects: ``{head: [batch]}`` (:func:`headcircuits.inhibition.channel_effects`).
        size: how many heads.
        offsets: ``value_offsets(model)``.

    Returns:
        The :class:`Channel` of those components.
    """
    ranked = sorted(components, key=lambda h: float(effects[h].mean()))  # most negative change first
    return Channel.pick(weights, {h: [components[h]] for h in ranked[:size]}, offsets=offsets)


def duplicate_channel(weights, candidates, receiver: Head, component: int, size: int = 2) -> tuple[Head, list[int]]:
    """The duplicate channel (Talking Heads §4): among ``candidates`` (duplicate-token / induction heads below the
    ``receiver``), the head whose top ``size`` OV components value-compose most with the receiver's channel
    ``component`` (:func:`headcircuits.composition.component_to_component`, summed over the ``size`` best), and those
    components (GPT-2 small: 3.0.1 and 3.0.2 into 7.9.6).

    Args:
        weights: the model's :class:`~headcircuits.weights.HeadWeights`.
        candidates: duplicate-token / induction heads.
        receiver: the inhibition head whose values they feed.
        component: the receiver's channel component.
        size: how many components of the sender.

    Returns:
        ``(head, [components])``.
    """
    from headcircuits.composition import component_to_component

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
