"""Uncertainty for the book's verdicts: every sentence that says whether a finding reproduces branches on an
interval computed here, never on a point estimate alone.

* :func:`proportion`: an accuracy with its 95 % Wilson score interval (binomial; sound for small samples and
  for accuracies near 0 or 1, unlike the normal approximation);
* :func:`paired_difference`: the mean difference of two measurements of the same prompts (e.g. accuracy after
  minus before an intervention) with a seeded percentile-bootstrap interval over prompts;
* :func:`verdict`: "reproduces" / "does not reproduce" / "inconclusive" for a claim of the form "the quantity is
  above (or below) a threshold", read off the interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a 95 % interval and the number of prompts it rests on."""

    value: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.value:.1%} [{self.low:.1%}, {self.high:.1%}]"

    def points(self) -> str:
        """As percentage points (for differences of accuracies): ``+12.0 points [+3.1, +20.5]``."""
        return f"{100 * self.value:+.1f} points [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"

    def number(self, digits: int = 2) -> str:
        """As a plain number with its interval (e.g. a mean logit difference)."""
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % by default)."""
    if n <= 0:
        raise ValueError("an interval needs at least one trial")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be between 0 and n = {n}, not {successes}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(outcomes: Sequence[bool] | np.ndarray) -> Estimate:
    """Share of true outcomes (e.g. ``table.candidate_correct``) with its 95 % Wilson interval."""
    values = np.asarray(outcomes, dtype=bool)
    low, high = wilson(int(values.sum()), len(values))
    return Estimate(float(values.mean()), low, high, len(values))


def mean(values: Sequence[float] | np.ndarray, n_boot: int = 2000, seed: int = 0) -> Estimate:
    """A mean with its seeded 95 % percentile-bootstrap interval over the values (e.g. per-prompt logit differences)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        raise ValueError("a mean needs at least one value")
    rng = np.random.default_rng(seed)
    boots = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    return Estimate(float(x.mean()), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975)), len(x))


def paired_difference(
    after: Sequence[float] | np.ndarray, before: Sequence[float] | np.ndarray, n_boot: int = 2000, seed: int = 0,
) -> Estimate:
    """mean(after - before) over the same prompts, with a seeded 95 % percentile-bootstrap interval that resamples
    prompts (so the pairing is kept). For accuracies pass 0/1 outcomes: the result is a difference of accuracies."""
    a, b = np.asarray(after, dtype=float), np.asarray(before, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired measurements need the same prompts: {a.shape} vs {b.shape}")
    return mean(a - b, n_boot=n_boot, seed=seed)


Verdict = Literal["reproduces", "does not reproduce", "inconclusive"]


def verdict(estimate: Estimate, threshold: float = 0.0, direction: Literal["above", "below"] = "above") -> Verdict:
    """A claim "the quantity is {direction} {threshold}": reproduces when the whole 95 % interval is on that side,
    does not reproduce when the whole interval is on the other side (or at the threshold), inconclusive when the
    interval contains the threshold (more prompts are needed to tell)."""
    low, high = estimate.low, estimate.high
    if direction == "below":
        low, high, threshold = -high, -low, -threshold
    elif direction != "above":
        raise ValueError(f"direction must be 'above' or 'below', not {direction!r}")
    if low > threshold:
        return "reproduces"
    if high <= threshold:
        return "does not reproduce"
    return "inconclusive"
