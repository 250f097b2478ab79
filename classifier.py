"""The digit classifiers: small CNNs trained on MNIST that stand in for the papers' pretrained judges.

    python classifier.py --out out/classifier [--max-seconds 300]    # train both, report test accuracy
    from classifier import load_classifier
    model = load_classifier("out/classifier")   # a DigitClassifier in eval mode; its pair classifier: .pair
    model(crops)                                # crops (N, 1, 28, 28) in [0, 1] → logits (N, 10)

Papers: NÜWA (arXiv 2111.12417) scores its samples with pretrained networks (Inception for FID, CLIP
for CLIPSIM, I3D for FVD), and NÜWA-LIP (arXiv 2202.05009) reranks its inpaintings with CLIP. None of
them exists offline, and none knows Moving MNIST. This file trains their stand-ins on our own data:
- DigitClassifier: a LeNet-style CNN (LeCun et al. 1998) that names the digit of a 28×28 crop. It
  trains on MNIST with random rotations, scales and shifts, so that it also reads digits cropped
  off-centre out of real and generated frames. reader.py uses it to read a video back into its
  caption (evaluate.py's stand-in for CLIPSIM), and its penultimate features are the feature space of
  evaluate.py's Fréchet LeNet Distance (the stand-in for FID).
- PairClassifier: two digits whose strokes cross cannot be cut apart, so a second CNN names the
  unordered pair of a 56×56 crop of both, one of 55 (a ≤ b): the idea of MultiMNIST (Sabour et al.
  2017, §6), with Moving MNIST's rule of combination (the pixel-wise maximum).
Both train with Adam on cross-entropy under a one-cycle learning rate (linear warm-up, cosine to zero),
and live in one checkpoint file (checkpoints.py, stage "digit_classifier").

Sections: 1. the digit classifier · 2. augmentation · 3. training and accuracy · 4. the pair
classifier · 5. the file · 6. the command line.

Glossary: N crops, F feature width (the penultimate layer), c1 c2 c3 convolution channels; digits are
28 × 28 (MNIST), frames 64 × 64, pair crops 56 × 56.

Deviations from the paper:
- The papers' judges are networks pretrained on millions of natural images and captions; ours are
  trained here on MNIST, so no number they give is comparable with a published FID, CLIPSIM or FVD.
- From LeNet-5: ReLU and max-pooling instead of tanh and subsampling, wider layers (32 / 64 / 128
  instead of 6 / 16 / 84), dropout before the last layer, and augmentation.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import checkpoints
import data
import runtime

CLASSIFIER_FILE = "classifier.pt"  # what `python classifier.py --out DIR` writes: DIR/classifier.pt
DEFAULT_CLASSIFIER_DIR = "out/classifier"
STAGE = "digit_classifier"  # the file's checkpoint stage; also written as "kind", which older code reads
NUM_CLASSES = 10
SHIFTED_TEST_SHIFT = 3  # px; `shifted_test_accuracy` moves every test digit by up to this much

# ---------------------------------------------------------------------------------------------
# 1. The digit classifier
# ---------------------------------------------------------------------------------------------


@dataclass
class ClassifierConfig:
    conv1: int = 32  # channels of the first 5×5 convolution (LeNet-5: 6)
    conv2: int = 64  # channels of the second 5×5 convolution (LeNet-5: 16)
    features: int = 128  # F, width of the penultimate layer: the feature space of FLD (LeNet-5: 84)
    dropout: float = 0.25  # dropout before the last layer (chosen here; LeNet-5 had none)
    # --- training; the network ignores these fields
    epochs: int = 5  # passes over the 60,000 MNIST training digits
    batch_size: int = 128
    lr: float = 2e-3  # Adam peak learning rate of a one-cycle schedule (warm-up, then cosine to 0)
    warmup: float = 0.15  # fraction of the run spent warming up
    max_shift: int = 3  # random translation, px: crops of generated frames are off-centre
    max_rotation: float = 8.0  # random rotation, degrees: generated digits lean more than MNIST's
    max_scale: float = 0.08  # random scale, ± this fraction
    seed: int = 0  # weights, data order and augmentation


ARCHITECTURE_FIELDS = ("conv1", "conv2", "features")  # the fields that decide which weights a file holds


def conv_pool(in_channels: int, out_channels: int, kernel: int) -> list[nn.Module]:
    """One LeNet stage: a valid kernel × kernel convolution, ReLU, 2×2 max-pool (halves the side)."""
    return [nn.Conv2d(in_channels, out_channels, kernel), nn.ReLU(), nn.MaxPool2d(2)]


class DigitClassifier(nn.Module):
    """LeNet-style CNN: two (5×5 conv, ReLU, 2×2 max-pool) stages, a hidden layer of F units, 10 logits.

    Input (N, 1, 28, 28) in [0, 1], laid out as MNIST is: the digit's centre of mass at the centre.
    `embed` returns the penultimate features (N, F) that FLD compares."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        self.body = nn.Sequential(
            *conv_pool(1, config.conv1, 5),  # (N, c1, 12, 12)
            *conv_pool(config.conv1, config.conv2, 5),  # (N, c2, 4, 4)
            nn.Flatten(), nn.Linear(config.conv2 * 16, config.features), nn.ReLU(),  # (N, F)
        )
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.features, NUM_CLASSES))
        self.info: dict = {}  # how it was trained and how well it does (filled by train / load)
        self.pair: PairClassifier | None = None  # reads two overlapping digits (section 4); stored alongside

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, data.DIGIT, data.DIGIT):
            raise ValueError(f"the classifier reads (N, 1, 28, 28) digit crops, got {tuple(x.shape)}")
        return self.body(x)  # (N, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))  # (N, 10)


# ---------------------------------------------------------------------------------------------
# 2. Augmentation: the digits as crops of real and generated frames show them
# ---------------------------------------------------------------------------------------------


def warp(x: torch.Tensor, linear: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Each image of x (N, 1, h, w) under the linear map `linear` (N, 2, 2) about its centre, then
    moved by integer (dy, dx) pixels `shifts` (N, 2); black comes in at the edges."""
    N = len(x)
    theta = torch.zeros(N, 2, 3)  # affine_grid's map from output to input coordinates, in [-1, 1] units
    theta[:, :, :2] = linear
    theta[:, 0, 2] = -2 * shifts[:, 1].float() / x.shape[-1]  # x
    theta[:, 1, 2] = -2 * shifts[:, 0].float() / x.shape[-2]  # y
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)  # (N, 1, h, w)


def translate(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Move each image (N, 1, 28, 28) by integer (dy, dx) pixels (N, 2), black coming in at the edges:
    exactly what a 28×28 crop of a Moving MNIST frame is when its centre misses the digit's."""
    return warp(x, torch.eye(2).expand(len(x), 2, 2), shifts)  # integer shifts land on pixels


def augment(x: torch.Tensor, config: ClassifierConfig, generator: torch.Generator) -> torch.Tensor:
    """Random rotation, scale and integer shift of a batch (N, 1, 28, 28), black outside the digit."""
    N = len(x)
    angle = (2 * torch.rand(N, generator=generator) - 1) * math.radians(config.max_rotation)
    scale = 1 + (2 * torch.rand(N, generator=generator) - 1) * config.max_scale
    shifts = torch.randint(-config.max_shift, config.max_shift + 1, (N, 2), generator=generator)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1)  # (N, 2, 2)
    return warp(x, rotation / scale[:, None, None], shifts)  # (N, 1, 28, 28)


def digits_as_tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST (or, with a warning, the font fallback) as float images (N, 1, 28, 28) and labels (N,)."""
    images, labels = data.load_digits(split)
    x = torch.from_numpy(np.array(images)).float().div_(255.0)[:, None]  # (N, 1, 28, 28)
    return x, torch.from_numpy(np.array(labels))


def nearest_pixel(value: float) -> int:
    """Round half up (not to even), so that positions moved by an integer round to positions moved by it."""
    return math.floor(value + 0.5)


# ---------------------------------------------------------------------------------------------
# 3. Training and accuracy
# ---------------------------------------------------------------------------------------------


def one_cycle(done: float, warmup: float) -> float:
    """Learning-rate factor at fraction `done` of the budget: linear warm-up over the first `warmup`,
    then a cosine from 1 down to 0 (both classifiers train on this schedule)."""
    if done < warmup:
        return done / warmup
    return 0.5 * (1 + math.cos(math.pi * (done - warmup) / (1 - warmup)))


def classifier_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
                    labels: torch.Tensor, bar: tqdm) -> None:
    """One optimiser step of cross-entropy on a batch (both classifiers), its loss on the bar."""
    loss = F.cross_entropy(model(inputs), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    bar.update(1)
    bar.set_postfix(loss=f"{loss.item():.3f}")


def train_classifier(config: ClassifierConfig, *, max_seconds: float = 0.0, max_steps: int = 0,
                     device: str = "cpu", progress: bool = True) -> DigitClassifier:
    """Adam on cross-entropy over augmented MNIST training digits; returns the model in eval mode.

    The run stops after `config.epochs`, `max_steps` or `max_seconds`, whichever comes first; the
    learning rate follows a one-cycle schedule over that budget (linear warm-up, cosine to zero)."""
    torch.manual_seed(config.seed)
    x, y = digits_as_tensors("train")  # (60000, 1, 28, 28), (60000,)
    model = DigitClassifier(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = len(x) // config.batch_size
    total = config.epochs * steps_per_epoch
    total = min(max_steps, total) if max_steps else total
    start, step = time.perf_counter(), 0
    bar = runtime.progress(total=total, desc="classifier", unit="step", enabled=progress)
    model.train()
    while step < total and not (max_seconds and time.perf_counter() - start >= max_seconds):
        order = torch.randperm(len(x), generator=generator)
        for first in range(0, steps_per_epoch * config.batch_size, config.batch_size):
            elapsed = time.perf_counter() - start
            if step >= total or (max_seconds and elapsed >= max_seconds):
                break
            done = max(step / total, elapsed / max_seconds if max_seconds else 0.0)  # fraction of the budget
            for group in optimizer.param_groups:
                group["lr"] = config.lr * one_cycle(done, config.warmup)
            batch = order[first:first + config.batch_size]
            inputs = augment(x[batch], config, generator)  # (B, 1, 28, 28)
            classifier_step(model, optimizer, inputs.to(device), y[batch].to(device), bar)
            step += 1
    bar.close()
    model.info = {"train_seconds": round(time.perf_counter() - start, 1), "steps": step,
                  "epochs_seen": round(step / steps_per_epoch, 2), "threads": torch.get_num_threads()}
    return model.eval()


@torch.no_grad()
def classifier_accuracy(model: DigitClassifier, x: torch.Tensor, y: torch.Tensor, *, max_shift: int = 0,
                        seed: int = 0) -> float:
    """Top-1 accuracy on images (N, 1, 28, 28); with max_shift each image is first moved by a random
    integer (dy, dx) in [−max_shift, max_shift]² (fixed seed), as an off-centre crop would be."""
    device = next(model.parameters()).device
    if max_shift:
        generator = torch.Generator().manual_seed(seed)
        x = translate(x, torch.randint(-max_shift, max_shift + 1, (len(x), 2), generator=generator))
    correct = sum((model(x[i:i + 1000].to(device)).argmax(1).cpu() == y[i:i + 1000]).sum().item()
                  for i in range(0, len(x), 1000))
    return correct / len(x)


# ---------------------------------------------------------------------------------------------
# 4. The pair classifier: two digits whose strokes overlap, read as one picture
# ---------------------------------------------------------------------------------------------
# Two digits moving the same way keep their relative place: when they touch in the first frame they
# touch in every frame, and no cut of the ink separates crossing strokes. Such a blob is read whole.

PAIR_CROP = 56  # px: two touching 28×28 digits fit in 56×56
PAIRS = [(a, b) for a in range(NUM_CLASSES) for b in range(a, NUM_CLASSES)]  # the 55 unordered pairs
PAIR_INDEX = {pair: i for i, pair in enumerate(PAIRS)}
PAIR_PLACE = (10, 27)  # corner range (px) of the first digit on the 64×64 canvas
PAIR_OFFSET = 14  # px: the second digit's corner lies within ±this of the first's: they touch or cross


@dataclass
class PairConfig:
    conv1: int = 32  # channels of the first 5×5 convolution
    conv2: int = 64  # channels of the second 5×5 convolution
    conv3: int = 128  # channels of the 3×3 convolution
    features: int = 256  # width of the hidden layer
    dropout: float = 0.25
    # --- training; the network ignores these fields
    steps: int = 4000  # batches of freshly drawn pairs
    batch_size: int = 128
    lr: float = 2e-3  # Adam peak learning rate of the one-cycle schedule
    warmup: float = 0.1  # fraction of the run spent warming up
    seed: int = 0


PAIR_ARCHITECTURE_FIELDS = ("conv1", "conv2", "conv3", "features")


class PairClassifier(nn.Module):
    """(N, 1, 56, 56) crops centred on the blob's centre of mass → 55 logits over unordered pairs."""

    def __init__(self, config: PairConfig):
        super().__init__()
        self.config = config
        self.net = nn.Sequential(
            *conv_pool(1, config.conv1, 5),  # (N, c1, 26, 26)
            *conv_pool(config.conv1, config.conv2, 5),  # (N, c2, 11, 11)
            *conv_pool(config.conv2, config.conv3, 3),  # (N, c3, 4, 4)
            nn.Flatten(), nn.Linear(config.conv3 * 16, config.features), nn.ReLU(),
            nn.Dropout(config.dropout), nn.Linear(config.features, len(PAIRS)))
        self.info: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, PAIR_CROP, PAIR_CROP):
            raise ValueError(f"the pair classifier reads (N, 1, {PAIR_CROP}, {PAIR_CROP}) crops, "
                             f"got {tuple(x.shape)}")
        return self.net(x)  # (N, 55)


def centre_crops(canvases: torch.Tensor) -> torch.Tensor:
    """(N, H, W) → (N, 1, 56, 56) crops with each canvas's centre of mass at the crop's centre."""
    N, H, W = canvases.shape
    mass = canvases.sum((1, 2)).clamp_min(1e-9)  # (N,)
    cy = (canvases.sum(2) @ torch.arange(H, dtype=canvases.dtype)) / mass  # (N,)
    cx = (canvases.sum(1) @ torch.arange(W, dtype=canvases.dtype)) / mass  # (N,)
    S = PAIR_CROP
    padded = F.pad(canvases, (S, S, S, S))  # (N, H + 2S, W + 2S)
    tops = [nearest_pixel(float(c)) + S // 2 for c in cy]  # the crop's top row in the padded canvas
    lefts = [nearest_pixel(float(c)) + S // 2 for c in cx]
    crops = [padded[i, top:top + S, left:left + S] for i, (top, left) in enumerate(zip(tops, lefts))]
    return torch.stack(crops)[:, None]  # (N, 1, 56, 56)


def draw_pairs(x: torch.Tensor, y: torch.Tensor, n: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n canvases (n, 64, 64) of two random digits of (x, y) drawn over each other, and their pair
    labels (n,)."""
    first = torch.randint(len(x), (n,), generator=generator)
    second = torch.randint(len(x), (n,), generator=generator)
    jitter = ClassifierConfig(max_shift=0)  # rotation and scale as the digit classifier's; placement below
    a = augment(x[first], jitter, generator)[:, 0]  # (n, 28, 28)
    b = augment(x[second], jitter, generator)[:, 0]  # (n, 28, 28)
    side, free = data.CANVAS, data.CANVAS - data.DIGIT
    corner_a = torch.randint(PAIR_PLACE[0], PAIR_PLACE[1], (n, 2), generator=generator)
    offset = torch.randint(-PAIR_OFFSET, PAIR_OFFSET + 1, (n, 2), generator=generator)
    corner_b = (corner_a + offset).clamp(0, free)
    canvases = torch.zeros(n, side, side)
    for k in range(n):
        for digit, (top, left) in ((a[k], corner_a[k].tolist()), (b[k], corner_b[k].tolist())):
            window = canvases[k, top:top + data.DIGIT, left:left + data.DIGIT]
            torch.maximum(window, digit, out=window)  # Moving MNIST combines digits by the pixel-wise maximum
    labels = torch.tensor([PAIR_INDEX[tuple(sorted((int(y[i]), int(y[j]))))] for i, j in zip(first, second)])
    return canvases, labels


def train_pair_classifier(config: PairConfig, *, max_seconds: float = 0.0, max_steps: int = 0,
                          device: str = "cpu", progress: bool = True) -> PairClassifier:
    """Adam on cross-entropy over freshly drawn pairs of MNIST training digits; eval mode on return."""
    torch.manual_seed(config.seed)
    x, y = digits_as_tensors("train")
    model = PairClassifier(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    total = min(max_steps, config.steps) if max_steps else config.steps
    start, step = time.perf_counter(), 0
    bar = runtime.progress(total=total, desc="pair classifier", unit="step", enabled=progress)
    model.train()
    while step < total and not (max_seconds and time.perf_counter() - start >= max_seconds):
        done = max(step / total, (time.perf_counter() - start) / max_seconds if max_seconds else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * one_cycle(done, config.warmup)
        canvases, labels = draw_pairs(x, y, config.batch_size, generator)
        classifier_step(model, optimizer, centre_crops(canvases).to(device), labels.to(device), bar)
        step += 1
    bar.close()
    model.info = {"train_seconds": round(time.perf_counter() - start, 1), "steps": step}
    return model.eval()


@torch.no_grad()
def pair_accuracy(model: PairClassifier, n: int = 5000, seed: int = 0) -> float:
    """Share of n pairs of MNIST *test* digits (fixed seed) named right."""
    x, y = digits_as_tensors("test")
    canvases, labels = draw_pairs(x, y, n, torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    predicted = torch.cat([model(centre_crops(canvases[i:i + 500]).to(device)).argmax(1).cpu()
                           for i in range(0, n, 500)])
    return (predicted == labels).float().mean().item()


# ---------------------------------------------------------------------------------------------
# 5. The file: both classifiers in one checkpoint
# ---------------------------------------------------------------------------------------------


def classifier_path(path_or_dir) -> Path:
    """A folder means the file CLASSIFIER_FILE inside it; a path ending in .pt is the file itself."""
    path = Path(path_or_dir)
    return path if path.suffix == ".pt" else path / CLASSIFIER_FILE


def save_classifier(model: DigitClassifier, path_or_dir) -> Path:
    """Atomic write (checkpoints.save) of the weights, config and info of the classifier and of its pair
    classifier."""
    path = classifier_path(path_or_dir)
    pair = getattr(model, "pair", None)
    digit_weights = {k: v for k, v in model.state_dict().items() if not k.startswith("pair.")}
    stored_pair = None if pair is None else {"config": checkpoints.config_to_dict(pair.config),
                                             "model": pair.state_dict(), "info": pair.info}
    config = checkpoints.config_to_dict(model.config)
    return checkpoints.save({"stage": STAGE, "kind": STAGE, "config": config, "model": digit_weights,
                             "info": model.info, "pair": stored_pair}, path)


def read_classifier_file(path: Path, fix: str) -> dict:
    """checkpoints.read of stage "digit_classifier"; a file written before checkpoints had a stage
    (it says "kind": "digit_classifier" instead) is read as well."""
    try:
        return checkpoints.read(path, stage=STAGE, fix=fix)
    except ValueError:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            checkpoint = None
        if isinstance(checkpoint, dict) and "stage" not in checkpoint and checkpoint.get("kind") == STAGE:
            return checkpoint
        raise


def load_classifier(path_or_dir=DEFAULT_CLASSIFIER_DIR, device: str = "cpu") -> DigitClassifier:
    """The classifier stored by `python classifier.py --out DIR` (give DIR or DIR/classifier.pt), with
    its pair classifier in `.pair` when the file has one, in eval mode. A missing, corrupt or foreign
    file is an error that says how to make the right one."""
    path = classifier_path(path_or_dir)
    again = " --retrain" if path.exists() else ""  # the command never overwrites a file it cannot read
    fix = f"run `python classifier.py --out {path.parent}{again}` (a few minutes on a CPU)"
    checkpoint = read_classifier_file(path, fix)
    try:
        model = DigitClassifier(checkpoints.config_from(ClassifierConfig, checkpoint["config"], path))
        checkpoints.load_weights(model, checkpoint["model"], path, shape_fields=ARCHITECTURE_FIELDS)
        model.info = dict(checkpoint.get("info", {}))
        stored_pair = checkpoint.get("pair")  # None in files written before the pair classifier existed
        if stored_pair is not None:
            model.pair = PairClassifier(checkpoints.config_from(PairConfig, stored_pair["config"], path))
            checkpoints.load_weights(model.pair, stored_pair["model"], path,
                                     shape_fields=PAIR_ARCHITECTURE_FIELDS)
            model.pair.info = dict(stored_pair.get("info", {}))
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path} does not hold a usable digit classifier ({error!r}). "
                         f"Fix: {fix}.") from error
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# 6. The command line: train (or load) both classifiers and report their accuracy
# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    """Train (or load, when DIR/classifier.pt exists) and report accuracy on the MNIST test set. A file
    without a pair classifier (written before it existed) gets one trained and added."""
    path = classifier_path(args.out)
    loaded = path.exists() and not args.retrain
    if loaded:  # a corrupt file raises here: it is never silently overwritten (use --retrain)
        model = load_classifier(path, args.device)
    else:
        config = ClassifierConfig(epochs=args.epochs, seed=args.seed)
        print(f"seed {config.seed}; training the digit classifier on {torch.get_num_threads()} CPU thread(s)")
        model = train_classifier(config, max_seconds=args.max_seconds, device=args.device)
    x, y = digits_as_tensors("test")
    metrics = {"test_accuracy": classifier_accuracy(model, x, y),
               "shifted_test_accuracy": classifier_accuracy(model, x, y, max_shift=SHIFTED_TEST_SHIFT),
               "train_seconds": model.info.get("train_seconds"), "steps": model.info.get("steps"),
               "loaded": loaded, "path": str(path)}
    changed = not loaded
    if not loaded:
        model.info.update(test_accuracy=metrics["test_accuracy"],
                          shifted_test_accuracy=metrics["shifted_test_accuracy"])
    if model.pair is None:
        print(f"training the pair classifier (overlapping digits) on {torch.get_num_threads()} CPU thread(s)")
        model.pair = train_pair_classifier(PairConfig(steps=args.pair_steps, seed=args.seed),
                                           max_seconds=args.max_seconds, device=args.device)
        model.pair.info["pair_accuracy"] = pair_accuracy(model.pair)
        changed = True
    metrics.update(pair_accuracy=model.pair.info.get("pair_accuracy"),
                   pair_train_seconds=model.pair.info.get("train_seconds"),
                   pair_steps=model.pair.info.get("steps"))
    if changed:
        save_classifier(model, path)
    return metrics


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Train (or load) the digit classifier and its pair classifier (the judges of "
                               "evaluate.py and reader.py); report their test accuracy.")
    parser.add_argument("--out", default=DEFAULT_CLASSIFIER_DIR, help=f"folder of {CLASSIFIER_FILE}")
    parser.add_argument("--epochs", type=int, default=ClassifierConfig.epochs)
    parser.add_argument("--max-seconds", "--max_seconds", dest="max_seconds", type=float, default=0.0,
                        help="stop training each classifier after this many seconds (0 = no time limit)")
    parser.add_argument("--retrain", action="store_true", help="train even when the file exists")
    parser.add_argument("--pair-steps", "--pair_steps", dest="pair_steps", type=int, default=PairConfig.steps,
                        help="steps of the pair classifier, which reads two overlapping digits")
    parser.add_argument("--seed", type=int, default=ClassifierConfig.seed)
    parser.add_argument("--device", default=runtime.DEFAULT_DEVICE)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: measured 5x faster than 2 on a busy 2-core "
                             "CPU); 0 = torch's default")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    args = build_parser(prog).parse_args(argv)
    with runtime.cpu_threads(args.threads):
        metrics = run(args)
    for name, value in metrics.items():
        print(f"  {name:32s} {value:.4f}" if isinstance(value, float) else f"  {name:32s} {value}")
    if args.json:
        print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
