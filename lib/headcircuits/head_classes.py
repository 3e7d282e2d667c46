"""What each head of a circuit does (Wang et al. 2022, §3; Circuit Component Reuse, §3), and the IOI roles the
Talking Heads chapters start from.

A head's *stage* says where path patching found it (:func:`headcircuits.circuits.discover`); its *class* says what
it does on fresh IOI prompts: where it attends (a mover from END to IO, an inhibition head from END to S2, an
induction head from S2 to S1+1, a duplicate-token head from S2 to S1, a previous-token head from S1+1 to S1) and
the sign of what it writes into the logit difference. The same behavioural definitions serve every model;
nothing is read off GPT-2's head indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from headcircuits import engine, scoring
from headcircuits.cache import on_disk
from headcircuits.circuits import Circuit, discover
from headcircuits.engine import Read
from headcircuits.models import architecture
from headcircuits.models.core import Head, Model
from headcircuits.tasks.base import TaskData


@torch.no_grad()
def direct_logit_difference(model: Model, data: TaskData) -> Float[Tensor, "layer head"]:
    """Each head's direct contribution to logit(answer) - logit(distractor) at END: its output at END as it enters
    the residual stream, scaled by the final norm (frozen at its clean value), dotted with
    W_U[answer] - W_U[distractor]; mean over prompts. Positive for heads that write the answer (movers),
    negative for heads that suppress it (negative movers).

    "As it enters the residual stream": z W_O, and on Gemma-3 also through the post-attention norm, which scales
    the sum of a layer's heads by (1 + w) / rms(sum) at each position; frozen at its clean value, as the final
    norm, it is a per-position linear map, so the heads' contributions still add up to the layer's write.
    Everything else (embeddings, MLPs, attention biases, the final norm's bias) makes up the rest of the logit
    difference (tested on every tiny family).

    Args:
        model: the model.
        data: the prompts.

    Returns:
        ``[layer, head]`` mean direct contributions, on the CPU.
    """
    L = model.facts.n_layers
    post = model.facts.post_attn_norm
    z_reads = [Read("z", l, at="END") for l in range(L)]
    scale_reads = [Read("post_attn_scale", l, at="END") for l in range(L)] if post else []
    final_in, final_out = Read("final_in", at="END"), Read("final_out", at="END")
    got = engine.run(model, data, read=[*z_reads, *scale_reads, final_in, final_out])[0]
    W_U = model.bridge.W_U.detach().float().cpu()  # [d_model, vocab]
    W_O = model.bridge.W_O.detach().float().cpu()  # [L, H, d_head, d_model]
    bias = architecture.final_norm_bias(model).float().cpu()
    post_weight = architecture.post_attention_gains(model).float().cpu() if post else None  # [L, d_model]: (1 + w)
    resid, normed = got[final_in], got[final_out]
    centred = resid - resid.mean(-1, keepdim=True) if model.facts.norm == "layernorm" else resid
    # the final norm as a per-prompt, per-dimension linear map at its clean operating point (bias excluded)
    gain = (normed - bias) / centred.where(centred.abs() > 1e-8, torch.full_like(centred, 1e-8))
    direction = W_U[:, data.answer] - W_U[:, data.distractor]  # [d_model, batch]
    out = torch.zeros(L, model.facts.n_heads)
    for layer in range(L):
        head_out = torch.einsum("bhd,hdm->bhm", got[z_reads[layer]], W_O[layer])
        if post:
            head_out = head_out * (post_weight[layer] / got[scale_reads[layer]])[:, None, :]  # the rms: [batch, 1]
        if model.facts.norm == "layernorm":
            head_out = head_out - head_out.mean(-1, keepdim=True)
        out[layer] = torch.einsum("bhm,bm,mb->h", head_out, gain, direction)
    return out / len(data)


#: where each behavioural class attends (query position -> key position, IOI names)
CLASS_ATTENTION: dict[str, tuple[str, str]] = {
    "mover": ("END", "IO"),
    "inhibition": ("END", "S2"),
    "induction": ("S2", "S1+1"),
    "duplicate-token": ("S2", "S1"),
    "previous-token": ("S1+1", "S1"),
}


@on_disk("class_evidence")
def class_evidence(model: Model, data: TaskData) -> tuple[dict[str, Tensor], Tensor, float]:
    """What :func:`classify` reads, on IOI prompts: each class's [layer, head] mean attention at its query/key
    pair (:data:`CLASS_ATTENTION`), every head's direct logit difference, and the mean logit difference; one pass
    over the prompts, cached on disk per model and prompts.

    Args:
        model: the model.
        data: IOI prompts.

    Returns:
        ``(attention per class [layer, head], direct logit differences [layer, head], mean logit difference)``.
    """
    scores = scoring.attention_between_pairs(model, data, list(CLASS_ATTENTION.values()))  # one pass over the prompts
    patterns = {name: scores[pair] for name, pair in CLASS_ATTENTION.items()}
    return patterns, direct_logit_difference(model, data), float((scoring.evaluate(model, data).logit_diff).mean())


def classify(
    model: Model, data: TaskData, heads: list[Head], threshold: float = 0.2, negative: float = 0.05,
) -> dict[Head, str]:
    """A class for each head from where it attends and what it writes, on IOI prompts (see :func:`assign_classes`
    for the rule; the evidence is :func:`class_evidence`). Nothing is read off GPT-2's head indices, so the same
    behavioural definitions serve grouped-K/V and Gemma models.

    Args:
        model: the model.
        data: IOI prompts.
        heads: the heads to classify.
        threshold: the attention a head's class needs.
        negative: the share of the mean logit difference a head must write to count as a (negative) mover.

    Returns:
        ``{head: class}``.
    """
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
    ``reason``.

    Args:
        circuit: the discovered :class:`~headcircuits.circuits.Circuit`.
        classes: ``{head: class}`` (:func:`classify`).
        evidence: :func:`class_evidence` of the same prompts.
        threshold: as :func:`classify`.
        negative: as :func:`classify`.

    Returns:
        One row per (head, stage) whose class that stage does not look for, with the reason.
    """
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

    Args:
        patterns: each class's ``[layer, head]`` attention (:data:`CLASS_ATTENTION`).
        dla: ``[layer, head]`` direct logit differences.
        heads: the heads to classify.
        threshold: the attention a class needs.
        negative: the direct effect a (negative) mover needs.

    Returns:
        ``{head: class}``.
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
    """The heads :func:`classify` put in class ``name`` (e.g. the inhibition heads of a circuit), sorted.

    Args:
        classes: ``{head: class}`` (:func:`classify`).
        name: a class, e.g. ``inhibition``.

    Returns:
        The heads of that class, sorted.
    """
    return tuple(sorted(h for h, c in classes.items() if c == name))


def table(circuit: Circuit, classes: dict[Head, str] | None = None) -> "pd.DataFrame":
    """One row per circuit head: ``head`` (``L.H``), the stages that selected it, its effect in every stage
    (normalised path-patching effect) and its behavioural class.

    Args:
        circuit: a :class:`~headcircuits.circuits.Circuit`.
        classes: ``{head: class}``, if known.

    Returns:
        One row per head: its stages, effects and class.
    """
    import pandas as pd

    rows = []
    for (layer, head), stages in sorted(circuit.heads.items()):
        row = {"head": f"{layer}.{head}", "layer": layer, "stages": ", ".join(stages)}
        row.update({f"effect ({name})": float(t[layer, head]) for name, t in circuit.tables.items()})
        if classes is not None:
            row["class"] = classes.get((layer, head), "")
        rows.append(row)
    return pd.DataFrame(rows)


# --- the IOI roles the Talking Heads chapters start from -------------------------------------------------------

@dataclass
class Roles:
    """The heads a model uses for IOI, found on that model (never read off GPT-2's indices).

    ``inhibition``: circuit heads that attend from END to S2 (class *inhibition* of :func:`classify`);
    ``movers``: circuit heads whose path-patching effect on the logits is positive (the movers stage)."""

    inhibition: tuple[Head, ...]
    movers: tuple[Head, ...]
    circuit: Circuit
    classes: dict


def find_roles(model: Model, n_prompts: int = 32, seed: int = 0, fraction: float = 0.02,
               min_effect: float = 0.01) -> Roles:
    """IOI circuit discovery (path patching on ABC prompts, cached on disk) and head classes, as in the chapter
    *The IOI circuit*; the same parameters give the same (cached) circuit.

    Args:
        model: the model.
        n_prompts: ABC prompts for path patching.
        seed: the prompts' seed.
        fraction: as :func:`discover`.
        min_effect: as :func:`discover`.

    Returns:
        The :class:`Roles`.
    """
    from headcircuits.tasks import ioi

    circuit = discover(model, ioi.generate(model, n_prompts, seed=seed, counterfactual="abc"), fraction=fraction,
                       min_effect=min_effect)
    classes = classify(model, ioi.generate(model, 64, seed=seed + 1), sorted(circuit.heads))
    movers = tuple(h for h in circuit.stage("movers") if circuit.tables["movers"][h] > 0)
    return Roles(heads_of_class(classes, "inhibition"), movers, circuit, classes)


