"""Benchmark (not a test): reference vs fast path patching on the embedded default model, same prompts.

    .venv/bin/python benchmarks/path_patching.py [--prompts 16] [--layers 6] [--receivers logits|q|v|k]

Each method runs in its own process so its peak memory (max RSS) is its own. Prints both times, the speed-up
(issue 14's targets: at least 20x for q, k and v receivers, 100x into the logits), the peak memory and the
largest difference between the two [layer, head] tables.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_one(args) -> None:
    import torch

    from headcircuits import path_patching as patching
    from headcircuits.models import load_model
    from headcircuits.tasks import ioi

    model = load_model(args.model)
    data = ioi.generate(model, args.prompts, seed=0, counterfactual="abc")
    L, H = model.facts.n_layers, model.facts.n_heads
    from headcircuits import scoring

    def top3(query: str, key: str) -> tuple:
        score = scoring.attention_between(model, data, query, key).flatten().topk(3).indices
        return tuple((int(i) // H, int(i) % H) for i in score)

    # data-driven receivers like the discovery stages': mover-like heads (END -> IO) for q at END,
    # inhibition-like heads (END -> S2) for v at S2, induction-like heads (S2 -> S1+1) for k at S1+1
    receivers = {
        "logits": lambda: patching.Receivers("logits"),
        "q": lambda: patching.Receivers("q", heads=top3("END", "IO")),
        "v": lambda: patching.Receivers("v", heads=top3("END", "S2"), position="S2"),
        "k": lambda: patching.Receivers("k", heads=top3("S2", "S1+1"), position="S1+1"),
    }[args.receivers]()
    below = L if args.receivers == "logits" else max(receivers.layers)
    senders = [s for s in receivers.senders(L, H) if s[0] >= below - args.layers][: args.layers * H]
    base = patching.baseline(model, data)
    start = time.perf_counter()
    table = patching.path_patch(model, data, receivers, senders, method=args.method, base=base, progress=False)
    elapsed = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"method": args.method, "seconds": elapsed, "senders": len(senders), "peak_mb": peak_mb,
                      "table": torch.nan_to_num(table, 0.0).tolist(), "receivers": str(receivers)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--layers", type=int, default=6, help="senders: all heads of this many layers")
    parser.add_argument("--receivers", choices=["logits", "q", "v", "k"], default="logits")
    parser.add_argument("--method", choices=["fast", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        run_one(args)
        return
    results = {}
    for method in ("reference", "fast"):
        cmd = [sys.executable, __file__, "--method", method, "--model", args.model, "--prompts", str(args.prompts),
               "--layers", str(args.layers), "--receivers", args.receivers]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[method] = json.loads(out)
        r = results[method]
        print(f"{method:9s}: {r['senders']} senders x {args.prompts} prompts in {r['seconds']:.1f} s "
              f"({r['seconds'] / r['senders']:.3f} s/sender), peak RSS {r['peak_mb']:.0f} MB")
    ref, fast = results["reference"], results["fast"]
    diff = max(abs(a - b) for ra, rb in zip(ref["table"], fast["table"]) for a, b in zip(ra, rb))
    print(f"receivers: {ref['receivers']}")
    target = "100x" if args.receivers == "logits" else "20x"
    print(f"speed-up: {ref['seconds'] / fast['seconds']:.1f}x (target >= {target}); max |difference| of normalised "
          f"effects: {diff:.2e}")


if __name__ == "__main__":
    main()
