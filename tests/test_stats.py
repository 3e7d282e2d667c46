"""Intervals and verdicts: known values, coverage, and every branch of the verdict."""

from __future__ import annotations

import math

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


# The book's one verdict rule: numbers that make each outcome ------------------------------------------------------
def test_judge_reproduces_when_the_interval_is_beyond_the_null_and_reaches_the_papers_value():
    assert stats.judge(stats.Estimate(0.40, 0.30, 0.50, 100), paper=0.44).outcome == "reproduces"
    assert stats.judge(stats.Estimate(0.60, 0.50, 0.70, 100), paper=0.44).outcome == "reproduces"  # larger
    assert stats.judge(stats.Estimate(0.02, 0.01, 0.03, 100)).outcome == "reproduces"  # the paper: a direction only
    assert stats.judge(stats.Estimate(-0.5, -0.6, -0.4, 80), paper=-0.45, direction="below").outcome == "reproduces"


def test_judge_same_direction_smaller_when_the_whole_interval_falls_short_of_the_paper():
    # SmolLM2 on Colored Objects: above chance (33 %) but below GPT-2 medium's 49.6 %
    v = stats.judge(stats.Estimate(0.40, 0.36, 0.44, 500), null=1 / 3, paper=0.496, show="{:.1%}")
    assert v.outcome == "same direction, smaller" and "49.6%" in v.reason and v.holds
    below = stats.judge(stats.Estimate(-0.1, -0.15, -0.05, 50), paper=-0.4, direction="below")
    assert below.outcome == "same direction, smaller"


def test_judge_does_not_reproduce_at_the_null_behind_it_or_when_the_papers_size_is_ruled_out():
    assert stats.judge(stats.Estimate(-0.2, -0.3, -0.1, 50), paper=0.2).outcome == "does not reproduce"
    assert stats.judge(stats.Estimate(0.0, -0.1, 0.0, 50)).outcome == "does not reproduce"  # at the null
    assert stats.judge(stats.Estimate(0.2, 0.1, 0.3, 50), direction="below").outcome == "does not reproduce"
    # chapter 6's oracle fix at N = 3: +1.0 points [+0.0, +3.0] against the paper's +22 points
    v = stats.judge(stats.Estimate(0.01, 0.0, 0.03, 100), paper=0.22, show="{:+.0%}")
    assert v.outcome == "does not reproduce" and "ruled out" in v.reason and "+22%" in v.reason and not v.holds


def test_judge_not_testable_names_the_failed_precondition_before_looking_at_numbers():
    gate = stats.require(False, "an inhibition score clearly above 0", "0.01 [-0.02, 0.04]")
    v = stats.judge(stats.Estimate(0.3, 0.2, 0.4, 200), paper=0.1, preconditions=[stats.require(True, "a mover"), gate])
    assert v.outcome == "not testable" and v.reason == "needs an inhibition score clearly above 0 (here 0.01 [-0.02, 0.04])"
    assert stats.judge(None, preconditions=[gate]).outcome == "not testable"  # nothing to estimate without it
    with pytest.raises(ValueError, match="needs an estimate"):
        stats.judge(None, preconditions=[stats.require(True, "a mover")])


def test_judge_undecided_gives_the_prompts_that_would_decide_at_the_observed_effect():
    # +4 points [-2, +10] on 100 prompts, paper +22: the lower half-width 6 must shrink below 4 -> 100 * (6/4)^2
    v = stats.judge(stats.Estimate(0.04, -0.02, 0.10, 100), paper=0.05)
    assert v.outcome == "undecided" and v.needed_n == 225 and "225 prompts" in v.reason
    # deciding by ruling out the paper's value can come first: value 0.01, paper 0.05, upper half-width 0.05
    w = stats.judge(stats.Estimate(0.01, -0.04, 0.06, 100), paper=0.05)
    assert w.outcome == "undecided" and w.needed_n == math.ceil(100 * (0.05 / 0.04) ** 2)
    # a larger sample at the same effect, with the interval shrinking as 1/sqrt(n), is decided as predicted
    big = stats.Estimate(0.04, 0.04 - 0.06 * math.sqrt(100 / 230), 0.04 + 0.06 * math.sqrt(100 / 230), 230)
    assert stats.judge(big, paper=0.05).outcome == "reproduces"
    none = stats.judge(stats.Estimate(0.0, -0.1, 0.1, 40))
    assert none.outcome == "undecided" and none.needed_n is None and "no number" in none.reason


def test_judge_with_a_null_already_at_the_papers_value_judges_the_direction_and_says_so():
    v = stats.judge(stats.Estimate(0.5, 0.4, 0.6, 100), null=0.45, paper=0.44, show="{:.2f}")
    assert v.outcome == "undecided" and "only the direction is judged" in v.reason
    assert stats.judge(stats.Estimate(0.7, 0.6, 0.8, 100), null=0.45, paper=0.44).outcome == "reproduces"
    with pytest.raises(ValueError, match="direction"):
        stats.judge(stats.Estimate(0.7, 0.6, 0.8, 100), direction="sideways")


def test_every_outcome_is_defined_and_an_exact_number_has_no_width():
    assert set(stats.OUTCOMES) == {"reproduces", "same direction, smaller", "does not reproduce", "not testable",
                                   "undecided"}
    e = stats.exact(5.2)
    assert (e.value, e.low, e.high) == (5.2, 5.2, 5.2)
    assert stats.judge(e, null=3.0, paper=5.0).outcome == "reproduces"
    assert stats.judge(stats.exact(4.0), null=3.0, paper=5.0).outcome == "same direction, smaller"


def test_the_books_verdict_page_defines_every_outcome_as_the_rule_does():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "book" / "verdicts.md").read_text()
    for outcome, when in stats.OUTCOMES.items():
        assert f"| **{outcome}** | {when} |" in page, outcome


def test_slopes_are_each_prompts_least_squares_slope_and_nearest_keeps_the_centre():
    x = np.array([-3.0, -1.5, 0.0, 1.5, 3.0])
    y = np.stack([2 * x + 1, -x, np.zeros_like(x)], axis=1) + np.array([0.0, 0.1, -0.1, 0.1, 0.0])[:, None] * 0
    assert np.allclose(stats.slopes(x, y), [2.0, -1.0, 0.0])
    rng = np.random.default_rng(0)
    noisy = rng.normal(size=(5, 4))
    assert np.allclose(stats.slopes(x, noisy), [np.polyfit(x, noisy[:, j], 1)[0] for j in range(4)])
    assert stats.nearest(x, within=1.5).tolist() == [1, 2, 3]
    assert stats.nearest(x, within=0.1).tolist() == [1, 2, 3]  # at least 3 points
    with pytest.raises(ValueError):
        stats.slopes(np.zeros(3), np.zeros((3, 2)))


def test_a_fact_without_sampling_error_reproduces_or_not():
    assert str(stats.fact(True)) == "reproduces"
    assert str(stats.fact(False)) == "does not reproduce: the exact computation says otherwise"


def test_an_unpaired_difference_resamples_each_side_and_a_scaled_estimate_keeps_its_interval():
    a, b = np.array([1.0] * 40 + [0.0] * 10), np.array([1.0] * 10 + [0.0] * 30)
    d = stats.difference(a, b, seed=1)
    assert d.value == pytest.approx(0.8 - 0.25) and d.low > 0.35 and d.high < 0.75 and d.n == 40
    # wider than a paired interval would be on identical samples: there is no pairing to remove noise
    same = stats.difference(a, a, seed=1)
    assert same.value == 0 and same.low < -0.1 < 0.1 < same.high
    s = stats.scaled(stats.Estimate(0.1, 0.0, 0.2, 9), 0.5)
    assert (s.value, s.low, s.high, s.n) == (0.2, 0.0, 0.4, 9)
    with pytest.raises(ValueError):
        stats.scaled(s, 0.0)


def test_a_verdict_on_an_exact_number_speaks_of_its_value_not_an_interval():
    assert stats.judge(stats.exact(2), null=0, paper=4).reason == "the value is short of the paper's 4"
    assert stats.judge(stats.exact(0), null=0, paper=4).reason == "the value is not beyond the null (0)"
    assert stats.judge(stats.Estimate(0.1, 0.05, 0.15, 9), paper=0.3).reason.startswith("the whole interval")
