"""Plain references that the fast engines are tested against (imported by the test modules)."""

from __future__ import annotations

import torch

from headcircuits import path_patching
from headcircuits.models import architecture


@torch.no_grad()
def head_attention_full_pass(model, data, head, query, keys, hooks=()):
    """One hooked forward pass of the whole model per batch, ``head``'s attention from ``query`` to each of
    ``keys`` read off its pattern, per prompt."""
    layer, index = head
    seen, out = {}, []
    for batch in data.batches(64, device=model.device):
        model.bridge.run_with_hooks(batch.ids, fwd_hooks=[*hooks, (architecture.hook("pattern", layer),
                                                                   lambda p, hook: seen.__setitem__("p", p[:, index]))])
        rows, q = torch.arange(len(batch.ids)), batch.at(query)
        out.append(torch.stack([seen["p"][rows, q, batch.at(k)] for k in keys], -1).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def plain_run(model, data, edits=(), reads=(), which="clean"):
    """The oracle of the engine: one plain hooked forward pass of the whole model per prompt (no padding, no kept
    pass), the edits' own hooks over every position; returns ``(END logits [batch, vocab], {read: [per prompt]})``
    with each read taken as :func:`headcircuits.engine.run` takes it."""
    from headcircuits.readout import gather

    tokens = data.tokens(which)
    end = data.at("END", which)
    logits, got = [], {r: [] for r in reads}
    for i in range(len(data)):
        n = int(tokens.lengths[i])
        rows = torch.tensor([i])
        positions = torch.arange(n, device=model.device)[None]
        hooks = [hk for e in edits for hk in e.hooks(data, rows, positions)]
        for r in reads:
            hooks.append((r.name, lambda x, hook, r=r: got[r].append(gather(r, x, data, rows, positions)) or x))
        out = model.bridge.run_with_hooks(tokens.ids[i:i + 1, :n].to(model.device), fwd_hooks=hooks)
        logits.append(out[0, end[i]].float().cpu())
    return torch.stack(logits), {r: v for r, v in got.items()}


@torch.no_grad()
def activation_patch_heads(
    model, data, position=None, base=None):
    """Normalised effect of replacing one head's output ``z`` by its counterfactual value (all positions, or a
    named position), everything downstream recomputed. One forward pass per head."""
    base = base or path_patching.baseline(model, data)
    L, H = model.facts.n_layers, model.facts.n_heads
    mask = path_patching.core._position_mask(data, position, tuple(data.clean.ids.shape), model.device)[..., None]
    ids = data.clean.ids.to(model.device)
    ld = torch.zeros(L, H, len(data), device=model.device)
    for layer in range(L):
        for head in range(H):
            def patch(z, hook, layer=layer, head=head):
                z = z.clone()
                z[..., head, :] = torch.where(mask, base.z_corrupt[layer][..., head, :].to(z), z[..., head, :])
                return z

            logits = model.bridge.run_with_hooks(ids, fwd_hooks=[(architecture.hook("z", layer), patch)])
            ld[layer, head] = path_patching.core._ld(model, logits, data)
    return path_patching.normalised_effect(ld, base.ld_clean.to(model.device), base.ld_corrupt.to(model.device)).cpu()


@torch.no_grad()
def activation_patch_residual(
    model, data, layer, position=None, base=None):
    """Normalised effect of replacing the residual stream entering ``layer`` (all positions or one) by its
    counterfactual value. At layer 0 and all positions this *is* the counterfactual run (effect 1)."""
    base = base or path_patching.baseline(model, data)
    name = architecture.hook("resid_pre", layer)
    _, cache = model.bridge.run_with_cache(data.corrupt.ids.to(model.device), names_filter=lambda n: n == name)
    corrupt = cache[name]
    mask = path_patching.core._position_mask(data, position, tuple(data.clean.ids.shape), model.device)[..., None]
    logits = model.bridge.run_with_hooks(
        data.clean.ids.to(model.device), fwd_hooks=[(name, lambda x, hook: torch.where(mask, corrupt, x))]
    )
    return path_patching.normalised_effect(path_patching.core._ld(model, logits, data)[None], base.ld_clean.to(model.device), base.ld_corrupt.to(model.device))[0].cpu()
