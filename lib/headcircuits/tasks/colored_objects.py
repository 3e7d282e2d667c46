"""Colored Objects, in exactly the one-shot format of Circuit Component Reuse (Merullo et al., ICLR 2024).

    Q: On the table, I see an orange textbook, a red puzzle, and a purple cup. What color is the textbook?
    A: Orange
    Q: On the table, there is a blue pencil, a black necklace, and a yellow lighter. What color is the pencil?
    A:                                                                                     -> " Blue"

17 objects, 8 colours, 3 objects per question; the solved example (the "shot") and the query share no object and
no colour; "an" before a colour that starts with a vowel; the answer is the colour in title case with a leading
space. Counterfactual: only the queried object word of the final question changes, to another object of the same
list, and its answer is that object's colour. The format is checked byte for byte against the paper's 1,000
released prompts (tests/test_tasks_colored_objects.py).

Positions (final question): COLOR_k / OBJ_k (k = 0, 1, 2 in list order), ANSWER_COLOR / ANSWER_OBJ (the queried
pair), WRONG_COLOR_0 / WRONG_COLOR_1 (the two other colours, in list order: the tokens the repair intervention
points inhibition heads at), QUERY (the object word in "What color is the ...?", the repeated token) and END.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import pandas as pd

from headcircuits.errors import VocabularyError
from headcircuits.models.core import Model
from headcircuits.tasks.base import TaskData, as_index, filter_single_tokens, locate, pad_candidates

OBJECTS: tuple[str, ...] = (
    "ball", "bottle", "bowl", "bracelet", "cup", "envelope", "jug", "leash", "lighter", "mug", "necklace",
    "notebook", "pen", "pencil", "plate", "puzzle", "textbook",
)
COLORS: tuple[str, ...] = ("black", "blue", "brown", "green", "orange", "purple", "red", "yellow")
SURFACES: tuple[str, ...] = ("table", "desk", "floor")
PHRASES: tuple[str, ...] = ("there is", "you see", "I see")
N_OBJECTS = 3  # objects per question, as in the paper

_QUESTION = re.compile(
    r"Q: On the (?P<surface>\w+), (?P<phrase>there is|you see|I see) "
    r"(?:an?) (?P<c0>\w+) (?P<o0>\w+), (?:an?) (?P<c1>\w+) (?P<o1>\w+), and (?:an?) (?P<c2>\w+) (?P<o2>\w+)\. "
    r"What color is the (?P<asked>\w+)\?\nA:(?: (?P<answer>\w+))?"
)


@dataclass(frozen=True)
class Question:
    """One question: a surface, a phrase, three (colour, object) pairs and which object is asked about."""

    surface: str
    phrase: str
    colors: tuple[str, ...]
    objects: tuple[str, ...]
    asked: int  # index of the queried object in the list (the "target position")

    @property
    def answer(self) -> str:
        """The queried object's colour in title case, as the model should write it."""
        return self.colors[self.asked].capitalize()


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def format_question(q: Question, with_answer: bool) -> str:
    """``Q: On the ..., ... What color is the X?\\nA:`` (plus `` Colour`` for the solved example)."""
    items = [f"{_article(c)} {c} {o}" for c, o in zip(q.colors, q.objects)]
    listed = ", ".join(items[:-1]) + ", and " + items[-1]
    text = f"Q: On the {q.surface}, {q.phrase} {listed}. What color is the {q.objects[q.asked]}?\nA:"
    return text + (f" {q.answer}" if with_answer else "")


def format_prompt(shot: Question, query: Question) -> str:
    """The paper's one-shot prompt: the solved example, a newline, the query (ending with ``A:``)."""
    return format_question(shot, with_answer=True) + "\n" + format_question(query, with_answer=False)


def parse_prompt(text: str) -> tuple[Question, Question]:
    """Inverse of :func:`format_prompt` (used to check the format against the paper's released prompts)."""
    matches = list(_QUESTION.finditer(text))
    if len(matches) != 2 or matches[0].start() != 0 or matches[1].end() != len(text):
        raise ValueError(f"not a Colored Objects prompt in the paper's format: {text!r}")
    out = []
    for m in matches:
        objects = (m["o0"], m["o1"], m["o2"])
        out.append(Question(m["surface"], m["phrase"], (m["c0"], m["c1"], m["c2"]), objects, objects.index(m["asked"])))
    return out[0], out[1]


def sample_pair(rng: random.Random, objects: list[str], colors: list[str]) -> tuple[Question, Question, int]:
    """A shot and a query with six distinct objects and six distinct colours, and the counterfactual's asked index."""
    objs = rng.sample(objects, 2 * N_OBJECTS)
    cols = rng.sample(colors, 2 * N_OBJECTS)
    shot = Question(rng.choice(SURFACES), rng.choice(PHRASES), tuple(cols[:3]), tuple(objs[:3]), rng.randrange(3))
    query = Question(rng.choice(SURFACES), rng.choice(PHRASES), tuple(cols[3:]), tuple(objs[3:]), rng.randrange(3))
    cf_asked = rng.choice([i for i in range(N_OBJECTS) if i != query.asked])
    return shot, query, cf_asked


def _usable(model: Model, words: tuple[str, ...], title: bool, on_multi_token: str) -> tuple[list[str], list[str]]:
    ok = set(w[1:] for w in filter_single_tokens(model, [" " + w for w in words]))
    if title:  # answers are written in title case
        ok &= set(w[1:].lower() for w in filter_single_tokens(model, [" " + w.capitalize() for w in words]))
    dropped = [w for w in words if w not in ok]
    if dropped and on_multi_token == "error":
        raise VocabularyError(
            f"{dropped} are not single tokens for {model.name} (with a leading space"
            f"{', also in title case' if title else ''}); use on_multi_token='filter' or other words"
        )
    return [w for w in words if w in ok], dropped


def build(model: Model, pairs: list[tuple[Question, Question, int]], seed: int | None = None) -> TaskData:
    """TaskData from explicit (shot, query, counterfactual asked index) triples, e.g. the paper's own prompts."""
    clean = [format_prompt(s, q) for s, q, _ in pairs]
    corrupt = [format_prompt(s, replace(q, asked=cf)) for s, q, cf in pairs]
    tokens, cf_tokens = model.to_tokens(clean), model.to_tokens(corrupt)
    answer, distractor, candidates, rows = [], [], [], []
    positions: dict[str, list[int]] = {"END": [], "QUERY": [], "ANSWER_COLOR": [], "ANSWER_OBJ": [],
                                       **{f"{kind}_{k}": [] for kind in ("COLOR", "OBJ") for k in range(N_OBJECTS)},
                                       **{f"WRONG_COLOR_{k}": [] for k in range(N_OBJECTS - 1)}}
    for row, (shot, query, cf) in enumerate(pairs):
        title_ids = [model.single_token_id(" " + c.capitalize()) for c in query.colors]
        answer.append(title_ids[query.asked])
        distractor.append(title_ids[cf])
        candidates.append(title_ids)
        for k in range(N_OBJECTS):
            positions[f"COLOR_{k}"].append(locate(tokens, row, model.single_token_id(" " + query.colors[k])))
            positions[f"OBJ_{k}"].append(locate(tokens, row, model.single_token_id(" " + query.objects[k])))
        asked_id = model.single_token_id(" " + query.objects[query.asked])
        positions["QUERY"].append(locate(tokens, row, asked_id, occurrence=1))
        positions["ANSWER_COLOR"].append(positions[f"COLOR_{query.asked}"][row])
        positions["ANSWER_OBJ"].append(positions[f"OBJ_{query.asked}"][row])
        wrong = [k for k in range(N_OBJECTS) if k != query.asked]
        for j, k in enumerate(wrong):
            positions[f"WRONG_COLOR_{j}"].append(positions[f"COLOR_{k}"][row])
        positions["END"].append(int(tokens.last[row]))
        rows.append(dict(
            target_position=query.asked, counterfactual_position=cf, shot_position=shot.asked,
            surface=query.surface, phrase=query.phrase, answer=query.answer,
            colors=" ".join(query.colors), objects=" ".join(query.objects), seed=seed,
        ))
    return TaskData(
        task="colored_objects",
        clean_text=clean,
        corrupt_text=corrupt,
        clean=tokens,
        corrupt=cf_tokens,
        answer=as_index(answer),
        distractor=as_index(distractor),
        positions={k: as_index(v) for k, v in positions.items()},
        meta=pd.DataFrame(rows),
        candidates=pad_candidates(candidates),
        corrupt_answer=as_index(distractor),
    )


PAPER_DATA = Path(__file__).resolve().parents[1] / "data" / "circuit_reuse"


def paper_prompts() -> list[tuple[Question, Question, int]]:
    """The 1,000 (shot, query, counterfactual asked index) triples released with Circuit Component Reuse
    (shipped in ``headcircuits/data/circuit_reuse``, MIT licence), checked against their labels."""
    clean = json.loads((PAPER_DATA / "cobjs_data_42.json").read_text())
    counterfactual = json.loads((PAPER_DATA / "cobjs_mindiff_data_42.json").read_text())
    triples = []
    for (prompt, label), (cf_prompt, cf_label) in zip(clean, counterfactual, strict=True):
        shot, query = parse_prompt(prompt)
        cf_shot, cf_query = parse_prompt(cf_prompt)
        if label != " " + query.answer or cf_label != " " + cf_query.answer or cf_shot != shot:
            raise ValueError(f"the released prompt pair does not match its labels: {prompt!r}")
        triples.append((shot, query, cf_query.asked))
    return triples


def from_paper(
    model: Model, n: int | None = None, *, on_multi_token: Literal["filter", "error"] = "filter"
) -> TaskData:
    """TaskData of the paper's own released prompts (the first ``n``, default all 1,000), in their order.

    Every word of them is a single token for GPT-2. For another tokenizer, a prompt whose final question names a
    word that is not one token (its colours and objects are answers and named positions) is left out
    (``'filter'``; the count and the words are in ``data.meta.attrs``) or refused (``'error'``)."""
    triples = paper_prompts()
    if n is not None:
        if not 1 <= n <= len(triples):
            raise ValueError(f"the paper released {len(triples)} prompts; ask for 1 to {len(triples)}, not {n}")
        triples = triples[:n]
    objects, dropped_o = _usable(model, OBJECTS, title=False, on_multi_token=on_multi_token)
    colors, dropped_c = _usable(model, COLORS, title=True, on_multi_token=on_multi_token)
    keep = [t for t in triples if set(t[1].objects) <= set(objects) and set(t[1].colors) <= set(colors)]
    if not keep:
        raise VocabularyError(f"no released prompt's final question is single tokens for {model.name} "
                              f"(multi-token words: {dropped_o + dropped_c})")
    data = build(model, keep, seed=None)
    data.meta["source"] = "paper"
    data.meta.attrs.update(dropped_words=dropped_o + dropped_c, dropped_prompts=len(triples) - len(keep))
    return data


def generate(
    model: Model,
    n: int,
    seed: int = 0,
    *,
    objects: tuple[str, ...] = OBJECTS,
    colors: tuple[str, ...] = COLORS,
    on_multi_token: Literal["filter", "error"] = "filter",
) -> TaskData:
    """``n`` Colored Objects prompts in the paper's format, deterministic in ``seed`` (a local RNG).

    Objects and colours that are not single tokens for the model (colours: both lower case and title case) are
    left out (``on_multi_token='filter'``, recorded in ``data.meta.attrs['dropped_words']``) or refused
    (``'error'``); either way no prompt has a multi-token answer. At least 6 objects and 6 colours must remain.
    """
    if int(n) < 1:
        raise ValueError(f"ask for at least one Colored Objects prompt (n >= 1), not n={n}")
    usable_objects, dropped_o = _usable(model, objects, title=False, on_multi_token=on_multi_token)
    usable_colors, dropped_c = _usable(model, colors, title=True, on_multi_token=on_multi_token)
    if len(usable_objects) < 2 * N_OBJECTS or len(usable_colors) < 2 * N_OBJECTS:
        raise VocabularyError(
            f"Colored Objects needs 6 single-token objects and 6 single-token colours (shot and query share none); "
            f"{model.name} has {len(usable_objects)} objects and {len(usable_colors)} colours: pass more words"
        )
    rng = random.Random(seed)
    data = build(model, [sample_pair(rng, usable_objects, usable_colors) for _ in range(n)], seed=seed)
    data.meta.attrs["dropped_words"] = dropped_o + dropped_c
    return data
