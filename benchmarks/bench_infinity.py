"""NÜWA-Infinity's flat cost: time per patch and memory for canvases 1×, 4× and 16× wider than training.

An untrained `tiny` model (speed and memory do not depend on training) generates, greedily and in
the `column` order, one canvas of the training height and 1×, 4×, 16× the training width (64×128,
64×512, 64×2048 px by default). Each width runs in a fresh process, after a warm-up canvas of 1×.

What is measured, per width:
- s_per_patch: wall seconds of the whole generation divided by the number of patches.
- pool_bytes: the most bytes the Nearby Context Pool held (its per-layer keys/values), counted.
- peak_bytes: the most state bytes alive while one patch is made, counted: the pool, plus that
  patch's gathered context and its own keys/values. (Copies inside a patch, the prefix and the
  key/value buffers, are fixed multiples of these.) On CUDA: the allocator's peak instead.
  Not counted: the output token grid (8 bytes a token, O(canvas) by nature) and the weights.
- rss_growth_bytes: growth of the process's peak resident memory (ru_maxrss) during the measured
  canvas over the warm-up's; informational (allocator noise of a few MB), not part of the bar.

The bar (NÜWA-Infinity's claim of a flat cost per patch): time_ratio_Nx and memory_ratio_Nx
(N× width over 1×) ≤ 1.3. The generator is patches.generate; the model is infinity.Infinity.

    python benchmarks/bench_infinity.py [--quick]

The last line is one JSON object: widths, height, patches, s_per_patch, pool_bytes, peak_bytes,
rss_growth_bytes, time_ratio_4x, time_ratio_16x, memory_ratio_4x, memory_ratio_16x, and the set-up.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import infinity as inf  # noqa: E402
import patches  # noqa: E402

SEED = 0
MULTIPLES = (1, 4, 16)  # canvas widths over the training width (NÜWA-Infinity: far wider than training)
BAR = 1.3  # time and memory ratios must stay at or below this


def build(args) -> inf.InfinityConfig:
    return inf.InfinityConfig.preset("tiny", dim=args.dim, layers=args.layers, canvas_height=args.height,
                                     canvas_width=args.width)


def measure(args) -> dict:
    """One width, in this process: warm up on a 1× canvas, then time and count the N× canvas."""
    torch.manual_seed(SEED)
    config = build(args)
    model = inf.Infinity(config).to(args.device).eval()
    f = config.token_px
    warm_up = (1, args.height // f, args.width // f)
    grid_shape = (1, args.height // f, args.child * args.width // f)
    patches.generate(model, warm_up, args.direction, temperature=0)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    best = None
    for _ in range(args.repeats):  # the fastest of the repeats: the machine is shared and noisy
        trace = patches.GenerationTrace()
        start = time.perf_counter()
        tokens = patches.generate(model, grid_shape, args.direction, temperature=0, trace=trace)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        best = seconds if best is None else min(best, seconds)
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    pool_while_making = [0] + trace.pool_bytes[:-1]  # the pool as the patch found it
    counted = max(p + c for p, c in zip(pool_while_making, trace.context_bytes))
    count = len(trace.seconds)  # patches of the canvas
    return {"width": grid_shape[2] * f, "patches": count, "s_per_patch": best / count,
            "pool_bytes": max(trace.pool_bytes), "pool_patches": max(trace.pool_patches),
            "peak_bytes": torch.cuda.max_memory_allocated() - base if cuda else counted,
            "rss_growth_bytes": rss_growth, "output_bytes": tokens.numel() * tokens.element_size()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one run per width: under a minute on 2 cores")
    parser.add_argument("--dim", type=int, default=128, help="model width D (tiny: 128)")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (tiny: 4)")
    parser.add_argument("--height", type=int, default=64, help="training canvas height, px")
    parser.add_argument("--width", type=int, default=128, help="training canvas width, px")
    parser.add_argument("--direction", default="column", choices=patches.DIRECTIONS,
                        help="patch order; column orders are flat in the width")
    parser.add_argument("--device", default="cpu")
    # internal: measure one multiple
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.repeats = 1 if args.quick else 3
    if args.child:
        torch.set_num_threads(1)
        print(json.dumps(measure(args)))
        return
    config = build(args)
    print(f"seed {SEED}; device {args.device}; torch {torch.__version__}; direction {args.direction}; "
          f"model dim {config.dim}, layers {config.layers}, patch {config.patch_size} tokens, "
          f"extent {config.extent}")
    rows = []
    for multiple in MULTIPLES:  # a fresh process per width, so no width inherits another's memory
        command = [sys.executable, __file__, *sys.argv[1:], "--child", str(multiple)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{'canvas px':>12} {'patches':>8} {'ms/patch':>9} {'pool KiB':>9} {'pool patches':>13} "
          f"{'peak KiB':>9} {'RSS growth KiB':>15} {'output KiB':>11}")
    for row in rows:
        print(f"{args.height:>5}×{row['width']:<6} {row['patches']:>8} {1e3 * row['s_per_patch']:>9.1f} "
              f"{row['pool_bytes'] / 1024:>9.0f} {row['pool_patches']:>13} {row['peak_bytes'] / 1024:>9.0f} "
              f"{row['rss_growth_bytes'] / 1024:>15.0f} {row['output_bytes'] / 1024:>11.1f}")
    result = {"widths": [row["width"] for row in rows], "height": args.height,
              "patches": [row["patches"] for row in rows],
              "s_per_patch": [row["s_per_patch"] for row in rows],
              "pool_bytes": [row["pool_bytes"] for row in rows],
              "peak_bytes": [row["peak_bytes"] for row in rows],
              "rss_growth_bytes": [row["rss_growth_bytes"] for row in rows],
              "peak_source": "cuda allocator" if args.device.startswith("cuda") else "counted states",
              "direction": args.direction, "device": args.device, "dim": config.dim, "layers": config.layers}
    for index, multiple in enumerate(MULTIPLES[1:], start=1):
        result[f"time_ratio_{multiple}x"] = rows[index]["s_per_patch"] / rows[0]["s_per_patch"]
        result[f"memory_ratio_{multiple}x"] = rows[index]["peak_bytes"] / rows[0]["peak_bytes"]
    ratios = {k: round(v, 3) for k, v in result.items() if "_ratio_" in k}
    verdict = "flat" if max(ratios.values()) <= BAR else f"NOT flat (bar ≤ {BAR})"
    print(f"ratios over 1×: {ratios} → {verdict}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
