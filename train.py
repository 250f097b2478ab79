"""One training script for every stage of NÜWA-mini, from a laptop CPU to many GPUs.

    python train.py --stage vqgan --preset tiny --max-seconds 300 --out out        # CPU or one GPU
    torchrun --nproc_per_node=8 train.py --stage nuwa --preset small --out out      # DDP, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
        train.py --stage nuwa --preset small --fsdp --out /shared/out              # FSDP2, 2 nodes
    python train.py --stage vqgan --preset tiny -h      # every config field is a flag

Papers: NÜWA (arXiv 2111.12417) trains its tokenizers first (§3.1, VQ-GAN for frames and
VQ-GAN-Seg for sketches) and the 3D transformer on their tokens afterwards (§3.3-3.4), on 64 A100s.
This file implements no equation of its own; it runs the optimisation the modules define, on as
many processes as `torchrun` starts — the same file, no edits (nanoGPT's single-script pattern).

Sections: 1. run configuration · 2. stages — each a config, a builder, a batch function, its
loss phases and a visualiser · 3. the shared training step and loop · 4. the command line,
generated from the dataclass fields. Processes (DDP / FSDP2, accumulation, per-step seeds) and
checkpoints (atomic save, checked load, gathered FSDP shards) live in distributed.py.

How one optimisation step is shared out over W processes and A micro-batches each (the number
of processes changes the speed of a run, not its mathematics): see distributed.py.

Exact resume, the simplest correct design: nothing random is carried from step to step.
- Data: the global batch of step s is items s·N … s·N + N − 1 of the seeded, index-addressable
  Moving MNIST streams (every item is a pure function of (seed, index), data.py), so a process
  builds its micro-batches from (seed, step, part) alone: no iterator state to save or restore.
- Randomness inside a step (data-dependent codebook initialisation, dead-code restarts, condition
  dropout) comes from torch's generator reseeded at every step from (seed, rank, step).
So a checkpoint needs only model, optimizers and step; a resumed run computes bit-identical losses
on the CPU (test). The checkpoint stores the seed (in "run"), which with the step *is* the RNG
state. There is no grad-scaler state: bf16 autocast needs no loss scaling.

FSDP checkpoints are gathered, not written with torch.distributed.checkpoint (DCP): every rank
takes part in all-gathering the full tensors and rank 0 writes one ordinary ckpt.pt, identical to a
single-process one. Why: sample.py, evaluate.py and the notebooks load that file on a laptop with
weights_only=True, and a run may resume under any mode and number of processes. Our largest model
(the small preset) is tens of MB, so the gather costs nothing. DCP's sharded files become the right
choice only when one process cannot hold the full state in CPU memory (billions of parameters). We
also avoid DCP's get_optimizer_state_dict: it initialises a not-yet-stepped optimizer (VQGAN's
discriminator before disc_start) with a zero-gradient step, which would break bitwise resume.

Glossary: B batch, T frames, C channels, H W pixels, h w token grid, K codebook size, W processes
(world size), r rank, A accumulation (micro-batches per process per step), N items per global batch.

Deviations from the papers (and from one-process training):
- Under DDP / FSDP, state that the forward pass changes in place rather than the optimizer (the EMA
  codebook and its counts, BatchNorm statistics) is updated from each process's own micro-batches;
  after every step rank 0's copy is broadcast to the others (DDP's own rule for buffers). The EMA
  codebook update therefore sees rank 0's share of the batch; gradients see all of it.
- VQGAN's adaptive weight λ and the discriminator's BatchNorm statistics are computed per
  micro-batch (as the reference code does per GPU), so for the GAN terms accumulation and more
  processes are not exactly a bigger batch; all other losses are means and decompose exactly.
- NÜWA's task mix gains options the paper does not have (each marked at its line): a curriculum
  (`t2i_steps`, then `start_steps` of the opening-frames task `t2v_start`), V2V scored on its
  predicted half only, and per-task batch sizes.
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
from dataclasses import asdict, dataclass, field, fields
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

import data  # noqa: E402
import infinity  # noqa: E402
import lip  # noqa: E402
import nuwa  # noqa: E402
import vqgan  # noqa: E402
from distributed import (  # noqa: E402
    Processes,
    accumulation_steps,
    agreed,
    broadcast_in_place_state,
    config_to_dict,
    equal_part,
    gathered,
    gradient_sync,
    init_processes,
    load_checkpoint,
    load_optimizer_state,
    mean_over_processes,
    remove_stale_temporaries,
    save_checkpoint,
    step_seed,
    wrap_model,
)

# ---------------------------------------------------------------------------------------------
# 1. Run configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    out: str = "out"  # run folder: a stage writes <out>/<stage>/ckpt.pt, log.jsonl and pictures
    max_steps: int = 0  # stop after this many optimisation steps; 0 = no step limit
    max_seconds: float = 0.0  # stop after this much training time in total (a resumed run counts on); 0 = none
    seed: int = 0  # seeds the weights, the data streams and every step's randomness; printed at the start
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # "cpu" or "cuda" (under torchrun: cuda:LOCAL_RANK)
    bf16: bool = True  # bf16 autocast of forward passes on CUDA, and on CPUs with bf16 matmuls for stages that opt in
    tf32: bool = True  # TF32 tensor cores for float32 matmuls on CUDA (ignored on CPU)
    compile: bool = False  # torch.compile the model (worth it on a GPU; the first steps compile)
    fsdp: bool = False  # under torchrun: shard parameters, gradients and Adam state with FSDP2 instead of DDP
    micro_steps: int = 0  # micro-batches per step over all processes (nanoGPT's gradient accumulation); 0 = one per process
    log_every: int = 10  # steps between lines of log.jsonl
    sample_every: int = 500  # steps between reconstruction grids; 0 = only at the end
    ckpt_every: int = 500  # steps between checkpoints; the last step always writes one
    resume: bool = False  # continue from <out>/<stage>/ckpt.pt (same config required)
    lr_schedule: str = "cosine"  # "cosine": decay over the run's budget (steps or seconds); "constant"
    lr_min_ratio: float = 0.1  # the cosine ends at this fraction of the stage config's lr
    threads: int = 0  # CPU threads for torch; 0 = torch's default (one per core). 1 is faster on a busy CPU


def cpu_has_bf16() -> bool:
    """Does this CPU multiply bf16 matrices natively (AVX512-BF16 or AMX)? There bf16 matmuls ran
    4.6× faster than float32 ones (2 cores, 6,912 × 128 × 512); without it bf16 is emulated and slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu, private but stable since 2.3
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_for(stage: Stage, device: torch.device, bf16: bool) -> Callable[[], Any]:
    """The context that a stage's losses run their forward passes in: bf16 autocast on CUDA, and on a
    CPU with native bf16 matmuls for stages that opt in (Stage.cpu_bf16); otherwise plain float32."""
    if bf16 and (device.type == "cuda" or (device.type == "cpu" and stage.cpu_bf16 and cpu_has_bf16())):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


# ---------------------------------------------------------------------------------------------
# 2. Stages
# ---------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One optimizer's part of a training step: its loss on every micro-batch, then clip and step.
    VQGAN has two (the tokenizer E, B, G, then the discriminator D); NÜWA has one."""

    name: str  # the optimizer's key in the stage's optimizers dict
    loss: Callable[..., dict[str, torch.Tensor]]  # (model, micro-batch, *, step, carry, autocast) → metrics
    parameters: Callable[[nn.Module], list]  # what this optimizer steps, and what is clipped
    objective: str = "loss"  # the metric that is backpropagated
    active: Callable[[Any, int], bool] = lambda config, step: True  # (config, step) → does it run?


@dataclass
class Stage:
    """What differs between stages; the step, the loop, processes, checkpoints and logs are shared.
    A new stage (lip, infinity, classifier) fills in these fields and gets DDP, FSDP, accumulation,
    bf16, exact resume and checkpoints for free."""

    preset: Callable[[str], Any]  # preset name → the stage's config dataclass
    build: Callable[[Any, torch.device], nn.Module]  # (config, device) → model
    optimizers: Callable[[nn.Module, Any, torch.device], dict[str, torch.optim.Optimizer]]
    batch: Callable[[Any, int, int, int, int], Any]  # (config, seed, step, part, parts) → micro-batch (CPU)
    phases: list[Phase]
    visualise: Callable[[nn.Module, Any, Path], Path]  # (model, config, png path) → path written
    tokens_per_batch: Callable[..., int] = field(default=lambda config, step=0: 0)  # (config, step) → global batch, for tokens/s
    warmup: Callable[[Any, int], float] = field(default=lambda config, step: 1.0)  # lr factor on top of the schedule
    fsdp_units: Callable[[nn.Module], list[nn.Module]] = field(default=lambda model: [])  # sharded one by one
    units: Callable[[Any], int] = field(default=lambda config: 1)  # forward/backward passes per micro-batch (patches)
    # Tensors the forward pass changes in place rather than the optimizer: kept whole (never sharded)
    # and broadcast from rank 0 after every step.
    in_place_state: Callable[[nn.Module], list[torch.Tensor]] = field(default=lambda model: list(model.buffers()))
    # Config fields added after older checkpoints were written, with the values those were trained
    # with: --resume compares a checkpoint's config as if it had them.
    legacy_defaults: dict = field(default_factory=dict)
    # bf16 autocast also on a CPU with native bf16 matmuls (`cpu_has_bf16`): only for stages measured to
    # learn as well in it (README, training speed); the others train in float32 on any CPU.
    cpu_bf16: bool = False


class StageObjectives(nn.Module):
    """The model and its phases' losses behind one forward(), the module DDP or FSDP wraps: both
    hang their machinery on forward (DDP prepares its gradient all-reduce, FSDP gathers the
    root's parameters), so every loss — also the discriminator's — must be computed inside one."""

    def __init__(self, model: nn.Module, phases: list[Phase]):
        super().__init__()
        self.model = model
        self.losses = {phase.name: phase.loss for phase in phases}

    def forward(self, batch: Any, *, phase: str, step: int, carry: dict, autocast) -> dict[str, torch.Tensor]:
        return self.losses[phase](self.model, batch, step=step, carry=carry, autocast=autocast)


@functools.lru_cache(maxsize=8)
def moving_clips(split: str, frames: int, digits: int, seed: int) -> data.MovingMNIST:
    return data.MovingMNIST(split, num_frames=frames, num_digits=digits, seed=seed)  # loads MNIST once per process


@functools.lru_cache(maxsize=8)
def captioned_clips(split: str, frames: int, digits: int, seed: int) -> data.CaptionedMovingMNIST:
    return data.CaptionedMovingMNIST(split, num_frames=frames, num_digits=digits, seed=seed)


def linear_warmup(config: Any, step: int) -> float:
    """The transformers' learning-rate factor: from 1 / warmup_steps up to 1 over the first steps."""
    return min(1.0, (step + 1) / max(1, config.warmup_steps))


# --- VQ-GAN and VQ-GAN-Seg (NÜWA §3.1; Esser et al. §3.2) --------------------------------------


def build_tokenizer(config: vqgan.VQGANConfig, device: torch.device) -> vqgan.VQGAN:
    return vqgan.VQGAN(config).to(device)


def tokenizer_optimizers(model: vqgan.VQGAN, config: vqgan.VQGANConfig, device: torch.device) -> dict:
    """Two Adam optimizers: E/B/G ("vqgan") and the discriminator D ("disc")."""
    fused = device.type == "cuda"  # one kernel for all parameters: faster on GPUs
    optimizers = {"vqgan": torch.optim.Adam(model.tokenizer_parameters(), lr=config.lr, betas=config.betas, fused=fused)}
    if model.discriminator is not None:
        optimizers["disc"] = torch.optim.Adam(model.discriminator.parameters(), lr=config.lr, betas=config.betas,
                                              fused=fused)
    return optimizers


def clips_per_step(config: vqgan.VQGANConfig, frames: int) -> int:
    """A tokenizer batch takes `frames_per_clip` frames from each of B / frames_per_clip clips."""
    return max(1, config.batch_size // frames)


def frame_batch(config: vqgan.VQGANConfig, seed: int, step: int, part: int, parts: int) -> torch.Tensor:
    """Micro-batch `part` of step `step`: (B / parts, 1, 64, 64) frames of two-digit Moving MNIST
    training clips s·n … s·n + n − 1 (generated on the fly)."""
    clips = moving_clips("train", config.frames_per_clip, 2, seed)
    per_step = clips_per_step(config, config.frames_per_clip)
    picks = equal_part(per_step, part, parts, f"clips (batch_size / frames_per_clip = {per_step})")
    return torch.cat([clips[(step * per_step + i) % len(clips)]["video"] for i in picks])  # (b, 1, 64, 64)


def sketch_batch(config: vqgan.VQGANConfig, seed: int, step: int, part: int, parts: int) -> torch.Tensor:
    """Micro-batch of one-hot sketch maps (b, 11, 64, 64) from captioned two-digit training clips."""
    clips = captioned_clips("train", max(2, config.frames_per_clip), 2, seed)
    per_step = clips_per_step(config, clips.num_frames)
    picks = equal_part(per_step, part, parts, f"clips (batch_size / frames_per_clip = {per_step})")
    sketches = [clips[(step * per_step + i) % len(clips)]["sketch"] for i in picks]  # each (T, 64, 64)
    return vqgan.sketch_to_onehot(torch.cat(sketches), config.in_channels)  # (b, 11, 64, 64)


def tokenizer_loss(model: vqgan.VQGAN, x: torch.Tensor, *, step: int, carry: dict, autocast) -> dict:
    """E, B, G: rec + codebook + commitment (+ λ·gan) on a micro-batch. The EMA codebook update
    happens inside this forward pass; with EMA the codes are not in the optimizer."""
    with autocast():
        x_rec, losses = model(x, step=step)  # x_rec (b, C, H, W)
    carry["x_rec"] = x_rec.detach()  # the discriminator's fakes: sg[x̂] of this same forward pass
    return losses


def discriminator_loss(model: vqgan.VQGAN, x: torch.Tensor, *, step: int, carry: dict, autocast) -> dict:
    """D: hinge loss on x vs sg[x̂], from the same step on as the GAN term."""
    with autocast():
        return {"disc_loss": model.discriminator_loss(x, carry["x_rec"])}


TOKENIZER_PHASES = [
    Phase("vqgan", tokenizer_loss, lambda model: model.tokenizer_parameters()),
    Phase("disc", discriminator_loss, lambda model: list(model.discriminator.parameters()), objective="disc_loss",
          active=lambda config, step: config.disc_weight > 0 and step >= config.disc_start),
]


def tokenizer_in_place_state(model: vqgan.VQGAN) -> list[torch.Tensor]:
    """The codebook is written by the EMA update, data-dependent init and dead-code restarts."""
    return list(model.quantizer.parameters()) + list(model.buffers())


def tokenizer_fsdp_units(model: vqgan.VQGAN) -> list[nn.Module]:
    """The encoder is one FSDP unit; decoder and D stay in the root unit, because the adaptive
    weight λ differentiates w.r.t. the decoder's last layer, through D, in the middle of the forward
    pass (autograd.grad): that layer must stay gathered, and D's backward hooks must not fire there."""
    return [model.encoder]


VISUAL_CLIPS, VISUAL_FRAMES = 4, 10  # reconstruction grids: 4 fixed held-out clips, 10 frames each


@torch.no_grad()
def visualise_frames(model: vqgan.VQGAN, config: vqgan.VQGANConfig, path: Path) -> Path:
    """PNG: rows alternate a fixed Moving MNIST test clip and its reconstruction decode(encode(x))."""
    clips = data.MovingMNIST("test", num_frames=VISUAL_FRAMES, num_digits=2, length=VISUAL_CLIPS)
    video = torch.stack([clips[i]["video"] for i in range(VISUAL_CLIPS)])  # (4, T, 1, 64, 64)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rec = model.decode_video(model.encode_video(video.to(device))).float().clamp(0, 1).cpu()  # (4, T, 1, 64, 64)
    model.train(was_training)
    rows = [clip for pair in zip(video, rec) for clip in pair]
    return data.save_grid(rows, path, captions=[t for _ in range(VISUAL_CLIPS) for t in ("input", "reconstruction")])


@torch.no_grad()
def visualise_sketches(model: vqgan.VQGAN, config: vqgan.VQGANConfig, path: Path) -> Path:
    """PNG: rows alternate held-out sketch maps and their VQ-GAN-Seg reconstructions (class / 10 as grey)."""
    clips = data.CaptionedMovingMNIST("heldout", num_frames=VISUAL_FRAMES, num_digits=2, length=VISUAL_CLIPS)
    sketch = torch.stack([clips[i]["sketch"] for i in range(VISUAL_CLIPS)])  # (4, T, 64, 64)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rec = model.decode_sketch(model.encode_sketch(sketch.to(device))).cpu()  # (4, T, 64, 64)
    model.train(was_training)
    scale = float(vqgan.NUM_SKETCH_CLASSES - 1)  # class c drawn as grey level c / 10
    rows = [clip.float() / scale for pair in zip(sketch, rec) for clip in pair]
    return data.save_grid(rows, path, captions=[t for _ in range(VISUAL_CLIPS) for t in ("sketch", "reconstruction")])


def tokens_per_frame_batch(config: vqgan.VQGANConfig, step: int = 0) -> int:
    h, w = config.token_shape
    return config.batch_size * h * w


# --- NÜWA (§3.3-3.4): multi-task training of the 3D encoder-decoder on frozen tokenizers -------

# text→image/video, video prediction, sketch→image/video, and t2v_start: the opening frames of text→video
NUWA_TASKS = ("t2i", "t2v", "v2v", "s2i", "s2v", "t2v_start")


def nuwa_tasks(config: nuwa.NUWAConfig) -> list[str]:
    tasks = [t for t in config.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(NUWA_TASKS))
    if unknown or not tasks:
        raise ValueError(f"unknown or no NÜWA task(s) {unknown or tasks}; choose from {list(NUWA_TASKS)}")
    if any(t.startswith("s2") for t in tasks) and not config.seg_ckpt:
        raise ValueError("sketch tasks need a VQ-GAN-Seg checkpoint: set --seg-ckpt or drop s2i/s2v from --tasks")
    if config.v2v_batch_size < 0:
        raise ValueError(f"v2v_batch_size must be ≥ 0 (0 = batch_size), got {config.v2v_batch_size}")
    if min(config.start_batch_size, config.mix_start_batch_size) < 0 or not 1 <= config.start_frames <= config.frames:
        raise ValueError(f"t2v_start needs 1 ≤ start_frames ≤ frames ({config.frames}), start_batch_size ≥ 0 "
                         f"(0 = batch_size) and mix_start_batch_size ≥ 0 (0 = start_batch_size); got "
                         f"start_frames={config.start_frames}, start_batch_size={config.start_batch_size}, "
                         f"mix_start_batch_size={config.mix_start_batch_size}")
    if config.start_steps < 0:
        raise ValueError(f"start_steps must be ≥ 0, got {config.start_steps}")
    if config.t2i_steps < 0 or (config.t2i_steps and "t2i" not in tasks):
        raise ValueError(f"t2i_steps={config.t2i_steps} needs t2i among the tasks ({config.tasks!r}) and must be ≥ 0")
    return tasks


def nuwa_phase(config: nuwa.NUWAConfig, step: int) -> str:
    """The curriculum phase of step `step` (our option, not the paper's): "t2i", text→image alone for
    the first t2i_steps steps (draw a digit); "start", the opening frames (t2v_start) alone for
    start_steps steps (draw it and move it where the caption says first); then "mix", all `tasks`."""
    if step < config.t2i_steps:
        return "t2i"
    return "start" if step < config.t2i_steps + config.start_steps else "mix"


def nuwa_step_tasks(config: nuwa.NUWAConfig, step: int) -> list[str]:
    """The tasks of step `step`: its phase's (nuwa_phase)."""
    return {"t2i": ["t2i"], "start": ["t2v_start"]}.get(nuwa_phase(config, step)) or nuwa_tasks(config)


@functools.lru_cache(maxsize=4)
def frozen_tokenizer(path: str, device: str, codebook_size: int, token_shape: tuple[int, int]) -> vqgan.VQGAN:
    """A trained VQ-GAN / VQ-GAN-Seg, frozen: NÜWA is trained on its tokens (§3.1 then §3.3)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"tokenizer checkpoint {path} not found; train it first "
                                f"(python train.py --stage vqgan / --stage seg) or pass its path")
    model = vqgan.load_vqgan(path, map_location=device).to(device).eval().requires_grad_(False)
    if model.codebook_size != codebook_size or model.config.token_shape != token_shape:
        raise ValueError(f"{path} gives {model.codebook_size} codes on a {model.config.token_shape} grid, but the "
                         f"NÜWA config expects {codebook_size} codes on {token_shape}: set --codebook-size / "
                         f"--sketch-codebook-size / --token-h / --token-w to match")
    return model


def build_nuwa(config: nuwa.NUWAConfig, device: torch.device) -> nuwa.NUWA:
    nuwa_tasks(config)  # fail on a bad task list before any work
    model = nuwa.NUWA(config).to(device)
    if config.pixel_codes:  # what each code looks like, from the tokenizer NÜWA is trained on
        frames = frozen_tokenizer(config.vqgan_ckpt, str(device), config.codebook_size, (config.token_h, config.token_w))
        model.set_code_pixels(frames.code_patches())
    return model


def nuwa_optimizers(model: nuwa.NUWA, config: nuwa.NUWAConfig, device: torch.device) -> dict:
    """AdamW with weight decay on matrices only (the usual transformer practice); fused on GPUs."""
    groups = nuwa.parameter_groups(model, config.weight_decay)
    return {"nuwa": torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), fused=device.type == "cuda")}


def nuwa_batch(config: nuwa.NUWAConfig, seed: int, step: int, part: int, parts: int) -> dict:
    """Micro-batch {task: pixel batch} of step `step`. The caption/sketch tasks share the step's
    captioned clips (an image task uses one frame t of them, drawn from (seed, step) so that every
    micro-batch and rank uses the same t); V2V uses two-digit Moving MNIST clips."""
    tasks, B = nuwa_step_tasks(config, step), config.batch_size
    picks = equal_part(B, part, parts, "clips per task (batch_size)")
    captioned = captioned_clips("train", config.frames, config.num_digits, seed)
    clips = data.collate([captioned[(step * B + i) % len(captioned)] for i in picks])
    frame_pick = torch.Generator().manual_seed(step_seed(seed, 0, step))
    t = int(torch.randint(config.frames, (1,), generator=frame_pick))  # the image tasks' frame
    batch = {
        "t2i": {"video": clips["video"][:, t:t + 1], "caption": clips["caption"]},
        "t2v": {"video": clips["video"], "caption": clips["caption"]},
        "s2i": {"video": clips["video"][:, t:t + 1], "sketch": clips["sketch"][:, t:t + 1]},
        "s2v": {"video": clips["video"], "sketch": clips["sketch"]},
    }
    if "v2v" in tasks:
        moving, B_v = moving_clips("train", config.predict_frames, 2, seed), v2v_clips(config)
        v2v_picks = equal_part(B_v, part, parts, "V2V clips (v2v_batch_size)")
        batch["v2v"] = {"video": torch.stack([moving[(step * B_v + i) % len(moving)]["video"] for i in v2v_picks])}
    if "t2v_start" in tasks:
        # OUR ADDITION (not in NÜWA §3.4): more clips through the opening frames. Where a digit goes
        # first is written only in the caption ("left then right" or "right then left"), and only the
        # first moving frame shows it: a 10-frame clip scores that choice in about 1 of its 640
        # tokens, and the tiny model never learned it (flipping every direction word of a caption
        # left the loss unchanged). The decoder is causal, so a clip's first start_frames frames
        # under the whole clip's caption score exactly the first terms of its text→video loss: this
        # weights the opening frames more, without changing the model. Clips from a second stream.
        B_s = start_clips(config, step)
        start_picks = equal_part(B_s, part, parts, "t2v_start clips (start_batch_size, or mix_start_batch_size in the mix)")
        offset = len(captioned) // 2
        opening = data.collate([captioned[(offset + step * B_s + i) % len(captioned)] for i in start_picks])
        batch["t2v_start"] = {"video": opening["video"][:, :config.start_frames], "caption": opening["caption"]}
    return {task: batch[task] for task in tasks}


def nuwa_condition(model: nuwa.NUWA, task: str, batch: dict) -> nuwa.Condition:
    """The encoder's input for a task: caption, sketch tokens, or "None" (video prediction)."""
    if task in ("t2i", "t2v", "t2v_start"):
        return nuwa.text_condition(model.tokenizer, batch["caption"])
    if task in ("s2i", "s2v"):
        config = model.config
        seg = frozen_tokenizer(config.seg_ckpt, str(model.bos.device), config.sketch_codebook_size,
                               (config.token_h, config.token_w))
        return nuwa.sketch_condition(seg.encode_sketch(batch["sketch"]))
    return nuwa.none_condition(model.tokenizer, batch["video"].shape[0])


def nuwa_loss(model: nuwa.NUWA, batch: dict, *, step: int, carry: dict, autocast) -> dict:
    """NÜWA §3.4: L = Σ_tasks CE(next token), summed over the tasks of the mix (each a mean over
    its b·N scored target tokens, b·N/2 for V2V on its predicted half; equal micro-batches score
    equally many, so the micro-batch means decompose exactly)."""
    config = model.config
    frames = frozen_tokenizer(config.vqgan_ckpt, str(model.bos.device), config.codebook_size,
                              (config.token_h, config.token_w))
    losses = {}
    for task, task_batch in batch.items():
        with torch.no_grad():
            targets = frames.encode_video(task_batch["video"])  # (b, T, h, w)
            cond = nuwa_condition(model, task, task_batch)
        loss_mask = None
        if task == "v2v" and not config.v2v_loss_on_given:
            # DEVIATION (NÜWA §3.4 sums the loss over every target token): the given half is always
            # given at test time, so only the predicted half is trained; the model's capacity and
            # gradient go to continuing motion instead of drawing frame 0 from nothing.
            loss_mask = torch.zeros_like(targets, dtype=torch.bool)  # (b, T, h, w)
            loss_mask[:, config.predict_frames // 2:] = True
        with autocast():
            losses[f"{task}_loss"] = model.loss(cond, targets, loss_mask)
    losses["loss"] = sum(losses.values())
    return losses


VISUAL_CAPTIONS = ["digit 3 is moving up then down", "digit 4 is moving left then right"]  # seen combinations


@torch.no_grad()
def visualise_nuwa(model: nuwa.NUWA, config: nuwa.NUWAConfig, path: Path) -> Path:
    """PNG (+ GIF): text→video for two captions, then 10 → 10 prediction of a held-out clip
    (the given frames are the tokenizer's reconstruction; the rest is sampled); text→image when
    the run trains no video task."""
    device = model.bos.device
    frames = frozen_tokenizer(config.vqgan_ckpt, str(device), config.codebook_size, (config.token_h, config.token_w))
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(0)
    rows, labels = [], []
    if "t2v" in config.tasks:
        tokens = nuwa.text_to_video(model, VISUAL_CAPTIONS, config.frames, temperature=1.0, top_k=16,
                                    generator=generator)
        rows += list(frames.decode_video(tokens).float().clamp(0, 1).cpu())
        labels += VISUAL_CAPTIONS
    if "v2v" in config.tasks:
        video = data.MovingMNIST("test", num_frames=config.predict_frames, length=1)[0]["video"][None]
        given = config.predict_frames // 2
        tokens = nuwa.predict_video(model, frames.encode_video(video.to(device))[:, :given], config.predict_frames,
                                    temperature=1.0, top_k=16, generator=generator)
        rows += [video[0], frames.decode_video(tokens).float().clamp(0, 1).cpu()[0]]
        labels += ["real clip", f"first {given} frames given, rest predicted"]
    if "t2i" in config.tasks and not rows:  # an image-only run (e.g. --tasks t2i): one frame per caption
        tokens = nuwa.text_to_image(model, VISUAL_CAPTIONS, temperature=1.0, top_k=16, generator=generator)
        rows += list(frames.decode_video(tokens).float().clamp(0, 1).cpu())
        labels += VISUAL_CAPTIONS
    model.train(was_training)
    if not rows:  # sketch-image tasks only: nothing here draws them (sample.py s2i does)
        return Path(path)
    data.save_gif(rows, Path(path).with_suffix(".gif"), captions=labels)
    return data.save_grid(rows, path, captions=labels, max_frames=config.predict_frames)


def nuwa_tokens_per_batch(config: nuwa.NUWAConfig, step: int = 0) -> int:
    per_frame = config.token_h * config.token_w
    lengths = {"t2i": 1, "s2i": 1, "t2v": config.frames, "s2v": config.frames, "v2v": config.predict_frames,
               "t2v_start": config.start_frames}
    clips = {"v2v": v2v_clips(config), "t2v_start": start_clips(config, step)}
    return per_frame * sum(lengths[t] * clips.get(t, config.batch_size) for t in nuwa_step_tasks(config, step))


def v2v_clips(config: nuwa.NUWAConfig) -> int:
    """V2V clips per step: its own v2v_batch_size, or batch_size like every other task."""
    return config.v2v_batch_size or config.batch_size


def start_clips(config: nuwa.NUWAConfig, step: int = 0) -> int:
    """t2v_start clips in step `step`: start_batch_size (or batch_size) in its own phase; in the mix
    after it, mix_start_batch_size when set. The opening frames alone need many clips a step (which
    way a caption sends its digit is one token in a clip's 128); in the mix they are most of a step's
    tokens (32 two-frame clips: 4,096 of the make models step's 6,912), and fewer leave more steps
    for whole clips."""
    own = config.start_batch_size or config.batch_size
    return (config.mix_start_batch_size or own) if nuwa_phase(config, step) == "mix" else own


# --- NÜWA-LIP (arXiv 2202.05009): DF-VQGAN (§3.1), then MP-S2S on its frozen tokens (§3.2-3.3) ---


def build_dfvqgan(config: lip.DFVQGANConfig, device: torch.device) -> lip.DFVQGAN:
    """A DF-VQGAN, optionally starting from a trained plain VQGAN (`init_vqgan`): same parameter names."""
    model = lip.DFVQGAN(config)
    if config.init_vqgan:
        plain = vqgan.load_vqgan(config.init_vqgan)
        try:
            model.load_state_dict(plain.state_dict())
        except RuntimeError as error:
            raise ValueError(f"--init-vqgan {config.init_vqgan} is a VQGAN of another shape than this DF-VQGAN "
                             f"(set the same --ch, --ch-mult, --codebook-size, ... or drop --init-vqgan): {error}") from error
    return model.to(device)


def dfvqgan_batch(config: lip.DFVQGANConfig, seed: int, step: int, part: int, parts: int) -> dict:
    """The vqgan stage's frames, each with a mask from LIP's mix (none, all missing, random boxes) and
    a skip gate (decode with the symmetrical connections or without), drawn from (seed, step, frame)."""
    x = frame_batch(config, seed, step, part, parts)  # (b, 1, 64, 64)
    b = len(x)
    streams = [lip.item_rng(seed, step, part * b + i) for i in range(b)]  # frame i of the global batch
    masks = torch.stack([lip.tokenizer_training_mask(rng, config) for rng in streams])  # (b, 1, 64, 64)
    gates = torch.tensor([bool(rng.random() < config.skip_prob) for rng in streams])  # (b,)
    return {"x": x, "mask": masks, "use_skips": gates}


def dfvqgan_loss(model: lip.DFVQGAN, batch: dict, *, step: int, carry: dict, autocast) -> dict:
    """E, B, G: rec + codebook + commitment (+ λ·gan), masked encoding, skips where gated."""
    with autocast():
        x_rec, losses = model(batch["x"], batch["mask"], use_skips=batch["use_skips"], step=step)
    carry["x_rec"] = x_rec.detach()
    return losses


def dfvqgan_disc_loss(model: lip.DFVQGAN, batch: dict, *, step: int, carry: dict, autocast) -> dict:
    with autocast():
        return {"disc_loss": model.discriminator_loss(batch["x"], carry["x_rec"])}


@torch.no_grad()
def visualise_dfvqgan(model: lip.DFVQGAN, config: lip.DFVQGANConfig, path: Path) -> Path:
    """PNG: per held-out frame, the frame, its masked version, and decode(encode(masked)) with and without skips."""
    clips = data.MovingMNIST("test", num_frames=1, num_digits=2, length=VISUAL_CLIPS)
    x = torch.stack([clips[i]["video"][0] for i in range(VISUAL_CLIPS)])  # (4, 1, 64, 64)
    mask = torch.stack([data.random_box_mask(lip.item_rng(0, 0, i)) for i in range(VISUAL_CLIPS)])  # (4, 1, 64, 64)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    masked = x.masked_fill(mask, 0.0).to(device)
    indices, skips = model.encode(masked, mask.to(device))
    with_skips = model.decode(indices, skips, mask.to(device)).float().clamp(0, 1).cpu()  # (4, 1, 64, 64)
    without = model.decode(indices).float().clamp(0, 1).cpu()
    model.train(was_training)
    rows = [torch.stack(r) for r in zip(x, masked.cpu() + 0.5 * mask, with_skips, without)]  # (4, 1, 64, 64) each
    return data.save_grid(rows, path, captions=["frame | masked (grey = missing) | with skips | without skips"]
                          + [""] * (VISUAL_CLIPS - 1))


@functools.lru_cache(maxsize=2)
def frozen_dfvqgan(path: str, device: str) -> lip.DFVQGAN:
    """The trained DF-VQGAN, frozen: MP-S2S learns its tokens (LIP §3.1 then §3.2)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"DF-VQGAN checkpoint {path} not found; train it first "
                                f"(python train.py --stage dfvqgan) or pass --dfvqgan-ckpt")
    return lip.load_dfvqgan(path, map_location=device).requires_grad_(False)


def build_lip(config: lip.LIPConfig, device: torch.device) -> lip.MPS2S:
    model = lip.MPS2S(config).to(device)
    if not (config.pixel_codes or config.init_nuwa):
        return model
    tokenizer = frozen_dfvqgan(config.dfvqgan_ckpt, str(device))
    lip.check_pair(config, tokenizer.config)
    if config.pixel_codes:  # what each code looks like, drawn by the frozen DF-VQGAN's decoder
        model.set_code_pixels(tokenizer.code_patches())
    if config.init_nuwa:  # our option: the caption → frame path of a NÜWA trained on the same tokens
        source = nuwa.load_nuwa(config.init_nuwa, map_location=device)
        if not tokenizer.config.freeze_tokens or Path(source.config.vqgan_ckpt).resolve() != \
                Path(tokenizer.config.init_vqgan).resolve():
            raise ValueError(f"--init-nuwa needs the DF-VQGAN to give that NÜWA's tokens: train it with "
                             f"--init-vqgan {source.config.vqgan_ckpt} --freeze-tokens (this one: init_vqgan="
                             f"{tokenizer.config.init_vqgan!r}, freeze_tokens={tokenizer.config.freeze_tokens})")
        lip.init_from_nuwa(model, source)
    return model


def lip_batch(config: lip.LIPConfig, seed: int, step: int, part: int, parts: int) -> dict:
    """The nuwa stage's t2i frames and captions (the same clips, the same frame t of step `step`), each
    with a training mask (LIP boxes, half of the digit, half of the frame) drawn from (seed, step, item)."""
    B = config.batch_size
    picks = equal_part(B, part, parts, "frames (batch_size)")
    captioned = captioned_clips("train", config.frames, config.num_digits, seed)
    clips = data.collate([captioned[(step * B + i) % len(captioned)] for i in picks])
    frame_pick = torch.Generator().manual_seed(step_seed(seed, 0, step))
    t = int(torch.randint(config.frames, (1,), generator=frame_pick))  # as nuwa_batch draws it
    frames = clips["video"][:, t]  # (b, 1, 64, 64)
    masks = torch.stack([lip.training_mask(frame, lip.item_rng(seed, step, i), config.box_mask_prob,
                                           config.half_digit_prob) for frame, i in zip(frames, picks)])  # (b, 1, 64, 64)
    return {"image": frames, "mask": masks, "caption": clips["caption"]}


def lip_loss(model: lip.MPS2S, batch: dict, *, step: int, carry: dict, autocast) -> dict:
    """LIP §3.3: cross-entropy on the hole tokens of the frozen DF-VQGAN's tokens of the whole frame.
    The mean is over the micro-batch's hole tokens, whose number varies: with accumulation the step
    weighs micro-batches equally, not tokens (a mean of means; exact with one micro-batch)."""
    tokenizer = frozen_dfvqgan(model.config.dfvqgan_ckpt, str(model.bos.device))
    lip.check_pair(model.config, tokenizer.config)
    with torch.no_grad():
        tokens, _ = tokenizer.encode(batch["image"], batch["mask"])  # (b, h, w): the targets
        hole = lip.token_mask(batch["mask"], tokens.shape[-2:])  # (b, h, w)
    text = model.tokenizer.encode(batch["caption"]).to(tokens.device)  # (b, L)
    with autocast():
        loss = model.loss(text, tokens, hole, batch["image"], batch["mask"])
    return {"loss": loss, "hole_fraction": hole.float().mean()}


@torch.no_grad()
def visualise_lip(model: lip.MPS2S, config: lip.LIPConfig, path: Path) -> Path:
    """PNG: four held-out one-digit frames, half of each digit missing, inpainted under their captions."""
    tokenizer = frozen_dfvqgan(config.dfvqgan_ckpt, str(model.bos.device))
    clips = data.CaptionedMovingMNIST("heldout", num_frames=2, num_digits=1, length=VISUAL_CLIPS)
    items = [clips[i] for i in range(VISUAL_CLIPS)]
    image = torch.stack([item["video"][0] for item in items])  # (4, 1, 64, 64)
    mask = torch.stack([lip.half_digit_mask(frame, lip.SIDES[i % 4]) for i, frame in enumerate(image)])
    was_training = model.training
    model.eval()
    result, _ = lip.inpaint(model, tokenizer, image, mask, [item["caption"] for item in items], top_k=16,
                            generator=torch.Generator(device=model.bos.device).manual_seed(0))
    model.train(was_training)
    rows = [torch.stack(r) for r in zip(image, image.masked_fill(mask, 0.0) + 0.5 * mask, result.cpu())]
    return data.save_grid(rows, path, captions=[item["caption"] for item in items])


DFVQGAN_STAGE = Stage(preset=lip.DFVQGANConfig.preset, build=build_dfvqgan, optimizers=tokenizer_optimizers,
                      batch=dfvqgan_batch, phases=[
                          Phase("vqgan", dfvqgan_loss, lambda model: model.tokenizer_parameters()),
                          Phase("disc", dfvqgan_disc_loss, lambda model: list(model.discriminator.parameters()),
                                objective="disc_loss",
                                active=lambda config, step: config.disc_weight > 0 and step >= config.disc_start)],
                      visualise=visualise_dfvqgan, tokens_per_batch=tokens_per_frame_batch,
                      in_place_state=tokenizer_in_place_state,
                      fsdp_units=lambda model: [])  # the masked passes call the encoder's layers, not encoder.forward
LIP_STAGE = Stage(preset=lip.LIPConfig.preset, build=build_lip,
                  optimizers=lambda model, config, device: {"lip": nuwa_optimizers(model, config, device)["nuwa"]},
                  batch=lip_batch, phases=[Phase("lip", lip_loss, lambda model: list(model.parameters()))],
                  visualise=visualise_lip, tokens_per_batch=lambda config, step=0: config.batch_size * config.token_h * config.token_w,
                  warmup=linear_warmup,
                  fsdp_units=lambda model: [*model.text_encoder, *model.token_encoder, *model.pixel_encoder,
                                            *model.decoder])


# --- NÜWA-Infinity (arXiv 2207.09814 §3.4): render-and-optimize, one unit per patch -------------


def infinity_tokenizer(config: infinity.InfinityConfig, device: torch.device) -> vqgan.VQGAN:
    """The frozen frame VQ-GAN whose codes Infinity predicts; convolutional, so it tokenizes 64×W canvases."""
    frame_tokens = data.CANVAS // config.token_px
    return frozen_tokenizer(config.vqgan_ckpt, str(device), config.codebook_size, (frame_tokens, frame_tokens))


def build_infinity(config: infinity.InfinityConfig, device: torch.device) -> infinity.Infinity:
    infinity.training_directions(config)  # fail on a bad direction list before any work
    if Path(config.vqgan_ckpt).exists():  # a tokenizer of another f: say which flag fixes it
        f = vqgan.load_vqgan(config.vqgan_ckpt).config.downsample
        if f != config.token_px:
            raise ValueError(f"{config.vqgan_ckpt} has f = {f} px per token, but the Infinity config has token_px "
                             f"{config.token_px}: pass --token-px {f} (and a --patch-size that cuts "
                             f"{data.CANVAS // f}×{data.CANVAS // f} tokens), or the f = {config.token_px} tokenizer")
    model = infinity.Infinity(config).to(device)
    if config.pixel_codes:  # what each code of the frozen tokenizer looks like (pixel code embeddings)
        model.set_code_pixels(infinity_tokenizer(config, device).code_patches())
    return model


def infinity_batch(config: infinity.InfinityConfig, seed: int, step: int, part: int, parts: int) -> dict:
    """Canvases (or clips) of step `step`, and the seed that, with the step, draws the step's order."""
    return {**infinity.training_batch(config, seed, step, part, parts), "seed": seed}


def infinity_loss(model: infinity.Infinity, batch: dict, *, step: int, carry: dict, autocast) -> dict:
    """Unit u of a micro-batch is patch u of the step's order (§3.4): the loss of that patch given
    its pooled, detached context. Unit 0 tokenizes the canvases and opens the pool; both stay in
    `carry` for the later units, and each unit's backward frees its graph before the next patch."""
    if carry["unit"] == 0:
        with torch.no_grad():
            carry["tokens"] = infinity_tokenizer(model.config, model.bos.device).encode_video(batch["pixels"])
    with autocast():
        loss = infinity.unit_loss(model, carry["tokens"], batch["caption"], unit=carry["unit"], carry=carry,
                                  seed=batch["seed"], step=step)
    return {"loss": loss}


def infinity_optimizers(model: infinity.Infinity, config: infinity.InfinityConfig, device: torch.device) -> dict:
    """The same AdamW as NÜWA's (decay on matrices only), under the phase's name."""
    return {"infinity": nuwa_optimizers(model, config, device)["nuwa"]}


def visualise_infinity(model: infinity.Infinity, config: infinity.InfinityConfig, path: Path) -> Path:
    return infinity.visualise(model, infinity_tokenizer(config, model.bos.device), path)


def infinity_tokens_per_batch(config: infinity.InfinityConfig, step: int = 0) -> int:
    return config.batch_size * math.prod(infinity.training_grid(config))


TOKENIZER = dict(build=build_tokenizer, optimizers=tokenizer_optimizers, phases=TOKENIZER_PHASES,
                 tokens_per_batch=tokens_per_frame_batch, fsdp_units=tokenizer_fsdp_units,
                 in_place_state=tokenizer_in_place_state)
STAGES: dict[str, Stage] = {
    "vqgan": Stage(preset=vqgan.VQGANConfig.preset, batch=frame_batch, visualise=visualise_frames, **TOKENIZER),
    "seg": Stage(preset=lambda name: vqgan.VQGANConfig.preset(name, seg=True), batch=sketch_batch,
                 visualise=visualise_sketches, **TOKENIZER),
    "nuwa": Stage(preset=nuwa.NUWAConfig.preset, build=build_nuwa, optimizers=nuwa_optimizers, batch=nuwa_batch,
                  phases=[Phase("nuwa", nuwa_loss, lambda model: list(model.parameters()))],
                  visualise=visualise_nuwa, tokens_per_batch=nuwa_tokens_per_batch,
                  warmup=linear_warmup,
                  fsdp_units=lambda model: [*model.encoder, *model.decoder],  # every transformer block
                  legacy_defaults=nuwa.LEGACY_DEFAULTS, cpu_bf16=True),
    "dfvqgan": DFVQGAN_STAGE,  # NÜWA-LIP §3.1
    "lip": LIP_STAGE,  # NÜWA-LIP §3.2-3.3, on a frozen DF-VQGAN
    "infinity": Stage(preset=infinity.InfinityConfig.preset, build=build_infinity, optimizers=infinity_optimizers,
                      batch=infinity_batch, phases=[Phase("infinity", infinity_loss, lambda model: list(model.parameters()))],
                      visualise=visualise_infinity, tokens_per_batch=infinity_tokens_per_batch,
                      warmup=linear_warmup,
                      fsdp_units=lambda model: list(model.blocks), units=infinity.num_patches,
                      legacy_defaults=infinity.LEGACY_DEFAULTS),
}

# ---------------------------------------------------------------------------------------------
# 3. The training step and loop (shared by every stage)
# ---------------------------------------------------------------------------------------------


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


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def check_finite(value: float, what: str, step: int, ckpt_path: Path) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} is {value} at step {step}; stopping before the optimizer step. The last "
                                 f"good checkpoint {ckpt_path} (if any) is kept.")


def train_step(objectives: nn.Module, model: nn.Module, optimizers: dict, phases: list[Phase],
               micro_batches: list, *, step: int, config: Any, autocast, ckpt_path: Path,
               units: int = 1) -> dict[str, float]:
    """One optimisation step on this process's A micro-batches: per phase, forward and backward
    every micro-batch (gradients averaged over processes on the last), check, clip, step.

    units U > 1 (NÜWA-Infinity's render-and-optimize): each micro-batch is U forward/backward
    passes in sequence — one per patch — sharing the micro-batch's `carry` (the context pool), with
    carry["unit"] = u telling the loss which one. Each pass's graph is freed by its backward, so
    memory is that of one unit; the gradients are those of the mean of the U unit losses."""
    A = len(micro_batches)
    carry = [{} for _ in micro_batches]  # what a later phase needs from an earlier one (VQGAN: x̂ for D)
    metrics: dict[str, float] = {}
    for index, phase in enumerate(phases):
        if not phase.active(config, step):
            continue
        optimizer = optimizers[phase.name]
        optimizer.zero_grad(set_to_none=True)  # also drops what an earlier phase's loss left here (gan_loss in D)
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            for unit in range(units):
                last = i == A - 1 and unit == units - 1
                carry[i]["unit"] = unit
                with gradient_sync(objectives, enabled=last):  # no_sync() on all but the final backward
                    losses = objectives(batch, phase=phase.name, step=step, carry=carry[i], autocast=autocast)
                    # Each micro-loss is a mean over an equal-size micro-batch: dividing by A makes the
                    # summed gradients those of the mean over this process's share; DDP / FSDP then
                    # average the W shares. Forgetting the 1/A multiplies the gradient by A.
                    (losses[phase.objective] / (A * units)).backward()
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float() / (A * units)
        phase_metrics = mean_over_processes(sums)  # the logged loss is the mean over the whole global batch
        check_finite(phase_metrics[phase.objective], phase.objective, step, ckpt_path)
        if config.grad_clip > 0:
            norm = nn.utils.clip_grad_norm_(phase.parameters(model), config.grad_clip)
            norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
            check_finite(norm, "the gradient norm", step, ckpt_path)
            phase_metrics["grad_norm" if index == 0 else f"{phase.name}_grad_norm"] = norm
        optimizer.step()
        metrics.update(phase_metrics)
    return metrics


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
                             f"(or it was trained on since). Pass the one recorded in the checkpoint's config, "
                             f"or start a new run in another --out")


def train_processes(stage_name: str, config: Any, run: TrainConfig, procs: Processes) -> Path:
    """The body of train() on one of the W processes."""
    from tqdm import tqdm

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
        f"{parts} micro-batch(es) per step, {A} per process; {torch.get_num_threads()} CPU threads; writing {folder}")

    torch.manual_seed(run.seed)  # the same initial weights on every rank
    model = stage.build(config, device)
    step, seconds_before = 0, 0.0
    checkpoint = (load_checkpoint(ckpt_path, stage=stage_name, config=config, legacy=stage.legacy_defaults)
                  if run.resume else None)
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
        say(f"resumed from {ckpt_path} at step {step}"
            + (f" (written by {checkpoint.get('world', 1)} processes)" if checkpoint.get("world", 1) != procs.world else ""))
    in_place = stage.in_place_state(model)

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
            save_checkpoint({"stage": stage_name, "config": config_to_dict(config), "run": asdict(run),
                             "step": step, "seconds": seconds, "world": procs.world, "model": model_state,
                             "optimizers": optimizer_states}, ckpt_path)

    autocast = autocast_for(stage, device, run.bf16)
    log = None  # rank 0 alone writes
    if procs.main:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)
        kept = []  # a resumed run keeps the lines up to its checkpoint (a crash may have logged past it)
        if run.resume and (folder / "log.jsonl").exists():
            kept = [line for line in open(folder / "log.jsonl") if json.loads(line)["step"] <= step]
        log = open(folder / "log.jsonl", "w")
        log.writelines(kept)
    bar = tqdm(total=run.max_steps or None, initial=step, unit="step", dynamic_ncols=True, disable=not procs.main)
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
                    dist.barrier()  # no rank exits (and makes torchrun kill the rest) before rank 0 has written
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
                                 config=config, autocast=autocast, ckpt_path=ckpt_path, units=stage.units(config))
            broadcast_in_place_state(in_place)
            metrics["lr"] = next(iter(optimizers.values())).param_groups[0]["lr"]
            seconds = time.perf_counter() - tick
            tokens_per_s = stage.tokens_per_batch(config, step) / seconds
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", s_per_step=f"{seconds:.2f}", tokens_per_s=f"{tokens_per_s:.0f}")
            if log and (step % run.log_every == 0 or step == 1):
                log.write(json.dumps({"step": step, "time": round(time.perf_counter() - start, 2),
                                      "step_seconds": round(seconds, 4), "tokens_per_s": round(tokens_per_s, 1),
                                      **metrics}) + "\n")
                log.flush()
            if run.sample_every and step % run.sample_every == 0:
                viewable = complete_model()
                if viewable is not None:
                    stage.visualise(viewable, config, folder / f"samples_step{step:06d}.png")
            if run.ckpt_every and step % run.ckpt_every == 0:
                checkpoint_now(time.perf_counter() - start)
        bar.close()
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
        bar.close()
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
# 4. The command line: one flag per dataclass field
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


def parse_args(argv: list[str] | None = None) -> tuple[str, Any, TrainConfig]:
    """Two passes: --stage and --preset pick the config whose fields (with the preset's values as
    defaults) become the flags of the second pass, so `-h` shows what a run would use."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--stage", choices=list(STAGES), default="vqgan")
    first.add_argument("--preset", default="tiny")
    known, _ = first.parse_known_args(argv)
    config = STAGES[known.stage].preset(known.preset)
    parser = argparse.ArgumentParser(description="Train a NÜWA-mini stage (python train.py, or torchrun train.py).",
                                     parents=[first])
    add_dataclass_flags(parser, config, f"{type(config).__name__} (preset {known.preset})")
    add_dataclass_flags(parser, TrainConfig(), "TrainConfig (the run)")
    args = vars(parser.parse_args(argv))
    pick = lambda cls: {f.name: tuple(args[f.name]) if isinstance(args[f.name], list) else args[f.name]
                        for f in fields(cls)}
    return known.stage, type(config)(**pick(type(config))), TrainConfig(**pick(TrainConfig))


def main(argv: list[str] | None = None) -> None:
    stage, config, run = parse_args(argv)
    train(stage, config, run)


if __name__ == "__main__":
    main()
