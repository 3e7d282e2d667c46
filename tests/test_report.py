"""Reproduction tables and the scorecard: one row per claim and model, verdicts from the one rule, and the rows a
chapter publishes read back from its executed notebook."""

from __future__ import annotations

import json

import nbformat
import pytest

from headcircuits import report, stats

YES = stats.judge(stats.Estimate(0.5, 0.4, 0.6, 100))
NO = stats.judge(stats.Estimate(-0.5, -0.6, -0.4, 100))


def test_a_finding_takes_a_verdict_of_the_rule_and_each_claim_appears_once_per_model():
    rows = [report.finding("c", m, "p", "o", YES) for m in ("a", "b")]
    table = report.findings(rows)
    assert list(table.columns) == [*report.COLUMNS, report.MEASURED] and table.verdict.tolist() == ["reproduces"] * 2
    # the hidden column keeps what the verdict was judged on, and the book's table does not show it
    assert json.loads(rows[0][report.MEASURED]) == {
        "outcome": "reproduces", "reason": "", "estimate": 0.5, "low": 0.4, "high": 0.6, "n": 100, "null": 0.0,
        "paper_value": None, "direction": "above"}
    html = report.shown(table).to_html()
    assert "0.4" not in html and "measured" not in html and ">o<" in html
    untestable = stats.judge(None, preconditions=[stats.require(False, "a mover")])
    assert json.loads(report.finding("c", "a", "p", "o", untestable)[report.MEASURED])["estimate"] is None
    with pytest.raises(ValueError, match="appears twice for a"):
        report.findings(rows + [report.finding("c", "a", "p", "o", NO)])
    with pytest.raises(TypeError, match="stats.judge"):
        report.finding("c", "a", "p", "o", "reproduces")
    with pytest.raises(ValueError, match="not one of"):
        report.findings([{"claim": "c", "model": "a", "paper": "p", "ours": "o", "verdict": "for some heads",
                          report.MEASURED: "{}"}])
    with pytest.raises(ValueError, match="exactly the keys"):
        report.findings([{"claim": "c", "paper": "p", "ours": "o", "verdict": "reproduces"}])


def _executed(path, monkeypatch, rows):
    """A notebook whose one cell holds exactly what report.publish displays (captured from myst-nb's glue)."""
    from myst_nb.ext import glue as glue_module

    shown = []
    monkeypatch.setattr(glue_module, "ipy_display", lambda data, raw, metadata: shown.append((data, metadata)))
    report.publish(report.findings(rows))
    cell = nbformat.v4.new_code_cell("report.publish(...)")
    cell.outputs = [nbformat.v4.new_output("display_data", data=d, metadata=m) for d, m in shown]
    nb = nbformat.v4.new_notebook(cells=[cell])
    nbformat.write(nb, path)
    return path


def test_the_scorecard_reads_every_chapters_rows_and_refuses_a_claim_published_twice(tmp_path, monkeypatch):
    a = _executed(tmp_path / "02_a.ipynb", monkeypatch, [report.finding("c1", "m", "p", "40 %", YES),
                                                         report.finding("c2", "m", "p", "x", NO)])
    b = _executed(tmp_path / "04_b.ipynb", monkeypatch, [report.finding("c3", "m", "p", "y", YES)])
    card = report.scorecard([a, b])
    assert card[["chapter", "claim", "model"]].values.tolist() == [["02_a", "c1", "m"], ["02_a", "c2", "m"],
                                                                   ["04_b", "c3", "m"]]
    assert card.verdict.tolist()[1].startswith("does not reproduce")
    twice = _executed(tmp_path / "06_c.ipynb", monkeypatch, [report.finding("c1", "m", "p", "42 %", NO)])
    with pytest.raises(ValueError, match="'c1' for m twice .02_a and 06_c."):
        report.scorecard([a, b, twice])
    assert report.rows_of(tmp_path / "06_c.ipynb") == [json.loads(json.dumps(
        report.finding("c1", "m", "p", "42 %", NO)))]


def test_a_sentence_follows_its_verdict_and_every_outcome_has_one():
    texts = dict(reproduces="they copy it", same_direction_smaller="they copy it, weakly ({reason})",
                 does_not_reproduce="they do not copy it", not_testable="nothing to test ({reason})",
                 undecided="more prompts are needed ({reason})")
    # numbers that make each outcome: the sentence changes with them
    cases = {stats.judge(stats.Estimate(0.4, 0.3, 0.5, 50), paper=0.3): "they copy it",
             stats.judge(stats.Estimate(0.1, 0.05, 0.15, 50), paper=0.3): "they copy it, weakly (the whole interval",
             stats.judge(stats.Estimate(0.0, -0.1, 0.0, 50)): "they do not copy it",
             stats.judge(None, preconditions=[stats.require(False, "attention", "0.003")]):
                 "nothing to test (needs attention (here 0.003))",
             stats.judge(stats.Estimate(0.05, -0.05, 0.15, 50)): "more prompts are needed (about"}
    said = [report.says(v, **texts) for v in cases]
    assert len(set(said)) == 5 and all(s.startswith(w) for s, w in zip(said, cases.values()))
    with pytest.raises(ValueError, match="missing .'undecided'."):
        report.says(YES, **{k: v for k, v in texts.items() if k != "undecided"})


def test_behaviour_is_decided_by_the_interval_against_chance():
    assert report.behaviour(stats.Estimate(0.45, 0.40, 0.50, 300), 1 / 3) == "above chance"
    assert report.behaviour(stats.Estimate(0.30, 0.25, 0.33, 300), 1 / 3) == "at chance"
    assert report.behaviour(stats.Estimate(0.36, 0.30, 0.42, 300), 1 / 3) == "undecided"
    # the same interval is above one chance level and undecided against a higher one
    assert report.behaviour(stats.Estimate(0.45, 0.40, 0.50, 300), 0.42) == "undecided"


def test_the_behaviour_sentence_changes_with_the_numbers_it_quotes():
    above, at, unsure = (stats.Estimate(0.45, 0.40, 0.50, 300), stats.Estimate(0.30, 0.25, 0.33, 300),
                         stats.Estimate(0.36, 0.30, 0.42, 300))
    yes = report.has_behaviour("m", {"ours": above, "the paper's": above}, 1 / 3)
    assert "is above chance on every prompt set" in yes and str(above) in yes and "33.3 %" in yes
    no = report.has_behaviour("m", {"ours": at, "the paper's": at}, 1 / 3)
    assert "is at chance" in no and "not a mechanism" in no and str(at) in no
    # one set above and one at chance, or one undecided: neither claim is made
    for mixed in ({"ours": above, "the paper's": at}, {"ours": above, "the paper's": unsure}):
        text = report.has_behaviour("m", mixed, 1 / 3)
        assert "not settled" in text and "above chance on every" not in text and "is at chance" not in text
    assert "not settled" in report.has_behaviour("m", {"ours": above}, 0.42)  # the same number, a higher chance


def test_the_repair_account_changes_with_the_numbers_it_quotes():
    gain = stats.Estimate(0.33, 0.25, 0.42, 120)
    args = dict(attention_drop=0.20, best_alone=("only 24.4", 1.10), listed=(0.77, 0.32))
    text = report.repair_account("m", gain, YES, 0.02, **args)
    assert "raises accuracy" in text and gain.points() in text
    assert "look at the wrong colours less (mean attention 0.20 lower)" in text
    assert "only 24.4 alone gives 110% of the full gain" in text
    assert "77% of prompts before and 32% after: the repair pushes the colours off the top" in text
    # a verdict that fails: no account of a route, whatever the other numbers say
    failed = report.repair_account("m", stats.Estimate(0.02, -0.02, 0.06, 120), NO, 0.03, **args)
    assert "does not raise accuracy" in failed and "+3.0 points" in failed and "route" in failed
    assert "look at the wrong colours less" not in failed and "carries" not in failed
    # each number on the other side of its threshold turns its clause
    still = report.repair_account("m", gain, YES, 0.02, **{**args, "attention_drop": 0.01})
    assert "hardly moves (mean attention changes by -0.01)" in still and "look at the wrong colours less" not in still
    assert "no movers classed" in report.repair_account("m", gain, YES, 0.02, **{**args, "attention_drop": None})
    shared = report.repair_account("m", gain, YES, 0.02, **{**args, "best_alone": ("only 24.4", 0.60)})
    assert "carries most" not in shared and "60%" not in shared
    kept = report.repair_account("m", gain, YES, 0.02, **{**args, "listed": (0.77, 0.75)})
    assert "77% of prompts before and 75% after." in kept and "off the top" not in kept
