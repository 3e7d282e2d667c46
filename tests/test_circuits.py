"""Circuit discovery plumbing, the overlap baseline, and head attribution."""

from __future__ import annotations

import math

import pytest
import torch
from headcircuits import circuits, head_classes, scoring
from headcircuits.models import architecture
from headcircuits.tasks import ioi


def test_top_heads_takes_the_top_fraction_by_magnitude_and_skips_nan():
    table = torch.tensor([[0.1, -0.9, float("nan")], [0.5, 0.0, 0.2]])
    assert circuits.top_heads(table, fraction=0.34) == [(0, 1), (1, 0), (1, 2)]  # ceil(0.34 * 6) = 3, by |effect|
    assert circuits.top_heads(table, fraction=0.01) == [(0, 1)]  # at least one head
    everything = circuits.top_heads(table, fraction=1.0)
    assert (0, 2) not in everything  # the NaN head never qualifies
    assert (1, 1) not in everything  # nor does a head that changes nothing
    assert len(everything) == 4
    assert circuits.top_heads(table, fraction=1.0, min_effect=0.3) == [(0, 1), (1, 0)]


def test_overlap_and_its_exact_random_baseline():
    a = {(0, 0), (0, 1), (1, 0), (1, 1)}
    b = {(0, 0), (0, 1), (2, 2)}
    o = circuits.overlap(a, b, n_heads=12)
    assert (o.shared, o.fraction, o.expected) == (2, 0.5, 0.25)
    # exact hypergeometric tail against a direct enumeration-free formula check and a simulation
    expected_p = sum(math.comb(3, k) * math.comb(9, 4 - k) for k in (2, 3)) / math.comb(12, 4)
    assert abs(o.p_value - expected_p) < 1e-12
    sim = circuits.random_overlaps(4, 3, 12, n_samples=20000, seed=0)
    assert abs(float(sim.mean()) - o.expected) < 0.01
    assert abs(float((sim >= o.fraction).float().mean()) - o.p_value) < 0.01


def test_colored_objects_stages_are_the_default_for_its_data(tiny, monkeypatch):
    """Colored Objects data runs the Colored Objects stages (three, the duplicate stage read at QUERY), not IOI's
    four (the duplicate stage read at S2, a previous-token stage): every stage either has a table or says why not."""
    from dataclasses import replace

    from headcircuits import path_patching as patching
    from headcircuits.tasks import colored_objects as co

    data = co.generate(tiny, 4, seed=0)
    seen, path_patch = [], patching.path_patch
    monkeypatch.setattr(patching, "path_patch", lambda m, d, receivers, *a, **k: seen.append(receivers)
                        or path_patch(m, d, receivers, *a, **k))
    circuit = circuits.discover(tiny, data, fraction=0.3, min_effect=0.0, cache=False, progress=False)
    names = [s.name for s in circuits.CO_STAGES]
    assert [s for s in names if s in circuit.tables or s in circuit.notes] == names  # all three, accounted for
    assert "previous" not in circuit.tables and "previous" not in circuit.notes  # IOI's fourth stage
    assert [(r.kind, r.position) for r in seen] == [(s.kind, s.position) for s in circuits.CO_STAGES][: len(seen)]
    assert seen and all(s in circuit.notes for s in names[len(seen):])  # a stage not run says why
    if len(seen) == 3:
        assert seen[2].position == "QUERY"  # IOI would read the duplicate stage at S2
    with pytest.raises(ValueError, match="stages="):
        circuits.discover(tiny, replace(data, task="other"), progress=False)


def test_a_stage_that_cannot_run_ends_discovery_and_says_why(tiny):
    """A stage with no receivers (the stage before selected no head) is not skipped silently: it and every later
    stage get a note, and no table."""
    data = ioi.generate(tiny, 4, seed=0, counterfactual="abc")
    circuit = circuits.discover(tiny, data, fraction=0.1, min_effect=1e6, cache=False, progress=False)
    assert list(circuit.tables) == ["movers"] and len(circuit) == 0  # nothing moves the logits by 10^6
    for stage in ("inhibition", "duplicate", "previous"):
        assert circuit.notes[stage] == ("not run: discovery stopped at inhibition, because the stage before "
                                        "(movers) selected no head, so it has no receivers")


def test_direct_logit_differences_add_up_to_the_logit_difference(tiny):
    """The final residual stream at END is the embedding plus every block's attention write and MLP write. With the
    final norm frozen at its clean value (a per-dimension linear map; its bias added once), the heads' attributions
    plus those of everything else (embeddings, MLPs, attention biases such as GPT-2's b_O) sum to the logit
    difference, on every family: Gemma-3's post-attention norm included (its heads' writes are scaled by it)."""
    data = ioi.generate(tiny, 5, seed=0)
    heads = head_classes.direct_logit_difference(tiny, data)
    _, cache = tiny.bridge.run_with_cache(data.clean.ids)
    rows, ends = torch.arange(len(data)), data.positions["END"]
    at = lambda name: cache[name][rows, ends].double()  # noqa: E731
    resid, normed = at("ln_final.hook_in"), at("ln_final.hook_out")
    bias = architecture.final_norm_bias(tiny).double()
    centred = resid - resid.mean(-1, keepdim=True) if tiny.facts.norm == "layernorm" else resid
    gain = (normed - bias) / centred
    W_U = tiny.bridge.W_U.detach().double()
    direction = W_U[:, data.answer] - W_U[:, data.distractor]

    def dla(x):  # attribution of a residual-stream write x [batch, d_model]
        x = x - x.mean(-1, keepdim=True) if tiny.facts.norm == "layernorm" else x
        return float(torch.einsum("bm,bm,mb->", x, gain, direction)) / len(data)

    L = tiny.facts.n_layers
    attention = [at(f"blocks.{l}.hook_attn_out") for l in range(L)]
    everything = at("blocks.0.hook_resid_pre") + sum(attention) + sum(at(f"blocks.{l}.hook_mlp_out") for l in range(L))
    torch.testing.assert_close(everything, resid, rtol=1e-4, atol=1e-4)  # the decomposition is complete
    ld = float(scoring.evaluate(tiny, data).logit_diff.mean())
    total = dla(everything) + float((bias @ direction).mean())
    assert abs(total - ld) < 1e-3 * max(1.0, abs(ld))
    for layer in range(L):  # each layer's heads add up to its attention write, less what no head writes (b_O)
        W_O = tiny.bridge.W_O.detach()[layer]
        z = at(f"blocks.{layer}.attn.hook_z").float()
        unscaled = torch.einsum("bhd,hdm->bm", z, W_O).double()
        rest = 0.0
        if not tiny.facts.post_attn_norm:
            rest = dla(attention[layer] - unscaled)  # the bias of the output projection
        assert abs(float(heads[layer].sum()) + rest - dla(attention[layer])) < 1e-4, layer
    assert float(heads.abs().max()) > 1e-3  # the attributions are not all zero


def test_every_head_class_from_hand_built_attention_scores():
    """The rule of classify() on attention scores and direct effects written by hand, one head per case."""
    names = list(head_classes.CLASS_ATTENTION)
    cases = {  # head: (class it attends like, direct logit difference, expected class)
        (0, 0): ("mover", +1.0, "mover"),
        (0, 1): ("mover", -1.0, "negative mover"),
        (0, 2): ("mover", 0.05, "mover"),  # a weak write: attention decides
        (1, 0): ("inhibition", 0.01, "inhibition"),
        (1, 1): ("inhibition", -1.0, "negative mover"),  # attends END -> S2 and writes against the answer (19.1)
        (1, 2): ("inhibition", -0.01, "inhibition"),  # a small incidental write keeps it an inhibition head
        (3, 1): ("inhibition", 1.0, "mover"),  # attends S2 but writes the answer strongly: a mover
        (2, 0): ("induction", -1.0, "induction"),  # not an END head: its direct effect does not matter
        (2, 1): ("duplicate-token", 0.0, "duplicate-token"),
        (2, 2): ("previous-token", 0.0, "previous-token"),
        (3, 0): (None, 0.0, "other"),  # attends nowhere the classes look
    }
    patterns = {n: torch.zeros(4, 3) for n in names}
    dla = torch.zeros(4, 3)
    assert len(cases) == 11
    for head, (cls, effect, _) in cases.items():
        for n in names:
            patterns[n][head] = 0.05
        if cls is not None:
            patterns[cls][head] = 0.6
        dla[head] = effect
    got = head_classes.assign_classes(patterns, dla, list(cases), threshold=0.2, negative=0.1)
    assert got == {head: expected for head, (_, _, expected) in cases.items()}


def test_layer_matched_null_is_exact():
    """Both circuits in late layers: random sets with the same per-layer counts overlap far more than random sets
    over all heads. The exact per-layer computation agrees with a simulation of such sets."""
    import random

    n_layers, per_layer = 6, 4
    a = {(4, 0), (4, 1), (5, 0), (5, 2)}
    b = {(4, 0), (4, 2), (5, 0), (5, 1), (3, 3)}
    o = circuits.overlap(a, b, n_layers * per_layer, n_layers=n_layers)
    assert o.shared == 2 and o.layer_counts[4] == (2, 2) and o.layer_counts[3] == (0, 1)
    assert o.layer_expected > o.expected and o.layer_p_value > o.p_value
    rng = random.Random(0)
    samples = []
    for _ in range(20000):
        shared = 0
        for count_a, count_b in o.layer_counts:
            shared += len(set(rng.sample(range(per_layer), count_a)) & set(rng.sample(range(per_layer), count_b)))
        samples.append(shared)
    samples = torch.tensor(samples, dtype=torch.float64)
    assert abs(float(samples.mean()) / len(a) - o.layer_expected) < 0.01
    assert abs(float((samples >= o.shared).double().mean()) - o.layer_p_value) < 0.01
    assert math.isnan(circuits.overlap(a, b, 24).layer_p_value)  # without layers, no layer-matched null
    with pytest.raises(ValueError, match="not in a model"):
        circuits.overlap({(7, 0)}, b, 24, n_layers=6)


def test_each_stage_receives_from_the_heads_the_stage_before_selected(tiny, monkeypatch):
    """Backward discovery: stage i+1's receivers are exactly stage i's heads, read at the stage's position."""
    data = ioi.generate(tiny, 4, seed=0, counterfactual="abc")
    seen = []
    original = circuits.path_patching.path_patch

    def spy(model, data, receivers, senders, **kwargs):
        seen.append(receivers)
        return original(model, data, receivers, senders, **kwargs)

    monkeypatch.setattr(circuits.path_patching, "path_patch", spy)
    circuit = circuits.discover(tiny, data, fraction=0.25, min_effect=0.0, cache=False, progress=False)
    names = list(circuit.tables)
    assert len(names) >= 2, "a 3-layer model with a quarter of its heads per stage reaches the second stage"
    assert seen[0].kind == "logits"
    for i in range(1, len(names)):
        stage = circuits.IOI_STAGES[i]
        assert (seen[i].kind, seen[i].position) == (stage.kind, stage.position)
        assert sorted(seen[i].heads) == circuit.stage(names[i - 1])


@pytest.mark.slow
def test_heads_are_classified_by_behaviour_on_the_embedded_model(smollm2):
    data = ioi.generate(smollm2, 16, seed=0)
    to_io = scoring.attention_between(smollm2, data, "END", "IO")
    best = divmod(int(to_io.flatten().argmax()), smollm2.facts.n_heads)
    label = head_classes.classify(smollm2, data, [best])[best]
    assert label in ("mover", "negative mover")


def test_circuit_table_and_classes():
    circuit = circuits.Circuit(heads={(2, 1): ["movers"], (1, 0): ["inhibition", "movers"]},
                               tables={"movers": torch.tensor([[0.0, 0.1], [0.5, 0.0], [0.0, -0.4]]),
                                       "inhibition": torch.tensor([[0.2, float("nan")], [0.3, 0.0], [0.0, 0.0]])})
    frame = head_classes.table(circuit, {(2, 1): "negative mover", (1, 0): "inhibition"})
    assert list(frame["head"]) == ["1.0", "2.1"]
    assert list(frame["effect (movers)"].round(4)) == [0.5, -0.4]
    assert frame.loc[0, "stages"] == "inhibition, movers" and frame.loc[1, "class"] == "negative mover"
    classes = {(2, 1): "negative mover", (1, 0): "inhibition", (0, 3): "inhibition"}
    assert head_classes.heads_of_class(classes, "inhibition") == ((0, 3), (1, 0))


def test_a_stage_that_is_zero_by_construction_is_not_computed_and_is_zero(tiny):
    """With the S2 -> IO counterfactual nothing changes before S2, so the previous-token stage (keys at S1+1) is
    exactly zero: discovery records zeros without running it, and running it confirms them."""
    from headcircuits import path_patching as patching

    data = ioi.generate(tiny, 4, seed=0, counterfactual="s2io")
    assert patching.zero_by_construction(data, "S1+1") and not patching.zero_by_construction(data, "S2")
    abc = ioi.generate(tiny, 4, seed=0, counterfactual="abc")
    assert not patching.zero_by_construction(abc, "S1+1")
    receivers = patching.Receivers("k", heads=((2, 0), (2, 1)), position="S1+1")
    computed = patching.path_patch(tiny, data, receivers, progress=False).nan_to_num(0.0).abs().max()
    # zero up to float32 rounding, and far below the same stage's effects on the ABC counterfactual (which are
    # small on these random models: about 1e-4 on tiny-gpt2)
    on_abc = patching.path_patch(tiny, abc, receivers, progress=False).nan_to_num(0.0).abs().max()
    assert computed < 5e-6 and on_abc > 50 * computed, (computed, on_abc)
    stages = (circuits.Stage("movers", "logits"), circuits.Stage("previous", "k", "S1+1"))
    circuit = circuits.discover(tiny, data, stages, fraction=0.25, min_effect=0.0, cache=False, progress=False)
    assert "exactly 0" in circuit.notes["previous"] and not circuit.stage("previous")
    assert circuit.tables["previous"].nan_to_num(0.0).abs().max() == 0.0


def test_every_disagreement_between_a_heads_stage_and_its_class_is_listed_with_its_reason():
    zeros = lambda: torch.zeros(2, 2)  # noqa: E731
    patterns = {name: zeros() for name in head_classes.CLASS_ATTENTION}
    patterns["inhibition"][1, 0] = 0.5  # attends END -> S2 ...
    patterns["mover"][1, 1] = 0.6       # a mover by attention
    patterns["induction"][0, 1] = 0.12  # below the threshold: "other"
    patterns["duplicate-token"][0, 0] = 0.4
    dla = zeros()
    dla[1, 0] = 0.9  # ... but writes the answer strongly: a mover
    evidence = (patterns, dla, 2.0)
    heads = [(0, 0), (0, 1), (1, 0), (1, 1)]
    classes = head_classes.assign_classes(patterns, dla, heads, threshold=0.2, negative=0.05 * 2.0)
    circuit = circuits.Circuit(heads={(1, 1): ["movers"], (1, 0): ["inhibition"], (0, 1): ["duplicate"],
                                      (0, 0): ["duplicate"]},
                               tables={s: torch.full((2, 2), -0.5) for s in ("movers", "inhibition", "duplicate")})
    table = head_classes.disagreements(circuit, classes, evidence)
    assert table[["head", "stage", "class"]].values.tolist() == [["0.1", "duplicate", "other"],
                                                                ["1.0", "inhibition", "mover"]]
    other, mover = table.reason.tolist()
    assert "0.12" in other and "S2 → S1+1" in other and "0.2" in other
    assert "+0.90" in mover and "END → S2" in mover and "0.10" in mover
    assert table.effect.tolist() == [-0.5, -0.5]


def test_the_ioi_roles_are_found_on_the_model_itself(tiny):
    """find_roles: the movers are the movers stage's heads with a positive effect, the inhibition heads the circuit
    heads classed 'inhibition', every circuit head classed."""
    roles = head_classes.find_roles(tiny, n_prompts=6, seed=0, fraction=0.2, min_effect=0.0)
    assert roles.movers and set(roles.movers) == {h for h in roles.circuit.stage("movers")
                                                  if roles.circuit.tables["movers"][h] > 0}
    assert set(roles.inhibition) == set(head_classes.heads_of_class(roles.classes, "inhibition"))
    assert set(roles.classes) == set(roles.circuit.heads)
