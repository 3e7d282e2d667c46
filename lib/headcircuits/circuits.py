"""Circuits: backward discovery stage by stage (Wang et al. 2022; Circuit Component Reuse), head classes, and the
overlap of two circuits with the random baseline the paper lacked.

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
(:func:`headcircuits.patching.zero_by_construction`), with a note in ``Circuit.notes``.
"""

from __future__ import annotations

import time

import math
import random
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from headcircuits import metrics, patching
from headcircuits.metrics import attention_between_pairs, recorded
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


def top_heads(table: Float[Tensor, "layer head"], fraction: float = 0.02, min_effect: float = 1e-3) -> list[Head]:
    """The heads whose |effect| is in the top ``fraction`` of *all* heads of the model (at least one); NaN entries
    (heads that could not send in this stage) and effects below ``min_effect`` (a head that changes nothing is
    not in a circuit, however few heads do) never qualify."""
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
    defaults to the task's (:data:`STAGES`: IOI or Colored Objects)."""
    if stages is None:
        if data.task not in STAGES:
            raise ValueError(f"no default discovery stages for task {data.task!r}; pass stages=(Stage(...), ...)")
        stages = STAGES[data.task]
    circuit = Circuit(fraction=fraction, min_effect=min_effect)
    base = patching.baseline(model, data)
    previous: list[Head] = []
    for stage in stages:
        if stage.kind == "logits":
            receivers = patching.Receivers("logits")
        else:
            if not previous:
                break  # nothing to receive: the previous stage selected no head
            receivers = patching.Receivers(stage.kind, heads=tuple(previous), position=stage.position)
        senders = receivers.senders(model.facts.n_layers, model.facts.n_heads)
        if not senders:
            break
        if stage.kind != "logits" and patching.zero_by_construction(data, stage.position):
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
        table = patching.path_patch(model, data, receivers, senders, method=method, freeze_mlps=freeze_mlps,
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
    heads spread evenly over layers) also the layer-matched null."""
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
    """Overlap fractions |A & B| / |A| of random head sets (a simulation of the baseline, for plots)."""
    rng = random.Random(seed)
    heads = range(n_heads)
    return torch.tensor(
        [len(set(rng.sample(heads, size_a)) & set(rng.sample(heads, size_b))) / size_a for _ in range(n_samples)]
    )


# --- head classes -----------------------------------------------------------------------------------------------

@torch.no_grad()
def direct_logit_difference(model: Model, data: TaskData, batch_size: int = 32) -> Float[Tensor, "layer head"]:
    """Each head's direct contribution to logit(answer) - logit(distractor) at END: its output at END as it enters
    the residual stream, scaled by the final norm (frozen at its clean value), dotted with
    W_U[answer] - W_U[distractor]; mean over prompts. Positive for heads that write the answer (movers),
    negative for heads that suppress it (negative movers).

    "As it enters the residual stream": z W_O, and on Gemma-3 also through the post-attention norm, which scales
    the sum of a layer's heads by (1 + w) / rms(sum) at each position; frozen at its clean value, as the final
    norm, it is a per-position linear map, so the heads' contributions still add up to the layer's write.
    Everything else (embeddings, MLPs, attention biases, the final norm's bias) makes up the rest of the logit
    difference (tested on every tiny family)."""
    L, H = model.facts.n_layers, model.facts.n_heads
    post = model.facts.post_attn_norm

    names = [*(f"blocks.{l}.attn.hook_z" for l in range(L)), "ln_final.hook_in", "ln_final.hook_out",
             *(f"blocks.{l}.ln1_post.hook_scale" for l in range(L) if post)]

    W_U = model.bridge.W_U.detach()  # [d_model, vocab]
    W_O = model.bridge.W_O.detach()  # [L, H, d_head, d_model]
    bias = _final_norm_bias(model).to(model.device)
    post_weight = _post_attention_gains(model) if post else None  # [L, d_model]: (1 + w)
    out = torch.zeros(L, H, device=model.device)
    for batch in data.batches(batch_size, device=model.device):
        cache = recorded(model, batch.ids, names)
        resid, normed = batch.gather(cache["ln_final.hook_in"], "END"), batch.gather(cache["ln_final.hook_out"], "END")
        centred = resid - resid.mean(-1, keepdim=True) if model.facts.norm == "layernorm" else resid
        # the final norm as a per-prompt, per-dimension linear map at its clean operating point (bias excluded)
        gain = (normed - bias) / centred.where(centred.abs() > 1e-8, torch.full_like(centred, 1e-8))
        answer, distractor = data.answer[batch.start:batch.stop], data.distractor[batch.start:batch.stop]
        direction = W_U[:, answer.to(W_U.device)] - W_U[:, distractor.to(W_U.device)]  # [d_model, batch]
        for layer in range(L):
            z = batch.gather(cache[f"blocks.{layer}.attn.hook_z"], "END")  # [batch, H, d_head]
            head_out = torch.einsum("bhd,hdm->bhm", z, W_O[layer])
            if post:
                scale = batch.gather(cache[f"blocks.{layer}.ln1_post.hook_scale"], "END")  # [batch, 1]: rms
                head_out = head_out * (post_weight[layer] / scale)[:, None, :]
            if model.facts.norm == "layernorm":
                head_out = head_out - head_out.mean(-1, keepdim=True)
            out[layer] += torch.einsum("bhm,bm,mb->h", head_out, gain, direction)
    return (out / len(data)).cpu()


def _post_attention_gains(model: Model) -> Tensor:
    """Gemma-3's post-attention norm weight as applied, (1 + w), per layer: [layer, d_model]."""
    layers = model.bridge.original_model.model.layers
    return torch.stack([1.0 + layer.post_attention_layernorm.weight.detach() for layer in layers])


def _final_norm_bias(model: Model) -> Tensor:
    hf = model.bridge.original_model
    norm = {"gpt2": lambda: hf.transformer.ln_f, "gpt-neox": lambda: hf.gpt_neox.final_layer_norm}.get(model.facts.family)
    bias = getattr(norm(), "bias", None) if norm else None
    return torch.zeros(model.facts.d_model) if bias is None else bias.detach()


#: where each behavioural class attends (query position -> key position, IOI names)
CLASS_ATTENTION: dict[str, tuple[str, str]] = {
    "mover": ("END", "IO"),
    "inhibition": ("END", "S2"),
    "induction": ("S2", "S1+1"),
    "duplicate-token": ("S2", "S1"),
    "previous-token": ("S1+1", "S1"),
}


def class_evidence(model: Model, data: TaskData) -> tuple[dict[str, Tensor], Tensor, float]:
    """What :func:`classify` reads, on IOI prompts: each class's [layer, head] mean attention at its query/key
    pair (:data:`CLASS_ATTENTION`), every head's direct logit difference, and the mean logit difference; one pass
    over the prompts, cached on disk per model and prompts."""
    from headcircuits.cache import cached

    def evidence():
        scores = attention_between_pairs(model, data, list(CLASS_ATTENTION.values()))  # one pass over the prompts
        patterns = {name: scores[pair] for name, pair in CLASS_ATTENTION.items()}
        return patterns, direct_logit_difference(model, data), float((metrics.evaluate(model, data).logit_diff).mean())

    return cached("class_evidence", {"model": model, "data": data}, evidence)


def classify(
    model: Model, data: TaskData, heads: list[Head], threshold: float = 0.2, negative: float = 0.05,
) -> dict[Head, str]:
    """A class for each head from where it attends and what it writes, on IOI prompts (see :func:`assign_classes`
    for the rule; the evidence is :func:`class_evidence`). Nothing is read off GPT-2's head indices, so the same
    behavioural definitions serve grouped-K/V and Gemma models."""
    patterns, dla, ld = class_evidence(model, data)
    return assign_classes(patterns, dla, heads, threshold=threshold, negative=negative * abs(ld))


#: the classes each IOI stage is looking for (Wang et al.'s roles)
STAGE_CLASSES: dict[str, tuple[str, ...]] = {
    "movers": ("mover", "negative mover"), "inhibition": ("inhibition",),
    "duplicate": ("duplicate-token", "induction"), "previous": ("previous-token",),
}


def disagreements(
    circuit: Circuit, classes: dict[Head, str], evidence: tuple[dict[str, Tensor], Tensor, float], *,
    threshold: float = 0.2, negative: float = 0.05,
) -> "pd.DataFrame":
    """Every circuit head whose class is none of the classes its stage looks for (:data:`STAGE_CLASSES`), with
    the reason read from the :func:`class_evidence` that classified it (same ``threshold`` and ``negative`` as
    :func:`classify`): a stage says where a head sits in the circuit, its class what it does on IOI, and the two
    can disagree. Columns: ``head``, ``stage``, ``effect`` (its normalised effect in that stage), ``class`` and
    ``reason``."""
    import pandas as pd

    patterns, dla, ld = evidence
    rows = []
    for head, stages in sorted(circuit.heads.items()):
        for stage in stages:
            wanted = STAGE_CLASSES.get(stage)
            cls = classes.get(head)
            if wanted is None or cls is None or cls in wanted:
                continue
            best, score = max(((n, float(p[head])) for n, p in patterns.items()), key=lambda x: x[1])
            q, k = CLASS_ATTENTION[best]
            if cls == "other":
                reason = f"no attention pattern reaches {threshold}: the strongest is {q} → {k}, {score:.3f}"
            elif cls in ("mover", "negative mover") and best in ("mover", "inhibition"):
                write = float(dla[head])
                reason = (f"attends {q} → {k} ({score:.2f}) and writes {write:+.2f} on the logit difference "
                          f"(beyond ±{negative:.0%} of the mean, {negative * abs(ld):.2f}), so it is read as a {cls}")
            else:
                reason = f"its strongest pattern is {q} → {k} ({score:.2f}), the {cls} pattern"
            rows.append({"head": f"{head[0]}.{head[1]}", "stage": stage,
                         "effect": float(circuit.tables[stage][head]), "class": cls, "reason": reason})
    return pd.DataFrame(rows, columns=["head", "stage", "effect", "class", "reason"])


def assign_classes(
    patterns: dict[str, Tensor], dla: Float[Tensor, "layer head"], heads: list[Head], *, threshold: float = 0.2,
    negative: float = 0.0,
) -> dict[Head, str]:
    """The classification rule, on given attention scores (``patterns[class]``: [layer, head] mean attention at
    that class's query/key pair, see :data:`CLASS_ATTENTION`) and direct logit differences ``dla``:

    * the class whose attention score is highest, "other" when none reaches ``threshold``;
    * a head whose strongest pattern is from END to a name (IO or S2) is then judged by what it writes when that
      is large: below ``-negative`` it writes against the answer, a **negative mover** (Wang et al.'s 10.7 and
      11.10 attend to IO; Circuit Component Reuse's 19.1 in GPT-2 medium attends to S2); above ``+negative`` it
      writes the answer, a **mover**, wherever it looks (a head that attends to S2 but copies IO is a mover, not an
      inhibition head); in between, its attention decides (IO: mover, S2: inhibition). ``classify`` sets
      ``negative`` to 5 % of the mean logit difference, so that an inhibition head's small incidental write does
      not change its class.
    """
    classes = {}
    for head in heads:
        name, score = max(((n, float(p[head])) for n, p in patterns.items()), key=lambda x: x[1])
        if score < threshold:
            name = "other"
        elif name in ("mover", "inhibition"):
            if float(dla[head]) < -negative:
                name = "negative mover"
            elif float(dla[head]) > negative:
                name = "mover"
        classes[head] = name
    return classes


def heads_of_class(classes: dict[Head, str], name: str) -> tuple[Head, ...]:
    """The heads :func:`classify` put in class ``name`` (e.g. the inhibition heads of a circuit), sorted."""
    return tuple(sorted(h for h, c in classes.items() if c == name))


def table(circuit: Circuit, classes: dict[Head, str] | None = None) -> "pd.DataFrame":
    """One row per circuit head: ``head`` (``L.H``), the stages that selected it, its effect in every stage
    (normalised path-patching effect) and its behavioural class."""
    import pandas as pd

    rows = []
    for (layer, head), stages in sorted(circuit.heads.items()):
        row = {"head": f"{layer}.{head}", "layer": layer, "stages": ", ".join(stages)}
        row.update({f"effect ({name})": float(t[layer, head]) for name, t in circuit.tables.items()})
        if classes is not None:
            row["class"] = classes.get((layer, head), "")
        rows.append(row)
    return pd.DataFrame(rows)
