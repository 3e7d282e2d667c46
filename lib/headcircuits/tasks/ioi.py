"""Indirect Object Identification (Wang et al. 2022), the task whose circuit Circuit Reuse finds again.

"When Mary and John went to the store, John gave a drink to" -> " Mary". The subject (S, "John") is mentioned
twice (S1, S2); the indirect object (IO, "Mary") once. The model should predict IO; the logit difference
logit(IO) - logit(S) at END measures how well it does.

Templates are written in the BABA order of Wang et al. ("[B] and [A] ..., [B] gave ... to [A]", A = IO, B = S);
the ABBA variant swaps the first two names. Counterfactuals:

* ``abc``: the reference distribution of Wang et al.: IO, S1 and S2 replaced by three fresh distinct names, so
  no name is repeated and nothing identifies an indirect object;
* ``s2io``: the second subject mention replaced by the IO name (the one Circuit Reuse patches with): the
  repeated name, and so the answer, changes.
"""

from __future__ import annotations

import random
from typing import Literal

import pandas as pd
import torch

from headcircuits.errors import VocabularyError
from headcircuits.models.core import Model
from headcircuits.tasks.base import TaskData, as_index, filter_single_tokens, locate

BABA_TEMPLATES: tuple[str, ...] = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
)

NAMES: tuple[str, ...] = (
    "Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Anna", "Kate", "Paul", "Mark", "Mike", "Lisa",
    "Emma", "Sarah", "Adam", "Alex", "Ben", "Chris", "David", "Eric", "Frank", "George", "Henry", "Jack", "Jane",
    "Joe", "Laura", "Leo", "Lucy", "Max", "Nick", "Rose", "Ryan", "Sam", "Tim", "Will",
)
# Wang et al.'s places and objects (their ioi_dataset.py)
PLACES: tuple[str, ...] = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
OBJECTS: tuple[str, ...] = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")

Counterfactual = Literal["abc", "s2io"]


def _fill(template: str, io: str, s1: str, s2: str, place: str, obj: str, order: str) -> str:
    """Fill a BABA template (A = IO, first B = S1, second B = S2); ABBA swaps the two first mentions.
    The template's final " [A]" (the answer) is dropped: the prompt ends at END."""
    if not template.endswith(" [A]") or template.count("[B]") != 2:
        raise ValueError(f"an IOI template must mention [B] twice and end with ' [A]': {template!r}")
    body = template[: -len(" [A]")]
    if order == "ABBA":
        body = body.replace("[B] and [A]", "[A] and [B]", 1)
    elif order != "BABA":
        raise ValueError(f"order must be 'ABBA' or 'BABA', not {order!r}")
    body = body.replace("[B]", s1, 1).replace("[B]", s2, 1).replace("[A]", io)
    return body.replace("[PLACE]", place).replace("[OBJECT]", obj)


def generate(
    model: Model,
    n: int,
    seed: int = 0,
    *,
    counterfactual: Counterfactual = "abc",
    orders: tuple[str, ...] = ("ABBA", "BABA"),
    templates: tuple[str, ...] = BABA_TEMPLATES,
    names: tuple[str, ...] = NAMES,
) -> TaskData:
    """``n`` IOI prompts for ``model``; deterministic in ``seed`` (a local RNG, never the global one).

    Names that are not single tokens (with their leading space) for the model are left out (answers and named
    positions are single tokens); a clear error says so when too few names remain. Places and objects are used
    as they tokenise.
    """
    if int(n) < 1:
        raise ValueError(f"ask for at least one IOI prompt (n >= 1), not n={n}")
    rng = random.Random(seed)
    usable = [w[1:] for w in filter_single_tokens(model, [" " + w for w in names])]
    needed = 5 if counterfactual == "abc" else 2
    if len(usable) < needed:
        raise VocabularyError(
            f"only {len(usable)} of the {len(names)} IOI names are single tokens for {model.name}; IOI with the "
            f"{counterfactual!r} counterfactual needs at least {needed} (IO, S and fresh names): pass other `names`"
        )
    places, objects = list(PLACES), list(OBJECTS)  # not answers nor named positions: any tokenisation is fine
    clean, corrupt, rows = [], [], []
    for i in range(n):
        t_id = rng.randrange(len(templates))
        order = orders[i % len(orders)]
        io, s, *fresh = rng.sample(usable, 5 if counterfactual == "abc" else 2)
        place, obj = rng.choice(places), rng.choice(objects)
        clean.append(_fill(templates[t_id], io, s, s, place, obj, order))
        if counterfactual == "s2io":
            corrupt.append(_fill(templates[t_id], io, s, io, place, obj, order))
        elif counterfactual == "abc":
            corrupt.append(_fill(templates[t_id], *fresh, place, obj, order))
        else:
            raise ValueError(f"unknown counterfactual {counterfactual!r}; use 'abc' or 's2io'")
        rows.append(dict(template=t_id, order=order, io=io, s=s, place=place, object=obj, seed=seed))
    clean_tokens = model.to_tokens(clean)
    corrupt_tokens = model.to_tokens(corrupt)
    answer = [model.single_token_id(" " + r["io"]) for r in rows]
    distractor = [model.single_token_id(" " + r["s"]) for r in rows]
    positions: dict[str, list[int]] = {"IO": [], "S1": [], "S1+1": [], "S2": [], "END": []}
    for row, (a, d) in enumerate(zip(answer, distractor)):
        positions["IO"].append(locate(clean_tokens, row, a))
        s1 = locate(clean_tokens, row, d, 0)
        positions["S1"].append(s1)
        positions["S1+1"].append(s1 + 1)
        positions["S2"].append(locate(clean_tokens, row, d, 1))
        positions["END"].append(int(clean_tokens.last[row]))
    return TaskData(
        task="ioi",
        clean_text=clean,
        corrupt_text=corrupt,
        clean=clean_tokens,
        corrupt=corrupt_tokens,
        answer=as_index(answer),
        distractor=as_index(distractor),
        candidates=torch.stack([as_index(answer), as_index(distractor)], dim=1),
        # s2io repeats IO, so the counterfactual's indirect object is S; ABC has no repeated name, no answer
        corrupt_answer=as_index(distractor) if counterfactual == "s2io" else None,
        positions={k: as_index(v) for k, v in positions.items()},
        meta=pd.DataFrame(rows).assign(counterfactual=counterfactual),
    )
