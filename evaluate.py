"""Offline metrics for NÜWA-mini, one sub-command per kind of evaluation.

    python evaluate.py recon --ckpt out/vqgan/ckpt.pt [--num-sequences 1000] [--json]
    python evaluate.py recon --ckpt out/seg/ckpt.pt --json          # a VQ-GAN-Seg checkpoint

Papers: NÜWA (arXiv 2111.12417) reports FID/CLIPSIM/FVD with pretrained networks that do not exist
offline; everything here is computed from our own data and models. `recon` measures the tokenizer
(NÜWA §3.1), the ceiling of every generation: what is lost in x → z → x̂ can never come back.

Sections: 1. image metrics (per-frame MSE and MAE in the OpenSTL convention, PSNR, SSIM of Wang et
al. 2004) · 2. `recon` for VQ-GAN frames and VQ-GAN-Seg sketch maps · 3. the command line.
Later sub-commands (classifier, t2v, predict, caption-check) join `SUBCOMMANDS`.

Glossary: B batch, T frames, H W pixels, K codebook size, μ σ local means / deviations of SSIM.

Conventions (SPEC §9): frames are in [0, 1]; reconstructions are clamped to [0, 1] before scoring
(what a viewer sees); MSE and MAE are summed over the 64×64 pixels of a frame and averaged over
frames; PSNR and SSIM are computed per frame and averaged. Results are on "our Moving MNIST test
set (seed 0)", not the official mnist_test_seq.npy. With `--json` the last printed line is one JSON
object.

Deviations: none from the metric definitions. SSIM uses the 'valid' part of the Gaussian filtering
(no padding), as the reference MATLAB implementation of Wang et al. does.
"""

from __future__ import annotations

import argparse
import json
import math
import os

# Idle OpenMP threads sleep instead of spinning (see train.py: spinning is ruinous on a shared CPU).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import data  # noqa: E402
import vqgan  # noqa: E402

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
        raise ValueError(f"ssim expects two (N, 1, H, W) tensors of equal shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    window = gaussian_window().to(x.device)
    x, y = x.double(), y.double()
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)  # (N, 1, H-10, W-10)
    var_x = F.conv2d(x * x, window) - mu_x**2  # σx²
    var_y = F.conv2d(y * y, window) - mu_y**2  # σy²
    cov_xy = F.conv2d(x * y, window) - mu_x * mu_y  # σxy
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1).float()  # (N,)


# ---------------------------------------------------------------------------------------------
# 2. recon: how much the tokenizer loses
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def recon_frames(model: vqgan.VQGAN, num_sequences: int, batch_size: int, device: torch.device) -> dict:
    """x̂ = decode(encode(x)) on every frame of the first `num_sequences` 20-frame test sequences."""
    clips = data.MovingMNIST("test", num_frames=20, num_digits=2, seed=0, length=num_sequences)
    totals = {"frame_mse": 0.0, "frame_mae": 0.0, "psnr": 0.0, "ssim": 0.0}
    used = torch.zeros(model.codebook_size, dtype=torch.bool)
    frames = 0
    for first in range(0, num_sequences, batch_size):
        video = torch.stack([clips[i]["video"] for i in range(first, min(first + batch_size, num_sequences))])
        video = video.to(device)  # (B, T, 1, 64, 64)
        tokens = model.encode_video(video)  # (B, T, h, w)
        x = video.flatten(0, 1)  # (B·T, 1, 64, 64)
        x_rec = model.decode_video(tokens).float().clamp(0, 1).flatten(0, 1)  # (B·T, 1, 64, 64)
        totals["frame_mse"] += frame_mse(x_rec, x).sum().item()
        totals["frame_mae"] += (x_rec - x).abs().flatten(1).sum(1).sum().item()
        totals["psnr"] += psnr(x_rec, x).sum().item()
        totals["ssim"] += ssim(x_rec, x).sum().item()
        used[tokens.flatten().unique().cpu()] = True
        frames += len(x)
    metrics = {name: total / frames for name, total in totals.items()}
    metrics["codebook_usage"] = used.float().mean().item()
    metrics["frames"] = frames
    return metrics


@torch.no_grad()
def recon_sketches(model: vqgan.VQGAN, num_sequences: int, batch_size: int, device: torch.device) -> dict:
    """Pixel accuracy of VQ-GAN-Seg on held-out sketch maps (unseen digit-motion pairs, MNIST test digits)."""
    clips = data.CaptionedMovingMNIST("heldout", num_frames=10, num_digits=2, seed=0, length=num_sequences)
    correct = foreground_correct = foreground = pixels = 0
    used = torch.zeros(model.codebook_size, dtype=torch.bool)
    for first in range(0, num_sequences, batch_size):
        sketch = torch.stack([clips[i]["sketch"] for i in range(first, min(first + batch_size, num_sequences))])
        sketch = sketch.to(device)  # (B, T, 64, 64)
        tokens = model.encode_sketch(sketch)  # (B, T, h, w)
        rec = model.decode_sketch(tokens)  # (B, T, 64, 64)
        correct += (rec == sketch).sum().item()
        digit_pixels = sketch > 0  # (B, T, 64, 64)
        foreground_correct += (rec == sketch)[digit_pixels].sum().item()
        foreground += digit_pixels.sum().item()
        pixels += sketch.numel()
        used[tokens.flatten().unique().cpu()] = True
    return {"pixel_accuracy": correct / pixels, "foreground_accuracy": foreground_correct / max(foreground, 1),
            "codebook_usage": used.float().mean().item(), "frames": pixels // sketch[0, 0].numel()}


def run_recon(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    model = vqgan.load_vqgan(args.ckpt, map_location=device)
    is_seg = model.config.rec_loss == "ce"
    measure = recon_sketches if is_seg else recon_frames
    metrics = measure(model, args.num_sequences, args.batch_size, device)
    metrics.update(kind="seg" if is_seg else "frames", ckpt=str(args.ckpt), num_sequences=args.num_sequences,
                   codebook_size=model.codebook_size, token_shape=list(model.config.token_shape))
    if args.grid:
        save_recon_grid(model, is_seg, args.grid, device)
    return metrics


@torch.no_grad()
def save_recon_grid(model: vqgan.VQGAN, is_seg: bool, path: str, device: torch.device) -> None:
    """A PNG of test clips and their reconstructions (train.py's visualisers draw it)."""
    import train

    (train.visualise_sketches if is_seg else train.visualise_frames)(model.to(device), model.config, path)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
# 3. Command line
# ---------------------------------------------------------------------------------------------

SUBCOMMANDS = {"recon": run_recon}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Offline metrics for NÜWA-mini.")
    sub = parser.add_subparsers(dest="command", required=True)
    recon = sub.add_parser("recon", help="tokenizer reconstruction: frame MSE, PSNR, SSIM, codebook usage "
                                         "(VQ-GAN) or pixel accuracy (VQ-GAN-Seg)")
    recon.add_argument("--ckpt", required=True, help="checkpoint written by train.py --stage vqgan or seg")
    recon.add_argument("--num-sequences", "--num_sequences", dest="num_sequences", type=int, default=1000,
                       help="test sequences to use (20 frames each for frames, 10 for sketches; default 1000)")
    recon.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8,
                       help="sequences per forward pass")
    recon.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    recon.add_argument("--grid", default="", help="also write a PNG of reconstructions to this path")
    recon.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return parser


def print_table(metrics: dict) -> None:
    for name, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else value
        print(f"  {name:20s} {shown}")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    metrics = SUBCOMMANDS[args.command](args)
    print_table(metrics)
    if args.json:
        print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
