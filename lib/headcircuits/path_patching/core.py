"""What both implementations of path patching share: the receivers, the clean and counterfactual runs they start
from (:class:`Baseline`), and the normalised effect (see :mod:`headcircuits.path_patching`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from headcircuits import engine
from headcircuits.engine import Read
from headcircuits.models import ungrouped
from headcircuits.models.core import Head, Model
from headcircuits.scoring import logit_difference
from headcircuits.tasks.base import TaskData


def normalised_effect(
    ld_patched: Tensor, ld_clean: Tensor, ld_corrupt: Tensor, per_batch: int | None = None
) -> Tensor:
    """The normalised effect of a patch; ``ld_patched`` may have leading dimensions (e.g. [layer, head, batch]);
    the last one is the prompts.

    * ``per_batch=None`` (ours, the default): a ratio of means over all prompts,
      (mean LD_patched - mean LD_clean) / (mean LD_corrupt - mean LD_clean);
    * ``per_batch=25`` (Circuit Component Reuse's code): the same ratio in each consecutive batch of 25 prompts,
      then averaged over batches (a last, smaller batch counts as one batch).

    Args:
        ld_patched: ``[..., batch]`` patched logit differences.
        ld_clean: ``[batch]``, the clean run's.
        ld_corrupt: ``[batch]``, the counterfactual run's.
        per_batch: ``None`` (ours) or the paper's batch size (25).

    Returns:
        The effect, with ``ld_patched``'s leading dimensions.
    """
    if per_batch is not None:
        if per_batch < 1:
            raise ValueError(f"per_batch must be a positive batch size (the paper's: 25), not {per_batch}")
        n = ld_clean.shape[-1]
        parts = [normalised_effect(ld_patched[..., i : i + per_batch], ld_clean[i : i + per_batch],
                                   ld_corrupt[i : i + per_batch]) for i in range(0, n, per_batch)]
        return torch.stack(parts).mean(0)
    denominator = ld_corrupt.mean() - ld_clean.mean()
    if abs(float(denominator)) < 1e-6:
        raise ValueError(
            "the clean and counterfactual prompts give the same mean logit difference, so the normalised effect "
            "is undefined; check the counterfactual (or compare raw logit differences instead)"
        )
    return (ld_patched.mean(-1) - ld_clean.mean()) / denominator


@dataclass(frozen=True)
class Receivers:
    """Where a sender's effect is read: ``logits`` (the final residual stream), or the ``q`` / ``k`` / ``v``
    input of the listed receiver heads at a named position of the TaskData (e.g. the movers' queries at END).
    ``kv``: on grouped-K/V models, a k / v receiver is the query head's own key / value (``"head"``, default)
    or its group's shared K/V head (``"group"``); see the module docstring."""

    kind: Literal["logits", "q", "k", "v"] = "logits"
    heads: tuple[Head, ...] = ()
    position: str = "END"
    kv: Literal["head", "group"] = "head"

    def __post_init__(self):
        if self.kind not in ("logits", "q", "k", "v"):
            raise ValueError(f"receiver kind must be logits, q, k or v, not {self.kind!r}")
        if self.kind != "logits" and not self.heads:
            raise ValueError(f"{self.kind} receivers need at least one receiver head")
        if self.kv not in ("head", "group"):
            raise ValueError(f"kv must be 'head' (per query head) or 'group' (the shared K/V head), not {self.kv!r}")

    def check(self, model: Model, data: TaskData) -> None:
        """Refuse receivers that do not exist in this model or at a position these prompts lack."""
        L, H = model.facts.n_layers, model.facts.n_heads
        bad = [h for h in self.heads if not (0 <= h[0] < L and 0 <= h[1] < H)]
        if bad:
            raise ValueError(f"receiver heads {bad} do not exist in {model.name} ({L} layers x {H} heads)")
        data.at(self.position)  # raises with the fix when a prompt lacks the position

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.heads})

    def senders(self, n_layers: int, n_heads: int) -> list[Head]:
        """Every head that can send to these receivers: all heads for logits, else heads below the top receiver
        layer that are not receivers themselves."""
        top = n_layers if self.kind == "logits" else max(self.layers)
        return [(l, h) for l in range(top) for h in range(n_heads) if (l, h) not in self.heads]


@dataclass(frozen=True)
class Baseline:
    """The clean and counterfactual runs every patch starts from (tensors on the CPU, padded with zeros)."""

    ld_clean: Float[Tensor, " batch"]
    ld_corrupt: Float[Tensor, " batch"]
    z_clean: list[Tensor]  # per layer [batch, pos, head, d_head]
    z_corrupt: list[Tensor]
    mlp_clean: list[Tensor]  # per layer [batch, pos, d_model]
    resid_pre_clean: list[Tensor]  # per layer, the clean residual stream entering the block [batch, pos, d_model]

    @functools.cached_property
    def key(self) -> str:
        """A fingerprint of the baseline's contents (every tensor, by value): what keys a table computed from it,
        so that a changed baseline (``dataclasses.replace``) never reads a table of another."""
        from headcircuits.cache import fingerprint

        return fingerprint([self.ld_clean, self.ld_corrupt, self.z_clean, self.z_corrupt, self.mlp_clean,
                            self.resid_pre_clean])

    def __fingerprint__(self) -> str:
        return self.key


def _check(data: TaskData) -> None:
    if not torch.equal(data.clean.lengths, data.corrupt.lengths):
        raise ValueError(
            "patching needs clean and counterfactual prompts of the same token length (position by position); "
            "this TaskData's counterfactuals change the length of some prompts"
        )


def _ld(model: Model, logits: Tensor, data: TaskData) -> Tensor:
    """The logit difference at each prompt's END, from a plain pass's logits [batch, pos, vocab]."""
    end = logits[torch.arange(len(data), device=logits.device), data.at("END").to(logits.device)]
    return logit_difference(end, data.answer, data.distractor)


@torch.no_grad()
def baseline(model: Model, data: TaskData) -> Baseline:
    """Run the clean and the counterfactual prompts once (:func:`headcircuits.engine.run`), keeping every head's
    ``z``, every MLP's output and every block's input at every position (zero past a prompt's end), on the CPU.

    Args:
        model: the model.
        data: prompts whose counterfactuals have the same token lengths.

    Returns:
        The :class:`Baseline`.
    """
    _check(data)
    L = model.facts.n_layers
    reads = [Read(kind, l) for kind in ("z", "mlp_out", "resid_pre") for l in range(L)]
    clean, corrupt = (engine.run(model, data, read=reads, logits="end", which=which)[0]
                      for which in ("clean", "corrupt"))
    width = data.clean.ids.shape[1]  # the prompts' own padded width, which the reference loop runs at

    def of(result, kind):
        return [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.shape[1]))
                for t in (result[Read(kind, l)] for l in range(L))]

    return Baseline(
        ld_clean=logit_difference(clean.logits, data.answer, data.distractor),
        ld_corrupt=logit_difference(corrupt.logits, data.answer, data.distractor),
        z_clean=of(clean, "z"), z_corrupt=of(corrupt, "z"), mlp_clean=of(clean, "mlp_out"),
        resid_pre_clean=of(clean, "resid_pre"),
    )


def _position_mask(data: TaskData, position: str | None, shape: tuple[int, int], device) -> Tensor:
    """[batch, pos] True where a patch applies: every position (None) or each prompt's named position."""
    if position is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    mask[torch.arange(shape[0], device=device), data.at(position).to(device)] = True
    return mask


def zero_by_construction(data: TaskData, position: str) -> bool:
    """True when every prompt's counterfactual has the same tokens as the clean prompt up to and including
    ``position``: then every head's counterfactual output there equals its clean output (attention is causal),
    and since path patching freezes every other head, nothing else reaches the receivers at that position, so
    every sender's effect on receivers read there is exactly 0 (e.g. the S2 -> IO counterfactual and the
    previous-token stage's keys at S1+1).

    Args:
        data: the prompts.
        position: where the receivers are read.

    Returns:
        Whether every sender's effect there is exactly 0.
    """
    pos = data.at(position)
    if data.clean.ids.shape != data.corrupt.ids.shape:
        return False  # prompts of other lengths: not the same tokens (and path patching refuses them anyway)
    same = data.clean.ids == data.corrupt.ids
    upto = torch.arange(same.shape[1])[None, :] <= pos[:, None]
    return bool((same | ~upto).all())


def _receiving_model(model: Model, receivers: Receivers) -> Model:
    """The model the experiment runs on: its ungrouped copy for per-head k / v receivers (see the module
    docstring), else itself."""
    if receivers.kind in ("k", "v") and receivers.kv == "head":
        return ungrouped(model)
    return model
