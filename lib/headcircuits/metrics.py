"""Behavioural metrics of the papers, read at each prompt's own END position.

* logit difference: logit(answer) - logit(distractor) at END (Wang et al.'s IOI metric; invariant to adding a
  constant to all logits, so it is the same with or without TransformerLens' logit centring);
* accuracy: how often the answer is the top-1 token over the whole vocabulary, how often it is the top one among
  the candidates the prompt lists, and how often it beats the distractor (Wang et al. report IO > S 99.3 % of
  the time for GPT-2 small).
"""

from __future__ import annotations

from typing import Callable

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from headcircuits.models.core import Model
from headcircuits.tasks.base import TaskData

#: hooks for the prompts ``start:stop`` of a batched run: ``hooks_for(start, stop) -> [(hook name, fn), ...]``
HooksFor = Callable[[int, int], list]


def logits_at(logits: Float[Tensor, "batch pos vocab"], positions: Int[Tensor, " batch"]) -> Float[Tensor, "batch vocab"]:
    """Each prompt's logits at its own position (e.g. ``data.at('END')``), on the logits' device."""
    return logits[torch.arange(logits.shape[0], device=logits.device), positions.to(logits.device)]


def logit_difference(
    end_logits: Float[Tensor, "batch vocab"], answer: Int[Tensor, " batch"], distractor: Int[Tensor, " batch"]
) -> Float[Tensor, " batch"]:
    """logit(answer) - logit(distractor), per prompt (on the logits' device)."""
    rows = torch.arange(end_logits.shape[0], device=end_logits.device)
    return end_logits[rows, answer.to(end_logits.device)] - end_logits[rows, distractor.to(end_logits.device)]


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the needed activation is recorded."""


@torch.no_grad()
def recorded(model: Model, ids: Int[Tensor, "batch pos"], names: list[str], hooks: list | None = None) -> dict[str, Tensor]:
    """The activations ``names`` (hook names) of one run over ``ids``, stopped as soon as the last of them is
    recorded: the blocks above it and the unembedding do not run (on Gemma-3, whose 262k-token unembedding at
    every position costs more than all its blocks, a run that reads attention patterns takes a third of the time).
    ``hooks``: an intervention in the same run, before the recording."""
    seen: dict[str, Tensor] = {}

    def grab(x, hook, name):
        seen[name] = x.detach().clone()
        if len(seen) == len(names):
            raise _Stop
        return x

    try:
        model.bridge.run_with_hooks(ids.to(model.device), fwd_hooks=[
            *(hooks or []), *((n, lambda x, hook, n=n: grab(x, hook, n)) for n in names)])
    except _Stop:
        pass
    missing = [n for n in names if n not in seen]
    if missing:
        raise KeyError(f"no activation was recorded at {missing}: not hook points of this model")
    return seen


@torch.no_grad()
def final_normed(
    model: Model, ids: Int[Tensor, "batch pos"], hooks: list | None = None,
    positions: Int[Tensor, " batch"] | None = None, **kwargs,
) -> Float[Tensor, "batch d_model"]:
    """The final-norm output at each row's ``positions`` (default: the last column), from a run with ``hooks``,
    stopped before the unembedding: the largest matrix of a small model, needed only at END (see
    :func:`unembed`). ``kwargs`` go to ``run_with_hooks`` (e.g. ``past_key_values``)."""
    grabbed = {}

    def grab(x, hook):
        rows = torch.arange(x.shape[0], device=x.device)
        grabbed["x"] = (x[:, -1] if positions is None else x[rows, positions.to(x.device)]).clone()
        raise _Stop

    try:
        model.bridge.run_with_hooks(ids.to(model.device), fwd_hooks=[*(hooks or []), ("ln_final.hook_out", grab)],
                                    **kwargs)
    except _Stop:
        pass
    return grabbed["x"]


#: rows per product in :func:`unembed`: a large vocabulary's product is bound by reading W_U (one row costs about
#: as much as 13 with Gemma-3's 262,144 columns on 2 CPU cores) until some 256 rows share a read
UNEMBED_ROWS = 256


def unembed(
    model: Model, normed: Float[Tensor, "batch d_model"], columns: Int[Tensor, "batch k"] | None = None
) -> Float[Tensor, "batch k"]:
    """Logits from the final-norm output: all of them, or only ``columns`` per row; the model's final logit
    soft-capping is applied if it has one (so this equals the model's own logits). All the vocabulary is computed
    :data:`UNEMBED_ROWS` rows at a time: give it every row at once rather than a few at a time."""
    W_U, b_U = model.bridge.W_U.detach(), model.bridge.b_U.detach()
    normed = normed.to(W_U.device)
    if columns is None:
        logits = torch.cat([rows @ W_U + b_U for rows in normed.split(UNEMBED_ROWS)]) if len(normed) else normed @ W_U
    else:
        columns = columns.to(W_U.device)
        logits = torch.einsum("bd,dbk->bk", normed, W_U[:, columns]) + b_U[columns]
    cap = getattr(model.bridge.original_model.config, "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits


@torch.no_grad()
def end_logits(
    model: Model, data: TaskData, which: str = "clean", batch_size: int = 32, hooks_for: HooksFor | None = None
) -> Float[Tensor, "batch vocab"]:
    """Logits at END of the clean (or ``corrupt``) prompts, computed in batches on the model's device (unembedding
    END only), returned on the CPU; ``hooks_for(start, stop)`` gives forward hooks for each batch (an
    intervention, see :mod:`headcircuits.interventions`)."""
    normed = []
    for batch in data.batches(batch_size, which, model.device):
        hooks = [] if hooks_for is None else hooks_for(batch.start, batch.stop)
        normed.append(final_normed(model, batch.ids, hooks, batch.at("END")))
    return unembed(model, torch.cat(normed)).cpu()


#: END-only hooks for a group of prompts (their indices in the TaskData), applied to END alone: every activation
#: the hooks see has one position (attention patterns: one query row over all the prompt's positions)
EndHooks = Callable[[Tensor], list]


_RECENT: list[tuple] = []  # (model, data, key, versions, value), most recently used first
_MISSING = object()

#: the most memory :func:`recent` keeps (the bytes of the tensors' storage it holds); the least recently used
#: values are dropped first, and a value larger than this alone is not kept
RECENT_BYTES = 2**30


def forget_recent() -> None:
    """Drop every value :func:`recent` keeps (a benchmark timing a computation from scratch; memory)."""
    _RECENT.clear()


def _storage_bytes(value, seen: set) -> int:
    """Bytes of the tensor storage inside ``value`` (lists, tuples, dicts, objects' attributes), each storage
    counted once (a slice keeps its whole storage alive)."""
    if isinstance(value, Tensor):
        storage = value.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if id(value) in seen:  # a container met before
        return 0
    seen.add(id(value))
    if isinstance(value, dict):
        value = list(value.values())
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        value = list(vars(value).values())
    if isinstance(value, (list, tuple)):
        return sum(_storage_bytes(v, seen) for v in value)
    return 0


def _versions(model: Model, data: TaskData) -> tuple[int, int]:
    # changing the weights or the prompts in place bumps their tensors' version counters
    return sum(p._version for p in model.bridge.parameters()), data.clean.ids._version


def _kept(model: Model, data: TaskData, matches: Callable[[tuple], bool]):
    """The value kept for the same model and prompts (the same objects, unchanged) under a key that ``matches``
    accepts, now the most recently used; ``_MISSING`` if there is none."""
    versions = _versions(model, data)
    for i, entry in enumerate(_RECENT):
        if entry[0] is model and entry[1] is data and entry[3] == versions and matches(entry[2]):
            _RECENT.insert(0, _RECENT.pop(i))
            return entry[4]
    return _MISSING


def _keep(model: Model, data: TaskData, key: tuple, value) -> None:
    _RECENT.insert(0, (model, data, key, _versions(model, data), value))
    seen: set = set()
    sizes = [_storage_bytes(entry[4], seen) for entry in _RECENT]
    while _RECENT and sum(sizes) > RECENT_BYTES:
        _RECENT.pop()
        sizes.pop()


def recent(model: Model, data: TaskData, key: tuple, compute: Callable):
    """``compute()``, or its value from an earlier call with the same model and prompts (the same objects,
    unchanged in place) and ``key``: a clean activation that several interventions in a row start from. At most
    :data:`RECENT_BYTES` of values are kept, the least recently used dropped first."""
    value = _kept(model, data, lambda k: k == key)
    if value is _MISSING:
        value = compute()
        _keep(model, data, key, value)
    return value


def end_is_last(data: TaskData) -> bool:
    """Whether END is every prompt's last token (what the END-only engine needs: nothing after END to rerun)."""
    return bool((data.at("END") == data.clean.lengths - 1).all())


def prefix_groups(model: Model, data: TaskData, first: int, layers, *, reuse: bool = False):
    """Per group of prompts of one length: their indices, the length, END's residual stream entering block
    ``first`` ([n, 1, d_model]) and the earlier tokens' cached keys and values for ``layers``
    (:func:`headcircuits.models.blocks.prefix_pass`). END must be every prompt's last token.

    A pass kept earlier for the same prompts from the same block, whose layers include ``layers``, is used
    instead of running one (the same numbers: the blocks below a layer do not depend on how far the pass goes).
    ``reuse``: keep this call's pass in memory (:func:`recent`) for later calls on the same prompts (the
    traversals of several channels of one layer, the oracle fix on the traversal's prompts), instead of running
    it one length at a time."""
    from headcircuits.models.blocks import prefix_pass

    if not end_is_last(data):
        raise ValueError("END must be each prompt's last token for the END-only engine")
    layers = tuple(layers)
    lengths = data.clean.lengths

    def groups():
        for length in lengths.unique().tolist():
            index = (lengths == length).nonzero().flatten()
            h, prefix = prefix_pass(model, data.clean.ids[index, :length], first, layers)
            yield index, int(length), h, prefix

    kept = _kept(model, data, lambda key: key[:2] == ("prefix", first) and set(layers) <= set(key[2]))
    if kept is not _MISSING:
        yield from kept
    elif reuse:
        kept = list(groups())
        _keep(model, data, ("prefix", first, layers), kept)
        yield from kept
    else:
        yield from groups()


@torch.no_grad()
def end_only_logits(
    model: Model, data: TaskData, first: int, conditions: list[EndHooks | None],
    columns: Int[Tensor, "batch k"] | None = None,
) -> list[Float[Tensor, "batch vocab_or_k"]]:
    """END's logits under each of several interventions that change END's computation only, from block ``first``
    up (e.g. forcing a head's attention at END, setting its output at END): each prompt's earlier tokens run once,
    then END alone goes from block ``first`` to the unembedding once per condition, over the cached keys and
    values of the earlier tokens (a pass kept for the same prompts that covers these layers is used: see
    :func:`prefix_groups`). Exact (tested equal to :func:`end_logits` with the same intervention on every tiny
    family); a condition of ``None`` gives the unedited logits. Returned on the CPU, in the data's order.
    ``columns``: only these logits of each prompt (e.g. :func:`candidates_of`; a padding -1 gives the first
    token's, which :func:`candidate_correct` ignores), instead of the whole vocabulary."""
    from headcircuits.models.blocks import final_norm, run_blocks

    if columns is not None and (columns.ndim != 2 or len(columns) != len(data)):
        raise ValueError(f"columns must be [prompts, k] with one row per prompt ({len(data)}), "
                         f"not {tuple(columns.shape)}")
    layers = range(first, model.facts.n_layers)
    normed: list[list[Tensor]] = [[] for _ in conditions]
    order = []
    for index, length, h, prefix in prefix_groups(model, data, first, layers):
        order.append(index)
        for kept, hooks_of in zip(normed, conditions):
            with model.bridge.hooks(fwd_hooks=hooks_of(index) if hooks_of else []):
                h_end = run_blocks(model, h, layers, prefix, length - 1)
            kept.append(final_norm(model, h_end)[:, 0])
    # the unembedding takes every condition's rows together, UNEMBED_ROWS at a time (a group of one length is
    # often a few prompts), each chunk written straight to its rows of the output
    n, index = len(data), torch.cat(order)
    target = torch.cat([c * n + index for c in range(len(conditions))])
    rows = torch.cat([torch.cat(r) for r in normed])
    out = torch.zeros(len(conditions) * n, model.facts.d_vocab if columns is None else columns.shape[1])
    for start in range(0, len(rows), UNEMBED_ROWS):
        chunk = slice(start, start + UNEMBED_ROWS)
        picked = None if columns is None else columns[target[chunk] % n].clamp(min=0)
        out[target[chunk]] = unembed(model, rows[chunk], picked).float().cpu()
    return list(out.split(n))


def candidates_of(data: TaskData) -> Int[Tensor, "batch cand"]:
    """Each prompt's listed candidates (padded with -1), or its answer and distractor if the task lists none."""
    return data.candidates if data.candidates is not None else torch.stack([data.answer, data.distractor], 1)


def candidate_logits(end_logits: Float[Tensor, "batch vocab"], candidates: Int[Tensor, "batch cand"]) -> Float[Tensor, "batch cand"]:
    """Logits of each prompt's listed candidates; padding (-1) gets -inf."""
    picked = end_logits.gather(1, candidates.clamp(min=0))
    return picked.masked_fill(candidates < 0, float("-inf"))


def candidate_correct(data: TaskData, logits: Float[Tensor, "batch cand"]) -> Bool[Tensor, " batch"]:
    """Whether each prompt's answer is the top one among its candidates (:func:`evaluate`'s ``candidate_correct``),
    from the logits of its candidate columns only (:func:`candidates_of`; e.g. :func:`end_only_logits` with
    those ``columns``): the padding's logits are ignored."""
    cands = candidates_of(data)
    if logits.shape != cands.shape:
        raise ValueError(f"logits must be the candidates' ({tuple(cands.shape)}), not {tuple(logits.shape)}; "
                         "for the whole vocabulary's logits use evaluate(model, data, logits=...)")
    choice = logits.masked_fill(cands < 0, float("-inf")).argmax(-1)
    return (cands == data.answer[:, None])[torch.arange(len(data)), choice]


def evaluate(
    model: Model, data: TaskData, batch_size: int = 32, hooks_for: HooksFor | None = None, *, cache_as=None,
    logits: Float[Tensor, "batch vocab"] | None = None,
) -> pd.DataFrame:
    """One row per clean prompt, joined with its metadata:

    * ``logit_diff``: logit(answer) - logit(distractor) at END (the dataset's distractor: IOI's S, the
      counterfactual's answer for Colored Objects and Laundry List);
    * ``margin``: logit(answer) minus the best other listed candidate (> 0 iff correct among the candidates);
    * ``top1_correct``: the answer is the top token over the whole vocabulary;
    * ``candidate_correct``: the answer is the top token among the listed candidates;
    * ``beats_distractor``: ``logit_diff > 0``; ``prediction``: the model's top token; ``candidate_choice``: the
      index of the candidate it prefers (for "which wrong item does it pick?").

    ``hooks_for`` runs the prompts under an intervention (see :func:`end_logits`). ``cache_as`` stores the table on
    disk (:func:`headcircuits.cache.cached`) under the model, the prompts and ``cache_as``, which must describe the
    intervention completely (e.g. the intervention object itself, or ``"none"``): hooks cannot be fingerprinted.
    ``logits``: END logits computed elsewhere (e.g. :func:`headcircuits.channels.end_logits_under`), scored the same way.
    """
    if logits is not None and (hooks_for is not None or cache_as is not None):
        raise ValueError("pass either logits or an intervention (hooks_for / cache_as), not both")
    if cache_as is not None:
        from headcircuits.cache import cached

        return cached("evaluate", {"model": model, "data": data, "intervention": cache_as},
                      lambda: evaluate(model, data, batch_size, hooks_for))
    if logits is None:
        logits = end_logits(model, data, batch_size=batch_size, hooks_for=hooks_for)
    ld = logit_difference(logits, data.answer, data.distractor)
    top = logits.argmax(-1)
    cands = candidates_of(data)
    cand_logits = candidate_logits(logits, cands)
    is_answer = cands == data.answer[:, None]
    best_other = cand_logits.masked_fill(is_answer, float("-inf")).max(-1).values
    answer_logit = logits[torch.arange(len(data)), data.answer]
    choice = cand_logits.argmax(-1)
    return data.meta.assign(
        prompt=data.clean_text,
        logit_diff=ld.numpy(),
        margin=(answer_logit - best_other).numpy(),
        top1_correct=(top == data.answer).numpy(),
        candidate_correct=candidate_correct(data, cand_logits).numpy(),
        beats_distractor=(ld > 0).numpy(),
        prediction=model.to_str_tokens(top),
        candidate_choice=choice.numpy(),
    )


def summarise(table: pd.DataFrame) -> dict[str, float]:
    """Mean and spread of the logit difference, and the accuracies, over a whole :func:`evaluate` table."""
    summary = breakdown(table, by=[]).iloc[0].to_dict()
    summary["n"] = int(summary["n"])  # a row of a numeric frame comes back as floats
    return summary


def breakdown(table: pd.DataFrame, by: str | list[str]) -> pd.DataFrame:
    """Accuracy and logit difference per group (template, order, list length, target position, ...), with the
    standard error of each accuracy (binomial) so error bars can be drawn."""
    by = [by] if isinstance(by, str) else list(by)
    groups = table.groupby(by, sort=True) if by else [((), table)]
    rows = []
    for key, g in groups:
        n = len(g)
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        for col in ("top1_correct", "candidate_correct", "beats_distractor"):
            p = float(g[col].mean())
            row[col.replace("_correct", "_accuracy")] = p
            row[col.replace("_correct", "_accuracy") + "_sem"] = (p * (1 - p) / n) ** 0.5 if n > 1 else 0.0
        row.update(
            n=n,
            logit_diff_mean=float(g.logit_diff.mean()),
            logit_diff_std=float(g.logit_diff.std(ddof=1)) if n > 1 else 0.0,
            margin_mean=float(g.margin.mean()),
        )
        rows.append(row)
    return pd.DataFrame(rows)


@torch.no_grad()
def attention_between(
    model: Model, data: TaskData, query: str = "END", key: str = "IO", batch_size: int = 32
) -> Float[Tensor, "layer head"]:
    """Mean attention probability from each prompt's ``query`` position to its ``key`` position, per head.

    E.g. ``query='END', key='IO'`` finds heads that attend to the indirect object at the last token, the
    signature of Wang et al.'s name mover heads. Grouped K/V heads are reported per query head.
    """
    return attention_between_pairs(model, data, [(query, key)], batch_size)[(query, key)]


@torch.no_grad()
def attention_between_pairs(
    model: Model, data: TaskData, pairs: list[tuple[str, str]], batch_size: int = 32
) -> dict[tuple[str, str], Float[Tensor, "layer head"]]:
    """:func:`attention_between` for several (query, key) position pairs from one pass over the prompts."""
    n_layers, n_heads = model.facts.n_layers, model.facts.n_heads
    totals = {pair: torch.zeros(n_layers, n_heads, device=model.device) for pair in pairs}
    for batch in data.batches(batch_size, device=model.device):
        cache = recorded(model, batch.ids, [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)])
        for layer in range(n_layers):
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # [batch, head, query, key]
            for (query, key), total in totals.items():
                total[layer] += pattern[batch.rows, :, batch.at(query), batch.at(key)].sum(0)
    return {pair: (total / len(data)).cpu() for pair, total in totals.items()}
