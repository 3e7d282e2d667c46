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

from headcircuits.stats import OUTCOMES, Verdict

COLUMNS = ("claim", "model", "paper", "ours", "verdict")
ROWS = "_rows"  # suffix of the glue key under which a chapter also stores its rows as JSON (for the scorecard)


def finding(claim: str, model: str, paper: str, ours: str, verdict: Verdict) -> dict[str, str]:
    """One row: ``claim`` as the paper states it, the ``model`` ours was measured on, ``paper`` (its number and
    model), ``ours`` (our numbers with intervals and n) and the verdict of :func:`headcircuits.stats.judge`."""
    if not isinstance(verdict, Verdict):
        raise TypeError(f"a finding's verdict comes from stats.judge (a stats.Verdict), not {type(verdict).__name__}")
    return {"claim": claim, "model": model, "paper": paper, "ours": ours, "verdict": str(verdict)}


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


def findings(rows: Iterable[Mapping[str, str]]) -> pd.DataFrame:
    """A reproduction table from rows made by :func:`finding`: exactly the keys :data:`COLUMNS`, a verdict that
    starts with one of :data:`headcircuits.stats.OUTCOMES`, and each (claim, model) once."""
    rows = list(rows)
    seen = set()
    for row in rows:
        if set(row) != set(COLUMNS):
            raise ValueError(f"a finding has exactly the keys {COLUMNS}; got {sorted(row)}")
        if not any(row["verdict"] == o or row["verdict"].startswith(f"{o}: ") for o in OUTCOMES):
            raise ValueError(f"verdict {row['verdict']!r} is not one of {list(OUTCOMES)}: make it with stats.judge")
        key = (row["claim"], row["model"])
        if key in seen:
            raise ValueError(f"the claim {key[0]!r} appears twice for {key[1]}: one row per claim and model")
        seen.add(key)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def shown(table: pd.DataFrame) -> "pd.io.formats.style.Styler":
    """A reproduction table as the book shows it: no index column, text aligned left."""
    return table.style.hide(axis="index").set_properties(**{"text-align": "left"})


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
