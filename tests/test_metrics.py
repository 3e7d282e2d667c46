"""Metrics read at each prompt's own END."""

from __future__ import annotations

import pytest
import torch

from headcircuits import metrics
from headcircuits.tasks import ioi


def test_logit_difference_matches_a_direct_computation(tiny):
    data = ioi.generate(tiny, 12, seed=0)
    table = metrics.evaluate(tiny, data, batch_size=5)  # batches of 5: padding differs between batches
    for row in range(len(data)):
        ids = data.clean.ids[row, : int(data.clean.lengths[row])]
        logits = tiny.logits(ids[None])[0, -1]
        expected = logits[data.answer[row]] - logits[data.distractor[row]]
        assert abs(table.logit_diff[row] - float(expected)) < 1e-4


def test_logit_difference_is_invariant_to_a_constant_shift():
    logits = torch.randn(4, 10)
    answer, distractor = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 0, 5, 9])
    torch.testing.assert_close(
        metrics.logit_difference(logits, answer, distractor), metrics.logit_difference(logits + 7.0, answer, distractor)
    )


def test_attention_between_is_a_probability_and_matches_the_cache(tiny):
    data = ioi.generate(tiny, 6, seed=0)
    scores = metrics.attention_between(tiny, data, "END", "IO", batch_size=4)
    assert scores.shape == (tiny.facts.n_layers, tiny.facts.n_heads)
    assert (scores >= 0).all() and (scores <= 1).all()
    ids = data.clean.ids[0:1, : int(data.clean.lengths[0])]
    _, cache = tiny.bridge.run_with_cache(ids)
    end, io = int(data.positions["END"][0]), int(data.positions["IO"][0])
    one = cache["blocks.1.attn.hook_pattern"][0, :, end, io]
    # the mean over 6 prompts includes this prompt's value with weight 1/6
    assert scores.shape[1] == one.shape[0]
    single = metrics.attention_between(tiny, type(data)(**{**data.__dict__, **_first(data)}), "END", "IO")
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
    table = metrics.evaluate(tiny, data, batch_size=4)
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

    table = metrics.evaluate(tiny, ll.generate(tiny, 4, seed=0, lengths=[2, 3, 5]))
    parts = metrics.breakdown(table, ["list_length", "target_position"])
    assert parts.n.sum() == len(table)
    overall = metrics.summarise(table)
    weighted = (parts.candidate_accuracy * parts.n).sum() / parts.n.sum()
    assert abs(weighted - overall["candidate_accuracy"]) < 1e-9


def test_summary_counts_prompts_as_an_integer(tiny):
    summary = metrics.summarise(metrics.evaluate(tiny, ioi.generate(tiny, 7, seed=0)))
    assert summary["n"] == 7 and isinstance(summary["n"], int)


def test_end_logits_skip_the_unembedding_of_other_positions_but_equal_the_full_logits(tiny, monkeypatch):
    data = ioi.generate(tiny, 5, seed=2)
    full = tiny.logits(data.clean)[torch.arange(5), data.positions["END"]]
    torch.testing.assert_close(metrics.end_logits(tiny, data, batch_size=2), full, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(metrics, "UNEMBED_ROWS", 2)  # the unembedding in chunks that cut across the batches
    torch.testing.assert_close(metrics.end_logits(tiny, data, batch_size=3), full, rtol=1e-5, atol=1e-5)
    columns = torch.stack([data.answer, data.distractor], 1)
    normed = metrics.final_normed(tiny, data.clean.ids, positions=data.positions["END"])
    torch.testing.assert_close(metrics.unembed(tiny, normed, columns), full.gather(1, columns), rtol=1e-5, atol=1e-5)


def test_recorded_activations_equal_the_cache_and_the_run_stops_after_the_last(tiny):
    """metrics.recorded: the named activations of the full cached run, and nothing after the last of them runs
    (no unembedding); an unknown name is an error that names it."""
    ids = tiny.to_tokens(["When Mary and John went to the store, John gave a drink to"]).ids
    names = ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_z", "ln_final.hook_out"]
    _, cache = tiny.bridge.run_with_cache(ids, names_filter=lambda n: n in names)
    later = []
    got = metrics.recorded(tiny, ids, names[:2], hooks=[("unembed.hook_in", lambda x, hook: later.append(1)),
                                                         ("blocks.2.hook_resid_pre", lambda x, hook: later.append(2))])
    assert later == [] and set(got) == set(names[:2])
    for n in names[:2]:
        torch.testing.assert_close(got[n], cache[n], rtol=0, atol=0)
    torch.testing.assert_close(metrics.recorded(tiny, ids, names)["ln_final.hook_out"], cache["ln_final.hook_out"],
                               rtol=0, atol=0)
    with pytest.raises(KeyError, match="blocks.9.attn.hook_pattern"):
        metrics.recorded(tiny, ids, ["blocks.9.attn.hook_pattern"])
