"""One training script for every stage of NÜWA-mini, from a laptop CPU to many GPUs.

    python train.py --stage vqgan --preset tiny --max-seconds 300 --out out        # CPU or one GPU
    torchrun --nproc_per_node=8 train.py --stage nuwa --preset small --out out      # DDP, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
        train.py --stage nuwa --preset small --fsdp --out /shared/out              # FSDP2, 2 nodes
    python train.py --stage vqgan --preset tiny -h      # every config field is a flag

Papers: NÜWA (arXiv 2111.12417) trains its tokenizers first (§3.1, VQ-GAN for frames and
VQ-GAN-Seg for sketches) and the 3D transformer on their tokens afterwards (§3.3-3.4); NÜWA-LIP
(arXiv 2202.05009) and NÜWA-Infinity (arXiv 2207.09814) train the same way. This file implements
no equation of its own: stages.py says what each stage optimises (batches, losses, pictures), and
this file runs that optimisation on as many processes as `torchrun` starts — the same file, no
edits (nanoGPT's single-script pattern). How a step is shared out over W processes and A
micro-batches (DDP / FSDP2, accumulation) is distributed.py's; checkpoints are checkpoints.py's.

Sections: 1. run configuration · 2. the training step · 3. stopping · 4. the run (resume, logs,
progress, checkpoints) · 5. the command line, generated from the dataclass fields.

Exact resume, the simplest correct design: nothing random is carried from step to step.
- Data: a step's batch is a pure function of (seed, step, part) (batches.py's data protocol), so
  there is no iterator state to save or restore.
- Randomness inside a step (data-dependent codebook initialisation, dead-code restarts, condition
  dropout) comes from torch's generator reseeded at every step from (seed, rank, step).
So a checkpoint needs only model, optimizers and step; a resumed run computes bit-identical losses
on the CPU (test). The checkpoint stores the seed (in "run"), which with the step *is* the RNG
state. There is no grad-scaler state: bf16 autocast needs no loss scaling.

A run stops at its budget (--max-steps, --max-seconds: whichever comes first), or when it is asked
to: Ctrl-C or SIGTERM finish the current step, write a checkpoint and exit; `--resume` continues.
Without a budget it runs until it is stopped, and says so at the start.

FSDP checkpoints are gathered, not written with torch.distributed.checkpoint (DCP): every rank
takes part in all-gathering the full tensors and rank 0 writes one ordinary ckpt.pt, identical to a
single-process one. Why: sample.py, evaluate.py and the notebooks load that file on a laptop with
weights_only=True, and a run may resume under any mode and number of processes. Our largest model
(the small preset) is tens of MB, so the gather costs nothing. DCP's sharded files become the right
choice only when one process cannot hold the full state in CPU memory (billions of parameters). We
also avoid DCP's get_optimizer_state_dict: it initialises a not-yet-stepped optimizer (VQGAN's
discriminator before disc_start) with a zero-gradient step, which would break bitwise resume.

Glossary: W processes (world size), r rank, A accumulation (micro-batches per process per step),
U units (forward/backward passes per micro-batch), N items per global batch.

Deviations from the papers (and from one-process training):
- Under DDP / FSDP, state that the forward pass changes in place rather than the optimizer (the EMA
  codebook and its counts, BatchNorm statistics) is updated from each process's own micro-batches;
  after every step rank 0's copy is broadcast to the others (DDP's own rule for buffers). The EMA
  codebook update therefore sees rank 0's share of the batch; gradients see all of it.
- VQGAN's adaptive weight λ and the discriminator's BatchNorm statistics are computed per
  micro-batch (as the reference code does per GPU), so for the GAN terms accumulation and more
  processes are not exactly a bigger batch; all other losses are means and decompose exactly.
- The learning rate decays along a cosine over the run's budget (`lr_factor`); VQGAN trains with a
  constant one.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import os
import re
import signal
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

# Set before torch loads OpenMP: idle worker threads sleep instead of spinning. On a shared 2-core CPU
# with another process busy, spinning made a tiny-preset step 25x slower (measured 5.0 s instead of
# 0.3 s per step); an explicit OMP_WAIT_POLICY in the environment still wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import checkpoints  # noqa: E402
import nuwa  # noqa: E402
import runtime  # noqa: E402
from batches import step_seed  # noqa: E402
from distributed import (  # noqa: E402
    Processes,
    accumulation_steps,
    agreed,
    broadcast_in_place_state,
    gathered,
    gradient_sync,
    init_processes,
    load_optimizer_state,
    mean_over_processes,
    wrap_model,
)
from stages import STAGES, Carry, Phase, Stage  # noqa: E402

# ---------------------------------------------------------------------------------------------
# 1. Run configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    out: str = "out"  # run folder: a stage writes <out>/<stage>/ckpt.pt, log.jsonl and pictures
    max_steps: int = 0  # stop after this many optimisation steps; 0 = no step limit
    max_seconds: float = 0.0  # stop after this much training time (a resumed run counts on); 0 = none
    seed: int = 0  # seeds the weights, the data streams and every step's randomness; printed at the start
    device: str = runtime.DEFAULT_DEVICE  # "cpu" or "cuda" (under torchrun: cuda:LOCAL_RANK)
    bf16: bool = True  # bf16 autocast of forward passes on CUDA, and on bf16 CPUs for stages that opt in
    tf32: bool = True  # TF32 tensor cores for float32 matmuls on CUDA (ignored on CPU)
    compile: bool = False  # torch.compile the model (worth it on a GPU; the first steps compile)
    fsdp: bool = False  # under torchrun: shard parameters, gradients and Adam state with FSDP2 instead of DDP
    micro_steps: int = 0  # micro-batches per step over all processes (accumulation); 0 = one per process
    log_every: int = 10  # steps between lines of log.jsonl
    sample_every: int = 500  # steps between reconstruction grids; 0 = only at the end
    ckpt_every: int = 500  # steps between checkpoints; the last step always writes one
    resume: bool = False  # continue from <out>/<stage>/ckpt.pt (same config required)
    lr_schedule: str = "cosine"  # "cosine": decay over the run's budget (steps or seconds); "constant"
    lr_min_ratio: float = 0.1  # the cosine ends at this fraction of the stage config's lr
    threads: int = 0  # CPU threads for torch; 0 = torch's default (one per core). 1 is faster on a busy CPU


# Without a terminal (a log file, a pipe) there is no progress bar: one plain line this often instead.
# Chosen here: a 20-minute run logs 40 lines, a step's seconds are visible in the first one.
PLAIN_PROGRESS_SECONDS = 30.0


def cpu_has_bf16() -> bool:
    """Does this CPU multiply bf16 matrices natively (AVX512-BF16 or AMX)? There bf16 matmuls ran
    4.6× faster than float32 ones (2 cores, 6,912 × 128 × 512); without it bf16 is emulated and slower."""
    # torch.cpu's probes: private, but stable since torch 2.3
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_for(stage: Stage, device: torch.device, bf16: bool) -> Callable[[], Any]:
    """The context that a stage's losses run their forward passes in: bf16 autocast on CUDA, and on a
    CPU with native bf16 matmuls for stages that opt in (Stage.cpu_bf16); otherwise plain float32."""
    if bf16 and (device.type == "cuda" or (device.type == "cpu" and stage.cpu_bf16 and cpu_has_bf16())):
        return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    return nullcontext


def lr_factor(run: TrainConfig, step: int, elapsed: float) -> float:
    """Cosine decay from 1 to lr_min_ratio over whichever budget (max_steps, max_seconds) runs out first.

    DEVIATION (VQGAN §4): VQGAN trains with a constant learning rate. A run of a few minutes ends
    wherever the budget stops it; decaying the rate towards that point lets the last weights settle
    instead of being a noisy sample (tiny tokenizer, 600 steps of 32 frames: frame MSE 6.7 with the
    decay, 9.0 without).
    """
    if run.lr_schedule == "constant":
        return 1.0
    if run.lr_schedule != "cosine":
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {run.lr_schedule!r}")
    progress = max(step / run.max_steps if run.max_steps else 0.0,
                   elapsed / run.max_seconds if run.max_seconds else 0.0)
    return run.lr_min_ratio + (1 - run.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ---------------------------------------------------------------------------------------------
# 2. The training step (shared by every stage)
# ---------------------------------------------------------------------------------------------


class StageObjectives(nn.Module):
    """The model and its phases' losses behind one forward(), the module DDP or FSDP wraps: both
    hang their machinery on forward (DDP prepares its gradient all-reduce, FSDP gathers the
    root's parameters), so every loss — also the discriminator's — must be computed inside one."""

    def __init__(self, model: nn.Module, phases: list[Phase]):
        super().__init__()
        self.model = model
        self.losses = {phase.name: phase.loss for phase in phases}

    def forward(self, batch: Any, *, phase: str, step: int, carry: Carry,
                autocast) -> dict[str, torch.Tensor]:
        return self.losses[phase](self.model, batch, step=step, carry=carry, autocast=autocast)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def check_finite(value: float, what: str, step: int, ckpt_path: Path) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} is {value} at step {step}; stopping before the optimizer step. "
                                 f"The last good checkpoint {ckpt_path} (if any) is kept.")


def clip_gradients(parameters: list, max_norm: float, step: int, ckpt_path: Path) -> float:
    """Scale the gradients to a total norm ≤ max_norm; the norm before (a full tensor under FSDP)."""
    norm = nn.utils.clip_grad_norm_(parameters, max_norm)
    norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    check_finite(norm, "the gradient norm", step, ckpt_path)
    return norm


def train_step(objectives: nn.Module, model: nn.Module, optimizers: dict, phases: list[Phase],
               micro_batches: list, *, step: int, config: Any, autocast, ckpt_path: Path,
               units: int = 1) -> dict[str, float]:
    """One optimisation step on this process's A micro-batches: per phase, forward, loss and backward
    of every micro-batch (gradients averaged over processes on the last), check, clip, step.

    units U > 1 (NÜWA-Infinity's render-and-optimize): each micro-batch is U forward/backward
    passes in sequence — one per patch — sharing the micro-batch's `Carry` (the context pool), with
    carry.unit = u telling the loss which one. Each pass's graph is freed by its backward, so
    memory is that of one unit; the gradients are those of the mean of the U unit losses."""
    A = len(micro_batches)
    carries = [Carry() for _ in micro_batches]  # what a later phase or unit needs from an earlier one
    metrics: dict[str, float] = {}
    for index, phase in enumerate(phases):
        if not phase.active(config, step):
            continue
        optimizer = optimizers[phase.name]
        # set_to_none also drops what an earlier phase's loss left here (gan_loss in D's parameters)
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for i, (batch, carry) in enumerate(zip(micro_batches, carries)):
            for unit in range(units):
                carry.unit = unit
                last = i == A - 1 and unit == units - 1
                with gradient_sync(objectives, enabled=last):  # no_sync() on all but the final backward
                    losses = objectives(batch, phase=phase.name, step=step, carry=carry, autocast=autocast)
                    # Each micro-loss is a mean over an equal-size micro-batch: dividing by A makes the
                    # summed gradients those of the mean over this process's share; DDP / FSDP then
                    # average the W shares. Forgetting the 1/A multiplies the gradient by A.
                    (losses[phase.objective] / (A * units)).backward()
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float() / (A * units)
        phase_metrics = mean_over_processes(sums)  # the logged loss is the mean over the whole global batch
        check_finite(phase_metrics[phase.objective], phase.objective, step, ckpt_path)
        if config.grad_clip > 0:
            norm = clip_gradients(phase.parameters(model), config.grad_clip, step, ckpt_path)
            phase_metrics["grad_norm" if index == 0 else f"{phase.name}_grad_norm"] = norm
        optimizer.step()
        metrics.update(phase_metrics)
    return metrics


# ---------------------------------------------------------------------------------------------
# 3. Stopping: a budget, or a signal
# ---------------------------------------------------------------------------------------------


def budget_line(run: TrainConfig) -> str:
    """What ends the run, said at its start."""
    if not (run.max_steps or run.max_seconds):
        return ("no --max-steps / --max-seconds: runs until stopped (Ctrl-C or SIGTERM writes a checkpoint; "
                "continue with --resume)")
    limits = [f"{run.max_steps} steps"] if run.max_steps else []
    limits += [f"{run.max_seconds:g} s"] if run.max_seconds else []
    first = ", whichever comes first" if len(limits) == 2 else ""
    return f"budget: {' or '.join(limits)}{first} (Ctrl-C or SIGTERM stop earlier, with a checkpoint)"


class StopRequest:
    """SIGTERM (a scheduler's preemption, torchrun shutting down) or Ctrl-C (SIGINT) ask the run to
    stop: the current step finishes, a checkpoint is written, and the process exits with 128 + signal.
    A second Ctrl-C stops at once. The previous handlers come back when the run ends."""

    def __init__(self):
        self.signal: int | None = None
        self.previous = {}
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.previous[signum] = signal.signal(signum, self.handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handlers, nothing to restore
            pass

    def handle(self, signum: int, frame) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


# ---------------------------------------------------------------------------------------------
# 4. The run: resume, logs, progress, checkpoints, and the loop
# ---------------------------------------------------------------------------------------------


def resume_checkpoint(path: Path, stage_name: str, config: Any, stage: Stage) -> dict:
    """The run's own checkpoint, of this stage and written with this config (fields added since it
    was written count with the values it was trained with: `stage.legacy_defaults`)."""
    fix = (f"start the run without --resume, or set --out to the folder of the run to continue "
           f"(it holds {stage_name}/ckpt.pt)")
    checkpoint = checkpoints.read(path, stage=stage_name, fix=fix)
    checkpoints.check_config(path, checkpoint, config, defaults=stage.legacy_defaults)
    return checkpoint


def check_resumed_code_pixels(model: nn.Module, state: dict, path: Path) -> None:
    """A run resumes on the frozen tokenizer it was trained on. A model with pixel codes stores what each
    code looked like (`code_pixels`); `stage.build` has just drawn them again with the tokenizer given
    now. If they differ (that file was trained on since, or is another one), resuming would overwrite the
    new drawing with the old and train on codes that mean something else: refuse instead."""
    for name, drawn in model.state_dict().items():
        is_code_pixels = name.rsplit(".", 1)[-1] == "code_pixels" and name in state
        if is_code_pixels and not nuwa.same_code_pixels(drawn, state[name]):
            raise ValueError(f"cannot resume {path}: its codes drew other pixels ({name}) than those of the "
                             f"tokenizer given now, so that tokenizer is not the one this run was trained on "
                             f"(or it was trained on since). Pass the one recorded in the checkpoint's "
                             f"config, or start a new run in another --out")


def open_log(folder: Path, resume: bool, step: int):
    """log.jsonl, one JSON object per logged step. A resumed run keeps the lines up to its checkpoint
    (a crash may have logged past it)."""
    folder.mkdir(parents=True, exist_ok=True)
    kept = []
    if resume and (folder / "log.jsonl").exists():
        kept = [line for line in open(folder / "log.jsonl") if json.loads(line)["step"] <= step]
    log = open(folder / "log.jsonl", "w")
    log.writelines(kept)
    return log


class Progress:
    """Steps, loss and tokens/s as the run goes: a tqdm bar on a terminal; otherwise (a log file, a
    pipe) one plain line every PLAIN_PROGRESS_SECONDS, so that a log stays readable."""

    def __init__(self, run: TrainConfig, step: int, enabled: bool):
        self.plain = enabled and not runtime.on_terminal()
        self.bar = runtime.progress(total=run.max_steps or None, initial=step, unit="step",
                                    dynamic_ncols=True, enabled=enabled)
        self.last_line = time.perf_counter()

    def update(self, step: int, loss: float, step_seconds: float, tokens_per_s: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", s_per_step=f"{step_seconds:.2f}",
                             tokens_per_s=f"{tokens_per_s:.0f}")
        if self.plain and (step == 1 or time.perf_counter() - self.last_line >= PLAIN_PROGRESS_SECONDS):
            print(f"step {step}: loss {loss:.4f}, {step_seconds:.2f} s/step, {tokens_per_s:.0f} tokens/s",
                  flush=True)
            self.last_line = time.perf_counter()

    def close(self) -> None:
        self.bar.close()


def train(stage_name: str, config: Any, run: TrainConfig) -> Path:
    """Train one stage until max_steps or max_seconds (or a stop signal); returns the checkpoint path."""
    procs = init_processes(run)
    try:
        return train_processes(stage_name, config, run, procs)
    except BaseException as error:
        # Free what the failed frames hold (the DDP wrapper) before the process group goes: a gloo
        # group whose last reference dies inside DDP's C++ Reducer is destroyed while holding
        # Python's lock, and its worker threads may need that lock to finish (a deadlock at exit).
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        if procs.started_group and dist.is_initialized():
            dist.destroy_process_group()


def train_processes(stage_name: str, config: Any, run: TrainConfig, procs: Processes) -> Path:
    """The body of train() on one of the W processes."""
    stage = STAGES[stage_name]
    device, fsdp = procs.device, run.fsdp and dist.is_initialized()
    folder = Path(run.out) / stage_name
    ckpt_path = folder / "ckpt.pt"
    parts, A = accumulation_steps(run, procs.world)
    if run.threads:
        torch.set_num_threads(run.threads)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if run.tf32 else "highest")  # TF32 tensor cores
    say = print if procs.main else (lambda *args, **kwargs: None)
    mode = "FSDP2" if fsdp else "DDP" if dist.is_initialized() else "one process"
    say(f"stage {stage_name}; seed {run.seed}; {mode}, {procs.world} process(es) on {device}; "
        f"{parts} micro-batch(es) per step, {A} per process; {torch.get_num_threads()} CPU threads; "
        f"writing {folder}")
    say(budget_line(run))

    torch.manual_seed(run.seed)  # the same initial weights on every rank
    model = stage.build(config, device)
    step, seconds_before = 0, 0.0
    checkpoint = resume_checkpoint(ckpt_path, stage_name, config, stage) if run.resume else None
    if checkpoint is not None:
        check_resumed_code_pixels(model, checkpoint["model"], ckpt_path)
        model.load_state_dict(checkpoint["model"])  # whole, before any sharding
        step, seconds_before = checkpoint["step"], checkpoint.get("seconds", 0.0)
    if run.compile:
        model.compile()  # compiles forward in place; DDP / FSDP wrap the objectives around it
    objectives = wrap_model(StageObjectives(model, stage.phases), stage, model, procs, run)
    optimizers = stage.optimizers(model, config, device)  # after sharding: FSDP optimizers hold shards
    # The schedule scales the config's learning rates (a checkpoint's param groups hold decayed ones).
    base_lrs = {name: [group["lr"] for group in o.param_groups] for name, o in optimizers.items()}
    if checkpoint is not None:
        for name, optimizer in optimizers.items():
            load_optimizer_state(optimizer, checkpoint["optimizers"][name])
        written_by = checkpoint.get("world", 1)
        say(f"resumed from {ckpt_path} at step {step}"
            + (f" (written by {written_by} processes)" if written_by != procs.world else ""))
    in_place = stage.in_place_state(model)
    units = stage.units(config)  # backward passes per micro-batch (Infinity: one per patch)

    def complete_model() -> nn.Module | None:
        """The whole model on rank 0 for pictures (under FSDP a fresh copy of the gathered weights)."""
        if not fsdp:
            return model if procs.main else None
        state = gathered(model.state_dict())  # collective
        if not procs.main:
            return None
        copy = stage.build(config, device)
        copy.load_state_dict(state)
        return copy

    def checkpoint_now(seconds: float) -> None:
        model_state = gathered(model.state_dict())  # collective under FSDP; a copy on CPU otherwise
        optimizer_states = {n: gathered(o.state_dict()) for n, o in optimizers.items()}
        if procs.main:
            checkpoints.save({"stage": stage_name, "config": checkpoints.config_to_dict(config),
                              "run": asdict(run), "step": step, "seconds": seconds, "world": procs.world,
                              "model": model_state, "optimizers": optimizer_states}, ckpt_path)

    autocast = autocast_for(stage, device, run.bf16)
    log = None  # rank 0 alone writes
    if procs.main:
        checkpoints.remove_stale_temporaries(folder)
        log = open_log(folder, run.resume, step)
    progress = Progress(run, step, enabled=procs.main)
    stop = StopRequest()
    model.train()
    start = time.perf_counter() - seconds_before  # a resumed run counts its earlier training time
    try:
        while True:
            out_of_time = bool(run.max_seconds) and time.perf_counter() - start >= run.max_seconds
            signalled, out_of_time = agreed(stop.signal is not None, out_of_time, device=device)
            if signalled:  # after a whole step: save it, then leave with 128 + the signal's number
                checkpoint_now(time.perf_counter() - start)
                name = signal.Signals(stop.signal).name if stop.signal else "another process's signal"
                say(f"\nstopped by {name} after step {step}; wrote {ckpt_path}; continue with --resume")
                if dist.is_initialized():
                    dist.barrier()  # no rank exits (torchrun would kill the rest) before rank 0 has written
                raise SystemExit(128 + (stop.signal or signal.SIGTERM))
            if out_of_time or (run.max_steps and step >= run.max_steps):
                break
            tick = time.perf_counter()
            torch.manual_seed(step_seed(run.seed, procs.rank, step))  # this step's randomness, resumable
            factor = lr_factor(run, step, tick - start) * stage.warmup(config, step)
            for name, optimizer in optimizers.items():
                for group, base_lr in zip(optimizer.param_groups, base_lrs[name]):
                    group["lr"] = base_lr * factor
            micro_batches = [to_device(stage.batch(config, run.seed, step, procs.rank * A + i, parts), device)
                             for i in range(A)]  # this process's share of the global batch
            metrics = train_step(objectives, model, optimizers, stage.phases, micro_batches, step=step,
                                 config=config, autocast=autocast, ckpt_path=ckpt_path,
                                 units=units)
            broadcast_in_place_state(in_place)
            metrics["lr"] = next(iter(optimizers.values())).param_groups[0]["lr"]
            seconds = time.perf_counter() - tick
            tokens_per_s = stage.tokens_per_batch(config, step) / seconds
            step += 1
            progress.update(step, metrics["loss"], seconds, tokens_per_s)
            if log and (step % run.log_every == 0 or step == 1):
                log.write(json.dumps({"step": step, "time": round(time.perf_counter() - start, 2),
                                      "step_seconds": round(seconds, 4),
                                      "tokens_per_s": round(tokens_per_s, 1), **metrics}) + "\n")
                log.flush()
            if run.sample_every and step % run.sample_every == 0:
                viewable = complete_model()
                if viewable is not None:
                    stage.visualise(viewable, config, folder / f"samples_step{step:06d}.png")
            if run.ckpt_every and step % run.ckpt_every == 0:
                checkpoint_now(time.perf_counter() - start)
        progress.close()
        checkpoint_now(time.perf_counter() - start)
        viewable = complete_model()
        if viewable is not None:
            picture = stage.visualise(viewable, config, folder / "samples.png")
            log.close()
            plot_losses(folder / "log.jsonl", folder / "losses.png")
            say(f"{step} steps in {time.perf_counter() - start:.0f} s; wrote {ckpt_path}, {picture}")
        if dist.is_initialized():
            dist.barrier()
    finally:
        stop.restore()
        progress.close()
        if log and not log.closed:
            log.close()
    return ckpt_path


def plot_losses(log_path: Path, png_path: Path) -> None:
    """Loss curves of every *_loss key in the JSON-lines log, on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(log_path)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in [k for k in rows[-1] if k.endswith("loss")]:
        points = [(r["step"], r[key]) for r in rows if r.get(key, 0) > 0]
        if points:
            ax.plot(*zip(*points), label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# 5. The command line: one flag per dataclass field
# ---------------------------------------------------------------------------------------------


def field_comments(cls: type) -> dict[str, str]:
    """The `# comment` after each field in the dataclass source: the help text of its flag."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+):[^#]*#\s*(.*)", line)
        if match:
            comments[match.group(1)] = match.group(2)
    return comments


def add_dataclass_flags(parser: argparse.ArgumentParser, instance: Any, title: str) -> None:
    """--field_name / --field-name for every field, typed by its default value, defaulting to it."""
    group = parser.add_argument_group(title)
    comments = field_comments(type(instance))
    for f in fields(instance):
        default = getattr(instance, f.name)
        names = sorted({f"--{f.name.replace('_', '-')}", f"--{f.name}"}, key=lambda s: "_" in s)
        help_text = f"{comments.get(f.name, '')} (default: {default})".replace("%", "%%")
        if isinstance(default, bool):
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                               help=help_text)
        elif isinstance(default, tuple):
            group.add_argument(*names, dest=f.name, nargs="+", type=type(default[0]), default=default,
                               help=help_text)
        else:
            group.add_argument(*names, dest=f.name, type=type(default), default=default, help=help_text)


def config_from_flags(cls: type, args: dict) -> Any:
    """The dataclass `cls` from the parsed flags (nargs lists back to tuples)."""
    return cls(**{f.name: tuple(args[f.name]) if isinstance(args[f.name], list) else args[f.name]
                  for f in fields(cls)})


def parse_args(argv: list[str] | None = None) -> tuple[str, Any, TrainConfig]:
    """Two passes: --stage and --preset pick the config whose fields (with the preset's values as
    defaults) become the flags of the second pass, so `-h` shows what a run would use."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--stage", choices=list(STAGES), default="vqgan")
    first.add_argument("--preset", default="tiny")
    known, _ = first.parse_known_args(argv)
    config = STAGES[known.stage].preset(known.preset)
    description = "Train a NÜWA-mini stage (python train.py, or torchrun train.py)."
    parser = argparse.ArgumentParser(description=description, parents=[first])
    add_dataclass_flags(parser, config, f"{type(config).__name__} (preset {known.preset})")
    add_dataclass_flags(parser, TrainConfig(), "TrainConfig (the run)")
    args = vars(parser.parse_args(argv))
    return known.stage, config_from_flags(type(config), args), config_from_flags(TrainConfig, args)


def main(argv: list[str] | None = None) -> None:
    stage, config, run = parse_args(argv)
    train(stage, config, run)


if __name__ == "__main__":
    main()
