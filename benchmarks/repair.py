"""Benchmark (not a test): Circuit Component Reuse's repair (§5) with ``interventions.repair``.

    .venv/bin/python benchmarks/repair.py [--model smollm2-135m] [--prompts 120] [--controls 5] [--device cpu]

Chapter 04 forces named head sets, and random control sets, onto the wrong colours at END. Forcing attention at
END changes END's computation only, so the default engine runs each prompt's earlier tokens once and reruns END
alone per condition (``engine="end-only"``); ``engine="full"`` is one full hooked forward pass per condition.
Prints both times, their ratio, the peak memory and the largest difference of any prompt's logit difference
between the two (they must agree to float precision, and every per-prompt choice must be the same). The heads
are arbitrary middle-layer heads (any heads give the same timing).
"""

import argparse
import resource
import time

from headcircuits import interventions
from headcircuits.models import load_model
from headcircuits.tasks import colored_objects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=120)
    parser.add_argument("--controls", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = load_model(args.model, device=args.device)
    data = colored_objects.generate(model, args.prompts, seed=0)
    L, H = model.facts.n_layers, model.facts.n_heads
    mid = [(L // 3 + i, i % H) for i in range(4)]
    sets = {"four heads": tuple(mid), "first two": tuple(mid[:2]), "last two": tuple(mid[2:])}
    n_conditions = 1 + len(sets) + args.controls
    print(f"{args.model} on {model.device}; {len(data)} Colored Objects prompts, {n_conditions} conditions "
          f"(none, {len(sets)} named sets, {args.controls} random controls)")
    out, seconds = {}, {}
    for engine in ("end-only", "full"):
        start = time.perf_counter()
        out[engine] = interventions.repair(model, data, sets, n_controls=args.controls, per_prompt=True,
                                           engine=engine)[1]
        seconds[engine] = time.perf_counter() - start
        print(f"  {engine:8s} {seconds[engine]:6.1f} s")
    fast, full = out["end-only"], out["full"]
    worst = max(float((fast[k].logit_diff - full[k].logit_diff).abs().max()) for k in full)
    same = all((fast[k].candidate_choice == full[k].candidate_choice).all() for k in full)
    print(f"end-only is {seconds['full'] / seconds['end-only']:.1f}x the full passes; largest logit-difference "
          f"gap {worst:.1e}; same choices on every prompt: {same}; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()
