"""Benchmark 3D Nearby Attention: dense masked vs blocked (vs flex on GPU), forward + backward.

    python benchmarks/bench_3dna.py --quick                       # 2 CPU cores: minutes (dense is O(N²))
    python benchmarks/bench_3dna.py --device cuda --dtype bfloat16 --shape 16,32,32

Measures, for causal decoder self-attention with bos (the decoder's layout, NÜWA §3.2), one
forward + backward of `nearby_kernels.nearby_attention` with B=1, 8 heads of 64: the best time and the peak
memory of each backend, at the main shape and at T/2, T, 2T frames (how each backend grows).

Peak memory, above what the inputs hold, over a warm-up forward (which builds the mask or plan
from cold) and the first forward + backward: everything the backend needs — its mask or plan,
gathered tiles, kernel scratch, saved activations, output and gradients — counts. On CUDA:
torch.cuda.max_memory_allocated. On CPU there is no allocator counter, so every backend runs in
a fresh subprocess, glibc is told to return freed blocks to the OS (so RSS follows live memory),
and we report the growth of the peak resident set size (VmHWM). Times are the best of at least
MIN_REPEATS further forward + backward runs, timed only once glibc is back in its usual steady
state (the memory call, with every block mmapped, is page-fault bound and never timed).

Timings are only comparable inside one run (these machines are noisy): read `speedup`, the
dense/blocked ratio of this run. The last line is one JSON object, for scripts that compare runs.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nearby_kernels as kernels  # noqa: E402  (after the path set-up, so the script runs from anywhere)

SEED = 0  # the same q, k, v and output gradient in every worker, so outputs can be compared
HEADS, HEAD_SIZE, BATCH = 8, 64, 1  # one fixed setting for every run: B=1, 8 heads × 64
# Time budget per (backend, shape) for timed repeats (at least MIN_REPEATS); the best is reported.
QUICK_BUDGET_S, FULL_BUDGET_S = 1.0, 8.0
MIN_REPEATS, MAX_REPEATS = 3, 10
MiB = 2 ** 20
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (glibc malloc.h)
MEMORY_MMAP_THRESHOLD = 128 * 1024  # glibc's initial threshold: every tensor of note is mmapped
TIMING_MMAP_THRESHOLD = 32 * MiB  # glibc's dynamic threshold maximum on 64-bit, its steady state


def make_inputs(shape, dtype, device):
    """q, k, v (B, nh, N, hs) with gradients, and a fixed upstream gradient, from SEED."""
    generator = torch.Generator().manual_seed(SEED)
    n = shape[0] * shape[1] * shape[2]
    tensors = [torch.randn(BATCH, HEADS, n, HEAD_SIZE, generator=generator) for _ in range(4)]
    q, k, v, grad_out = (t.to(device=device, dtype=dtype) for t in tensors)
    for t in (q, k, v):
        t.requires_grad_(True)
    return q, k, v, grad_out


def run_once(backend, shape, extent, q, k, v, grad_out):
    """One forward + backward, the unit of time and memory measured here."""
    out = kernels.nearby_attention(q, k, v, shape, shape, extent, True, bos=True, backend=backend)
    out.backward(grad_out)
    return out


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc), in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size since the last `reset_peak_rss` (Linux VmHWM), in bytes."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM"))
    return int(line.split()[1]) * 1024  # reported in KiB


def reset_peak_rss() -> None:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def set_mmap_threshold(nbytes: int) -> None:
    """glibc: allocations above nbytes get their own mapping, returned to the OS when freed."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, nbytes)
    libc.mallopt(M_TRIM_THRESHOLD, 2 * nbytes)  # glibc's own pairing when it moves the threshold
    libc.malloc_trim(0)


def measure_shape(backend, shape, extent, dtype, device, budget_s, save_to=None) -> dict:
    """Peak memory of warm-up + first fwd+bwd (mask or plan built from cold), and the best time."""
    cpu = device.type == "cpu"
    sync = (lambda: None) if cpu else torch.cuda.synchronize
    for cached in (kernels._cached_mask, kernels._blocked_plan, kernels._flex_plan):
        cached.cache_clear()  # the warm-up rebuilds the mask or plan, so that memory counts too
    if cpu:
        # RSS follows live memory only if freed blocks go back to the OS: a small fixed mmap
        # threshold does that, so the peak RSS is the peak live memory, not allocator leftovers.
        set_mmap_threshold(MEMORY_MMAP_THRESHOLD)
    q, k, v, grad_out = make_inputs(shape, dtype, device)
    sync()
    if cpu:
        base = current_rss_bytes()
        reset_peak_rss()
    else:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    # Warm-up forward: builds the cached mask or plan (and compiles flex); not timed.
    with torch.no_grad():
        kernels.nearby_attention(q, k, v, shape, shape, extent, True, bos=True, backend=backend)
    # The memory call: the first forward + backward, under the small mmap threshold. It is not
    # timed: with every block mmapped, page faults would make it the slowest call of all.
    out = run_once(backend, shape, extent, q, k, v, grad_out)
    sync()
    peak = (peak_rss_bytes() if cpu else torch.cuda.max_memory_allocated(device)) - base
    if cpu:
        set_mmap_threshold(TIMING_MMAP_THRESHOLD)  # back to glibc's steady state (dynamic max 32 MiB)
    times = []
    while len(times) < MIN_REPEATS or (sum(times) < budget_s and len(times) < MAX_REPEATS):
        q.grad = k.grad = v.grad = None
        sync()
        tick = time.perf_counter()
        out = run_once(backend, shape, extent, q, k, v, grad_out)
        sync()
        times.append(time.perf_counter() - tick)
    if save_to is not None:
        torch.save([t.detach().float().cpu() for t in (out, q.grad, k.grad, v.grad)], save_to)
    # Best of n (the timeit convention): the least disturbed run of a noisy machine.
    return {"time_s": min(times), "peak_mb": peak / MiB, "repeats": len(times)}


def measure_backend(backend, shapes, extent, dtype, device, budget_s, save_to) -> list[dict]:
    """Every shape for one backend; the middle shape's output and gradients go to save_to."""
    # Touch the backend once on a tiny grid first: loading kernels and libraries also grows the
    # resident set, and that one-off cost is not the memory any shape needs.
    tiny = (2, 4, 4)
    run_once(backend, tiny, extent, *make_inputs(tiny, dtype, device))
    return [measure_shape(backend, shape, extent, dtype, device, budget_s, save_to if i == 1 else None)
            for i, shape in enumerate(shapes)]


def measure_in_subprocess(backend, shapes, args, save_to) -> list[dict]:
    """CPU: a fresh process per backend, so one backend's memory never hides another's."""
    command = [sys.executable, __file__, "--worker", backend,
               "--shapes", ";".join(",".join(map(str, s)) for s in shapes), "--extent", args.extent,
               "--dtype", args.dtype, "--device", "cpu", "--save", save_to]
    command += ["--quick"] if args.quick else []
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def max_abs_diff(path_a: str, path_b: str) -> float:
    """Largest difference between two runs over the output and the q, k, v gradients."""
    a, b = torch.load(path_a), torch.load(path_b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="short time budget per measurement (CI, laptops)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--shape", default="10,32,32", help="main (T,H,W); scaling rows use T/2, T, 2T")
    parser.add_argument("--extent", default="2,2,2", help="(e_t,e_h,e_w) radii")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one CPU measurement
    parser.add_argument("--shapes", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    extent = tuple(int(e) for e in args.extent.split(","))
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    budget = QUICK_BUDGET_S if args.quick else FULL_BUDGET_S
    if args.worker:
        shapes = [tuple(int(s) for s in item.split(",")) for item in args.shapes.split(";")]
        print(json.dumps(measure_backend(args.worker, shapes, extent, dtype, device, budget, args.save)))
        return

    backends = ["dense", "blocked"] + (["flex"] if device.type == "cuda" else [])
    # Scaling rows at T/2, T, 2T frames; the middle one is the main row.
    shapes = [(max(1, shape[0] // 2), shape[1], shape[2]), shape, (2 * shape[0], shape[1], shape[2])]
    print(f"3DNA fwd+bwd, causal with bos, extent {extent}, B={BATCH}, {HEADS} heads × {HEAD_SIZE}, "
          f"{args.dtype} on {device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    if device.type == "cpu":
        print(f"load average before: {os.getloadavg()[0]:.2f}; memory = peak RSS growth over the first call")
    else:
        print(f"device: {torch.cuda.get_device_name(device)}; memory = max_memory_allocated growth over "
              "the first call")
    rows = [{"T": s[0], "shape": list(s)} for s in shapes]
    with tempfile.TemporaryDirectory() as folder:
        saved = {backend: os.path.join(folder, f"{backend}.pt") for backend in backends}
        for backend in backends:
            if device.type == "cpu":
                results = measure_in_subprocess(backend, shapes, args, saved[backend])
            else:
                results = measure_backend(backend, shapes, extent, dtype, device, budget, saved[backend])
            for row, result in zip(rows, results):
                row[f"{backend}_s"], row[f"{backend}_peak_mb"] = result["time_s"], result["peak_mb"]
        diffs = {b: max_abs_diff(saved["dense"], saved[b]) for b in backends if b != "dense"}
    main_row = rows[1]

    header = f"{'shape':>12} {'N':>7} " + " ".join(f"{b + ' s':>10} {b + ' MiB':>11}" for b in backends)
    print(header + f" {'speedup':>8} {'mem ratio':>9}")
    for row in rows:
        cells = " ".join(f"{row[b + '_s']:10.3f} {row[b + '_peak_mb']:11.1f}" for b in backends)
        n = row["shape"][0] * row["shape"][1] * row["shape"][2]
        speedup = row["dense_s"] / row["blocked_s"]
        memory_ratio = row["dense_peak_mb"] / row["blocked_peak_mb"]
        print(f"{'x'.join(map(str, row['shape'])):>12} {n:7d} {cells} {speedup:8.2f} {memory_ratio:9.2f}")
    growth = {b: rows[2][f"{b}_s"] / main_row[f"{b}_s"] for b in backends}
    print(f"time growth from T={shape[0]} to T={2 * shape[0]}: "
          + ", ".join(f"{b} {g:.2f}x" for b, g in growth.items()))
    print("max |dense - other| over output and q/k/v gradients: "
          + ", ".join(f"{b} {d:.2e}" for b, d in diffs.items()))
    result = {
        "shape": list(shape), "extent": list(extent), "causal": True, "bos": True,
        "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "dense_s": main_row["dense_s"], "blocked_s": main_row["blocked_s"],
        "speedup": main_row["dense_s"] / main_row["blocked_s"],
        "dense_peak_mb": main_row["dense_peak_mb"], "blocked_peak_mb": main_row["blocked_peak_mb"],
        "memory_ratio": main_row["dense_peak_mb"] / main_row["blocked_peak_mb"],
        "max_abs_diff": max(diffs.values()),
        "growth_2x_frames": growth,
        "scaling": rows,
    }
    if "flex" in backends:
        result["flex_s"] = main_row["flex_s"]
    if device.type == "cpu":
        result["load_avg_after"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
