"""The Colored Objects repair: forced attention, its controls and the attention under it, on tiny models of each
family, against the plain hooked forward pass."""

from __future__ import annotations

import pytest
import torch

from headcircuits import repair, scoring
from headcircuits.engine import Read
from headcircuits.models.architecture import hook
from headcircuits.tasks import colored_objects as co
from reference import plain_run

KEYS = ("WRONG_COLOR_0", "WRONG_COLOR_1")


@pytest.fixture(scope="module")
def co_data():
    cache = {}

    def make(model):
        if model.name not in cache:
            cache[model.name] = co.generate(model, 6, seed=0)
        return cache[model.name]

    return make


def _every_position(data, model):
    """The edit protocol's arguments for a plain pass over the whole padded batch."""
    rows = torch.arange(len(data))
    return rows, torch.arange(data.clean.ids.shape[1], device=model.device).expand(len(data), -1)


def test_strength_zero_changes_nothing(tiny, co_data):
    data = co_data(tiny)
    forced = repair.ForcedAttention(((1, 0), (2, 3)), KEYS, strength=0.0)
    torch.testing.assert_close(scoring.end_logits(tiny, data, [forced]), scoring.end_logits(tiny, data),
                               rtol=0, atol=1e-5)


def test_forced_head_reads_exactly_the_mean_value_of_the_keys(tiny, co_data):
    """With strength 1 the head's output at END is the mean of its value vectors at the two wrong colours, its
    other positions and the other heads are untouched, and the pattern stays a distribution."""
    data = co_data(tiny)
    layer, head = 1, 2
    forced = repair.ForcedAttention(((layer, head),), KEYS, strength=1.0)
    z_name, v_name, p_name = (hook(k, layer) for k in ("z", "v", "pattern"))
    _, clean = tiny.bridge.run_with_cache(data.clean.ids, names_filter=lambda n: n in (z_name, v_name))
    seen = {}

    def record(name):  # hook.name is the canonical alias (hook_z is attn.o.hook_in), so key by our name
        def hook_fn(x, hook):
            seen[name] = x.detach().clone()
            return x

        return hook_fn

    hooks = forced.hooks(data, *_every_position(data, tiny)) + [(p_name, record(p_name)), (z_name, record(z_name))]
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
    torch.testing.assert_close(seen[p_name][rows, head, end].sum(-1), torch.ones(len(data)))


def test_bad_interventions_are_refused_with_the_fix(tiny, co_data):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        repair.ForcedAttention(((0, 0),), KEYS, strength=1.5)
    with pytest.raises(KeyError, match="WRONG_COLOUR"):
        scoring.end_logits(tiny, co_data(tiny), [repair.ForcedAttention(((0, 0),), ("WRONG_COLOUR",))])
    with pytest.raises(ValueError, match="layers"):
        scoring.end_logits(tiny, co_data(tiny), [repair.ForcedAttention(((9, 0),), KEYS)])


def test_repair_table_has_the_baseline_the_named_sets_and_the_controls(tiny, co_data):
    data = co_data(tiny)
    table = repair.repair(tiny, data, {"inhibition": ((1, 0), (1, 1)), "negative mover": ((2, 3),)}, n_controls=3)
    assert list(table.condition) == ["none", "inhibition", "negative mover"] + ["random 2"] * 3
    plain = scoring.summarise(scoring.evaluate(tiny, data))
    assert table.iloc[0].top1_accuracy == plain["top1_accuracy"]
    assert abs(table.iloc[0].logit_diff_mean - plain["logit_diff_mean"]) < 1e-5
    assert len(set(table.heads[3:])) == 3  # distinct random draws


def test_the_repair_equals_a_plain_pass_per_condition(tiny, co_data):
    """The engine reruns END alone per condition, the conditions side by side; against one plain hooked pass per
    prompt and condition: the same logit differences and choices."""
    data = co_data(tiny)
    sets = {"inhibition": ((1, 0), (2, 1)), "negative mover": ((2, 3),)}
    table, tables = repair.repair(tiny, data, sets, n_controls=2, strength=0.8, per_prompt=True)
    for label, heads in [("none", ()), *sets.items()]:
        edits = [repair.ForcedAttention(heads, KEYS, strength=0.8)] if heads else []
        logits, _ = plain_run(tiny, data, edits)
        want = scoring.evaluate(tiny, data, logits=logits)
        assert (tables[label].logit_diff - want.logit_diff).abs().max() < 1e-4, label
        assert tables[label].candidate_choice.tolist() == want.candidate_choice.tolist()
    moved = (tables["inhibition"].logit_diff - tables["none"].logit_diff).abs().max()
    assert moved > 1e-2  # the forcing does something the comparison can see


def test_controls_exclude_the_circuit_and_widen_a_small_pool():
    """Gemma-3 has 4 heads per layer: after excluding the circuit, the layers the forced heads span may not hold
    enough heads for distinct draws; the pool then widens, and no draw ever contains an excluded head."""
    circuit = {(5, 0), (5, 1), (5, 2), (6, 0), (6, 1), (6, 2), (6, 3)}
    draws, layers = repair.control_heads(18, 4, 2, 5, exclude=circuit, layers=range(5, 7), seed=0)
    assert len(set(draws)) == 5 and all(len(d) == 2 for d in draws)
    assert not any(set(d) & circuit for d in draws)
    assert layers.start < 5 or layers.stop > 7  # one free head in layers 5-6 cannot give 5 distinct pairs
    assert all(layers.start <= l < layers.stop for d in draws for l, _ in d)
    again, _ = repair.control_heads(18, 4, 2, 5, exclude=circuit, layers=range(5, 7), seed=0)
    assert again == draws
    with pytest.raises(ValueError, match="cannot draw"):
        repair.control_heads(2, 2, 3, 5, exclude=set(), layers=range(0, 2))


def test_the_repair_control_never_forces_an_excluded_circuit_head(tiny, co_data):
    data = co_data(tiny)
    circuit = {(1, 1), (1, 2), (2, 0), (2, 1)}
    table = repair.repair(tiny, data, {"inhibition": ((1, 0), (2, 2))}, n_controls=2, exclude=circuit)
    for heads in table.heads[2:]:
        drawn = {tuple(map(int, h.split("."))) for h in heads.split()}
        assert not drawn & (circuit | {(1, 0), (2, 2)})
    assert table.pool.iloc[-1].startswith("layers")


def test_attention_under_reports_the_forced_pattern_and_equals_plain_passes(tiny, co_data):
    """Forced heads in a lower layer than the read ones, so the forcing reaches them; every condition from one
    engine run, against a plain pass per condition."""
    data = co_data(tiny)
    one = repair.ForcedAttention(((1, 2),), KEYS)
    att = repair.attention_under(tiny, data, [(1, 2), (2, 0)], "END", list(KEYS) + ["ANSWER_COLOR"], [one])[0]
    torch.testing.assert_close(att[0], torch.tensor([0.5, 0.5, 0.0]))
    plain = repair.attention_under(tiny, data, [(2, 0)], "END", ["ANSWER_COLOR"])[0]
    assert abs(float(plain[0, 0]) - float(scoring.attention_between(tiny, data, "END", "ANSWER_COLOR")[2, 0])) < 1e-6
    forced = repair.ForcedAttention(tuple((l, h) for l in (0, 1) for h in range(tiny.facts.n_heads)), KEYS,
                                    strength=0.7)
    heads, keys = [(1, 0), (2, 0), (2, 3)], list(KEYS) + ["ANSWER_COLOR"]
    fast = repair.attention_under(tiny, data, heads, "END", keys, [None, forced])
    for got, condition in zip(fast, [None, forced]):
        reads = {l: Read("pattern", l, at="END", keys=tuple(keys)) for l in (1, 2)}
        _, want = plain_run(tiny, data, [condition] if condition else [], list(reads.values()))
        full = torch.stack([torch.cat(want[reads[l]])[:, h].mean(0) for l, h in heads])
        torch.testing.assert_close(got, full, rtol=0, atol=1e-6)
    assert (fast[0] - fast[1])[1:].abs().max() > 2e-5  # 20x the tolerance above: the forcing moves later heads
