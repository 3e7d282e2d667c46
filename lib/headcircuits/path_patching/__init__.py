"""Path patching (Wang et al. 2022, App. B; Circuit Component Reuse, §3).

Everything is measured with the logit difference LD = logit(answer) - logit(distractor) at each prompt's own END
and reported as the papers' normalised effect

    effect = (LD_patched - LD_clean) / (LD_corrupt - LD_clean)

(0: the patch changes nothing; 1: it moves the model all the way to its behaviour on the counterfactual prompts;
averages over prompts are taken before the ratio, as in the papers).

Path patching measures a *sender* head's effect on a set of *receivers* through the direct path only:

1. run the clean and the counterfactual ("corrupt") prompts and cache every head's output ``z``;
2. run the clean prompts again with every head frozen to its clean ``z`` except the sender, which gets its
   counterfactual ``z`` (at every position, or at one named position); MLPs are recomputed (default) or frozen;
   record the receivers' inputs (the final logits, or the q / k / v of receiver heads at a named position);
3. for q / k / v receivers, run the clean prompts once more with only those inputs replaced, and read LD.

Two implementations compute the same numbers: the *reference* (:func:`path_patch_ld`), the papers' loop that
follows those steps literally with the plain hooked forward pass, and the *fast* one (:func:`path_patch_fast_ld`),
which runs them on the engine (:func:`headcircuits.engine.run`) and exploits that frozen heads move no
information between positions (see its docstring).
On grouped-K/V models (SmolLM2: 3 query heads per K/V head; Gemma-3: one K/V head per layer) a k or v
receiver is, by default, the receiver *query head's own* key or value (``Receivers(kv="head")``, the per-head
stages of Wang et al.): the patch is applied to an exactly equivalent copy of the model with one K/V head per
query head (:func:`headcircuits.models.ungrouped`), so the other query heads of the group keep their clean
keys and values. ``kv="group"`` patches the shared K/V head, which every query head of the group then sees.
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from headcircuits import spread
from headcircuits.cache import on_disk
from headcircuits.models.core import Head, Model
from headcircuits.path_patching.core import Baseline, Receivers, baseline, normalised_effect, zero_by_construction
from headcircuits.path_patching.fast import FrozenHeads, ReceiverInputs, path_patch_fast_ld
from headcircuits.path_patching.reference import path_patch_ld
from headcircuits.tasks.base import TaskData

__all__ = ["Baseline", "FrozenHeads", "ReceiverInputs", "Receivers", "baseline", "normalised_effect", "path_patch",
           "path_patch_fast_ld", "path_patch_ld", "zero_by_construction"]


PROMPTS_PER_PIECE = 100  # ours: path patching's prompts per piece of a sweep (the book's 32 are one piece)


@on_disk("path_patch", enabled_by="cache", ignore=("progress",))
def path_patch(
    model: Model,
    data: TaskData,
    receivers: Receivers,
    senders: list[Head] | None = None,
    *,
    method: Literal["fast", "reference"] = "fast",
    freeze_mlps: bool = False,
    sender_position: str | None = None,
    base: Baseline | None = None,
    progress: bool = True,
    cache: bool = False,
    per_batch: int | None = None,
    prompts_per_piece: int = PROMPTS_PER_PIECE,
) -> Float[Tensor, "layer head"]:
    """Normalised path-patching effect of every sender on the receivers, as a [layer, head] table on the CPU (NaN
    for heads that are not senders). See the module docstring for the three steps. ``method='fast'`` and
    ``'reference'`` (the paper's loop) compute the same numbers. ``per_batch``: see :func:`normalised_effect`
    (None: a ratio of means, ours; 25: Circuit Component Reuse's average of per-batch ratios). ``cache=True``
    keeps the table on disk (:func:`headcircuits.cache.on_disk`), keyed by every other argument (the baseline by
    its contents).

    Args:
        model: the model.
        data: the prompts.
        receivers: where the effect is read.
        senders: the heads patched (default: every head that can send).
        method: ``fast`` (the engine) or ``reference`` (the paper's loop).
        freeze_mlps: freeze the MLPs too.
        sender_position: patch the sender at this position only.
        base: the clean and counterfactual runs.
        progress: show a progress bar.
        cache: keep the table on disk.
        per_batch: see :func:`normalised_effect`.
        prompts_per_piece: ours: the prompts of one piece of the sweep (:func:`headcircuits.spread.sweep`; pieces
            run side by side on a cluster, and the per-prompt logit differences are gathered before the ratio).

    Returns:
        ``[layer, head]`` normalised effects on the CPU (NaN: not a sender).
    """
    if method not in ("fast", "reference"):
        raise ValueError(f"method must be 'fast' or 'reference', not {method!r}")
    rows = spread.ranges(len(data), prompts_per_piece)
    whole = len(rows) == 1  # one piece: the baseline given (if any) is its own
    pieces = spread.sweep("path_patch", _patched, model, rows, progress=progress and not whole, data=data,
                          receivers=receivers, senders=senders, method=method, freeze_mlps=freeze_mlps,
                          sender_position=sender_position, base=base if whole else None, bar=progress and whole)
    ld_clean = torch.cat([clean for _, clean, _ in pieces])
    ld_corrupt = torch.cat([corrupt for _, _, corrupt in pieces])
    table = torch.full((model.facts.n_layers, model.facts.n_heads), float("nan"))
    for layer, head in pieces[0][0]:
        ld = torch.cat([lds[(layer, head)] for lds, _, _ in pieces])
        table[layer, head] = float(normalised_effect(ld[None], ld_clean, ld_corrupt, per_batch)[0])
    return table


def _patched(
    model: Model, rows: range, *, data: TaskData, receivers: Receivers, senders: list[Head] | None, method: str,
    freeze_mlps: bool, sender_position: str | None, base: Baseline | None, bar: bool,
) -> tuple[dict[Head, Tensor], Tensor, Tensor]:
    """One piece of :func:`path_patch`: the patched logit differences of every sender on the prompts ``rows``,
    with their clean and counterfactual ones (all on the CPU)."""
    part = spread.rows_of(data, rows)
    run = path_patch_fast_ld if method == "fast" else path_patch_ld
    lds, b = run(model, part, receivers, senders, freeze_mlps=freeze_mlps, sender_position=sender_position,
                 base=base, progress=bar)
    return {tuple(s): ld.cpu() for s, ld in lds.items()}, b.ld_clean.cpu(), b.ld_corrupt.cpu()
