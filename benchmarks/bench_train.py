"""Training throughput per stage and preset: tokens/s and, on a GPU, model FLOPs utilisation (MFU).

One process runs train.py's own train_step (forward, backward, clip, optimizer step of every phase)
on real Moving MNIST micro-batches, exactly as `python train.py` does, with untrained weights
(speed does not depend on training). NÜWA trains on untrained tokenizers written to a temporary
folder. The first steps are warm-up (allocator, kernels, data caches) and are not timed.

- tokens/s: tokens of the global batch per second of a whole step, data included. A tokenizer
  "token" is one of the h·w codes of a frame; a NÜWA token is one predicted target token.
- FLOPs per step: counted by torch.utils.flop_counter over one whole step (matmuls, convolutions,
  attention kernels as executed: masked attention entries count, so for 3DNA this bounds the useful
  FLOPs from above; CPU attention kernels are not counted).
- MFU: FLOPs per step / step time / the GPU's peak dense bf16 FLOP/s (table below, or --peak-tflops).
  Not reported on a CPU.
- NÜWA trains its preset's whole task mix (T2V, T2I, V2V, S2V, S2I: 21,504 target tokens per tiny step).

    python benchmarks/bench_train.py --quick        # tiny presets, a few steps: ~30 s on 2 busy cores
    python benchmarks/bench_train.py --device cuda  # tiny and small presets
    python benchmarks/bench_train.py --demo --no-bf16 --procs 2 --threads 1  # make demo's NÜWA on 2 CPU cores

The last line is one JSON object: device, torch, processes and `results`, one entry per (stage, preset) with
bf16 (whether the step ran under bf16 autocast, as train.py would run it), tokens_per_step, step_s,
tokens_per_s, flops_per_step, tflops_per_s and mfu (null without a GPU).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

# As in train.py, before torch loads OpenMP: on a busy shared CPU, spinning idle threads made steps
# 10-25x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_learn, for --set
import batches  # noqa: E402
import checkpoints  # noqa: E402
import train  # noqa: E402
import vqgan  # noqa: E402

SEED = 0
# Peak dense bf16 tensor-core FLOP/s from the vendors' data sheets (no sparsity), by device-name part.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for part, tflops in PEAK_BF16_TFLOPS.items() if part in name), None)


# `make demo`'s NÜWA run: the f = 8 cell tokenizer (8×8 tokens per frame), text→video and 10 → 10
# prediction, 4 clips per task per step, no sketch tasks.
DEMO_TOKENIZER = dict(cell_encoder=True, ch_mult=(1, 2, 4, 4))
DEMO_NUWA = dict(token_h=8, token_w=8, batch_size=4, tasks="t2v,v2v", seg_ckpt="")


def untrained_tokenizers(folder: Path, **tokenizer) -> dict[str, str]:
    """NÜWA's frozen frame and sketch tokenizers (the tiny VQ-GAN grid: 16×16 tokens, K = 512)."""
    paths = {}
    for name, seg in (("vqgan_ckpt", False), ("seg_ckpt", True)):
        config = vqgan.VQGANConfig.preset("tiny", seg=seg)
        for field, value in ({} if seg else tokenizer).items():
            setattr(config, field, value)
        paths[name] = str(folder / f"{name}.pt")
        checkpoints.save({"stage": "seg" if seg else "vqgan", "config": checkpoints.config_to_dict(config),
                          "model": vqgan.VQGAN(config).state_dict()}, Path(paths[name]))
    return paths


def measure(stage_name: str, preset: str, device: torch.device, warmup: int, steps: int, overrides: dict,
            bf16: bool = True) -> dict:
    """Median step time of `steps` timed train_steps after `warmup` untimed ones, and one step's FLOPs.
    bf16: autocast wherever train.py would (CUDA; a CPU with bf16 matmuls, for stages that opt in).
    Inside a process group (--procs): this process's share of the global batch, under DDP as train.py
    wraps it; the step time is rank 0's, and the FLOPs are this process's count × W (equal shares)."""
    stage = train.STAGES[stage_name]
    config = stage.preset(preset)
    for name, value in overrides.items():
        setattr(config, name, value)
    torch.manual_seed(SEED)
    model = stage.build(config, device).train()
    objectives = train.StageObjectives(model, stage.phases)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if world > 1:
        # as distributed.wrap_model does
        objectives = DistributedDataParallel(objectives, find_unused_parameters=True)
    optimizers = stage.optimizers(model, config, device)
    autocast = train.autocast_for(stage, device, bf16)

    def one_step(step: int) -> float:
        start = time.perf_counter()
        torch.manual_seed(batches.step_seed(SEED, rank, step))
        batch = train.to_device(stage.batch(config, SEED, step, rank, world), device)
        train.train_step(objectives, model, optimizers, stage.phases, [batch], step=step, config=config,
                         autocast=autocast, ckpt_path=Path("unused"))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    with FlopCounterMode(display=False) as counter:  # the first warm-up step is counted, not timed
        one_step(0)
    for step in range(1, warmup):
        one_step(step)
    times = [one_step(warmup + i) for i in range(steps)]
    step_s = statistics.median(times)
    tokens = stage.tokens_per_batch(config)
    flops = counter.get_total_flops() * world  # every process computes an equal share
    return {"stage": stage_name, "preset": preset, "bf16": autocast is not nullcontext,
            "tokens_per_step": tokens, "step_s": step_s,
            "tokens_per_s": round(tokens / step_s, 1), "flops_per_step": flops,
            "tflops_per_s": round(flops / step_s / 1e12, 4)}


def parse_sets(items: list[str]) -> dict:
    """--set FIELD=VALUE pairs, typed by the NÜWA config field's default (as bench_learn.py types
    them; training fields such as batch_size are allowed here: they change the measured step)."""
    import bench_learn
    import nuwa
    defaults = nuwa.NUWAConfig()
    overrides = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item}: expected FIELD=VALUE")
        if not hasattr(defaults, name):
            raise SystemExit(f"--set {item}: NUWAConfig has no field {name!r}")
        overrides[name] = bench_learn.parse_value(text, getattr(defaults, name))
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny presets, 1 warm-up + 2 timed steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", nargs="+", default=None, help="default: tiny (quick) or tiny small")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 2 quick, 10)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak FLOP/s for MFU")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch; 0 = torch's default")
    parser.add_argument("--demo", action="store_true",
                        help="NÜWA only, at `make demo`'s shapes (f = 8 tokenizer, t2v + v2v, batch 4)")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false",
                        help="float32 throughout, as train.py --no-bf16 "
                             "(default: bf16 autocast where train.py uses it)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a NÜWA config field, e.g. --set backend=dense (repeatable)")
    parser.add_argument("--procs", type=int, default=1,
                        help="processes on this CPU, each on its share of every step's batch under DDP over "
                             "gloo (as `torchrun --nproc_per_node N train.py`, make demo's NÜWA); "
                             "use with --threads")
    args = parser.parse_args()
    if args.procs > 1:
        if args.device != "cpu":
            raise SystemExit("--procs runs CPU processes (gloo); on GPUs start train.py with torchrun")
        port = 29500 + os.getpid() % 1000
        mp.spawn(run_process, args=(args, port), nprocs=args.procs)
    else:
        run(args)


def run_process(rank: int, args: argparse.Namespace, port: int) -> None:
    """One of --procs CPU processes: join the gloo group, measure, leave (rank 0 prints)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.procs)
    try:
        run(args)
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace) -> None:
    main_process = not dist.is_initialized() or dist.get_rank() == 0
    say = print if main_process else (lambda *a, **k: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    presets = args.presets or (["tiny"] if args.quick else ["tiny", "small"])
    warmup, steps = (1, args.steps or 2) if args.quick else (3, args.steps or 10)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as train.py: TF32 tensor cores
    peak = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    say(f"seed {SEED}; device {device} ({name}); torch {torch.__version__}; {torch.get_num_threads()} "
        f"threads; {args.procs} process(es); peak {peak or 'unknown'} TFLOP/s; {warmup} warm-up + {steps} "
        f"timed steps per row")
    results = []
    with tempfile.TemporaryDirectory() as folder:
        nuwa_overrides = untrained_tokenizers(Path(folder), **(DEMO_TOKENIZER if args.demo else {}))
        if args.demo:
            nuwa_overrides.update(DEMO_NUWA)
        nuwa_overrides.update(parse_sets(args.set))
        for preset in presets:
            for stage_name in (("nuwa",) if args.demo else ("vqgan", "nuwa")):
                overrides = nuwa_overrides if stage_name == "nuwa" else {}
                row = measure(stage_name, preset, device, warmup, steps, overrides, args.bf16)
                row["mfu"] = round(row["tflops_per_s"] / peak, 4) if peak else None
                if stage_name == "nuwa":
                    row["settings"] = {k: v for k, v in nuwa_overrides.items() if not k.endswith("ckpt")}
                results.append(row)
                say(f"{stage_name:>6} {preset:>6} {'bf16' if row['bf16'] else 'fp32'}: "
                    f"{row['tokens_per_step']:>7} tokens/step  {row['step_s']:8.3f} s/step"
                    f"  {row['tokens_per_s']:>10.0f} tokens/s  {row['flops_per_step'] / 1e9:9.2f} GFLOP/step"
                    + (f"  MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""))
    say(json.dumps({"device": name, "torch": torch.__version__, "processes": args.procs, "results": results}))




if __name__ == "__main__":
    main()
