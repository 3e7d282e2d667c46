"""Circuit discovery plumbing, the overlap baseline, and head attribution."""

from __future__ import annotations

import math

import pytest
import torch

from headcircuits import circuits, metrics
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


def test_colored_objects_stages_are_the_default_for_its_data(tiny):
    from headcircuits.tasks import colored_objects as co

    data = co.generate(tiny, 4, seed=0)
    circuit = circuits.discover(tiny, data, fraction=0.1, min_effect=0.0, cache=False, progress=False)
    assert list(circuit.tables) == [s.name for s in circuits.CO_STAGES][: len(circuit.tables)]  # 3 layers: may stop early
    with pytest.raises(ValueError, match="stages="):
        from dataclasses import replace

        circuits.discover(tiny, replace(data, task="other"), progress=False)


def test_discover_records_every_stage_and_selects_the_top_heads(tiny):
    data = ioi.generate(tiny, 4, seed=0, counterfactual="abc")
    circuit = circuits.discover(tiny, data, fraction=0.1, min_effect=0.0, cache=False, progress=False)
    assert list(circuit.tables)[0] == "movers"
    for name, table in circuit.tables.items():
        assert table.shape == (tiny.facts.n_layers, tiny.facts.n_heads)
        assert circuit.stage(name) == circuits.top_heads(table, 0.1, circuit.min_effect)
    assert len(circuit) == len({h for name in circuit.tables for h in circuit.stage(name)})


def test_direct_logit_differences_add_up_to_the_logit_difference():
    """RMSNorm model without biases: logits are W_U^T (gain * residual), and the residual at END is the embedding
    plus every head's and every MLP's output, so the per-component attributions sum to the logit difference."""
    from headcircuits.models import load_model

    model = load_model("tiny-llama")
    data = ioi.generate(model, 5, seed=0)
    heads = circuits.direct_logit_difference(model, data)
    _, cache = model.bridge.run_with_cache(data.clean.ids)
    rows, ends = torch.arange(len(data)), data.positions["END"]
    resid, normed = cache["ln_final.hook_in"][rows, ends], cache["ln_final.hook_out"][rows, ends]
    gain = normed / resid
    W_U = model.bridge.W_U.detach()
    direction = W_U[:, data.answer] - W_U[:, data.distractor]
    rest = cache["blocks.0.hook_resid_pre"][rows, ends] + sum(
        cache[f"blocks.{l}.hook_mlp_out"][rows, ends] for l in range(model.facts.n_layers)
    )
    rest_dla = torch.einsum("bm,bm,mb->", rest, gain, direction) / len(data)
    ld = metrics.summarise(metrics.evaluate(model, data))["logit_diff_mean"]
    assert abs(float(heads.sum() + rest_dla) - ld) < 1e-3


@pytest.mark.slow
def test_heads_are_classified_by_behaviour_on_the_embedded_model(smollm2):
    data = ioi.generate(smollm2, 16, seed=0)
    to_io = metrics.attention_between(smollm2, data, "END", "IO")
    best = divmod(int(to_io.flatten().argmax()), smollm2.facts.n_heads)
    label = circuits.classify(smollm2, data, [best])[best]
    assert label in ("mover", "negative mover")


def test_circuit_table_and_classes():
    circuit = circuits.Circuit(heads={(2, 1): ["movers"], (1, 0): ["inhibition", "movers"]},
                               tables={"movers": torch.tensor([[0.0, 0.1], [0.5, 0.0], [0.0, -0.4]]),
                                       "inhibition": torch.tensor([[0.2, float("nan")], [0.3, 0.0], [0.0, 0.0]])})
    frame = circuits.table(circuit, {(2, 1): "negative mover", (1, 0): "inhibition"})
    assert list(frame["head"]) == ["1.0", "2.1"]
    assert list(frame["effect (movers)"].round(4)) == [0.5, -0.4]
    assert frame.loc[0, "stages"] == "inhibition, movers" and frame.loc[1, "class"] == "negative mover"
    classes = {(2, 1): "negative mover", (1, 0): "inhibition", (0, 3): "inhibition"}
    assert circuits.heads_of_class(classes, "inhibition") == ((0, 3), (1, 0))
