"""Inhibition channels: reading the channel, the positional subspace, shifts along it and weight edits."""

from __future__ import annotations

import pytest
import torch

from headcircuits import channels, interventions, metrics, svd
from headcircuits.tasks import ioi, laundry_list
from reference import head_attention_full_pass

HEADS = ((1, 2), (2, 0))


@pytest.fixture(scope="module")
def setup():
    cache = {}

    def make(model):
        if model.name not in cache:
            w = svd.from_model(model)
            cache[model.name] = (w, ioi.generate(model, 6, seed=0), channels.Channel.of(w, HEADS, per_head=3))
        return cache[model.name]

    return make


def _outputs(model, data, heads, hooks=()):
    """Each head's output z @ W_O (processed W_O) at END, under ``hooks``: {head: [batch, d_model]}."""
    w = svd.from_model(model)
    layers = sorted({l for l, _ in heads})
    names = {f"blocks.{l}.attn.hook_z" for l in layers}
    seen = {}

    def record(z, hook, layer):
        seen[layer] = z.detach().clone()
        return z

    with torch.no_grad():
        model.bridge.run_with_hooks(data.clean.ids, fwd_hooks=[
            *hooks, *((name, lambda z, hook, l=int(name.split(".")[1]): record(z, hook, l)) for name in names)])
    rows, end = torch.arange(len(data)), data.positions["END"]
    return {(l, h): seen[l][rows, end, h] @ w.W_O[l, h] for l, h in heads}


def test_coefficients_are_the_heads_outputs_read_along_their_top_components(tiny, setup):
    w, data, ch = setup(tiny)
    coef = ch.coefficients(tiny, data, batch_size=4)  # two batches of different padded widths
    out = _outputs(tiny, data, HEADS)
    expected = torch.cat([out[h] @ svd.head_svd(w.OV[h]).Vh[:3].T for h in HEADS], dim=-1)
    assert coef.shape == (len(data), len(HEADS) * 3)
    torch.testing.assert_close(coef, expected, rtol=1e-4, atol=1e-5)
    assert ch.labels[:2] == ["1.2 c0", "1.2 c1"]


def test_a_shift_adds_exactly_delta_along_the_written_directions_and_scale_zero_changes_nothing(tiny, setup):
    w, data, _ = setup(tiny)
    head = (1, 2)
    ch = channels.Channel.of(w, [head], per_head=3)
    delta = torch.tensor([0.5, -1.0, 2.0])
    before = _outputs(tiny, data, [head])[head]
    shift = channels.ChannelShift(ch, delta)
    after = _outputs(tiny, data, [head], shift.hooks_for(data)(0, len(data)))[head]
    centre = (lambda x: x - x.mean(-1, keepdim=True)) if tiny.facts.norm == "layernorm" else (lambda x: x)
    torch.testing.assert_close(centre(after - before), centre(delta @ ch.directions[0]).expand_as(before),
                               rtol=1e-4, atol=1e-5)
    zero = channels.ChannelShift(ch, delta, scale=0.0)
    assert zero.hooks_for(data)(0, len(data)) == []
    plain = metrics.end_logits(tiny, data)
    torch.testing.assert_close(metrics.end_logits(tiny, data, hooks_for=zero.hooks_for(data)), plain, rtol=0, atol=0)
    nothing = channels.ChannelShift(ch, torch.zeros(3))
    torch.testing.assert_close(metrics.end_logits(tiny, data, hooks_for=nothing.hooks_for(data)), plain,
                               rtol=0, atol=1e-5)
    moved = metrics.end_logits(tiny, data, hooks_for=shift.hooks_for(data))
    assert float((moved - plain).abs().max()) > 1e-4


def test_per_prompt_shifts_and_wrong_sizes(tiny, setup):
    w, data, ch = setup(tiny)
    per_prompt = torch.zeros(len(data), len(HEADS) * 3)
    per_prompt[0, 0] = 3.0  # only the first prompt moves
    shift = channels.ChannelShift(ch, per_prompt)
    plain = metrics.end_logits(tiny, data)
    moved = metrics.end_logits(tiny, data, hooks_for=shift.hooks_for(data), batch_size=4)
    torch.testing.assert_close(moved[1:], plain[1:], rtol=0, atol=1e-5)
    assert float((moved[0] - plain[0]).abs().max()) > 1e-4
    with pytest.raises(ValueError, match="one per prompt"):
        channels.ChannelShift(ch, torch.zeros(len(data) + 1, len(HEADS) * 3)).hooks_for(data)


def test_fit_finds_the_axis_along_which_positions_differ():
    heads = ((0, 0),)
    ch = channels.Channel(heads=heads, components=((0, 1, 2),), directions=torch.eye(3)[None],
                          W_O=torch.eye(3)[None], singular_values=torch.ones(1, 3))
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    coef = 0.01 * torch.randn(60, 3, generator=gen)
    coef[:, 1] += labels.float() * 2.0  # positions differ only along coefficient 1
    fitted = ch.fit(coef, labels, rank=3)
    assert fitted.axes.shape == (2, 3)  # at most (number of positions - 1) axes
    torch.testing.assert_close(fitted.axes @ fitted.axes.T, torch.eye(2), rtol=0, atol=1e-5)
    assert abs(float(fitted.axes[0, 1])) > 0.999
    xy = fitted.coords(coef)
    assert abs(float(torch.corrcoef(torch.stack([xy[:, 0], labels.float()]))[0, 1])) > 0.99
    line = ch.fit(coef, labels, rank=1)  # the one axis that carries the signal
    torch.testing.assert_close(line.project(torch.tensor([1.0, 0.0, 0.0])), torch.zeros(3), rtol=0, atol=0.05)
    torch.testing.assert_close(line.project(torch.tensor([0.0, 1.0, 0.0])).abs(), torch.tensor([0.0, 1.0, 0.0]),
                               rtol=0, atol=0.05)
    with pytest.raises(ValueError, match="two answer positions"):
        ch.fit(coef, torch.zeros(60, dtype=torch.long))
    with pytest.raises(RuntimeError, match="fit the channel first"):
        ch.coords(coef)


def test_bad_channels_are_refused_with_the_fix(tiny, setup):
    w, _, _ = setup(tiny)
    with pytest.raises(ValueError, match="at least one head"):
        channels.Channel.of(w, [])
    with pytest.raises(ValueError, match="per_head"):
        channels.Channel.of(w, HEADS, per_head=10_000)


def test_random_like_keeps_each_rows_norm_and_is_deterministic():
    delta = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    r = channels.random_like(delta, seed=1)
    torch.testing.assert_close(r.norm(dim=-1), delta.norm(dim=-1))
    torch.testing.assert_close(r, channels.random_like(delta, seed=1), rtol=0, atol=0)
    assert not torch.allclose(r, channels.random_like(delta, seed=2))


def test_weight_edit_scales_the_components_and_equals_the_edited_W_O(tiny, setup):
    w, data, _ = setup(tiny)
    head = (2, 0)
    Vh = svd.head_svd(w.OV[head]).Vh
    before = _outputs(tiny, data, [head])[head]
    edit = interventions.ComponentAblation.of(w, head, [0, 2], scale=2.0)
    after = _outputs(tiny, data, [head], edit.hooks())[head]
    centre = (lambda x: x - x.mean(-1, keepdim=True)) if tiny.facts.norm == "layernorm" else (lambda x: x)
    a, b = centre(after), centre(before)
    torch.testing.assert_close(a @ Vh[[0, 2]].T, 2 * (b @ Vh[[0, 2]].T), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a @ Vh[[1, 3]].T, b @ Vh[[1, 3]].T, rtol=1e-4, atol=1e-5)
    # the hook is the weight edit: z @ edited W_O == the hooked output
    z = torch.randn(5, w.W_O.shape[-2], generator=torch.Generator().manual_seed(0))
    read, back = edit._maps()
    torch.testing.assert_close(z @ edit.edited_W_O(), (z - (1 - edit.scale) * (z @ read) @ back) @ edit.W_O,
                               rtol=1e-4, atol=1e-4)
    assert interventions.ComponentAblation.of(w, head, [0, 2], scale=1.0).hooks() == []


def test_the_channel_reads_the_laundry_list_on_every_length(tiny, setup):
    """Bookkeeping the channel relies on: END and the target position of every prompt, at every length."""
    w, _, ch = setup(tiny)
    data = laundry_list.generate(tiny, 4, seed=0, lengths=[2, 3, 5])
    coef = ch.coefficients(tiny, data, batch_size=5)  # batches that mix lengths and padding
    out = _outputs(tiny, data, ch.heads)  # one unbatched run, read at each prompt's own END
    expected = torch.cat([out[h] @ ch.directions[i].T for i, h in enumerate(ch.heads)], dim=-1)
    torch.testing.assert_close(coef, expected, rtol=1e-4, atol=1e-5)
    for n in (2, 3, 5):  # each length alone gives the same numbers as the mixed batches
        alone = laundry_list.generate(tiny, 4, seed=0, lengths=[2, 3, 5]).subset(
            (data.meta.list_length == n).to_numpy().nonzero()[0])
        torch.testing.assert_close(ch.coefficients(tiny, alone), coef[torch.as_tensor(
            (data.meta.list_length == n).to_numpy())], rtol=1e-4, atol=1e-5)
    fitted = ch.fit(coef, data.meta.target_position.values, rank=3)
    torch.testing.assert_close(fitted.axes @ fitted.axes.T, torch.eye(3), rtol=0, atol=1e-5)  # orthonormal axes


def test_steering_lands_on_the_target_coordinates(tiny, setup):
    w, data, ch = setup(tiny)
    coef = ch.coefficients(tiny, data)
    labels = [0, 1, 0, 1, 0, 1]
    fitted = ch.fit(coef, labels, rank=1)
    means = {0: coef[0], 1: coef[1] + 1.0}
    delta = channels.steer_to(fitted, coef, means, labels)
    landed = fitted.coords(coef + delta)
    torch.testing.assert_close(landed, fitted.coords(torch.stack([means[x] for x in labels])), rtol=1e-4, atol=1e-4)
    with pytest.raises(KeyError, match="no target mean"):
        channels.steer_to(fitted, coef, {0: coef[0]}, labels)


def test_channel_edit_rescales_exactly_the_chosen_components(tiny, setup):
    w, data, ch = setup(tiny)
    assert ch.edit(w, [0, 4], scale=1.0) == []
    hooks = ch.edit(w, [0, 4], scale=0.0)  # component 0 of head 1.2 and component 1 of head 2.0
    assert [name for name, _ in hooks] == ["blocks.1.attn.hook_z", "blocks.2.attn.hook_z"]
    by_hand = (interventions.ComponentAblation.of(w, (1, 2), [0]).hooks()
               + interventions.ComponentAblation.of(w, (2, 0), [1]).hooks())
    torch.testing.assert_close(metrics.end_logits(tiny, data, hooks_for=lambda a, b: hooks),
                               metrics.end_logits(tiny, data, hooks_for=lambda a, b: by_hand), rtol=0, atol=0)


def test_class_means_loadings_and_top_components():
    coef = torch.tensor([[1.0, 0.0, 5.0], [3.0, 0.0, 5.0], [0.0, 2.0, -5.0], [0.0, 4.0, -5.0]])
    means = channels.class_means(coef, [0, 0, 1, 1])
    torch.testing.assert_close(means[0], torch.tensor([2.0, 0.0, 5.0]))
    torch.testing.assert_close(means[1], torch.tensor([0.0, 3.0, -5.0]))
    ch = channels.Channel(heads=((0, 0),), components=((0, 1, 2),), directions=torch.eye(3)[None],
                          W_O=torch.eye(3)[None], singular_values=torch.ones(1, 3))
    fitted = ch.fit(coef, [0, 0, 1, 1], rank=1)  # the means differ mostly along coefficient 2 (10 vs 2 and 3)
    loadings = fitted.loadings()
    assert fitted.top_components(1) == [2] and int(loadings.argmin()) != 2
    torch.testing.assert_close(loadings.square().sum(), torch.tensor(1.0))  # one unit axis
    with pytest.raises(RuntimeError, match="fit the channel first"):
        ch.loadings()


def test_roles_and_the_positional_channel_are_found_on_the_model_itself(tiny):
    """find_roles: the movers are the movers stage's heads with a positive effect, the inhibition heads the circuit
    heads classed 'inhibition'; fit_positional gives orthonormal axes over those heads' components."""
    from headcircuits import circuits

    roles = channels.find_roles(tiny, n_prompts=6, seed=0, fraction=0.2, min_effect=0.0)
    assert set(roles.movers) == {h for h in roles.circuit.stage("movers") if roles.circuit.tables["movers"][h] > 0}
    assert set(roles.inhibition) == set(circuits.heads_of_class(roles.classes, "inhibition"))
    assert set(roles.classes) == set(roles.circuit.heads)
    heads = roles.inhibition or tuple(sorted(roles.circuit.heads))[:2]
    channel = channels.fit_positional(tiny, svd.from_model(tiny), heads, lengths=(2, 3), n_per_length=6, per_head=2,
                                      rank=1)
    assert channel.heads == tuple(heads) and channel.axes.shape == (1, 2 * len(heads))
    torch.testing.assert_close(channel.axes.norm(dim=-1), torch.ones(1), rtol=0, atol=1e-5)


def _resid(model, data, hooks_for=None):
    """Every layer's residual stream (input of each block) and the logits, under an intervention."""
    seen = {}
    names = [f"blocks.{l}.hook_resid_pre" for l in range(model.facts.n_layers)]

    def record(x, hook, name):
        seen[name] = x.detach().clone()
        return x

    hooks = hooks_for(0, len(data)) if hooks_for else []
    with torch.no_grad():
        logits = model.bridge.run_with_hooks(data.clean.ids, fwd_hooks=[
            *hooks, *((n, lambda x, hook, n=n: record(x, hook, n)) for n in names)])
    return [seen[n] for n in names], logits


def test_replacing_a_heads_output_by_its_own_coordinates_changes_nothing(tiny, setup):
    """Replacement (the paper's intervention) with every component of a head at its current coordinates gives the
    head's output back: the logits do not change. A different value changes only END, from the head's layer on."""
    w, data, _ = setup(tiny)
    offsets = svd.value_offsets(tiny)
    d_head = tiny.facts.d_head
    full = channels.Channel.pick(w, {(1, 2): list(range(d_head)), (2, 0): list(range(d_head))}, offsets=offsets)
    own = full.coefficients(tiny, data)  # [batch, 2 * d_head]
    plain, logits = _resid(tiny, data)
    _, replaced = _resid(tiny, data, channels.ChannelReplacement(full, own).hooks_for(data))
    assert (replaced - logits).abs().max() < 1e-4
    one = channels.Channel.pick(w, {(1, 2): [1]}, offsets=offsets)
    moved, moved_logits = _resid(tiny, data, channels.ChannelReplacement(one, torch.tensor([3.0])).hooks_for(data))
    end = data.at("END")
    rows = torch.arange(len(data))
    for layer, (a, b) in enumerate(zip(plain, moved)):
        other = torch.ones_like(a[..., 0], dtype=torch.bool)
        other[rows, end] = False
        assert torch.equal(a[other], b[other]), f"layer {layer}: a position other than END changed"
        if layer <= 1:
            assert torch.equal(a[rows, end], b[rows, end])
    assert (moved[2][rows, end] - plain[2][rows, end]).abs().max() > 1e-3
    # the head now writes exactly 3 x its component 1 at END (coordinates read back)
    assert torch.allclose(one.coefficients(tiny, data, hooks=channels.ChannelReplacement(one, torch.tensor([3.0])).hooks_for(data)(0, len(data))),
                          torch.full((len(data), 1), 3.0), atol=1e-4)


def test_setting_one_coordinate_keeps_the_rest_of_the_heads_output(tiny, setup):
    w, data, _ = setup(tiny)
    offsets = svd.value_offsets(tiny)
    two = channels.Channel.pick(w, {(1, 2): [0, 1]}, offsets=offsets)
    before = two.coefficients(tiny, data)
    target = torch.tensor([before[:, 0].mean().item() + 1.0, 0.0]).expand(len(data), 2).clone()
    target[:, 1] = before[:, 1]  # keep component 1 where it was
    hooks = channels.ChannelReplacement(two, target, mode="set").hooks_for(data)(0, len(data))
    after = two.coefficients(tiny, data, hooks=hooks)
    assert torch.allclose(after, target, atol=1e-4)
    with pytest.raises(ValueError, match="replace"):
        channels.ChannelReplacement(two, target, mode="add")


def test_picking_components_is_checked():
    w = svd.HeadWeights(*(torch.randn(3, 2, 16, 4) for _ in range(3)), torch.randn(3, 2, 4, 16))
    with pytest.raises(ValueError, match="same"):
        channels.Channel.pick(w, {(1, 0): [0], (2, 1): [0, 1]})
    with pytest.raises(ValueError, match="between 0 and 3"):
        channels.Channel.pick(w, {(1, 0): [4]})
    picked = channels.Channel.pick(w, {(1, 0): [2], (2, 1): [0]})
    assert picked.labels == ["1.0 c2", "2.1 c0"]
    assert torch.allclose(picked.directions[0, 0], svd.head_svd(w.OV[1, 0]).Vh[2])


@pytest.mark.parametrize("mode", ["replace", "set"])
def test_the_traversal_equals_the_plain_hooked_forward_pass(tiny, mode, monkeypatch):
    """channels.traverse recomputes END only, from the lowest channel layer to the mover, on a cached prefix; at
    every grid point it must give the mover's attention of the full hooked run (prompts of several lengths, so
    several length groups; heads in two layers)."""
    w = svd.from_model(tiny)
    data = laundry_list.generate(tiny, 5, seed=0, lengths=[3, 4])
    assert len(set(data.clean.lengths.tolist())) > 1
    channel = channels.Channel.pick(w, {(0, 1): [0], (1, 2): [1], (1, 3): [2]}, offsets=svd.value_offsets(tiny))
    points = torch.tensor([[0.0, 0.0, 0.0], [2.0, -1.0, 0.5], [-3.0, 1.5, 2.0]])
    mover = (2, 0)
    keys = ["ITEM_0", "ITEM_1", "ITEM_2"]
    fast = channels.traverse(tiny, data, channel, points, mover, keys, rows_per_run=7, mode=mode, progress=False)
    assert fast.shape == (3, len(data), 3)
    for i, point in enumerate(points):
        replaced = channels.ChannelReplacement(channel, point, mode=mode).hooks_for(data)(0, len(data))
        plain = head_attention_full_pass(tiny, data, mover, "END", keys, replaced)
        assert (fast[i] - plain).abs().max() < 1e-5, f"point {i}"
    assert (fast[1] - fast[2]).abs().max() > 1e-4  # the points differ: the replacement reaches the mover
    # another channel with the same lowest layer reuses the prompts' pass, and is still exact
    from headcircuits.models import blocks

    calls, prefix_pass = [], blocks.prefix_pass
    monkeypatch.setattr(blocks, "prefix_pass", lambda *a, **k: calls.append(1) or prefix_pass(*a, **k))
    other = channels.Channel.pick(w, {(0, 2): [1], (1, 0): [0], (1, 1): [2]}, offsets=svd.value_offsets(tiny))
    again = channels.traverse(tiny, data, other, points, mover, keys, mode=mode, progress=False)
    assert calls == []
    for i, point in enumerate(points):
        replaced = channels.ChannelReplacement(other, point, mode=mode).hooks_for(data)(0, len(data))
        plain = head_attention_full_pass(tiny, data, mover, "END", keys, replaced)
        assert (again[i] - plain).abs().max() < 1e-5, f"point {i}, second channel"
    high = channels.Channel.pick(w, {(1, 2): [1]})
    with pytest.raises(ValueError, match="below the channel"):
        channels.traverse(tiny, data, high, points[:, :1], (0, 0), keys, progress=False)


def test_reading_the_channel_at_end_shares_the_traversals_pass_and_equals_the_full_run(tiny, monkeypatch):
    """At END, coefficients run END alone over the prompts' cached pass (several lengths, heads in two layers):
    equal to the batched full run (any hooks, even none, take that path); with
    ``through`` at the mover's layer, the traversal that follows runs no pass of its own, and still equals the
    plain hooked run."""
    from headcircuits.models import blocks

    w = svd.from_model(tiny)
    data = laundry_list.generate(tiny, 5, seed=1, lengths=[2, 3, 4])
    assert len(set(data.clean.lengths.tolist())) > 2
    channel = channels.Channel.pick(w, {(0, 1): [0, 2], (1, 3): [1, 0]}, offsets=svd.value_offsets(tiny))
    full = channel.coefficients(tiny, data, hooks=[], batch_size=4)  # the general path: a batched full run
    calls, prefix_pass = [], blocks.prefix_pass
    monkeypatch.setattr(blocks, "prefix_pass", lambda *a, **k: calls.append(a[3]) or prefix_pass(*a, **k))
    mover = (2, 1)
    fast = channel.coefficients(tiny, data, through=mover[0])
    assert calls and all(list(layers) == [0, 1, 2] for layers in calls)  # kept through the mover's layer
    assert (fast - full).abs().max() < 1e-3 * full.abs().max()  # tiny models' heads write little: relative
    keys = ["ITEM_0", "ITEM_1"]
    points = torch.tensor([[0.5, -1.0, 2.0, 0.0], [-2.0, 1.0, 0.0, 3.0]])
    calls.clear()
    seen = channels.traverse(tiny, data, channel, points, mover, keys, progress=False)
    assert calls == []  # the read's pass, reused
    for i, point in enumerate(points):
        replaced = channels.ChannelReplacement(channel, point).hooks_for(data)(0, len(data))
        assert (seen[i] - head_attention_full_pass(tiny, data, mover, "END", keys, replaced)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="through must lie between"):
        channel.coefficients(tiny, data, through=0)


def test_the_fix_can_unembed_the_listed_items_only(tiny, monkeypatch):
    """end_logits_under(columns=the items) gives exactly the items' columns of the whole vocabulary's logits
    (padding included, clamped), and candidate_correct on them equals evaluate's candidate_correct; chunks of the
    unembedding cut across conditions and prompts."""
    w = svd.from_model(tiny)
    data = laundry_list.generate(tiny, 6, seed=4, lengths=[2, 3, 4])
    items = metrics.candidates_of(data)
    assert (items < 0).any()  # shorter lists are padded
    channel = channels.Channel.pick(w, {(1, 0): [0], (2, 3): [1]}, offsets=svd.value_offsets(tiny))
    values = [None, torch.randn(len(data), 2) * 3, torch.tensor([4.0, -4.0])]
    whole = channels.end_logits_under(tiny, data, channel, values)
    monkeypatch.setattr(metrics, "UNEMBED_ROWS", 4)
    picked = channels.end_logits_under(tiny, data, channel, values, columns=items)
    for full, few in zip(whole, picked):
        assert few.shape == items.shape
        assert (few - full.gather(1, items.clamp(min=0))).abs().max() < 1e-5
        assert (metrics.candidate_correct(data, few).tolist()
                == metrics.evaluate(tiny, data, logits=full).candidate_correct.tolist())
    correct = [metrics.candidate_correct(data, few) for few in picked]
    assert any(not torch.equal(correct[0], c) for c in correct[1:])  # the values change some answers
    # padding is ignored: a huge logit in a padded slot changes nothing
    padded = picked[0].masked_fill(items < 0, 1e9)
    assert torch.equal(metrics.candidate_correct(data, padded), correct[0])
    with pytest.raises(ValueError, match="candidates'"):
        metrics.candidate_correct(data, whole[0])
    with pytest.raises(ValueError, match="one row per prompt"):
        channels.end_logits_under(tiny, data, channel, values, columns=items[:2])


def test_a_pass_kept_to_the_last_layer_serves_the_traversal_and_the_oracle_fix(tiny, monkeypatch):
    """Chapter 06 reads the channel with ``through`` the last layer at the fix's lengths: the traversal (up to the
    mover) and end_logits_under on the same prompts then run no pass of their own and give exactly what they give
    from passes of their own; a pass kept only to the mover does not cover the fix, which runs its own."""
    from headcircuits.models import blocks

    w = svd.from_model(tiny)
    data = laundry_list.generate(tiny, 5, seed=3, lengths=[2, 3, 4])
    channel = channels.Channel.pick(w, {(0, 1): [0], (1, 3): [1]}, offsets=svd.value_offsets(tiny))
    mover, keys, top = (1, 2), ["ITEM_0", "ITEM_1"], tiny.facts.n_layers - 1
    points = torch.tensor([[0.5, -1.0], [-2.0, 3.0]])
    values = [None, torch.randn(len(data), 2) * 2]
    metrics.forget_recent()
    own_traversal = channels.traverse(tiny, data, channel, points, mover, keys, progress=False)
    metrics.forget_recent()
    own_fix = channels.end_logits_under(tiny, data, channel, values)
    calls, prefix_pass = [], blocks.prefix_pass
    monkeypatch.setattr(blocks, "prefix_pass", lambda *a, **k: calls.append(list(a[3])) or prefix_pass(*a, **k))
    channel.coefficients(tiny, data, through=top)
    assert calls and all(layers == list(range(top + 1)) for layers in calls)
    calls.clear()
    assert torch.equal(channels.traverse(tiny, data, channel, points, mover, keys, progress=False), own_traversal)
    fix = channels.end_logits_under(tiny, data, channel, values)
    assert calls == []  # both ran on the read's pass
    assert all(torch.equal(a, b) for a, b in zip(fix, own_fix))
    assert (fix[0] - fix[1]).abs().max() > 1e-3  # the values reach the logits
    # kept to the mover only: the traversal is covered, the fix (which needs the last layer) is not
    metrics.forget_recent()
    channel.coefficients(tiny, data, through=mover[0])
    calls.clear()
    channels.traverse(tiny, data, channel, points, mover, keys, progress=False)
    assert calls == []
    fix = channels.end_logits_under(tiny, data, channel, values)
    assert calls and all(layers == list(range(top + 1)) for layers in calls)
    assert all(torch.equal(a, b) for a, b in zip(fix, own_fix))
    metrics.forget_recent()


def test_recent_keeps_at_most_its_byte_budget_least_recently_used_first(tiny, monkeypatch):
    data = [ioi.generate(tiny, 2, seed=s) for s in range(3)]
    made = []

    def value(i):
        return lambda: made.append(i) or [torch.zeros(256), {"x": (torch.ones(256), i)}]  # 2 KiB each

    metrics.forget_recent()
    monkeypatch.setattr(metrics, "RECENT_BYTES", 5000)  # room for two values
    for i in range(2):
        metrics.recent(tiny, data[i], ("k",), value(i))
    metrics.recent(tiny, data[0], ("k",), value(9))  # kept: reused, and now the most recently used
    metrics.recent(tiny, data[2], ("k",), value(2))  # the third drops the least recently used (data[1])
    metrics.recent(tiny, data[0], ("k",), value(9))
    metrics.recent(tiny, data[1], ("k",), value(1))
    assert made == [0, 1, 2, 1]
    view = torch.zeros(1000)  # a slice keeps its whole storage (4,000 bytes) alive: it counts whole
    metrics.recent(tiny, data[0], ("slice",), lambda: [view[:10], view[10:20]])
    assert len(metrics._RECENT) == 1  # 4,000 bytes, counted once, leave no room for a second value
    monkeypatch.setattr(metrics, "RECENT_BYTES", 100)
    metrics.recent(tiny, data[0], ("too big",), lambda: torch.zeros(1000))
    assert metrics._RECENT == []  # larger than the budget alone: not kept
    monkeypatch.setattr(metrics, "RECENT_BYTES", 5000)
    made.clear()
    metrics.recent(tiny, data[0], ("k",), value(0))
    metrics.recent(tiny, data[0], ("k",), value(5))  # kept
    data[0].clean.ids.add_(0)  # changed in place: the kept value is not reused
    metrics.recent(tiny, data[0], ("k",), value(6))
    assert made == [0, 6]
    metrics.forget_recent()


def test_pieces_counts_connected_regions_per_index():
    labels = torch.tensor([
        [0, 0, 1],
        [2, 0, 1],
        [0, 2, 2],
    ]).flatten()
    assert channels.pieces(labels, (3, 3)) == {0: 2, 1: 1, 2: 2}  # 0: top-left block and the lone corner
    cube = torch.zeros(2, 2, 2, dtype=torch.long)
    cube[0, 0, 0] = cube[1, 1, 1] = 1  # opposite corners touch no face
    assert channels.pieces(cube.flatten(), (2, 2, 2)) == {0: 1, 1: 2}


def test_grid_regions_and_centroids():
    coords = torch.tensor([[0.0, 10.0], [1.0, 20.0]])
    points = channels.grid(coords, resolution=3, margin=0.0)
    assert points.shape == (9, 2)
    assert torch.allclose(points[:3], torch.tensor([[0.0, 10.0], [0.0, 15.0], [0.0, 20.0]]))
    attention = torch.zeros(9, 4, 3)
    attention[:5, :, 0] = 1.0  # the first five points send the mover to item 0 on every prompt
    attention[5:, :, 2] = 1.0
    labels = channels.regions(attention)
    assert labels.tolist() == [0] * 5 + [2] * 4
    found = channels.centroids(points, labels, 3)
    assert set(found) == {0, 2} and torch.allclose(found[0], points[:5].mean(0))
    attention[0, :, 1] = 0.5  # item 1 has no region; with the attention, its best point stands in
    assert torch.equal(channels.centroids(points, labels, 3, attention)[1], points[0])
    with pytest.raises(ValueError, match="at least 2"):
        channels.grid(coords, resolution=1)


def test_the_paper_subspace_keeps_the_heads_whose_removal_lowers_inhibition_most():
    w = svd.HeadWeights(*(torch.randn(4, 2, 16, 4) for _ in range(3)), torch.randn(4, 2, 4, 16))
    components = {(1, 0): 2, (1, 1): 0, (2, 0): 3, (2, 1): 1}
    effects = {(1, 0): torch.tensor([-0.1]), (1, 1): torch.tensor([-0.01]), (2, 0): torch.tensor([-0.3]),
               (2, 1): torch.tensor([-0.2])}
    sub = channels.paper_subspace(w, components, effects)
    assert sub.heads == ((2, 0), (2, 1), (1, 0)) and sub.components == ((3,), (1,), (2,))


def test_the_mover_is_the_one_attending_most_to_io(tiny):
    data = ioi.generate(tiny, 6, seed=0)
    movers = [(2, 0), (2, 1), (2, 3)]
    to_io = [float(interventions.attention_per_prompt(tiny, data, m, "END", ["IO"]).mean()) for m in movers]
    assert channels.choose_mover(tiny, data, movers) == movers[int(torch.tensor(to_io).argmax())]
    with pytest.raises(ValueError, match="no mover"):
        channels.choose_mover(tiny, data, [])


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


def test_end_only_logits_equal_the_plain_run_under_the_same_replacement(tiny):
    """channels.end_logits_under (END alone from the lowest channel layer to the unembedding, on cached keys and
    values) against metrics.end_logits with the replacement as hooks; one value row per prompt, several lengths."""
    w = svd.from_model(tiny)
    data = laundry_list.generate(tiny, 4, seed=1, lengths=[3, 5])
    channel = channels.Channel.pick(w, {(1, 0): [0], (1, 3): [1]}, offsets=svd.value_offsets(tiny))
    values = torch.randn(len(data), 2) * 2
    fast = channels.end_logits_under(tiny, data, channel, values)
    plain = metrics.end_logits(tiny, data, hooks_for=channels.ChannelReplacement(channel, values).hooks_for(data))
    assert fast.shape == plain.shape
    assert (fast - plain).abs().max() < 1e-4
    unchanged = metrics.end_logits(tiny, data)
    assert (fast - unchanged).abs().max() > 1e-3
    table = metrics.evaluate(tiny, data, logits=fast)
    assert table.candidate_correct.tolist() == metrics.evaluate(
        tiny, data, hooks_for=channels.ChannelReplacement(channel, values).hooks_for(data)).candidate_correct.tolist()
    with pytest.raises(ValueError, match="either logits"):
        metrics.evaluate(tiny, data, logits=fast, cache_as="none")


def test_several_value_sets_share_one_pass(tiny, monkeypatch):
    w = svd.from_model(tiny)
    data = laundry_list.generate(tiny, 3, seed=2, lengths=[3, 4])
    channel = channels.Channel.pick(w, {(2, 1): [0]})
    # two sets far apart (b: one value per prompt, all below -1): random values near 1.5 can give almost the
    # same logits on a 3-layer random model (1 seed in 300 gave 0.02)
    a, b = torch.tensor([1.5]), torch.linspace(-3.0, -1.0, len(data))[:, None]
    both = channels.end_logits_under(tiny, data, channel, [a, b])
    monkeypatch.setattr(metrics, "UNEMBED_ROWS", 4)  # chunks of the unembedding that straddle the two sets
    chunked = channels.end_logits_under(tiny, data, channel, [a, b])
    assert all((x - y).abs().max() < 1e-5 for x, y in zip(chunked, both))
    monkeypatch.undo()
    assert (both[0] - both[1]).abs().max() > 0.05  # the two sets give different logits (0.1 to 1.1 here)
    # equal to one set at a time up to float rounding (the unembedding takes the sets' rows together)
    assert (both[0] - channels.end_logits_under(tiny, data, channel, a)).abs().max() < 1e-5
    assert (both[1] - channels.end_logits_under(tiny, data, channel, b)).abs().max() < 1e-5
    plain, *edited = channels.end_logits_under(tiny, data, channel, [None, a])  # None: the unedited logits
    assert (plain - metrics.end_logits(tiny, data)).abs().max() < 1e-4
    assert (edited[0] - both[0]).abs().max() < 1e-5
