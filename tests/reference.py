"""Plain references that the fast engines are tested against (imported by the test modules)."""

from __future__ import annotations

import torch

from headcircuits import interventions


@torch.no_grad()
def head_attention_full_pass(model, data, head, query, keys, hooks=()):
    """One hooked forward pass of the whole model per batch, ``head``'s attention from ``query`` to each of
    ``keys`` read off its pattern, per prompt."""
    layer, index = head
    seen, out = {}, []
    for batch in data.batches(64, device=model.device):
        model.bridge.run_with_hooks(batch.ids, fwd_hooks=[*hooks, (f"blocks.{layer}.attn.hook_pattern",
                                                                   lambda p, hook: seen.__setitem__("p", p[:, index]))])
        out.append(interventions.attention_at(seen["p"], batch.at(query), [batch.at(k) for k in keys]).float().cpu())
    return torch.cat(out)
