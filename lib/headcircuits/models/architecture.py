"""Every difference between the architecture families, in one place, and the names of the hook points.

The library runs four families (GPT-2, Llama / SmolLM2, Gemma-3, GPT-NeoX / Pythia) through TransformerLens'
``TransformerBridge``, which wraps the Hugging Face model. Where an experiment needs the Hugging Face modules
themselves (to run a block on a residual stream, to read a norm's weights), it asks this module; no other module
of the library branches on ``facts.family`` or spells a hook name by hand.

What differs, family by family:

==============  =================  ===================  =====================  ===================
                GPT-2              Llama (SmolLM2)      Gemma-3                GPT-NeoX (Pythia)
==============  =================  ===================  =====================  ===================
base / blocks   ``transformer.h``  ``model.layers``     ``model.layers``       ``gpt_neox.layers``
positions       learned (embed)    rotary               rotary, per layer type rotary
block wiring    sequential         sequential           post-attn and post-MLP parallel residual
                                                        norms                  (when configured)
norm            LayerNorm          RMSNorm (w)          RMSNorm (1 + w)        LayerNorm
final-norm bias yes                no                   no                     yes
value biases    ``b_V``            none                 none                   ``b_V``
==============  =================  ===================  =====================  ===================
"""

from __future__ import annotations

import re

import torch
from jaxtyping import Float
from torch import Tensor

from headcircuits.models.core import Model

#: hook kinds -> the TransformerLens hook name (``{layer}`` filled in by :func:`hook`)
HOOKS: dict[str, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",  # the residual stream entering a block
    "resid_post": "blocks.{layer}.hook_resid_post",  # ... leaving it
    "q": "blocks.{layer}.attn.hook_q",  # [batch, pos, head, d_head], before any rotary rotation
    "k": "blocks.{layer}.attn.hook_k",  # [batch, pos, kv head, d_head]
    "v": "blocks.{layer}.attn.hook_v",
    "pattern": "blocks.{layer}.attn.hook_pattern",  # [batch, head, query pos, key pos]
    "z": "blocks.{layer}.attn.hook_z",  # [batch, pos, head, d_head]: each head's output before W_O
    "mlp_out": "blocks.{layer}.hook_mlp_out",  # [batch, pos, d_model]
    "post_attn_scale": "blocks.{layer}.ln1_post.hook_scale",  # Gemma-3: the post-attention norm's rms
    "final_in": "ln_final.hook_in",  # the final norm's input (the last residual stream)
    "final_out": "ln_final.hook_out",  # its output, which the unembedding reads
}
#: the hook kinds whose activations have a sequence-position axis at dimension 1 (``pattern``: its query axis is 2)
POSITIONAL = ("resid_pre", "resid_post", "q", "k", "v", "z", "mlp_out", "post_attn_scale", "final_in", "final_out")

_NAME = re.compile(r"^blocks\.(\d+)\.")


def hook(kind: str, layer: int | None = None) -> str:
    """The hook point's name for ``kind`` (a key of :data:`HOOKS`) at ``layer`` (none for ``final_in`` /
    ``final_out``).

    Args:
        kind: what the hook sees, e.g. ``"z"`` (heads' outputs), ``"pattern"`` (attention probabilities).
        layer: the block, for every kind except the final norm's.

    Returns:
        The name TransformerLens registers the hook under, e.g. ``blocks.9.attn.hook_z``.
    """
    if kind not in HOOKS:
        raise KeyError(f"unknown hook kind {kind!r}; the kinds are {sorted(HOOKS)}")
    template = HOOKS[kind]
    if ("{layer}" in template) != (layer is not None):
        raise ValueError(f"hook kind {kind!r} " + ("needs a layer" if layer is None else "takes no layer"))
    return template.format(layer=layer)


def layer_of(name: str) -> int | None:
    """The block a hook name sits in (``None`` outside the blocks: embeddings, final norm).

    Args:
        name: a hook name.

    Returns:
        Its block, or ``None``.
    """
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


def base_model(model: Model):
    """The Hugging Face base model: embeddings, rotary embedding, final norm and config.

    Args:
        model: the model.

    Returns:
        The Hugging Face base model.
    """
    hf = model.bridge.original_model
    return {"gpt2": lambda: hf.transformer, "gpt-neox": lambda: hf.gpt_neox}.get(model.facts.family, lambda: hf.model)()


def blocks(model: Model) -> list:
    """The Hugging Face decoder blocks (each wrapped by the bridge, so its hook points fire when it runs).

    Args:
        model: the model.

    Returns:
        The list of blocks.
    """
    base = base_model(model)
    return base.h if model.facts.family == "gpt2" else base.layers


def final_norm(model: Model, h: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """The model's final norm (the unembedding's input), its ``final_in`` / ``final_out`` hooks firing.

    Args:
        model: the model.
        h: residual streams.

    Returns:
        The normed streams.
    """
    return _final_norm_module(model)(h)


def _final_norm_module(model: Model):
    base, family = base_model(model), model.facts.family
    return base.ln_f if family == "gpt2" else base.final_layer_norm if family == "gpt-neox" else base.norm


def final_norm_bias(model: Model) -> Float[Tensor, " d_model"]:
    """The final norm's additive bias (LayerNorm models; zeros on RMSNorm models).

    Args:
        model: the model.

    Returns:
        ``[d_model]``.
    """
    bias = getattr(_final_norm_module(model), "bias", None)
    return torch.zeros(model.facts.d_model) if bias is None else bias.detach()


def _input_norm(model: Model, layer: int):
    block = blocks(model)[layer]
    return block.ln_1 if model.facts.family == "gpt2" else block.input_layernorm


def input_norm_scales(model: Model) -> Float[Tensor, "layer d_model"]:
    """Each block's pre-attention norm scale as the model applies it (Gemma-3 multiplies by ``1 + w``), on the CPU.

    Args:
        model: the model.

    Returns:
        ``[layer, d_model]``.
    """
    scale = torch.stack([_input_norm(model, l).weight.detach().float().cpu() for l in range(model.facts.n_layers)])
    return 1.0 + scale if model.facts.family == "gemma3" else scale


def input_norm_biases(model: Model) -> list[Tensor | None]:
    """Each block's pre-attention norm bias (LayerNorm models; ``None`` where the norm has none).

    Args:
        model: the model.

    Returns:
        One ``[d_model]`` tensor (or ``None``) per layer.
    """
    return [getattr(_input_norm(model, l), "bias", None) for l in range(model.facts.n_layers)]


def post_attention_gains(model: Model) -> Float[Tensor, "layer d_model"]:
    """Gemma-3's post-attention norm weight as applied, ``1 + w``, per layer (the other families have no such norm).

    Args:
        model: a Gemma-3 model.

    Returns:
        ``[layer, d_model]``.
    """
    if model.facts.family != "gemma3":
        raise ValueError(f"{model.name} ({model.facts.family}) has no post-attention norm")
    return torch.stack([1.0 + block.post_attention_layernorm.weight.detach() for block in blocks(model)])


def value_biases(model: Model) -> Float[Tensor, "layer kv_head d_head"] | None:
    """The value biases ``b_V`` (``None`` for a family or checkpoint without them).

    Args:
        model: the model.

    Returns:
        ``[layer, kv head, d_head]`` or ``None``.
    """
    if model.facts.family not in ("gpt2", "gpt-neox"):
        return None
    try:
        return model.bridge.b_V.detach()
    except AttributeError:
        return None


def sliding_window(model: Model) -> int | None:
    """Gemma-3's sliding attention window (tokens), which the engine's own masks do not apply (so it refuses
    longer prompts); ``None`` for the other families.

    Args:
        model: the model.

    Returns:
        The window in tokens, or ``None``.
    """
    if model.facts.family != "gemma3":
        return None
    return getattr(base_model(model).config, "sliding_window", None)


def run_block(
    model: Model, layer: int, h: Float[Tensor, "rows pos d_model"], ids: Tensor, mask: Tensor | None, cache,
) -> Float[Tensor, "rows pos d_model"]:
    """Block ``layer`` of the model on residual streams ``h`` at position ids ``ids`` ([rows, pos]), with an
    additive attention ``mask`` ([rows, 1, pos, keys] or ``None``: the block's own causal mask) over the keys of
    ``cache`` (a key/value cache of earlier tokens, or ``None``) and of ``h``; hooks fire as in a full pass.

    Args:
        model: the model.
        layer: the block.
        h: ``[rows, pos, d_model]`` residual streams entering it.
        ids: ``[rows, pos]`` position ids.
        mask: an additive attention mask, or ``None``.
        cache: the earlier tokens' keys and values (a :class:`headcircuits.passes.Prefix`), or ``None``.

    Returns:
        The residual streams leaving the block.
    """
    block = blocks(model)[layer]
    family = model.facts.family
    if family == "gpt2":  # learned positions were added with the embeddings
        out = block(h, cache, attention_mask=mask, use_cache=cache is not None, position_ids=ids)
    else:
        base = base_model(model)
        rotary = (base.rotary_emb(h, ids, base.config.layer_types[layer]) if family == "gemma3"
                  else base.rotary_emb(h, position_ids=ids))
        out = block(h, attention_mask=mask, position_embeddings=rotary, position_ids=ids, past_key_values=cache,
                    use_cache=cache is not None)
    return out[0] if isinstance(out, tuple) else out


def attention_output(model: Model, layer: int, z: Float[Tensor, "... head d_head"]) -> Float[Tensor, "... d_model"]:
    """Block ``layer``'s attention output from its heads' ``z`` (W_O and its bias), before any post-attention norm.

    Args:
        model: the model.
        layer: the block.
        z: ``[..., head, d_head]``.

    Returns:
        ``[..., d_model]``.
    """
    return blocks(model)[layer].attn.o(z.flatten(-2))


def mlp_only_block(
    model: Model, layer: int, h: Float[Tensor, "rows d_model"], attn: Float[Tensor, "rows d_model"],
    mlp: Float[Tensor, "rows d_model"] | None = None,
) -> Float[Tensor, "rows d_model"]:
    """Block ``layer`` on residual rows ``h`` whose attention output ``attn`` is known (every head frozen), so only
    the norms and the MLP run; ``mlp``: the MLP's output given instead of recomputed. The family's wiring:
    sequential (GPT-2, Llama), Gemma-3's post-attention and post-feed-forward norms, GPT-NeoX's parallel residual
    (the MLP reads the block's input).

    Args:
        model: the model.
        layer: the block.
        h: ``[rows, d_model]`` entering it.
        attn: ``[rows, d_model]``, its attention output.
        mlp: its MLP's output, if known.

    Returns:
        ``[rows, d_model]`` leaving the block.
    """
    block = blocks(model)[layer]
    family = model.facts.family
    if family == "gemma3":
        h = h + block.ln1_post(attn)
        return h + (block.ln2_post(block.mlp(block.ln2(h))) if mlp is None else mlp)
    if family == "gpt-neox" and block._original_component.use_parallel_residual:
        return h + attn + (block.mlp(block.ln2(h)) if mlp is None else mlp)
    h = h + attn
    return h + (block.mlp(block.ln2(h)) if mlp is None else mlp)
