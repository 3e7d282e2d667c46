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
from typing import Literal, NamedTuple

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


#: prompts of neighbouring lengths share one batch, right-padded, while that adds at most this many padding tokens
#: (on 2 CPU cores one forward call of the bridged model costs about as much as 40-50 tokens, whatever its size)
MERGE_TOKENS = 48


def length_groups(data: TaskData, which: Which = "clean") -> list[tuple[Tensor, int]]:
    """The prompts in batches of equal or neighbouring lengths (their indices in ``data``, the batch's width, the
    longest prompt's length), shortest first. Prompts of one length always share a batch; the next length joins it
    while that adds at most :data:`MERGE_TOKENS` padding tokens (a few prompts of each length cost more in calls
    than in padding). Padding is on the right, so it changes no real token: attention is causal.

    Args:
        data: the prompts.
        which: ``clean`` or ``corrupt``.

    Returns:
        ``[(indices, width)]``.
    """
    lengths = data.tokens(which).lengths
    groups: list[tuple[Tensor, int]] = []
    for n in lengths.unique().tolist():
        index = (lengths == n).nonzero().flatten()
        if groups and len(groups[-1][0]) * (n - groups[-1][1]) <= MERGE_TOKENS:
            groups[-1] = (torch.cat([groups[-1][0], index]).sort().values, int(n))
        else:
            groups.append((index, int(n)))
    return groups


#: a kept pass through every block also keeps the residual stream at every position entering every block (so that
#: a run from any higher block, e.g. path patching's senders of every layer, starts from it) when that takes at
#: most this many bytes and the run that makes it recomputes more than END; larger data, and the END-only mode's
#: passes, keep it at END only (what the END-only mode reads)
FULL_BYTES = 2**28


@dataclass
class Pass:
    """A length group's clean pass (right-padded to ``length``, its longest prompt) from block ``start`` up: the
    residual stream entering blocks at every position (``resid``: block ``start``, and with ``full`` every block
    from ``start`` to ``top``), and, for a pass *through* the blocks ``start`` .. ``top``, END's residual entering
    each of them and block ``top + 1`` (``end[n_layers]``: the final norm's input; END being each prompt's last
    token) and every token's keys and values of those blocks (``top``: the highest block a run reads; nothing
    above it runs)."""

    index: Tensor  # the group's prompts (sorted indices in the data)
    length: int
    start: int
    resid: dict[int, Tensor]  # block -> [n, length, d_model]
    end: dict[int, Tensor]  # block -> [n, d_model]
    kv: dict[int, tuple[Tensor, Tensor]]  # block -> ([n, kv heads, length, d_head], same)


class PassKey(NamedTuple):
    """What a kept pass holds, as the store's key: ``through`` (every token's keys and values and END's residual of
    the blocks ``start`` .. ``top``) or ``upto`` (the residual entering ``start`` alone), of the ``which`` prompts,
    with ``full``: the residual at every position entering every block ``start`` .. ``top``."""

    kind: Literal["through", "upto"]
    which: Which
    start: int
    full: bool
    top: int


def causal_mask(width: int, prefix: int, dtype: torch.dtype, device) -> Tensor:
    """``[width, prefix + width]`` additive mask: each of ``width`` recomputed tokens sees the ``prefix`` earlier
    tokens and the recomputed ones up to itself."""
    return torch.full((width, prefix + width), torch.finfo(dtype).min, dtype=dtype, device=device).triu(prefix + 1)


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
def clean_pass(model: Model, ids: Tensor, start: int, through: bool, full: bool, hooks: list = (),
               last: Tensor | None = None, top: int | None = None) -> tuple[dict, dict, dict]:
    """One pass of the model's blocks over prompts ``ids`` of one length group (no unembedding, hooks of the
    model's own forward): the residual entering block ``start`` at every position (with ``full``, entering every
    block from ``start`` to ``top``); with ``through``, END's residual entering every block from ``start`` to
    ``top + 1`` (the final norm's when ``top`` is the last block) and the keys and values of the blocks ``start``
    .. ``top``, the pass stopping there; else it stops at ``start``.

    Args:
        model: the model.
        ids: ``[n, length]`` prompts (right-padded when of several lengths).
        start: the first block the run recomputes.
        through: run the blocks ``start`` .. ``top`` (keys and values and END's residuals kept).
        full: keep the residual entering every block at every position.
        hooks: other hooks of the same pass (e.g. an unedited run's reads, which the pass then also keeps).
        last: each prompt's last token (``None``: the last column; right-padded prompts of several lengths).
        top: the highest block run through (``None``: the last block).

    Returns:
        ``(residual entering blocks at every position, END's residual entering blocks, keys and values)``, by block.
    """
    from transformers import DynamicCache

    L = model.facts.n_layers
    top = L - 1 if top is None else top
    entering: dict[int, Tensor] = {}
    end: dict[int, Tensor] = {}

    def record(x, hook, layer):
        if layer == start or (full and layer <= top) or (through and layer == top + 1 < L):
            entering[layer] = x.detach().clone()  # (entering top + 1: what extends the pass upwards later)
        if not through:
            raise Stop
        end[layer] = (x[:, -1] if last is None else x[torch.arange(len(x), device=x.device), last]).detach().clone()
        if top < layer < L:
            raise Stop  # the blocks above the highest one read do not run (the final norm, which is cheap, does)
        return x

    name = lambda l: architecture.hook("resid_pre", l) if l < L else architecture.hook("final_in")  # noqa: E731
    hooks = [*hooks, *((name(l), lambda x, hook, l=l: record(x, hook, l))
                       for l in (range(start, top + 2) if through else [start]))]
    base = architecture.base_model(model)
    cache = DynamicCache(config=base.config) if through else None
    try:
        with model.bridge.hooks(fwd_hooks=hooks):
            base(input_ids=ids.to(model.device), use_cache=through, past_key_values=cache)
    except Stop:
        pass
    kv = {l: (cache.layers[l].keys, cache.layers[l].values) for l in range(start, top + 1)} if through else {}
    return entering, end, kv


def keeps_full(model: Model, data: TaskData, which: Which, start: int) -> bool:
    """Whether a pass through every block also keeps the residual at every position entering every block from
    ``start`` up: when that takes at most :data:`FULL_BYTES`."""
    return int(data.tokens(which).lengths.sum()) * model.facts.d_model * 4 * (model.facts.n_layers - start) <= FULL_BYTES


def kept_passes(model: Model, data: TaskData, which: Which, start: int, through: bool, end_only: bool,
                max_tokens: int, top: int | None = None) -> list[Pass]:
    """The clean pass of every length group from block ``start`` (kept in the store; a kept pass through more
    blocks serves a run that needs fewer: from a lower block when only END is recomputed or when it kept the
    residual at every position, up to a higher one).

    Args:
        model: the model.
        data: the prompts.
        which: ``clean`` or ``corrupt``.
        start: the run's first block.
        through: the run recomputes later tokens over earlier ones (needs keys and values).
        end_only: the run recomputes END alone.
        max_tokens: the most tokens per forward pass.
        top: the run's highest block (``None``: the last; only for ``through``).

    Returns:
        One :class:`Pass` per length group.
    """
    top = model.facts.n_layers - 1 if top is None else top

    def starts(key: PassKey, top_kept: int) -> bool:  # END's residual is kept entering start .. top_kept + 1,
        # with `full` every position's entering start .. top_kept
        return key.which == which and (key.start == start or (key.kind == "through" and key.start < start and (
            (end_only and start <= top_kept + 1) or (key.full and start <= top_kept))))

    def serves(key: PassKey) -> bool:
        return starts(key, key.top) and (not through or (key.kind == "through" and key.top >= top))

    kept = STORE.get(model, data, lambda key: isinstance(key, PassKey) and serves(key))
    if kept is not None:
        return kept
    if through:  # a pass through fewer blocks runs the missing ones only
        lower = STORE.keys(model, data, lambda key: isinstance(key, PassKey) and key.kind == "through"
                           and key.top < top and starts(key, top))
        if lower:
            key = lower[0]
            kept = STORE.get(model, data, lambda k: k == key)
            for p in kept:
                _extend(model, p, key.top, top, key.full, data.tokens(which).lengths[p.index] - 1)
            STORE.put(model, data, key._replace(top=top), kept)
            return kept
    tokens, passes = data.tokens(which), []
    full = through and not end_only and keeps_full(model, data, which, start)  # END alone: END is enough
    for index, length in length_groups(data, which):
        check_window(model, length)
        parts = [clean_pass(model, tokens.ids[chunk, :length], start, through, full,
                            last=(tokens.lengths[chunk] - 1).to(model.device), top=top)
                 for chunk in index.split(max(1, max_tokens // length))]
        resid = {l: torch.cat([p[0][l] for p in parts]) for l in parts[0][0]}
        end = {l: torch.cat([p[1][l] for p in parts]) for l in parts[0][1]}
        kv = {l: (torch.cat([p[2][l][0] for p in parts]), torch.cat([p[2][l][1] for p in parts])) for l in parts[0][2]}
        passes.append(Pass(index, length, start, resid, end, kv))
    STORE.put(model, data, PassKey("through" if through else "upto", which, start, full, top if through else start),
              passes)
    return passes


class _Recorder:
    """A key/value cache that keeps what each block computes (duck-typed as :class:`Prefix` is)."""

    def __init__(self):
        self.kv: dict[int, tuple[Tensor, Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.kv[layer_idx] = (key_states, value_states)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


@torch.no_grad()
def _extend(model: Model, p: Pass, t0: int, top: int, full: bool, last: Tensor) -> None:
    """Extend a kept pass through the blocks ``t0`` .. ``top`` to ``top``: those blocks run over every position
    from the residual entering block ``t0 + 1`` (kept for this), adding their keys and values, END's residual
    (``last``: each prompt's last token) entering each of them and block ``top + 1``, and with ``full`` every
    position's. The same computation as the pass's own forward (the model's blocks, causal mask)."""
    L = model.facts.n_layers
    x = p.resid[t0 + 1]
    n, width = x.shape[:2]
    device = x.device
    rows, last = torch.arange(n, device=device), last.to(device)
    ids = torch.arange(width, device=device).expand(n, width)
    mask = causal_mask(width, 0, x.dtype, device)
    recorder = _Recorder()
    for layer in range(t0 + 1, top + 1):
        if full:
            p.resid[layer] = x
        x = architecture.run_block(model, layer, x, ids, mask[None, None].expand(n, 1, width, width), recorder)
        p.end[layer + 1] = x[rows, last].clone()
    p.kv.update(recorder.kv)
    if top + 1 < L:
        p.resid[top + 1] = x


class Prefix:
    """The keys and values of the tokens before the recomputed ones, per block, read but never extended: every
    rerun reuses them (duck-typed on the two methods Hugging Face's attention calls). With ``times``, the rows run
    as ``times`` blocks of the prompts (one block per condition) and each block attends to the same prefix: it is
    laid out for one block at a time as the attention asks for it, never held repeated for every block."""

    def __init__(self, kv: dict[int, tuple[Tensor, Tensor]], length: int, times: int = 1):
        self.kv, self.length, self.times = kv, length, times

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return tuple(self._joined(kept, new) for kept, new in zip(self.kv[layer_idx], (key_states, value_states)))

    def _joined(self, kept: Tensor, new: Tensor) -> Tensor:
        if self.times == 1:
            return torch.cat([kept, new], dim=-2)
        n, heads, _, d = kept.shape
        out = torch.empty(self.times * n, heads, self.length + new.shape[-2], d, dtype=new.dtype, device=new.device)
        out.view(self.times, n, heads, -1, d)[..., :self.length, :] = kept  # broadcast over the blocks
        out[..., self.length:, :] = new
        return out

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length
