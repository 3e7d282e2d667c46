"""The reproduction tables: one row per claim of a paper (the claim, the paper's number and model, ours, and a
verdict computed from our numbers and their uncertainty), shown in each chapter and pasted, never retyped, into the
book's scorecard on its first page (myst-nb's glue: the chapter stores the table under a key, the first page pastes
it from the executed notebook).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import pandas as pd

COLUMNS = ("claim", "paper", "ours", "verdict")


def findings(rows: Iterable[Mapping[str, str]]) -> pd.DataFrame:
    """A reproduction table from rows with the keys ``claim``, ``paper`` (the paper's number and model),
    ``ours`` (our numbers, per model, with intervals) and ``verdict``; a missing or extra key is an error."""
    rows = list(rows)
    for row in rows:
        if set(row) != set(COLUMNS):
            raise ValueError(f"a finding has exactly the keys {COLUMNS}; got {sorted(row)}")
    return pd.DataFrame(rows, columns=list(COLUMNS))


def publish(table: pd.DataFrame, key: str = "findings") -> pd.DataFrame:
    """Store the table for the book's scorecard (myst-nb glue, not displayed here) and return it for display.
    Outside a book build (no myst-nb installed, e.g. on Colab) it is only returned."""
    try:
        from myst_nb import glue
    except ImportError:  # pragma: no cover - myst-nb is part of the book's environment
        return table
    glue(key, table.style.hide(axis="index"), display=False)
    return table
