"""The model's own transformer blocks, run on a residual stream directly (hooks and all).

Two exact engines start part-way up the model instead of at the embedding: Talking Heads' END-only traversal
(:mod:`headcircuits.channels`, one token over the earlier tokens' cached keys and values) and the fast path
patching's step 2 (:mod:`headcircuits.patching`, one token with every head frozen, from the sender's layer).
TransformerLens' ``start_at_layer`` still runs the lower blocks (and discards them), so it saves nothing; these
helpers call the Hugging Face blocks that the bridge wraps, whose hook points fire as in a full pass.
"""

from __future__ import annotations

from typing import Iterable

import torch
from jaxtyping import Float
from torch import Tensor

from headcircuits.models.core import Model


def hf_blocks(model: Model):
    """The Hugging Face base model (embeddings, rotary, final norm) and its list of decoder blocks."""
    hf = model.bridge.original_model
    family = model.facts.family
    if family == "gpt2":
        return hf.transformer, hf.transformer.h
    if family == "gpt-neox":
        return hf.gpt_neox, hf.gpt_neox.layers
    return hf.model, hf.model.layers


def final_norm(model: Model, h: Float[Tensor, "rows d_model"]) -> Float[Tensor, "rows d_model"]:
    """The model's final norm (the input of the unembedding), its ``ln_final.hook_out`` firing."""
    base, _ = hf_blocks(model)
    family = model.facts.family
    norm = base.ln_f if family == "gpt2" else base.final_layer_norm if family == "gpt-neox" else base.norm
    return norm(h)


def run_blocks(
    model: Model, h: Float[Tensor, "rows 1 d_model"], layers: Iterable[int], cache=None, position: int = 0,
) -> Float[Tensor, "rows 1 d_model"]:
    """One token's residual ``h`` through the model's blocks ``layers`` at sequence position ``position``,
    attending to the tokens in ``cache`` (a key/value cache of earlier tokens; ``None``: the token alone)."""
    base, blocks = hf_blocks(model)
    family = model.facts.family
    ids = torch.full((h.shape[0], 1), position, dtype=torch.long, device=h.device)
    use_cache = cache is not None
    for layer in layers:
        block = blocks[layer]
        if family == "gpt2":
            out = block(h, cache, attention_mask=None, use_cache=use_cache, position_ids=ids)
        else:
            if family == "gemma3":
                rotary = base.rotary_emb(h, ids, base.config.layer_types[layer])
            else:
                rotary = base.rotary_emb(h, position_ids=ids)
            out = block(h, attention_mask=None, position_embeddings=rotary, position_ids=ids, past_key_values=cache,
                        use_cache=use_cache)
        h = out[0] if isinstance(out, tuple) else out
    return h
