"""Talking Heads' traversal of the positional subspace (§5.2, App. K), its regions, and the oracle fix (§5.3).

The traversal sets the channel's components at END to every point of a grid (:class:`headcircuits.channels.
ChannelReplacement`) and reads which list item the mover then attends to; each index's region of the grid is the
set of points where the mover attends to it most (the paper's coloured maps). The oracle fix sets each prompt's
channel to the centroid of its own answer's region (with the gold answer: a causal test, not a usable fix).

The replacement changes END alone, so the engine reruns END alone per point, the points side by side as copies
of END over the prompt's kept keys and values (the paper reports about 12 hours per dataset on an RTX 3090).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from headcircuits import engine, spread
from headcircuits.channels import Channel, ChannelReplacement
from headcircuits.engine import Read
from headcircuits.models.core import Head, Model
from headcircuits.tasks.base import TaskData


def traverse(
    model: Model, data: TaskData, channel: Channel, points: Float[Tensor, "point coef"], mover: Head,
    keys: Sequence[str], *, mode: str = "replace", points_per_run: int = 256, progress: bool = True,
) -> Float[Tensor, "point batch key"]:
    """Talking Heads' traversal (§5.2, App. K): for every point of ``points`` (values of the channel's components,
    e.g. a grid over the 3-D subspace), replace the channel heads' outputs at END by the point
    (:class:`~headcircuits.channels.ChannelReplacement`) and read ``mover``'s attention from END to each of ``keys``
    (e.g. ``ITEM_0`` ... ``ITEM_{N-1}``), on every prompt.

    Args:
        model: the model.
        data: the prompts (END their last token).
        channel: the channel whose coordinates are set.
        points: ``[point, head * k]``.
        mover: the head whose attention is read.
        keys: the named positions its attention is read at.
        mode: as :class:`~headcircuits.channels.ChannelReplacement`.
        points_per_run: points per engine call (a progress bar step).
        progress: show a progress bar.

    Returns:
        ``[point, batch, key]`` attention probabilities, on the CPU.
    """
    points = torch.as_tensor(points, dtype=torch.float32).reshape(-1, len(channel.heads) * channel.per_head)
    first = min(l for l, _ in channel.heads)
    if mover[0] < first:
        raise ValueError(f"the mover {mover} sits below the channel's lowest layer ({first}): nothing to traverse")
    read = Read("pattern", mover[0], at="END", head=mover[1], keys=tuple(keys))
    chunks = list(points.split(points_per_run))
    return torch.cat(spread.sweep("traversal", _attention_at, model, chunks, progress=progress, data=data,
                                  channel=channel, read=read, mode=mode))


def _attention_at(
    model: Model, points: Float[Tensor, "point coef"], *, data: TaskData, channel: Channel, read: Read, mode: str,
) -> Float[Tensor, "point batch key"]:
    """One piece of :func:`traverse`: the read attention under each of ``points``, on the CPU."""
    results = engine.run(model, data, [[ChannelReplacement(channel, p, mode=mode)] for p in points], read=[read])
    return torch.stack([r[read].cpu() for r in results])


def end_logits_under(
    model: Model, data: TaskData, channel: Channel, values: Sequence[Tensor | None], *, mode: str = "replace",
    columns: Tensor | None = None,
) -> list[Float[Tensor, "batch vocab_or_k"]]:
    """The logits at END with the channel set to each of ``values`` (one row, or one per prompt;
    :class:`~headcircuits.channels.ChannelReplacement`; ``None``: unedited), all from one engine run: the oracle
    fix, where every prompt gets the point of its own answer. ``columns``: only these logits per prompt (e.g. the
    listed items', :func:`headcircuits.scoring.candidates_of`, for accuracy among them), instead of the whole
    vocabulary.

    Args:
        model: the model.
        data: the prompts (END their last token).
        channel: the channel whose coordinates are set.
        values: one entry per condition: ``[head * k]`` or one row per prompt, or ``None`` (unedited).
        mode: as :class:`~headcircuits.channels.ChannelReplacement`.
        columns: ``[batch, k]`` token ids to unembed (``None``: the whole vocabulary).

    Returns:
        One ``[batch, vocab or k]`` tensor of END logits per entry of ``values``, on the CPU.
    """
    conditions = [[] if v is None else [ChannelReplacement(channel, v, mode=mode)] for v in values]
    return [r.logits for r in engine.run(model, data, conditions, logits="end" if columns is None else columns)]


def grid(coordinates: Float[Tensor, "batch coef"], resolution: int = 10, margin: float = 0.5) -> Float[Tensor, "point coef"]:
    """A regular grid over the channel's coordinates (our choice; the paper's range is not stated): per axis,
    ``resolution`` points from the smallest to the largest coordinate observed on the prompts, widened by
    ``margin`` times that range on each side. Points are ordered as ``torch.cartesian_prod`` (last axis fastest).

    Args:
        coordinates: ``[batch, coef]``, the channel's coordinates on the prompts (:meth:`Channel.coefficients`).
        resolution: points per axis.
        margin: how far past the observed range the grid reaches, as a share of it.

    Returns:
        ``[resolution ** coef, coef]`` points.
    """
    if resolution < 2:
        raise ValueError(f"a grid needs at least 2 points per axis, not {resolution}")
    low, high = coordinates.min(0).values, coordinates.max(0).values
    pad = (high - low) * margin
    axes = [torch.linspace(float(a), float(b), resolution) for a, b in zip(low - pad, high + pad)]
    return torch.cartesian_prod(*axes).reshape(-1, len(axes))


def regions(attention: Float[Tensor, "point batch key"]) -> Tensor:
    """The paper's colouring of a traversal: per grid point, the list index the mover attends to most *on average*
    over the prompts.

    Args:
        attention: ``[point, batch, key]`` from :func:`traverse`.

    Returns:
        ``[point]``: the index of the key each point's mover attends to most on average.
    """
    return attention.mean(1).argmax(-1)


def centroids(points: Float[Tensor, "point coef"], labels: Tensor, n: int, attention=None) -> dict[int, Tensor]:
    """The point of each index's region the oracle fix sets (our choice; the paper does not say): the centroid of
    the grid points labelled with that index. An index without a region gets, with ``attention`` given, the grid
    point whose mean attention to it is highest (ours), else no point.

    Args:
        points: ``[point, coef]``, the grid.
        labels: ``[point]``, :func:`regions`.
        n: the list length (indices 0 .. n - 1).
        attention: ``[point, batch, key]`` (optional): stand-in points for indices without a region.

    Returns:
        ``{index: [coef]}``, the point the fix sets for each index.
    """
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
    single region, more is a region that fractured (the paper: from about 9-10 items).

    Args:
        labels: ``[point]``, :func:`regions` of a grid.
        shape: the grid's shape, e.g. ``(10, 10, 10)``.

    Returns:
        ``{index: number of connected pieces of its region}``.
    """
    grid_labels = labels.reshape(shape).tolist()
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


