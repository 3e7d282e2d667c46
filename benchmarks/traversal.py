"""Benchmark (not a test): Talking Heads' 3-D traversal (§5.2) with ``traversal.traverse``.

    .venv/bin/python benchmarks/traversal.py [--model smollm2-135m] [--grid 10] [--prompts 250] [--length 3]
        [--channel 19.2:0,20.0:0,21.5:0 --mover 23.3] [--device cpu] [--check 3]

Target (issue 12): a 10 x 10 x 10 grid on 250 Laundry List prompts of one N in under 5 minutes on 2 CPU cores,
exact. Prints grid points x prompts per second, the time, the peak memory, how long the plain hooked forward pass
takes per point on the same prompts, and the paper's cost for a sweep (about 12 hours per dataset on one RTX 3090).
It also times reading the channel's coordinates (which set the grid) and then traversing, as the chapter does:
with the read's pass over the prompts kept for the traversal (the engine keeps it), and without (the kept pass
dropped in between, so the read and the traversal each run the prompts).
The channel and mover default to heads of the embedded model's IOI circuit (any heads give the same timing);
``--check K`` compares K grid points with the plain hooked forward pass.
"""

import argparse
import resource
import time

import torch
from headcircuits import channels, traversal, weights
from headcircuits.engine import Read
from headcircuits.models import load_model
from headcircuits.store import STORE
from headcircuits.tasks import laundry_list

DEFAULTS = {"smollm2-135m": ("19.2:0,20.0:0,21.5:0", "23.3"), "gemma-3-270m": ("9.3:0,11.2:0,9.0:0", "11.3")}


def head(text: str) -> tuple[int, int]:
    layer, index = text.split(".")
    return int(layer), int(index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--grid", type=int, default=10, help="points per axis")
    parser.add_argument("--prompts", type=int, default=250)
    parser.add_argument("--length", type=int, default=3)
    parser.add_argument("--channel", default=None, help="head:component,... (three of them)")
    parser.add_argument("--mover", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--check", type=int, default=2, help="grid points checked against the plain forward pass")
    args = parser.parse_args()
    model = load_model(args.model, device=args.device)
    channel_text, mover_text = DEFAULTS.get(args.model, (None, None))
    channel_text, mover_text = args.channel or channel_text, args.mover or mover_text
    if channel_text is None or mover_text is None:
        raise SystemExit(f"give --channel and --mover for {args.model}")
    picked = {head(h): [int(c)] for h, c in (part.split(":") for part in channel_text.split(","))}
    mover = head(mover_text)
    w = weights.from_model(model)
    channel = channels.Channel.pick(w, picked, offsets=weights.value_offsets(model))
    data = laundry_list.generate(model, args.prompts, seed=0, lengths=args.length)
    keys = [f"ITEM_{k}" for k in range(args.length)]
    timings = {}
    for shared in (False, True):  # read the coordinates, then traverse a 2 x 2 x 2 grid, as the chapter does
        STORE.clear()  # no pass kept from before
        start = time.perf_counter()
        coords = channel.coefficients(model, data)
        if not shared:
            STORE.clear()
        small = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0])] * coords.shape[1])
        traversal.traverse(model, data, channel, small, mover, keys, progress=False)
        timings[shared] = time.perf_counter() - start
    print(f"read the coordinates, then traverse 8 points: {timings[True]:.1f} s with the read's pass kept for the "
          f"traversal, {timings[False]:.1f} s with a pass each")
    spread = coords.abs().max(0).values * 1.5
    axes = [torch.linspace(-float(s), float(s), args.grid) for s in spread]
    points = torch.cartesian_prod(*axes)
    print(f"{args.model} on {model.device}; torch threads {torch.get_num_threads()}; channel {channel.labels}, "
          f"mover {mover[0]}.{mover[1]}; {len(points)} grid points x {len(data)} prompts of N = {args.length} "
          f"(mean length {float(data.clean.lengths.float().mean()):.0f} tokens)")
    STORE.clear()  # the traversal's time includes its pass over the prompts, as before
    start = time.perf_counter()
    attention = traversal.traverse(model, data, channel, points, mover, keys, progress=False)
    elapsed = time.perf_counter() - start
    rate = len(points) * len(data) / elapsed
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"traversal: {elapsed:.1f} s, {rate:,.0f} grid points x prompts per second, peak RSS {peak:,.0f} MB "
          f"(target: 10 x 10 x 10 on 250 prompts under 300 s)")
    start = time.perf_counter()
    for i in range(args.check):
        replacement = channels.ChannelReplacement(channel, points[i * 37 % len(points)])
        seen = {}

        def record(p, hook):
            seen["p"] = p[:, mover[1]].detach()
            return p

        rows = torch.arange(len(data))
        positions = torch.arange(data.clean.ids.shape[1], device=model.device).expand(len(data), -1)
        with torch.no_grad():
            model.bridge.run_with_hooks(data.clean.ids.to(model.device), fwd_hooks=[
                *replacement.hooks(data, rows, positions), (Read("pattern", mover[0]).name, record)],
                stop_at_layer=mover[0] + 1)
        rows, end = torch.arange(len(data)), data.at("END")
        plain = torch.stack([seen["p"].cpu()[rows, end, data.at(k)] for k in keys], dim=-1)
        diff = float((attention[i * 37 % len(points)] - plain).abs().max())
        print(f"  point {i * 37 % len(points)}: largest difference from the plain hooked forward pass {diff:.1e}")
    if args.check:
        plain_time = (time.perf_counter() - start) / args.check
        print(f"plain hooked forward pass (stopping at the mover): {plain_time:.2f} s per grid point, so "
              f"{plain_time * len(points):.0f} s for the grid ({plain_time * len(points) / elapsed:.0f}x the traversal)")
    print(f"the paper: about 12 hours per dataset on one RTX 3090 (Talking Heads, App. K); this grid took "
          f"{elapsed / 60:.1f} minutes here")


if __name__ == "__main__":
    main()
