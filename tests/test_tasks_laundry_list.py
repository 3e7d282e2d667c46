"""Laundry List: bookkeeping of items, positions and counterfactuals for every list length."""

from __future__ import annotations

import pytest
import torch

from headcircuits import VocabularyError
from headcircuits.tasks import laundry_list as ll

LENGTHS = list(range(2, 11))


def _count(ids: torch.Tensor, token: int) -> int:
    return int((ids == token).sum())


def test_bookkeeping_holds_for_every_length(smollm2_or_tiny):
    """The paper's leave-one-out task: sentence 1 lists N items; sentence 2 names N-1 of them, each once; the
    answer is the one left out; every named position points at its token."""
    model = smollm2_or_tiny
    data = ll.generate(model, 6, seed=0, lengths=LENGTHS)
    assert len(data) == 6 * len(LENGTHS)
    for i, row in enumerate(data.meta.itertuples()):
        n = row.list_length
        ids = data.clean.ids[i, : int(data.clean.lengths[i])]
        cf_ids = data.corrupt.ids[i, : int(data.corrupt.lengths[i])]
        items = [model.single_token_id(" " + w) for w in row.items.split()]
        assert len(items) == n == int((data.candidates[i] >= 0).sum())
        for k in range(n):
            assert int(ids[data.positions[f"ITEM_{k}"][i]]) == items[k]
        for k in range(n, max(LENGTHS)):
            assert int(data.positions[f"ITEM_{k}"][i]) == -1
        # sentence 2: N-1 distinct items of sentence 1, the answer not among them, each at its MENTION_j
        order = [int(x) for x in row.mention_order.split()]
        assert sorted(order) == [k for k in range(n) if k != row.target_position]
        for j, k in enumerate(order):
            pos = int(data.positions[f"MENTION_{j}"][i])
            assert int(ids[pos]) == items[k] and pos > int(data.positions[f"ITEM_{n - 1}"][i])
        for j in range(n - 1, max(LENGTHS) - 1):
            assert int(data.positions[f"MENTION_{j}"][i]) == -1
        # the answer is listed once and never named again; every other item is listed and named once
        assert int(data.answer[i]) == items[row.target_position]
        assert int(ids[data.positions["ANSWER_ITEM"][i]]) == items[row.target_position]
        assert [_count(ids, t) for t in items] == [1 if k == row.target_position else 2 for k in range(n)]
        # counterfactual: the same list and openers, another item left out, the same length (path patching)
        assert row.counterfactual_position != row.target_position
        assert int(data.corrupt_answer[i]) == items[row.counterfactual_position]
        assert [_count(cf_ids, t) for t in items] == [1 if k == row.counterfactual_position else 2 for k in range(n)]
        assert data.corrupt_text[i].split(".")[0] == data.clean_text[i].split(".")[0]
        assert int(data.corrupt.lengths[i]) == int(data.clean.lengths[i])
        # the paper's openers and two different sentence formats
        first, second = data.clean_text[i].split(".")
        assert (" " + first).startswith(tuple(o + " I need to buy" for o in ll.OPENERS_1))
        assert second.startswith(tuple(o + " I will buy the" for o in ll.OPENERS_2))
        assert data.clean_text[i].endswith(", and then the")
    assert torch.equal(data.positions["END"], data.clean.lengths - 1)


def test_sentence_two_is_shuffled_and_the_openers_vary(tiny):
    data = ll.generate(tiny, 40, seed=2, lengths=6)
    orders = [tuple(int(x) for x in o.split()) for o in data.meta.mention_order]
    assert sum(o != tuple(sorted(o)) for o in orders) > 30  # in list order for 1 in 120 by chance
    assert set(data.meta.opener_1) == {o.strip() for o in ll.OPENERS_1}
    assert set(data.meta.opener_2) == {o.strip() for o in ll.OPENERS_2}


def test_format_prompt_is_the_documented_template():
    assert ll.format_prompt(["pencil", "cup", "apple", "bowl"], [1, 3, 0], " Tomorrow,", " When I go,") == (
        "Tomorrow, I need to buy a pencil, a cup, an apple and a bowl. When I go, I will buy the cup, then the bowl, "
        "then the pencil, and then the")
    assert ll.format_prompt(["cup", "bowl"], [1], "", " I think").startswith("I need to buy a cup and a bowl. I think I")
    with pytest.raises(ValueError, match="every item but one"):
        ll.format_prompt(["cup", "bowl", "pen"], [1, 1])


def test_the_paper_objects_and_lengths():
    assert len(ll.OBJECTS) == 22 == len(set(ll.OBJECTS))
    assert ll.LENGTHS == tuple(range(3, 21)) and ll.N_PER_LENGTH == 250
    from headcircuits.tasks import colored_objects
    assert set(colored_objects.OBJECTS) < set(ll.OBJECTS)  # the 17 Colored Objects objects, and five foods


def test_target_positions_are_balanced_within_each_length(tiny):
    data = ll.generate(tiny, 12, seed=1, lengths=[2, 3, 4, 6])
    for n, group in data.meta.groupby("list_length"):
        counts = group.target_position.value_counts()
        assert set(counts.index) == set(range(n)) and counts.max() - counts.min() <= 1


def test_same_seed_same_prompts(tiny):
    a, b, c = (ll.generate(tiny, 5, seed=s, lengths=[3, 7]) for s in (0, 0, 1))
    assert a.clean_text == b.clean_text and a.corrupt_text == b.corrupt_text and a.clean_text != c.clean_text


def test_vocabulary_too_small_for_the_list_is_a_clear_error(tiny):
    with pytest.raises(VocabularyError, match="list of 5 distinct items"):
        ll.generate(tiny, 2, lengths=5, items=("cup", "pen", "bowl", "xylophone", "zeppelin"))
    usable = ll.usable_items(tiny)
    with pytest.raises(VocabularyError, match=f"at most {len(usable)} items"):
        ll.generate(tiny, 2, lengths=len(usable) + 1)
    data = ll.generate(tiny, 2, lengths=len(usable))  # the longest list the vocabulary allows
    assert data.meta.attrs["dropped_words"] == [w for w in ll.OBJECTS if w not in usable]
    with pytest.raises(ValueError, match="at least 2"):
        ll.generate(tiny, 2, lengths=1)


def test_subset_keeps_prompts_aligned(tiny):
    data = ll.generate(tiny, 4, seed=0, lengths=[2, 5])
    part = data.subset([5, 1])
    assert part.clean_text == [data.clean_text[5], data.clean_text[1]]
    assert torch.equal(part.answer, data.answer[[5, 1]])
    assert list(part.meta.list_length) == [data.meta.list_length[5], data.meta.list_length[1]]


def test_split_parts_are_disjoint_cover_everything_and_every_length(tiny):
    """The split that chooses an intervention's scale never overlaps the held-out part it is reported on."""
    data = ll.generate(tiny, 10, seed=0, lengths=[2, 3, 5])
    key = lambda d: list(zip(d.clean_text, d.meta.target_position, d.meta.list_length))  # noqa: E731
    assert len(set(key(data))) == len(data)  # prompts are distinguishable, so overlap would show
    choose, held_out = data.split(0.5, seed=3, by="list_length")
    assert not set(key(choose)) & set(key(held_out))
    assert sorted(key(choose) + key(held_out)) == sorted(key(data))
    for part in (choose, held_out):
        assert sorted(part.meta.list_length.unique()) == [2, 3, 5]
        assert (part.meta.list_length.value_counts() == 5).all()
    again = data.split(0.5, seed=3, by="list_length")[0]
    assert key(again) == key(choose)  # same seed, same split
    assert key(data.split(0.5, seed=4, by="list_length")[0]) != key(choose)
    with pytest.raises(ValueError, match="between 0 and 1"):
        data.split(1.0)


def test_grid_has_every_length_and_position_cell_and_keeps_the_bookkeeping(tiny):
    data = ll.generate_grid(tiny, 3, lengths=[2, 4, 7], seed=0)
    counts = data.meta.groupby(["list_length", "target_position"]).size()
    assert len(counts) == 2 + 4 + 7 and (counts == 3).all()
    for i, row in enumerate(data.meta.itertuples()):
        ids = data.clean.ids[i]
        assert int(data.clean.lengths[i]) == len(tiny.to_tokens(data.clean_text[i]).ids[0])
        assert int(ids[data.positions["END"][i]]) == int(tiny.to_tokens(data.clean_text[i]).ids[0, -1])
        assert int(ids[data.positions["ANSWER_ITEM"][i]]) == int(data.answer[i])
        for k in range(7):
            assert (int(data.positions[f"ITEM_{k}"][i]) == -1) == (k >= row.list_length)
        assert int((data.candidates[i] >= 0).sum()) == row.list_length
    # same prompts as generating that length alone: lengths do not disturb each other
    alone = ll.generate(tiny, 3 * 4, seed=0, lengths=4)
    assert data.subset(list(range(6, 18))).clean_text == alone.clean_text
    with pytest.raises(ValueError, match="at least 1"):
        ll.generate_grid(tiny, 0, lengths=[2])
