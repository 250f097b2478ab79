"""NÜWA-Infinity's infinite visual synthesis in pixels: canvases of any width, videos of any length.

Paper: Wu et al., "NÜWA-Infinity: Autoregressive over Autoregressive Generation for Infinite
Visual Synthesis", arXiv 2207.09814: what the method is for — images far larger than the training
images, and outpainting from a given part (the paper's "infinite visual synthesis" and
image outpainting). The token grid is made patch by patch (patches.py) by the token-level model
(infinity.py); this file turns pixels into the given tokens and the finished grid back into pixels
through the frozen VQ-GAN (vqgan.py, NÜWA §3.1).

In plain words: the VQ-GAN is convolutional, so a 64×W canvas is one (64/f)×(W/f) token grid; its
decoder's attention costs O((W/f)²) memory, so decoding, not Infinity, is what grows with the
canvas (the f = 8 cell tokenizer encodes each 8×8 cell on its own, so its tokens do not depend on
the width). Outpainting keeps the *tokens* of the source on the side the direction starts from; their
pixels are decoded again with the rest. A video is a grid of T frames made in the `video` order.

Glossary: B batch, T frames, H W pixels, f pixels per token (8), k given frames.
Deviations from the paper: those of infinity.py and patches.py; nothing of its own.
"""

from __future__ import annotations

from pathlib import Path

import torch

import data
import infinity
import patches
import runtime


@torch.no_grad()
def generate_canvas(model: infinity.Infinity, vqgan, height_px: int, width_px: int,
                    direction: str = "column", *,
                    source: torch.Tensor | None = None, captions=None, batch_size: int | None = None,
                    **sampling) -> torch.Tensor:
    """Pixels (B, 1, height_px, width_px) in [0, 1], by patches.generate. The *tokens* of `source`
    pixels (B, 1, h, w) are kept exactly on the side `direction` starts from (outpainting); their
    pixels are re-decoded with the rest, so they come back as the VQ-GAN reconstructs them in this
    larger canvas, not bit for bit. The whole canvas is one VQ-GAN grid (module docstring)."""
    f = model.config.token_px
    if height_px % f or width_px % f:
        raise ValueError(f"canvas {height_px}×{width_px} px is not a multiple of f = {f} px per token")
    infinity.check_tokenizer(model, vqgan)
    grid_shape = (1, height_px // f, width_px // f)
    given = None
    if source is not None:
        source_tokens = vqgan.encode(source.to(model.bos.device).float())[:, None]  # (B, 1, h/f, w/f)
        given = patches.outpaint_given(source_tokens, grid_shape, direction)
    tokens = patches.generate(model, grid_shape, direction, given=given, captions=captions,
                              batch_size=batch_size, **sampling)  # (B, 1, H/f, W/f)
    return vqgan.decode(tokens[:, 0]).float().clamp(0, 1)  # (B, 1, H, W)


@torch.no_grad()
def generate_video(model: infinity.Infinity, vqgan, frames: int, *, given_frames: torch.Tensor | None = None,
                   captions=None, batch_size: int | None = None, **sampling) -> torch.Tensor:
    """Frames (B, T, 1, 64, 64) in [0, 1], frame by frame (`video` order); `given_frames`
    (B, k, 1, 64, 64) are kept as the first k frames (prediction)."""
    infinity.check_tokenizer(model, vqgan)
    h = w = data.CANVAS // model.config.token_px
    grid_shape = (frames, h, w)
    given = None
    if given_frames is not None:
        B, k = given_frames.shape[:2]
        if k >= frames:
            raise ValueError(f"generate_video needs frames > {k} given frames, got {frames}")
        tokens = torch.zeros(B, *grid_shape, dtype=torch.long, device=model.bos.device)  # (B, T, h, w)
        keep = torch.zeros_like(tokens, dtype=torch.bool)
        tokens[:, :k], keep[:, :k] = vqgan.encode_video(given_frames.to(model.bos.device).float()), True
        given = (tokens, keep)
    tokens = patches.generate(model, grid_shape, "video", given=given, captions=captions,
                              batch_size=batch_size, **sampling)  # (B, T, h, w)
    return vqgan.decode_video(tokens).float().clamp(0, 1)  # (B, T, 1, 64, 64)


def tiles(canvas: torch.Tensor, width: int = data.CANVAS) -> torch.Tensor:
    """A canvas (1, H, W) as a row of tiles (W / width, 1, H, width): data.save_grid draws rows of
    frames."""
    return torch.stack(canvas.split(width, dim=-1))


VISUAL_CAPTION = "3 7"  # a two-class caption seen in training


@torch.no_grad()
def visualise(model: infinity.Infinity, vqgan, path, *, real: torch.Tensor,
              caption: str | None = None) -> Path:
    """PNG: canvases 4× wider than training (with and without a caption), and outpainting to the
    right and to the left of the held-out canvas `real` (1, H, W) cut in half. For video configs,
    `real` is a held-out clip (2T, 1, 64, 64) and `caption` its caption (None: uncaptioned): its
    first 2 frames given, a clip twice as long as training's is generated (also a GIF)."""
    config, device = model.config, model.bos.device
    generator = torch.Generator(device=device).manual_seed(0)
    sampling = dict(temperature=1.0, top_k=runtime.TOP_K, generator=generator)
    with runtime.evaluating(model):
        if config.data == "video":
            captions = None if caption is None else [caption]
            made = generate_video(model, vqgan, 2 * config.frames, given_frames=real[None, :2],
                                  captions=captions, **sampling)  # (1, 2T, 1, 64, 64)
            rows = [real, made[0].cpu()]
            labels = ["real clip", "first 2 frames given, the rest generated"]
            data.save_gif(rows, Path(path).with_suffix(".gif"), captions=labels)
        else:
            H, W = config.canvas_height, config.canvas_width
            if tuple(real.shape) != (1, H, W):
                raise ValueError(f"the held-out canvas must be (1, {H}, {W}), got {tuple(real.shape)}")
            wide = generate_canvas(model, vqgan, H, 4 * W, "column", captions=[VISUAL_CAPTION, None],
                                   **sampling)  # (2, 1, H, 4W)
            real = real[None]  # (1, 1, H, W)
            half = W // 2
            right = generate_canvas(model, vqgan, H, 2 * W, "right", source=real[..., :half], **sampling)
            left = generate_canvas(model, vqgan, H, 2 * W, "left", source=real[..., half:], **sampling)
            rows = [tiles(c.cpu()) for c in (wide[0], wide[1], real[0], right[0], left[0])]
            labels = [f"{H}×{4 * W} px, caption {VISUAL_CAPTION!r}", f"{H}×{4 * W} px, no caption",
                      "a held-out canvas", f"its left {half} px given, outpainted right",
                      f"its right {half} px given, outpainted left"]
    return data.save_grid(rows, path, captions=labels, max_frames=max(len(r) for r in rows))
