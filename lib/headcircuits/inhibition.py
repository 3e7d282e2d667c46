"""Inhibition, as Talking Heads measures and edits it (Merullo et al., NeurIPS 2024, §3).

An inhibition head attends from END to the repeated name and tells a mover which name *not* to copy. The paper
measures it on the mover (its **inhibition score**: attention at END to the indirect object minus attention to the
first subject mention) and asks which SVD components of the inhibition heads' OV circuits carry it, by setting one
singular value at a time to 0 in the weights (**the weight edit**) and watching the score fall.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from headcircuits import scoring, spread
from headcircuits.cache import on_disk
from headcircuits.edits import Edit
from headcircuits.models.architecture import hook as hook_name
from headcircuits.models.core import Head, Model
from headcircuits.tasks.base import TaskData
from headcircuits.weights import head_svd, value_offsets


@dataclass(frozen=True, eq=False)
class ComponentEdit(Edit):
    """Rescale rank-1 SVD components of one head's OV circuit in its output, at every position (Talking Heads'
    weight edit; ``scale=0`` removes them).

    With the head's processed OV = W_V W_O = U diag(S) Vh (:func:`headcircuits.weights.head_svd`), component k
    writes along the row ``Vh[k]``. The edit is ``out' = out - (1 - scale) (out . Vh[k]) Vh[k]`` (several
    components: along their span, the rows being orthonormal), done on the head's ``z`` so the rest of the model
    runs unchanged: with ``c_k = Vh[k] W_O^+`` (``Vh[k]`` lies in W_O's row space), ``z' = z - (1 - scale)
    (z W_O Vh[k]^T) c_k`` gives exactly ``z' W_O = out'``. It is linear in ``z``, so it is the same as running the
    model with W_O replaced by :meth:`edited_W_O`. On LayerNorm models the processed W_O is centred; the raw output
    differs from it by a multiple of the all-ones vector, which every following LayerNorm removes. ``offset``: a
    constant part of ``z`` left untouched (the value biases: see :func:`weight_edit`).
    """

    layer: int
    head: int
    directions: Float[Tensor, "k d_model"]  # orthonormal rows: the written directions to rescale
    W_O: Float[Tensor, "d_head d_model"]  # the (processed) W_O the directions belong to
    scale: float = 0.0
    offset: Float[Tensor, " d_head"] | None = None

    position = None  # every position

    @classmethod
    def of(cls, weights, head: Head, components, scale: float = 0.0, offset=None) -> "ComponentEdit":
        """The edit of ``components`` (indices, by decreasing singular value) of ``head``'s OV in ``weights``
        (:class:`headcircuits.weights.HeadWeights`)."""
        layer, index = head
        svd = head_svd(weights.OV[layer, index])
        chosen = torch.as_tensor(list(components), dtype=torch.long)
        return cls(layer, index, svd.Vh[chosen], weights.W_O[layer, index], scale, offset)

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def edited_W_O(self) -> Float[Tensor, "d_head d_model"]:
        """The head's W_O with the components rescaled: ``W_O - (1 - scale) (W_O Vh^T) Vh``."""
        return self.W_O - (1 - self.scale) * (self.W_O @ self.directions.T) @ self.directions

    def hooks(self, data, rows, positions):
        if len(self.directions) == 0 or self.scale == 1:
            return []
        read = self.W_O @ self.directions.T  # [d_head, k]: z . read[:, j] = out . direction_j
        back = self.directions @ torch.linalg.pinv(self.W_O)  # [k, d_head]: back[j] @ W_O = direction_j
        factor = 1 - self.scale

        def edit(z, hook):
            z = z.clone()
            zh = z[..., self.head, :]
            varying = zh if self.offset is None else zh - self.offset.to(z)
            z[..., self.head, :] = zh - factor * (varying @ read.to(z)) @ back.to(z)
            return z

        return [(hook_name("z", self.layer), edit)]


def weight_edit(model: Model, weights, head: Head, *, zero=(), keep=None, offsets=None) -> ComponentEdit:
    """Talking Heads' weight edit of one head's OV (§3, :func:`headcircuits.weights.edit_ov`), as an edit of the
    running model: the singular values ``zero`` are set to 0, or with ``keep`` every singular value except those
    (the keep-only ablations of the paper's Fig. 10). Exactly the paper's edit: what the head computes from its
    input loses those components; the constant part of its values (``b_V`` and the LayerNorm bias through W_V,
    folded into ``b_O`` in the paper's TransformerLens model; :func:`headcircuits.weights.value_offsets`) is left
    as it is.

    Args:
        model: the model.
        weights: its :class:`~headcircuits.weights.HeadWeights`.
        head: ``(layer, head)``.
        zero: the components to remove.
        keep: the components to keep (every other one is removed).
        offsets: precomputed ``value_offsets(model)``.

    Returns:
        The edit.
    """
    d_head = weights.W_V.shape[-1]
    if keep is not None:
        keep = {int(k) for k in keep}
        zero = [k for k in range(d_head) if k not in keep]
    offsets = value_offsets(model) if offsets is None else offsets
    return ComponentEdit.of(weights, head, list(zero), scale=0.0, offset=offsets[head[0], head[1]])


def inhibition_score(
    model: Model, data: TaskData, mover: Head, edits: Sequence[Edit] = (), *, io: str = "IO", s1: str = "S1",
    query: str = "END",
) -> Float[Tensor, " batch"]:
    """Talking Heads' inhibition score (§3), per prompt: the mover's attention at END to the indirect object
    minus its attention to the *first* subject mention S1. From -1 (all on S1) to +1 (all on IO); a mover that
    is told which name to avoid scores high. The paper reads it for mover 9.9 of GPT-2 small on 200 IOI prompts,
    100 with IO first and 100 with S first (:func:`headcircuits.tasks.ioi.generate` alternates the two orders).
    ``edits``: e.g. a :func:`weight_edit`, in the same run.

    Args:
        model: the model.
        data: IOI prompts.
        mover: the mover ``(layer, head)``.
        edits: an intervention in the same run (none: the model as it is).
        io: the indirect object's position name.
        s1: the first subject mention's position name.
        query: where the mover's attention is read.

    Returns:
        ``[batch]`` scores in [-1, 1], on the CPU.
    """
    a = scoring.attention(model, data, mover, query, [io, s1], edits)
    return a[:, 0] - a[:, 1]


@on_disk("component_effects")
def component_effects(
    model: Model, data: TaskData, weights, sender: Head, mover: Head, components=None, *, offsets=None,
) -> Float[Tensor, " component"]:
    """The paper's Fig. 2 (data side): for each component of ``sender``'s OV, the change in the mean
    :func:`inhibition_score` of ``mover`` when that one singular value is set to 0 in the weights
    (:func:`weight_edit`). Negative: the component carries inhibition (removing it lowers the score). Cached on
    disk (keyed by every argument).

    Args:
        model: the model.
        data: IOI prompts.
        weights: its :class:`~headcircuits.weights.HeadWeights`.
        sender: the inhibition head whose components are removed.
        mover: the mover whose score is read.
        components: which components (default: all).
        offsets: precomputed ``value_offsets(model)``.

    Returns:
        ``[component]``: the mean score's change when each is removed.
    """
    offsets = value_offsets(model) if offsets is None else offsets
    components = list(range(weights.W_V.shape[-1]) if components is None else components)
    base = inhibition_score(model, data, mover).mean()
    pieces = [components[i:i + COMPONENTS_PER_PIECE] for i in range(0, len(components), COMPONENTS_PER_PIECE)]
    return torch.cat(spread.sweep("component_effects", _without_components, model, pieces, data=data,
                                  weights=weights, sender=sender, mover=mover, offsets=offsets, base=base))


COMPONENTS_PER_PIECE = 8  # ours: an inhibition head's components per piece of the sweep


def _without_components(
    model: Model, components: list[int], *, data: TaskData, weights, sender: Head, mover: Head, offsets, base: Tensor,
) -> Float[Tensor, " component"]:
    """One piece of :func:`component_effects`: the mean score's change when each of ``components`` is removed."""
    return torch.stack([inhibition_score(model, data, mover, [weight_edit(model, weights, sender, zero=[k],
                                                                          offsets=offsets)]).mean().cpu() - base.cpu()
                        for k in components])


@on_disk("channel_effects")
def channel_effects(
    model: Model, data: TaskData, weights, components: dict, mover: Head, offsets=None,
) -> dict[Head, Tensor]:
    """Per head, each prompt's change in the mover's :func:`inhibition_score` when the head's channel component
    (:func:`headcircuits.channels.channel_components`) is set to 0 in the weights (:func:`weight_edit`); negative:
    the component carries inhibition. Cached on disk (keyed by every argument).

    Args:
        model: the model.
        data: IOI prompts.
        weights: its :class:`~headcircuits.weights.HeadWeights`.
        components: ``{head: component}`` (:func:`headcircuits.channels.channel_components`).
        mover: the mover whose score is read.
        offsets: precomputed ``value_offsets(model)``.

    Returns:
        ``{head: [batch]}``, each prompt's change of the score.
    """
    offsets = value_offsets(model) if offsets is None else offsets
    base = inhibition_score(model, data, mover)
    return {tuple(h): inhibition_score(model, data, mover, [weight_edit(model, weights, tuple(h),
                                                                       zero=[components[h]], offsets=offsets)]) - base
            for h in components}


def choose_mover(model: Model, data: TaskData, movers) -> Head:
    """The mover whose inhibition is measured (the paper's 9.9 on GPT-2 small): among ``movers``, the one that
    attends most from END to the indirect object on ``data`` (IOI prompts; our rule, the same on every model).
    Cached on disk.

    Args:
        model: the model.
        data: IOI prompts.
        movers: the candidate movers (the circuit's).

    Returns:
        The chosen mover ``(layer, head)``.
    """
    movers = [tuple(m) for m in movers]
    if not movers:
        raise ValueError("no mover to choose from: the IOI circuit of this model has no mover")
    return movers[int(torch.tensor(_attention_to_io(model, data, movers)).argmax())]


@on_disk("choose_mover")
def _attention_to_io(model: Model, data: TaskData, movers: list[Head]) -> list[float]:
    return [float(scoring.attention(model, data, m, "END", ["IO"]).mean()) for m in movers]
