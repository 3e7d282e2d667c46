"""The reference path patching: the papers' loop, step by step, with the plain hooked forward pass (the oracle the
fast path is tested against; see :mod:`headcircuits.path_patching`)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from headcircuits.models.architecture import hook
from headcircuits.models.core import Head, Model
from headcircuits.path_patching.core import Baseline, Receivers, _ld, _position_mask, _receiving_model, baseline
from headcircuits.progress import tqdm
from headcircuits.tasks.base import TaskData


@torch.no_grad()
def path_patch_ld(
    model: Model,
    data: TaskData,
    receivers: Receivers,
    senders: list[Head] | None = None,
    *,
    freeze_mlps: bool = False,
    sender_position: str | None = None,
    base: Baseline | None = None,
    progress: bool = True,
) -> tuple[dict[Head, Tensor], Baseline]:
    """The reference path patching loop: for each sender, its patched logit difference per prompt.

    Args:
        model: the model.
        data: the prompts.
        receivers: where the effect is read.
        senders: the heads patched (default: every head that can send).
        freeze_mlps: freeze the MLPs too (Wang et al.: recomputed).
        sender_position: patch the sender at this position only (``None``: every position).
        base: the clean and counterfactual runs (computed if not given).
        progress: show a progress bar.

    Returns:
        ``({sender: [batch] patched logit differences}, the baseline)``.
    """
    receivers.check(model, data)
    model = _receiving_model(model, receivers)
    base = base or baseline(model, data)
    L, H = model.facts.n_layers, model.facts.n_heads
    senders = senders if senders is not None else receivers.senders(L, H)
    group = model.facts.kv_group_size
    device = model.device
    ids = data.clean.ids.to(device)
    base = Baseline(*(x.to(device) if isinstance(x, Tensor) else [t.to(device) for t in x]
                      for x in (base.ld_clean, base.ld_corrupt, base.z_clean, base.z_corrupt, base.mlp_clean,
                                base.resid_pre_clean)))
    sender_mask = _position_mask(data, sender_position, tuple(data.clean.ids.shape), device)[..., None]
    receiver_rows = torch.arange(len(data), device=device)
    receiver_pos = data.at(receivers.position).to(device)
    out: dict[Head, Tensor] = {}
    for sender in tqdm(senders, desc="path patching (reference)", disable=not progress, leave=False):
        ls, hs = sender

        # step 2: freeze every head to clean, sender to counterfactual; record the receivers' inputs
        def freeze(z, hook, layer):
            frozen = base.z_clean[layer].clone()
            if layer == ls:
                frozen[..., hs, :] = torch.where(sender_mask, base.z_corrupt[layer][..., hs, :], frozen[..., hs, :])
            return frozen

        hooks: list[tuple[str, Callable]] = [(hook("z", l), lambda z, hook, l=l: freeze(z, hook, l)) for l in range(L)]
        if freeze_mlps:
            hooks += [(hook("mlp_out", l), lambda x, hook, l=l: base.mlp_clean[l]) for l in range(L)]
        recorded: dict[int, Tensor] = {}
        if receivers.kind != "logits":
            for layer in receivers.layers:
                def record(x, hook, layer=layer):
                    recorded[layer] = x.clone()
                    return x

                hooks.append((hook(receivers.kind, layer), record))
        logits = model.bridge.run_with_hooks(ids, fwd_hooks=hooks)
        if receivers.kind == "logits":
            out[sender] = _ld(model, logits, data).cpu()
            continue

        # step 3: a clean run with only the receivers' inputs replaced, at the receiver position
        patch_hooks = []
        for layer in receivers.layers:
            heads = [h for l, h in receivers.heads if l == layer]
            if receivers.kind in ("k", "v"):
                heads = sorted({h // group for h in heads})  # the shared K/V head of each receiver's group

            def patch(x, hook, layer=layer, heads=heads):
                x = x.clone()
                for h in heads:
                    x[receiver_rows, receiver_pos, h] = recorded[layer][receiver_rows, receiver_pos, h]
                return x

            patch_hooks.append((hook(receivers.kind, layer), patch))
        logits = model.bridge.run_with_hooks(ids, fwd_hooks=patch_hooks)
        out[sender] = _ld(model, logits, data).cpu()
    return out, base
