"""The Colored Objects "repair" of Circuit Component Reuse (Merullo et al. 2024, section 5).

In IOI the inhibition heads (and the negative mover) attend from END to the repeated name S2 and tell the movers
which name *not* to copy. On Colored Objects the same heads are in the circuit, but the model often answers with
a wrong colour of the list. The paper's repair forces these heads, at END, to attend to the *incorrect* colours
(as they would attend to S2 in IOI), so that they inhibit them; on GPT-2 medium accuracy rises from 49.6 % to
93.7 % with four heads (81.5 % with the inhibition heads only, 78.1 % with the negative mover only).

The paper's exact forced pattern is not released. Our documented choice (all of it parameters):

* at each prompt's ``query`` position (END) the chosen heads' attention becomes
  ``(1 - strength) * original + strength * uniform(keys)``, a valid probability distribution; ``strength=1``
  puts all attention on the ``keys`` positions (Colored Objects: ``WRONG_COLOR_0`` and ``WRONG_COLOR_1``, equal
  weight); every other position and head is untouched, and everything downstream is recomputed;
* the control applies the same intervention to random heads (same number, distinct draws from the layers the
  chosen heads span, excluding them and any other excluded heads such as the whole circuit; :func:`control_heads`).

Editing the attention probabilities (``hook_pattern``) changes the head's output exactly as if those were its
attention weights (tested against the value vectors on every tiny family). The forcing changes END alone, so
the engine reruns END alone, once per condition, over the earlier tokens' kept keys and values.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from headcircuits import engine, scoring, spread
from headcircuits.edits import Edit, at_position
from headcircuits.engine import Read
from headcircuits.models.architecture import hook as hook_name
from headcircuits.models.core import Head, Model
from headcircuits.tasks.base import TaskData


def forced_row(
    row: Float[Tensor, "batch key"], keys: Int[Tensor, "batch n_keys"], strength: float
) -> Float[Tensor, "batch key"]:
    """One query's attention distribution per prompt, moved towards the ``keys`` positions (Circuit Component
    Reuse §5, the repair): ``(1 - strength) * row + strength * uniform(keys)``. Still a distribution (sums to 1).

    Args:
        row: ``[batch, key]``, one query's attention distribution per prompt.
        keys: ``[batch, n_keys]``, the positions to move it onto.
        strength: how far (0: unchanged, 1: all onto the keys).

    Returns:
        ``[batch, key]``, still a distribution.
    """
    target = torch.zeros_like(row)
    target.scatter_add_(1, keys, torch.full(keys.shape, 1.0 / keys.shape[1], dtype=row.dtype, device=row.device))
    return (1 - strength) * row + strength * target


@dataclass(frozen=True)
class ForcedAttention(Edit):
    """Force ``heads`` to attend, at each prompt's ``query`` position, to its ``keys`` positions (uniformly),
    mixed with their own pattern: ``(1 - strength) * original + strength * uniform(keys)``."""

    heads: tuple[Head, ...]
    keys: tuple[str, ...]
    query: str = "END"
    strength: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength mixes two distributions and must be in [0, 1], not {self.strength}")
        if not self.keys:
            raise ValueError("name at least one key position to force attention onto (e.g. 'WRONG_COLOR_0')")
        if not self.heads:
            raise ValueError("name at least one head to force")

    @property
    def position(self) -> str:
        return self.query

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({l for l, _ in self.heads}))

    def hooks(self, data, rows, positions):
        query = at_position(data, self.query, rows, positions)  # [rows, columns]
        r, c = query.nonzero(as_tuple=True)
        keys = torch.stack([data.at(k) for k in self.keys], 1)[rows.cpu()].to(positions.device)[r]  # [m, n_keys]

        def force(pattern, hook, heads):
            pattern = pattern.clone()
            for h in heads:
                pattern[r, h, c] = forced_row(pattern[r, h, c], keys, self.strength)
            return pattern

        return [(hook_name("pattern", layer), lambda p, hook, hs=[h for l, h in self.heads if l == layer]:
                 force(p, hook, hs)) for layer in self.layers]


def attention_under(
    model: Model, data: TaskData, heads: Sequence[Head], query: str, keys: Sequence[str],
    interventions: Sequence[ForcedAttention | None] = (None,),
) -> list[Float[Tensor, "head key"]]:
    """Mean attention of ``heads`` from ``query`` to each of ``keys`` (rows: heads, columns: keys), once per
    intervention (``None``: none), all from one run (e.g. the movers' attention to the right and wrong colours
    before and after the repair).

    Args:
        model: the model.
        data: the prompts.
        heads: the heads whose attention is read.
        query: the position attending.
        keys: the positions attended to.
        interventions: one forcing per condition (``None``: none).

    Returns:
        One ``[head, key]`` mean attention per intervention, on the CPU.
    """
    if not heads:
        return [torch.zeros(0, len(keys)) for _ in interventions]
    reads = {l: Read("pattern", l, at=query, keys=tuple(keys)) for l in sorted({l for l, _ in heads})}
    results = engine.run(model, data, [[f] if f else [] for f in interventions], read=list(reads.values()))
    return [torch.stack([r[reads[l]][:, h].mean(0) for l, h in heads]) for r in results]


def control_heads(
    n_layers: int, n_heads: int, size: int, n_draws: int, *, exclude: set[Head], layers: range, seed: int = 0,
) -> tuple[list[tuple[Head, ...]], range]:
    """``n_draws`` *distinct* random head sets of ``size`` from ``layers``, none in ``exclude`` (e.g. every
    circuit head). When ``layers`` hold too few heads for that many distinct sets (Gemma-3 has 4 heads per
    layer), the range is widened one layer at a time on both sides; the range used is returned with the sets.

    Args:
        n_layers: the model's layers.
        n_heads: heads per layer.
        size: heads per set.
        n_draws: how many sets.
        exclude: heads no set may contain.
        layers: the layers drawn from first.
        seed: the draw.

    Returns:
        The sets, and the layer range they were drawn from.
    """
    while True:
        pool = [(l, h) for l in layers for h in range(n_heads) if (l, h) not in exclude]
        if len(pool) >= size and math.comb(len(pool), size) >= n_draws:
            break
        if layers.start == 0 and layers.stop == n_layers:
            raise ValueError(
                f"only {len(pool)} heads outside the excluded ones: cannot draw {n_draws} distinct sets of {size}; "
                f"ask for fewer controls or a smaller head set")
        layers = range(max(0, layers.start - 1), min(n_layers, layers.stop + 1))
    rng = random.Random(seed)
    draws: list[tuple[Head, ...]] = []
    while len(draws) < n_draws:
        chosen = tuple(sorted(rng.sample(pool, size)))
        if chosen not in draws:
            draws.append(chosen)
    return draws, layers


def repair(
    model: Model,
    data: TaskData,
    heads: dict[str, tuple[Head, ...]],
    keys: tuple[str, ...] = ("WRONG_COLOR_0", "WRONG_COLOR_1"),
    *,
    strength: float = 1.0,
    n_controls: int = 5,
    control_layers: range | None = None,
    exclude: set[Head] | frozenset = frozenset(),
    seed: int = 0,
    per_prompt: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """The repair (Circuit Component Reuse §5): the task with no intervention, with each named head set forced onto
    ``keys`` at END, and with ``n_controls`` distinct random head sets of the size of the largest named set, all
    from one engine run.

    Args:
        model: the model.
        data: Colored Objects prompts (END their last token).
        heads: the named head sets to force, e.g. ``{"inhibition + negative mover": (...), ...}``.
        keys: where the forced heads attend (the wrong colours).
        strength: how far the pattern moves towards the keys (1: all the way).
        n_controls: random head sets of the largest named set's size (:func:`control_heads`: drawn from
            ``control_layers``, default the layers the named heads span, widened when too few heads remain; never
            a named head nor one in ``exclude``, e.g. every circuit head).
        control_layers: see ``n_controls``.
        exclude: heads no control may use.
        seed: the controls' draw.
        per_prompt: also return each condition's :func:`headcircuits.scoring.evaluate` table (controls as
            ``random k #i``), for paired comparisons.

    Returns:
        One row per condition: ``condition``, ``heads``, ``top1_accuracy``, ``candidate_accuracy`` (among the three
        listed colours), ``logit_diff_mean`` and their standard errors; controls have ``condition='random k'`` and
        ``pool`` names the layers they were drawn from.
    """
    conditions: list[tuple[str, tuple[Head, ...], str | None]] = [("none", (), None)]
    conditions += [(name, tuple(chosen), None) for name, chosen in heads.items()]
    named = {h for chosen in heads.values() for h in chosen}
    size = max((len(c) for c in heads.values()), default=0)
    if size and n_controls:
        spanned = sorted({l for l, _ in named})
        draws, layers = control_heads(model.facts.n_layers, model.facts.n_heads, size, n_controls,
                                      exclude=named | set(exclude),
                                      layers=control_layers or range(spanned[0], spanned[-1] + 1), seed=seed)
        pool = f"layers {layers.start}-{layers.stop - 1}, excluding {len(named | set(exclude))} heads"
        conditions += [(f"random {size}", chosen, pool) for chosen in draws]
    edits = [[ForcedAttention(chosen, keys, strength=strength)] if chosen else [] for _, chosen, _ in conditions]
    pieces = spread.sweep("repair", _end_logits, model, spread.ranges(len(data), scoring.PROMPTS_PER_PIECE),
                          data=data, edits=edits)
    rows = []
    tables: dict[str, pd.DataFrame] = {}
    for k, (condition, chosen, pool) in enumerate(conditions):
        table = scoring.evaluate(model, data, logits=torch.cat([piece[k] for piece in pieces]))
        label = condition if condition not in tables else f"{condition} #{sum(k.startswith(condition) for k in tables)}"
        tables[label] = table
        rows.append({"condition": condition, "heads": " ".join(f"{l}.{h}" for l, h in chosen),
                     **scoring.summarise(table), **({"pool": pool} if pool else {})})
    frame = pd.DataFrame(rows)
    return (frame, tables) if per_prompt else frame


def _end_logits(model: Model, rows: range, *, data: TaskData, edits: list[list]) -> list[Tensor]:
    """One piece of :func:`repair`: each condition's END logits on the prompts ``rows``, on the CPU."""
    part = spread.rows_of(data, rows)
    return [r.logits.cpu() for r in engine.run(model, part, edits, logits="end")]
