"""Colored Objects: the paper's exact format (byte for byte on its released prompts), counterfactuals, positions."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from conftest import SHARED
from headcircuits import VocabularyError
from headcircuits.tasks import colored_objects as co

REFERENCE = SHARED / "reference-data" / "circuit-reuse"


@pytest.fixture(scope="module")
def reference():
    """The paper's released prompts as the package ships them (no ../shared needed)."""
    clean = json.loads((co.PAPER_DATA / "cobjs_data_42.json").read_text())
    counterfactual = json.loads((co.PAPER_DATA / "cobjs_mindiff_data_42.json").read_text())
    return clean, counterfactual


def test_the_shipped_prompts_are_the_released_files_with_their_licence():
    assert "MIT License" in (co.PAPER_DATA / "LICENSE").read_text()
    if not REFERENCE.is_dir():
        pytest.skip(f"../shared is absent ({REFERENCE} not found): nothing to compare the shipped copy with")
    for name in ("cobjs_data_42.json", "cobjs_mindiff_data_42.json", "LICENSE"):
        assert (co.PAPER_DATA / name).read_bytes() == (REFERENCE / name).read_bytes(), name


def test_the_papers_prompts_become_task_data(smollm2_or_tiny):
    data = co.from_paper(smollm2_or_tiny, n=20)
    dropped = set(data.meta.attrs["dropped_words"])  # SmolLM2 splits 'bracelet', 'leash' and 'mug'
    triples = [t for t in co.paper_prompts()[:20] if not dropped & set(t[1].objects)]
    assert len(data) == len(triples) == 20 - data.meta.attrs["dropped_prompts"]
    assert data.clean_text == [co.format_prompt(s, q) for s, q, _ in triples]
    for i, (_, query, cf) in enumerate(triples):
        assert smollm2_or_tiny.tokenizer.decode([int(data.answer[i])]) == " " + query.answer
        assert smollm2_or_tiny.tokenizer.decode([int(data.distractor[i])]) == " " + query.colors[cf].capitalize()
    with pytest.raises(ValueError, match="1 to 1000"):
        co.from_paper(smollm2_or_tiny, n=0)


def test_paper_prompts_with_multi_token_words_are_left_out_and_counted(tiny, monkeypatch):
    """The tiny tokenizer lacks nothing here, so drop 'cup' from the usable words by hand: every released prompt
    whose final question names a cup is left out, and counted."""
    original = co._usable

    def without_cup(model, words, title, on_multi_token):
        usable, dropped = original(model, words, title, on_multi_token)
        return ([w for w in usable if w != "cup"], dropped + (["cup"] if "cup" in usable else []))

    monkeypatch.setattr(co, "_usable", without_cup)
    data = co.from_paper(tiny, n=100)
    expected = [t for t in co.paper_prompts()[:100] if "cup" not in t[1].objects]
    assert len(data) == len(expected) < 100 and data.meta.attrs["dropped_prompts"] == 100 - len(expected)
    assert data.meta.attrs["dropped_words"] == ["cup"]


def test_generator_reproduces_the_papers_prompts_byte_for_byte(reference):
    clean, counterfactual = reference
    assert len(clean) == len(counterfactual) == 1000
    for (prompt, label), (cf_prompt, cf_label) in zip(clean, counterfactual):
        shot, query = co.parse_prompt(prompt)
        assert co.format_prompt(shot, query) == prompt
        assert label == " " + query.answer
        cf_shot, cf_query = co.parse_prompt(cf_prompt)
        # the counterfactual only asks about another object of the same query list
        assert cf_shot == shot and replace(cf_query, asked=query.asked) == query and cf_query.asked != query.asked
        assert co.format_prompt(shot, replace(query, asked=cf_query.asked)) == cf_prompt
        assert cf_label == " " + cf_query.answer


def test_vocabulary_and_constraints_match_the_papers_prompts(reference):
    clean, _ = reference
    objects, colors, surfaces, phrases = set(), set(), set(), set()
    for prompt, _ in clean:
        shot, query = co.parse_prompt(prompt)
        assert not set(shot.objects) & set(query.objects) and not set(shot.colors) & set(query.colors)
        for q in (shot, query):
            objects |= set(q.objects)
            colors |= set(q.colors)
            surfaces.add(q.surface)
            phrases.add(q.phrase)
    assert objects == set(co.OBJECTS) and len(objects) == 17
    assert colors == set(co.COLORS) and len(colors) == 8
    assert surfaces == set(co.SURFACES) and phrases == set(co.PHRASES)


def test_same_seed_same_prompts(tiny):
    a, b, c = (co.generate(tiny, 10, seed=s) for s in (0, 0, 1))
    assert a.clean_text == b.clean_text and a.corrupt_text == b.corrupt_text and a.clean_text != c.clean_text


def test_generated_prompts_parse_and_keep_shot_and_query_disjoint(smollm2_or_tiny):
    data = co.generate(smollm2_or_tiny, 40, seed=0)
    for text in data.clean_text:
        shot, query = co.parse_prompt(text)  # raises if the format drifts
        assert not set(shot.objects) & set(query.objects) and not set(shot.colors) & set(query.colors)


def test_counterfactual_differs_in_one_word_and_one_token(smollm2_or_tiny):
    model = smollm2_or_tiny
    data = co.generate(model, 40, seed=0)
    for clean, corrupt in zip(data.clean_text, data.corrupt_text):
        a, b = clean.split(" "), corrupt.split(" ")
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1
        assert a[:-1] == b[:-1] and a[-1] != b[-1]  # the changed word is the final question's object ("cup?\nA:")
    diff = data.clean.ids != data.corrupt.ids
    assert torch.equal(diff.sum(1), torch.ones(40, dtype=torch.long))
    assert torch.equal(diff.float().argmax(1), data.positions["QUERY"])
    assert torch.equal(data.corrupt_answer, data.distractor) and not torch.equal(data.answer, data.distractor)


def test_positions_point_at_the_right_tokens(smollm2_or_tiny):
    model = smollm2_or_tiny
    data = co.generate(model, 30, seed=3)
    rows = torch.arange(30)
    ids = data.clean.ids
    for i, row in enumerate(data.meta.itertuples()):
        colors, objects = row.colors.split(), row.objects.split()
        for k in range(3):
            assert int(ids[i, data.positions[f"COLOR_{k}"][i]]) == model.single_token_id(" " + colors[k])
            assert int(ids[i, data.positions[f"OBJ_{k}"][i]]) == model.single_token_id(" " + objects[k])
        assert int(ids[i, data.positions["QUERY"][i]]) == model.single_token_id(" " + objects[row.target_position])
        assert int(data.answer[i]) == model.single_token_id(" " + colors[row.target_position].capitalize())
        assert int(data.positions["ANSWER_OBJ"][i]) == int(data.positions[f"OBJ_{row.target_position}"][i])
        wrong = [int(data.positions[f"WRONG_COLOR_{j}"][i]) for j in range(2)]
        assert sorted([*wrong, int(data.positions["ANSWER_COLOR"][i])]) == [
            int(data.positions[f"COLOR_{k}"][i]) for k in range(3)]  # the two others, in list order
    assert torch.equal(data.positions["END"], data.clean.lengths - 1)
    assert torch.equal(data.candidates[rows, torch.tensor(data.meta.target_position.to_numpy())], data.answer)


def test_words_that_are_not_single_tokens_are_filtered_or_refused(tiny):
    objects = co.OBJECTS + ("xylophone",)  # not in the tiny vocabulary: many character tokens
    data = co.generate(tiny, 20, seed=0, objects=objects)
    assert data.meta.attrs["dropped_words"] == ["xylophone"]
    assert "xylophone" not in " ".join(data.clean_text)
    with pytest.raises(VocabularyError, match="xylophone"):
        co.generate(tiny, 5, objects=objects, on_multi_token="error")
    with pytest.raises(VocabularyError, match="6 single-token objects"):
        co.generate(tiny, 5, objects=co.OBJECTS[:5])


def test_every_paper_word_is_a_single_gpt2_token(gpt2_tokenizer):
    for word in co.OBJECTS + co.COLORS + tuple(c.capitalize() for c in co.COLORS):
        assert len(gpt2_tokenizer(" " + word)["input_ids"]) == 1, word
