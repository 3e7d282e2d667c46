"""IOI generator: determinism, positions, counterfactuals, vocabulary checks."""

from __future__ import annotations

import pytest
import torch

from headcircuits import VocabularyError
from headcircuits.tasks import ioi


def test_same_seed_same_prompts_different_seed_different(tiny):
    a, b, c = ioi.generate(tiny, 20, seed=3), ioi.generate(tiny, 20, seed=3), ioi.generate(tiny, 20, seed=4)
    assert a.clean_text == b.clean_text and a.corrupt_text == b.corrupt_text
    assert torch.equal(a.clean.ids, b.clean.ids)
    assert a.clean_text != c.clean_text


def test_generation_does_not_touch_the_global_rng(tiny):
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    ioi.generate(tiny, 5, seed=0)
    assert random.random() == expected


@pytest.mark.parametrize("counterfactual", ["abc", "s2io"])
def test_positions_point_at_the_right_tokens_for_every_template(smollm2_or_tiny, counterfactual):
    n = 4 * len(ioi.BABA_TEMPLATES)
    data = ioi.generate(smollm2_or_tiny, n, seed=0, counterfactual=counterfactual)
    assert set(data.meta.template) == set(range(len(ioi.BABA_TEMPLATES)))
    rows = torch.arange(n)
    ids = data.clean.ids
    assert torch.equal(ids[rows, data.positions["IO"]], data.answer)
    assert torch.equal(ids[rows, data.positions["S1"]], data.distractor)
    assert torch.equal(ids[rows, data.positions["S2"]], data.distractor)
    assert (data.positions["S1"] < data.positions["S2"]).all()
    assert torch.equal(data.positions["END"], data.clean.lengths - 1)
    assert (data.positions["END"] > data.positions["S2"]).all()
    # ABBA: IO comes first; BABA: S comes first
    abba = torch.tensor((data.meta.order == "ABBA").to_numpy())
    assert torch.equal(data.positions["IO"] < data.positions["S1"], abba)


def test_s2io_changes_exactly_the_second_subject_token(smollm2_or_tiny):
    model = smollm2_or_tiny
    data = ioi.generate(model, 30, seed=1, counterfactual="s2io")
    assert torch.equal(data.clean.lengths, data.corrupt.lengths)
    diff = data.clean.ids != data.corrupt.ids
    assert torch.equal(diff.sum(1), torch.ones(30, dtype=torch.long))
    changed = diff.float().argmax(1)
    assert torch.equal(changed, data.positions["S2"])
    assert torch.equal(data.corrupt.ids[torch.arange(30), changed], data.answer)


def test_abc_uses_three_fresh_names(tiny):
    data = ioi.generate(tiny, 10, seed=2, counterfactual="abc")
    for clean, corrupt, row in zip(data.clean_text, data.corrupt_text, data.meta.itertuples()):
        assert row.io not in corrupt.split() and row.s not in corrupt.replace(",", " ").replace(".", " ").split()
        assert len(clean.split()) == len(corrupt.split())


def test_too_few_single_token_names_is_a_clear_error(tiny):
    with pytest.raises(VocabularyError, match="single tokens"):
        ioi.generate(tiny, 4, names=("Zelda", "Mary", "Xavier"))


def test_ioi_names_are_single_tokens_for_gpt2(gpt2_tokenizer):
    """The paper's model: every default name, place and object is one GPT-2 token with its leading space."""
    for word in ioi.NAMES + ioi.PLACES + ioi.OBJECTS:
        assert len(gpt2_tokenizer(" " + word)["input_ids"]) == 1, word
    assert gpt2_tokenizer(" Mary")["input_ids"] == [5335]


def test_asking_for_no_prompts_is_a_clear_error(tiny):
    from headcircuits.tasks import colored_objects, laundry_list

    with pytest.raises(ValueError, match="at least one IOI prompt"):
        ioi.generate(tiny, 0)
    with pytest.raises(ValueError, match="at least one Colored Objects prompt"):
        colored_objects.generate(tiny, 0)
    with pytest.raises(ValueError, match="lengths names no list length"):
        laundry_list.generate(tiny, 4, lengths=[])
    with pytest.raises(ValueError, match="at least one prompt per list length"):
        laundry_list.generate(tiny, 0, lengths=[3])
