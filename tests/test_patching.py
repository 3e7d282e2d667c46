"""Patching: invariants and exact identities of the reference implementation, on tiny models of each family."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from headcircuits import path_patching as patching
from reference import activation_patch_heads, activation_patch_residual
from headcircuits.tasks import ioi


@pytest.fixture(scope="module")
def data_for():
    cache = {}

    def make(model):
        if model.name not in cache:
            cache[model.name] = ioi.generate(model, 6, seed=0, counterfactual="s2io")
        return cache[model.name]

    return make


def test_patching_heads_with_their_own_clean_values_changes_nothing(tiny, data_for):
    data = data_for(tiny)
    same = replace(data, corrupt=data.clean, corrupt_text=data.clean_text)
    L, H = tiny.facts.n_layers, tiny.facts.n_heads
    for receivers in [patching.Receivers("logits"), patching.Receivers("q", heads=((L - 1, 0), (L - 1, 1)))]:
        lds, base = patching.path_patch_ld(tiny, same, receivers, progress=False)
        assert len(lds) == len(receivers.senders(L, H))
        for ld in lds.values():
            torch.testing.assert_close(ld, base.ld_clean, rtol=0, atol=1e-4)


def test_patching_the_whole_residual_stream_at_layer_0_gives_the_counterfactual(tiny, data_for):
    effect = activation_patch_residual(tiny, data_for(tiny), layer=0)
    assert abs(float(effect) - 1.0) < 1e-4


def test_last_layer_path_patching_equals_activation_patching(tiny, data_for):
    """For last-layer senders nothing but their own layer's MLP lies downstream, so path patching into the logits
    (MLPs recomputed) and activation patching are the same experiment."""
    data = data_for(tiny)
    L, H = tiny.facts.n_layers, tiny.facts.n_heads
    last = [(L - 1, h) for h in range(H)]
    path = patching.path_patch(tiny, data, patching.Receivers("logits"), senders=last, progress=False)
    act = activation_patch_heads(tiny, data)
    torch.testing.assert_close(path[L - 1], act[L - 1], rtol=1e-4, atol=1e-4)
    assert path[: L - 1].isnan().all()


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_path_patching_into_the_logits_is_the_senders_direct_effect(name, data_for):
    """With every other head and every MLP frozen, the final residual stream is the clean one plus the sender's
    change of output (z_corrupt - z_clean) @ W_O: an exact identity the reference loop must reproduce."""
    from headcircuits.models import load_model

    model = load_model(name)
    data = data_for(model)
    base = patching.baseline(model, data)
    _, cache = model.bridge.run_with_cache(data.clean.ids, names_filter=lambda n: n == "ln_final.hook_in")
    final = cache["ln_final.hook_in"]
    hf = model.bridge.original_model
    norm, unembed = (hf.transformer.ln_f, hf.lm_head) if model.facts.family == "gpt2" else (hf.model.norm, hf.lm_head)
    senders = [(0, 1), (1, 2), (2, 3)]
    lds, _ = patching.path_patch_ld(model, data, patching.Receivers("logits"), senders, freeze_mlps=True,
                                    base=base, progress=False)
    W_O = model.bridge.W_O.detach()
    for layer, head in senders:
        delta = (base.z_corrupt[layer][..., head, :] - base.z_clean[layer][..., head, :]) @ W_O[layer, head]
        with torch.no_grad():
            logits = unembed(norm(final + delta))
        expected = patching.core._ld(model, logits, data)
        torch.testing.assert_close(lds[(layer, head)], expected, rtol=1e-4, atol=1e-4)


def test_normalised_effect_and_clear_errors(tiny, data_for):
    clean, corrupt = torch.tensor([2.0, 4.0]), torch.tensor([-1.0, -1.0])
    assert float(patching.normalised_effect(clean, clean, corrupt)) == 0.0
    assert float(patching.normalised_effect(corrupt, clean, corrupt)) == 1.0
    with pytest.raises(ValueError, match="undefined"):
        patching.normalised_effect(clean, clean, clean)
    with pytest.raises(ValueError, match="receiver head"):
        patching.Receivers("q")
    data = data_for(tiny)
    longer = tiny.to_tokens([t + " and" for t in data.clean_text])
    with pytest.raises(ValueError, match="same token length"):
        patching.baseline(tiny, replace(data, corrupt=longer))


def _float64(name: str):
    """A tiny model in float64: a random tiny model's effects through one receiver are small (1e-7 .. 1e-2), so
    agreement is checked where they are far above rounding (rotary tables stay float32: tolerance 3e-7)."""
    from headcircuits.models import load_model

    model = load_model(name)
    model.bridge.double()
    return model


def _atol(model) -> float:
    """float64 throughout (GPT-2): 1e-10; rotary families keep float32 cos/sin tables: 3e-7."""
    return 3e-7 if model.facts.positional == "rotary" else 1e-10


def assert_same_effects(fast: dict, ref: dict, base, atol: float) -> float:
    """The fast path's changes of the logit difference (patched - clean, per sender and prompt) equal the
    reference's, and the reference's changes are far above the tolerance (not two copies of the clean run)."""
    assert ref.keys() == fast.keys()
    ref_delta = torch.stack([ref[s] - base.ld_clean for s in ref])
    fast_delta = torch.stack([fast[s] - base.ld_clean for s in ref])
    biggest = float(ref_delta.abs().max())
    assert biggest > 5 * atol, f"the senders barely move the receivers ({biggest:.1e}): the test could not fail"
    torch.testing.assert_close(fast_delta, ref_delta, rtol=1e-3, atol=atol)
    return biggest


@pytest.mark.parametrize("freeze_mlps", [False, True])
@pytest.mark.parametrize("sender_position", [None, "S2", "END"])
def test_fast_path_patching_agrees_with_the_reference(tiny, freeze_mlps, sender_position):
    """Senders patched everywhere or at END, read at END (logits, movers' queries); senders patched at S2 read at
    S2 (values), since with every head frozen nothing moves between positions: a sender patched at S2 has
    exactly no effect at END (checked too)."""
    model = _float64(tiny.name)
    data = ioi.generate(model, 6, seed=0, counterfactual="abc")
    L = model.facts.n_layers
    base = patching.baseline(model, data)
    heads = ((L - 1, 0), (L - 1, 3), (L - 2, 1))
    kwargs = dict(freeze_mlps=freeze_mlps, sender_position=sender_position, base=base, progress=False)
    if sender_position == "S2":
        ref, _ = patching.path_patch_ld(model, data, patching.Receivers("logits"), **kwargs)
        for ld in ref.values():  # float64: the engine's baseline and the plain pass differ by rounding only
            torch.testing.assert_close(ld, base.ld_clean, rtol=0, atol=1e-12)
        receiver_sets = [patching.Receivers("v", heads=heads, position="S2")]
    else:
        receiver_sets = [patching.Receivers("logits"), patching.Receivers("q", heads=heads)]
    for receivers in receiver_sets:
        ref, _ = patching.path_patch_ld(model, data, receivers, **kwargs)
        fast, _ = patching.path_patch_fast_ld(model, data, receivers, chunk=3, **kwargs)
        assert_same_effects(fast, ref, base, _atol(model))


@pytest.mark.parametrize("kind,position", [("k", "S1+1"), ("v", "S2"), ("q", "S2"), ("v", "END")])
def test_fast_path_patching_agrees_with_the_reference_at_any_receiver_position(tiny, kind, position):
    """Receivers before END (the duplicate and previous-token stages): step 3 runs from the receiver position on,
    over the clean prefix's cache; on grouped-K/V families a k / v receiver is the query head's own key / value.
    ABC counterfactuals change every name, so senders also differ before S2."""
    model = _float64(tiny.name)
    data = ioi.generate(model, 6, seed=1, counterfactual="abc")
    L = model.facts.n_layers
    heads = tuple((layer, h) for layer in (L - 2, L - 1) for h in range(model.facts.n_heads))  # effects well above rounding
    for kv in ("head", "group"):
        receivers = patching.Receivers(kind, heads=heads, position=position, kv=kv)
        base = patching.baseline(model, data)
        ref, _ = patching.path_patch_ld(model, data, receivers, base=base, progress=False)
        fast, _ = patching.path_patch_fast_ld(model, data, receivers, base=base, chunk=4, progress=False)
        assert_same_effects(fast, ref, base, _atol(model))


@pytest.mark.parametrize("kind,position", [("k", "S1+1"), ("v", "S2"), ("q", "END")])
def test_fast_path_senders_between_receiver_layers_join_step3_above_them(tiny, kind, position):
    """Receivers in two layers with senders between them: a sender's step 3 starts at the lowest receiver layer
    above it (below it its run is the clean one), so rows join the run at different layers, in chunks that mix
    them (chunk=3). Equal to the reference."""
    model = _float64(tiny.name)
    data = ioi.generate(model, 6, seed=2, counterfactual="abc")
    H = model.facts.n_heads
    heads = ((1, 0), (1, 1), *((2, h) for h in range(H)))
    receivers = patching.Receivers(kind, heads=heads, position=position)
    senders = receivers.senders(model.facts.n_layers, H)
    assert {layer for layer, _ in senders} == {0, 1}  # layer 0 joins at 1, layer 1's other heads at 2
    base = patching.baseline(model, data)
    ref, _ = patching.path_patch_ld(model, data, receivers, base=base, progress=False)
    fast, _ = patching.path_patch_fast_ld(model, data, receivers, base=base, chunk=3, progress=False)
    assert_same_effects(fast, ref, base, _atol(model))


def test_a_broken_fast_path_is_caught(tiny):
    """The agreement check can fail: a fast path that loses one layer's sender patch (here, by handing it a
    baseline whose counterfactual outputs of layer 1 are the clean ones) disagrees with the reference."""
    model = _float64(tiny.name)
    data = ioi.generate(model, 6, seed=0, counterfactual="abc")
    base = patching.baseline(model, data)
    ref, _ = patching.path_patch_ld(model, data, patching.Receivers("logits"), base=base, progress=False)
    broken = replace(base, z_corrupt=[z if layer != 1 else base.z_clean[1] for layer, z in enumerate(base.z_corrupt)])
    fast, _ = patching.path_patch_fast_ld(model, data, patching.Receivers("logits"), base=broken, progress=False)
    with pytest.raises(AssertionError):
        assert_same_effects(fast, ref, base, _atol(model))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("kind,position", [("k", "S1+1"), ("v", "S2")])
def test_per_head_kv_receivers_differ_from_the_group_and_agree_without_groups(name, kind, position):
    """On a grouped model, patching the whole K/V group also moves the receiver's group mates, so it is another
    experiment than patching the receiver's own key / value; on an ungrouped model the two are the same."""
    from headcircuits.models import ungrouped

    model = _float64(name)
    data = ioi.generate(model, 6, seed=1, counterfactual="abc")
    L = model.facts.n_layers
    table = {kv: patching.path_patch(model, data, patching.Receivers(kind, heads=((L - 1, 1),), position=position,
                                                                      kv=kv), progress=False) for kv in ("head", "group")}
    finite = ~table["head"].isnan()
    assert float((table["head"] - table["group"])[finite].abs().max()) > 1e-4
    flat = ungrouped(model)
    same = {kv: patching.path_patch(flat, data, patching.Receivers(kind, heads=((L - 1, 1),), position=position,
                                                                    kv=kv), progress=False) for kv in ("head", "group")}
    torch.testing.assert_close(same["head"], same["group"], equal_nan=True)
    torch.testing.assert_close(same["head"], table["head"], rtol=1e-6, atol=1e-9, equal_nan=True)


def test_receivers_and_positions_are_validated(tiny, data_for):
    data = data_for(tiny)
    L, H = tiny.facts.n_layers, tiny.facts.n_heads
    with pytest.raises(ValueError, match="do not exist"):
        patching.path_patch(tiny, data, patching.Receivers("q", heads=((L, 0),)), progress=False)
    with pytest.raises(ValueError, match="do not exist"):
        patching.path_patch(tiny, data, patching.Receivers("q", heads=((0, H),)), progress=False)
    with pytest.raises(KeyError, match="not in this ioi TaskData"):
        patching.path_patch(tiny, data, patching.Receivers("v", heads=((1, 0),), position="ITEM_3"), progress=False)
    absent = replace(data, positions={**data.positions, "S2": data.positions["S2"].clone().index_fill(0, torch.tensor([2]), -1)})
    with pytest.raises(ValueError, match=r"absent.*rows \[2\].*subset"):
        patching.path_patch(tiny, absent, patching.Receivers("v", heads=((1, 0),), position="S2"), progress=False)
    with pytest.raises(ValueError, match="kv must be"):
        patching.Receivers("k", heads=((1, 0),), kv="both")


def test_the_papers_per_batch_normalised_effect():
    clean = torch.tensor([2.0, 2.0, 4.0, 4.0])
    corrupt = torch.tensor([0.0, 0.0, 0.0, 0.0])
    patched = torch.tensor([1.0, 1.0, 4.0, 4.0])
    # ratio of means: (2.5 - 3) / (0 - 3) = 1/6; per batch of 2: mean(0.5, 0.0) = 0.25
    assert abs(float(patching.normalised_effect(patched, clean, corrupt)) - 1 / 6) < 1e-6
    assert abs(float(patching.normalised_effect(patched, clean, corrupt, per_batch=2)) - 0.25) < 1e-6
    assert abs(float(patching.normalised_effect(patched, clean, corrupt, per_batch=4)) - 1 / 6) < 1e-6
    with pytest.raises(ValueError, match="positive batch size"):
        patching.normalised_effect(patched, clean, corrupt, per_batch=0)


@pytest.mark.slow
def test_fast_and_reference_agree_on_the_embedded_model(smollm2):
    data = ioi.generate(smollm2, 8, seed=0, counterfactual="abc")
    senders = [(l, h) for l in (3, 17, 22) for h in (0, 4, 8)]
    for receivers in [patching.Receivers("logits"), patching.Receivers("q", heads=((23, 0), (24, 4))),
                      patching.Receivers("v", heads=((23, 0), (24, 4)), position="S2"),
                      patching.Receivers("k", heads=((8, 1), (23, 0)), position="S1+1")]:  # senders join at 8, 23
        ref = patching.path_patch(smollm2, data, receivers, senders, method="reference", progress=False)
        fast = patching.path_patch(smollm2, data, receivers, senders, method="fast", progress=False)
        torch.testing.assert_close(fast, ref, rtol=1e-3, atol=1e-4, equal_nan=True)


def test_a_subset_of_prompts_keeps_its_padded_width_and_both_methods_agree(tiny):
    """A TaskData subset keeps the full batch's padded width (wider than its own prompts): the baseline is laid
    out at that width, which the reference loop runs at (it failed on chapter 03's eight-prompt check)."""
    data = ioi.generate(tiny, 12, seed=0, counterfactual="abc")
    short = int(data.clean.lengths.argmin())
    check = data.subset([short])
    assert check.clean.ids.shape[1] > int(check.clean.lengths.max())
    base = patching.baseline(tiny, check)
    assert base.z_clean[0].shape[1] == check.clean.ids.shape[1]
    r = patching.Receivers("logits")
    senders = [(1, 0), (2, 1)]
    ref = patching.path_patch(tiny, check, r, senders, method="reference", base=base, progress=False)
    fast = patching.path_patch(tiny, check, r, senders, method="fast", base=base, progress=False)
    torch.testing.assert_close(fast, ref, rtol=1e-3, atol=1e-4, equal_nan=True)
