"""Laundry List: recall one item from a list (Talking Heads, Merullo et al., NeurIPS 2024).

The paper's exact template is not available here, so this is a documented choice (a parameter, ``template``):
a list of N items, then N-1 of them mentioned again, and the answer is the one not yet mentioned. This is the IOI
structure generalised to N items (IOI is N = 2: the repeated name is inhibited, the other one is copied), so it
exercises the same inhibition mechanism, and accuracy can be read against the list length and the answer's
position in the list::

    Shopping list: milk, eggs, bread and butter. I have already packed the eggs, the butter and the milk.
    I still need to pack the                                                               -> " bread"

``order='shuffled'`` mentions the N-1 items in a random order; ``order='in_order'`` in list order.
Counterfactual: the same list with a different item left out (so a different answer).
"""

from __future__ import annotations

import random
from typing import Literal, Sequence

import pandas as pd

from headcircuits.errors import VocabularyError
from headcircuits.models.core import Model
from headcircuits.tasks.base import TaskData, as_index, filter_single_tokens, locate, pad_candidates

TEMPLATE = "Shopping list: {items}. I have already packed the {mentioned}. I still need to pack the"
ITEMS: tuple[str, ...] = (
    "milk", "eggs", "bread", "butter", "cheese", "rice", "salt", "sugar", "tea", "coffee", "soap", "flour",
    "honey", "jam", "juice", "pasta", "soup", "beans", "corn", "apples", "bananas", "oranges", "lemons", "onions",
    "carrots", "potatoes", "tomatoes", "garlic", "pepper", "oil", "vinegar", "cereal", "yogurt", "chicken", "fish",
    "beef", "nuts", "chocolate", "cookies", "water",
)


def _join(words: Sequence[str], sep: str, last: str) -> str:
    return words[0] if len(words) == 1 else sep.join(words[:-1]) + last + words[-1]


def format_prompt(items: Sequence[str], target: int, mention_order: Sequence[int], template: str = TEMPLATE) -> str:
    """The prompt for a list, the index of the item left out, and the order of the N-1 mentions."""
    if sorted(mention_order) != [i for i in range(len(items)) if i != target]:
        raise ValueError("mention_order must list every item except the target exactly once")
    listed = _join(list(items), ", ", " and ")
    mentioned = _join([items[i] for i in mention_order], ", the ", " and the ")
    return template.format(items=listed, mentioned=mentioned)


def usable_items(model: Model, items: Sequence[str] = ITEMS) -> list[str]:
    """The items that are single tokens (with a leading space) for this model."""
    return [w[1:] for w in filter_single_tokens(model, [" " + w for w in items])]


def generate(
    model: Model,
    n: int,
    seed: int = 0,
    *,
    lengths: int | Sequence[int] = 5,
    order: Literal["shuffled", "in_order"] = "shuffled",
    items: Sequence[str] = ITEMS,
    template: str = TEMPLATE,
) -> TaskData:
    """``n`` prompts for each list length in ``lengths``, deterministic in ``seed`` (a local RNG).

    Within a length the answer's position cycles through every position (balanced), in a shuffled order.
    Named positions: ``ITEM_k`` (k-th list item; -1 where the list is shorter), ``ANSWER_ITEM`` (the answer in
    the list), ``END``. Metadata: ``list_length``, ``target_position``, ``counterfactual_position``, ``order``.

    Raises:
        VocabularyError: fewer single-token items than the longest requested list.
    """
    lengths = [lengths] if isinstance(lengths, int) else list(lengths)
    if not lengths:
        raise ValueError("lengths names no list length: pass e.g. lengths=[3, 5] (or one length, lengths=5)")
    if int(n) < 1:
        raise ValueError(f"ask for at least one prompt per list length (n >= 1), not n={n}")
    if min(lengths) < 2:
        raise ValueError("a Laundry List needs at least 2 items (N = 2 is the IOI structure)")
    if order not in ("shuffled", "in_order"):
        raise ValueError(f"order must be 'shuffled' or 'in_order', not {order!r}")
    vocab = usable_items(model, items)
    if len(vocab) < max(lengths):
        raise VocabularyError(
            f"a list of {max(lengths)} distinct items needs {max(lengths)} single-token items, but only {len(vocab)} "
            f"of the {len(items)} items are single tokens for {model.name}: pass more `items` or shorter `lengths`"
        )
    rng = random.Random(seed)
    clean, corrupt, lists, rows = [], [], [], []
    for length in lengths:
        targets = [i % length for i in range(n)]
        rng.shuffle(targets)
        for target in targets:
            chosen = rng.sample(vocab, length)
            cf_target = rng.choice([i for i in range(length) if i != target])
            mentions, cf_mentions = ([i for i in range(length) if i != t] for t in (target, cf_target))
            if order == "shuffled":
                rng.shuffle(mentions)
                rng.shuffle(cf_mentions)
            clean.append(format_prompt(chosen, target, mentions, template))
            corrupt.append(format_prompt(chosen, cf_target, cf_mentions, template))
            lists.append(chosen)
            rows.append(dict(list_length=length, target_position=target, counterfactual_position=cf_target,
                             order=order, answer=chosen[target], items=" ".join(chosen), seed=seed))
    tokens, cf_tokens = model.to_tokens(clean), model.to_tokens(corrupt)
    width = max(lengths)
    positions: dict[str, list[int]] = {"END": [], "ANSWER_ITEM": [], **{f"ITEM_{k}": [] for k in range(width)}}
    candidates = []
    for row, (chosen, meta) in enumerate(zip(lists, rows)):
        ids = [model.single_token_id(" " + w) for w in chosen]
        candidates.append(ids)
        for k in range(width):
            positions[f"ITEM_{k}"].append(locate(tokens, row, ids[k]) if k < len(ids) else -1)
        positions["ANSWER_ITEM"].append(positions[f"ITEM_{meta['target_position']}"][row])
        positions["END"].append(int(tokens.last[row]))
    cands = pad_candidates(candidates)
    rows_idx = list(range(len(rows)))
    answer = [candidates[i][rows[i]["target_position"]] for i in rows_idx]
    cf_answer = [candidates[i][rows[i]["counterfactual_position"]] for i in rows_idx]
    return TaskData(
        task="laundry_list",
        clean_text=clean,
        corrupt_text=corrupt,
        clean=tokens,
        corrupt=cf_tokens,
        answer=as_index(answer),
        distractor=as_index(cf_answer),
        positions={k: as_index(v) for k, v in positions.items()},
        meta=pd.DataFrame(rows),
        candidates=cands,
        corrupt_answer=as_index(cf_answer),
    )


def generate_grid(
    model: Model,
    n_per_position: int,
    lengths: Sequence[int],
    seed: int = 0,
    *,
    order: Literal["shuffled", "in_order"] = "shuffled",
    items: Sequence[str] = ITEMS,
    template: str = TEMPLATE,
) -> TaskData:
    """``n_per_position`` prompts for every (list length, answer position) cell: ``n_per_position * N`` prompts of
    each length N, as one TaskData (each length generated with seed ``seed + N``, so adding a length leaves the
    others' prompts unchanged)."""
    from headcircuits.tasks.base import concat

    if n_per_position < 1:
        raise ValueError(f"n_per_position must be at least 1, not {n_per_position}")
    parts = [generate(model, n_per_position * n, seed=seed + n, lengths=n, order=order, items=items,
                      template=template) for n in lengths]
    return concat(parts, pad_id=model.pad_id)
