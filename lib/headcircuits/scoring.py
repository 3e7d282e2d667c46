"""Behavioural scores of the papers, read at each prompt's own END position, and attention statistics.

* logit difference: logit(answer) - logit(distractor) at END (Wang et al.'s IOI metric; invariant to adding a
  constant to all logits, so it is the same with or without TransformerLens' logit centring);
* accuracy: how often the answer is the top-1 token over the whole vocabulary, how often it is the top one among
  the candidates the prompt lists, and how often it beats the distractor (Wang et al. report IO > S 99.3 % of
  the time for GPT-2 small);
* attention: a head's attention probability from one named position to others (e.g. END -> IO, the signature of
  Wang et al.'s name movers).

Every run goes through :func:`headcircuits.engine.run`; an intervention is a list of :mod:`headcircuits.edits`.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from headcircuits import engine, spread
from headcircuits.cache import on_disk
from headcircuits.edits import Edit
from headcircuits.engine import Read
from headcircuits.models.core import Head, Model
from headcircuits.tasks.base import TaskData


def logit_difference(
    end_logits: Float[Tensor, "batch vocab"], answer: Int[Tensor, " batch"], distractor: Int[Tensor, " batch"]
) -> Float[Tensor, " batch"]:
    """logit(answer) - logit(distractor), per prompt (on the logits' device).

    Args:
        end_logits: each prompt's logits at END.
        answer: the answer's token id per prompt (IOI: the indirect object).
        distractor: the competing token id per prompt (IOI: the subject).

    Returns:
        The logit difference per prompt.
    """
    rows = torch.arange(end_logits.shape[0], device=end_logits.device)
    return end_logits[rows, answer.to(end_logits.device)] - end_logits[rows, distractor.to(end_logits.device)]


def candidates_of(data: TaskData) -> Int[Tensor, "batch cand"]:
    """Each prompt's listed candidates (padded with -1), or its answer and distractor if the task lists none.

    Args:
        data: the prompts.

    Returns:
        ``[batch, candidates]`` token ids.
    """
    return data.candidates if data.candidates is not None else torch.stack([data.answer, data.distractor], 1)


def candidate_logits(end_logits: Float[Tensor, "batch vocab"], candidates: Int[Tensor, "batch cand"]
                     ) -> Float[Tensor, "batch cand"]:
    """Logits of each prompt's listed candidates; padding (-1) gets -inf.

    Args:
        end_logits: ``[batch, vocab]``.
        candidates: ``[batch, candidates]`` (:func:`candidates_of`).

    Returns:
        ``[batch, candidates]``; padding gets -inf.
    """
    picked = end_logits.gather(1, candidates.clamp(min=0))
    return picked.masked_fill(candidates < 0, float("-inf"))


def candidate_correct(data: TaskData, logits: Float[Tensor, "batch cand"]) -> Bool[Tensor, " batch"]:
    """Whether each prompt's answer is the top one among its candidates (:func:`evaluate`'s ``candidate_correct``),
    from the logits of its candidate columns only (:func:`candidates_of`, e.g. ``engine.run(..., logits=
    candidates_of(data))``): the padding's logits are ignored.

    Args:
        data: the prompts.
        logits: ``[batch, candidates]``, the logits of :func:`candidates_of`'s columns.

    Returns:
        True where the answer wins among the listed candidates.
    """
    cands = candidates_of(data)
    if logits.shape != cands.shape:
        raise ValueError(f"logits must be the candidates' ({tuple(cands.shape)}), not {tuple(logits.shape)}; "
                         "for the whole vocabulary's logits use evaluate(model, data, logits=...)")
    choice = logits.masked_fill(cands < 0, float("-inf")).argmax(-1)
    return (cands == data.answer[:, None])[torch.arange(len(data)), choice]


def end_logits(model: Model, data: TaskData, edits: Sequence[Edit] = (), which: str = "clean"
               ) -> Float[Tensor, "batch vocab"]:
    """The logits at END of the clean (or ``corrupt``) prompts, under ``edits`` (none: the model as it is), on the
    CPU (:func:`headcircuits.engine.run`).

    Args:
        model: the model.
        data: the prompts.
        edits: an intervention (none: the model as it is).
        which: ``clean`` or ``corrupt`` prompts.

    Returns:
        ``[batch, vocab]`` on the CPU.
    """
    return engine.run(model, data, [list(edits)], logits="end", which=which)[0].logits


@on_disk("evaluate", enabled_by="cache")
def evaluate(
    model: Model, data: TaskData, edits: Sequence[Edit] = (), *, logits: Float[Tensor, "batch vocab"] | None = None,
    cache: bool = False,
) -> pd.DataFrame:
    """One row per clean prompt, joined with its metadata.

    Args:
        model: the model.
        data: the prompts.
        edits: an intervention to run the prompts under (none: the model as it is).
        logits: END logits computed elsewhere (e.g. one condition of :func:`headcircuits.engine.run`), scored the
            same way instead of running the model.
        cache: keep the table in the results cache (:func:`headcircuits.cache.on_disk`), keyed by every argument.

    Returns:
        A table with ``logit_diff`` (logit(answer) - logit(distractor) at END: IOI's S, the counterfactual's
        answer for Colored Objects and Laundry List), ``margin`` (logit(answer) minus the best other listed
        candidate: > 0 iff correct among the candidates), ``top1_correct`` (the answer is the top token over the
        whole vocabulary), ``candidate_correct`` (the top one among the listed candidates), ``beats_distractor``,
        ``prediction`` (the model's top token) and ``candidate_choice`` (the index of the candidate it prefers).
    """
    if logits is not None and edits:
        raise ValueError("pass either logits or edits, not both")
    if logits is None:  # prompts in pieces (a sweep: spread over a cluster when one is set)
        parts = spread.sweep("evaluate", _evaluated, model, spread.ranges(len(data), PROMPTS_PER_PIECE), data=data,
                             edits=list(edits))
        return pd.concat(parts) if len(parts) > 1 else parts[0]
    return _table(model, data, logits)


PROMPTS_PER_PIECE = 500  # ours: prompts per piece of a sweep that runs the model on every prompt (the book's: one)


def _evaluated(model: Model, rows: range, *, data: TaskData, edits: list[Edit]) -> pd.DataFrame:
    """One piece of :func:`evaluate`: the table of the prompts ``rows`` (indexed as in ``data``)."""
    part = spread.rows_of(data, rows)
    table = _table(model, part, end_logits(model, part, edits))
    if part is not data:
        table.index = data.meta.index[rows.start:rows.stop]
    return table


def _table(model: Model, data: TaskData, logits: Float[Tensor, "batch vocab"]) -> pd.DataFrame:
    ld = logit_difference(logits, data.answer, data.distractor)
    top = logits.argmax(-1)
    cands = candidates_of(data)
    cand_logits = candidate_logits(logits, cands)
    is_answer = cands == data.answer[:, None]
    best_other = cand_logits.masked_fill(is_answer, float("-inf")).max(-1).values
    answer_logit = logits[torch.arange(len(data)), data.answer]
    return data.meta.assign(
        prompt=data.clean_text,
        logit_diff=ld.numpy(),
        margin=(answer_logit - best_other).numpy(),
        top1_correct=(top == data.answer).numpy(),
        candidate_correct=candidate_correct(data, cand_logits).numpy(),
        beats_distractor=(ld > 0).numpy(),
        prediction=model.to_str_tokens(top),
        candidate_choice=cand_logits.argmax(-1).numpy(),
    )


def summarise(table: pd.DataFrame) -> dict[str, float]:
    """Mean and spread of the logit difference, and the accuracies, over a whole :func:`evaluate` table.

    Args:
        table: an :func:`evaluate` table.

    Returns:
        ``{n, logit_diff_mean, top1_accuracy, candidate_accuracy, ...}``.
    """
    summary = breakdown(table, by=[]).iloc[0].to_dict()
    summary["n"] = int(summary["n"])  # a row of a numeric frame comes back as floats
    return summary


def breakdown(table: pd.DataFrame, by: str | list[str]) -> pd.DataFrame:
    """Accuracy and logit difference per group (template, order, list length, target position, ...), with the
    standard error of each accuracy (binomial) so error bars can be drawn.

    Args:
        table: an :func:`evaluate` table.
        by: a column or columns of it.

    Returns:
        One row per group: accuracies, their standard errors, ``n``, the logit difference's mean and spread.
    """
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


def attention(
    model: Model, data: TaskData, head: Head, query: str, keys: Sequence[str], edits: Sequence[Edit] = (),
) -> Float[Tensor, "batch n_keys"]:
    """``head``'s attention probability from ``query`` to each of ``keys``, per prompt, under ``edits`` (e.g. a
    weight edit). The engine starts at the lowest edited block (or the head's own), from the kept clean residual
    entering it, and stops at the head's pattern.

    Args:
        model: the model.
        data: the prompts.
        head: ``(layer, head)``.
        query: the named position attending (e.g. ``"END"``).
        keys: the named positions attended to (e.g. ``["IO", "S1"]``).
        edits: an intervention in the same run.

    Returns:
        ``[batch, len(keys)]`` on the CPU.
    """
    layer, index = head
    read = Read("pattern", layer, at=query, head=index, keys=tuple(keys))
    return engine.run(model, data, [list(edits)], read=[read])[0][read]


def attention_between(model: Model, data: TaskData, query: str = "END", key: str = "IO") -> Float[Tensor, "layer head"]:
    """Mean attention probability from each prompt's ``query`` position to its ``key`` position, per head.

    E.g. ``query='END', key='IO'`` finds heads that attend to the indirect object at the last token, the
    signature of Wang et al.'s name mover heads. Grouped K/V heads are reported per query head.

    Args:
        model: the model.
        data: the prompts.
        query: the position attending.
        key: the position attended to.

    Returns:
        ``[layer, head]`` mean attention probabilities, on the CPU.
    """
    return attention_between_pairs(model, data, [(query, key)])[(query, key)]


def attention_between_pairs(
    model: Model, data: TaskData, pairs: list[tuple[str, str]]
) -> dict[tuple[str, str], Float[Tensor, "layer head"]]:
    """:func:`attention_between` for several (query, key) position pairs from one pass over the prompts.

    Args:
        model: the model.
        data: the prompts.
        pairs: ``(query, key)`` position names.

    Returns:
        ``{(query, key): [layer, head]}``, on the CPU.
    """
    queries = list(dict.fromkeys(q for q, _ in pairs))
    keys_of = {q: tuple(dict.fromkeys(k for q2, k in pairs if q2 == q)) for q in queries}
    reads = {(q, l): Read("pattern", l, at=q, keys=keys_of[q]) for q in queries for l in range(model.facts.n_layers)}
    result = engine.run(model, data, read=list(reads.values()))[0]
    out = {}
    for q, k in pairs:
        column = keys_of[q].index(k)
        out[(q, k)] = torch.stack([result[reads[(q, l)]][:, :, column].mean(0) for l in range(model.facts.n_layers)])
    return out
