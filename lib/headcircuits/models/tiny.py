"""Tiny random models of each supported architecture, built offline from configs (for fast tests).

They share one small, lossless tokenizer: whole words from a built-in list are single tokens (with and without
their leading space, like a BPE vocabulary), and anything else falls back to single characters, so a word that is
not in the list is several tokens, exactly the situation the task generators must detect on real tokenizers.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

# Words of the three tasks' prompts (names, places, objects, colours, items, template words). Words outside
# this list still tokenise, character by character.
TINY_WORDS: tuple[str, ...] = tuple(dict.fromkeys(
    """
    the a an and to of at in on is was were went gave give decided wanted said had got found then when while
    after afterwards friends it lot fun long argument thinking about going working commuting lunch there you see
    I What what color Q A On Shopping list have already packed still need pack
    store garden restaurant school hospital office house station ring kiss bone basketball computer necklace
    drink snack
    ball bottle bowl bracelet cup envelope jug leash lighter mug notebook pen pencil plate puzzle textbook
    table desk floor
    black blue brown green orange purple red yellow Black Blue Brown Green Orange Purple Red Yellow
    Mary John Tom James Dan Sid Martin Amy Anna Kate Paul Mark Mike Lisa Emma Sarah Adam Alex Ben Chris David
    Eric Frank George Henry Jack Jane Joe Laura Leo Lucy Max Nick Rose Ryan Sam Tim Will
    milk eggs bread butter cheese rice salt sugar tea coffee soap flour honey jam juice pasta soup beans corn
    apples bananas oranges lemons onions carrots potatoes tomatoes garlic pepper oil vinegar cereal yogurt
    chicken fish beef nuts chocolate cookies water
    """.split()
))

_SPECIAL = ("<unk>", "<bos>", "<eos>", "<pad>")


def tiny_tokenizer(words: tuple[str, ...] = TINY_WORDS) -> PreTrainedTokenizerFast:
    """A lossless tokenizer: listed words are single tokens (bare and with a leading space), the rest characters."""
    chars = list(string.ascii_letters + string.digits + string.punctuation)
    entries = [*_SPECIAL, " ", "\n", *chars, *(" " + c for c in chars), *words, *(" " + w for w in words)]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(entries))}
    backend = Tokenizer(
        models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix="", max_input_chars_per_word=200)
    )
    backend.pre_tokenizer = pre_tokenizers.Split(
        Regex(r" ?[A-Za-z]+| ?[0-9]| ?[^A-Za-z0-9\s]|\s"), behavior="isolated"
    )
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )
    # TransformerLens re-creates tokenizers from ``init_kwargs`` unless they already add BOS; this one is used
    # as it is (the Model decides about BOS itself), so say so.
    tok.init_kwargs.update(name_or_path="tiny-tokenizer", add_bos_token=True)
    return tok


def tiny_hf_config(family: str, vocab_size: int, *, n_layers: int = 3, d_model: int = 64, n_heads: int = 4):
    """A small config of the given family. Llama gets grouped K/V heads (like SmolLM2), Gemma-3 one K/V head
    plus q/k norms and post-attention norms (like Gemma-3-270M)."""
    d_head = d_model // n_heads
    common = dict(vocab_size=vocab_size, pad_token_id=3, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        cfg = GPT2Config(n_positions=512, n_embd=d_model, n_layer=n_layers, n_head=n_heads, **common)
        cls = GPT2LMHeadModel
    elif family == "llama":
        cfg = LlamaConfig(
            hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, num_key_value_heads=n_heads // 2, head_dim=d_head,
            max_position_embeddings=512, tie_word_embeddings=True, **common,
        )
        cls = LlamaForCausalLM
    elif family == "gemma3":
        cfg = Gemma3TextConfig(
            hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, num_key_value_heads=1, head_dim=d_head, query_pre_attn_scalar=d_head,
            max_position_embeddings=512, sliding_window=512,
            layer_types=["sliding_attention"] * (n_layers - 1) + ["full_attention"], **common,
        )
        cls = Gemma3ForCausalLM
    elif family == "gpt-neox":
        cfg = GPTNeoXConfig(
            hidden_size=d_model, intermediate_size=4 * d_model, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, max_position_embeddings=512, **common,
        )
        cls = GPTNeoXForCausalLM
    else:
        raise ValueError(f"no tiny config for family {family!r}")
    cfg.architectures = [cls.__name__]
    return cfg, cls


def tiny_hf_model(family: str, tokenizer, seed: int = 0):
    """A randomly initialised HF model of the family, deterministic in ``seed``, without touching global RNG."""
    cfg, cls = tiny_hf_config(family, vocab_size=len(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    return model.eval()
