"""Cached vs uncached NÜWA generation: time for one video, and the cache's memory.

Greedy decoding of one video with the `tiny` preset (untrained weights: speed and equality do not
depend on training). The cached path runs one query per step over a rolling key/value window; the
uncached path recomputes the whole decoder for every token, as the one public re-implementation
does. Both must give identical tokens. The cache's size is then measured for 4 and 16 frames: it
holds only the last e_t + 1 frames, so it must not grow with video length.

    python benchmarks/bench_sampling.py [--quick]

The last line is one JSON object: tokens, cached_s, uncached_s, speedup, identical, plus
cache_bytes_4_frames and cache_bytes_16_frames.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nuwa  # noqa: E402

SEED = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="(T,H,W) = (4,16,16), under a minute on 2 cores")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--side", type=int, default=None, help="tokens per frame side")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    frames = args.frames or (4 if args.quick else 8)
    side = args.side or 16
    torch.manual_seed(SEED)
    print(f"seed {SEED}; device {args.device}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    config = nuwa.NUWAConfig.preset("tiny", token_h=side, token_w=side, max_frames=16)
    model = nuwa.NUWA(config).to(args.device).eval()
    cond = nuwa.text_condition(model.vocabulary, ["digit 3 is moving left then right"])
    shape = (frames, side, side)

    def timed(use_cache: bool):
        start = time.perf_counter()
        tokens = model.generate(cond, shape, temperature=0, use_cache=use_cache)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return tokens, time.perf_counter() - start

    cached, cached_s = timed(True)
    uncached, uncached_s = timed(False)
    result = {"tokens": cached.numel(), "cached_s": round(cached_s, 3), "uncached_s": round(uncached_s, 3),
              "speedup": round(uncached_s / cached_s, 2), "identical": bool(torch.equal(cached, uncached))}
    for n in (4, 16):  # the rolling window: the cache holds the last e_t + 1 frames only
        caches = [model.new_caches()]
        model.generate(cond, (n, side, side), temperature=0, caches=caches)
        result[f"cache_bytes_{n}_frames"] = nuwa.cache_nbytes(caches)
    print(f"{'path':>10} {'seconds':>9}   tokens {result['tokens']} of shape {shape}")
    print(f"{'cached':>10} {cached_s:9.2f}\n{'uncached':>10} {uncached_s:9.2f}")
    print(f"speedup {result['speedup']}x, identical tokens: {result['identical']}")
    print(f"cache bytes: 4 frames {result['cache_bytes_4_frames']}, "
          f"16 frames {result['cache_bytes_16_frames']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
