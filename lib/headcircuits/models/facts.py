"""Read `ModelFacts` from a Hugging Face config, so no experiment hard-codes a model's shape."""

from __future__ import annotations

from headcircuits.models.core import Family, ModelFacts

_FAMILY_BY_MODEL_TYPE: dict[str, Family] = {
    "gpt2": "gpt2",
    "llama": "llama",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "gpt_neox": "gpt-neox",
}


def family_of(hf_config) -> Family:
    """The architecture family of a HF config; a clear error for families the library was not built for."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in _FAMILY_BY_MODEL_TYPE:
        raise ValueError(
            f"model_type {model_type!r} is not one of the architectures headcircuits supports "
            f"({sorted(set(_FAMILY_BY_MODEL_TYPE.values()))})"
        )
    return _FAMILY_BY_MODEL_TYPE[model_type]


def facts_from_config(
    name: str, hf_config, *, prepend_bos: bool, quantisation: str | None, source: str
) -> ModelFacts:
    """Build the facts of a model from its HF config (the same code for real and tiny models)."""
    family = family_of(hf_config)
    c = hf_config
    if family == "gpt2":
        n_layers, n_heads, d_model = c.n_layer, c.n_head, c.n_embd
        n_kv_heads, d_head = n_heads, d_model // n_heads
    else:
        n_layers, n_heads, d_model = c.num_hidden_layers, c.num_attention_heads, c.hidden_size
        n_kv_heads = getattr(c, "num_key_value_heads", None) or n_heads
        d_head = getattr(c, "head_dim", None) or d_model // n_heads
    return ModelFacts(
        name=name,
        family=family,
        prepend_bos=prepend_bos,
        n_layers=int(n_layers),
        n_heads=int(n_heads),
        n_kv_heads=int(n_kv_heads),
        d_head=int(d_head),
        d_model=int(d_model),
        d_vocab=int(c.vocab_size),
        norm="layernorm" if family in ("gpt2", "gpt-neox") else "rmsnorm",
        post_attn_norm=family == "gemma3",
        qk_norm=family == "gemma3",
        positional="learned" if family == "gpt2" else "rotary",
        quantisation=quantisation,
        source=source,
    )
