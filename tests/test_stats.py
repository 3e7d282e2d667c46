"""Intervals and verdicts: known values, coverage, and every branch of the verdict."""

from __future__ import annotations

import numpy as np
import pytest

from headcircuits import stats


def test_wilson_matches_known_values_and_stays_inside_0_1():
    low, high = stats.wilson(8, 10)  # textbook value: 0.4902 .. 0.9433
    assert abs(low - 0.4902) < 1e-3 and abs(high - 0.9433) < 1e-3
    assert stats.wilson(0, 5)[0] == 0.0 and stats.wilson(5, 5)[1] == 1.0
    with pytest.raises(ValueError):
        stats.wilson(3, 0)
    with pytest.raises(ValueError):
        stats.wilson(6, 5)


def test_wilson_covers_the_true_rate_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(2000):
        k = int(rng.binomial(40, 0.3))
        low, high = stats.wilson(k, 40)
        covered += low <= 0.3 <= high
    assert 0.92 < covered / 2000 < 0.98


def test_paired_difference_keeps_the_pairing_and_is_seeded():
    before = np.array([0, 0, 1, 1] * 25, dtype=float)
    after = np.array([1, 0, 1, 1] * 25, dtype=float)
    d = stats.paired_difference(after, before, seed=3)
    assert d.value == pytest.approx(0.25) and d.low > 0.1 and d.high < 0.4 and d.n == 100
    assert stats.paired_difference(after, before, seed=3) == d
    with pytest.raises(ValueError, match="same prompts"):
        stats.paired_difference(after[:5], before)


def test_every_verdict_branch():
    above = stats.Estimate(0.2, 0.1, 0.3, 50)
    straddles = stats.Estimate(0.02, -0.05, 0.09, 50)
    under = stats.Estimate(-0.2, -0.3, -0.1, 50)
    assert stats.verdict(above) == "reproduces"
    assert stats.verdict(straddles) == "inconclusive"
    assert stats.verdict(under) == "does not reproduce"
    assert stats.verdict(under, direction="below") == "reproduces"
    assert stats.verdict(above, threshold=0.35) == "does not reproduce"
    assert stats.proportion([True, False, True, True]).value == 0.75
    assert str(stats.Estimate(0.5, 0.25, 0.75, 4)) == "50.0% [25.0%, 75.0%]"
