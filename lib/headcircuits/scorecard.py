"""The scorecard of a ``headcircuits reproduce`` run, as data (``scorecard.json``) and as a page
(``scorecard.html``: static, offline, readable on a phone): per claim, its chapter, the paper's value and model,
and per model ours (estimate, 95 % interval, n) with the verdict of :func:`headcircuits.stats.judge`, exactly
the rows the executed chapters published (:func:`headcircuits.report.rows_of`); with the run's provenance
(commit, lock hash, hardware, date, wall time, scale)."""

from __future__ import annotations

import hashlib
import html
import json
import re
import subprocess
import time
from pathlib import Path

from headcircuits import report

FILE = "scorecard.json"
PAGE = "scorecard.html"


def provenance(root: Path, scale: str, cluster: str, seconds: float, records: dict,
               overrides: dict | None = None, of: int | None = None) -> dict:
    """Where a run's numbers come from: the repository's commit (and whether it had uncommitted changes), the
    sha256 of the pinned versions, the hardware of its chapters, when it ended, its wall time, its scale, the
    parameters given over the scale's (``-p``), and whether every one of its ``of`` chapters finished (``records``:
    the finished ones)."""
    from headcircuits import execution

    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    lock = Path(execution.__file__).resolve().parent / "data" / "requirements.lock"
    hardware = sorted({json.dumps(r["hardware"], sort_keys=True) for r in records.values()})
    return {"commit": commit, "uncommitted_changes": dirty, "lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest(),
            "hardware": [json.loads(h) for h in hardware], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "wall_seconds": round(seconds, 1), "scale": scale, "overrides": dict(overrides or {}), "cluster": cluster,
            "chapter_seconds": {name: round(r["seconds"], 1) for name, r in records.items()},
            "reused": sorted(name for name, r in records.items() if r.get("reused")),
            "complete": of is None or len(records) == of, "chapters": f"{len(records)} of {of or len(records)}"}


def collect(executed: dict[str, Path]) -> list[dict]:
    """The claims of the executed chapters (``job name -> executed notebook``), one entry per (chapter, claim)
    with ``ours``: one entry per model (the row's text, the measured numbers and the verdict)."""
    claims: dict[tuple[str, str], dict] = {}
    for name, notebook in executed.items():
        chapter = Path(notebook).stem
        for row in report.rows_of(Path(notebook)):
            numbers = json.loads(row.get(report.MEASURED) or "{}")
            entry = claims.setdefault((chapter, row["claim"]), {
                "chapter": chapter, "claim": row["claim"], "paper": row["paper"],
                "paper_value": numbers.get("paper_value"), "ours": {}})
            if row["model"] in entry["ours"]:
                raise ValueError(f"{chapter}: the claim {row['claim']!r} appears twice for {row['model']}")
            entry["ours"][row["model"]] = {"text": row["ours"], "verdict": row["verdict"], **numbers}
    return list(claims.values())


def write(out: Path, claims: list[dict], provenance: dict) -> tuple[Path, Path]:
    """``scorecard.json`` and ``scorecard.html`` in ``out``."""
    data = {"provenance": provenance, "claims": claims}
    (out / FILE).write_text(json.dumps(data, indent=1, ensure_ascii=False))
    (out / PAGE).write_text(page(data))
    return out / FILE, out / PAGE


def load(folder: Path) -> dict:
    """A run's scorecard from its ``--out`` folder (or the ``scorecard.json`` itself)."""
    path = Path(folder)
    path = path / FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give the --out folder of a finished `headcircuits reproduce`")
    return json.loads(path.read_text())


def label(provenance: dict) -> str:
    """A short label of a run: its scale (and any parameter given over it), commit and date."""
    commit = (provenance.get("commit") or "unknown commit")[:12]
    dirty = " with uncommitted changes" if provenance.get("uncommitted_changes") else ""
    overrides = provenance.get("overrides") or {}
    changed = " but " + ", ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items()) if overrides else ""
    partial = "" if provenance.get("complete", True) else f", incomplete: {provenance['chapters']} chapters"
    return f"{provenance['scale']} scale{changed}, {commit}{dirty}, {provenance['date']}{partial}"


def duration(provenance: dict) -> str:
    """The run's wall time, and, where it went on from an earlier one (a stopped run run again), that this is the
    last invocation's time and which chapters it took, unchanged, from before (their own seconds:
    ``chapter_seconds``)."""
    hours = f"{provenance['wall_seconds'] / 3600:.1f} h"
    reused = provenance.get("reused") or []
    if not reused:
        return hours
    return (f"{hours} in its last invocation, which reused {len(reused)} of its chapters from earlier ones "
            f"({', '.join(reused)})")


def page(data: dict) -> str:
    """The scorecard as one static HTML page (no script, no remote resource; columns wrap on a phone)."""
    p = data["provenance"]
    esc = html.escape
    rows = []
    for claim in data["claims"]:
        for model, ours in claim["ours"].items():
            rows.append(f"<tr><td>{esc(claim['chapter'])}</td><td>{esc(claim['claim'])}</td><td>{esc(model)}</td>"
                        f"<td>{esc(claim['paper'])}</td><td>{esc(ours['text'])}</td>"
                        f"<td class=\"v\">{esc(ours['verdict'])}</td></tr>")
    hardware = "; ".join(f"{h.get('cores')} cores of {h.get('cpu')}, {h.get('memory', '?')}, GPU {h.get('gpu')}"
                         for h in p["hardware"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>headcircuits scorecard ({esc(p['scale'])} scale)</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1rem; line-height: 1.4; color: #222; }}
table {{ border-collapse: collapse; width: 100%; font-size: 0.9rem; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 0.4rem; text-align: left; vertical-align: top;
          overflow-wrap: anywhere; }}
th {{ background: #f4f4f4; }}
td.v {{ min-width: 8rem; }}
@media (max-width: 600px) {{
  thead {{ display: none; }}
  tr {{ display: block; border: 1px solid #ccc; margin-bottom: 0.8rem; }}
  td {{ display: block; border: none; }}
  td:nth-child(1)::before {{ content: "chapter: "; font-weight: bold; }}
  td:nth-child(3)::before {{ content: "model: "; font-weight: bold; }}
  td:nth-child(4)::before {{ content: "paper: "; font-weight: bold; }}
  td:nth-child(5)::before {{ content: "ours: "; font-weight: bold; }}
  td:nth-child(6)::before {{ content: "verdict: "; font-weight: bold; }}
}}
</style></head><body>
<h1>headcircuits scorecard</h1>
<p>{esc(label(p))}. Wall time {esc(duration(p))}; cluster: {esc(p['cluster'])}; {esc(hardware)};
pinned versions sha256 {esc(p['lock_sha256'][:16])}. Verdicts follow the book's one rule (page <em>Reading the
verdicts</em>); every number comes from the executed chapters in <code>notebooks/</code> beside this page.</p>
<table><thead><tr><th>chapter</th><th>claim</th><th>model</th><th>paper</th><th>ours</th><th>verdict</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
</body></html>
"""


GLUE = re.compile(r"```\{glue:\} findings\n:doc: notebooks/(?P<chapter>[\w.-]+)\.ipynb\n```")


def with_run(intro: str, executed: dict[str, Path], data: dict) -> str:
    """The book's scorecard page with a run's column: every chapter's table (pasted by glue) replaced by the same
    rows read from the executed chapter plus the run's *ours* and *verdict* for the same claim and model ("not
    run" where the run has none); the book names the run's provenance above the tables (:func:`label`)."""
    import pandas as pd

    theirs = {(c["chapter"], c["claim"], m): o for c in data["claims"] for m, o in c["ours"].items()}
    head = "ours at the papers' scale"  # the run's provenance is named in the sentence above the tables

    def table(match: re.Match) -> str:
        chapter = match["chapter"]
        if chapter not in executed:
            raise ValueError(f"the scorecard page pastes {chapter}, which this build did not execute")
        rows = []
        for row in report.rows_of(executed[chapter]):
            run = theirs.get((chapter, row["claim"], row["model"]))
            rows.append({**{k: row[k] for k in report.COLUMNS}, head: run["text"] if run else "not run",
                         "verdict at the papers' scale": run["verdict"] if run else "not run"})
        frame = pd.DataFrame(rows, columns=[*report.COLUMNS, head, "verdict at the papers' scale"])
        return "```{raw} html\n" + report.shown(frame).to_html() + "\n```"

    replaced, n = GLUE.subn(table, intro)
    if n == 0:
        raise ValueError("the scorecard page has no `{glue:} findings` block to add the run's column to")
    return replaced
