"""Behavioural metrics of the papers, read at each prompt's own END position.

* logit difference: logit(answer) - logit(distractor) at END (Wang et al.'s IOI metric; invariant to adding a
  constant to all logits, so it is the same with or without TransformerLens' logit centring);
* accuracy: how often the answer is the top-1 token over the whole vocabulary, and how often it beats the
  distractor (Wang et al. report IO > S 99.3 % of the time for GPT-2 small).
"""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from headcircuits.models.core import Model
from headcircuits.tasks.base import TaskData


def logits_at(logits: Float[Tensor, "batch pos vocab"], positions: Int[Tensor, " batch"]) -> Float[Tensor, "batch vocab"]:
    """Each prompt's logits at its own position (e.g. ``data.positions['END']``)."""
    return logits[torch.arange(logits.shape[0]), positions]


def logit_difference(
    end_logits: Float[Tensor, "batch vocab"], answer: Int[Tensor, " batch"], distractor: Int[Tensor, " batch"]
) -> Float[Tensor, " batch"]:
    """logit(answer) - logit(distractor), per prompt."""
    rows = torch.arange(end_logits.shape[0])
    return end_logits[rows, answer] - end_logits[rows, distractor]


@torch.no_grad()
def end_logits(model: Model, data: TaskData, which: str = "clean", batch_size: int = 32) -> Float[Tensor, "batch vocab"]:
    """Logits at END of the clean (or ``corrupt``) prompts, computed in batches."""
    tokens = data.clean if which == "clean" else data.corrupt
    # END of the counterfactual prompts is their own last token (they may differ in length from the clean ones)
    ends = data.positions["END"] if which == "clean" else tokens.last
    out = []
    for start in range(0, tokens.ids.shape[0], batch_size):
        stop = start + batch_size
        ids = tokens.ids[start:stop, : int(tokens.lengths[start:stop].max())]
        out.append(logits_at(model.logits(ids), ends[start:stop]))
    return torch.cat(out)


def per_prompt(model: Model, data: TaskData, batch_size: int = 32) -> pd.DataFrame:
    """One row per clean prompt: logit difference, whether the answer is top-1, beats the distractor, and the
    model's top-1 token, joined with the prompt's metadata."""
    logits = end_logits(model, data, batch_size=batch_size)
    ld = logit_difference(logits, data.answer, data.distractor)
    top = logits.argmax(-1)
    return data.meta.assign(
        prompt=data.clean_text,
        logit_diff=ld.numpy(),
        top1_correct=(top == data.answer).numpy(),
        beats_distractor=(ld > 0).numpy(),
        prediction=model.to_str_tokens(top),
    )


def summarise(table: pd.DataFrame) -> dict[str, float]:
    """Mean and spread of the logit difference, top-1 accuracy and answer-beats-distractor rate."""
    return {
        "n": int(len(table)),
        "logit_diff_mean": float(table.logit_diff.mean()),
        "logit_diff_std": float(table.logit_diff.std(ddof=1)) if len(table) > 1 else 0.0,
        "top1_accuracy": float(table.top1_correct.mean()),
        "beats_distractor": float(table.beats_distractor.mean()),
    }


@torch.no_grad()
def attention_between(
    model: Model, data: TaskData, query: str = "END", key: str = "IO", batch_size: int = 32
) -> Float[Tensor, "layer head"]:
    """Mean attention probability from each prompt's ``query`` position to its ``key`` position, per head.

    E.g. ``query='END', key='IO'`` finds heads that attend to the indirect object at the last token, the
    signature of Wang et al.'s name mover heads. Grouped K/V heads are reported per query head.
    """
    n_layers, n_heads = model.facts.n_layers, model.facts.n_heads
    total = torch.zeros(n_layers, n_heads)
    q_pos, k_pos = data.positions[query], data.positions[key]
    for start in range(0, len(data), batch_size):
        stop = start + batch_size
        ids = data.clean.ids[start:stop, : int(data.clean.lengths[start:stop].max())]
        _, cache = model.bridge.run_with_cache(ids, names_filter=lambda name: name.endswith("attn.hook_pattern"))
        rows = torch.arange(ids.shape[0])
        for layer in range(n_layers):
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # [batch, head, query, key]
            total[layer] += pattern[rows, :, q_pos[start:stop], k_pos[start:stop]].sum(0)
    return total / len(data)
