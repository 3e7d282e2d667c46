"""The one engine that runs the model: :func:`run`, for every experiment of the book.

Every experiment runs the model over a TaskData under a few *conditions* (lists of :mod:`edits <headcircuits.edits>`,
an empty list being the clean run), reads some activations (:class:`Read`) and perhaps the logits at END.
:func:`run` does that in the cheapest exact way, which it chooses itself:

* **Below the lowest edited (or read) block nothing differs from the clean run.** The engine starts there, from
  a clean pass over the prompts that it keeps in memory (:data:`headcircuits.store.STORE`) for the next run on
  the same prompts: five weight edits of one head run the blocks from that head's layer up, each once.
* **END alone** when every edit changes END alone and every read is at END (END being each prompt's last token):
  the earlier tokens are the clean run at every block, so their keys and values come from the kept clean pass,
  and only END is recomputed, from the lowest edited block up, once per condition. The conditions of a run are
  laid side by side as copies of END that attend to the prompt's earlier tokens and to themselves, never to each
  other (a block-diagonal mask): the repair's nine conditions, or a thousand points of Talking Heads' traversal,
  share each prompt's cache. Edits and reads see each copy as its own one-column view (the edit protocol), so
  they are written once for both modes.
* Otherwise **every position**, from the lowest edited block up, once per condition.

Written once, inside the engine: the prompts' batches (prompts of one length, and neighbouring lengths while
they are few, right-padded: :func:`headcircuits.passes.length_groups`), masks and position ids, the kept clean
pass (through the highest block a run reads, extended upwards when a later run reads higher), reading then
stopping after the highest block read (nothing above it runs: on Gemma-3 the 262k-column unembedding costs more
than the blocks), the unembedding at END only, in chunks of rows (:data:`headcircuits.readout.UNEMBED_ROWS`), of
the whole vocabulary or of listed columns only, and every result returned in the data's order, on the CPU.

Exactness: every mode is tested equal to the plain hooked forward pass (``model.bridge.run_with_hooks``) with the
same edits on every tiny family, with prompts of mixed lengths (``tests/test_engine.py``); the differences are
float rounding of other batch shapes (below 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from headcircuits.edits import Edit
from headcircuits.models import architecture
from headcircuits.models.core import Model
from headcircuits.passes import (Pass, PassKey, Prefix, Stop, Which, causal_mask, clean_pass, keeps_full,
                                 kept_passes)
from headcircuits.readout import Layout, assemble, gather, kind_of, unembed_into
from headcircuits.store import STORE, hooks_active
from headcircuits.tasks.base import TaskData


@dataclass(frozen=True)
class Read:
    """An activation to read: the hook point (``kind`` of :data:`headcircuits.models.architecture.HOOKS`, at
    ``layer``), at each prompt's position ``at`` (``None``: every position), of one ``head`` (``None``: every head,
    for the kinds with a head axis); for attention patterns, only the ``keys`` positions (empty: every key).

    Shapes returned by :func:`run` (rows in data order; ``T``: the longest prompt, shorter ones zero-padded):
    ``[batch, ...]`` at a position, ``[batch, T, ...]`` at every position; patterns ``[batch, heads, keys]`` at a
    query position (``[batch, heads, T, T]`` at every one); ``head`` drops the head axis.
    """

    kind: str
    layer: int | None = None
    at: str | None = None
    head: int | None = None
    keys: tuple[str, ...] = ()

    def __post_init__(self):
        architecture.hook(self.kind, self.layer)  # an unknown kind or a missing layer is refused here
        if self.keys and self.kind != "pattern":
            raise ValueError(f"keys select attention patterns' key positions; a {self.kind!r} read has none")
        if self.head is not None and self.kind not in ("q", "k", "v", "z", "pattern"):
            raise ValueError(f"a {self.kind!r} activation has no head axis to take head {self.head} from")

    @property
    def name(self) -> str:
        return architecture.hook(self.kind, self.layer)


@dataclass
class Result:
    """One condition's reads (by :class:`Read`) and its END logits (``None`` unless asked for), on the CPU."""

    reads: dict[Read, Tensor]
    logits: Tensor | None = None

    def __getitem__(self, read: Read) -> Tensor:
        return self.reads[read]


def end_is_last(data: TaskData, which: Which = "clean") -> bool:
    """Whether END is every prompt's last token (what the END-only mode needs: nothing after END to rerun).

    Args:
        data: the prompts.
        which: ``clean`` or ``corrupt``.

    Returns:
        Whether END is every prompt's last token.
    """
    return bool((data.at("END", which) == data.tokens(which).lengths - 1).all())


# --- the run -----------------------------------------------------------------------------------------------------

def _window(data: TaskData, which: Which, edits: list[Edit], read: list[Read], logits) -> tuple[Tensor, Tensor]:
    """Each prompt's recomputed tokens ``lo .. hi``: from the first position any edit or read touches (an edit of
    every position: 0) to the last one read (END for the logits). Before ``lo`` every token is the clean run's.
    Without edits, reads anywhere but at END take the whole prompt (one plain pass costs less than a kept pass
    and a rerun of its end); reads and logits at END alone rerun END over a kept pass."""
    lengths = data.tokens(which).lengths
    at = lambda name: torch.zeros_like(lengths) if name is None else data.at(name, which)  # noqa: E731
    touched = [at(e.position) for e in edits] + [at(r.at) for r in read]
    if not edits and not all(r.at == "END" for r in read):  # nothing edited: one plain pass is the cheapest
        touched.append(torch.zeros_like(lengths))
    needed = [lengths - 1 if r.at is None else data.at(r.at, which) for r in read]
    if logits is not None:
        touched.append(data.at("END", which))
        needed.append(data.at("END", which))
    lo = torch.stack(touched).min(0).values
    hi = torch.maximum(torch.stack(needed).max(0).values, lo)
    # a window from the first token takes the whole prompt: the model's own forward, as the kept passes run it,
    # so that an unedited read equals theirs exactly (a shorter sequence would round differently)
    return lo, torch.where(lo == 0, lengths - 1, hi)


@torch.no_grad()
def run(
    model: Model,
    data: TaskData,
    conditions: Sequence[Sequence[Edit]] = ((),),
    *,
    read: Sequence[Read] = (),
    logits: Literal["end"] | Int[Tensor, "batch k"] | None = None,
    which: Which = "clean",
    max_tokens: int = 2048,
) -> list[Result]:
    """Run the model over ``data`` once per condition (see the module docstring for how).

    Args:
        model: the model.
        data: the prompts (the ``which`` ones: clean or counterfactual).
        conditions: one list of edits per condition (``[]``: the unedited model).
        read: the activations to return, per condition.
        logits: ``"end"`` for the whole vocabulary's logits at END; a ``[batch, k]`` tensor of token ids for those
            columns only (padding -1 gives the first token's, which :func:`headcircuits.scoring.candidate_correct`
            ignores); ``None`` for none (the pass stops once every read is recorded).
        which: ``"clean"`` or ``"corrupt"`` prompts.
        max_tokens: the most recomputed tokens (rows x positions) per step.

    Returns:
        One :class:`Result` per condition, in order, every tensor in the data's row order on the CPU.
    """
    conditions = [list(c) for c in conditions]
    read = list(read)
    L = model.facts.n_layers
    _validate(model, data, which, conditions, read, logits)
    edits = [e for c in conditions for e in c]
    final = logits is not None or any(r.layer is None for r in read)  # the final norm (counted as block L)
    start = min([*(l for e in edits for l in e.layers), *(L if r.layer is None else r.layer for r in read),
                 *([L] if logits is not None else [])])
    top = L - 1 if final else max(r.layer for r in read)
    lo, hi = _window(data, which, edits, read, logits)
    lengths = data.tokens(which).lengths
    unedited_whole = len(conditions) == 1 and not conditions[0] and bool((lo == 0).all())
    if unedited_whole and start > 0 and _keeps_instead(model, data, which):
        # whole prompts, unedited, nothing kept yet: the whole model's own forward, kept (below), costs at most one
        # pass more than this run and serves every later run on these prompts from any block (path patching's
        # clean reads, then its steps 2 and 3, on a model that the baseline did not run)
        start, top, final = 0, L - 1, True
    end_only = bool(((lo == lengths - 1) & (hi == lo)).all())
    start = min(start, L - 1) if not end_only else start  # below the final norm unless END alone is rerun
    frozen = bool((lo == hi).all()) and _all_frozen(conditions, read, start, top)
    # a frozen run reads no other token: the residual entering its first block is all it needs of a kept pass
    prefix_needed = bool((lo > 0).any()) and not frozen
    passes = kept_passes(model, data, which, start, prefix_needed, end_only, max_tokens, top)
    reads_of = [[[] for _ in read] for _ in conditions]
    normed_of: list[list[tuple[Tensor, Tensor]]] = [[] for _ in conditions]
    stop = not final
    parts = []
    for p in passes:
        # windows from the first token run as one batch (right padding changes no real token), others by window
        windows = {(int(x), 0 if x == 0 else int(y)) for x, y in zip(lo[p.index], hi[p.index])}
        for a, b in sorted(windows):
            mine = ((lo[p.index] == a) & ((hi[p.index] == b) | (a == 0))).nonzero().flatten()
            b = int(hi[p.index][mine].max()) if a == 0 else b
            # [n, width, d_model]: END's residual of a pass through every block (a frozen run's pass may stop there)
            h = p.end[start][mine][:, None] if end_only and start in p.end else p.resid[start][mine, a:b + 1]
            kv = {} if frozen or not a else {l: (k[mine, :, :a], v[mine, :, :a]) for l, (k, v) in p.kv.items()
                                             if start <= l <= top}
            parts.append((p.index[mine], h, torch.full((len(mine),), a), kv))
    if frozen:  # every head frozen at one token: no token attends to another, so every prompt runs together
        parts = [(torch.cat([r for r, *_ in parts]), torch.cat([h for _, h, *_ in parts]),
                  torch.cat([q for _, _, q, _ in parts]), {})]
    # an unedited run of the whole clean prompts through the final norm (e.g. path patching's baseline) keeps its
    # pass (the counterfactual prompts' is run once: no later run starts from it)
    keep = ([], keeps_full(model, data, which, 0)) if (unedited_whole and final and start == 0
                                                       and which == "clean") else None
    for rows, h, first, kv in parts:
        _steps(model, data, which, conditions, read, rows, h, first, kv, start, top, final, stop, max_tokens,
               reads_of, normed_of, frozen, keep)
    if keep is not None and len(keep[0]) == len(parts):
        STORE.put(model, data, PassKey("through", which, 0, keep[1], L - 1), keep[0])
    n = len(data)
    results = [Result({r: assemble(reads_of[c][i], n) for i, r in enumerate(read)}) for c in range(len(conditions))]
    if logits is not None:
        unembed_into(model, results, normed_of, logits, n)
    return results


def _keeps_instead(model: Model, data: TaskData, which: Which) -> bool:
    """Whether an unedited whole-prompt run from a higher block should run the whole model and keep its pass
    instead: when no kept pass through every block at every position exists for these prompts, one fits
    :data:`headcircuits.passes.FULL_BYTES`, and the store can keep it (no hook is active)."""
    if hooks_active(model) or not keeps_full(model, data, which, 0):
        return False
    whole = PassKey("through", which, 0, True, model.facts.n_layers - 1)
    return STORE.get(model, data, lambda key: key == whole) is None


def _validate(model, data, which, conditions, read, logits) -> None:
    L = model.facts.n_layers
    if not conditions:
        raise ValueError("give at least one condition ([] is the unedited model)")
    if logits is None and not read:
        raise ValueError("nothing to compute: ask for reads, or logits='end'")
    if isinstance(logits, Tensor) and (logits.ndim != 2 or len(logits) != len(data)):
        raise ValueError(f"logit columns must be [prompts, k] with one row per prompt ({len(data)}), "
                         f"not {tuple(logits.shape)}")
    if isinstance(logits, str) and logits != "end":
        raise ValueError(f"logits must be 'end', a tensor of columns or None, not {logits!r}")
    for r in read:
        if r.layer is not None and not 0 <= r.layer < L:
            raise ValueError(f"{r.name}: {model.name} has layers 0..{L - 1}")
        for position in ([r.at] if r.at else []) + list(r.keys):
            data.at(position, which)  # an unknown or absent position is refused before anything runs
    for e in (e for c in conditions for e in c):
        if not e.layers or not all(0 <= l < L for l in e.layers):
            raise ValueError(f"{type(e).__name__} edits layers {e.layers}; {model.name} has layers 0..{L - 1}")
        if e.position is not None:
            data.at(e.position, which)


def _steps(model, data, which, conditions, read, rows, h, first, kv, start, top, final, stop, max_tokens, reads_of,
           normed_of, frozen=False, keep=None) -> None:
    """The conditions over a group of prompts whose recomputed tokens are ``first[i] .. first[i] + width - 1``
    (``h``: the clean residual entering block ``start`` there, [n, width, d_model]; ``kv``: the earlier tokens'
    keys and values, every prompt of the group having the same ``first`` then), as many conditions per step as
    ``max_tokens`` allows. ``frozen`` (:func:`_all_frozen`): one token per prompt whose heads are all frozen, so no
    copy attends to anything but itself and the prompts need not share a length. ``keep``: ``(passes, full)``: an
    unedited whole-prompt run through the final norm also records the clean pass the engine keeps (its
    :class:`~headcircuits.passes.Pass` appended to ``passes``), so the runs that follow start from it."""
    n, width = h.shape[:2]
    device, dtype = h.device, h.dtype
    first = first.to(device)
    lo = 0 if frozen else int(first[0])  # the earlier tokens' keys and values every row attends to
    # one token: the conditions side by side as copies of it (they share the earlier tokens' keys and values), else
    # as blocks of rows (frozen: each row is its token alone)
    copies = width == 1 and not frozen
    per_step = max(1, max_tokens // (n * width))
    for start_at in range(0, len(conditions), per_step):
        chunk = list(range(start_at, min(start_at + per_step, len(conditions))))
        C = len(chunk)
        layout = Layout(copies, n, lo)
        view_positions = first[:, None] + torch.arange(width, device=device)
        valid = view_positions < data.tokens(which).lengths[rows.cpu()].to(device)[:, None]  # not right padding
        if copies:
            x = h.expand(n, C, h.shape[-1]).contiguous()  # an expanded (stride 0) input slows every block down
            ids = view_positions.expand(n, C)
            mask = torch.full((C, lo + C), torch.finfo(dtype).min, dtype=dtype, device=device)
            mask[:, :lo] = 0
            mask[:, lo:].fill_diagonal_(0)
            mask = mask[None, None].expand(n, 1, C, lo + C)
            cache = Prefix(kv, lo) if lo and not frozen else None
        else:
            x = h.repeat(C, 1, 1)
            ids = view_positions.repeat(C, 1)
            mask = causal_mask(width, lo, dtype, device)[None, None].expand(C * n, 1, width, lo + width)
            cache = Prefix(kv, lo, times=C) if lo else None
        by_name: dict[str, list[tuple[int, object]]] = {}
        for j, c in enumerate(chunk):
            for e in conditions[c]:
                for name, fn in e.hooks(data, rows, view_positions):
                    by_name.setdefault(name, []).append((j, fn))
        if frozen and not read and all(len(conditions[c]) == 1 for c in chunk):  # the norms and MLPs alone
            normed = _frozen_normed(model, [conditions[c][0] for c in chunk], rows, h[:, 0], start, top)
            for j, c in enumerate(chunk):
                normed_of[c].append((rows, normed[j * n:(j + 1) * n]))
            continue
        hooks, composed_of = [], {}
        for name, fns in by_name.items():
            def composed(act, hook, fns=fns, kind=kind_of(name)):
                act = act.clone()
                for j, fn in fns:
                    layout.put(kind, act, j, fn(layout.view(kind, act, j), hook))
                return act

            hooks.append((name, composed))
            composed_of[name] = composed
        done: set[int] = set()

        def record(act, hook, i):
            for j, c in enumerate(chunk):
                view = layout.view(read[i].kind, act, j)
                reads_of[c][i].append((rows, gather(read[i], view, data, rows, view_positions, valid)))
            done.add(i)
            if stop and len(done) == len(read):
                raise Stop
            return act

        hooks += [(r.name, lambda act, hook, i=i: record(act, hook, i)) for i, r in enumerate(read)]
        # whole prompts from the embeddings: the model's own forward, the same computation as the kept clean passes
        # (so an unedited run equals them exactly); an unedited one through the final norm is itself kept
        whole = lo == 0 and start == 0 and not frozen and not copies
        captured: dict[str, Tensor] = {}
        if whole and final:
            hooks.append((architecture.hook("final_out"), lambda act, hook: captured.setdefault("normed", act)))
        try:
            if whole:
                ids_of = data.tokens(which).ids[rows.cpu(), :width].repeat(C, 1).to(device)
                if keep is not None and final and C == 1 and not conditions[chunk[0]]:
                    resid, end, kv = clean_pass(model, ids_of, 0, True, keep[1], hooks,
                                                last=(data.tokens(which).lengths[rows.cpu()] - 1).to(device))
                    keep[0].append(Pass(rows, width, 0, resid, end, kv))
                else:
                    with model.bridge.hooks(fwd_hooks=hooks):
                        architecture.base_model(model)(input_ids=ids_of, use_cache=False)
                normed = captured.get("normed")
            else:
                with model.bridge.hooks(fwd_hooks=hooks):
                    for layer in range(start, top + 1):
                        x = architecture.run_block(model, layer, x, ids, mask, cache)
                    normed = architecture.final_norm(model, x) if final else None
            if final:
                column = data.at("END", which)[rows.cpu()].to(device) - first  # END's column in the window
                for j, c in enumerate(chunk):
                    normed_of[c].append((rows, layout.view("other", normed, j)[torch.arange(n, device=device),
                                                                               column]))
        except Stop:
            pass


#: what a frozen run must not read: what the attention computes from other tokens (queries, keys and values are
#: the token's own, read before any attention; the norms and MLPs alone run when none of them is read either)
_NOT_FROZEN = ("pattern", "z", "post_attn_scale")


def _all_frozen(conditions, read, start, top) -> bool:
    """Whether every condition freezes every head of the blocks ``start`` .. ``top`` at the one recomputed token
    (an edit with ``frozen = True``, such as path patching's :class:`~headcircuits.path_patching.FrozenHeads`,
    sets every head's ``z`` there whatever the head computes, edits only that token, and gives its values with
    ``frozen_at(layer, rows) -> (z [rows, head, d_head], MLP output [rows, d_model] or None)``), and nothing read needs
    what the attention computes from other tokens. Then the token needs no other token: each prompt's copies attend
    to themselves alone and prompts of every length run together; with no query, key or value read, each block's
    attention output is known from the frozen ``z`` alone (the norms and MLPs alone run:
    :func:`headcircuits.models.architecture.mlp_only_block`). Exact, because a frozen head's output does not
    depend on what it would have attended to (tested through path patching against its reference on every
    family)."""
    span = set(range(start, top + 1))
    return (all(any(getattr(e, "frozen", False) and span <= set(e.layers) for e in c) for c in conditions)
            and not any(r.kind in _NOT_FROZEN and r.layer is not None and r.layer in span for r in read))


def _frozen_normed(model, edits: list[Edit], rows: Tensor, h: Tensor, start: int, top: int) -> Tensor:
    """Every head frozen (one frozen edit per condition, nothing read but the logits): each block's attention output
    is the frozen heads' ``z`` through W_O, so only the norms and MLPs run (no query, key or value projection, no
    attention), every condition's rows stacked as one matrix; returns the final norm's output, condition by
    condition ([conditions * rows, d_model])."""
    x = h.repeat(len(edits), 1)  # rows of condition j at j * n .. (j + 1) * n
    for layer in range(start, top + 1):
        parts = [e.frozen_at(layer, rows) for e in edits]
        z = torch.cat([z for z, _ in parts]).to(x)
        mlp = None if parts[0][1] is None else torch.cat([m for _, m in parts]).to(x)
        x = architecture.mlp_only_block(model, layer, x, architecture.attention_output(model, layer, z), mlp)
    return architecture.final_norm(model, x)
