"""The model's own transformer blocks, run on a residual stream directly (hooks and all).

Two exact engines start part-way up the model instead of at the embedding: the END-only engine (one token over
the earlier tokens' cached keys and values, :func:`prefix_pass`, or many copies of it side by side,
:func:`run_copies`; used by Talking Heads' traversal and fix in :mod:`headcircuits.channels` and by the repair
and the attention under it in :mod:`headcircuits.interventions`, through
:func:`headcircuits.metrics.end_only_logits`) and the fast path patching's step 2 (:mod:`headcircuits.patching`,
one token with every head frozen, from the sender's layer; into the logits, the norms and MLPs alone,
:func:`mlp_only_block`).
TransformerLens' ``start_at_layer`` still runs the lower blocks (and discards them), so it saves nothing; these
helpers call the Hugging Face blocks that the bridge wraps, whose hook points fire as in a full pass.
"""

from __future__ import annotations

from typing import Iterable

import torch
from jaxtyping import Float, Int
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
    ids = torch.full((h.shape[0], 1), position, dtype=torch.long, device=h.device)
    return _through(model, h, layers, ids, None, cache)


def run_copies(
    model: Model, h: Float[Tensor, "rows copies d_model"], layers: Iterable[int], cache, position: int,
) -> Float[Tensor, "rows copies d_model"]:
    """Several independent reruns of one token per row (e.g. END under each point of a traversal), laid along the
    sequence axis: copy ``j`` sits at sequence position ``position`` and attends to the ``position`` earlier
    tokens in ``cache`` and to itself, never to another copy (a block-diagonal mask). The same as
    :func:`run_blocks` on every copy as its own row, without repeating the cache of earlier tokens for each copy
    (copying it was most of a long prompt's cost); hooks see the copies as positions ([rows, copies, ...])."""
    rows, copies = h.shape[:2]
    if cache is None or cache.get_seq_length() != position:
        raise ValueError("run_copies needs the cache of the position earlier tokens")
    _check_window(model, position + 1)
    ids = torch.full((rows, copies), position, dtype=torch.long, device=h.device)
    mask = torch.full((copies, position + copies), torch.finfo(h.dtype).min, dtype=h.dtype, device=h.device)
    mask[:, :position] = 0
    mask[:, position:].fill_diagonal_(0)
    return _through(model, h, layers, ids, mask[None, None].expand(rows, 1, copies, position + copies), cache)


def run_sequence(
    model: Model, h: Float[Tensor, "rows pos d_model"], layers: Iterable[int], cache=None, start: int = 0,
) -> Float[Tensor, "rows pos d_model"]:
    """Residual streams ``h`` of consecutive tokens at positions ``start`` .. ``start + pos - 1`` (e.g. recorded
    entering a block) through the model's blocks ``layers``, attending causally to each other and to the
    ``start`` earlier tokens in ``cache`` (a key/value cache such as :class:`PrefixCache`; ``None`` when
    ``start`` is 0), masked as in a full pass: a run that starts part-way up the model (an edit at layer l
    changes nothing below it) or part-way along the prompt. Right padding needs no mask: no real token attends
    to a later one."""
    rows, width = h.shape[:2]
    if (cache is None) != (start == 0):
        raise ValueError("give the cache of the start earlier tokens exactly when start > 0")
    _check_window(model, start + width)
    ids = torch.arange(start, start + width, device=h.device).expand(rows, width)
    # query i (position start + i) sees keys 0 .. start + i
    mask = torch.full((width, start + width), torch.finfo(h.dtype).min, dtype=h.dtype, device=h.device)
    mask = mask.triu(start + 1)[None, None].expand(rows, 1, width, start + width)
    return _through(model, h, layers, ids, mask, cache)


def attention_output(model: Model, layer: int, z: Float[Tensor, "rows head d_head"]) -> Float[Tensor, "rows d_model"]:
    """Block ``layer``'s attention output from its heads' ``z`` (the output projection W_O, plus its bias), before
    any post-attention norm: what the block adds to the residual stream, or (Gemma-3) normalises first."""
    return hf_blocks(model)[1][layer].attn.o(z.flatten(-2))


def mlp_only_block(
    model: Model, layer: int, h: Float[Tensor, "rows d_model"], attn: Float[Tensor, "rows d_model"],
    mlp: Float[Tensor, "rows d_model"] | None = None,
) -> Float[Tensor, "rows d_model"]:
    """Block ``layer`` on residual rows ``h`` whose attention output is already known (``attn``, from
    :func:`attention_output`: e.g. heads frozen at given values), so that only the norms and the MLP run: no
    query, key or value projection, no attention. ``mlp``: the MLP's contribution (``hook_mlp_out``) instead of
    recomputing it. The family's residual wiring: sequential (GPT-2, Llama), Gemma-3's post-attention and
    post-feed-forward norms, GPT-NeoX's parallel residual (the MLP reads the block's input)."""
    block = hf_blocks(model)[1][layer]
    family = model.facts.family
    if family == "gemma3":
        h = h + block.ln1_post(attn)
        return h + (block.ln2_post(block.mlp(block.ln2(h))) if mlp is None else mlp)
    if family == "gpt-neox" and block._original_component.use_parallel_residual:
        return h + attn + (block.mlp(block.ln2(h)) if mlp is None else mlp)
    h = h + attn
    return h + (block.mlp(block.ln2(h)) if mlp is None else mlp)


class _Done(Exception):
    """Raised after the highest block a clean pass needs."""


@torch.no_grad()
def clean_pass(
    model: Model, ids: Int[Tensor, "batch pos"], layer: int, hooks: list | None = None, upto: int | None = None,
) -> tuple[Float[Tensor, "batch pos d_model"], list[tuple[Tensor, Tensor]]]:
    """One pass of the model's own blocks over (right-padded) prompts, without the unembedding: the residual
    stream entering block ``layer`` at every position, and the keys and values ([batch, kv heads, pos, d_head];
    a prompt's first P of them are its prefix's, whatever follows) of every layer up to ``upto`` (default: all;
    the blocks above it are not run). ``hooks`` run in the same pass (e.g. to record other activations)."""
    from transformers import DynamicCache

    top = model.facts.n_layers - 1 if upto is None else upto
    if not layer <= top < model.facts.n_layers:
        raise ValueError(f"upto must lie between layer ({layer}) and the last layer, not {upto}")
    seen: dict[str, Tensor] = {}

    def record(x, hook):
        seen["h"] = x.detach().clone()
        return x

    def done(x, hook):
        raise _Done

    base = hf_blocks(model)[0]
    cache = DynamicCache(config=base.config)  # kept when the pass stops early
    stop = [] if top == model.facts.n_layers - 1 else [(f"blocks.{top}.hook_resid_post", done)]
    try:
        with model.bridge.hooks(fwd_hooks=[*(hooks or []), (f"blocks.{layer}.hook_resid_pre", record), *stop]):
            base(input_ids=ids.to(model.device), use_cache=True, past_key_values=cache)
    except _Done:
        pass
    return seen["h"], [(c.keys, c.values) for c in cache.layers[: top + 1]]


def _through(model: Model, h: Tensor, layers: Iterable[int], ids: Tensor, mask: Tensor | None, cache) -> Tensor:
    """``h`` through the blocks ``layers`` at position ids ``ids`` (the model's own blocks, hooks firing)."""
    base, blocks = hf_blocks(model)
    family = model.facts.family
    use_cache = cache is not None
    for layer in layers:
        block = blocks[layer]
        if family == "gpt2":
            out = block(h, cache, attention_mask=mask, use_cache=use_cache, position_ids=ids)
        else:
            if family == "gemma3":
                rotary = base.rotary_emb(h, ids, base.config.layer_types[layer])
            else:
                rotary = base.rotary_emb(h, position_ids=ids)
            out = block(h, attention_mask=mask, position_embeddings=rotary, position_ids=ids, past_key_values=cache,
                        use_cache=use_cache)
        h = out[0] if isinstance(out, tuple) else out
    return h


class PrefixCache:
    """A key/value cache of a prompt's tokens before END, per layer, read but never extended: every rerun of END
    reuses it (duck-typed on the one method Hugging Face's attention calls)."""

    def __init__(self, kv: dict[int, tuple[Tensor, Tensor]], length: int):
        self.kv, self.length = kv, length

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.kv[layer_idx]
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def repeat(self, times: int) -> "PrefixCache":
        """The same cache for ``times`` copies of every row (row ``copy * n + prompt``)."""
        return PrefixCache({l: (k.repeat(times, 1, 1, 1), v.repeat(times, 1, 1, 1)) for l, (k, v) in self.kv.items()},
                           self.length)


def _check_window(model: Model, length: int) -> None:
    """These engines mask causally but not by Gemma-3's sliding window: refuse prompts longer than it."""
    window = getattr(hf_blocks(model)[0].config, "sliding_window", None)
    if window and model.facts.family == "gemma3" and length > window:
        raise ValueError(f"prompts longer than the sliding window ({window}) are not supported by this engine")


@torch.no_grad()
def prefix_pass(
    model: Model, ids: Int[Tensor, "batch pos"], first: int, layers: Iterable[int],
) -> tuple[Float[Tensor, "batch 1 d_model"], PrefixCache]:
    """One pass of the model's own blocks (no unembedding) over prompts of one length (:func:`clean_pass`): the
    last token's residual stream entering block ``first``, and the earlier tokens' keys and values for
    ``layers`` (the last token's own are recomputed by every rerun, with :func:`run_blocks` at position
    ``length - 1``)."""
    _check_window(model, ids.shape[1])
    layers = list(layers)
    h, kv = clean_pass(model, ids, first, upto=max(layers, default=first))
    return h[:, -1:], PrefixCache({l: (kv[l][0][..., :-1, :], kv[l][1][..., :-1, :]) for l in layers}, ids.shape[1] - 1)
