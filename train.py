"""One training script for every stage of NÜWA-mini.

    python train.py --stage vqgan --preset tiny --max-seconds 300 --out out
    python train.py --stage seg --preset tiny --max-steps 2000
    python train.py --stage vqgan --preset tiny -h      # every config field is a flag

Papers: NÜWA (arXiv 2111.12417) trains its tokenizers first (§3.1, VQ-GAN for frames and
VQ-GAN-Seg for sketches) and the 3D transformer on their tokens afterwards (§3.3-3.4). This file
implements no equation of its own; it runs the optimisation the modules define.

Sections: 1. run configuration and checkpoints (atomic save, checked load) · 2. stages — each a
small unit: a config, a builder, a batch iterator, a step function and a visualiser · 3. the shared
training loop (progress bar, JSON-lines log, pictures, checkpoints) · 4. the command line, generated
from the dataclass fields.

Stages here: `vqgan` (frames of Moving MNIST) and `seg` (one-hot sketch maps of captioned Moving
MNIST). Later stages (nuwa, lip, infinity, classifier) register themselves in `STAGES` the same way.

Glossary: B batch, T frames, C channels, H W pixels, h w token grid, K codebook size.

Deviations from the papers: single process only for now (the paper trains on 64 A100s; DDP/FSDP
arrive with a later change); `--resume` restores model, optimizers and step but not yet the RNG
states, so a resumed run is not bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import os
import re
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

# Set before torch loads OpenMP: idle worker threads sleep instead of spinning. On a shared 2-core CPU
# with another process busy, spinning made a tiny-preset step 25x slower (measured 5.0 s instead of
# 0.3 s per step); an explicit OMP_WAIT_POLICY in the environment still wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import data  # noqa: E402
import nuwa  # noqa: E402
import vqgan  # noqa: E402

# ---------------------------------------------------------------------------------------------
# 1. Run configuration and checkpoints
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    out: str = "out"  # run folder: a stage writes <out>/<stage>/ckpt.pt, log.jsonl and pictures
    max_steps: int = 0  # stop after this many optimisation steps; 0 = no step limit
    max_seconds: float = 0.0  # stop after this much wall-clock training time; 0 = no time limit
    seed: int = 0  # seeds torch and the data streams; printed at the start
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # "cpu" or "cuda"
    bf16: bool = True  # bf16 autocast of forward passes on CUDA (ignored on CPU)
    log_every: int = 10  # steps between lines of log.jsonl
    sample_every: int = 500  # steps between reconstruction grids; 0 = only at the end
    ckpt_every: int = 500  # steps between checkpoints; the last step always writes one
    resume: bool = False  # continue from <out>/<stage>/ckpt.pt (same config required)
    lr_schedule: str = "cosine"  # "cosine": decay over the run's budget (steps or seconds); "constant"
    lr_min_ratio: float = 0.1  # the cosine ends at this fraction of the stage config's lr
    threads: int = 0  # CPU threads for torch; 0 = torch's default (one per core). 1 is faster on a busy CPU


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    """Atomic write: a temporary file in the same folder, flushed and fsync'ed, then os.replace.
    A crash at any moment leaves either the old checkpoint or the new one, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    finally:
        if os.path.exists(handle.name):
            os.unlink(handle.name)


def load_checkpoint(path: Path, *, stage: str, config: Any) -> dict:
    """Load with weights_only=True (plain tensors and containers, no pickled code) and reject a
    checkpoint of another stage or configuration, naming every mismatching field."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint.get("stage") != stage:
        raise ValueError(f"{path} is a checkpoint of stage {checkpoint.get('stage')!r}, not {stage!r}")
    differences = vqgan.config_mismatch(config_to_dict(config), checkpoint["config"])
    if differences:
        raise ValueError(f"{path} was written with another configuration; mismatching fields: "
                         + "; ".join(differences))
    return checkpoint


def config_to_dict(config: Any) -> dict:
    """A dataclass as the plain dict a checkpoint stores (tuples as lists, as torch.load returns them)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


# ---------------------------------------------------------------------------------------------
# 2. Stages
# ---------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """What differs between stages; the loop, checkpoints and logs are shared."""

    preset: Callable[[str], Any]  # preset name → the stage's config dataclass
    build: Callable[[Any, torch.device], tuple[nn.Module, dict[str, torch.optim.Optimizer]]]
    batches: Callable[[Any, int], Iterator[Any]]  # (config, seed) → endless batches (CPU tensors)
    step: Callable[..., dict[str, float]]  # (model, optimizers, batch, step, autocast) → metrics
    visualise: Callable[[nn.Module, Any, Path], Path]  # (model, config, png path) → path written
    tokens_per_batch: Callable[[Any], int] = field(default=lambda config: 0)  # for the tokens/s readout


def build_tokenizer(config: vqgan.VQGANConfig, device: torch.device):
    """VQGAN plus two Adam optimizers: E/B/G ("vqgan") and the discriminator D ("disc")."""
    model = vqgan.VQGAN(config).to(device)
    optimizers = {"vqgan": torch.optim.Adam(model.tokenizer_parameters(), lr=config.lr, betas=config.betas)}
    if model.discriminator is not None:
        optimizers["disc"] = torch.optim.Adam(model.discriminator.parameters(), lr=config.lr, betas=config.betas)
    return model, optimizers


def frame_batches(config: vqgan.VQGANConfig, seed: int) -> Iterator[torch.Tensor]:
    """Endless (B, 1, 64, 64) batches: `frames_per_clip` frames from each of B / frames_per_clip
    fresh two-digit Moving MNIST training clips (the clips are generated on the fly)."""
    clips = data.MovingMNIST("train", num_frames=config.frames_per_clip, num_digits=2, seed=seed)
    per_batch = max(1, config.batch_size // config.frames_per_clip)
    index = 0
    while True:
        videos = [clips[(index + i) % len(clips)]["video"] for i in range(per_batch)]  # each (T, 1, 64, 64)
        index += per_batch
        yield torch.cat(videos)  # (B, 1, 64, 64)


def sketch_batches(config: vqgan.VQGANConfig, seed: int) -> Iterator[torch.Tensor]:
    """Endless one-hot sketch batches (B, 11, 64, 64) from captioned two-digit training clips."""
    clips = data.CaptionedMovingMNIST("train", num_frames=max(2, config.frames_per_clip), num_digits=2, seed=seed)
    per_batch = max(1, config.batch_size // clips.num_frames)
    index = 0
    while True:
        sketches = [clips[(index + i) % len(clips)]["sketch"] for i in range(per_batch)]  # each (T, 64, 64)
        index += per_batch
        yield vqgan.sketch_to_onehot(torch.cat(sketches), config.in_channels)  # (B, 11, 64, 64)


def tokenizer_step(model: vqgan.VQGAN, optimizers: dict, x: torch.Tensor, step: int, autocast) -> dict[str, float]:
    """One step of VQ-GAN training (Esser et al. §3.2): the tokenizer, then the discriminator."""
    config = model.config
    # Tokenizer E, B, G: forward, loss, backward, clip, step. (The EMA codebook update happens
    # inside the forward pass; with EMA the codes are not in the optimizer.)
    with autocast():
        x_rec, losses = model(x, step=step)  # x_rec (B, C, H, W)
    optimizers["vqgan"].zero_grad(set_to_none=True)
    losses["loss"].backward()
    if config.grad_clip > 0:
        losses["grad_norm"] = nn.utils.clip_grad_norm_(model.tokenizer_parameters(), config.grad_clip)
    optimizers["vqgan"].step()
    # Discriminator D, from the same step on as the GAN term: hinge loss on x vs sg[x̂].
    if "disc" in optimizers and step >= config.disc_start:
        with autocast():
            losses["disc_loss"] = model.discriminator_loss(x, x_rec)
        optimizers["disc"].zero_grad(set_to_none=True)  # also drops what gan_loss left in D
        losses["disc_loss"].backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.discriminator.parameters(), config.grad_clip)
        optimizers["disc"].step()
    return {name: float(value.detach()) for name, value in losses.items()}


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


def tokens_per_frame_batch(config: vqgan.VQGANConfig) -> int:
    h, w = config.token_shape
    return config.batch_size * h * w


# --- NÜWA (§3.3-3.4): multi-task training of the 3D encoder-decoder on frozen tokenizers -------

NUWA_TASKS = ("t2i", "t2v", "v2v", "s2i", "s2v")  # text→image/video, video prediction, sketch→image/video


def nuwa_tasks(config: nuwa.NUWAConfig) -> list[str]:
    tasks = [t for t in config.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(NUWA_TASKS))
    if unknown or not tasks:
        raise ValueError(f"unknown or no NÜWA task(s) {unknown or tasks}; choose from {list(NUWA_TASKS)}")
    if any(t.startswith("s2") for t in tasks) and not config.seg_ckpt:
        raise ValueError("sketch tasks need a VQ-GAN-Seg checkpoint: set --seg-ckpt or drop s2i/s2v from --tasks")
    return tasks


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


def build_nuwa(config: nuwa.NUWAConfig, device: torch.device):
    """NÜWA plus AdamW (weight decay on matrices only, the usual transformer practice)."""
    nuwa_tasks(config)  # fail on a bad task list before any work
    model = nuwa.NUWA(config).to(device)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": config.weight_decay}, {"params": others, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    return model, {"nuwa": optimizer}


def nuwa_batches(config: nuwa.NUWAConfig, seed: int) -> Iterator[dict]:
    """Endless dicts {task: pixel batch}. The caption/sketch tasks share each step's captioned clips
    (an image task uses one random frame of them); V2V uses two-digit Moving MNIST clips."""
    tasks, B = nuwa_tasks(config), config.batch_size
    captioned = data.CaptionedMovingMNIST("train", num_frames=config.frames, num_digits=config.num_digits, seed=seed)
    moving = data.MovingMNIST("train", num_frames=config.predict_frames, num_digits=2, seed=seed)
    frame_pick = torch.Generator().manual_seed(seed)
    index = 0
    while True:
        clips = data.collate([captioned[(index + i) % len(captioned)] for i in range(B)])
        t = int(torch.randint(config.frames, (1,), generator=frame_pick))  # the image tasks' frame
        batch = {
            "t2i": {"video": clips["video"][:, t:t + 1], "caption": clips["caption"]},
            "t2v": {"video": clips["video"], "caption": clips["caption"]},
            "s2i": {"video": clips["video"][:, t:t + 1], "sketch": clips["sketch"][:, t:t + 1]},
            "s2v": {"video": clips["video"], "sketch": clips["sketch"]},
        }
        if "v2v" in tasks:
            batch["v2v"] = {"video": torch.stack([moving[(index + i) % len(moving)]["video"] for i in range(B)])}
        index += B
        yield {task: batch[task] for task in tasks}


def nuwa_condition(model: nuwa.NUWA, task: str, batch: dict) -> nuwa.Condition:
    """The encoder's input for a task: caption, sketch tokens, or "None" (video prediction)."""
    if task in ("t2i", "t2v"):
        return nuwa.text_condition(model.tokenizer, batch["caption"])
    if task in ("s2i", "s2v"):
        config = model.config
        seg = frozen_tokenizer(config.seg_ckpt, str(model.bos.device), config.sketch_codebook_size,
                               (config.token_h, config.token_w))
        return nuwa.sketch_condition(seg.encode_sketch(batch["sketch"]))
    return nuwa.none_condition(model.tokenizer, batch["video"].shape[0])


def nuwa_step(model: nuwa.NUWA, optimizers: dict, batch: dict, step: int, autocast) -> dict[str, float]:
    """One NÜWA step (§3.4): L = Σ_tasks CE(next token), summed over the tasks of the mix."""
    config = model.config
    frames = frozen_tokenizer(config.vqgan_ckpt, str(model.bos.device), config.codebook_size,
                              (config.token_h, config.token_w))
    for group in optimizers["nuwa"].param_groups:  # linear warm-up on top of the run's schedule
        group["lr"] *= min(1.0, (step + 1) / max(1, config.warmup_steps))
    losses = {}
    for task, task_batch in batch.items():
        with torch.no_grad():
            targets = frames.encode_video(task_batch["video"])  # (B, T, h, w)
            cond = nuwa_condition(model, task, task_batch)
        with autocast():
            losses[f"{task}_loss"] = model.loss(cond, targets)
    loss = sum(losses.values())
    optimizers["nuwa"].zero_grad(set_to_none=True)
    loss.backward()
    metrics = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()}}
    if config.grad_clip > 0:
        metrics["grad_norm"] = float(nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
    optimizers["nuwa"].step()
    return metrics


VISUAL_CAPTIONS = ["digit 3 is moving up then down", "digit 4 is moving left then right"]  # seen combinations


@torch.no_grad()
def visualise_nuwa(model: nuwa.NUWA, config: nuwa.NUWAConfig, path: Path) -> Path:
    """PNG (+ GIF): text→video for two captions, then 10 → 10 prediction of a held-out clip
    (the given frames are the tokenizer's reconstruction; the rest is sampled)."""
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
    model.train(was_training)
    data.save_gif(rows, Path(path).with_suffix(".gif"), captions=labels)
    return data.save_grid(rows, path, captions=labels, max_frames=config.predict_frames)


def nuwa_tokens_per_batch(config: nuwa.NUWAConfig) -> int:
    per_frame = config.token_h * config.token_w
    lengths = {"t2i": 1, "s2i": 1, "t2v": config.frames, "s2v": config.frames, "v2v": config.predict_frames}
    return config.batch_size * per_frame * sum(lengths[t] for t in nuwa_tasks(config))


STAGES: dict[str, Stage] = {
    "vqgan": Stage(preset=vqgan.VQGANConfig.preset, build=build_tokenizer, batches=frame_batches,
                   step=tokenizer_step, visualise=visualise_frames, tokens_per_batch=tokens_per_frame_batch),
    "seg": Stage(preset=lambda name: vqgan.VQGANConfig.preset(name, seg=True), build=build_tokenizer,
                 batches=sketch_batches, step=tokenizer_step, visualise=visualise_sketches,
                 tokens_per_batch=tokens_per_frame_batch),
    "nuwa": Stage(preset=nuwa.NUWAConfig.preset, build=build_nuwa, batches=nuwa_batches, step=nuwa_step,
                  visualise=visualise_nuwa, tokens_per_batch=nuwa_tokens_per_batch),
}

# ---------------------------------------------------------------------------------------------
# 3. The training loop (shared by every stage)
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


def train(stage_name: str, config: Any, run: TrainConfig) -> Path:
    """Train one stage until max_steps or max_seconds; returns the checkpoint path."""
    from tqdm import tqdm

    stage, device = STAGES[stage_name], torch.device(run.device)
    folder = Path(run.out) / stage_name
    ckpt_path = folder / "ckpt.pt"
    if run.threads:
        torch.set_num_threads(run.threads)
    print(f"stage {stage_name}; seed {run.seed}; device {device}; {torch.get_num_threads()} CPU threads; "
          f"writing {folder}")
    torch.manual_seed(run.seed)
    model, optimizers = stage.build(config, device)
    step = 0
    if run.resume:
        checkpoint = load_checkpoint(ckpt_path, stage=stage_name, config=config)
        model.load_state_dict(checkpoint["model"])
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(checkpoint["optimizers"][name])
        step = checkpoint["step"]
        print(f"resumed from {ckpt_path} at step {step}")

    def checkpoint_now() -> None:
        save_checkpoint({"stage": stage_name, "config": config_to_dict(config), "run": asdict(run), "step": step,
                         "model": model.state_dict(),
                         "optimizers": {n: o.state_dict() for n, o in optimizers.items()}}, ckpt_path)

    use_bf16 = run.bf16 and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext
    batches = stage.batches(config, run.seed + step)  # a resumed run continues on fresh data
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "log.jsonl", "a" if run.resume else "w")  # a fresh run starts a fresh log
    bar = tqdm(total=run.max_steps or None, initial=step, unit="step", dynamic_ncols=True)
    for optimizer in optimizers.values():
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])  # the schedule scales this
    model.train()
    start = time.perf_counter()
    while (not run.max_steps or step < run.max_steps) and \
            (not run.max_seconds or time.perf_counter() - start < run.max_seconds):
        tick = time.perf_counter()
        for optimizer in optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(run, step, tick - start)
        batch = to_device(next(batches), device)
        metrics = stage.step(model, optimizers, batch, step, autocast)  # forward, backward, clip, step
        metrics["lr"] = next(iter(optimizers.values())).param_groups[0]["lr"]
        if not math.isfinite(metrics["loss"]):
            log.close()
            raise FloatingPointError(f"loss is {metrics['loss']} at step {step}; stopping. The last good "
                                     f"checkpoint {ckpt_path} (if any) is kept.")
        step += 1
        seconds = time.perf_counter() - tick
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", s_per_step=f"{seconds:.2f}",
                        tokens_per_s=f"{stage.tokens_per_batch(config) / seconds:.0f}")
        if step % run.log_every == 0 or step == 1:
            log.write(json.dumps({"step": step, "time": round(time.perf_counter() - start, 2), **metrics}) + "\n")
            log.flush()
        if run.sample_every and step % run.sample_every == 0:
            stage.visualise(model, config, folder / f"samples_step{step:06d}.png")
        if run.ckpt_every and step % run.ckpt_every == 0:
            checkpoint_now()
    bar.close()
    log.close()
    checkpoint_now()
    picture = stage.visualise(model, config, folder / "samples.png")
    plot_losses(folder / "log.jsonl", folder / "losses.png")
    print(f"{step} steps in {time.perf_counter() - start:.0f} s; wrote {ckpt_path}, {picture}")
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
        help_text = f"{comments.get(f.name, '')} (default: {default})"
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
    parser = argparse.ArgumentParser(description="Train a NÜWA-mini stage.", parents=[first])
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
