"""NÜWA's eight tasks at the level of token grids, and a trained NÜWA with its tokenizers.

Paper: Wu et al., "NÜWA: Visual Synthesis Pre-training for Neural visUal World creAtion",
arXiv 2111.12417 (ECCV 2022). Section implemented: §4, the eight visual synthesis tasks, each one
call of `nuwa.NUWA.generate` with its condition and its given (kept) tokens:

    task   condition C      target                        given tokens (kept, not sampled)
    T2I    caption          one frame                     none
    S2I    sketch (1 frame) one frame                     none
    I2I    "None"           one frame                     the top rows        (zero-shot)
    TI2I   caption          one frame                     outside the edit box (zero-shot)
    T2V    caption          T frames                      none
    S2V    sketch (T frames) T frames                     none
    V2V    "None"           the next frames               the first k frames
    TV2V   caption          T frames                      the first frames     (zero-shot)

In plain words: every task samples p(y_p | y_<p, C) token by token in raster order; a zero-shot
task is one whose inputs the model never saw together in training, done by writing the given
tokens in place and sampling the rest. `Models` adds pixels ↔ tokens: a trained NÜWA with its frame
tokenizer (VQ-GAN) and sketch tokenizer (VQ-GAN-Seg), as sample.py and evaluate.py load them.
`nuwa_caption_scorer` uses a trained NÜWA as NÜWA-LIP uses CLIP: to rerank inpaintings (LIP §3.3).

Glossary: B batch, T frames, h w token rows/columns per frame, k given frames, K codebook size,
L_dec decoder layers, e_t the time extent (radius) of 3DNA.

Deviations from the paper (each also marked at its line):
- Blank-code redrawing (`blank_codes` of text_to_image / text_to_video, ours): a first frame drawn
  with blank codes only is drawn again.
- Rolling video prediction (`predict_video`'s window, ours): frames beyond the clip length the model
  was trained on are drawn at the last trained time position, after the frames before it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

import nuwa
import vqgan

# ---------------------------------------------------------------------------------------------
# 1. The eight tasks (NÜWA §4), on token grids
# ---------------------------------------------------------------------------------------------


def frame_shape(model: nuwa.NUWA, frames: int) -> tuple[int, int, int]:
    """The target grid (T, h, w) of `frames` frames of this model's tokens."""
    return (frames, model.config.token_h, model.config.token_w)


def text_to_image(model: nuwa.NUWA, captions: list[str], *, blank_codes: torch.Tensor | None = None,
                  redraws: int = 8, **sampling) -> torch.Tensor:
    """T2I: caption → one frame of tokens (B, 1, h, w).

    blank_codes (K,) bool, optional (vqgan.VQGAN.blank_codes): a frame drawn with blank codes only is
    drawn again, up to `redraws` more times. OUR ADDITION (not in the paper): every training frame
    shows a digit, but a 3DNA query sees only the few rows above it, so no position knows whether
    the frame has any ink yet and the model can finish a frame empty (which T2V then copies to every
    frame). Redrawing samples from the model's own distribution conditioned on "not empty"."""
    cond = nuwa.text_condition(model.vocabulary, captions)
    frames = model.generate(cond, frame_shape(model, 1), **sampling)  # (B, 1, h, w)
    if blank_codes is None:
        return frames
    blank_codes = blank_codes.to(frames.device)
    for _ in range(redraws):
        empty = blank_codes[frames].flatten(1).all(1)  # (B,)
        if not empty.any():
            break
        again = nuwa.Condition(cond.kind, cond.tokens[empty.to(cond.tokens.device)])
        frames[empty] = model.generate(again, frame_shape(model, 1), **sampling)
    return frames


def sketch_to_image(model: nuwa.NUWA, sketch_tokens: torch.Tensor, **sampling) -> torch.Tensor:
    """S2I: VQ-GAN-Seg tokens of one frame (B, 1, hs, ws) → one frame of tokens (B, 1, h, w)."""
    return model.generate(nuwa.sketch_condition(sketch_tokens), frame_shape(model, 1), **sampling)


def complete_image(model: nuwa.NUWA, image_tokens: torch.Tensor, keep_rows: int, **sampling) -> torch.Tensor:
    """I2I (zero-shot): the condition is "None", the top `keep_rows` token rows are given (kept),
    the rest is sampled. image_tokens (B, 1, h, w) → (B, 1, h, w)."""
    keep = torch.zeros_like(image_tokens, dtype=torch.bool)
    keep[:, :, :keep_rows] = True
    cond = nuwa.none_condition(model.vocabulary, image_tokens.shape[0])
    return model.generate(cond, tuple(image_tokens.shape[1:]), given=(image_tokens, keep), **sampling)


def edit_image(model: nuwa.NUWA, image_tokens: torch.Tensor, captions: list[str], edit_mask: torch.Tensor,
               **sampling) -> torch.Tensor:
    """TI2I (zero-shot): tokens outside the edit box (edit_mask False) are given (kept as the
    originals), tokens inside are re-sampled under the new caption. All (B, 1, h, w)."""
    cond = nuwa.text_condition(model.vocabulary, captions)
    return model.generate(cond, tuple(image_tokens.shape[1:]), given=(image_tokens, ~edit_mask), **sampling)


def text_to_video(model: nuwa.NUWA, captions: list[str], frames: int, *,
                  blank_codes: torch.Tensor | None = None, redraws: int = 8, **sampling) -> torch.Tensor:
    """T2V: caption → (B, T, h, w). With blank_codes, frame 0 is drawn as text_to_image draws it
    (again while empty), then given (kept) while the rest is sampled."""
    cond = nuwa.text_condition(model.vocabulary, captions)
    if blank_codes is None:
        return model.generate(cond, frame_shape(model, frames), **sampling)
    first = text_to_image(model, captions, blank_codes=blank_codes, redraws=redraws,
                          **sampling)  # (B, 1, h, w)
    tokens = first.expand(-1, frames, -1, -1).clone()  # (B, T, h, w); only frame 0 is kept
    keep = torch.zeros_like(tokens, dtype=torch.bool)
    keep[:, 0] = True
    return model.generate(cond, frame_shape(model, frames), given=(tokens, keep), **sampling)


def sketch_to_video(model: nuwa.NUWA, sketch_tokens: torch.Tensor, **sampling) -> torch.Tensor:
    """S2V: VQ-GAN-Seg tokens of T frames (B, T, hs, ws) → video tokens (B, T, h, w)."""
    frames = sketch_tokens.shape[1]
    return model.generate(nuwa.sketch_condition(sketch_tokens), frame_shape(model, frames), **sampling)


def predict_video(model: nuwa.NUWA, video_tokens: torch.Tensor, frames: int, *, window: int | None = None,
                  **sampling) -> torch.Tensor:
    """V2V: the k frames (B, k, h, w) are given under "None"; frames k…T−1 are sampled → (B, T, h, w).

    window: the longest clip drawn in one pass (default: the clip length the model was trained on,
    `predict_frames` when its tasks include V2V, else `frames`). Beyond it the prediction rolls: each
    further frame is drawn at the window's last time position, after the window − 1 frames before it.
    A model trained on 10-frame clips has never seen time positions 10-19 (its table rows there are
    still random); rolled, every frame sits where training put frames. Nothing is lost as long as
    window − 1 ≥ L_dec · e_t + 1 frames: through L_dec layers of a 3DNA window e_t frames deep (and the
    input shift, one token), frame t reads nothing older (tiny: 4 · 2 + 1 = 9, window 10). Then the
    roll differs from one long pass only in the absolute time positions (tests/test_nuwa.py).
    DEVIATION (NÜWA §4: V2V is one pass over time positions its training covered): rolling is ours, for
    models trained on shorter clips than they predict.
    """
    B, k, h, w = video_tokens.shape
    if frames <= k:
        raise ValueError(f"predict_video needs frames > {k} given frames, got {frames}")
    if window is None:
        config = model.config
        trained = config.predict_frames if "v2v" in config.tasks.split(",") else config.frames
        window = min(trained, model.target_pos.max_shape[0])
    if window < 2:
        raise ValueError(f"predict_video needs a window of at least 2 frames (1 given, 1 drawn), "
                         f"got {window}")
    cond = nuwa.none_condition(model.vocabulary, B)
    video = video_tokens
    while video.shape[1] < frames:
        context = video[:, -(window - 1):] if video.shape[1] >= window else video  # (B, g, h, w)
        g = context.shape[1]
        length = min(window, g + frames - video.shape[1])  # frames in this pass: the given + new ones
        tokens = torch.zeros(B, length, h, w, dtype=torch.long, device=video_tokens.device)
        tokens[:, :g] = context
        keep = torch.zeros_like(tokens, dtype=torch.bool)
        keep[:, :g] = True
        drawn = model.generate(cond, (length, h, w), given=(tokens, keep), **sampling)  # (B, length, h, w)
        video = torch.cat([video, drawn[:, g:].to(video.device)], dim=1)
    return video


def edit_video(model: nuwa.NUWA, video_tokens: torch.Tensor, captions: list[str], given_frames: int = 1,
               **sampling) -> torch.Tensor:
    """TV2V (zero-shot): the first `given_frames` frames are given (kept), the rest re-generated under
    the new caption, so the video continues from the same digits but moves as the caption says."""
    keep = torch.zeros_like(video_tokens, dtype=torch.bool)
    keep[:, :given_frames] = True
    cond = nuwa.text_condition(model.vocabulary, captions)
    return model.generate(cond, tuple(video_tokens.shape[1:]), given=(video_tokens, keep), **sampling)


# ---------------------------------------------------------------------------------------------
# 2. A trained NÜWA with its tokenizers: pixels ↔ tokens
# ---------------------------------------------------------------------------------------------


class Models:
    """A trained NÜWA with its frame tokenizer (VQ-GAN) and, when recorded, its sketch tokenizer."""

    def __init__(self, ckpt: str, vqgan_ckpt: str | None = None, seg_ckpt: str | None = None,
                 device: str = "cpu"):
        if not Path(ckpt).exists():
            raise FileNotFoundError(f"no NÜWA checkpoint at {ckpt}; train one with "
                                    f"`python train.py --stage nuwa --preset tiny --out out`")
        self.nuwa = nuwa.load_nuwa(ckpt, map_location=device)
        self.device = device
        config = self.nuwa.config
        self.vqgan = vqgan.load_vqgan(vqgan_ckpt or config.vqgan_ckpt, map_location=device).to(device)
        seg_path = seg_ckpt or config.seg_ckpt
        self.seg = vqgan.load_vqgan(seg_path, map_location=device).to(device) if seg_path else None
        if self.vqgan.codebook_size != self.nuwa.config.codebook_size:
            raise ValueError(f"VQ-GAN codebook {self.vqgan.codebook_size} ≠ NÜWA's "
                             f"{self.nuwa.config.codebook_size}")
        self.nuwa.check_code_pixels(self.vqgan, vqgan_ckpt or config.vqgan_ckpt)

    @torch.no_grad()
    def tokens(self, video: torch.Tensor) -> torch.Tensor:
        """Frames (B, T, 1, 64, 64) in [0, 1] → tokens (B, T, h, w)."""
        return self.vqgan.encode_video(video.to(self.device))

    @torch.no_grad()
    def pixels(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, T, h, w) → frames (B, T, 1, 64, 64) in [0, 1]."""
        return self.vqgan.as_image(self.vqgan.decode_video(tokens)).clamp(0, 1).cpu()

    @torch.no_grad()
    def sketch_tokens(self, sketch: torch.Tensor) -> torch.Tensor:
        """Sketch class maps (B, T, H, W) → VQ-GAN-Seg tokens (B, T, hs, ws)."""
        if self.seg is None:
            raise ValueError("this NÜWA checkpoint was trained without a sketch tokenizer; pass --seg PATH")
        expected = self.seg.config.resolution
        if tuple(sketch.shape[-2:]) != (expected, expected):
            raise ValueError(f"sketch must be {expected}×{expected} class maps, "
                             f"got {tuple(sketch.shape[-2:])}")
        return self.seg.encode_sketch(sketch.to(self.device))


def nuwa_caption_scorer(model: nuwa.NUWA,
                        tokenizer: vqgan.VQGAN) -> Callable[[torch.Tensor, str], torch.Tensor]:
    """Rerank inpaintings with a text-image model trained apart from the judge, as LIP reranks with
    CLIP (§3.3): a candidate's score is how much better NÜWA's text→image explains its tokens under the
    caption than under "None", log p(z | caption) − log p(z | None) in nats (teacher-forced, one
    frame). The digit classifier that scores the benchmark plays no part in the choice."""

    @torch.no_grad()
    def score(pixels: torch.Tensor, caption: str) -> torch.Tensor:
        tokens = tokenizer.encode(pixels.to(model.bos.device))[:, None]  # (K, 1, h, w)
        K = tokens.shape[0]
        caption_cond = nuwa.text_condition(model.vocabulary, [caption] * K)
        under_caption = model.token_nats(caption_cond, tokens).sum(1)  # (K,)
        under_none = model.token_nats(nuwa.none_condition(model.vocabulary, K), tokens).sum(1)  # (K,)
        return (under_none - under_caption).cpu()  # log p(z | caption) − log p(z | None)

    return score
