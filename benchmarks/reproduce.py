"""Spreading the papers' sweeps over Dask (headcircuits.spread, `headcircuits reproduce`): prints figures.

1. The same sweep (path patching into the logits on ``--prompts`` IOI prompts, in pieces of ``--per-piece``) in
   this process, single-threaded as a worker is, and on a two-worker ``LocalCluster``: seconds, the throughput
   ratio, and whether the results are equal bit for bit.
2. The per-piece overhead of the cluster: ``--empty`` pieces that do nothing.
3. The dry run's prediction against a real run: chapter ``--chapter`` at ``n_prompts=--run-prompts`` is calibrated
   (:mod:`headcircuits.costs`), then run on the two-worker cluster, and both wall times printed.

    .venv/bin/python benchmarks/reproduce.py [--model smollm2-135m] [--skip-run]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HEADCIRCUITS_NO_CACHE", "1")  # every figure computed, none read from a results cache

import torch  # noqa: E402

from headcircuits import costs, path_patching, reproduce, spread  # noqa: E402
from headcircuits.models import load_model  # noqa: E402
from headcircuits.tasks import ioi  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _nothing(model, piece):
    return piece


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--per-piece", type=int, default=8)
    parser.add_argument("--empty", type=int, default=40)
    parser.add_argument("--chapter", default="03")
    parser.add_argument("--run-prompts", type=int, default=400)
    parser.add_argument("--skip-run", action="store_true", help="skip part 3 (minutes)")
    args = parser.parse_args()
    model = load_model(args.model)
    data = ioi.generate(model, args.prompts, seed=0, counterfactual="abc")
    receivers = path_patching.Receivers("logits")
    pieces = len(spread.ranges(args.prompts, args.per_piece))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    serial = path_patching.path_patch(model, data, receivers, prompts_per_piece=args.per_piece, progress=False)
    t_serial = time.perf_counter() - start
    torch.set_num_threads(threads)
    print(f"path patching into the logits, {args.prompts} prompts in {pieces} pieces, {args.model}")
    print(f"  this process, 1 thread:        {t_serial:7.1f} s")
    with spread.local_cluster(2) as address:
        with spread.use(address):
            spread.sweep("warm-up", _nothing, model, [0, 1])  # each worker loads the model once
            start = time.perf_counter()
            spread_ = path_patching.path_patch(model, data, receivers, prompts_per_piece=args.per_piece,
                                               progress=False)
            t_cluster = time.perf_counter() - start
            start = time.perf_counter()
            spread.sweep("empty", _nothing, model, list(range(args.empty)))
            t_empty = time.perf_counter() - start
    same = torch.equal(serial.nan_to_num(), spread_.nan_to_num())
    print(f"  2-worker LocalCluster:         {t_cluster:7.1f} s  (throughput x{t_serial / t_cluster:.2f}; "
          f"bit for bit equal: {same})")
    print(f"  per-piece overhead (empty):    {1000 * t_empty / args.empty:7.1f} ms  ({args.empty} pieces in "
          f"{t_empty:.2f} s)")
    if args.skip_run:
        return

    jobs = [j for j in reproduce.plan([args.model], "book") if j.chapter.startswith(args.chapter)]
    jobs = [reproduce.Job(j.chapter, j.model, {**j.parameters, "n_prompts": args.run_prompts}, None) for j in jobs]
    with tempfile.TemporaryDirectory(prefix="headcircuits-bench-") as tmp:
        os.environ.pop("HEADCIRCUITS_NO_CACHE")  # the run keeps its pieces, as `reproduce` does
        start = time.perf_counter()
        found = costs.calibrate(jobs, ROOT, Path(tmp) / "calibration", log=lambda line: print(f"  {line}"))
        t_dry = time.perf_counter() - start
        predicted, critical = costs.predict(found, 2)
        print(f"\n{jobs[0].name} at n_prompts={args.run_prompts}: dry run (calibration) took {t_dry:.0f} s")
        print(costs.table(found, "CPU"))
        with spread.local_cluster(2) as address:
            start = time.perf_counter()
            reproduce.run(jobs, Path(tmp) / "run", ROOT, address, log=lambda line: print(f"  {line}"))
            measured = time.perf_counter() - start
    print(f"\npredicted on 2 workers: {predicted:.0f} s (critical path {critical:.0f} s); measured: {measured:.0f} s "
          f"({measured / predicted:.2f} x the prediction)")


if __name__ == "__main__":
    main()
