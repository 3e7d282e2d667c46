"""Talking Heads' traversal, its regions and the oracle fix, against the plain hooked forward pass."""

from __future__ import annotations

import pytest
import torch

from headcircuits import channels, engine, passes, readout, scoring, traversal, weights
from headcircuits.engine import Read
from headcircuits.store import STORE
from headcircuits.tasks import laundry_list
from reference import plain_run


def _attention(model, data, channel, point, mover, keys, mode="replace"):
    read = Read("pattern", mover[0], at="END", head=mover[1], keys=tuple(keys))
    _, got = plain_run(model, data, [channels.ChannelReplacement(channel, point, mode=mode)], [read])
    return torch.cat(got[read])


@pytest.mark.parametrize("mode", ["replace", "set"])
def test_the_traversal_equals_the_plain_hooked_forward_pass(tiny, mode, monkeypatch):
    """At every point the mover's attention of the plain hooked run (prompts of several lengths, heads in two
    layers, points split over runs); another channel of the same prompts starts from the kept pass."""
    w = weights.from_model(tiny)
    data = laundry_list.generate(tiny, 5, seed=0, lengths=[3, 4])
    assert len(set(data.clean.lengths.tolist())) > 1
    offsets = weights.value_offsets(tiny)
    channel = channels.Channel.pick(w, {(0, 1): [0], (1, 2): [1], (1, 3): [2]}, offsets=offsets)
    points = torch.tensor([[0.0, 0.0, 0.0], [2.0, -1.0, 0.5], [-3.0, 1.5, 2.0]])
    mover, keys = (2, 0), ["ITEM_0", "ITEM_1", "ITEM_2"]
    fast = traversal.traverse(tiny, data, channel, points, mover, keys, points_per_run=2, mode=mode, progress=False)
    assert fast.shape == (3, len(data), 3)
    for i, point in enumerate(points):
        assert (fast[i] - _attention(tiny, data, channel, point, mover, keys, mode)).abs().max() < 1e-5, i
    assert (fast[1] - fast[2]).abs().max() > 1e-4  # the points differ: the replacement reaches the mover
    calls, clean_pass = [], passes.clean_pass
    monkeypatch.setattr(passes, "clean_pass", lambda *a, **k: calls.append(1) or clean_pass(*a, **k))
    other = channels.Channel.pick(w, {(0, 2): [1], (1, 0): [0], (1, 1): [2]}, offsets=offsets)
    again = traversal.traverse(tiny, data, other, points, mover, keys, mode=mode, progress=False)
    assert calls == []
    for i, point in enumerate(points):
        assert (again[i] - _attention(tiny, data, other, point, mover, keys, mode)).abs().max() < 1e-5, i
    with pytest.raises(ValueError, match="below the channel"):
        traversal.traverse(tiny, data, channels.Channel.pick(w, {(1, 2): [1]}), points[:, :1], (0, 0), keys,
                           progress=False)


def test_reading_the_channel_then_traversing_then_fixing_runs_one_clean_pass(tiny, monkeypatch):
    """Chapter 06 reads the coordinates at END, traverses, then sets each prompt's channel (the fix): the engine
    keeps the clean pass of the first, from the channel's lowest block, and the others start from it."""
    w = weights.from_model(tiny)
    data = laundry_list.generate(tiny, 5, seed=1, lengths=[2, 3, 4])
    channel = channels.Channel.pick(w, {(0, 1): [0, 2], (1, 3): [1, 0]}, offsets=weights.value_offsets(tiny))
    calls, clean_pass = [], passes.clean_pass
    monkeypatch.setattr(passes, "clean_pass", lambda *a, **k: calls.append(a[2]) or clean_pass(*a, **k))
    monkeypatch.setattr(passes, "MERGE_TOKENS", 0)  # one batch per length: several passes to keep
    STORE.clear()
    channel.coefficients(tiny, data)
    first = len(calls)
    assert first == len(passes.length_groups(data)) > 1 and set(calls) == {0}  # a pass per length group, from
    # the channel's lowest block
    points = torch.tensor([[0.5, -1.0, 2.0, 0.0], [-2.0, 1.0, 0.0, 3.0]])
    traversal.traverse(tiny, data, channel, points, (2, 1), ["ITEM_0", "ITEM_1"], progress=False)
    fixed = traversal.end_logits_under(tiny, data, channel, [None, torch.randn(len(data), 4)])
    assert len(calls) == first
    plain, _ = plain_run(tiny, data)
    torch.testing.assert_close(fixed[0], plain, rtol=1e-4, atol=1e-4)


def test_the_fix_can_unembed_the_listed_items_only(tiny, monkeypatch):
    """end_logits_under(columns=the items) gives exactly the items' columns of the whole vocabulary's logits
    (padding included, clamped), and candidate_correct on them equals evaluate's candidate_correct; chunks of the
    unembedding cut across conditions and prompts."""
    w = weights.from_model(tiny)
    data = laundry_list.generate(tiny, 6, seed=4, lengths=[2, 3, 4])
    items = scoring.candidates_of(data)
    assert (items < 0).any()  # shorter lists are padded
    channel = channels.Channel.pick(w, {(1, 0): [0], (2, 3): [1]}, offsets=weights.value_offsets(tiny))
    values = [None, torch.randn(len(data), 2) * 3, torch.tensor([4.0, -4.0])]
    whole = traversal.end_logits_under(tiny, data, channel, values)
    monkeypatch.setattr(readout, "UNEMBED_ROWS", 4)
    picked = traversal.end_logits_under(tiny, data, channel, values, columns=items)
    for full, few in zip(whole, picked):
        assert few.shape == items.shape
        assert (few - full.gather(1, items.clamp(min=0))).abs().max() < 1e-5
        assert (scoring.candidate_correct(data, few).tolist()
                == scoring.evaluate(tiny, data, logits=full).candidate_correct.tolist())
    correct = [scoring.candidate_correct(data, few) for few in picked]
    assert any(not torch.equal(correct[0], c) for c in correct[1:])  # the values change some answers
    padded = picked[0].masked_fill(items < 0, 1e9)  # padding is ignored: a huge logit there changes nothing
    assert torch.equal(scoring.candidate_correct(data, padded), correct[0])
    with pytest.raises(ValueError, match="candidates'"):
        scoring.candidate_correct(data, whole[0])
    with pytest.raises(ValueError, match="one row per prompt"):
        traversal.end_logits_under(tiny, data, channel, values, columns=items[:2])


def test_several_value_sets_share_one_run_and_equal_one_at_a_time(tiny):
    w = weights.from_model(tiny)
    data = laundry_list.generate(tiny, 3, seed=2, lengths=[3, 4])
    channel = channels.Channel.pick(w, {(2, 1): [0]})
    # two sets far apart (b: one value per prompt, all below -1)
    a, b = torch.tensor([1.5]), torch.linspace(-3.0, -1.0, len(data))[:, None]
    both = traversal.end_logits_under(tiny, data, channel, [a, b])
    assert (both[0] - both[1]).abs().max() > 0.05
    for values, got in zip((a, b), both):
        alone = traversal.end_logits_under(tiny, data, channel, [values])[0]
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
        plain, _ = plain_run(tiny, data, [channels.ChannelReplacement(channel, values)])
        torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-4)


def test_pieces_counts_connected_regions_per_index():
    labels = torch.tensor([
        [0, 0, 1],
        [2, 0, 1],
        [0, 2, 2],
    ]).flatten()
    assert traversal.pieces(labels, (3, 3)) == {0: 2, 1: 1, 2: 2}  # 0: top-left block and the lone corner
    cube = torch.zeros(2, 2, 2, dtype=torch.long)
    cube[0, 0, 0] = cube[1, 1, 1] = 1  # opposite corners touch no face
    assert traversal.pieces(cube.flatten(), (2, 2, 2)) == {0: 1, 1: 2}


def test_grid_regions_and_centroids():
    coords = torch.tensor([[0.0, 10.0], [1.0, 20.0]])
    points = traversal.grid(coords, resolution=3, margin=0.0)
    assert points.shape == (9, 2)
    assert torch.allclose(points[:3], torch.tensor([[0.0, 10.0], [0.0, 15.0], [0.0, 20.0]]))
    attention = torch.zeros(9, 4, 3)
    attention[:5, :, 0] = 1.0  # the first five points send the mover to item 0 on every prompt
    attention[5:, :, 2] = 1.0
    labels = traversal.regions(attention)
    assert labels.tolist() == [0] * 5 + [2] * 4
    found = traversal.centroids(points, labels, 3)
    assert set(found) == {0, 2} and torch.allclose(found[0], points[:5].mean(0))
    attention[0, :, 1] = 0.5  # item 1 has no region; with the attention, its best point stands in
    assert torch.equal(traversal.centroids(points, labels, 3, attention)[1], points[0])
    with pytest.raises(ValueError, match="at least 2"):
        traversal.grid(coords, resolution=1)
