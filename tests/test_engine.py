"""The engine against the plain hooked forward pass: every mode, every edit, every tiny family, prompts of mixed
lengths (so the length groups, the kept clean passes and the copies of END are all exercised)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from headcircuits import engine, passes
from headcircuits.edits import Edit, ResidualAddition
from headcircuits.engine import Read
from headcircuits.models import architecture
from headcircuits.store import STORE
from headcircuits.tasks import ioi, laundry_list
from reference import plain_run

TOL = dict(rtol=1e-4, atol=1e-4)


@dataclass(frozen=True)
class Scale(Edit):
    """A test edit of every position: the residual stream entering ``layer`` times ``factor``."""

    layer: int
    factor: float
    position = None

    @property
    def layers(self):
        return (self.layer,)

    def hooks(self, data, rows, positions):
        return [(architecture.hook("resid_pre", self.layer), lambda x, hook: x * self.factor)]


def _mixed(model, n=6):
    data = laundry_list.generate(model, n, seed=1, lengths=[2, 3, 4])
    assert len(set(data.clean.lengths.tolist())) > 1
    return data


def _close(fast: torch.Tensor, slow: list[torch.Tensor]):
    """A read in data order (zero-padded) against the oracle's per-prompt values."""
    for i, value in enumerate(slow):
        value = value[0]
        torch.testing.assert_close(fast[i][tuple(slice(0, s) for s in value.shape)], value, **TOL)


def test_unedited_logits_and_reads_equal_the_plain_pass(tiny):
    data = _mixed(tiny)
    L = tiny.facts.n_layers
    reads = [Read("pattern", 1, at="END", head=1, keys=("ITEM_0", "ITEM_1")), Read("z", 0, at="END"),
             Read("resid_pre", 2), Read("pattern", L - 1), Read("final_out", at="END")]
    want_logits, want = plain_run(tiny, data, reads=reads)
    for mode_reads in (reads, reads[:2] + reads[4:]):  # with reads at every position (full) or at END only
        got = engine.run(tiny, data, read=mode_reads, logits="end")[0]
        torch.testing.assert_close(got.logits, want_logits, **TOL)
        for r in mode_reads:
            _close(got[r], want[r])


def test_neighbouring_lengths_share_a_right_padded_batch(tiny, monkeypatch):
    """A few prompts of each length run as one batch padded on the right (it changes no real token: attention is
    causal): reads at every position are the plain pass's and exactly 0 past each prompt's end, and the same as
    runs of one length per batch."""
    data = _mixed(tiny, n=8)
    groups = passes.length_groups(data)
    assert len(groups) < len(data.clean.lengths.unique())  # some lengths share a batch
    assert sorted(torch.cat([i for i, _ in groups]).tolist()) == list(range(len(data)))
    assert all(int(data.clean.lengths[i].max()) == w for i, w in groups)
    reads = [Read("resid_post", 1), Read("pattern", 0), Read("z", 1, at="END")]
    STORE.clear()
    merged = engine.run(tiny, data, read=reads, logits="end")[0]
    _, want = plain_run(tiny, data, reads=reads)
    for r in reads:
        _close(merged[r], want[r])
    lengths = data.clean.lengths
    for i, n in enumerate(lengths.tolist()):
        assert merged[reads[0]][i, n:].abs().sum() == 0
        assert merged[reads[1]][i, :, n:].abs().sum() + merged[reads[1]][i, :, :, n:].abs().sum() == 0
    monkeypatch.setattr(passes, "MERGE_TOKENS", 0)
    STORE.clear()
    assert len(passes.length_groups(data)) == len(lengths.unique())
    alone = engine.run(tiny, data, read=reads, logits="end")[0]
    torch.testing.assert_close(alone.logits, merged.logits, rtol=0, atol=1e-5)
    for r in reads:
        torch.testing.assert_close(alone[r], merged[r], rtol=0, atol=1e-5)


def test_reads_alone_stop_after_the_highest_block_read(tiny, monkeypatch):
    data = _mixed(tiny)
    ran, run_block = [], architecture.run_block
    monkeypatch.setattr(architecture, "run_block", lambda m, layer, *a: ran.append(layer) or run_block(m, layer, *a))
    STORE.clear()
    got = engine.run(tiny, data, read=[Read("z", 1, at="END")])[0]
    assert got.logits is None and max(ran) == 1
    _, want = plain_run(tiny, data, reads=[Read("z", 1, at="END")])
    _close(got[Read("z", 1, at="END")], want[Read("z", 1, at="END")])


@pytest.mark.parametrize("position", ["END", "ITEM_0"])  # END alone, or every position
def test_a_residual_addition_equals_the_plain_pass_in_every_mode(tiny, position):
    data = _mixed(tiny)
    g = torch.Generator().manual_seed(0)
    per_prompt = torch.randn(len(data), tiny.facts.d_model, generator=g)
    conditions = [[], [ResidualAddition(0, position, per_prompt)],
                  [ResidualAddition(1, position, per_prompt[:1] * 3), ResidualAddition(0, position, -per_prompt)]]
    read = [Read("pattern", 2, at="END", keys=("ITEM_0", "ITEM_1")), Read("z", 1, at="END", head=0)]
    got = engine.run(tiny, data, conditions, read=read, logits="end", max_tokens=4)  # conditions split over steps
    for result, edits in zip(got, conditions):
        want_logits, want = plain_run(tiny, data, edits, read)
        torch.testing.assert_close(result.logits, want_logits, **TOL)
        for r in read:
            _close(result[r], want[r])
    assert (got[1].logits - got[0].logits).abs().max() > 1e-3  # the edits reach the logits


def test_listed_columns_are_the_vocabularys_and_bad_requests_are_refused(tiny):
    data = _mixed(tiny)
    columns = torch.stack([data.answer, data.distractor, torch.full_like(data.answer, -1)], 1)
    full, some = (engine.run(tiny, data, [[], [ResidualAddition(1, "END", torch.ones(tiny.facts.d_model))]],
                             logits=logits) for logits in ("end", columns))
    for a, b in zip(full, some):
        torch.testing.assert_close(b.logits[:, :2], a.logits.gather(1, columns[:, :2]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="nothing to compute"):
        engine.run(tiny, data)
    with pytest.raises(ValueError, match="one row per prompt"):
        engine.run(tiny, data, logits=columns[:2])
    with pytest.raises(KeyError, match="unknown hook kind"):
        Read("attention", 0)
    with pytest.raises(KeyError, match="not in this"):
        engine.run(tiny, data, read=[Read("z", 0, at="S2")])


def test_a_kept_clean_pass_serves_the_next_run_on_the_same_prompts(tiny, monkeypatch):
    data = ioi.generate(tiny, 5, seed=0)
    calls, clean_pass = [], passes.clean_pass
    monkeypatch.setattr(passes, "clean_pass", lambda *a, **k: calls.append(a[2]) or clean_pass(*a, **k))
    STORE.clear()
    first = engine.run(tiny, data, [[ResidualAddition(1, "END", torch.ones(tiny.facts.d_model))]], logits="end")
    n = len(calls)
    assert n > 0 and set(calls) == {1}
    again = engine.run(tiny, data, [[ResidualAddition(2, "END", torch.ones(tiny.facts.d_model))]], logits="end")
    assert len(calls) == n  # a pass kept from block 1 serves block 2
    engine.run(tiny, data, [[ResidualAddition(0, "END", torch.ones(tiny.facts.d_model))]], logits="end")
    assert len(calls) > n and calls[-1] == 0  # not from block 0: a new pass
    assert not torch.equal(first[0].logits, again[0].logits)


@pytest.mark.parametrize("position", ["END", "ITEM_0"])  # END alone, or a suffix over the earlier tokens
def test_a_pass_kept_through_fewer_blocks_is_extended_upwards(tiny, monkeypatch, position):
    """A run that reads block 0 keeps a pass through block 0 only; a later run up to the logits extends that pass
    (no new pass over the prompts) and equals the plain pass."""
    data = _mixed(tiny)
    calls, clean_pass = [], passes.clean_pass
    monkeypatch.setattr(passes, "clean_pass", lambda *a, **k: calls.append(k.get("top")) or clean_pass(*a, **k))
    edit = ResidualAddition(0, position, torch.ones(tiny.facts.d_model))
    STORE.clear()
    engine.run(tiny, data, [[edit]], read=[Read("z", 0, at="END")])
    assert calls and set(calls) == {0}  # through block 0 alone
    got = engine.run(tiny, data, [[edit]], logits="end")[0]
    assert set(calls) == {0}  # extended, not recomputed
    want, _ = plain_run(tiny, data, [edit])
    torch.testing.assert_close(got.logits, want, **TOL)


def test_conditions_side_by_side_equal_one_condition_at_a_time(tiny):
    """Copies of END see the earlier tokens and themselves only (a block-diagonal mask): each condition of a step
    equals the same condition run alone (different values per condition, so a copy that saw another would
    differ)."""
    data = _mixed(tiny)
    g = torch.Generator().manual_seed(1)
    conditions = [[ResidualAddition(0, "END", torch.randn(tiny.facts.d_model, generator=g) * 2)] for _ in range(4)]
    read = [Read("pattern", 2, at="END", keys=("ITEM_0",)), Read("resid_post", 2, at="END")]
    together = engine.run(tiny, data, conditions, read=read, logits="end")
    for c, alone in zip(conditions, together):
        single = engine.run(tiny, data, [c], read=read, logits="end")[0]
        torch.testing.assert_close(alone.logits, single.logits, rtol=0, atol=1e-5)
        for r in read:
            torch.testing.assert_close(alone[r], single[r], rtol=0, atol=1e-5)
    assert (together[0].logits - together[1].logits).abs().max() > 1e-3


def test_a_clean_pass_below_the_first_edit_stops_there(tiny):
    """An edit of every position at block 2: the clean pass runs blocks 0-1 only (no key/value cache is kept), and
    the run from block 2 equals the plain pass."""
    data = _mixed(tiny)
    ran = []
    with tiny.bridge.hooks(fwd_hooks=[(architecture.hook("resid_post", l), lambda x, hook, l=l: ran.append(l) or x)
                                      for l in range(tiny.facts.n_layers)]):
        resid, end, kv = passes.clean_pass(tiny, data.clean.ids[:1, : int(data.clean.lengths[0])], 2, False, False)
    assert ran == [0, 1] and set(resid) == {2} and end == {} and kv == {}
    edit = Scale(2, 1.5)
    got = engine.run(tiny, data, [[edit]], logits="end")[0]
    want, _ = plain_run(tiny, data, [edit])
    torch.testing.assert_close(got.logits, want, **TOL)


def _edits(model, position):
    """One edit of every kind of the library, changing ``position`` (None: every position, through a weight
    edit, which changes every position by nature)."""
    from headcircuits import channels, inhibition, repair, weights

    w = weights.from_model(model)
    g = torch.Generator().manual_seed(7)
    if position is None:
        return {"weight edit": inhibition.weight_edit(model, w, (1, 1), zero=[0, 2])}
    channel = channels.Channel.pick(w, {(0, 1): [0], (1, 2): [1]}, offsets=weights.value_offsets(model))
    return {
        "residual addition": ResidualAddition(0, position, torch.randn(model.facts.d_model, generator=g) * 3),
        "forced attention": repair.ForcedAttention(((1, 0), (2, 3)), ("ITEM_0",), query=position, strength=0.9),
        "channel replacement": channels.ChannelReplacement(channel, torch.randn(2, generator=g) * 4, position),
        "channel set": channels.ChannelReplacement(channel, torch.randn(2, generator=g) * 4, position, mode="set"),
    }


@pytest.mark.parametrize("position", ["END", "ITEM_1", None])  # END alone / the suffix from ITEM_1 / every token
def test_every_edit_on_every_mode_equals_the_plain_hooked_pass(tiny, position):
    """The matrix: each kind of edit, alone and all together in one condition, beside an unedited condition, with
    reads below, at and above the edited blocks, on prompts of mixed lengths, against the plain hooked pass."""
    data = _mixed(tiny)
    edits = _edits(tiny, position)
    conditions = [[], *([e] for e in edits.values()), list(edits.values())]
    where = position or "END"
    read = [Read("z", 0, at=where), Read("pattern", 2, at="END", keys=("ITEM_0", "ITEM_1")),
            Read("resid_post", 1, at="END")]
    got = engine.run(tiny, data, conditions, read=read, logits="end")
    for result, condition in zip(got, conditions):
        want_logits, want = plain_run(tiny, data, condition, read)
        label = ", ".join(type(e).__name__ for e in condition) or "none"
        torch.testing.assert_close(result.logits, want_logits, **TOL, msg=label)
        for r in read:
            _close(result[r], want[r])
    for result in got[1:]:
        assert (result.logits - got[0].logits).abs().max() > 1e-4  # every edit reaches the logits
