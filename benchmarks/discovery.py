"""Benchmark (not a test): every discovery stage of chapter 03 on the embedded model, end to end and cold (no
results cache), with the peak memory.

    .venv/bin/python benchmarks/discovery.py [--prompts 32] [--model smollm2-135m] [--repeats 3]

Prints, per stage, the receivers, the number of senders and the wall time (median of the repeats), then the
total and the process's peak memory (max RSS). Chapter 03 runs the same call with its own parameters.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=32, help="ABC prompts for path patching (chapter 03: 32)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from headcircuits import circuits
    from headcircuits.models import load_model
    from headcircuits.store import STORE
    from headcircuits.tasks import ioi

    model = load_model(args.model)
    data = ioi.generate(model, args.prompts, seed=0, counterfactual="abc")
    runs, totals = [], []
    for _ in range(args.repeats):
        STORE.clear()  # cold: no clean pass kept from the repeat before
        start = time.perf_counter()
        circuit = circuits.discover(model, data, progress=False, cache=False)
        totals.append(time.perf_counter() - start)
        runs.append(circuit)
    first = runs[0]
    print(f"{args.model}: {model.facts.n_layers} layers x {model.facts.n_heads} heads, {args.prompts} ABC prompts, "
          f"{args.repeats} cold runs (medians)")
    for stage in circuits.STAGES["ioi"]:
        if stage.name not in first.seconds:
            print(f"  {stage.name:11s} ({stage.kind} at {stage.position}): not run ({first.notes.get(stage.name, 'no receivers')})")
            continue
        seconds = statistics.median(c.seconds[stage.name] for c in runs)
        print(f"  {stage.name:11s} ({stage.kind} at {stage.position}): {first.senders[stage.name]:4d} senders, "
              f"{seconds:6.1f} s, {len(first.stage(stage.name))} heads selected")
    print(f"  total (baseline run included): {statistics.median(totals):.1f} s; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    assert all(c.heads == first.heads for c in runs), "the repeats found different circuits"


if __name__ == "__main__":
    main()
