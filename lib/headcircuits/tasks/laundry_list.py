"""Laundry List: recall the one item of a list not yet named (Talking Heads, Merullo et al., NeurIPS 2024, §5.1, App. F).

**The paper's task** (what its text states; ``../shared/reference-data/talking-heads``): a leave-one-out task in two
sentences. Sentence 1 lists N objects to buy; sentence 2 gives the order in which they will be bought, naming N-1
of them, *shuffled*, in a different sentence format; the prompt stops where the last item of sentence 2 would go,
and the answer is the one object not yet named. 22 objects (the 17 Colored Objects objects and apple, pear, banana,
orange, steak); sentence-1 openers " Today,", " Tonight,", " Tomorrow," or none, sentence-2 openers " First,",
" When I go," or " I think", chosen at random; N = 3 ... 20, 250 prompts per N.

**Ours** (the paper does not give them; documented choices): the connecting words, the answer's index balanced
within each N (it cycles through every index, in a shuffled order), and the counterfactual (the same two openers
and list, another item left out, for path patching)::

    Tomorrow, I need to buy a pencil, a cup, an apple and a bowl. When I go, I will buy the cup, then the bowl,
    and then the                                                                          -> " apple"

Named positions: ``ITEM_k`` (k-th object of sentence 1; -1 where the list is shorter), ``MENTION_j`` (j-th object
named in sentence 2, j < N-1; -1 beyond), ``ANSWER_ITEM`` (the answer in sentence 1), ``END``. Metadata:
``list_length``, ``target_position`` (the answer's index in sentence 1), ``mention_order`` (the sentence-1 indices
named in sentence 2, in order), ``counterfactual_position``, the two openers, ``items`` and ``answer``.
"""

from __future__ import annotations

import random
from typing import Sequence

import pandas as pd

from headcircuits.errors import VocabularyError
from headcircuits.models.core import Model
from headcircuits.tasks.base import TaskData, as_index, filter_single_tokens, locate, pad_candidates

# Talking Heads, App. F: the 17 Colored Objects objects, then five foods
OBJECTS: tuple[str, ...] = (
    "pencil", "notebook", "pen", "cup", "plate", "jug", "mug", "puzzle", "textbook", "leash", "necklace", "bracelet",
    "bottle", "ball", "envelope", "lighter", "bowl", "apple", "pear", "banana", "orange", "steak",
)
OPENERS_1: tuple[str, ...] = (" Today,", " Tonight,", " Tomorrow,", "")  # the paper's; "" is "no opener"
OPENERS_2: tuple[str, ...] = (" First,", " When I go,", " I think")  # the paper's
LENGTHS: tuple[int, ...] = tuple(range(3, 21))  # the paper's N
N_PER_LENGTH = 250  # the paper's prompts per N


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def format_prompt(items: Sequence[str], mention_order: Sequence[int], opener_1: str = "",
                  opener_2: str = " First,") -> str:
    """The two sentences for ``items`` (sentence 1, in order) and ``mention_order`` (the indices of the N-1 items
    named in sentence 2, in that order); the item left out is the answer. The connecting words are ours."""
    n = len(items)
    if n < 2:
        raise ValueError("a Laundry List needs at least 2 items")
    left_out = set(range(n)) - set(mention_order)
    if len(mention_order) != n - 1 or len(left_out) != 1:
        raise ValueError("mention_order must name every item but one exactly once")
    listed = [f"{_article(w)} {w}" for w in items]
    listed_text = ", ".join(listed[:-1]) + " and " + listed[-1]
    named = "".join(f"the {items[i]}, then " for i in mention_order[:-1]) + f"the {items[mention_order[-1]]},"
    return (f"{opener_1} I need to buy {listed_text}.{opener_2} I will buy {named} and then the").lstrip()


def usable_items(model: Model, items: Sequence[str] = OBJECTS) -> list[str]:
    """The items that are single tokens (with a leading space) for this model."""
    return [w[1:] for w in filter_single_tokens(model, [" " + w for w in items])]


def generate(
    model: Model,
    n: int,
    seed: int = 0,
    *,
    lengths: int | Sequence[int] = 3,
    items: Sequence[str] = OBJECTS,
    openers_1: Sequence[str] = OPENERS_1,
    openers_2: Sequence[str] = OPENERS_2,
) -> TaskData:
    """``n`` prompts for each list length N in ``lengths`` (the paper: N = 3 ... 20, ``n`` = 250), deterministic in
    ``seed`` (a local RNG; each length draws from its own, seeded by ``seed`` and N, so adding a length leaves the
    others' prompts unchanged).

    Items that are not single tokens for the model are left out and reported in ``meta.attrs['dropped_words']``.

    Raises:
        VocabularyError: fewer usable items than the longest list asked for (the message says how many there are).
    """
    lengths = [lengths] if isinstance(lengths, int) else list(lengths)
    if not lengths:
        raise ValueError("lengths names no list length: pass e.g. lengths=[3, 5] (or one length, lengths=3)")
    if int(n) < 1:
        raise ValueError(f"ask for at least one prompt per list length (n >= 1), not n={n}")
    if min(lengths) < 2:
        raise ValueError("a Laundry List needs at least 2 items (N = 2 is the IOI structure; the paper's N is 3-20)")
    if not openers_1 or not openers_2:
        raise ValueError("give at least one opener for each sentence (the paper's: OPENERS_1, OPENERS_2)")
    vocab = usable_items(model, items)
    dropped = [w for w in items if w not in vocab]
    if len(vocab) < max(lengths):
        raise VocabularyError(
            f"a list of {max(lengths)} distinct items needs {max(lengths)} single-token items, but only {len(vocab)} "
            f"of the {len(items)} items are single tokens for {model.name} (left out: {', '.join(dropped)}): "
            f"ask for lists of at most {len(vocab)} items, or pass more `items`")
    clean, corrupt, lists, rows = [], [], [], []
    for length in lengths:
        rng = random.Random(f"{seed}-{length}")
        targets = [i % length for i in range(n)]
        rng.shuffle(targets)
        for target in targets:
            chosen = rng.sample(vocab, length)
            cf_target = rng.choice([i for i in range(length) if i != target])
            o1, o2 = rng.choice(list(openers_1)), rng.choice(list(openers_2))
            mentions, cf_mentions = ([i for i in range(length) if i != t] for t in (target, cf_target))
            rng.shuffle(mentions)
            rng.shuffle(cf_mentions)
            clean.append(format_prompt(chosen, mentions, o1, o2))
            corrupt.append(format_prompt(chosen, cf_mentions, o1, o2))
            lists.append((chosen, mentions))
            rows.append(dict(list_length=length, target_position=target, counterfactual_position=cf_target,
                             mention_order=" ".join(map(str, mentions)), opener_1=o1.strip(), opener_2=o2.strip(),
                             answer=chosen[target], items=" ".join(chosen), seed=seed))
    tokens, cf_tokens = model.to_tokens(clean), model.to_tokens(corrupt)
    if not bool((tokens.lengths == cf_tokens.lengths).all()):
        raise VocabularyError("a counterfactual tokenised to another length than its prompt: choose other items")
    width = max(lengths)
    positions: dict[str, list[int]] = {"END": [], "ANSWER_ITEM": [], **{f"ITEM_{k}": [] for k in range(width)},
                                       **{f"MENTION_{j}": [] for j in range(width - 1)}}
    candidates = []
    for row, ((chosen, mentions), meta) in enumerate(zip(lists, rows)):
        ids = [model.single_token_id(" " + w) for w in chosen]
        candidates.append(ids)
        for k in range(width):
            positions[f"ITEM_{k}"].append(locate(tokens, row, ids[k]) if k < len(ids) else -1)
        for j in range(width - 1):
            positions[f"MENTION_{j}"].append(locate(tokens, row, ids[mentions[j]], occurrence=1)
                                             if j < len(mentions) else -1)
        positions["ANSWER_ITEM"].append(positions[f"ITEM_{meta['target_position']}"][row])
        positions["END"].append(int(tokens.last[row]))
    meta = pd.DataFrame(rows)
    meta.attrs["dropped_words"] = dropped
    answer = [candidates[i][r["target_position"]] for i, r in enumerate(rows)]
    cf_answer = [candidates[i][r["counterfactual_position"]] for i, r in enumerate(rows)]
    return TaskData(
        task="laundry_list",
        clean_text=clean,
        corrupt_text=corrupt,
        clean=tokens,
        corrupt=cf_tokens,
        answer=as_index(answer),
        distractor=as_index(cf_answer),
        positions={k: as_index(v) for k, v in positions.items()},
        meta=meta,
        candidates=pad_candidates(candidates),
        corrupt_answer=as_index(cf_answer),
    )


def generate_grid(model: Model, n_per_position: int, lengths: Sequence[int], seed: int = 0, **kwargs) -> TaskData:
    """``n_per_position`` prompts for every (list length, answer index) cell: ``n_per_position * N`` prompts of each
    length N, as one TaskData (the same prompts as :func:`generate` with ``n = n_per_position * N`` per length)."""
    from headcircuits.tasks.base import concat

    if n_per_position < 1:
        raise ValueError(f"n_per_position must be at least 1, not {n_per_position}")
    parts = [generate(model, n_per_position * n, seed=seed, lengths=n, **kwargs) for n in lengths]
    data = concat(parts, pad_id=model.pad_id)
    data.meta.attrs["dropped_words"] = parts[0].meta.attrs["dropped_words"]
    return data
