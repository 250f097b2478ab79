"""What every stage trains on: the micro-batches of each step, by paper, from (seed, step, part) alone.

    VQ-GAN, VQ-GAN-Seg   NÜWA (arXiv 2111.12417) §3.1: Moving MNIST frames, one-hot sketch maps
    NÜWA                 NÜWA §3.4: the task mix (text→image/video, video prediction, sketch→image/video)
    DF-VQGAN, MP-S2S     NÜWA-LIP (arXiv 2202.05009) §3.1, §3.3: frames with training masks, and captions
    Infinity             NÜWA-Infinity (arXiv 2207.09814): canvases of digits (`DigitCanvases`), or clips

The data protocol (what makes a resumed or distributed run exact). The global batch of step s is
items s·N … s·N + N − 1 of seeded, index-addressable streams (data.py: every item is a pure function
of (seed, index)); micro-batch `part` of `parts` is an equal slice of it (`equal_part`). Whatever a
batch draws at random (a frame, a mask, a caption drop) comes from (seed, step, item), and the
randomness inside a step from `step_seed(seed, rank, step)`. Nothing random is carried from step to
step, so a batch function takes (config, seed, step, part, parts) and nothing else, and returns CPU
tensors. Each stage also says how many tokens its global batch trains (`*_tokens_per_batch`, for
tokens/s). stages.py puts these together with the models, losses and pictures.

Sections: 1. the data protocol · 2. VQ-GAN and VQ-GAN-Seg · 3. NÜWA · 4. NÜWA-LIP · 5. NÜWA-Infinity.

Glossary: B batch (items of a global batch), b micro-batch, T frames, H W pixels, h w token grid,
N items per global batch, t the frame an image task takes from its clip.

Deviations from the papers (each marked at its line):
- NÜWA's task mix gains options the paper does not have: a curriculum (`t2i_steps`, then
  `start_steps` of the opening-frames task `t2v_start`) and per-task batch sizes.
- Infinity trains on canvases of MNIST digits captioned with the set of their classes ("3 7"),
  position-free like the model; the paper trains on landscapes (LHQC).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch.utils.data import Dataset

import data
import dfvqgan
import infinity
import lip
import nuwa
import vqgan

# ---------------------------------------------------------------------------------------------
# 1. The data protocol: a step's batch from (seed, step, part) alone
# ---------------------------------------------------------------------------------------------


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of one step on one process: a hash of (seed, rank, step). Reseeding every
    step makes a resumed run draw exactly the numbers the uninterrupted one drew, without saving
    generator states, and gives every rank its own numbers."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0])


def equal_part(total: int, part: int, parts: int, what: str) -> range:
    """Item indices of micro-batch `part` of `parts` equal micro-batches of a step's `total` items.

    Equal sizes are what make `loss / A` exact (a mean of equal-size means is the mean); unequal
    ones are refused rather than silently weighted wrong (the gradient-accumulation bug class)."""
    if total % parts:
        raise ValueError(f"a step's {total} {what} cannot be cut into {parts} equal micro-batches "
                         f"(micro-steps × processes); choose a batch size divisible by {parts}")
    size = total // parts
    return range(part * size, (part + 1) * size)


@functools.lru_cache(maxsize=8)
def moving_clips(split: str, frames: int, digits: int, seed: int) -> data.MovingMNIST:
    """Moving MNIST clips, built once per process (loading MNIST takes seconds)."""
    return data.MovingMNIST(split, num_frames=frames, num_digits=digits, seed=seed)


@functools.lru_cache(maxsize=8)
def captioned_clips(split: str, frames: int, digits: int, seed: int) -> data.CaptionedMovingMNIST:
    """Captioned Moving MNIST clips (with sketches), built once per process."""
    return data.CaptionedMovingMNIST(split, num_frames=frames, num_digits=digits, seed=seed)


# ---------------------------------------------------------------------------------------------
# 2. VQ-GAN and VQ-GAN-Seg: frames and sketch maps (NÜWA §3.1)
# ---------------------------------------------------------------------------------------------


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


def tokens_per_frame_batch(config: vqgan.VQGANConfig, step: int = 0) -> int:
    h, w = config.token_shape
    return config.batch_size * h * w


# ---------------------------------------------------------------------------------------------
# 3. NÜWA: the task mix and its curriculum (§3.4)
# ---------------------------------------------------------------------------------------------


# text→image/video, video prediction, sketch→image/video, and t2v_start: the opening frames of text→video
NUWA_TASKS = ("t2i", "t2v", "v2v", "s2i", "s2v", "t2v_start")


def nuwa_tasks(config: nuwa.NUWAConfig) -> list[str]:
    """The configured task mix, checked (with the batch sizes and curriculum that go with it)."""
    tasks = [t for t in config.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(NUWA_TASKS))
    if unknown or not tasks:
        raise ValueError(f"unknown or no NÜWA task(s) {unknown or tasks}; choose from {list(NUWA_TASKS)}")
    if any(t.startswith("s2") for t in tasks) and not config.seg_ckpt:
        raise ValueError("sketch tasks need a VQ-GAN-Seg checkpoint: set --seg-ckpt or drop s2i/s2v "
                         "from --tasks")
    if config.v2v_batch_size < 0:
        raise ValueError(f"v2v_batch_size must be ≥ 0 (0 = batch_size), got {config.v2v_batch_size}")
    start_sizes = min(config.start_batch_size, config.mix_start_batch_size)
    if start_sizes < 0 or not 1 <= config.start_frames <= config.frames:
        raise ValueError(f"t2v_start needs 1 ≤ start_frames ≤ frames ({config.frames}), start_batch_size ≥ 0 "
                         f"(0 = batch_size) and mix_start_batch_size ≥ 0 (0 = start_batch_size); got "
                         f"start_frames={config.start_frames}, start_batch_size={config.start_batch_size}, "
                         f"mix_start_batch_size={config.mix_start_batch_size}")
    if config.start_steps < 0:
        raise ValueError(f"start_steps must be ≥ 0, got {config.start_steps}")
    if config.t2i_steps < 0 or (config.t2i_steps and "t2i" not in tasks):
        raise ValueError(f"t2i_steps={config.t2i_steps} needs t2i among the tasks ({config.tasks!r}) "
                         f"and must be ≥ 0")
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


def v2v_clips(config: nuwa.NUWAConfig) -> int:
    """V2V clips per step: its own v2v_batch_size, or batch_size like every other task."""
    return config.v2v_batch_size or config.batch_size


def start_clips(config: nuwa.NUWAConfig, step: int = 0) -> int:
    """t2v_start clips in step `step`: start_batch_size (or batch_size) in its own phase; in the mix
    after it, mix_start_batch_size when set. The opening frames alone need many clips a step (which
    way a caption sends its digit is one token in a clip's 128); in the mix they are most of a step's
    tokens, and fewer leave more steps for whole clips."""
    own = config.start_batch_size or config.batch_size
    return (config.mix_start_batch_size or own) if nuwa_phase(config, step) == "mix" else own


def nuwa_batch(config: nuwa.NUWAConfig, seed: int, step: int, part: int, parts: int) -> dict:
    """Micro-batch {task: pixel batch} of step `step`. The caption/sketch tasks share the step's
    captioned clips (an image task uses one frame t of them, drawn from (seed, step) so that every
    micro-batch and rank uses the same t); V2V uses two-digit Moving MNIST clips."""
    step_tasks, B = nuwa_step_tasks(config, step), config.batch_size
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
    if "v2v" in step_tasks:
        moving, B_v = moving_clips("train", config.predict_frames, 2, seed), v2v_clips(config)
        v2v_picks = equal_part(B_v, part, parts, "V2V clips (v2v_batch_size)")
        v2v = [moving[(step * B_v + i) % len(moving)]["video"] for i in v2v_picks]  # each (T, 1, 64, 64)
        batch["v2v"] = {"video": torch.stack(v2v)}
    if "t2v_start" in step_tasks:
        # OUR ADDITION (not in NÜWA §3.4): more clips through the opening frames. Where a digit goes
        # first is written only in the caption ("left then right" or "right then left"), and only the
        # first moving frame shows it: a 10-frame clip scores that choice in about 1 of its 640
        # tokens, and the tiny model never learned it (flipping every direction word of a caption
        # left the loss unchanged). The decoder is causal, so a clip's first start_frames frames
        # under the whole clip's caption score exactly the first terms of its text→video loss: this
        # weights the opening frames more, without changing the model. Clips from a second stream.
        B_s = start_clips(config, step)
        start_picks = equal_part(B_s, part, parts,
                                 "t2v_start clips (start_batch_size, or mix_start_batch_size in the mix)")
        offset = len(captioned) // 2
        opening = data.collate([captioned[(offset + step * B_s + i) % len(captioned)] for i in start_picks])
        batch["t2v_start"] = {"video": opening["video"][:, :config.start_frames],
                              "caption": opening["caption"]}
    return {task: batch[task] for task in step_tasks}


def nuwa_tokens_per_batch(config: nuwa.NUWAConfig, step: int = 0) -> int:
    """Target tokens of step `step`'s tasks, each task with its own number of clips and frames."""
    per_frame = config.token_h * config.token_w
    lengths = {"t2i": 1, "s2i": 1, "t2v": config.frames, "s2v": config.frames, "v2v": config.predict_frames,
               "t2v_start": config.start_frames}
    clips = {"v2v": v2v_clips(config), "t2v_start": start_clips(config, step)}
    step_tasks = nuwa_step_tasks(config, step)
    return per_frame * sum(lengths[t] * clips.get(t, config.batch_size) for t in step_tasks)


# ---------------------------------------------------------------------------------------------
# 4. NÜWA-LIP: masked frames for DF-VQGAN (§3.1) and MP-S2S (§3.3)
# ---------------------------------------------------------------------------------------------


def dfvqgan_batch(config: dfvqgan.DFVQGANConfig, seed: int, step: int, part: int, parts: int) -> dict:
    """The vqgan stage's frames, each with a mask from LIP's mix (none, all missing, random boxes) and
    a skip gate (decode with the symmetrical connections or without), drawn from (seed, step, frame)."""
    x = frame_batch(config, seed, step, part, parts)  # (b, 1, 64, 64)
    b = len(x)
    streams = [lip.item_rng(seed, step, part * b + i) for i in range(b)]  # frame i of the global batch
    masks = torch.stack([lip.tokenizer_training_mask(rng, config) for rng in streams])  # (b, 1, 64, 64)
    gates = torch.tensor([bool(rng.random() < config.skip_prob) for rng in streams])  # (b,)
    return {"x": x, "mask": masks, "use_skips": gates}


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
                                           config.half_digit_prob)
                         for frame, i in zip(frames, picks)])  # (b, 1, 64, 64)
    return {"image": frames, "mask": masks, "caption": clips["caption"]}


def lip_tokens_per_batch(config: lip.LIPConfig, step: int = 0) -> int:
    return config.batch_size * config.token_h * config.token_w


# ---------------------------------------------------------------------------------------------
# 5. NÜWA-Infinity: digit canvases, or Moving MNIST clips
# ---------------------------------------------------------------------------------------------


SLOT_PX = 32  # one digit per 32 px of width: one patch column of 8 tokens (chosen here)
CANVAS_CLASSES = (1, 2)  # a canvas draws its digits from one or two classes, named by its caption


class DigitCanvases(Dataset):
    """Deterministic canvases of MNIST digits on black, Infinity's training images.

    A canvas of height × width px has one digit per SLOT_PX-wide slot, jittered within the slot and
    anywhere vertically, overlapping by pixel-wise maximum. Its digits come from one or two classes;
    the caption names them in increasing order ("3 7"), or is None with probability none_prob.
    Items: `image` float (1, H, W) in [0, 1], `caption` str | None, `digits` int64 (slots,)."""

    def __init__(self, split: str = "train", height: int = 64, width: int = 128, seed: int = 0,
                 length: int | None = None, none_prob: float = 0.0, root=None):
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
        if height < data.DIGIT or width < SLOT_PX:
            raise ValueError(f"a digit canvas must be at least {data.DIGIT}×{SLOT_PX} px, "
                             f"got {height}×{width}")
        self.split, self.height, self.width, self.seed, self.none_prob = split, height, width, seed, none_prob
        self.length = data.DEFAULT_LENGTH[split] if length is None else length
        self.images, labels = data.load_digits(split, root=root)
        self.by_class = [np.flatnonzero(labels == d) for d in range(10)]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        rng = np.random.default_rng([self.seed, data.SPLIT_CODES[self.split], index])
        classes = rng.choice(10, size=rng.choice(CANVAS_CLASSES), replace=False)
        canvas = np.zeros((self.height, self.width), dtype=np.float32)  # (H, W)
        digits = []
        for slot in range(self.width // SLOT_PX):
            digit = int(classes[rng.integers(len(classes))])
            image = self.images[rng.choice(self.by_class[digit])] / 255.0  # (28, 28)
            x = slot * SLOT_PX + rng.integers(SLOT_PX - data.DIGIT + 1)
            y = rng.integers(self.height - data.DIGIT + 1)
            window = canvas[y:y + data.DIGIT, x:x + data.DIGIT]
            np.maximum(window, image, out=window)
            digits.append(digit)
        # DEVIATION (data): the caption is the set of digit classes, position-free like the model.
        caption = None if rng.random() < self.none_prob else clip_caption(torch.tensor(digits))
        return {"image": torch.from_numpy(canvas)[None], "caption": caption,
                "digits": torch.tensor(digits, dtype=torch.int64)}


def clip_caption(digits: torch.Tensor) -> str:
    """Infinity's caption of a canvas or a clip: its digits' names as a set, increasing ("3 7")."""
    return " ".join(str(d) for d in sorted(set(int(d) for d in digits)))


@functools.lru_cache(maxsize=4)  # built once per process: loading MNIST takes seconds
def infinity_source(kind: str, height: int, width: int, frames: int, digits: int, none_prob: float,
                    seed: int):
    """Infinity's training stream: DigitCanvases ("canvas") or Moving MNIST clips ("video")."""
    if kind == "video":
        return data.MovingMNIST("train", num_frames=frames, num_digits=digits, seed=seed)
    return DigitCanvases("train", height, width, seed, none_prob=none_prob)


def infinity_batch(config: infinity.InfinityConfig, seed: int, step: int, part: int = 0,
                   parts: int = 1) -> dict:
    """Micro-batch `part` of `parts` of step `step`, on the CPU: `pixels` (b, T, 1, H, W), `caption`
    (list of b, None entries for "None"; Moving MNIST clips are uncaptioned unless video_captions),
    and the `seed` that, with the step, draws the step's patch order."""
    picks = equal_part(config.batch_size, part, parts, "canvases (batch_size)")
    source = infinity_source(config.data, config.canvas_height, config.canvas_width, config.frames,
                             config.video_digits, config.none_prob, seed)
    items = [source[(step * config.batch_size + i) % len(source)] for i in picks]
    if config.data == "video":
        captions = [None] * len(items)
        if config.video_captions:  # the digits' names; "None" with probability none_prob (drawn per item)
            drops = np.random.default_rng([seed, step, part]).random(len(items)) < config.none_prob
            captions = [None if drop else clip_caption(item["digits"]) for item, drop in zip(items, drops)]
        pixels = torch.stack([item["video"] for item in items])  # (b, T, 1, 64, 64)
    else:
        captions = [item["caption"] for item in items]
        pixels = torch.stack([item["image"][None] for item in items])  # (b, 1, 1, H, W)
    return {"pixels": pixels, "caption": captions, "seed": seed}


def infinity_tokens_per_batch(config: infinity.InfinityConfig, step: int = 0) -> int:
    return config.batch_size * math.prod(infinity.training_grid(config))
