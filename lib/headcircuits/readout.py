"""What leaves the engine (:mod:`headcircuits.engine`): each condition's view of an activation when the conditions
run side by side (:class:`Layout`), what a :class:`~headcircuits.engine.Read` keeps of it (:func:`gather`), the
rows put back in data order (:func:`assemble`), and the logits at END (:func:`unembed`, in chunks of
:data:`UNEMBED_ROWS` rows, of the whole vocabulary or of listed columns only), all on the CPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from headcircuits.models import architecture
from headcircuits.models.core import Model
from headcircuits.tasks.base import TaskData

if TYPE_CHECKING:
    from headcircuits.engine import Read

#: rows per product of the unembedding: a large vocabulary's product is bound by reading W_U (one row costs about
#: as much as 13 with Gemma-3's 262,144 columns on 2 CPU cores) until some 256 rows share a read
UNEMBED_ROWS = 256


@dataclass(frozen=True)
class Layout:
    """How a step lays out its conditions: ``copies`` side by side along the positions (one recomputed token,
    copy ``j`` at column ``j``, its own key at ``prefix + j``), else one block of ``n`` rows each."""

    copies: bool
    n: int
    prefix: int

    def view(self, kind: str, x: Tensor, j: int) -> Tensor:
        if not self.copies:
            return x[j * self.n:(j + 1) * self.n]
        if kind != "pattern":
            return x[:, j:j + 1]
        row = x[:, :, j:j + 1]  # [n, heads, 1, prefix + copies]
        return torch.cat([row[..., :self.prefix], row[..., self.prefix + j:self.prefix + j + 1]], dim=-1)

    def put(self, kind: str, x: Tensor, j: int, value: Tensor) -> None:
        if not self.copies:
            x[j * self.n:(j + 1) * self.n] = value
        elif kind != "pattern":
            x[:, j:j + 1] = value
        else:
            x[:, :, j:j + 1, :self.prefix] = value[..., :self.prefix]
            x[:, :, j:j + 1, self.prefix + j:self.prefix + j + 1] = value[..., self.prefix:]


def kind_of(name: str) -> str:
    return "pattern" if name == architecture.hook("pattern", architecture.layer_of(name) or 0) else "other"


def gather(read: Read, x: Tensor, data: TaskData, rows: Tensor, positions: Tensor,
            valid: Tensor | None = None) -> Tensor:
    """What ``read`` keeps of one condition's activation ``x`` ([rows, columns, ...]; patterns [rows, heads,
    columns, keys]) whose columns hold ``positions`` (``valid``: not right padding, which is read as 0), on the
    CPU."""
    index = torch.arange(len(rows), device=x.device)
    if read.at is None and valid is not None and not valid.all():
        keep = (valid[:, None, :, None] & valid[:, None, None, :]) if read.kind == "pattern" else \
            valid.reshape(*valid.shape, *[1] * (x.dim() - 2))
        x = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if read.at is not None:
        target = data.at(read.at)[rows.cpu()].to(positions.device)
        column = (positions == target[:, None]).float().argmax(1)
        x = x[index, :, column] if read.kind == "pattern" else x[index, column]
    if read.keys:
        keys = torch.stack([data.at(k)[rows.cpu()] for k in read.keys], 1).to(x.device)  # [rows, n_keys]
        shape = (-1, x.shape[1], -1) if read.at is not None else (-1, x.shape[1], x.shape[2], -1)
        x = x.gather(-1, (keys[:, None] if read.at is not None else keys[:, None, None]).expand(*shape))
    if read.head is not None:
        x = x.select(1 if read.kind == "pattern" or read.at is not None else 2, read.head)
    return public(x)


def public(x: Tensor) -> Tensor:
    """A result as it leaves the engine: on the CPU, in float32 (float64 when the model runs in float64)."""
    x = x.detach()
    return (x if x.dtype == torch.float64 else x.float()).cpu()


def assemble(parts: list[tuple[Tensor, Tensor]], n: int) -> Tensor:
    """Rows from ``(index, values)`` parts into one tensor in data order, zero-padded where shapes differ."""
    shape = [max(p[1].shape[d] for p in parts) for d in range(1, parts[0][1].dim())]
    out = torch.zeros(n, *shape, dtype=parts[0][1].dtype)
    for index, values in parts:
        out[(index, *(slice(0, s) for s in values.shape[1:]))] = values
    return out


def unembed(model: Model, normed: Float[Tensor, "rows d_model"], columns: Int[Tensor, "rows k"] | None = None
            ) -> Float[Tensor, "rows k"]:
    """Logits from the final norm's output: all of them, or only ``columns`` per row; the model's final logit
    soft-capping is applied if it has one (so this equals the model's own logits).

    Args:
        model: the model.
        normed: ``[rows, d_model]``, the final norm's output.
        columns: ``[rows, k]`` token ids, or ``None`` for the whole vocabulary.

    Returns:
        ``[rows, vocab or k]`` logits.
    """
    W_U, b_U = model.bridge.W_U.detach(), model.bridge.b_U.detach()
    normed = normed.to(W_U.device)
    if columns is None:
        logits = torch.cat([rows @ W_U + b_U for rows in normed.split(UNEMBED_ROWS)]) if len(normed) else normed @ W_U
    else:
        columns = columns.to(W_U.device)
        logits = torch.einsum("bd,dbk->bk", normed, W_U[:, columns]) + b_U[columns]
    cap = getattr(model.bridge.original_model.config, "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits



def unembed_into(model, results, normed_of, logits, n) -> None:
    """Every condition's END logits, the unembedding taking all their rows together, :data:`UNEMBED_ROWS` at a
    time (a group of one length is often a few prompts), each chunk written straight to its rows."""
    width = model.facts.d_vocab if isinstance(logits, str) else logits.shape[1]
    rows = torch.cat([torch.cat([v for _, v in part]) for part in normed_of])
    target = torch.cat([c * n + torch.cat([i for i, _ in part]) for c, part in enumerate(normed_of)])
    out = torch.zeros(len(results) * n, width, dtype=torch.float64 if rows.dtype == torch.float64 else torch.float32)
    for first in range(0, len(rows), UNEMBED_ROWS):
        chunk = slice(first, first + UNEMBED_ROWS)
        picked = None if isinstance(logits, str) else logits[target[chunk] % n].clamp(min=0)
        out[target[chunk]] = public(unembed(model, rows[chunk], picked))
    for result, part in zip(results, out.split(n)):
        result.logits = part
