"""Talking Heads' inhibition score and weight edit (§3), on tiny models of each family."""

from __future__ import annotations

import pytest
import torch

from headcircuits import inhibition, repair, scoring, weights
from headcircuits.models.architecture import hook
from headcircuits.tasks import colored_objects as co
from headcircuits.tasks import ioi
from reference import head_attention_full_pass


@pytest.fixture(scope="module")
def weights_for():
    cache = {}

    def make(model):
        if model.name not in cache:
            cache[model.name] = weights.from_model(model)
        return cache[model.name]

    return make


def _plain_hooks(edit, data, model):
    """An edit's hooks for a plain pass over the whole padded batch."""
    rows = torch.arange(len(data))
    return edit.hooks(data, rows, torch.arange(data.clean.ids.shape[1], device=model.device).expand(len(data), -1))


def _head_output(model, data, layer, head, edits=()):
    """The head's output z @ W_O (the model's own W_O) at every position, under ``edits``."""
    seen = {}

    def record(z, hook):
        seen["z"] = z[..., head, :].detach().clone()
        return z

    hooks = [hk for e in edits for hk in _plain_hooks(e, data, model)]
    with torch.no_grad():
        model.bridge.run_with_hooks(data.clean.ids, fwd_hooks=[*hooks, (hook("z", layer), record)],
                                    stop_at_layer=layer + 1)
    return seen["z"] @ model.bridge.W_O.detach()[layer, head]


def test_editing_a_component_removes_exactly_that_written_direction(tiny, weights_for):
    data, w = co.generate(tiny, 6, seed=0), weights_for(tiny)
    layer, head = 1, 2
    Vh = weights.head_svd(w.OV[layer, head]).Vh  # [d_head, d_model], orthonormal rows
    before = _head_output(tiny, data, layer, head)
    after = _head_output(tiny, data, layer, head, [inhibition.ComponentEdit.of(w, (layer, head), [0])])
    centre = (lambda x: x - x.mean(-1, keepdim=True)) if tiny.facts.norm == "layernorm" else (lambda x: x)
    b, a = centre(before), centre(after)  # what the following (Layer)Norms see
    torch.testing.assert_close(a @ Vh[0], torch.zeros_like(a @ Vh[0]), rtol=0, atol=1e-5)
    torch.testing.assert_close(a @ Vh[1:].T, b @ Vh[1:].T, rtol=1e-4, atol=1e-5)  # other components untouched
    assert float((b @ Vh[0]).abs().max()) > 1e-3  # there was something to remove


def test_editing_no_component_changes_nothing_and_all_components_silence_the_head(tiny, weights_for):
    data, w = co.generate(tiny, 6, seed=0), weights_for(tiny)
    layer, head = 2, 1
    none = inhibition.ComponentEdit.of(w, (layer, head), [])
    assert _plain_hooks(none, data, tiny) == []
    before = scoring.end_logits(tiny, data)
    every = inhibition.ComponentEdit.of(w, (layer, head), range(w.W_V.shape[-1]))
    out = _head_output(tiny, data, layer, head, [every])
    centred = out - out.mean(-1, keepdim=True) if tiny.facts.norm == "layernorm" else out
    torch.testing.assert_close(centred, torch.zeros_like(centred), rtol=0, atol=1e-5)
    if tiny.facts.norm != "layernorm":  # RMSNorm: removing every component is removing the head
        def silence(z, hook):
            z = z.clone()
            z[..., head, :] = 0
            return z

        ends = torch.arange(len(data)), data.positions["END"]
        with torch.no_grad():
            silenced = tiny.bridge.run_with_hooks(data.clean.ids, fwd_hooks=[(hook("z", layer), silence)])[ends]
        ablated = scoring.end_logits(tiny, data, [every])
        torch.testing.assert_close(ablated, silenced.float().cpu(), rtol=1e-4, atol=1e-4)
        assert float((silenced.cpu() - before).abs().max()) > 1e-4


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-gpt-neox"])
def test_the_edit_is_the_direction_leaving_the_residual_stream(name, weights_for):
    """An independent route to the same number: subtract the component's write (out . v) v from the layer's
    residual write (hook_attn_out) instead of editing z. Without a post-attention norm (so not Gemma) the two are
    the same intervention; the mover's inhibition score moves the same way."""
    from headcircuits.models import load_model

    model = load_model(name)
    data = ioi.generate(model, 6, seed=0)
    w = weights_for(model)
    sender, mover, k = (0, 1), (2, 1), 0
    edit = inhibition.ComponentEdit.of(w, sender, [k])
    edited = inhibition.inhibition_score(model, data, mover, [edit])
    v = weights.head_svd(w.OV[sender]).Vh[k]
    W_O = model.bridge.W_O.detach()[sender[0], sender[1]]
    z_seen = {}

    def grab(z, hook):
        z_seen["z"] = z.detach().clone()
        return z

    def remove(x, hook):
        out = z_seen["z"][:, :, sender[1]] @ W_O  # the head's own write at every position
        return x - (out @ v)[..., None] * v

    via_write = head_attention_full_pass(model, data, mover, "END", ["IO", "S1"], [
        (hook("z", sender[0]), grab), (f"blocks.{sender[0]}.hook_attn_out", remove)])
    base = inhibition.inhibition_score(model, data, mover)
    assert float((edited - base).abs().max()) > 1e-5
    torch.testing.assert_close(edited, via_write[:, 0] - via_write[:, 1], rtol=1e-3, atol=1e-6)


def _out_proj(model, layer):
    """The module that maps a layer's z to the residual stream, and whether its weight is stored [in, out]."""
    hf = model.bridge.original_model
    family = model.facts.family
    if family == "gpt2":
        return hf.transformer.h[layer].attn.c_proj, True
    if family == "gpt-neox":
        return hf.gpt_neox.layers[layer].attention.dense, False
    return hf.model.layers[layer].self_attn.o_proj, False


def test_the_papers_weight_edit_equals_editing_the_models_own_weights(tiny):
    """inhibition.weight_edit (an edit of z) against the literal edit of the running model's W_O: the head's output
    loses its zeroed components, its constant part (value biases, which the paper's model keeps in b_O) stays.
    Random biases are put in (on a model of our own: the session's ``tiny`` is read-only) where the family has
    them, so that the constant part matters."""
    from headcircuits.models import architecture, load_model

    model = load_model(tiny.name, seed=3)
    data = co.generate(model, 6, seed=0)
    layer, head = 1, 1
    module, stored_in_out = _out_proj(model, layer)
    bias = architecture.input_norm_biases(model)[layer]
    if bias is not None:
        with torch.no_grad():
            bias.copy_(torch.randn_like(bias) * 0.5)
    w = weights.from_model(model)
    edit = inhibition.weight_edit(model, w, (layer, head), zero=[0, 3])
    hooked = scoring.end_logits(model, data, [edit])
    base = scoring.end_logits(model, data)
    nothing = inhibition.weight_edit(model, w, (layer, head), zero=[])
    assert torch.equal(scoring.end_logits(model, data, [nothing]), base)
    assert (hooked - base).abs().max() > 1e-3  # the edit does something
    offset = weights.value_offsets(model)[layer, head]
    dh = model.facts.d_head
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
    literal = scoring.end_logits(model, data)  # the weights changed in place: no kept pass is served
    assert (hooked - literal).abs().max() < 1e-4


def test_keep_only_keeps_one_component_and_zeroes_the_rest(tiny, weights_for):
    w = weights_for(tiny)
    kept = inhibition.weight_edit(tiny, w, (1, 0), keep=[2])
    assert kept.directions.shape[0] == tiny.facts.d_head - 1
    svd = weights.head_svd(w.OV[1, 0])
    assert torch.allclose(kept.directions, svd.Vh[[k for k in range(tiny.facts.d_head) if k != 2]])


def test_inhibition_score_reads_the_movers_pattern_and_responds_to_forcing(tiny):
    """On a model: the score equals the plain pass's IO minus S1 attention, and forcing the mover onto IO (or S1)
    sends it to +1 (or -1)."""
    data = ioi.generate(tiny, 8, seed=0)
    mover = (2, 1)
    score = inhibition.inhibition_score(tiny, data, mover)
    a = head_attention_full_pass(tiny, data, mover, "END", ["IO", "S1"])
    torch.testing.assert_close(score, a[:, 0] - a[:, 1], rtol=1e-4, atol=1e-5)
    for key, target in (("IO", 1.0), ("S1", -1.0)):
        forced = repair.ForcedAttention((mover,), (key,))
        torch.testing.assert_close(inhibition.inhibition_score(tiny, data, mover, [forced]), torch.full((8,), target))
    assert list(data.meta.order[:4]) == ["ABBA", "BABA", "ABBA", "BABA"]  # the paper's 100 + 100 orders


def test_the_score_under_an_edit_starts_at_the_edit_and_equals_the_plain_pass(tiny, weights_for):
    """The engine starts at the lowest edited block from the kept clean residual entering it; against the plain
    pass for a weight edit and a residual addition, on prompts of several lengths."""
    from headcircuits.edits import ResidualAddition

    data = ioi.generate(tiny, 10, seed=3)
    assert len(data.clean.lengths.unique()) > 1
    w, mover = weights_for(tiny), (2, 1)
    vector = torch.randn(tiny.facts.d_model) * 3
    plain = head_attention_full_pass(tiny, data, mover, "END", ["IO", "S1"])
    for edit in (inhibition.weight_edit(tiny, w, (1, 2), zero=[0, 1]), ResidualAddition(0, "S1", vector)):
        fast = scoring.attention(tiny, data, mover, "END", ["IO", "S1"], [edit])
        full = head_attention_full_pass(tiny, data, mover, "END", ["IO", "S1"], _plain_hooks(edit, data, tiny))
        gap = (fast - full).abs().max()
        assert gap < 1e-6, type(edit).__name__
        assert (full - plain).abs().max() > max(1e-6, 100 * gap)  # the edit changes what the comparison sees


def test_component_and_channel_effects_are_cached_and_keyed_by_their_arguments(tiny, weights_for, monkeypatch):
    data = ioi.generate(tiny, 6, seed=0)
    w = weights_for(tiny)
    calls, score = [], inhibition.inhibition_score
    monkeypatch.setattr(inhibition, "inhibition_score", lambda *a, **k: calls.append(1) or score(*a, **k))
    first = inhibition.component_effects(tiny, data, w, (1, 0), (2, 1), components=[0, 1])
    n = len(calls)
    assert n == 3 and torch.equal(inhibition.component_effects(tiny, data, w, (1, 0), (2, 1), components=[0, 1]),
                                  first) and len(calls) == n  # read back
    inhibition.component_effects(tiny, data, w, (1, 0), (2, 1), components=[0, 2])
    assert len(calls) > n  # another argument, another key
