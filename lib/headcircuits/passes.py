"""The clean passes the engine starts from (:mod:`headcircuits.engine`), kept in :data:`headcircuits.store.STORE`.

Below the lowest block a run edits, and before the first token it edits, everything is the clean run. One pass of
the model's own forward over each length group of the prompts gives that part: the residual stream entering the
run's first block (at every position), and when later tokens are recomputed over earlier ones, every block's keys
and values from that block up and END's residual entering each of them. The engine keeps the passes for the next
run on the same prompts (a traversal after the coordinates were read; the oracle fix after the traversal) and
starts there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from headcircuits.models import architecture
from headcircuits.models.core import Model
from headcircuits.store import STORE
from headcircuits.tasks.base import TaskData

Which = Literal["clean", "corrupt"]


class Stop(Exception):
    """Raised by a hook once a pass has everything it needs: the rest of the pass does not run (the one
    record-then-stop mechanism of the library)."""


def length_groups(data: TaskData, which: Which = "clean") -> list[tuple[Tensor, int]]:
    """The prompts of each length (their indices in ``data``, the length), shortest first: a group runs without
    padding.

    Args:
        data: the prompts.
        which: ``clean`` or ``corrupt``.

    Returns:
        ``[(indices, length)]``.
    """
    lengths = data.tokens(which).lengths
    return [((lengths == n).nonzero().flatten(), int(n)) for n in lengths.unique().tolist()]



#: a kept pass through every block also keeps the residual stream at every position entering every block (so that
#: a run from any higher block, e.g. path patching's senders of every layer, starts from it) when that takes at
#: most this many bytes; larger data keep it at END only (what the END-only mode reads)
FULL_BYTES = 2**28


@dataclass
class Pass:
    """A length group's clean pass from block ``start`` up: the residual stream entering blocks at every position
    (``resid``: block ``start``, and with ``through`` every block from ``start`` up when small enough), and
    (``through``: the pass went through every block) END's residual entering every block from ``start`` up
    (``end[n_layers]``: the final norm's input) and every token's keys and values of those blocks."""

    index: Tensor  # the group's prompts (sorted indices in the data)
    length: int
    start: int
    resid: dict[int, Tensor]  # block -> [n, length, d_model]
    end: dict[int, Tensor]  # block -> [n, d_model]
    kv: dict[int, tuple[Tensor, Tensor]]  # block -> ([n, kv heads, length, d_head], same)


def check_window(model: Model, length: int) -> None:
    """Refuse prompts longer than Gemma-3's sliding attention window, which the engine's own masks do not apply.

    Args:
        model: the model.
        length: a prompt's length in tokens.
    """
    window = architecture.sliding_window(model)
    if window and length > window:
        raise ValueError(f"{model.name}: prompts of {length} tokens are longer than its sliding attention window "
                         f"({window}), which the engine's own masks do not apply; use shorter prompts")


@torch.no_grad()
def clean_pass(model: Model, ids: Tensor, start: int, through: bool, full: bool) -> tuple[dict, dict, dict]:
    """One pass of the model's blocks over equal-length prompts ``ids`` (no unembedding, hooks of the model's own
    forward): the residual entering block ``start`` at every position (with ``full``, entering every block from
    ``start`` up); with ``through``, END's residual entering every block from ``start`` up and the final norm's,
    and the keys and values of those blocks, else the pass stops at ``start``.

    Args:
        model: the model.
        ids: ``[n, length]`` equal-length prompts.
        start: the first block the run recomputes.
        through: run every block (keys and values and END's residuals kept).
        full: keep the residual entering every block at every position.

    Returns:
        ``(residual entering blocks at every position, END's residual entering blocks, keys and values)``, by block.
    """
    from transformers import DynamicCache

    L = model.facts.n_layers
    entering: dict[int, Tensor] = {}
    end: dict[int, Tensor] = {}

    def record(x, hook, layer):
        if layer == start or (full and layer < L):
            entering[layer] = x.detach().clone()
        if not through:
            raise Stop
        end[layer] = x[:, -1].detach().clone()
        return x

    name = lambda l: architecture.hook("resid_pre", l) if l < L else architecture.hook("final_in")  # noqa: E731
    hooks = [(name(l), lambda x, hook, l=l: record(x, hook, l)) for l in (range(start, L + 1) if through else [start])]
    base = architecture.base_model(model)
    cache = DynamicCache(config=base.config) if through else None
    try:
        with model.bridge.hooks(fwd_hooks=hooks):
            base(input_ids=ids.to(model.device), use_cache=through, past_key_values=cache)
    except Stop:
        pass
    kv = {l: (cache.layers[l].keys, cache.layers[l].values) for l in range(start, L)} if through else {}
    return entering, end, kv


def kept_passes(model: Model, data: TaskData, which: Which, start: int, through: bool, end_only: bool,
            max_tokens: int) -> list[Pass]:
    """The clean pass of every length group from block ``start`` (kept in the store; a kept pass through every
    block serves a run that needs less: from a lower block when only END is recomputed).

    Args:
        model: the model.
        data: the prompts.
        which: ``clean`` or ``corrupt``.
        start: the run's first block.
        through: the run recomputes later tokens over earlier ones (needs keys and values).
        end_only: the run recomputes END alone.
        max_tokens: the most tokens per forward pass.

    Returns:
        One :class:`Pass` per length group.
    """
    def serves(key) -> bool:
        kind, w, s0, full = key
        if w != which or (through and kind != "through"):
            return False
        return s0 == start or (kind == "through" and s0 < start and (end_only or full))

    kept = STORE.get(model, data, lambda key: isinstance(key, tuple) and len(key) == 4 and serves(key))
    if kept is not None:
        return kept
    tokens, passes = data.tokens(which), []
    L, d = model.facts.n_layers, model.facts.d_model
    full = through and int(tokens.lengths.sum()) * d * 4 * (L - start) <= FULL_BYTES
    for index, length in length_groups(data, which):
        check_window(model, length)
        parts = [clean_pass(model, tokens.ids[chunk, :length], start, through, full)
                 for chunk in index.split(max(1, max_tokens // length))]
        resid = {l: torch.cat([p[0][l] for p in parts]) for l in parts[0][0]}
        end = {l: torch.cat([p[1][l] for p in parts]) for l in parts[0][1]}
        kv = {l: (torch.cat([p[2][l][0] for p in parts]), torch.cat([p[2][l][1] for p in parts])) for l in parts[0][2]}
        passes.append(Pass(index, length, start, resid, end, kv))
    STORE.put(model, data, ("through" if through else "upto", which, start, full), passes)
    return passes


class Prefix:
    """The keys and values of the tokens before the recomputed ones, per block, read but never extended: every
    rerun reuses them (duck-typed on the two methods Hugging Face's attention calls)."""

    def __init__(self, kv: dict[int, tuple[Tensor, Tensor]], length: int):
        self.kv, self.length = kv, length

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.kv[layer_idx]
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length
