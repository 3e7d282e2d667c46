"""The one edit protocol: every intervention of the book writes its hooks once, for any rows and positions, and
runs on every mode of the engine (:func:`headcircuits.engine.run`).

An :class:`Edit` says which layers it writes (``layers``) and which of a prompt's positions it changes
(``position``: a named position of the TaskData such as ``"END"``, or ``None`` for every position). The engine
asks it for hooks for the rows it runs (``rows``: their indices in the TaskData) and the positions its
activations hold (``positions[r, j]``: the sequence position of column ``j`` of row ``r``), and calls each hook
with a view of the activation that holds this edit's condition only:

* position-indexed activations (``resid_pre``, ``z``, ``q``, ``mlp_out``, ...): ``[rows, columns, ...]``;
* attention patterns: ``[rows, heads, columns, keys]``, where key ``k`` is the sequence position ``k`` (the keys
  of a row are its positions ``0 .. its last column``).

So an edit finds its column as ``positions == data.at(position)[rows, None]``, whatever the engine runs: the
whole prompts (every column), or END alone over the earlier tokens' kept keys and values (one column), or many
conditions side by side. Every edit is a frozen dataclass, so a cached result is keyed by the edit itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from headcircuits.models.architecture import hook as hook_name
from headcircuits.tasks.base import TaskData

#: a hook as TransformerLens calls it: ``fn(activation, hook) -> activation``
HookFn = Callable[[Tensor, object], Tensor]


class Edit:
    """The protocol (see the module docstring): ``position`` (a field or property of every edit: the named
    position it changes, ``None`` for every position), ``layers`` and :meth:`hooks`."""

    @property
    def layers(self) -> tuple[int, ...]:
        """The blocks whose hooks the edit writes (the engine recomputes from the lowest of them)."""
        raise NotImplementedError

    def hooks(self, data: TaskData, rows: Int[Tensor, " rows"], positions: Int[Tensor, "rows columns"]
              ) -> list[tuple[str, HookFn]]:
        """The hooks for ``rows`` of ``data`` whose activations hold ``positions``.

        Args:
            data: the prompts (for their named positions and per-prompt values).
            rows: the indices in ``data`` of the rows the activations hold, in order.
            positions: ``[rows, columns]``, the sequence position of each column (on the model's device).

        Returns:
            ``(hook name, fn)`` pairs, applied in order.
        """
        raise NotImplementedError


def at_position(data: TaskData, name: str, rows: Tensor, positions: Tensor) -> Tensor:
    """``[rows, columns]`` True where a column holds each row's position ``name`` (``data.at``, validated).

    Args:
        data: the prompts.
        name: a named position.
        rows: the rows' indices in ``data``.
        positions: ``[rows, columns]``.

    Returns:
        ``[rows, columns]`` booleans.
    """
    target = data.at(name)[rows.cpu()].to(positions.device)
    return positions == target[:, None]


def per_row(values: Tensor, n: int, rows: Tensor, what: str) -> Tensor:
    """``values`` with one row (shared) or one row per prompt of ``n`` (then taken at ``rows``).

    Args:
        values: ``[1 or n, ...]``.
        n: the number of prompts.
        rows: the rows' indices.
        what: the argument's name, for the error.

    Returns:
        ``[rows, ...]``.
    """
    if values.shape[0] == 1:
        return values.expand(len(rows), *values.shape[1:])
    if values.shape[0] != n:
        raise ValueError(f"{what} has {values.shape[0]} rows; give one, or one per prompt ({n})")
    return values[rows.cpu()]


@dataclass(frozen=True, eq=False)
class ResidualAddition(Edit):
    """Add ``vector`` ([d_model], or one row per prompt) to the residual stream after block ``layer`` at each
    prompt's ``position`` (e.g. Talking Heads' duplicate channel: a point of the plane of 3.0.1 and 3.0.2 added at
    IO or S1, before the inhibition heads read it). Everything after that block is recomputed."""

    layer: int
    position: str
    vector: Float[Tensor, "... d_model"]

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def hooks(self, data, rows, positions):
        vector = torch.as_tensor(self.vector, dtype=torch.float32).reshape(-1, self.vector.shape[-1])
        v = per_row(vector, len(data), rows, "vector")
        where = at_position(data, self.position, rows, positions)

        def add(resid, hook):
            resid = resid.clone()
            r, c = where.nonzero(as_tuple=True)
            resid[r, c] += v.to(resid)[r]
            return resid

        return [(hook_name("resid_post", self.layer), add)]
