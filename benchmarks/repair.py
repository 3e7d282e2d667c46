"""Benchmark (not a test): Circuit Component Reuse's repair (§5) with ``repair.repair``.

    .venv/bin/python benchmarks/repair.py [--model smollm2-135m] [--prompts 120] [--controls 5] [--device cpu]

Chapter 04 forces named head sets, and random control sets, onto the wrong colours at END. Forcing attention at
END changes END's computation only, so the engine runs each prompt's earlier tokens once and reruns END alone per
condition, the conditions side by side; the plain way is one full hooked forward pass per condition. Prints both
times, their ratio, the peak memory and the largest difference of any prompt's logit difference between the two
(they must agree to float precision, and every per-prompt choice must be the same). The heads are arbitrary
middle-layer heads (any heads give the same timing).
"""

import argparse
import resource
import time

import torch

from headcircuits import repair, scoring
from headcircuits.models import load_model
from headcircuits.store import STORE
from headcircuits.tasks import colored_objects


@torch.no_grad()
def plain(model, data, edits):
    """One full hooked forward pass of the padded batch, the edits' hooks over every position: END's logits."""
    rows = torch.arange(len(data))
    positions = torch.arange(data.clean.ids.shape[1], device=model.device).expand(len(data), -1)
    hooks = [hk for e in edits for hk in e.hooks(data, rows, positions)]
    logits = model.bridge.run_with_hooks(data.clean.ids.to(model.device), fwd_hooks=hooks)
    return logits[rows, data.at("END")].float().cpu()


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


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
    STORE.clear()
    start = time.perf_counter()
    table, fast = repair.repair(model, data, sets, n_controls=args.controls, per_prompt=True)
    engine_seconds = time.perf_counter() - start
    print(f"  engine   {engine_seconds:6.1f} s, peak RSS so far {peak_gb():.2f} GB")
    start = time.perf_counter()
    full = {}
    for label, heads in zip(fast, table.heads):
        edits = [repair.ForcedAttention(tuple(tuple(map(int, h.split("."))) for h in heads.split()),
                                        ("WRONG_COLOR_0", "WRONG_COLOR_1"))] if heads else []
        full[label] = scoring.evaluate(model, data, logits=plain(model, data, edits))
    plain_seconds = time.perf_counter() - start
    print(f"  full     {plain_seconds:6.1f} s")
    worst = max(float((fast[k].logit_diff - full[k].logit_diff).abs().max()) for k in full)
    same = all((fast[k].candidate_choice == full[k].candidate_choice).all() for k in full)
    print(f"the engine is {plain_seconds / engine_seconds:.1f}x the full passes; largest logit-difference gap "
          f"{worst:.1e}; same choices on every prompt: {same}; peak RSS {peak_gb():.2f} GB (the plain passes' "
          "vocabulary-wide logits at every position included)")


if __name__ == "__main__":
    main()
