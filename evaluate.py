"""Offline metrics for NÜWA-mini: one sub-command per kind of measurement (and `classifier`, an
alias of `python classifier.py`, which trains the digit classifier the measurements read with).

    python evaluate.py recon --ckpt out/vqgan/ckpt.pt [--num-sequences 1000] [--json]
    python evaluate.py recon --ckpt out/seg/ckpt.pt --json          # a VQ-GAN-Seg checkpoint
    python evaluate.py caption-check --out out/classifier --json    # the caption metric on real clips
    python evaluate.py t2v --ckpt out/nuwa/ckpt.pt --json           # text → video: captions, FLD
    python evaluate.py predict --ckpt out/nuwa/ckpt.pt --json       # 10 → 10 video prediction
    python evaluate.py word-use --ckpt out/nuwa/ckpt.pt             # does it read the direction words?
    python evaluate.py infinity --ckpt out/infinity/ckpt.pt         # NÜWA-Infinity: wide canvases
    python evaluate.py classifier --out out/classifier              # the same as `python classifier.py`

Papers: NÜWA (arXiv 2111.12417) reports FID, CLIPSIM and FVD, computed with pretrained networks
(Inception, CLIP, I3D) that do not exist offline. Here the judges are trained on our own data:
the digit classifier (classifier.py, which trains it; `evaluate.py classifier` is its alias) and
the video reader built around it (reader.py).
- Caption accuracy: the reader turns a video back into its caption; the share read right is our
  stand-in for CLIPSIM. On the held-out compositional split it measures generalisation to unseen
  (digit, motion) pairs. `caption-check` runs the reader on real clips: a judge must be right
  about real videos before it may judge a model.
- Fréchet LeNet Distance (FLD): the Fréchet distance of FID (Heusel et al. 2017) computed on the
  classifier's penultimate features of digit crops instead of Inception features. It is a stand-in
  for FID and is never called FID: the numbers are not comparable with any published FID.
- `recon` measures the tokenizer (NÜWA §3.1), the ceiling of every generation; `predict` scores
  NÜWA's V2V task next to the copy-last-frame baseline; `word-use` (no judge) compares the
  likelihood of real clips under their caption and under a changed one; `infinity` reads
  NÜWA-Infinity's (arXiv 2207.09814) canvases wider, and videos longer, than it was trained on.

Sections: 1. image metrics · 2. `recon` · 3. caption accuracy and `caption-check` · 4. FLD · 5. `t2v` ·
6. `predict` · 7. `word-use` · 8. the command line. `infinity` lives in evaluate_infinity.py.

Glossary: B batch, T frames, H W pixels (64 × 64 frames; digits are 28 × 28), D digits per clip,
K codebook size, μ σ local means / deviations (SSIM), μ Σ feature means / covariances (FLD),
F feature width.

Conventions: frames are in [0, 1]; reconstructions and samples are clamped to [0, 1]
before scoring (what a viewer sees); MSE and MAE are summed over the 64×64 pixels of a frame and
averaged over frames (OpenSTL); PSNR and SSIM are computed per frame and averaged. Results are on
"our Moving MNIST test set (seed 0)", not the official mnist_test_seq.npy. With `--json` the last
printed line is one JSON object.

Deviations from the papers: none from the metric definitions. SSIM uses the 'valid' part of the
Gaussian filtering (no padding), as the reference MATLAB implementation of Wang et al. does. The
judges themselves (classifier, reader, FLD features) replace the papers' pretrained networks, as
stated above.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

# Idle OpenMP threads sleep instead of spinning (see train.py: spinning is ruinous on a shared CPU).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import data  # noqa: E402
import evaluate_infinity  # noqa: E402
import nuwa  # noqa: E402
import reader  # noqa: E402
import runtime  # noqa: E402
import tasks  # noqa: E402
import vqgan  # noqa: E402
from classifier import CLASSIFIER_FILE, DEFAULT_CLASSIFIER_DIR, classifier_path, load_classifier  # noqa: E402
from classifier import main as classifier_main  # noqa: E402

# ---------------------------------------------------------------------------------------------
# 1. Image metrics
# ---------------------------------------------------------------------------------------------

SSIM_WINDOW = 11  # Gaussian window side (Wang et al. 2004)
SSIM_SIGMA = 1.5  # Gaussian window σ (Wang et al. 2004)
SSIM_K1, SSIM_K2 = 0.01, 0.03  # the standard stabilising constants: C1 = (K1 L)², C2 = (K2 L)²
PSNR_FLOOR_MSE = 1e-10  # an exact reconstruction would have infinite PSNR; cap it at 100 dB


def frame_mse(x_rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-frame squared error summed over pixels (OpenSTL's MSE): (N, 1, H, W) pairs → (N,)."""
    return (x_rec - x).pow(2).flatten(1).sum(1)


def psnr(x_rec: torch.Tensor, x: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR = 10 log10(L² / mean squared error), per frame: (N, 1, H, W) pairs → (N,) in dB."""
    mse = (x_rec - x).pow(2).flatten(1).mean(1).clamp_min(PSNR_FLOOR_MSE)  # (N,)
    return 10 * torch.log10(data_range**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 2D Gaussian (1, 1, size, size): the outer product of a 1D Gaussian with itself."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2  # (size,)
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # (1, 1, size, size)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM (Wang et al. 2004, eq. 13), mean over the valid windows of each frame: (N, 1, H, W) → (N,).

    SSIM = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2)), with local statistics
    from an 11×11 Gaussian window of σ = 1.5, C1 = (0.01 L)², C2 = (0.03 L)², L = data_range.
    """
    if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"ssim expects two (N, 1, H, W) tensors of equal shape, "
                         f"got {tuple(x.shape)}, {tuple(y.shape)}")
    window = gaussian_window().to(x.device)
    x, y = x.double(), y.double()
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)  # (N, 1, H-10, W-10)
    var_x = F.conv2d(x * x, window) - mu_x**2  # σx²
    var_y = F.conv2d(y * y, window) - mu_y**2  # σy²
    cov_xy = F.conv2d(x * y, window) - mu_x * mu_y  # σxy
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
    ssim_map = numerator / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))  # (N, 1, H-10, W-10)
    return ssim_map.flatten(1).mean(1).float()  # (N,)


def frame_scores(prediction: torch.Tensor, truth: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-frame MSE, MAE (summed over pixels), PSNR and SSIM of videos (B, T, 1, H, W) → each (B, T)."""
    B, T = truth.shape[:2]
    x_hat, x = prediction.float().flatten(0, 1), truth.float().flatten(0, 1)  # (B·T, 1, H, W)
    scores = {"mse": frame_mse(x_hat, x), "mae": (x_hat - x).abs().flatten(1).sum(1),
              "psnr": psnr(x_hat, x), "ssim": ssim(x_hat, x)}
    return {name: value.view(B, T) for name, value in scores.items()}


# ---------------------------------------------------------------------------------------------
# 2. recon: how much the tokenizer loses
# ---------------------------------------------------------------------------------------------


def frames_read(videos: torch.Tensor, items: list[dict], classifier) -> torch.Tensor:
    """How many of the clips' frames 10 … 19 the reader reads right (`digits_found`): videos
    (B, 20, 1, 64, 64) in [0, 1], one clip item per video → (10,) counts."""
    return torch.tensor([sum(reader.digits_found(video[t], item["digits"], classifier)
                             for video, item in zip(videos, items))
                         for t in range(10, 20)], dtype=torch.float64)  # (10,)


@torch.no_grad()
def recon_frames(model: vqgan.VQGAN, num_sequences: int, batch_size: int, device: torch.device,
                 classifier=None) -> dict:
    """x̂ = decode(encode(x)) on every frame of the first `num_sequences` 20-frame test sequences.

    With a classifier, also the tokenizer's ceiling for 10 → 10 prediction (`predict`): how often the
    reader finds both digits in the real frames 10–19 and in their round trips, over all ten frames
    and in the last one. A predictor drawing these codes can at best match the round trip."""
    clips = data.MovingMNIST("test", num_frames=20, num_digits=2, seed=0, length=num_sequences)
    totals = {"frame_mse": 0.0, "frame_mae": 0.0, "psnr": 0.0, "ssim": 0.0}
    found = {name: torch.zeros(10, dtype=torch.float64) for name in ("real", "recon")}  # per frame 10 … 19
    used = torch.zeros(model.codebook_size, dtype=torch.bool)
    frames = 0
    for _, items in runtime.in_batches(clips, batch_size):
        video = torch.stack([item["video"] for item in items]).to(device)  # (B, T, 1, 64, 64)
        tokens = model.encode_video(video)  # (B, T, h, w)
        x_rec = model.decode_video(tokens).float().clamp(0, 1)  # (B, T, 1, 64, 64)
        for name, value in frame_scores(x_rec, video).items():  # each (B, T)
            totals[name if name in ("psnr", "ssim") else f"frame_{name}"] += value.sum().item()
        used[tokens.flatten().unique().cpu()] = True
        frames += video.shape[0] * video.shape[1]
        if classifier is not None:
            found["real"] += frames_read(video.float().clamp(0, 1).cpu(), items, classifier)
            found["recon"] += frames_read(x_rec.cpu(), items, classifier)
    metrics = {name: total / frames for name, total in totals.items()}
    metrics["codebook_usage"] = used.float().mean().item()
    metrics["frames"] = frames
    if classifier is not None:
        for name, count in found.items():
            metrics[f"{name}_last_frame_digits"] = count[-1].item() / num_sequences  # as `predict` names them
            metrics[f"{name}_frames_10_19_digits"] = count.mean().item() / num_sequences
    return metrics


@torch.no_grad()
def recon_sketches(model: vqgan.VQGAN, num_sequences: int, batch_size: int, device: torch.device) -> dict:
    """Pixel accuracy of VQ-GAN-Seg on held-out sketch maps (unseen digit-motion pairs, MNIST test
    digits)."""
    clips = data.CaptionedMovingMNIST("heldout", num_frames=10, num_digits=2, seed=0, length=num_sequences)
    correct = foreground_correct = foreground = pixels = 0
    used = torch.zeros(model.codebook_size, dtype=torch.bool)
    for _, items in runtime.in_batches(clips, batch_size):
        sketch = torch.stack([item["sketch"] for item in items]).to(device)  # (B, T, 64, 64)
        tokens = model.encode_sketch(sketch)  # (B, T, h, w)
        rec = model.decode_sketch(tokens)  # (B, T, 64, 64)
        correct += (rec == sketch).sum().item()
        digit_pixels = sketch > 0  # (B, T, 64, 64)
        foreground_correct += (rec == sketch)[digit_pixels].sum().item()
        foreground += digit_pixels.sum().item()
        pixels += sketch.numel()
        used[tokens.flatten().unique().cpu()] = True
    return {"pixel_accuracy": correct / pixels,
            "foreground_accuracy": foreground_correct / max(foreground, 1),
            "codebook_usage": used.float().mean().item(), "frames": pixels // sketch[0, 0].numel()}


def run_recon(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    model = vqgan.load_vqgan(args.ckpt, map_location=device)
    is_seg = model.config.rec_loss == "ce"
    if is_seg:
        if args.classifier:
            raise ValueError(f"--classifier reads digits in frames; {args.ckpt} is a sketch tokenizer "
                             "(VQ-GAN-Seg)")
        metrics = recon_sketches(model, args.num_sequences, args.batch_size, device)
    else:
        classifier = load_classifier(args.classifier, args.device) if args.classifier else None
        metrics = recon_frames(model, args.num_sequences, args.batch_size, device, classifier)
    metrics.update(kind="seg" if is_seg else "frames", ckpt=str(args.ckpt), num_sequences=args.num_sequences,
                   codebook_size=model.codebook_size, token_shape=list(model.config.token_shape))
    if args.grid:
        save_recon_grid(model, is_seg, args.grid, device)
    return metrics


@torch.no_grad()
def save_recon_grid(model: vqgan.VQGAN, is_seg: bool, path: str, device: torch.device) -> None:
    """A PNG of test clips and their reconstructions (the picture the tokenizer stages draw)."""
    (vqgan.sketch_reconstruction_grid if is_seg else vqgan.reconstruction_grid)(model.to(device), path)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
# 3. Caption accuracy, and `caption-check`: the reader on real clips
# ---------------------------------------------------------------------------------------------


def accuracies(scores: list[dict[str, bool]]) -> dict:
    """caption_accuracy, digit_accuracy, motion_accuracy: fractions of videos judged right."""
    n = max(len(scores), 1)
    return {"caption_accuracy": sum(s["caption"] for s in scores) / n,
            "digit_accuracy": sum(s["digit"] for s in scores) / n,
            "motion_accuracy": sum(s["motion"] for s in scores) / n, "num_videos": len(scores)}


CAPTION_SPLITS = {"seen": "test", "heldout": "heldout"}  # our name → data.CaptionedMovingMNIST split
REAL_FLOOR_SEED = 1  # a second real set for FLD's floor (the evaluated captions use seed 0)
MAX_MISREADS_SHOWN = 5  # examples of wrong readings kept in the report, for a human to look at


@torch.no_grad()
def run_caption_check(args: argparse.Namespace) -> dict:
    """The reader on real held-out captioned clips (MNIST test digits; seen and held-out (digit,
    motion) combinations; 1 and 2 digits), optionally through a VQ-GAN first (the tokenizer's ceiling).

    Besides the four groups, it reports the 2-digit clips whose strokes overlap in every frame (the
    reader had to cut them apart by k-means): there even a person often cannot tell the digits."""
    classifier = load_classifier(args.out, args.device)
    tokenizer = vqgan.load_vqgan(args.vqgan, map_location=args.device).to(args.device) if args.vqgan else None
    scores: dict[tuple[str, int], list] = {}
    overlapping, misreads = [], []
    bar = runtime.progress(total=len(CAPTION_SPLITS) * 2 * args.num_videos, desc="caption-check",
                           unit="video")
    for name, split in CAPTION_SPLITS.items():
        for num_digits in (1, 2):
            clips = data.CaptionedMovingMNIST(split, num_frames=args.frames, num_digits=num_digits,
                                              seed=args.seed, length=args.num_videos)
            group = scores[(name, num_digits)] = []
            for index in range(len(clips)):
                item = clips[index]
                video = item["video"]  # (T, 1, 64, 64)
                if tokenizer is not None:
                    tokens = tokenizer.encode_video(video[None].to(args.device))  # (1, T, h, w)
                    video = tokenizer.decode_video(tokens).float().clamp(0, 1)[0].cpu()
                reading = reader.read_video(video, classifier, num_digits)
                group.append(reader.score_reading(reading, item["digits"].tolist(), item["motions"]))
                if reading.cut == "kmeans":
                    overlapping.append(group[-1])
                if not group[-1]["caption"] and len(misreads) < MAX_MISREADS_SHOWN:
                    misreads.append({"split": split, "num_digits": num_digits, "index": index,
                                     "caption": item["caption"], "read": reading.caption, "cut": reading.cut})
                bar.update(1)
    bar.close()
    metrics = accuracies([s for group in scores.values() for s in group])
    for (name, num_digits), group in scores.items():
        metrics[f"{name}_{num_digits}digit"] = accuracies(group)
    for num_digits, key in ((1, "one_digit"), (2, "two_digits")):
        metrics[key] = accuracies([s for (_, n), group in scores.items() if n == num_digits for s in group])
    metrics["two_digits_overlapping_in_every_frame"] = accuracies(overlapping)
    metrics.update(frames=args.frames, seed=args.seed, through_vqgan=args.vqgan or None, misreads=misreads,
                   classifier=str(classifier_path(args.out)))
    return metrics


# ---------------------------------------------------------------------------------------------
# 4. Fréchet LeNet Distance (FLD)
# ---------------------------------------------------------------------------------------------


def symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The PSD square root of a symmetric matrix: V diag(√λ) Vᵀ from its eigendecomposition (λ < 0,
    which only rounding produces, set to 0)."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, F) and (M, F):

        d² = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2})     (Dowson & Landau 1982; FID's formula)

    Tr (Σ_a Σ_b)^{1/2} = Tr (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2}: the two products have the same
    eigenvalues, and the second is symmetric PSD, so numpy's eigh gives its root stably — no
    complex parts to discard as with a general matrix square root (scipy.linalg.sqrtm of Σ_a Σ_b)."""
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two feature sets (N, F) and (M, F), got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a covariance needs at least 2 samples per set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)  # (F,)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # (F, F)
    root_a = symmetric_sqrt(sigma_a)
    middle = root_a @ sigma_b @ root_a  # (F, F), symmetric PSD
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    d2 = ((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_root
    return float(max(d2, 0.0))  # exact copies give ±1e-12 from rounding


def fld_or_nan(generated: np.ndarray, real: np.ndarray) -> float:
    """FLD, or NaN when one side has fewer than 2 crops (a model that draws no digits at all)."""
    return frechet_distance(generated, real) if len(generated) >= 2 and len(real) >= 2 else float("nan")


# ---------------------------------------------------------------------------------------------
# 5. t2v: text → video, judged by the reader (caption accuracy) and by FLD
# ---------------------------------------------------------------------------------------------


def load_models(args: argparse.Namespace) -> tasks.Models:
    """A NÜWA checkpoint and the VQ-GAN it records (tasks.Models: the one loader sample.py uses too)."""
    return tasks.Models(args.ckpt, args.vqgan, device=args.device)


@torch.no_grad()
def run_t2v(args: argparse.Namespace) -> dict:
    """Generate a video for each caption of the seen and held-out test splits; read it back."""
    models = load_models(args)
    classifier = load_classifier(args.classifier, args.device)
    config = models.nuwa.config
    frames, num_digits = args.frames or config.frames, args.num_digits or config.num_digits
    sampling = {**runtime.sampling_options(args, args.device), "guidance_scale": args.guidance}
    if args.redraw_empty:
        sampling["blank_codes"] = models.vqgan.blank_codes()
    print(f"seed {args.seed}; {frames} frames, {num_digits} digit(s); temperature {args.temperature}, "
          f"top-k {args.top_k or 'off'}, guidance {args.guidance or 'off'}, redraw empty frame 0 "
          f"{'on' if args.redraw_empty else 'off'}")
    metrics, all_scores, real_scores, generated, real = {}, [], [], [], []
    bar = runtime.progress(total=len(CAPTION_SPLITS) * args.num_videos, desc="t2v", unit="video")
    for name, split in CAPTION_SPLITS.items():
        clips = data.CaptionedMovingMNIST(split, num_frames=frames, num_digits=num_digits, seed=0,
                                          length=args.num_videos)
        scores = []
        for _, items in runtime.in_batches(clips, args.batch_size):
            tokens = tasks.text_to_video(models.nuwa, [item["caption"] for item in items], frames, **sampling)
            videos = models.pixels(tokens)  # (B, T, 1, 64, 64) in [0, 1]
            for video, item in zip(videos, items):
                reading = reader.read_video(video, classifier, num_digits)
                scores.append(reader.score_reading(reading, item["digits"].tolist(), item["motions"]))
                generated.append(reading)
                real.append(reader.read_video(item["video"], classifier, num_digits))  # the caption's clip
                real_scores.append(reader.score_reading(real[-1], item["digits"].tolist(), item["motions"]))
            bar.update(len(items))
        metrics[name] = accuracies(scores)
        all_scores += scores
    bar.close()
    metrics.update(accuracies(all_scores))
    metrics["fld"] = fld_or_nan(reader.reading_features(generated), reader.reading_features(real))
    # FLD is biased upwards, the more the fewer the crops (F = 128 features from a few thousand
    # crops of a few hundred digits), so a model's FLD means something only next to what a perfect
    # generator would score at the same size: an independent real set (other digits and starts, seed 1).
    other = [reader.read_video(clips_other[i]["video"], classifier, num_digits)
             for split in CAPTION_SPLITS.values()
             for clips_other in [data.CaptionedMovingMNIST(split, num_frames=frames, num_digits=num_digits,
                                                           seed=REAL_FLOOR_SEED, length=args.num_videos)]
             for i in range(len(clips_other))]
    metrics["fld_real_floor"] = fld_or_nan(reader.reading_features(other), reader.reading_features(real))
    metrics["real_caption_accuracy"] = accuracies(real_scores)["caption_accuracy"]  # the judge on the truth
    metrics.update(frames=frames, num_digits=num_digits, guidance=args.guidance,
                   redraw_empty=args.redraw_empty, **runtime.sampling_report(args))
    return metrics


# ---------------------------------------------------------------------------------------------
# 6. predict: 10 → 10 video prediction (NÜWA's V2V task) next to the copy-last-frame baseline
# ---------------------------------------------------------------------------------------------


def copy_last_frame(video: torch.Tensor, given: int) -> torch.Tensor:
    """The baseline predictor: the last given frame, repeated. (B, T, …) → frames given … T−1
    (B, T − given, …)."""
    if not 0 < given < video.shape[1]:
        raise ValueError(f"need 0 < given < T frames, got given={given} for T={video.shape[1]}")
    last = video[:, given - 1:given]  # (B, 1, ...)
    return last.expand(-1, video.shape[1] - given, *video.shape[2:])  # (B, T - given, ...)


@torch.no_grad()
def run_predict(args: argparse.Namespace) -> dict:
    """NÜWA V2V on our Moving MNIST test set (seed 0; 2 digits, or 1 with --num-digits 1): the first
    `given` real frames are tokenized and forced, the rest sampled; scores over the predicted frames only."""
    if not 0 < args.given < args.frames:
        raise ValueError(f"need 0 < --given < --frames, got {args.given} and {args.frames}")
    models = load_models(args)
    classifier = load_classifier(args.classifier, args.device)
    sampling = runtime.sampling_options(args, args.device)
    clips = data.MovingMNIST("test", num_frames=args.frames, num_digits=args.num_digits, seed=0,
                             length=args.num_videos)
    found: dict[str, int] = {}  # every digit of the clip read in the last frame, per candidate
    print(f"seed {args.seed}; {args.num_digits} digit(s); {args.given} → {args.frames - args.given} frames; "
          f"temperature {args.temperature}, top-k {args.top_k or 'off'}")
    sums: dict[str, torch.Tensor] = {}
    bar = runtime.progress(total=len(clips), desc="predict", unit="video")
    for _, items in runtime.in_batches(clips, args.batch_size):
        video = torch.stack([item["video"] for item in items])  # (B, T, 1, 64, 64)
        tokens = models.tokens(video)  # (B, T, h, w): every real frame tokenized
        predicted = tasks.predict_video(models.nuwa, tokens[:, :args.given], args.frames, window=args.window,
                                        **sampling)  # (B, T, h, w)
        truth = video[:, args.given:]  # (B, T - given, 1, 64, 64)
        candidates = {"": models.pixels(predicted)[:, args.given:],  # NÜWA
                      "copy_last_": copy_last_frame(video, args.given),  # the baseline
                      # An empty canvas. Per-frame MSE rewards hedging: a digit drawn in the wrong place
                      # costs twice what no digit costs, so a model that has not learnt motion can beat
                      # copy-last by fading out. Below this line, a prediction has learnt something.
                      "blank_": torch.zeros_like(truth),
                      "recon_": models.pixels(tokens)[:, args.given:]}  # the tokenizer's ceiling
        candidates["real_"] = truth  # the reader's own ceiling on the last frame
        for prefix, prediction in candidates.items():
            if prefix != "real_":
                for name, value in frame_scores(prediction, truth).items():
                    sums[prefix + name] = sums.get(prefix + name, 0) + value.sum(0)  # (T - given,)
            if prefix != "blank_":
                last = prediction[:, -1].float().clamp(0, 1).cpu()  # (B, 1, 64, 64)
                read = [reader.digits_found(frame, item["digits"], classifier)
                        for frame, item in zip(last, items)]
                found[prefix] = found.get(prefix, 0) + sum(read)
        bar.update(len(video))
    bar.close()
    metrics = {name: (total.sum() / (len(clips) * total.numel())).item() for name, total in sums.items()}
    metrics["mse_per_frame"] = [round(v, 3) for v in (sums["mse"] / len(clips)).tolist()]
    for prefix, count in found.items():
        metrics[f"{prefix}last_frame_digits"] = count / len(clips)
        if args.num_digits == 2:  # the name these figures had before --num-digits (README, notes)
            metrics[f"{prefix}last_frame_both_digits"] = count / len(clips)
    metrics.update(num_videos=len(clips), num_digits=args.num_digits, given=args.given, frames=args.frames,
                   window=args.window, **runtime.sampling_report(args))
    return metrics


# ---------------------------------------------------------------------------------------------
# 7. word-use: does the model listen to each kind of caption word? (a likelihood test)
# ---------------------------------------------------------------------------------------------

# What each kind of word is changed to. Flipping every direction word keeps the caption valid and
# the axis the same ("left then right" ↔ "right then left"); the digit word becomes the next digit.
WORD_CHANGES = {"direction": {"left": "right", "right": "left", "up": "down", "down": "up"},
                "digit": {str(d): str((d + 1) % 10) for d in range(10)}}


def changed_caption(caption: str, kind: str) -> str:
    return " ".join(WORD_CHANGES[kind].get(word, word) for word in caption.split())


@torch.no_grad()
def run_word_use(args: argparse.Namespace) -> dict:
    """Teacher-forced nats of real test clips under their own caption and under the caption with one
    kind of word changed. A model that reads a word gives its clip a higher likelihood under the
    true word: the gap (changed − true, nats per frame, summed over the frame's tokens) and the
    share of clips better explained by the true caption (chance 0.5) say how much. No sampling and
    no judge: it isolates the text → video link. Where a digit goes first is decided in frame 1
    (only the caption says it); from frame 2 on the frames themselves show the motion."""
    models = load_models(args)
    model, tokenizer = models.nuwa, models.vqgan
    frames = args.frames or model.config.frames
    clips = data.CaptionedMovingMNIST("test", num_frames=frames, num_digits=1, seed=0, length=args.num_videos)
    nats = {kind: torch.zeros(len(clips), frames) for kind in ("true", *WORD_CHANGES)}  # (n, T) per caption
    batches = runtime.in_batches(clips, args.batch_size)
    for first, items in runtime.progress(batches, desc="word-use", unit="batch"):
        video = torch.stack([item["video"] for item in items]).to(args.device)  # (b, T, 1, 64, 64)
        tokens = tokenizer.encode_video(video)  # (b, T, h, w)
        for kind in nats:
            captions = [item["caption"] if kind == "true" else changed_caption(item["caption"], kind)
                        for item in items]
            cond = nuwa.text_condition(model.vocabulary, captions)
            per_token = model.token_nats(cond, tokens)  # (b, N); encode moves the caption's ids
            nats[kind][first:first + len(items)] = per_token.view(len(items), frames, -1).sum(-1).cpu()
    metrics = {"true_nats_per_frame": [round(v, 3) for v in nats["true"].mean(0).tolist()]}
    for kind in WORD_CHANGES:
        gap = nats[kind] - nats["true"]  # (n, T)
        metrics[kind] = {"gap_nats_per_frame": [round(v, 3) for v in gap.mean(0).tolist()],
                         "gap_nats": gap.sum(1).mean().item(),
                         "true_preferred": (gap.sum(1) > 0).float().mean().item()}
    metrics.update(frames=frames, num_videos=len(clips), ckpt=str(args.ckpt))
    return metrics


# ---------------------------------------------------------------------------------------------
# 8. Command line
# ---------------------------------------------------------------------------------------------

SUBCOMMANDS = {"recon": run_recon, "caption-check": run_caption_check, "t2v": run_t2v, "predict": run_predict,
               "word-use": run_word_use, "infinity": evaluate_infinity.run_infinity}


def add_common(parser: argparse.ArgumentParser, threads: int = 1) -> None:
    parser.add_argument("--device", default=runtime.DEFAULT_DEVICE)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--threads", type=int, default=threads,
                        help="CPU threads for torch (default 1: small kernels; on a busy 2-core CPU 2 "
                             "threads ran 5x slower than 1); 0 = torch's default")


def add_model(parser: argparse.ArgumentParser, *, num_videos: int = 100) -> None:
    """The checkpoint to measure, and how many videos, in batches of how many."""
    parser.add_argument("--ckpt", default="out/nuwa/ckpt.pt", help="NÜWA checkpoint (train.py --stage nuwa)")
    parser.add_argument("--vqgan", default=None,
                        help="override the VQ-GAN checkpoint the NÜWA checkpoint records")
    parser.add_argument("--num-videos", "--num_videos", dest="num_videos", type=int, default=num_videos)
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=16,
                        help="videos generated (or scored) together")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Offline metrics for NÜWA-mini.")
    sub = parser.add_subparsers(dest="command", required=True)
    recon = sub.add_parser("recon", help="tokenizer reconstruction: frame MSE, PSNR, SSIM, codebook usage "
                                         "(VQ-GAN) or pixel accuracy (VQ-GAN-Seg)")
    recon.add_argument("--ckpt", required=True, help="checkpoint written by train.py --stage vqgan or seg")
    recon.add_argument("--num-sequences", "--num_sequences", dest="num_sequences", type=int, default=1000,
                       help="test sequences to use (20 frames each for frames, 10 for sketches)")
    recon.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8,
                       help="sequences per forward pass")
    recon.add_argument("--grid", default="", help="also write a PNG of reconstructions to this path")
    recon.add_argument("--classifier", default="",
                       help="a digit classifier folder (e.g. out/classifier): also report how often the "
                            "reader finds both digits in real frames 10-19 and in their round trips (the "
                            "ceiling of `predict`)")
    add_common(recon, threads=0)

    # An alias, not a measurement: main() hands everything after the word to classifier.py's command line.
    sub.add_parser("classifier", add_help=False,
                   help="alias of `python classifier.py`: train (or load) the digit classifier")

    check = sub.add_parser("caption-check", help="caption accuracy of the reader on real held-out clips")
    check.add_argument("--out", default=DEFAULT_CLASSIFIER_DIR, help=f"folder of {CLASSIFIER_FILE}")
    check.add_argument("--num-videos", "--num_videos", dest="num_videos", type=int, default=250,
                       help="clips per group (seen / held-out × 1 / 2 digits; default 250, 1000 in all)")
    check.add_argument("--frames", type=int, default=10, help="frames per clip (NÜWA's T2V: 10)")
    check.add_argument("--seed", type=int, default=0,
                       help="seed of the clips (0: the clips t2v's captions come from; the reader's "
                            "constants were tuned looking at those, so check another seed too)")
    check.add_argument("--vqgan", default=None,
                       help="read VQ-GAN reconstructions instead (the tokenizer's ceiling)")
    add_common(check)

    t2v = sub.add_parser("t2v", help="text → video: caption accuracy (seen / held-out) and FLD")
    add_model(t2v)
    runtime.add_sampling_flags(t2v)
    t2v.add_argument("--classifier", default=DEFAULT_CLASSIFIER_DIR, help=f"folder of {CLASSIFIER_FILE}")
    t2v.add_argument("--frames", type=int, default=0, help="frames per video (0 = the checkpoint's `frames`)")
    t2v.add_argument("--num-digits", "--num_digits", dest="num_digits", type=int, default=0,
                     choices=[0, 1, 2], help="digits per caption (0 = the checkpoint's `num_digits`)")
    t2v.add_argument("--redraw-empty", "--redraw_empty", dest="redraw_empty", action="store_true",
                     help="draw frame 0 again while it holds no ink (tasks.text_to_image's blank_codes)")
    add_common(t2v)

    predict = sub.add_parser("predict", help="video prediction: MSE, MAE, PSNR, SSIM vs copy-last-frame")
    add_model(predict)
    runtime.add_sampling_flags(predict, guidance=False)
    predict.add_argument("--given", type=int, default=10, help="real frames given (default 10)")
    predict.add_argument("--frames", type=int, default=20, help="frames in all, given + predicted")
    predict.add_argument("--num-digits", "--num_digits", dest="num_digits", type=int, choices=(1, 2),
                         default=2, help="digits per test clip (default 2, the classic Moving MNIST); 1 "
                         "isolates carrying one digit from keeping two apart")
    predict.add_argument("--window", type=int, default=None,
                         help="longest clip drawn in one pass; beyond it the prediction rolls (default: the "
                         "clip length the model was trained on; tasks.predict_video)")
    predict.add_argument("--classifier", default=DEFAULT_CLASSIFIER_DIR,
                         help=f"folder of {CLASSIFIER_FILE} (reads the digits of the last predicted frame)")
    add_common(predict)

    words = sub.add_parser("word-use", help="does text→video read the caption's direction and digit words? "
                           "(nats of real clips under true and changed captions)")
    add_model(words, num_videos=64)  # one-digit test clips
    words.add_argument("--frames", type=int, default=0,
                       help="frames per clip (0 = the checkpoint's `frames`)")
    add_common(words, threads=0)

    wide = sub.add_parser("infinity", help="NÜWA-Infinity: share of a wide canvas's slots read as digits")
    add_model(wide)
    runtime.add_sampling_flags(wide)
    wide.set_defaults(ckpt="out/infinity/ckpt.pt", batch_size=4)
    wide.add_argument("--num-canvases", "--num_canvases", dest="num_canvases", type=int, default=20)
    wide.add_argument("--width", type=int, default=512, help="canvas width in px (training: 128)")
    wide.add_argument("--height", type=int, default=64, help="canvas height in px")
    wide.add_argument("--direction", default="column", choices=("column", "raster"),
                      help="patch order of the canvases (outpainting needs given patches: sample.py "
                           "infinity)")
    wide.add_argument("--classifier", default=DEFAULT_CLASSIFIER_DIR, help=f"folder of {CLASSIFIER_FILE}")
    wide.add_argument("--grid", default="",
                      help="also write a PNG of canvases (and, for video, a GIF) to this path")
    wide.add_argument("--frames", type=int, default=0,
                      help="video models (data=video): frames to generate (0 = 100); --num-canvases is the "
                           "number of videos")
    wide.add_argument("--given", type=int, default=2, help="video models: real frames given (default 2)")
    wide.add_argument("--no-caption", "--no_caption", dest="no_caption", action="store_true",
                      help="video models trained with captions: generate under \"None\" instead of the "
                           "digit's name")
    add_common(wide)
    return parser


def flatten(metrics: dict, prefix: str = "") -> dict:
    """{"seen": {"caption_accuracy": …}} → {"seen.caption_accuracy": …}, for the printed table."""
    flat = {}
    for name, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{name}."))
        else:
            flat[prefix + name] = value
    return flat


def print_table(metrics: dict) -> None:
    for name, value in flatten(metrics).items():
        shown = f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else value
        print(f"  {name:32s} {shown}")


def json_safe(value):
    """NaN / inf → null (JSON has no NaN; Python would write a bare NaN that other tools reject)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["classifier"]:  # the alias: classifier.py's own command line, flags and all
        return classifier_main(argv[1:], prog="evaluate.py classifier")
    args = build_parser().parse_args(argv)
    with runtime.cpu_threads(args.threads):
        metrics = SUBCOMMANDS[args.command](args)
    print_table(metrics)
    if args.json:
        print(json.dumps(json_safe(metrics)))
    return metrics


if __name__ == "__main__":
    main()
