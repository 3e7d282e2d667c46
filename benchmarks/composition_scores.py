"""Benchmark (not a test): time the vectorised composition scores of every pair of GPT-2 small heads.

    .venv/bin/python benchmarks/composition_scores.py [path/to/gpt2-small-attention]

Target: all Q-, K- and V-composition pairs of GPT-2 small in under 2 s each on 2 cores. Uses the real weights
when ../shared is present, otherwise random weights of the same shapes (the time does not depend on the values).
"""

import sys
import time
from pathlib import Path

import torch

from headcircuits import composition, weights


def main() -> None:
    default = Path(__file__).resolve().parents[2] / "shared" / "gpt2-small-attention"
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    if path.is_dir():
        w, source = weights.load_gpt2_small_attention(path), "GPT-2 small (real weights)"
    else:
        g = torch.Generator().manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        w = weights.HeadWeights(r(12, 12, 768, 64), r(12, 12, 768, 64), r(12, 12, 768, 64), r(12, 12, 64, 768))
        source = "random weights of GPT-2 small's shapes"
    print(f"{source}; torch threads: {torch.get_num_threads()}")
    for kind in "QKV":
        composition.composition_scores(w, kind)  # warm-up
        start = time.perf_counter()
        scores = composition.composition_scores(w, kind)
        elapsed = time.perf_counter() - start
        pairs = int((~scores.isnan()).sum())
        print(f"{kind}-composition: {pairs} head pairs in {elapsed:.3f} s (target < 2 s)")
    start = time.perf_counter()
    dense_pair = torch.linalg.norm((w.W_V[0, 0] @ w.W_O[0, 0]) @ (w.W_Q[1, 0] @ w.W_K[1, 0].T))
    per_pair = time.perf_counter() - start
    print(f"for scale: one pair with dense 768 x 768 matrices takes {per_pair * 1000:.1f} ms "
          f"(x {pairs} pairs = {per_pair * pairs:.0f} s); value {float(dense_pair):.1f}")


if __name__ == "__main__":
    main()
