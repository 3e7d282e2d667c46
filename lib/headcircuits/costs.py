"""The dry run of ``headcircuits reproduce``: what a run would cost, measured on this hardware before it starts.

Every job (a chapter on a model) is executed twice at a small **calibration slice** of the same protocol: every
parameter that counts prompts divided by :data:`SLICES` (50 and 25; at least :data:`LEAST` prompts), everything
else (list lengths, grid resolution, components, controls) as the run will have it. The chapters' sweeps log
their pieces and seconds (:mod:`headcircuits.spread`), so each job's time splits into its sweeps (by kind: path
patching, traversal, component effects) and the rest. Both are fitted as ``a + b * share`` of the prompts
(two points) and read at a share of 1: the predicted single-worker seconds of the job and of each of its sweep
kinds. Prompts are what the papers' sizes multiply; a cost that does not grow with them (loading the model, the
grid's points) is the fit's ``a``.

The wall time on W workers is the larger of two bounds: the work divided by W, and the critical path (the
chapter that finds the IOI circuit, then the longest chapter that reuses it), where a job's own time on W workers
is its serial rest plus each sweep kind spread over at most its number of pieces. It is a model: the benchmark
``benchmarks/reproduce.py`` compares it with a measured run.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from headcircuits import execution

SLICES = (50, 25)  # calibration: the run's prompt counts divided by these
LEAST = 8  # the fewest prompts a calibration slice gives a parameter (chapter 03 compares the two path patchings on 8)
WORKERS = (1, 4, 16, 64)
#: parameters that count prompts (or prompts per list length)
PROMPTS = ("n_prompts", "n_eval", "n_paper", "n_inhibition", "n_duplicate", "n_per_length", "n_traverse", "n_fix")


@dataclass(frozen=True)
class Cost:
    """One job's predicted single-worker seconds: in all, per sweep kind, the sweeps' pieces, and the rest."""

    job: str
    after: str | None
    seconds: float
    sweeps: dict  # kind -> (seconds, pieces)

    @property
    def rest(self) -> float:
        return max(0.0, self.seconds - sum(s for s, _ in self.sweeps.values()))

    def on(self, workers: int) -> float:
        """Seconds on ``workers`` single-threaded workers: the rest, then each sweep kind over its pieces."""
        return self.rest + sum(s * math.ceil(p / workers) / p for s, p in self.sweeps.values() if p)


def sliced(parameters: dict, defaults: dict, divisor: int) -> dict:
    """A job's parameters with every prompt count (its own, else the notebook's default) divided by
    ``divisor``, at least :data:`LEAST`."""
    out = dict(parameters)
    for name in PROMPTS:
        if name in defaults or name in parameters:
            value = parameters.get(name, json.loads(defaults[name]) if name in defaults else None)
            if isinstance(value, int):
                out[name] = max(LEAST, value // divisor)
    return out


def _pieces(name: str, reports: list[dict], share: float) -> int:
    """The pieces a sweep kind will have at the run's size: a sweep over prompts (path patching, scoring, the
    repair) has a piece per so many prompts, so its pieces grow with them; the others' do not (grid points,
    components)."""
    from headcircuits import path_patching, scoring

    per_piece = {"path_patch": path_patching.PROMPTS_PER_PIECE, "evaluate": scoring.PROMPTS_PER_PIECE,
                 "repair": scoring.PROMPTS_PER_PIECE}
    if name in per_piece:
        return sum(max(1, math.ceil(r["items"] / share / per_piece[name])) for r in reports)
    return sum(r["pieces"] for r in reports)


def calibrate(jobs, root: Path, folder: Path, *, log=print) -> list[Cost]:
    """Execute every job at the two calibration slices, one after the other in dependency order (each chapter
    single-threaded, as a worker runs it; a model's chapters share one results cache per slice, so a chapter
    that reuses the IOI circuit costs what it will cost in the run) and fit its cost (see the module docstring).
    ``folder`` keeps the calibration runs: a second dry run of the same code reuses them."""
    costs = []
    for job in jobs:
        src = root / "notebooks" / f"{job.chapter}.ipynb"
        defaults = execution.declared_parameters(src)
        points = []
        for divisor in SLICES:
            params = sliced(job.parameters, defaults, divisor)
            model_folder = folder / f"slice-{divisor}" / re.sub(r"[^A-Za-z0-9._-]", "_", job.model)
            out, store = model_folder / job.chapter, model_folder / job.chapter / "pieces"
            # one results cache per model and slice, as in the run: a chapter that reuses the IOI circuit finds it
            env = {"HEADCIRCUITS_RESULTS": str(model_folder / "results"), "HEADCIRCUITS_PIECES": str(store),
                   "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
            start = time.perf_counter()
            execution.execute(src, out / src.name, params, env, log=lambda _: None, output=out / "log.txt")
            record = json.loads((out / (src.stem + execution.RECORD)).read_text())
            sweeps: dict[str, list[dict]] = {}
            log_file = store / "sweeps.jsonl"
            for line in (log_file.read_text().splitlines() if log_file.is_file() else []):
                r = json.loads(line)
                sweeps.setdefault(r["name"], []).append(r)
            share = _share(params, job.parameters, defaults)
            points.append((share, record["seconds"], sweeps))
            log(f"calibration {job.name} at 1/{divisor} of the prompts: {record['seconds']:.0f} s "
                f"({'reused' if record.get('reused') else f'{time.perf_counter() - start:.0f} s now'})")
        costs.append(_fit(job, points))
    return costs


def _share(params: dict, full: dict, defaults: dict) -> float:
    """The slice's share of the run's prompts: the smallest ratio among its prompt parameters (``n_prompts``',
    whose path patching is most of a chapter's cost, is the most divided; a parameter held at :data:`LEAST`
    has a larger ratio)."""
    ratios = []
    for name in PROMPTS:
        if name in params and isinstance(params[name], int):
            target = full.get(name, json.loads(defaults[name]) if name in defaults else None)
            if isinstance(target, int) and target > 0:
                ratios.append(params[name] / target)
    return min(ratios) if ratios else 1.0


def _fit(job, points) -> Cost:
    (s1, t1, w1), (s2, t2, w2) = points

    def at_one(y1: float, y2: float) -> float:
        if abs(s2 - s1) < 1e-9:
            return max(y1, y2)
        slope = max(0.0, (y2 - y1) / (s2 - s1))  # time never falls as prompts grow (noise can say so)
        return max(y1, y2) + slope * (1.0 - max(s1, s2))

    names = sorted(set(w1) | set(w2))
    secs = {name: [sum(r["seconds"] for r in w.get(name, [])) for w in (w1, w2)] for name in names}
    # the rest (the job's time outside its sweeps) and each sweep kind are fitted apart, so that they add up
    rests = [max(0.0, t - sum(secs[name][k] for name in names)) for k, t in enumerate((t1, t2))]
    sweeps = {name: (at_one(*secs[name]), _pieces(name, w2.get(name, []), s2)) for name in names}
    return Cost(job.name, job.after, at_one(*rests) + sum(s for s, _ in sweeps.values()), sweeps)


def predict(costs: list[Cost], workers: int) -> tuple[float, float]:
    """``(wall seconds, critical path seconds)`` on ``workers`` workers (see the module docstring)."""
    by_name = {c.job: c for c in costs}
    path = {}
    for c in costs:  # costs are in dependency order
        path[c.job] = c.on(workers) + (path[c.after] if c.after in path else 0.0)
    critical = max(path.values(), default=0.0)
    work = sum(c.seconds for c in by_name.values())
    return max(work / workers, critical), critical


def table(costs: list[Cost], device: str) -> str:
    """The dry run's report: every job and its sweeps, the CPU-hours, the predicted wall time on 1, 4, 16 and
    64 workers."""
    lines = [f"{'job':44s} {'predicted s':>12s}  sweeps (kind: seconds over pieces)"]
    for c in costs:
        sweeps = ", ".join(f"{k}: {s:.0f} s / {p} pieces" for k, (s, p) in c.sweeps.items()) or "none"
        lines.append(f"{c.job:44s} {c.seconds:12.0f}  {sweeps}; rest {c.rest:.0f} s")
    total = sum(c.seconds for c in costs)
    lines += ["", f"work: {total / 3600:.2f} {device}-hours (single-threaded workers, calibrated on this machine)",
              f"{'workers':>8s} {'wall time':>12s} {'critical path':>14s}"]
    for w in WORKERS:
        wall, critical = predict(costs, w)
        lines.append(f"{w:8d} {_hours(wall):>12s} {_hours(critical):>14s}")
    return "\n".join(lines)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def dry_run(jobs, root: Path, folder: Path | None = None, *, log=print) -> str:
    """The dry run: the jobs, their calibrated costs and the predicted wall times (see the module docstring)."""
    import torch

    device = "GPU" if torch.cuda.is_available() and os.environ.get("HEADCIRCUITS_DEVICE", "cuda").startswith("cuda") \
        else "CPU"
    folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="headcircuits-calibration-"))
    costs = calibrate(jobs, root, folder, log=log)
    note = ("" if device == "GPU" else
            "\nGPU: no figure is known for these jobs (none was measured); run the dry run on a GPU worker to get one.")
    return table(costs, device) + note
