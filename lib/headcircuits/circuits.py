"""Circuits: backward discovery stage by stage (Wang et al. 2022; Circuit Component Reuse), and the overlap of two
circuits with the random baseline the paper lacked (what each head does: :mod:`headcircuits.head_classes`).

Discovery runs path patching backwards from the output. Each stage's receivers are the heads the previous stage
selected, read at a named position of the task:

    movers       senders -> logits                          (name / colour movers, negative movers)
    inhibition   senders -> q of the movers at END          (S-inhibition heads)
    duplicate    senders -> v of the inhibition heads at S2 (duplicate-token / induction heads)
    previous     senders -> k of the duplicate heads at S1+1 (previous-token heads)

A head is in the circuit if its effect is in the top ``fraction`` (Circuit Reuse: 2 %) of all heads, by absolute
value, in any stage (both kinds of movers count), and moves at least ``min_effect`` (default 1 %) of the way from
the clean to the counterfactual behaviour: our documented addition, so that a stage whose strongest heads move
almost nothing does not fill the circuit with noise. Every stage uses the fast path patching by default
(``method='reference'`` runs the paper's loop; both give the same tables). ``fraction`` and the stages are
parameters. A stage whose receivers read a position where the counterfactual changes nothing yet (e.g. the
previous-token stage with the S2 -> IO counterfactual) has exactly zero effects: it is recorded, not computed
(:func:`headcircuits.path_patching.zero_by_construction`), with a note in ``Circuit.notes``.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from headcircuits import path_patching
from headcircuits.models.core import Head, Model
from headcircuits.tasks.base import TaskData


@dataclass(frozen=True)
class Stage:
    """One backward step: receivers are the previous stage's heads (``kind`` q/k/v at ``position``), or the logits."""

    name: str
    kind: str  # "logits", "q", "k", "v"
    position: str = "END"


IOI_STAGES: tuple[Stage, ...] = (
    Stage("movers", "logits"),
    Stage("inhibition", "q", "END"),
    Stage("duplicate", "v", "S2"),
    Stage("previous", "k", "S1+1"),
)

#: Colored Objects, the same roles at the task's positions (a documented choice; the paper gives the circuit,
#: not the receiver positions): the repeated token is the queried object at QUERY ("What color is the pencil?"
#: repeats "pencil" of the list). The previous-token stage is left out: the Colored Objects counterfactual changes
#: only the QUERY token, so no sender differs at the earlier position its receivers would be read at
#: (ANSWER_OBJ + 1) and every effect there is exactly 0.
CO_STAGES: tuple[Stage, ...] = (
    Stage("movers", "logits"),
    Stage("inhibition", "q", "END"),
    Stage("duplicate", "v", "QUERY"),
)

STAGES = {"ioi": IOI_STAGES, "colored_objects": CO_STAGES}


@dataclass
class Circuit:
    """Heads with the stages (roles) that selected them, and every stage's [layer, head] effect table."""

    heads: dict[Head, list[str]] = field(default_factory=dict)
    tables: dict[str, Tensor] = field(default_factory=dict)
    fraction: float = 0.02
    min_effect: float = 0.01
    notes: dict[str, str] = field(default_factory=dict)  # per stage, e.g. why its effects are exactly zero
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, wall time (a cached table: its read)
    senders: dict[str, int] = field(default_factory=dict)  # per stage, how many senders were patched

    def __contains__(self, head: Head) -> bool:
        return head in self.heads

    def __len__(self) -> int:
        return len(self.heads)

    def stage(self, name: str) -> list[Head]:
        return sorted(h for h, roles in self.heads.items() if name in roles)

    def stop(self, stages: tuple[Stage, ...], why: str) -> None:
        """Discovery ends before ``stages``: each gets a note that says why it was not run (no table)."""
        for stage in stages:
            self.notes[stage.name] = f"not run: discovery stopped at {stages[0].name}, because {why}"


def top_heads(table: Float[Tensor, "layer head"], fraction: float = 0.02, min_effect: float = 1e-3) -> list[Head]:
    """The heads whose |effect| is in the top ``fraction`` of *all* heads of the model (at least one); NaN entries
    (heads that could not send in this stage) and effects below ``min_effect`` (a head that changes nothing is
    not in a circuit, however few heads do) never qualify.

    Args:
        table: ``[layer, head]`` effects (NaN: not a sender).
        fraction: the share of all the model's heads kept (at least one).
        min_effect: the smallest |effect| kept.

    Returns:
        The kept heads, sorted.
    """
    n = max(1, math.ceil(fraction * table.numel()))
    flat = table.abs().flatten().nan_to_num(-1.0)
    order = torch.argsort(flat, descending=True)[:n]
    H = table.shape[1]
    return sorted((int(i) // H, int(i) % H) for i in order if flat[i] >= min_effect)


def discover(
    model: Model,
    data: TaskData,
    stages: tuple[Stage, ...] | None = None,
    fraction: float = 0.02,
    *,
    min_effect: float = 0.01,
    freeze_mlps: bool = False,
    cache: bool = True,
    progress: bool = True,
    method: str = "fast",
) -> Circuit:
    """Run the stages backwards; each stage's receivers are the heads selected by the stage before it. ``stages``
    defaults to the task's (:data:`STAGES`: IOI or Colored Objects). A stage that cannot run (the stage before
    selected no head) ends discovery: it and every later stage get a note saying why (``Circuit.notes``), and no
    table.

    Args:
        model: the model.
        data: the task's prompts (IOI: ABC counterfactuals).
        stages: the stages, last first (default: the task's).
        fraction: the share of heads each stage keeps (the paper: 2 %).
        min_effect: ours: the smallest |effect| a circuit head has.
        freeze_mlps: freeze the MLPs in path patching.
        cache: keep each stage's table on disk.
        progress: show progress bars.
        method: ``fast`` or ``reference`` path patching.

    Returns:
        The :class:`Circuit`: heads with their stages, every stage's table, notes, timings.
    """
    if stages is None:
        if data.task not in STAGES:
            raise ValueError(f"no default discovery stages for task {data.task!r}; pass stages=(Stage(...), ...)")
        stages = STAGES[data.task]
    circuit = Circuit(fraction=fraction, min_effect=min_effect)
    # the clean and counterfactual runs, once for every stage, when the prompts are one piece of path patching's
    # sweep (more prompts: each piece makes its own, so that no process holds them all)
    base = path_patching.baseline(model, data) if len(data) <= path_patching.PROMPTS_PER_PIECE else None
    previous: list[Head] = []
    for i, stage in enumerate(stages):
        if stage.kind == "logits":
            receivers = path_patching.Receivers("logits")
        else:
            if not previous:
                circuit.stop(stages[i:], f"the stage before ({stages[i - 1].name}) selected no head, so it has no "
                                         "receivers")
                break
            receivers = path_patching.Receivers(stage.kind, heads=tuple(previous), position=stage.position)
        senders = receivers.senders(model.facts.n_layers, model.facts.n_heads)
        if not senders:
            circuit.stop(stages[i:], "its receivers sit in the first layer, so no head can send to them")
            break
        if stage.kind != "logits" and path_patching.zero_by_construction(data, stage.position):
            table = torch.full((model.facts.n_layers, model.facts.n_heads), float("nan"))
            for head in senders:
                table[head] = 0.0
            circuit.tables[stage.name] = table
            circuit.notes[stage.name] = (
                f"every effect is exactly 0: the counterfactual changes no token up to {stage.position}, so no "
                f"sender's output differs where the receivers read it (not computed; no head selected)")
            previous = []
            continue
        start = time.perf_counter()
        table = path_patching.path_patch(model, data, receivers, senders, method=method, freeze_mlps=freeze_mlps,
                                    base=base, progress=progress, cache=cache)
        circuit.seconds[stage.name], circuit.senders[stage.name] = time.perf_counter() - start, len(senders)
        circuit.tables[stage.name] = table
        previous = top_heads(table, fraction, min_effect)
        for head in previous:
            circuit.heads.setdefault(head, []).append(stage.name)
    return circuit


# --- overlap ----------------------------------------------------------------------------------------------------

def _hypergeometric(population: int, marked: int, drawn: int) -> list[float]:
    """P(k of ``drawn`` random items out of ``population`` are among ``marked``), k = 0 .. drawn."""
    total = math.comb(population, drawn)
    return [math.comb(marked, k) * math.comb(population - marked, drawn - k) / total for k in range(drawn + 1)]


@dataclass(frozen=True)
class Overlap:
    """How much of circuit A is also in circuit B, against two nulls of random head sets of the same sizes.

    ``fraction`` = |A & B| / |A| (the paper's "x % of in-circuit heads are reused"). Null 1 (all heads
    exchangeable): ``expected`` = |B| / n_heads and ``p_value`` = P(|A & B| >= observed), hypergeometric, exact.
    Null 2 (**layer-matched**, needed because both circuits sit in late layers by construction): random sets
    with A's and B's head counts *in every layer*; ``layer_expected`` and ``layer_p_value`` are exact (the
    overlap is a sum of independent per-layer hypergeometric counts). Null 2 is ``nan`` without per-layer counts.
    """

    shared: int
    size_a: int
    size_b: int
    n_heads: int
    layer_counts: tuple[tuple[int, int], ...] = ()  # per layer: (|A in layer|, |B in layer|)
    heads_per_layer: int = 0

    @property
    def fraction(self) -> float:
        return self.shared / self.size_a if self.size_a else float("nan")

    @property
    def expected(self) -> float:
        return self.size_b / self.n_heads

    @property
    def p_value(self) -> float:
        dist = _hypergeometric(self.n_heads, self.size_b, self.size_a)
        return float(sum(dist[self.shared:]))

    def _layer_distribution(self) -> list[float] | None:
        if not self.layer_counts:
            return None
        dist = [1.0]
        for a, b in self.layer_counts:
            layer = _hypergeometric(self.heads_per_layer, b, a)
            new = [0.0] * (len(dist) + len(layer) - 1)
            for i, p in enumerate(dist):
                for j, q in enumerate(layer):
                    new[i + j] += p * q
            dist = new
        return dist

    @property
    def layer_expected(self) -> float:
        dist = self._layer_distribution()
        if dist is None or not self.size_a:
            return float("nan")
        return sum(k * p for k, p in enumerate(dist)) / self.size_a

    @property
    def layer_p_value(self) -> float:
        dist = self._layer_distribution()
        return float("nan") if dist is None else float(sum(dist[self.shared:]))


def overlap(a: Circuit | set[Head], b: Circuit | set[Head], n_heads: int, n_layers: int | None = None) -> Overlap:
    """Overlap of two circuits (or head sets) of a model with ``n_heads`` heads in all; with ``n_layers`` (the
    heads spread evenly over layers) also the layer-matched null.

    Args:
        a: a circuit (or a set of heads), e.g. Colored Objects'.
        b: another, e.g. IOI's.
        n_heads: the model's number of heads.
        n_layers: its layers (for the layer-matched null).

    Returns:
        The :class:`Overlap`.
    """
    set_a = set(a.heads) if isinstance(a, Circuit) else set(a)
    set_b = set(b.heads) if isinstance(b, Circuit) else set(b)
    counts: tuple[tuple[int, int], ...] = ()
    per_layer = 0
    if n_layers is not None:
        if n_heads % n_layers:
            raise ValueError(f"{n_heads} heads do not spread evenly over {n_layers} layers")
        per_layer = n_heads // n_layers
        outside = [h for h in set_a | set_b if not 0 <= h[0] < n_layers or not 0 <= h[1] < per_layer]
        if outside:
            raise ValueError(f"heads {sorted(outside)} are not in a model of {n_layers} layers x {per_layer} heads")
        counts = tuple((sum(1 for h in set_a if h[0] == l), sum(1 for h in set_b if h[0] == l)) for l in range(n_layers))
    return Overlap(len(set_a & set_b), len(set_a), len(set_b), n_heads, counts, per_layer)


def random_overlaps(size_a: int, size_b: int, n_heads: int, n_samples: int = 10_000, seed: int = 0) -> Tensor:
    """Overlap fractions |A & B| / |A| of random head sets (a simulation of the baseline, for plots).

    Args:
        size_a: heads in the first set.
        size_b: heads in the second.
        n_heads: the model's heads.
        n_samples: draws.
        seed: the draw.

    Returns:
        ``[n_samples]`` shares of random first sets that fall in random second sets.
    """
    rng = random.Random(seed)
    heads = range(n_heads)
    return torch.tensor(
        [len(set(rng.sample(heads, size_a)) & set(rng.sample(heads, size_b))) / size_a for _ in range(n_samples)]
    )
