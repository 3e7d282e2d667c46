"""The reproduction tables: one row per claim of a paper **per model** (the claim, the model, the paper's number
and model, ours, and the verdict of :func:`headcircuits.stats.judge`), shown in each chapter and pasted, never
retyped, into the book's scorecard on its first page (myst-nb's glue: the chapter stores the table under a key,
the first page pastes it from the executed notebook). A claim appears once per model in the whole scorecard, from
one sample: :func:`scorecard` checks that across the executed chapters, and the book build runs it.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd

from headcircuits import stats
from headcircuits.stats import OUTCOMES, Estimate, Verdict

COLUMNS = ("claim", "model", "paper", "ours", "verdict")
MEASURED = "measured"  # a hidden column: what the verdict was judged on, as JSON (headcircuits.scorecard's data)
ROWS = "_rows"  # suffix of the glue key under which a chapter also stores its rows as JSON (for the scorecard)


def finding(claim: str, model: str, paper: str, ours: str, verdict: Verdict) -> dict[str, str]:
    """One row: ``claim`` as the paper states it, the ``model`` ours was measured on, ``paper`` (its number and
    model), ``ours`` (our numbers with intervals and n) and the verdict of :func:`headcircuits.stats.judge`."""
    if not isinstance(verdict, Verdict):
        raise TypeError(f"a finding's verdict comes from stats.judge (a stats.Verdict), not {type(verdict).__name__}")
    return {"claim": claim, "model": model, "paper": paper, "ours": ours, "verdict": str(verdict),
            MEASURED: json.dumps(measured(verdict))}


def measured(verdict: Verdict) -> dict:
    """What a verdict was judged on, as plain data: its outcome, the estimate with its 95 % interval and n, the
    null, the paper's value and the claimed direction (``None`` where the claim was not testable)."""
    e = verdict.estimate
    return {"outcome": verdict.outcome, "reason": verdict.reason,
            "estimate": None if e is None else e.value, "low": None if e is None else e.low,
            "high": None if e is None else e.high, "n": None if e is None else e.n,
            "null": verdict.null, "paper_value": verdict.paper, "direction": verdict.direction}


def says(verdict: Verdict, **by_outcome: str) -> str:
    """The sentence a chapter prints for a verdict: one text per outcome of :data:`headcircuits.stats.OUTCOMES`
    (keyword names with spaces and commas as underscores: ``same_direction_smaller``, ``does_not_reproduce``, ...),
    every outcome given, so that the prose can only say what the numbers decided. ``{reason}`` in a text is
    replaced by the verdict's reason."""
    names = {o: o.replace(",", "").replace(" ", "_") for o in OUTCOMES}
    missing = [n for n in names.values() if n not in by_outcome]
    unknown = sorted(set(by_outcome) - set(names.values()))
    if missing or unknown:
        raise ValueError(f"says needs one text per outcome: missing {missing}, unknown {unknown}")
    return by_outcome[names[verdict.outcome]].replace("{reason}", verdict.reason)


#: what a model's accuracy says about a behaviour (:func:`behaviour`): the side test's outcome -> the words
BEHAVIOUR = {"reproduces": "above chance", "does not reproduce": "at chance", "inconclusive": "undecided"}


def behaviour(accuracy: Estimate, chance: float) -> str:
    """Whether a model has a task's behaviour: ``above chance`` (the accuracy's whole 95 % interval above
    ``chance``), ``at chance`` (the interval at or below it) or ``undecided`` (it contains chance). The chapters
    look for a circuit only behind a behaviour (Wang et al. 2022, section 3; Merullo et al. 2024, section 3)."""
    return BEHAVIOUR[stats.verdict(accuracy, threshold=chance)]


def has_behaviour(model: str, accuracies: Mapping[str, Estimate], chance: float) -> str:
    """The sentence a circuit chapter prints before it looks for a circuit: whether ``model`` is above chance on
    every prompt set of ``accuracies`` (label -> accuracy), at chance on all, or neither, quoting each number."""
    quoted = "; ".join(f"{label}: {a}" for label, a in accuracies.items()) + f"; chance {100 * chance:.1f} %"
    calls = {behaviour(a, chance) for a in accuracies.values()}
    if calls == {"above chance"}:
        return f"- **{model}** is above chance on every prompt set ({quoted}), so it has the behaviour whose circuit we look for."
    if calls == {"at chance"}:
        return (f"- **{model} is at chance** ({quoted}). It does not have the behaviour, so its circuit below is the "
                "set of heads that move the logit difference between the answer and the counterfactual's, not a "
                "mechanism that solves the task; what is built on that circuit is read with this in mind.")
    return (f"- Whether **{model}** has the behaviour is not settled by these prompts ({quoted}): read its circuit "
            "below with that caveat.")


def repair_account(
    model: str, gain: Estimate, verdict: Verdict, null: float, *, attention_drop: float | None,
    best_alone: tuple[str, float] | None, listed: tuple[float, float],
    carries: float = 0.75, moves: float = 0.05, falls: float = 0.10,
) -> str:
    """How the Colored Objects repair (Merullo et al. 2024, section 5) worked on ``model``, from its numbers:
    ``gain`` (accuracy among the colours, forced minus unforced) and its ``verdict``; ``null`` the best random
    head set's gain; ``attention_drop``: how much less the movers attend to the wrong colours when forced (None: no
    mover classed); ``best_alone``: the forced head whose run alone gives the largest share of the full gain (its
    label, that share); ``listed``: the share of prompts whose top-1 token is a listed colour, before and after.
    The thresholds (ours): one head ``carries`` the repair above that share of the gain; the movers' attention
    ``moves`` by more than that; the listed share ``falls`` by more than that."""
    if not verdict.holds:
        return (f"- **{model}**: forcing the heads does not raise accuracy among the colours beyond the random "
                f"controls (gain {gain.points()}; best random set {100 * null:+.1f} points; {verdict}), so there is "
                "no repair whose route to explain.")
    if attention_drop is not None and attention_drop > moves:
        route = (f"the movers look at the wrong colours less (mean attention {attention_drop:.2f} lower), as the "
                 "paper's account predicts")
    else:
        route = ("the movers' attention to the wrong colours hardly moves ("
                 + ("no movers classed" if attention_drop is None else f"mean attention changes by {-attention_drop:+.2f}")
                 + "): it works some other way on this model, e.g. through the forced heads' own outputs (a negative "
                 "mover writes against what it attends to)")
    one = (f" One head carries most of it: {best_alone[0]} alone gives {best_alone[1]:.0%} of the full gain."
           if best_alone is not None and best_alone[1] > carries else "")
    before, after = listed
    off_top = (": the repair pushes the colours off the top, so it is a repair among the three colours only."
               if after < before - falls else ".")
    return (f"- **{model}**: the repair raises accuracy among the colours ({gain.points()}) and {route}.{one} The "
            f"top-1 token is a listed colour in {before:.0%} of prompts before and {after:.0%} after{off_top}")


def findings(rows: Iterable[Mapping[str, str]]) -> pd.DataFrame:
    """A reproduction table from rows made by :func:`finding`: exactly the keys :data:`COLUMNS`, a verdict that
    starts with one of :data:`headcircuits.stats.OUTCOMES`, and each (claim, model) once."""
    rows = list(rows)
    seen = set()
    for row in rows:
        if set(row) != {*COLUMNS, MEASURED}:
            raise ValueError(f"a finding has exactly the keys {(*COLUMNS, MEASURED)} (make it with report.finding); "
                             f"got {sorted(row)}")
        if not any(row["verdict"] == o or row["verdict"].startswith(f"{o}: ") for o in OUTCOMES):
            raise ValueError(f"verdict {row['verdict']!r} is not one of {list(OUTCOMES)}: make it with stats.judge")
        key = (row["claim"], row["model"])
        if key in seen:
            raise ValueError(f"the claim {key[0]!r} appears twice for {key[1]}: one row per claim and model")
        seen.add(key)
    return pd.DataFrame(rows, columns=[*COLUMNS, MEASURED])


def shown(table: pd.DataFrame) -> "pd.io.formats.style.Styler":
    """A reproduction table as the book shows it: no index column, the hidden data column left out, text aligned
    left."""
    style = table.style.hide(axis="index")
    if MEASURED in table.columns:
        style = style.hide(subset=[MEASURED], axis="columns")
    return style.set_properties(**{"text-align": "left"})


def publish(table: pd.DataFrame, key: str = "findings") -> "pd.io.formats.style.Styler":
    """Store the table for the book's scorecard (myst-nb glue, not displayed here; its rows also as JSON under
    ``key + "_rows"``) and return it for display (:func:`shown`). Outside a book build (no myst-nb, e.g. on Colab)
    it is only returned."""
    try:
        from myst_nb import glue
    except ImportError:  # pragma: no cover - myst-nb is part of the book's environment
        return shown(table)
    glue(key, shown(table), display=False)
    glue(key + ROWS, json.dumps(table.to_dict(orient="records"), ensure_ascii=False), display=False)
    return shown(table)


def rows_of(notebook: Path, key: str = "findings") -> list[dict[str, str]]:
    """The rows a chapter published (:func:`publish`), read from its executed notebook; [] if it published none."""
    nb = json.loads(Path(notebook).read_text())
    for cell in nb["cells"]:
        for output in cell.get("outputs", []):
            if output.get("metadata", {}).get("scrapbook", {}).get("name") == key + ROWS:
                # glue(display=False) prefixes the mime types (myst_nb.ext.glue.GLUE_PREFIX)
                text = next(v for k, v in output["data"].items() if k.endswith("text/plain"))
                return json.loads(ast.literal_eval("".join(text) if isinstance(text, list) else text))
    return []


def scorecard(notebooks: Iterable[Path], key: str = "findings") -> pd.DataFrame:
    """Every published row of the executed chapters, with its chapter; raises if a claim appears for one model
    in two places (two samples of one claim could disagree), naming both."""
    rows, where = [], {}
    for nb in notebooks:
        for row in rows_of(nb, key):
            k = (row["claim"], row["model"])
            if k in where:
                raise ValueError(f"the scorecard has the claim {k[0]!r} for {k[1]} twice ({where[k]} and "
                                 f"{Path(nb).stem}): publish each claim from one chapter, its largest sample")
            where[k] = Path(nb).stem
            rows.append({"chapter": Path(nb).stem, **row})
    return pd.DataFrame(rows, columns=["chapter", *COLUMNS])
