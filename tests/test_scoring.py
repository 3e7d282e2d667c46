"""Scores read at each prompt's own END, and attention statistics."""

from __future__ import annotations

import torch

from headcircuits import engine, readout, scoring
from headcircuits.tasks import ioi


def test_logit_difference_matches_a_direct_computation(tiny):
    data = ioi.generate(tiny, 12, seed=0)
    table = scoring.evaluate(tiny, data)  # prompts of several lengths: length groups
    for row in range(len(data)):
        ids = data.clean.ids[row, : int(data.clean.lengths[row])]
        logits = tiny.logits(ids[None])[0, -1]
        expected = logits[data.answer[row]] - logits[data.distractor[row]]
        assert abs(table.logit_diff[row] - float(expected)) < 1e-4


def test_logit_difference_is_invariant_to_a_constant_shift():
    logits = torch.randn(4, 10)
    answer, distractor = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 0, 5, 9])
    torch.testing.assert_close(
        scoring.logit_difference(logits, answer, distractor), scoring.logit_difference(logits + 7.0, answer, distractor)
    )


def test_attention_between_is_a_probability_and_matches_the_cache(tiny):
    data = ioi.generate(tiny, 6, seed=0)
    scores = scoring.attention_between(tiny, data, "END", "IO")
    assert scores.shape == (tiny.facts.n_layers, tiny.facts.n_heads)
    assert (scores >= 0).all() and (scores <= 1).all()
    ids = data.clean.ids[0:1, : int(data.clean.lengths[0])]
    _, cache = tiny.bridge.run_with_cache(ids)
    end, io = int(data.positions["END"][0]), int(data.positions["IO"][0])
    one = cache["blocks.1.attn.hook_pattern"][0, :, end, io]
    # the mean over 6 prompts includes this prompt's value with weight 1/6
    assert scores.shape[1] == one.shape[0]
    single = scoring.attention_between(tiny, type(data)(**{**data.__dict__, **_first(data)}), "END", "IO")
    torch.testing.assert_close(single[1], one, rtol=1e-5, atol=1e-6)


def _first(data):
    from headcircuits.models.core import Tokens

    first = lambda t: Tokens(ids=t.ids[:1], lengths=t.lengths[:1])  # noqa: E731
    return dict(
        clean_text=data.clean_text[:1], corrupt_text=data.corrupt_text[:1], clean=first(data.clean),
        corrupt=first(data.corrupt), answer=data.answer[:1], distractor=data.distractor[:1],
        positions={k: v[:1] for k, v in data.positions.items()}, meta=data.meta.iloc[:1],
    )


def test_evaluate_candidate_accuracy_and_margin_match_a_direct_computation(tiny):
    from headcircuits.tasks import laundry_list as ll

    data = ll.generate(tiny, 3, seed=0, lengths=[2, 4])
    table = scoring.evaluate(tiny, data)
    for i in range(len(data)):
        ids = data.clean.ids[i, : int(data.clean.lengths[i])]
        logits = tiny.logits(ids[None])[0, -1]
        cands = [int(c) for c in data.candidates[i] if c >= 0]
        best = max(cands, key=lambda c: float(logits[c]))
        assert bool(table.candidate_correct[i]) == (best == int(data.answer[i]))
        others = max(float(logits[c]) for c in cands if c != int(data.answer[i]))
        assert abs(table.margin[i] - (float(logits[data.answer[i]]) - others)) < 1e-4
        assert bool(table.top1_correct[i]) == (int(logits.argmax()) == int(data.answer[i]))


def test_breakdown_counts_every_prompt_once(tiny):
    from headcircuits.tasks import laundry_list as ll

    table = scoring.evaluate(tiny, ll.generate(tiny, 4, seed=0, lengths=[2, 3, 5]))
    parts = scoring.breakdown(table, ["list_length", "target_position"])
    assert parts.n.sum() == len(table)
    overall = scoring.summarise(table)
    weighted = (parts.candidate_accuracy * parts.n).sum() / parts.n.sum()
    assert abs(weighted - overall["candidate_accuracy"]) < 1e-9


def test_summary_counts_prompts_as_an_integer(tiny):
    summary = scoring.summarise(scoring.evaluate(tiny, ioi.generate(tiny, 7, seed=0)))
    assert summary["n"] == 7 and isinstance(summary["n"], int)


def test_end_logits_skip_the_unembedding_of_other_positions_but_equal_the_full_logits(tiny, monkeypatch):
    data = ioi.generate(tiny, 5, seed=2)
    full = tiny.logits(data.clean)[torch.arange(5), data.positions["END"]]
    torch.testing.assert_close(scoring.end_logits(tiny, data), full, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(readout, "UNEMBED_ROWS", 2)  # the unembedding in chunks that cut across the length groups
    torch.testing.assert_close(scoring.end_logits(tiny, data), full, rtol=1e-5, atol=1e-5)
    columns = torch.stack([data.answer, data.distractor], 1)
    picked = engine.run(tiny, data, logits=columns)[0].logits
    torch.testing.assert_close(picked, full.gather(1, columns), rtol=1e-5, atol=1e-5)


def test_attention_per_prompt_and_under_edits_equals_the_plain_pass(tiny):
    from headcircuits.edits import ResidualAddition
    from headcircuits.engine import Read
    from reference import head_attention_full_pass, plain_run

    data = ioi.generate(tiny, 6, seed=3)
    push = ResidualAddition(0, "S2", torch.randn(tiny.facts.d_model, generator=torch.Generator().manual_seed(0)) * 3)  # LayerNorm removes a constant
    read = Read("pattern", 1, at="END", head=2, keys=("IO", "S1"))
    for edits in ([], [push]):
        got = scoring.attention(tiny, data, (1, 2), "END", ["IO", "S1"], edits)
        _, want = plain_run(tiny, data, edits, [read])
        torch.testing.assert_close(got, torch.cat(want[read]), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(scoring.attention(tiny, data, (1, 2), "END", ["IO"]),
                              scoring.attention(tiny, data, (1, 2), "END", ["IO"], [push]))
    plain = head_attention_full_pass(tiny, data, (1, 2), "END", ["IO", "S1"])
    torch.testing.assert_close(scoring.attention(tiny, data, (1, 2), "END", ["IO", "S1"]), plain, rtol=1e-4, atol=1e-5)
