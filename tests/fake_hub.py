"""A Hugging Face cache that holds the papers' hub models (GPT-2 small and medium, Pythia-160m) with their exact
architecture configurations and random weights, so the hub code path of ``load_model`` runs with
``HF_HUB_OFFLINE=1`` and without a network.

What differs from the real checkpoints, and why (nothing that changes the code path):

* the weights are random (the numbers mean nothing; shapes, BOS, positions and vocabulary checks are what count);
* 2 layers instead of 12 / 24 / 12 (``n_layer`` / ``num_hidden_layers``): every other dimension (width, heads,
  head size, MLP width, vocabulary, context, rotary fraction, parallel residual) is the real one;
* stored in float16 to keep the cache small (the loader converts to float32, as for the real files);
* Pythia's tokenizer (GPT-NeoX-20B's BPE) cannot be had offline: the fake uses GPT-2's byte-level BPE
  (``../shared``) under Pythia's tokenizer class, with Pythia's special tokens (``<|endoftext|>`` as BOS/EOS).
  The vocabulary ids differ from Pythia's; the embedding keeps Pythia's 50,304 rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

REVISION = "0" * 40
LAYERS = 2


def _configs():
    from transformers import GPT2Config, GPTNeoXConfig

    return {
        "gpt2": GPT2Config(n_layer=LAYERS, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257,
                           architectures=["GPT2LMHeadModel"], bos_token_id=50256, eos_token_id=50256),
        "gpt2-medium": GPT2Config(n_layer=LAYERS, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257,
                                  architectures=["GPT2LMHeadModel"], bos_token_id=50256, eos_token_id=50256),
        "EleutherAI/pythia-160m": GPTNeoXConfig(
            num_hidden_layers=LAYERS, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
            rotary_pct=0.25, rotary_emb_base=10000, max_position_embeddings=2048, vocab_size=50304,
            use_parallel_residual=True, tie_word_embeddings=False, hidden_act="gelu", layer_norm_eps=1e-5,
            architectures=["GPTNeoXForCausalLM"], bos_token_id=0, eos_token_id=0),
    }


def write_fake_hub(hub_cache: Path, gpt2_tokenizer: Path, seed: int = 0) -> dict[str, str]:
    """Write the three models into ``hub_cache`` (a ``HF_HUB_CACHE`` folder) in the hub's own layout
    (``models--<org>--<name>/snapshots/<revision>``, ``refs/main``); returns {hub id: snapshot folder}."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = {}
    for i, (repo_id, config) in enumerate(_configs().items()):
        folder = hub_cache / ("models--" + repo_id.replace("/", "--"))
        snapshot = folder / "snapshots" / REVISION
        snapshot.mkdir(parents=True, exist_ok=True)
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(REVISION)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            model = AutoModelForCausalLM.from_config(config)
        model.half().save_pretrained(snapshot)
        tokenizer = AutoTokenizer.from_pretrained(str(gpt2_tokenizer))
        tokenizer.save_pretrained(snapshot)
        if repo_id.startswith("EleutherAI/"):
            cfg = json.loads((snapshot / "tokenizer_config.json").read_text())
            cfg["tokenizer_class"] = "GPTNeoXTokenizer"
            (snapshot / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
        out[repo_id] = str(snapshot)
    return out


def clear(hub_cache: Path) -> None:
    shutil.rmtree(hub_cache, ignore_errors=True)
