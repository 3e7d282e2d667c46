"""Patching: invariants and exact identities of the reference implementation, on tiny models of each family."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from headcircuits import patching
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
    effect = patching.activation_patch_residual(tiny, data_for(tiny), layer=0)
    assert abs(float(effect) - 1.0) < 1e-4


def test_last_layer_path_patching_equals_activation_patching(tiny, data_for):
    """For last-layer senders nothing but their own layer's MLP lies downstream, so path patching into the logits
    (MLPs recomputed) and activation patching are the same experiment."""
    data = data_for(tiny)
    L, H = tiny.facts.n_layers, tiny.facts.n_heads
    last = [(L - 1, h) for h in range(H)]
    path = patching.path_patch(tiny, data, patching.Receivers("logits"), senders=last, progress=False)
    act = patching.activation_patch_heads(tiny, data)
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
        expected = patching._ld(model, logits, data)
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


@pytest.mark.parametrize("freeze_mlps", [False, True])
@pytest.mark.parametrize("sender_position", [None, "S2", "END"])
def test_fast_path_patching_agrees_with_the_reference(tiny, data_for, freeze_mlps, sender_position):
    data = data_for(tiny)
    L = tiny.facts.n_layers
    base = patching.baseline(tiny, data)
    for receivers in [patching.Receivers("logits"), patching.Receivers("q", heads=((L - 1, 0), (L - 1, 3), (L - 2, 1)))]:
        kwargs = dict(freeze_mlps=freeze_mlps, sender_position=sender_position, base=base, progress=False)
        ref, _ = patching.path_patch_ld(tiny, data, receivers, **kwargs)
        fast, _ = patching.path_patch_fast_ld(tiny, data, receivers, chunk=3, **kwargs)
        assert ref.keys() == fast.keys()
        for sender in ref:
            torch.testing.assert_close(fast[sender], ref[sender], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind,position", [("k", "S1+1"), ("v", "S2"), ("q", "S2"), ("v", "END")])
def test_fast_path_patching_agrees_with_the_reference_at_any_receiver_position(tiny, kind, position):
    """Receivers before END (the duplicate and previous-token stages): step 3 runs from the receiver position on,
    over the clean prefix's cache; on grouped-K/V families a k / v receiver is its group's shared head.
    A random tiny model's effects through one receiver are small (1e-7 .. 1e-2), so this runs in float64 where
    they are far above rounding; ABC counterfactuals change every name, so senders also differ before S2."""
    from headcircuits.models import load_model

    model = load_model(tiny.name)
    model.bridge.double()
    data = ioi.generate(model, 6, seed=1, counterfactual="abc")
    L = model.facts.n_layers
    receivers = patching.Receivers(kind, heads=((L - 1, 1), (L - 2, 0), (L - 2, 3)), position=position)
    base = patching.baseline(model, data)
    ref, _ = patching.path_patch_ld(model, data, receivers, base=base, progress=False)
    fast, _ = patching.path_patch_fast_ld(model, data, receivers, base=base, chunk=4, max_rows=10, progress=False)
    assert ref.keys() == fast.keys()
    ref_delta = torch.stack([ref[s] - base.ld_clean for s in ref])
    fast_delta = torch.stack([fast[s] - base.ld_clean for s in ref])
    assert float(ref_delta.abs().max()) > 2e-7  # the senders do move the receivers: not two copies of the clean run
    torch.testing.assert_close(fast_delta, ref_delta, rtol=1e-3, atol=3e-7)  # rotary tables stay float32


@pytest.mark.slow
def test_fast_and_reference_agree_on_the_embedded_model(smollm2):
    data = ioi.generate(smollm2, 8, seed=0, counterfactual="abc")
    senders = [(l, h) for l in (3, 17, 22) for h in (0, 4, 8)]
    for receivers in [patching.Receivers("logits"), patching.Receivers("q", heads=((23, 0), (24, 4))),
                      patching.Receivers("v", heads=((23, 0), (24, 4)), position="S2")]:
        ref = patching.path_patch(smollm2, data, receivers, senders, method="reference", progress=False)
        fast = patching.path_patch(smollm2, data, receivers, senders, method="fast", progress=False)
        torch.testing.assert_close(fast, ref, rtol=1e-3, atol=1e-4, equal_nan=True)
