"""Forced attention (the Colored Objects repair) and its controls, on tiny models of each family."""

from __future__ import annotations

import pytest
import torch

from headcircuits import interventions, metrics, svd
from headcircuits.tasks import colored_objects as co
from headcircuits.tasks import ioi
from reference import head_attention_full_pass

KEYS = ("WRONG_COLOR_0", "WRONG_COLOR_1")


@pytest.fixture(scope="module")
def co_data():
    cache = {}

    def make(model):
        if model.name not in cache:
            cache[model.name] = co.generate(model, 6, seed=0)
        return cache[model.name]

    return make


def test_strength_zero_changes_nothing(tiny, co_data):
    data = co_data(tiny)
    forced = interventions.ForcedAttention(((1, 0), (2, 3)), KEYS, strength=0.0)
    before = metrics.end_logits(tiny, data)
    after = metrics.end_logits(tiny, data, hooks_for=forced.hooks_for(data))
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_forced_head_reads_exactly_the_mean_value_of_the_keys(tiny, co_data):
    """With strength 1 the head's output at END is the mean of its value vectors at the two wrong colours, its
    other positions and the other heads are untouched, and the pattern stays a distribution."""
    data = co_data(tiny)
    layer, head = 1, 2
    forced = interventions.ForcedAttention(((layer, head),), KEYS, strength=1.0)
    z_name, v_name, p_name = (f"blocks.{layer}.attn.hook_{k}" for k in ("z", "v", "pattern"))
    _, clean = tiny.bridge.run_with_cache(data.clean.ids, names_filter=lambda n: n in (z_name, v_name))
    seen = {}

    def record(name):  # hook.name is the canonical alias (hook_z is attn.o.hook_in), so key by our name
        def hook_fn(x, hook):
            seen[name] = x.detach().clone()
            return x

        return hook_fn

    hooks = forced.hooks_for(data)(0, len(data)) + [(p_name, record(p_name)), (z_name, record(z_name))]
    with torch.no_grad():
        tiny.bridge.run_with_hooks(data.clean.ids, fwd_hooks=hooks)
    rows, end = torch.arange(len(data)), data.positions["END"]
    kv = head // tiny.facts.kv_group_size
    v = clean[v_name][..., kv, :]  # [batch, pos, d_head]: positions before END are clean, so are their values
    expected = (v[rows, data.positions[KEYS[0]]] + v[rows, data.positions[KEYS[1]]]) / 2
    z = seen[z_name]
    torch.testing.assert_close(z[rows, end, head], expected, rtol=1e-5, atol=1e-6)
    others = [h for h in range(tiny.facts.n_heads) if h != head]
    torch.testing.assert_close(z[:, :, others], clean[z_name][:, :, others], rtol=0, atol=1e-6)
    pattern = seen[p_name][rows, head, end]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(len(data)))


def test_bad_interventions_are_refused_with_the_fix(tiny, co_data):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        interventions.ForcedAttention(((0, 0),), KEYS, strength=1.5)
    with pytest.raises(KeyError, match="WRONG_COLOUR"):
        interventions.ForcedAttention(((0, 0),), ("WRONG_COLOUR",)).hooks_for(co_data(tiny))


def test_repair_table_has_the_baseline_the_named_sets_and_the_controls(tiny, co_data):
    data = co_data(tiny)
    table = interventions.repair(tiny, data, {"inhibition": ((1, 0), (1, 1)), "negative mover": ((2, 3),)},
                                 n_controls=3)
    assert list(table.condition) == ["none", "inhibition", "negative mover"] + ["random 2"] * 3
    plain = metrics.summarise(metrics.evaluate(tiny, data))
    assert table.iloc[0].top1_accuracy == plain["top1_accuracy"]
    assert abs(table.iloc[0].logit_diff_mean - plain["logit_diff_mean"]) < 1e-6
    assert len(set(table.heads[3:])) == 3  # distinct random draws


def test_the_end_only_repair_equals_full_forward_passes(tiny, co_data):
    """The default engine (earlier tokens once, END alone per condition from the lowest forced layer) against one
    full hooked pass per condition: the same per-prompt logit differences and choices (prompts of several lengths
    go through the same engine in test_channels' END-only tests)."""
    data = co_data(tiny)
    sets = {"inhibition": ((1, 0), (2, 1)), "negative mover": ((2, 3),)}
    fast, fast_tables = interventions.repair(tiny, data, sets, n_controls=2, strength=0.8, per_prompt=True)
    full, full_tables = interventions.repair(tiny, data, sets, n_controls=2, strength=0.8, per_prompt=True,
                                             engine="full")
    assert list(fast.heads) == list(full.heads) and list(fast_tables) == list(full_tables)
    for label in full_tables:
        a, b = fast_tables[label], full_tables[label]
        assert (a.logit_diff - b.logit_diff).abs().max() < 1e-4, label
        assert a.candidate_choice.tolist() == b.candidate_choice.tolist()
    moved = (fast_tables["inhibition"].logit_diff - fast_tables["none"].logit_diff).abs().max()
    assert moved > 1e-2  # the forcing does something the comparison can see
    with pytest.raises(ValueError, match="engine"):
        interventions.repair(tiny, data, sets, engine="fast")
    with pytest.raises(ValueError, match="END alone"):
        interventions.ForcedAttention(((1, 0),), KEYS, query="ANSWER_COLOR").end_hooks(data)


def test_controls_exclude_the_circuit_and_widen_a_small_pool():
    """Gemma-3 has 4 heads per layer: after excluding the circuit, the layers the forced heads span may not hold
    enough heads for distinct draws; the pool then widens, and no draw ever contains an excluded head."""
    circuit = {(5, 0), (5, 1), (5, 2), (6, 0), (6, 1), (6, 2), (6, 3)}
    draws, layers = interventions.control_heads(18, 4, 2, 5, exclude=circuit, layers=range(5, 7), seed=0)
    assert len(set(draws)) == 5 and all(len(d) == 2 for d in draws)
    assert not any(set(d) & circuit for d in draws)
    assert layers.start < 5 or layers.stop > 7  # one free head in layers 5-6 cannot give 5 distinct pairs
    assert all(layers.start <= l < layers.stop for d in draws for l, _ in d)
    again, _ = interventions.control_heads(18, 4, 2, 5, exclude=circuit, layers=range(5, 7), seed=0)
    assert again == draws
    with pytest.raises(ValueError, match="cannot draw"):
        interventions.control_heads(2, 2, 3, 5, exclude=set(), layers=range(0, 2))


def test_the_repair_control_never_forces_an_excluded_circuit_head(tiny, co_data):
    data = co_data(tiny)
    circuit = {(1, 1), (1, 2), (2, 0), (2, 1)}
    table = interventions.repair(tiny, data, {"inhibition": ((1, 0), (2, 2))}, n_controls=2, exclude=circuit)
    for heads in table.heads[2:]:
        drawn = {tuple(map(int, h.split("."))) for h in heads.split()}
        assert not drawn & (circuit | {(1, 0), (2, 2)})
    assert table.pool.iloc[-1].startswith("layers")


def test_attention_under_reports_the_forced_pattern(tiny, co_data):
    data = co_data(tiny)
    forced = interventions.ForcedAttention(((1, 2),), KEYS)
    att = interventions.attention_under(tiny, data, [(1, 2), (2, 0)], "END", list(KEYS) + ["ANSWER_COLOR"], forced)
    torch.testing.assert_close(att[0], torch.tensor([0.5, 0.5, 0.0]))
    plain = interventions.attention_under(tiny, data, [(2, 0)], "END", ["ANSWER_COLOR"])
    reference = metrics.attention_between(tiny, data, "END", "ANSWER_COLOR")[2, 0]
    assert abs(float(plain[0, 0]) - float(reference)) < 1e-6


@pytest.fixture(scope="module")
def weights_for():
    from headcircuits import svd

    cache = {}

    def make(model):
        if model.name not in cache:
            cache[model.name] = svd.from_model(model)
        return cache[model.name]

    return make


def _head_output(model, data, layer, head, hooks):
    """The head's output z @ W_O (the model's own W_O) at every position, under ``hooks``."""
    seen = {}

    def record(z, hook):
        seen["z"] = z[..., head, :].detach().clone()
        return z

    with torch.no_grad():
        model.bridge.run_with_hooks(data.clean.ids, fwd_hooks=[*hooks, (f"blocks.{layer}.attn.hook_z", record)],
                                    stop_at_layer=layer + 1)
    return seen["z"] @ model.bridge.W_O.detach()[layer, head]


def test_ablating_a_component_removes_exactly_that_written_direction(tiny, co_data, weights_for):
    from headcircuits import svd

    data, w = co_data(tiny), weights_for(tiny)
    layer, head = 1, 2
    Vh = svd.head_svd(w.OV[layer, head]).Vh  # [d_head, d_model], orthonormal rows
    before = _head_output(tiny, data, layer, head, [])
    after = _head_output(tiny, data, layer, head, interventions.ComponentAblation.of(w, (layer, head), [0]).hooks())
    centre = (lambda x: x - x.mean(-1, keepdim=True)) if tiny.facts.norm == "layernorm" else (lambda x: x)
    b, a = centre(before), centre(after)  # what the following (Layer)Norms see
    torch.testing.assert_close(a @ Vh[0], torch.zeros_like(a @ Vh[0]), rtol=0, atol=1e-5)
    torch.testing.assert_close(a @ Vh[1:].T, b @ Vh[1:].T, rtol=1e-4, atol=1e-5)  # other components untouched
    assert float((b @ Vh[0]).abs().max()) > 1e-3  # there was something to remove


def test_ablating_no_component_changes_nothing_and_all_components_silence_the_head(tiny, co_data, weights_for):
    data, w = co_data(tiny), weights_for(tiny)
    layer, head = 2, 1
    none = interventions.ComponentAblation.of(w, (layer, head), [])
    assert none.hooks() == []
    before = metrics.end_logits(tiny, data)
    d_head = w.W_V.shape[-1]
    every = interventions.ComponentAblation.of(w, (layer, head), range(d_head))
    out = _head_output(tiny, data, layer, head, every.hooks())
    centred = out - out.mean(-1, keepdim=True) if tiny.facts.norm == "layernorm" else out
    torch.testing.assert_close(centred, torch.zeros_like(centred), rtol=0, atol=1e-5)

    def silence(z, hook):
        z = z.clone()
        z[..., head, :] = 0
        return z

    if tiny.facts.norm != "layernorm":  # RMSNorm: removing every component is removing the head
        silenced = metrics.end_logits(tiny, data, hooks_for=lambda a, b: [(f"blocks.{layer}.attn.hook_z", silence)])
        ablated = metrics.end_logits(tiny, data, hooks_for=lambda a, b: every.hooks())
        torch.testing.assert_close(ablated, silenced, rtol=1e-4, atol=1e-4)
        assert float((silenced - before).abs().max()) > 1e-4


def test_inhibition_scores_are_zero_for_a_sender_above_the_receiver_and_shaped_per_component(tiny, weights_for):
    from headcircuits.tasks import ioi

    data = ioi.generate(tiny, 6, seed=0)
    w = weights_for(tiny)
    above = interventions.inhibition_scores(tiny, data, w, sender=(2, 0), receiver=(1, 1), components=[0, 1])
    torch.testing.assert_close(above, torch.zeros(2), rtol=0, atol=1e-7)  # a later head cannot change it
    below = interventions.inhibition_scores(tiny, data, w, sender=(0, 0), receiver=(2, 1))
    assert below.shape == (w.W_V.shape[-1],) and float(below.abs().max()) > 1e-6


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-gpt-neox"])
def test_inhibition_score_is_the_change_of_attention_when_the_direction_leaves_the_residual_stream(name, weights_for):
    """An independent route to the same number: subtract the component's write (out . v) v from the layer's
    residual write (hook_attn_out) instead of editing z. Without a post-attention norm (so not Gemma) the two are
    the same intervention; the score is the receiver's (S2 - IO) attention after it minus before (its sign)."""
    from headcircuits.models import load_model
    from headcircuits.tasks import ioi

    model = load_model(name)
    data = ioi.generate(model, 6, seed=0)
    w = weights_for(model)
    sender, receiver, k = (0, 1), (2, 1), 0
    scores = interventions.inhibition_scores(model, data, w, sender, receiver, [k])
    v = svd.head_svd(w.OV[sender]).Vh[k]
    W_O = model.bridge.W_O.detach()[sender[0], sender[1]]

    def remove(z_seen):
        def hook(x, hook):
            out = z_seen["z"][:, :, sender[1]] @ W_O  # the head's own write at every position
            return x - (out @ v)[..., None] * v
        return hook

    z_seen = {}

    def grab(z, hook):
        z_seen["z"] = z.detach().clone()
        return z

    base = interventions.attention_contrast(model, data, receiver).mean()
    edited = interventions.attention_contrast(model, data, receiver, hooks=[
        (f"blocks.{sender[0]}.attn.hook_z", grab), (f"blocks.{sender[0]}.hook_attn_out", remove(z_seen))]).mean()
    assert abs(float(edited - base)) > 1e-5
    torch.testing.assert_close(scores[0], edited - base, rtol=1e-3, atol=1e-6)


def test_the_setting_is_chosen_on_one_half_and_reported_on_the_other(tiny):
    """A fake intervention whose effect is known: setting s makes a prompt right when its answer position + s is
    even. The chosen setting maximises the choosing half's mean gain over lengths; before/after and controls come
    from the held-out prompts only, and the same seed gives the same split and choice."""
    import pandas as pd

    from headcircuits.tasks import laundry_list

    data = laundry_list.generate_grid(tiny, 2, lengths=[2, 3, 4], seed=0)
    seen = []

    def run(part, setting):
        seen.append((tuple(part.clean_text), setting))
        shift = 0 if setting is None else setting
        right = [(p + shift) % 2 == 0 for p in part.meta.target_position]
        return part.meta.assign(prompt=part.clean_text, candidate_correct=right)

    result = interventions.choose_and_hold_out(data, run, [1, 2, 3], seed=4, n_controls=2,
                                               control=lambda part, s, i: run(part, None))
    assert set(result.choose.clean_text).isdisjoint(result.held_out.clean_text)
    assert len(result.choose) + len(result.held_out) == len(data)
    base = run(result.choose, None).groupby("list_length").candidate_correct.mean()
    means = {s: float((run(result.choose, s).groupby("list_length").candidate_correct.mean() - base).mean())
             for s in (1, 2, 3)}
    assert means[result.setting] == max(means.values())
    pd.testing.assert_frame_equal(result.after, run(result.held_out, result.setting))
    assert list(result.before.prompt) == result.held_out.clean_text and len(result.controls) == 2
    again = interventions.choose_and_hold_out(data, run, [1, 2, 3], seed=4)
    assert again.setting == result.setting and again.held_out.clean_text == result.held_out.clean_text
    with pytest.raises(ValueError, match="at least one setting"):
        interventions.choose_and_hold_out(data, run, [])


def _out_proj(model, layer):
    """The module that maps a layer's z to the residual stream, and whether its weight is stored [in, out]."""
    hf = model.bridge.original_model
    family = model.facts.family
    if family == "gpt2":
        return hf.transformer.h[layer].attn.c_proj, True
    if family == "gpt-neox":
        return hf.gpt_neox.layers[layer].attention.dense, False
    return hf.model.layers[layer].self_attn.o_proj, False


def test_the_papers_weight_edit_equals_editing_the_models_own_weights(tiny, co_data, weights_for):
    """interventions.weight_edit (hooks) against the literal edit of the running model's W_O: the head's output
    loses its zeroed components, its constant part (value biases, which the paper's model keeps in b_O) stays.
    Random biases are put in for the test where the family has them, so that the constant part matters."""
    data = co_data(tiny)
    layer, head = 1, 1
    module, stored_in_out = _out_proj(tiny, layer)
    hf_norm = None
    if tiny.facts.norm == "layernorm":
        hf = tiny.bridge.original_model
        hf_norm = (hf.transformer.h if tiny.facts.family == "gpt2" else hf.gpt_neox.layers)[layer]
        hf_norm = hf_norm.ln_1 if tiny.facts.family == "gpt2" else hf_norm.input_layernorm
    saved = {n: p.detach().clone() for n, p in module.named_parameters()}
    saved_norm = hf_norm.bias.detach().clone() if hf_norm is not None else None
    try:
        with torch.no_grad():
            if hf_norm is not None:
                hf_norm.bias.copy_(torch.randn_like(hf_norm.bias) * 0.5)
        w = svd.from_model(tiny)
        edit = interventions.weight_edit(tiny, w, (layer, head), zero=[0, 3])
        hooked = metrics.end_logits(tiny, data, hooks_for=lambda a, b: edit.hooks())
        offset = svd.value_offsets(tiny)[layer, head]
        dh = tiny.facts.d_head
        with torch.no_grad():
            W = module.weight.detach().float()
            W_O = (W if stored_in_out else W.T)[head * dh:(head + 1) * dh].clone()  # raw [d_head, d_model]
            P = edit.directions.T @ edit.directions  # projection on the zeroed written directions
            new = W_O - W_O @ P
            if stored_in_out:
                module.weight[head * dh:(head + 1) * dh] = new.to(module.weight)
            else:
                module.weight[:, head * dh:(head + 1) * dh] = new.T.to(module.weight)
            if offset.abs().max() > 0:
                module.bias += (offset @ W_O @ P).to(module.bias)
        literal = metrics.end_logits(tiny, data)
        assert (hooked - literal).abs().max() < 1e-4
    finally:
        with torch.no_grad():
            for n, p in module.named_parameters():
                p.copy_(saved[n])
            if hf_norm is not None:
                hf_norm.bias.copy_(saved_norm)
    base = metrics.end_logits(tiny, data)
    nothing = interventions.weight_edit(tiny, svd.from_model(tiny), (layer, head), zero=[])
    assert torch.equal(metrics.end_logits(tiny, data, hooks_for=lambda a, b: nothing.hooks()), base)
    moved = metrics.end_logits(tiny, data, hooks_for=lambda a, b: edit.hooks())
    assert (moved - base).abs().max() > 1e-3  # the edit does something


def test_keep_only_keeps_one_component_and_zeroes_the_rest(tiny, weights_for):
    w = weights_for(tiny)
    kept = interventions.weight_edit(tiny, w, (1, 0), keep=[2])
    assert kept.directions.shape[0] == tiny.facts.d_head - 1
    svd_ = svd.head_svd(w.OV[1, 0])
    assert torch.allclose(kept.directions, svd_.Vh[[k for k in range(tiny.facts.d_head) if k != 2]])


def test_the_inhibition_score_is_attention_to_io_minus_attention_to_s1():
    """The paper's inhibition score on a hand-built pattern: END's attention to IO minus its attention to S1."""
    pattern = torch.zeros(3, 6, 6)
    end = torch.tensor([5, 5, 4])
    io, s1 = torch.tensor([1, 2, 1]), torch.tensor([2, 1, 3])
    pattern[0, 5, 1], pattern[0, 5, 2] = 0.7, 0.1  # mostly IO: +0.6
    pattern[1, 5, 2], pattern[1, 5, 1] = 0.9, 0.05  # IO is position 2 here: +0.85
    pattern[2, 4, 3], pattern[2, 4, 1] = 0.8, 0.2  # mostly S1: -0.6
    a = interventions.attention_at(pattern, end, [io, s1])
    assert torch.allclose(a[:, 0] - a[:, 1], torch.tensor([0.6, 0.85, -0.6]))


def test_inhibition_score_reads_the_movers_pattern_and_responds_to_forcing(tiny):
    """On a model: the score equals the recorded pattern's IO minus S1 entries, and forcing the mover onto IO
    (or S1) sends it to +1 (or -1)."""
    data = ioi.generate(tiny, 8, seed=0)
    mover = (2, 1)
    score = interventions.inhibition_score(tiny, data, mover)
    a = interventions.attention_per_prompt(tiny, data, mover, "END", ["IO", "S1"])
    assert torch.allclose(score, a[:, 0] - a[:, 1])
    for key, target in (("IO", 1.0), ("S1", -1.0)):
        forced = interventions.ForcedAttention((mover,), (key,)).hooks_for(data)(0, len(data))
        assert torch.allclose(interventions.inhibition_score(tiny, data, mover, forced), torch.full((8,), target))
    assert list(data.meta.order[:4]) == ["ABBA", "BABA", "ABBA", "BABA"]  # the paper's 100 + 100 orders


def test_a_residual_addition_changes_only_its_position_from_its_layer_on(tiny):
    data = ioi.generate(tiny, 4, seed=0)

    def run(hooks):
        names = [f"blocks.{l}.hook_resid_post" for l in range(tiny.facts.n_layers)]
        out = {}

        def record(x, hook, name):
            out[name] = x.detach().clone()
            return x

        with torch.no_grad():
            tiny.bridge.run_with_hooks(data.clean.ids, fwd_hooks=[
                *hooks, *((n, lambda x, hook, n=n: record(x, hook, n)) for n in names)])
        return [out[n] for n in names]

    plain = run([])
    vector = torch.randn(tiny.facts.d_model)
    added = run(interventions.ResidualAddition(0, "S1", vector).hooks_for(data)(0, len(data)))
    rows, s1 = torch.arange(len(data)), data.at("S1")
    assert torch.allclose(added[0][rows, s1] - plain[0][rows, s1], vector.expand(len(data), -1), atol=1e-5)
    for a, b in zip(plain, added):
        before = torch.arange(a.shape[1])[None] < s1[:, None]
        assert torch.equal(a[before], b[before])  # causal: nothing before S1 moves
    assert (added[-1][rows, data.at("END")] - plain[-1][rows, data.at("END")]).abs().max() > 1e-4
    zero = run(interventions.ResidualAddition(1, "IO", torch.zeros(tiny.facts.d_model)).hooks_for(data)(0, len(data)))
    assert all(torch.equal(a, b) for a, b in zip(plain, zero))


def test_attention_per_prompt_starts_at_the_lowest_edit_and_equals_the_full_pass(tiny):
    """The run starts at the lowest hooked block (from the clean residual entering it) or the head's own block;
    against the full hooked pass, for a weight edit, a residual addition, no hooks and a hook outside the blocks,
    on prompts of several lengths (right padding)."""
    data = ioi.generate(tiny, 10, seed=3)
    assert len(data.clean.lengths.unique()) > 1
    w, mover = svd.from_model(tiny), (2, 1)
    vector = torch.randn(tiny.facts.d_model) * 3
    cases = {
        "none": [],
        "weight edit at 1": interventions.weight_edit(tiny, w, (1, 2), zero=[0, 1]).hooks(),
        "addition after 0": interventions.ResidualAddition(0, "S1", vector).hooks_for(data)(0, len(data)),
        "embedding": [("hook_embed", lambda x, hook: x * 1.5)],
    }
    plain = head_attention_full_pass(tiny, data, mover, "END", ["IO", "S1"], [])
    for label, hooks in cases.items():
        fast = interventions.attention_per_prompt(tiny, data, mover, "END", ["IO", "S1"], hooks)
        full = head_attention_full_pass(tiny, data, mover, "END", ["IO", "S1"], hooks)
        gap = (fast - full).abs().max()
        assert gap < 1e-7, label
        if label != "none":  # the edit changes what the comparison sees, far beyond the gap
            assert (full - plain).abs().max() > max(1e-6, 100 * gap), label
    # the clean residual is reused for the same model and prompts, and recomputed when a weight changes in place
    first = interventions.residuals_entering(tiny, data, 1)
    assert interventions.residuals_entering(tiny, data, 1) is first
    weight = next(tiny.bridge.parameters())
    with torch.no_grad():
        weight.mul_(1.0)
    assert interventions.residuals_entering(tiny, data, 1) is not first


def test_attention_under_end_only_equals_full_passes(tiny, co_data):
    """The END-only engine of attention_under (earlier tokens once, END alone per intervention) equals a full
    forward pass per intervention: forced heads in a lower layer than the read ones, so the forcing reaches them."""
    data = co_data(tiny)
    forced = interventions.ForcedAttention(tuple((l, h) for l in (0, 1) for h in range(tiny.facts.n_heads)), KEYS,
                                           strength=0.7)
    heads, keys = [(1, 0), (2, 0), (2, 3)], list(KEYS) + ["ANSWER_COLOR"]
    fast = interventions.attention_under(tiny, data, heads, "END", keys, [None, forced])
    for got, condition in zip(fast, [None, forced]):
        full = interventions.attention_under(tiny, data, heads, "END", keys, condition, engine="full")
        torch.testing.assert_close(got, full, rtol=0, atol=1e-6)
    assert (fast[0] - fast[1])[1:].abs().max() > 2e-5  # 20x the tolerance above, on every family  # the forcing changes what the later heads attend to
    with pytest.raises(ValueError, match="engine"):
        interventions.attention_under(tiny, data, heads, "END", keys, engine="fast")
