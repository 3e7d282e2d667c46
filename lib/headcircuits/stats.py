"""Uncertainty for the book's verdicts, and the one rule that turns our numbers into a verdict on a paper's claim:
every sentence that says whether a finding reproduces branches on :func:`judge`, never on a point estimate alone.

* :func:`proportion`: an accuracy with its 95 % Wilson score interval (binomial; sound for small samples and
  for accuracies near 0 or 1, unlike the normal approximation);
* :func:`mean`, :func:`paired_difference`: a mean, or the mean difference of two measurements of the same prompts
  (e.g. accuracy after minus before an intervention), with a seeded percentile-bootstrap interval over prompts;
* :func:`judge`: the verdict on a claim "the effect is on this side of the null, about the paper's size", with
  the claim's preconditions (:func:`require`); its outcomes are :data:`OUTCOMES`, defined on the book's page
  *Reading the verdicts*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
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


def difference(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, n_boot: int = 2000, seed: int = 0,
) -> Estimate:
    """mean(a) - mean(b) for two independent samples (e.g. accuracy at N = 3 minus at N = 20, on different
    prompts), with a seeded 95 % percentile-bootstrap interval that resamples each sample on its own; ``n`` is the
    smaller sample's size."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) == 0 or len(y) == 0:
        raise ValueError("a difference needs values on both sides")
    rng = np.random.default_rng(seed)
    boots = (x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(1)
             - y[rng.integers(0, len(y), size=(n_boot, len(y)))].mean(1))
    return Estimate(float(x.mean() - y.mean()), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975)),
                    min(len(x), len(y)))


def scaled(estimate: Estimate, by: float) -> Estimate:
    """The estimate and its interval divided by a fixed ``by`` (e.g. a gain as a share of the wrong answers there
    were to fix: ``scaled(gain, 1 - accuracy_before)``)."""
    if by <= 0:
        raise ValueError(f"scale by a positive number, not {by}")
    return Estimate(estimate.value / by, estimate.low / by, estimate.high / by, estimate.n)


def slopes(x: Sequence[float] | np.ndarray, y: np.ndarray) -> np.ndarray:
    """The least-squares slope of each column of ``y`` [point, prompt] on ``x`` [point]: e.g. how fast a mover's
    attention moves per unit of α near α = 0, one slope per prompt (pass :func:`mean` the result)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if y.ndim != 2 or y.shape[0] != len(x) or len(x) < 2:
        raise ValueError(f"slopes needs y [point, prompt] with one row per x (at least 2); got {y.shape} for {len(x)}")
    dx = x - x.mean()
    if not np.any(dx):
        raise ValueError("slopes needs at least two different x values")
    return (dx[:, None] * (y - y.mean(0))).sum(0) / (dx**2).sum()


def nearest(x: Sequence[float] | np.ndarray, centre: float = 0.0, within: float | None = None, least: int = 3) -> np.ndarray:
    """Indices of the points of ``x`` within ``within`` of ``centre`` (all if None), at least the ``least``
    nearest: the part of a curve a local slope is read from."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(np.abs(x - centre), kind="stable")
    inside = order[np.abs(x[order] - centre) <= within] if within is not None else order
    return np.sort(inside if len(inside) >= least else order[:least])


def exact(value: float) -> Estimate:
    """A number with no sampling error (computed from the weights alone, e.g. a composition score of GPT-2
    small's released weights): its interval is the number itself."""
    return Estimate(float(value), float(value), float(value), 0)


# The verdict rule ---------------------------------------------------------------------------------------------
Outcome = Literal["reproduces", "same direction, smaller", "does not reproduce", "not testable", "undecided"]
OUTCOMES: dict[str, str] = {
    "reproduces": "the whole 95 % interval is on the claimed side of the null, and it reaches the paper's value "
                  "(or the paper states a direction only)",
    "same direction, smaller": "the whole interval is on the claimed side of the null, but all of it falls short "
                               "of the paper's value",
    "does not reproduce": "the whole interval is at or on the other side of the null, or it contains the null and "
                          "excludes the paper's value (an effect of the paper's size is ruled out)",
    "not testable": "a precondition of the claim fails on this model (named in the verdict), so the experiment "
                    "cannot test it",
    "undecided": "the interval contains the null and reaches the paper's value; the verdict names about how many "
                 "prompts would decide it at the observed effect",
}


@dataclass(frozen=True)
class Precondition:
    """What must hold before a claim can be tested on a model (e.g. "the mover's inhibition score is clearly
    above 0"), whether it holds, and the number that says so."""

    holds: bool
    what: str
    observed: str = ""


def require(holds: bool, what: str, observed: str = "") -> Precondition:
    """A claim's precondition: ``what`` must hold (``holds``), shown with the ``observed`` number."""
    return Precondition(bool(holds), what, observed)


@dataclass(frozen=True)
class Verdict:
    """One of :data:`OUTCOMES`, with the reason a reader needs (the failed precondition, the prompts that would
    decide) and, for *undecided*, that number of prompts."""

    outcome: Outcome
    reason: str = ""
    needed_n: int | None = None
    # what it was judged on (kept for the scorecard's data, headcircuits.scorecard): the estimate, the null, the
    # paper's value and the claimed direction; None for a claim that was not testable
    estimate: Estimate | None = field(default=None, compare=False)
    null: float | None = field(default=None, compare=False)
    paper: float | None = field(default=None, compare=False)
    direction: str | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.outcome}: {self.reason}" if self.reason else self.outcome

    @property
    def holds(self) -> bool:
        """The claim holds on this model (reproduces, or the same direction at a smaller size)."""
        return self.outcome in ("reproduces", "same direction, smaller")


def _needed_n(n: int, distances_and_widths: list[tuple[float, float]]) -> int | None:
    """Prompts at which an interval of the observed half-width ``w`` (shrinking as 1 / sqrt(n)) would end
    ``d`` away from the estimate, the smallest over the ways the verdict can be decided."""
    needed = [math.ceil(n * (w / d) ** 2) for d, w in distances_and_widths if d > 0 and w > 0]
    return max(min(needed), n + 1) if needed and n > 0 else None


def judge(
    estimate: Estimate | None,
    *,
    null: float = 0.0,
    paper: float | None = None,
    direction: Literal["above", "below"] = "above",
    preconditions: Sequence[Precondition] = (),
    show: str = "{:.3g}",
) -> Verdict:
    """The book's one verdict rule, for a paper's claim "the quantity lies {direction} ``null``, about as far as
    ``paper``" (the paper's value; ``None`` when the paper states a direction only). ``null`` is what no effect
    would give: 0 for a change, chance for an accuracy, a random baseline's expectation, the best random control.
    The outcomes are :data:`OUTCOMES`, read off the 95 % interval of ``estimate``:

    * a failed precondition makes the claim *not testable* (its ``what`` and ``observed`` are the reason);
    * the interval wholly beyond the null: *reproduces* when it reaches the paper's value, else *same direction,
      smaller*;
    * wholly at or behind the null, or containing it while excluding the paper's value: *does not reproduce*;
    * otherwise *undecided*, with the prompts that would decide it at the observed effect (the interval's
      half-width scaled by sqrt(n / n'): an estimate, since the interval's shape is taken as fixed).

    ``show`` formats numbers in the reasons (e.g. ``"{:.1%}"``)."""
    verdict = _judge(estimate, null=null, paper=paper, direction=direction, preconditions=preconditions, show=show)
    if verdict.outcome == "not testable":
        return verdict
    return replace(verdict, estimate=estimate, null=null, paper=paper, direction=direction)


def _judge(estimate, *, null, paper, direction, preconditions, show) -> Verdict:
    failed = [p for p in preconditions if not p.holds]
    if failed:
        return Verdict("not testable", "; ".join(
            f"needs {p.what}" + (f" (here {p.observed})" if p.observed else "") for p in failed))
    if estimate is None:
        raise ValueError("judge needs an estimate when every precondition holds")
    if direction not in ("above", "below"):
        raise ValueError(f"direction must be 'above' or 'below', not {direction!r}")
    sign = 1.0 if direction == "above" else -1.0
    value, null_s = sign * estimate.value, sign * null
    low, high = sorted((sign * estimate.low, sign * estimate.high))
    paper_s = None if paper is None else sign * paper
    fmt = show.format
    it = "the value" if estimate.low == estimate.high else "the interval"  # an exact number has no width
    if paper_s is not None and paper_s <= null_s:  # e.g. a random control that already moves as far as the paper
        note = f"the null ({fmt(null)}) is already at the paper's {fmt(paper)}, so only the direction is judged"
        plain = judge(estimate, null=null, direction=direction, show=show)
        return Verdict(plain.outcome, f"{plain.reason}; {note}" if plain.reason else note, plain.needed_n)
    if low > null_s:
        if paper_s is None or high >= paper_s:
            return Verdict("reproduces")
        return Verdict("same direction, smaller", f"{'the whole interval' if it == 'the interval' else it} is short "
                                                  f"of the paper's {fmt(paper)}")
    if high <= null_s:
        return Verdict("does not reproduce", f"{it} is not beyond the null ({fmt(null)})")
    if paper_s is not None and high < paper_s:
        return Verdict("does not reproduce", f"an effect of the paper's size ({fmt(paper)}) is ruled out")
    ways = [(value - null_s, value - low), (null_s - value, high - value)]
    if paper_s is not None:
        ways.append((paper_s - value, high - value))
    needed = _needed_n(estimate.n, ways)
    if needed is None:
        return Verdict("undecided", "the observed effect equals the null: no number of prompts decides it")
    return Verdict("undecided", f"about {needed:,} prompts would decide it at the observed effect "
                                f"(here {estimate.n:,})", needed)


def fact(holds: bool) -> Verdict:
    """:func:`judge` on a yes/no statement computed without sampling error (e.g. "8.10.1 is 8.10's top component
    for 9.9's queries" on GPT-2 small's released weights): 1 or 0 against a null of 1/2."""
    v = judge(exact(1.0 if holds else 0.0), null=0.5)
    return v if v.holds else replace(v, reason="the exact computation says otherwise")


Legacy = Literal["reproduces", "does not reproduce", "inconclusive"]


def verdict(estimate: Estimate, threshold: float = 0.0, direction: Literal["above", "below"] = "above") -> Legacy:
    """Whether the whole 95 % interval is beyond ``threshold`` ("reproduces"), at or behind it ("does not
    reproduce"), or contains it ("inconclusive"): a side test used inside the chapters (e.g. "is this head's
    drop above 0?"), never a verdict on a paper's claim (that is :func:`judge`)."""
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
