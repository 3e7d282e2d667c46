"""Your own task from marked prompts: the same tokens and positions as a generator's, the same experiments."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from headcircuits import circuits, scoring
from headcircuits import path_patching as patching
from headcircuits.errors import VocabularyError
from headcircuits.tasks import custom, ioi


def _marked(data, row: int) -> str:
    """An IOI generator prompt with IO, S1 and S2 marked by hand."""
    text, io, s = data.clean_text[row], " " + data.meta.io[row], " " + data.meta.s[row]
    first_s = text.index(s + " ") if (s + " ") in text else text.index(s)
    out = []
    for name, word, start in sorted([("IO", io, text.index(io)), ("S1", s, first_s),
                                      ("S2", s, text.index(s, first_s + len(s)))], key=lambda t: t[2]):
        out.append((start, name, word))
    marked, last = "", 0
    for start, name, word in out:
        marked += text[last:start] + "{" + name + ":" + word + "}"
        last = start + len(word)
    return marked + text[last:]


def test_marked_prompts_give_the_generators_tokens_and_positions(tiny):
    data = ioi.generate(tiny, 12, seed=3)
    mine = custom.from_prompts(
        tiny, [_marked(data, i) for i in range(len(data))], data.corrupt_text,
        [" " + w for w in data.meta.io], [" " + w for w in data.meta.s], task="my-ioi",
        candidates=[[" " + a, " " + b] for a, b in zip(data.meta.io, data.meta.s)], meta=data.meta)
    assert mine.clean_text == data.clean_text and mine.task == "my-ioi"
    assert torch.equal(mine.clean.ids, data.clean.ids) and torch.equal(mine.corrupt.ids, data.corrupt.ids)
    for name in ("IO", "S1", "S2", "END"):
        assert torch.equal(mine.positions[name], data.positions[name]), name
    assert torch.equal(mine.answer, data.answer) and torch.equal(mine.distractor, data.distractor)
    assert torch.equal(mine.candidates, data.candidates)
    pd.testing.assert_frame_equal(mine.meta, data.meta)
    # and every experiment takes it: the same evaluation, the same path-patching table
    assert torch.allclose(torch.tensor(scoring.evaluate(tiny, mine).logit_diff.values),
                          torch.tensor(scoring.evaluate(tiny, data).logit_diff.values))


def test_a_custom_task_goes_through_discovery_with_its_own_stages(tiny):
    data = ioi.generate(tiny, 8, seed=5)
    mine = custom.from_prompts(tiny, [_marked(data, i) for i in range(len(data))], data.corrupt_text,
                               [" " + w for w in data.meta.io], [" " + w for w in data.meta.s])
    stages = (circuits.Stage("movers", "logits"), circuits.Stage("inhibition", "q", "END"),
              circuits.Stage("duplicate", "v", "S2"))
    with pytest.raises(ValueError, match="pass stages"):
        circuits.discover(tiny, mine, progress=False, cache=False)
    ours = circuits.discover(tiny, mine, stages, fraction=0.1, progress=False, cache=False)
    reference = circuits.discover(tiny, data, stages, fraction=0.1, progress=False, cache=False)
    assert ours.tables.keys() == reference.tables.keys() and ours.heads == reference.heads
    for name in ours.tables:
        assert torch.allclose(ours.tables[name], reference.tables[name], equal_nan=True), name
    assert torch.allclose(patching.baseline(tiny, mine).ld_clean, patching.baseline(tiny, data).ld_clean)


def test_bad_marks_and_answers_are_refused_with_the_prompt_and_the_fix(smollm2_or_tiny):
    m = smollm2_or_tiny
    ok = "When{IO: Mary} and{S1: John} went out,{S2: John} gave a book to"
    assert custom.marked_positions(m, ok)["END"] == len(m.encode(custom.strip_marks(ok))) - 1
    with pytest.raises(VocabularyError, match="not one token in its place"):
        custom.marked_positions(m, "The{X: Kalamazooification} of")
    # a word that is one token alone but merges with the letters after it (found for this tokenizer)
    merging = [(w, x) for w in (" at", " to", " the", " and", " in", " is", " he") for x in ("oms", "gether", "me", "re", "s")
               if m.encode("It was" + w + x)[: len(m.encode("It was" + w))] != m.encode("It was" + w)]
    assert merging, f"{m.name}: no merging word found to test with"
    with pytest.raises(VocabularyError, match="merges with the text after it"):
        custom.marked_positions(m, "It was{X:%s}%s" % merging[0])
    with pytest.raises(ValueError, match="well-formed mark"):
        custom.strip_marks("When {IO Mary} and")
    with pytest.raises(ValueError, match="appears twice"):
        custom.marked_positions(m, "{A: x} and{A: y}")
    with pytest.raises(ValueError, match="mark the same names"):
        custom.from_prompts(m, [ok, "When{IO: Mary} went to"], [ok, ok], [" Mary"] * 2, [" John"] * 2)
    with pytest.raises(ValueError, match="give one of each"):
        custom.from_prompts(m, [ok, ok], [ok], [" Mary"] * 2, [" John"] * 2)
    with pytest.raises(VocabularyError, match="the answer of prompt 1"):
        custom.from_prompts(m, [ok, ok], [ok, ok], [" Mary", " Kalamazooification"], [" John"] * 2)


def test_counterfactuals_of_another_length_are_listed_and_refused_by_patching(tiny):
    clean = ["When{IO: Mary} and{S: John} left,{S2: John} gave it to"] * 2
    corrupt = ["When John and Mary left, Mary gave it to", "When John and Mary left the big house, Mary gave it to"]
    data = custom.from_prompts(tiny, clean, corrupt, [" Mary"] * 2, [" John"] * 2)
    report = custom.same_length_report(data)
    assert report.row.tolist() == [1]
    with pytest.raises(ValueError, match="same token length"):
        patching.path_patch(tiny, data, patching.Receivers("logits"), [(0, 0)], progress=False, cache=False)
