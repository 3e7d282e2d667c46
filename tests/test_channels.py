"""Inhibition channels: reading a channel's coordinates, the paper's replacement, the paper's subspace, on tiny
models of each family and on GPT-2 small's real weights."""

from __future__ import annotations

import pytest
import torch

from headcircuits import channels, inhibition, scoring, weights
from headcircuits.engine import Read
from headcircuits.tasks import ioi, laundry_list
from reference import plain_run

HEADS = ((1, 2), (2, 0))


def _plain_hooks(edit, data, model):
    rows = torch.arange(len(data))
    return edit.hooks(data, rows, torch.arange(data.clean.ids.shape[1], device=model.device).expand(len(data), -1))


def _outputs(model, data, heads, position="END", edits=()):
    """Each head's output z @ W_O (processed W_O) at ``position``, from the plain pass: {head: [batch, d_model]}."""
    w = weights.from_model(model)
    reads = {l: Read("z", l, at=position) for l in sorted({l for l, _ in heads})}
    _, got = plain_run(model, data, list(edits), list(reads.values()))
    return {(l, h): torch.cat(got[reads[l]])[:, h] @ w.W_O[l, h] for l, h in heads}


@pytest.mark.parametrize("position", ["END", "ITEM_0"])  # END alone, or the whole prompt
def test_coefficients_are_the_heads_outputs_read_along_their_components(tiny, position):
    w = weights.from_model(tiny)
    data = laundry_list.generate(tiny, 4, seed=0, lengths=[2, 3, 5])  # several lengths: several length groups
    ch = channels.Channel.pick(w, {HEADS[0]: [0, 1, 2], HEADS[1]: [2, 0, 1]})
    coef = ch.coefficients(tiny, data, position)
    out = _outputs(tiny, data, HEADS, position)
    expected = torch.cat([out[h] @ ch.directions[i].T for i, h in enumerate(HEADS)], dim=-1)
    assert coef.shape == (len(data), 6) and ch.labels[:2] == ["1.2 c0", "1.2 c1"]
    torch.testing.assert_close(coef, expected, rtol=1e-4, atol=1e-5)
    for n in (2, 3, 5):  # each length alone gives the same numbers
        rows = (data.meta.list_length == n).to_numpy().nonzero()[0]
        torch.testing.assert_close(ch.coefficients(tiny, data.subset(rows), position), coef[rows], rtol=1e-4,
                                   atol=1e-5)


def test_replacing_a_heads_output_by_its_own_coordinates_changes_nothing(tiny):
    """Replacement (the paper's intervention) with every component of a head at its current coordinates gives the
    head's output back: the logits do not change. A different value changes only END, from the head's layer on,
    and the head then writes exactly that value (read back)."""
    w, data = weights.from_model(tiny), ioi.generate(tiny, 6, seed=0)
    offsets = weights.value_offsets(tiny)
    d_head = tiny.facts.d_head
    full = channels.Channel.pick(w, {(1, 2): list(range(d_head)), (2, 0): list(range(d_head))}, offsets=offsets)
    own = full.coefficients(tiny, data)  # [batch, 2 * d_head]
    assert (scoring.end_logits(tiny, data, [channels.ChannelReplacement(full, own)])
            - scoring.end_logits(tiny, data)).abs().max() < 1e-4
    one = channels.Channel.pick(w, {(1, 2): [1]}, offsets=offsets)
    three = channels.ChannelReplacement(one, torch.tensor([3.0]))
    reads = [Read("resid_pre", l) for l in range(tiny.facts.n_layers)]
    _, plain = plain_run(tiny, data, [], reads)
    _, moved = plain_run(tiny, data, [three], reads)
    end = data.at("END")
    for layer, r in enumerate(reads):
        for i in range(len(data)):
            a, b = plain[r][i][0], moved[r][i][0]  # [pos, d_model]
            other = torch.arange(len(a)) != end[i]
            assert torch.equal(a[other], b[other]), f"layer {layer}: a position other than END changed"
            if layer <= 1:
                assert torch.equal(a[end[i]], b[end[i]])
    assert max(float((moved[reads[2]][i][0] - plain[reads[2]][i][0]).abs().max()) for i in range(len(data))) > 1e-3
    torch.testing.assert_close(one.coefficients(tiny, data, edits=[three]), torch.full((len(data), 1), 3.0),
                               rtol=0, atol=1e-4)


def test_setting_one_coordinate_keeps_the_rest_of_the_heads_output(tiny):
    w, data = weights.from_model(tiny), ioi.generate(tiny, 6, seed=0)
    two = channels.Channel.pick(w, {(1, 2): [0, 1]}, offsets=weights.value_offsets(tiny))
    before = two.coefficients(tiny, data)
    target = torch.tensor([before[:, 0].mean().item() + 1.0, 0.0]).expand(len(data), 2).clone()
    target[:, 1] = before[:, 1]  # keep component 1 where it was
    after = two.coefficients(tiny, data, edits=[channels.ChannelReplacement(two, target, mode="set")])
    torch.testing.assert_close(after, target, rtol=0, atol=1e-4)
    rest = channels.Channel.pick(w, {(1, 2): [2, 3]}, offsets=weights.value_offsets(tiny))
    torch.testing.assert_close(rest.coefficients(tiny, data, edits=[channels.ChannelReplacement(two, target,
                                                                                                mode="set")]),
                               rest.coefficients(tiny, data), rtol=0, atol=1e-4)  # the other components stay
    with pytest.raises(ValueError, match="replace"):
        channels.ChannelReplacement(two, target, mode="add")


def test_the_replacement_on_the_engine_equals_the_plain_pass(tiny):
    """One value row per prompt, several lengths: the engine reruns END alone from the lowest channel layer."""
    w = weights.from_model(tiny)
    data = laundry_list.generate(tiny, 4, seed=1, lengths=[3, 5])
    channel = channels.Channel.pick(w, {(1, 0): [0], (1, 3): [1]}, offsets=weights.value_offsets(tiny))
    values = torch.randn(len(data), 2) * 2
    replacement = channels.ChannelReplacement(channel, values)
    fast = scoring.end_logits(tiny, data, [replacement])
    plain, _ = plain_run(tiny, data, [replacement])
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
    assert (fast - scoring.end_logits(tiny, data)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="one per prompt"):
        scoring.end_logits(tiny, data, [channels.ChannelReplacement(channel, values[:2])])


def test_picking_components_is_checked():
    w = weights.HeadWeights(*(torch.randn(3, 2, 16, 4) for _ in range(3)), torch.randn(3, 2, 4, 16))
    with pytest.raises(ValueError, match="same"):
        channels.Channel.pick(w, {(1, 0): [0], (2, 1): [0, 1]})
    with pytest.raises(ValueError, match="between 0 and 3"):
        channels.Channel.pick(w, {(1, 0): [4]})
    picked = channels.Channel.pick(w, {(1, 0): [2], (2, 1): [0]})
    assert picked.labels == ["1.0 c2", "2.1 c0"]
    assert torch.allclose(picked.directions[0, 0], weights.head_svd(w.OV[1, 0]).Vh[2])
    torch.testing.assert_close(picked.back[0, 0] @ picked.W_O[0], picked.directions[0, 0], rtol=1e-4, atol=1e-5)


def test_the_paper_subspace_keeps_the_heads_whose_removal_lowers_inhibition_most():
    w = weights.HeadWeights(*(torch.randn(4, 2, 16, 4) for _ in range(3)), torch.randn(4, 2, 4, 16))
    components = {(1, 0): 2, (1, 1): 0, (2, 0): 3, (2, 1): 1}
    effects = {(1, 0): torch.tensor([-0.1]), (1, 1): torch.tensor([-0.01]), (2, 0): torch.tensor([-0.3]),
               (2, 1): torch.tensor([-0.2])}
    sub = channels.paper_subspace(w, components, effects)
    assert sub.heads == ((2, 0), (2, 1), (1, 0)) and sub.components == ((3,), (1,), (2,))


def test_the_mover_is_the_one_attending_most_to_io(tiny):
    data = ioi.generate(tiny, 6, seed=0)
    movers = [(2, 0), (2, 1), (2, 3)]
    to_io = [float(scoring.attention(tiny, data, m, "END", ["IO"]).mean()) for m in movers]
    assert inhibition.choose_mover(tiny, data, movers) == movers[int(torch.tensor(to_io).argmax())]
    with pytest.raises(ValueError, match="no mover"):
        inhibition.choose_mover(tiny, data, [])


def test_gpt2_channel_components_and_their_effect_sign(gpt2_weights):
    """On GPT-2 small's weights the channel components for mover 9.9 are the paper's (7.9.6, 8.6.2, 8.10.1)."""
    found = channels.channel_components(gpt2_weights, [(7, 3), (7, 9), (8, 6), (8, 10)], (9, 9))
    assert found[(7, 9)] == 6 and found[(8, 6)] == 2 and found[(8, 10)] == 1


def test_gpt2_the_duplicate_channel_is_3_0_1_and_3_0_2(gpt2_weights):
    """Wang et al.'s duplicate-token heads 0.1, 0.10 and 3.0: the one whose two top components value-compose most
    with 7.9.6 is 3.0, through 3.0.1 and 3.0.2 (Talking Heads §4)."""
    head, comps = channels.duplicate_channel(gpt2_weights, [(0, 1), (0, 10), (3, 0)], (7, 9), 6)
    assert head == (3, 0) and comps == [1, 2]
    with pytest.raises(ValueError, match="below the receiver"):
        channels.duplicate_channel(gpt2_weights, [(8, 1)], (7, 9), 6)
