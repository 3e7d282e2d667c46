"""`TaskData`: the one object every experiment accepts (patching, SVD scores, interventions, evaluation).

A generator turns a model (for its tokenizer and BOS rule) and a seed into clean prompts, counterfactual prompts,
answer / distractor token ids and named per-example token positions. Positions are per example: prompts in a batch
differ in length, so "END" is each prompt's own last token, never a fixed index -1 (in a right-padded batch index -1
is a pad token for every shorter prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal, Sequence

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from headcircuits.errors import VocabularyError
from headcircuits.models.core import Model, Tokens


@dataclass
class TaskData:
    """Clean and counterfactual prompts of one task, tokenised for one model.

    Attributes:
        task: task name (``ioi``, ``colored_objects``, ``laundry_list``).
        clean_text / corrupt_text: the prompts as strings (``corrupt`` = the counterfactual of the papers).
        clean / corrupt: right-padded token batches (see :class:`~headcircuits.models.core.Tokens`).
        answer: the correct next token of each clean prompt (IOI: the indirect object).
        distractor: the competing token (IOI: the subject) for logit differences.
        positions: named per-example positions in the clean prompts (``END`` always present).
        meta: one row per prompt (template id, order, list length, target position, seed, ...).
        candidates: the answer options listed in each prompt (IOI: IO and S; Colored Objects: the three colours
            of the queried list; Laundry List: the N items), padded with -1; for "accuracy among the candidates".
        corrupt_answer: the correct answer of each counterfactual prompt, when it has one.
    """

    task: str
    clean_text: list[str]
    corrupt_text: list[str]
    clean: Tokens
    corrupt: Tokens
    answer: Int[Tensor, " batch"]
    distractor: Int[Tensor, " batch"]
    positions: dict[str, Int[Tensor, " batch"]]
    meta: pd.DataFrame = field(default_factory=pd.DataFrame)
    candidates: Int[Tensor, "batch cand"] | None = None
    corrupt_answer: Int[Tensor, " batch"] | None = None

    def __post_init__(self) -> None:
        n = len(self.clean_text)
        sizes = {"corrupt_text": len(self.corrupt_text), "clean": self.clean.ids.shape[0],
                 "corrupt": self.corrupt.ids.shape[0], "answer": len(self.answer), "distractor": len(self.distractor),
                 **{f"positions[{k}]": len(v) for k, v in self.positions.items()}}
        wrong = {k: v for k, v in sizes.items() if v != n}
        if wrong:
            raise ValueError(f"TaskData of {n} prompts has fields of other lengths: {wrong}")
        if n == 0:
            raise ValueError("TaskData needs at least one prompt (ask the generator for n >= 1)")
        if "END" not in self.positions:
            raise ValueError("TaskData.positions must contain END")

    def tokens(self, which: Literal["clean", "corrupt"] = "clean") -> Tokens:
        """The clean or the counterfactual batch."""
        if which not in ("clean", "corrupt"):
            raise ValueError(f"which must be 'clean' or 'corrupt', not {which!r}")
        return self.clean if which == "clean" else self.corrupt

    def at(self, name: str, which: Literal["clean", "corrupt"] = "clean") -> Int[Tensor, " batch"]:
        """Each prompt's position ``name``, checked to lie inside that prompt (a position that a prompt lacks is
        stored as -1, e.g. ``ITEM_7`` of a list of 5: reading it would silently read padding, so it is refused).
        ``END`` of the counterfactual prompts is their own last token."""
        tokens = self.tokens(which)
        if name == "END" and which == "corrupt":
            return tokens.last
        if name not in self.positions:
            raise KeyError(f"position {name!r} is not in this {self.task} TaskData; it has {sorted(self.positions)}")
        pos = self.positions[name]
        bad = ((pos < 0) | (pos >= tokens.lengths)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"position {name!r} is absent (or past the end) in {len(bad)} of {len(self)} prompts (rows "
                f"{bad[:8]}{' ...' if len(bad) > 8 else ''}): select the prompts that have it first, e.g. "
                f"data.subset(data.positions[{name!r}].ge(0).nonzero().flatten())"
            )
        return pos

    def batches(
        self, batch_size: int = 32, which: Literal["clean", "corrupt"] = "clean", device: str | torch.device = "cpu",
    ) -> Iterator["Batch"]:
        """The prompts in batches of ``batch_size``, each trimmed to its own longest prompt and moved to
        ``device`` (the model's): the one way experiments run a TaskData through a model."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        tokens = self.tokens(which)
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            width = int(tokens.lengths[start:stop].max())
            yield Batch(self, which, start, stop, tokens.ids[start:stop, :width].to(device), torch.device(device))

    def subset(self, index: Sequence[int] | Tensor) -> "TaskData":
        """The prompts at ``index`` (e.g. one list length, or a held-out split), as a new TaskData."""
        idx = torch.as_tensor(index, dtype=torch.long)
        pick = lambda t: Tokens(ids=t.ids[idx], lengths=t.lengths[idx])  # noqa: E731
        return TaskData(
            task=self.task,
            clean_text=[self.clean_text[i] for i in idx.tolist()],
            corrupt_text=[self.corrupt_text[i] for i in idx.tolist()],
            clean=pick(self.clean),
            corrupt=pick(self.corrupt),
            answer=self.answer[idx],
            distractor=self.distractor[idx],
            positions={k: v[idx] for k, v in self.positions.items()},
            meta=self.meta.iloc[idx.numpy()].reset_index(drop=True),
            candidates=None if self.candidates is None else self.candidates[idx],
            corrupt_answer=None if self.corrupt_answer is None else self.corrupt_answer[idx],
        )

    def split(self, fraction: float = 0.5, seed: int = 0, by: str | None = None) -> tuple["TaskData", "TaskData"]:
        """Two disjoint parts (e.g. one to choose an intervention's scale, one held out to report it): a random
        ``fraction`` of the prompts and the rest, deterministic in ``seed``. With ``by`` (a ``meta`` column such
        as ``list_length``), each value is split separately, so both parts cover every value."""
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be strictly between 0 and 1, not {fraction}")
        gen = torch.Generator().manual_seed(seed)
        groups = [list(range(len(self)))] if by is None else [
            list(map(int, idx)) for idx in self.meta.groupby(by, sort=True).indices.values()]
        first, second = [], []
        for group in groups:
            order = [group[i] for i in torch.randperm(len(group), generator=gen).tolist()]
            cut = max(1, min(len(order) - 1, round(fraction * len(order)))) if len(order) > 1 else len(order)
            first += order[:cut]
            second += order[cut:]
        return self.subset(sorted(first)), self.subset(sorted(second))

    def __len__(self) -> int:
        return len(self.clean_text)


@dataclass(frozen=True)
class Batch:
    """Prompts ``start:stop`` of a TaskData: ``ids`` trimmed to the batch's longest prompt, on ``device``."""

    data: TaskData
    which: str
    start: int
    stop: int
    ids: Int[Tensor, "batch pos"]
    device: torch.device

    @property
    def rows(self) -> Int[Tensor, " batch"]:
        """0 .. batch-1 on the device, to index per-prompt positions: ``x[batch.rows, batch.at("END")]``."""
        return torch.arange(self.stop - self.start, device=self.device)

    def at(self, name: str) -> Int[Tensor, " batch"]:
        """This batch's positions ``name`` (validated, see :meth:`TaskData.at`), on the device."""
        return self.data.at(name, self.which)[self.start : self.stop].to(self.device)

    def gather(self, x: Tensor, name: str) -> Tensor:
        """``x[b, position_b]`` for every prompt b of the batch (``x``: [batch, pos, ...])."""
        return x[self.rows, self.at(name)]

    def __len__(self) -> int:
        return self.stop - self.start


def single_token_ids(model: Model, words: Sequence[str]) -> list[int]:
    """Ids of words that must each be one token (leading space included); one clear error listing every offender."""
    bad, ids = [], []
    for word in words:
        encoded = model.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            bad.append(word)
        else:
            ids.append(int(encoded[0]))
    if bad:
        raise VocabularyError(
            f"{len(bad)} word(s) are not single tokens for {model.name}: {bad[:10]}"
            f"{' ...' if len(bad) > 10 else ''}; filter the vocabulary with `filter_single_tokens` or pass other words"
        )
    return ids


def filter_single_tokens(model: Model, words: Sequence[str]) -> list[str]:
    """The words (leading space included) that are one token for this model, in their original order."""
    return [w for w in words if len(model.tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]


def locate(tokens: Tokens, row: int, token_id: int, occurrence: int = 0) -> int:
    """Position of the ``occurrence``-th appearance of ``token_id`` in prompt ``row`` (a clear error if absent)."""
    length = int(tokens.lengths[row])
    hits = (tokens.ids[row, :length] == token_id).nonzero().flatten().tolist()
    if len(hits) <= occurrence:
        raise VocabularyError(
            f"token {token_id} occurs {len(hits)} time(s) in prompt {row}, needed occurrence {occurrence}: the "
            f"tokenizer merged a task word with its neighbours; choose other words"
        )
    return hits[occurrence]


def as_index(values: Sequence[int]) -> Int[Tensor, " batch"]:
    return torch.tensor(list(values), dtype=torch.long)


def pad_candidates(rows: Sequence[Sequence[int]]) -> Int[Tensor, "batch cand"]:
    """Candidate ids per prompt in one tensor, padded with -1 where prompts list fewer candidates."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out


def concat(parts: Sequence[TaskData], pad_id: int) -> TaskData:
    """Several TaskData of one task (e.g. one per list length) as one, re-padded to the longest prompt with
    ``pad_id`` (``model.pad_id``); per-example positions are unchanged (right padding). A named position that
    only some parts have (Laundry List's ``ITEM_k`` beyond a shorter list) is -1 in the others, the generators'
    convention for "not in this prompt"."""
    if not parts:
        raise ValueError("nothing to concatenate")
    if len({p.task for p in parts}) != 1:
        raise ValueError(f"cannot concatenate different tasks: {sorted({p.task for p in parts})}")
    names = list(dict.fromkeys(k for p in parts for k in p.positions))

    def tokens(which: str) -> Tokens:
        batches = [getattr(p, which) for p in parts]
        width = max(t.ids.shape[1] for t in batches)
        ids = torch.cat([torch.nn.functional.pad(t.ids, (0, width - t.ids.shape[1]), value=pad_id) for t in batches])
        return Tokens(ids=ids, lengths=torch.cat([t.lengths for t in batches]))

    def cat_optional(field_name: str):
        values = [getattr(p, field_name) for p in parts]
        return None if any(v is None for v in values) else torch.cat(values)

    candidates = None
    if all(p.candidates is not None for p in parts):
        candidates = pad_candidates([row[row >= 0].tolist() for p in parts for row in p.candidates])
    return TaskData(
        task=parts[0].task,
        clean_text=[t for p in parts for t in p.clean_text],
        corrupt_text=[t for p in parts for t in p.corrupt_text],
        clean=tokens("clean"),
        corrupt=tokens("corrupt"),
        answer=torch.cat([p.answer for p in parts]),
        distractor=torch.cat([p.distractor for p in parts]),
        positions={k: torch.cat([p.positions.get(k, torch.full((len(p),), -1, dtype=torch.long)) for p in parts])
                   for k in names},
        meta=pd.concat([p.meta for p in parts], ignore_index=True),
        candidates=candidates,
        corrupt_answer=cat_optional("corrupt_answer"),
    )
