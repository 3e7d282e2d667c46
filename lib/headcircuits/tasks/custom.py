"""Your own task: a :class:`~headcircuits.tasks.base.TaskData` from prompts you write.

Mark each word whose position an experiment needs as ``{NAME:word}`` in the clean prompt, e.g.
``"When{IO: Mary} and{S1: John} went to the store,{S2: John} gave a drink to"`` (write the word's leading space
inside the braces, as the tokenizer sees it). Each marked word must be exactly one token in its place; its
position is found by tokenising the text up to and including it, so BOS (per model) and merges with neighbours
are accounted for. ``END`` (each prompt's last token) is always added. The counterfactual prompt is plain text
(marks in it are allowed and only removed); for path patching it must have the clean prompt's token length.

Everything the generators check is checked here, with errors that name the prompt and the fix: answers and
distractors are single tokens, every prompt marks the same names, marks are well formed and single tokens.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

import pandas as pd

from headcircuits.errors import VocabularyError
from headcircuits.models.core import Model
from headcircuits.tasks.base import TaskData, as_index, pad_candidates

MARK = re.compile(r"\{([A-Za-z_][A-Za-z0-9_+\-]*):([^{}]+)\}")


def strip_marks(text: str) -> str:
    """The prompt without its marks: ``"to{IO: Mary}"`` -> ``"to Mary"``."""
    plain = MARK.sub(lambda m: m.group(2), text)
    if "{" in plain or "}" in plain:
        raise ValueError(f"a brace that is not a well-formed mark {{NAME:word}} in {text!r}")
    return plain


def marked_positions(model: Model, text: str) -> dict[str, int]:
    """The token position of each marked word of ``text`` (see the module docstring), with ``END``."""
    full = model.encode(strip_marks(text))
    positions: dict[str, int] = {}
    prefix, last = "", 0
    for m in MARK.finditer(text):
        name, word = m.group(1), m.group(2)
        if name in positions or name == "END":
            raise ValueError(f"the mark {name!r} appears twice (or is END, which is added) in {text!r}")
        prefix += strip_marks(text[last:m.start()])
        before, upto = model.encode(prefix), model.encode(prefix + word)
        if len(upto) != len(before) + 1 or upto[:-1] != before:
            same = next((i for i, (a, b) in enumerate(zip(before, upto)) if a != b), min(len(before), len(upto)))
            raise VocabularyError(
                f"the marked word {word!r} ({name}) is not one token in its place in {strip_marks(text)!r} for "
                f"{model.name} (there it tokenises as {model.to_str_tokens(upto[same:])}); mark a word that is a "
                f"single token with its leading space, e.g. {{{name}: Mary}}")
        if full[: len(upto)] != upto:
            raise VocabularyError(
                f"the marked word {word!r} ({name}) merges with the text after it in {strip_marks(text)!r} for "
                f"{model.name}; put a space or punctuation after it")
        positions[name] = len(upto) - 1
        prefix += word
        last = m.end()
    positions["END"] = len(full) - 1
    return positions


def from_prompts(
    model: Model,
    clean: Sequence[str],
    corrupt: Sequence[str],
    answer: Sequence[str],
    distractor: Sequence[str],
    *,
    task: str = "custom",
    candidates: Sequence[Sequence[str]] | None = None,
    corrupt_answer: Sequence[str] | None = None,
    meta: pd.DataFrame | Iterable[Mapping] | None = None,
) -> TaskData:
    """A TaskData from your prompts: ``clean`` (with marked words), their counterfactuals ``corrupt``, the
    correct next token ``answer`` and the competing one ``distractor`` of each clean prompt (single tokens, e.g.
    ``" Mary"``); optional answer ``candidates`` per prompt, the counterfactuals' own answers, and ``meta`` rows.
    The result works with every experiment (evaluation, path patching, discovery with your own ``Stage``s)."""
    n = len(clean)
    if n == 0:
        raise ValueError("from_prompts needs at least one prompt")
    lengths = {"corrupt": len(corrupt), "answer": len(answer), "distractor": len(distractor)}
    lengths |= {"candidates": len(candidates)} if candidates is not None else {}
    lengths |= {"corrupt_answer": len(corrupt_answer)} if corrupt_answer is not None else {}
    wrong = {k: v for k, v in lengths.items() if v != n}
    if wrong:
        raise ValueError(f"{n} clean prompts but {wrong}: give one of each per prompt")
    found = [marked_positions(model, text) for text in clean]
    names = list(found[0])
    for row, pos in enumerate(found):
        if set(pos) != set(names):
            raise ValueError(f"prompt {row} marks {sorted(set(pos) - {'END'})} but prompt 0 marks "
                             f"{sorted(set(names) - {'END'})}: mark the same names in every prompt")
    clean_text = [strip_marks(t) for t in clean]
    corrupt_text = [strip_marks(t) for t in corrupt]

    def ids(words: Sequence[str], what: str) -> list[int]:
        out = []
        for row, word in enumerate(words):
            try:
                out.append(model.single_token_id(word))
            except VocabularyError as err:
                raise VocabularyError(f"{what} of prompt {row}: {err}") from None
        return out

    rows = [dict(r) for r in meta] if meta is not None and not isinstance(meta, pd.DataFrame) else None
    table = meta.reset_index(drop=True) if isinstance(meta, pd.DataFrame) else pd.DataFrame(rows or [{}] * n)
    if len(table) != n:
        raise ValueError(f"meta has {len(table)} rows for {n} prompts")
    return TaskData(
        task=task,
        clean_text=clean_text,
        corrupt_text=corrupt_text,
        clean=model.to_tokens(clean_text),
        corrupt=model.to_tokens(corrupt_text),
        answer=as_index(ids(answer, "the answer")),
        distractor=as_index(ids(distractor, "the distractor")),
        positions={name: as_index([pos[name] for pos in found]) for name in names},
        meta=table,
        candidates=None if candidates is None else pad_candidates([ids(c, "a candidate") for c in candidates]),
        corrupt_answer=None if corrupt_answer is None else as_index(ids(corrupt_answer, "the counterfactual answer")),
    )


def same_length_report(data: TaskData) -> pd.DataFrame:
    """The prompts whose counterfactual has another token length than the clean prompt (path patching compares
    them position by position and refuses such prompts): row, both lengths and both texts. Empty when all agree."""
    differ = (data.clean.lengths != data.corrupt.lengths).nonzero().flatten().tolist()
    return pd.DataFrame([{"row": i, "clean tokens": int(data.clean.lengths[i]), "corrupt tokens": int(data.corrupt.lengths[i]),
                          "clean": data.clean_text[i], "corrupt": data.corrupt_text[i]} for i in differ])


__all__ = ["from_prompts", "marked_positions", "same_length_report", "strip_marks"]
