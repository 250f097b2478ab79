"""NÜWA-LIP: language-guided inpainting with a defect-free VQGAN (DF-VQGAN) and MP-S2S.

Paper: Ni et al., "NÜWA-LIP: Language Guided Image Inpainting with Defect-free VQGAN",
arXiv 2202.05009 (CVPR 2023). Sections implemented: §3.1 DF-VQGAN (relative estimation and
symmetrical connections), §3.2 MP-S2S (multi-perspective sequence to sequence), §3.3 training and
inference (loss on the defective tokens only; candidates reranked by a judge).

In plain words. Inpainting is given a frame x whose pixels under a mask m are missing, and a
caption; it must fill the hole as the caption says and keep the visible area as it was. Encoding a
masked frame with a plain VQGAN goes wrong twice: hole pixels leak into the tokens of the visible
area through the receptive field of every convolution and through attention ("receptive
spreading"), and quantisation distorts the visible area ("information loss"). DF-VQGAN fixes both:
- relative estimation: every layer of the encoder computes a visible feature from visible inputs
  only, so a visible token is the same whatever the hole contains (tested bit for bit);
- symmetrical connections: the decoder takes the encoder's visible features back at every mirrored
  stage, h ← (skip·(1 − m) + h·m + h) / 2, so visible detail goes around the quantiser.
MP-S2S then predicts the hole's tokens in raster order. Its decoder cross-attends to three
"perspectives" of what is known: the caption, the visible tokens (a bidirectional encoder in which
hole tokens are a learned [MASK]), and the pixel patches of the masked frame. The loss is
cross-entropy on the hole tokens only. `inpaint` samples K candidates (visible tokens forced),
decodes them with the skips of the masked frame, and keeps the one a judge likes best.

The defect rule, per layer (DF-VQGAN's encoder). A feature at resolution r is *defective* iff any
pixel of its (64/r)×(64/r) block is missing: the pixel mask max-pooled to r. Stride-1 layers keep
the mask; a stride-2 convolution max-pools it by 2 (the same thing, composed). The token grid is
the last resolution, so a *hole token* is a token whose feature is defective. A visible output
must not depend on any hole pixel; the 3×3 receptive field of a visible output near the hole does
cover defective inputs, so instead of growing the mask by the receptive field (which would make a
16×16 grid entirely defective after a few layers and global attention), every spatial mixing reads
visible positions only:
    masked conv:  y = conv(x ⊙ (1 − m))  at visible outputs,   y = conv(x)  at defective ones;
    GroupNorm:    statistics over visible entries (visible outputs), over all entries (defective);
    attention:    a visible query gives defective keys probability 0; a defective query sees all.
Position-wise layers (1×1 convs, swish, residual sums, the quantiser) mix nothing. By induction
over the layers, every visible feature is a function of visible pixels only: exactly, not about.

Measured (`make lip`, then benchmarks/bench_lip.py --n 200 --candidates 4 --guidance 3 on a 2-core
CPU; the README's NÜWA-LIP section has every run): 200 held-out one-digit frames with half of the
digit's ink box missing. On `make models`' cell tokenizer, with MP-S2S started from its NÜWA and
trained 20 minutes, the digit classifier reads the caption's digit in 81.5 % of one-sample fills
(masked input alone 44 %, NÜWA's completion 45.5 %, the first LIP on the f = 4 tokenizer trained
from scratch 44.5 %). On today's `make models` NÜWA (two processes, 8,116 steps; 2026-12-05):
85.5–88 %, and a caption naming another digit than the visible half shows is followed in both fills
of a pair 55–60 % of the time with one sample, 63 % when each fill is the best of 4 by NÜWA's
caption score (sample.nuwa_caption_scorer, a model apart from the judge, as the paper reranks with
CLIP); on a one-process NÜWA of 5,539 steps, 51–52 % and 66–70 %. Known
limits: visible pixels of every 8×8 cell the mask touches are redrawn (visible MSE 0.007–0.0085
against the first LIP's 0.0008); `sample.digit_scorer`'s best-of-K is picked by the same classifier
that scores it.

Sections: 1. configurations and presets · 2. mask-aware layers (relative estimation) · 3. DF-VQGAN
· 4. MP-S2S · 5. inpainting · 6. masks for training and evaluation · 7. loading checkpoints.

Glossary: B batch, K codebook size (also: K candidates in `inpaint`, where said), C channels,
H W pixels (64), h w token grid (16 × 16 at f = 4; 8 × 8 with `make lip`'s cell tokenizer, f = 8),
f = H/h downsampling, N = h·w tokens of a frame,
D width, nh heads, L caption length, m mask (True = missing / defective), x̂ reconstruction,
z tokens, B[z] codes, y_p the token at raster position p, e_t e_h e_w extents (radii).

Deviations from the paper (each also marked `# DEVIATION` at its line):
- Scale: 64×64 grey frames, f = 4 (16×16 tokens), K = 512, widths 16-64; the paper: 256 px RGB,
  F8 (32×32 tokens), K = 8192. Decoder window: radius 5 (11×11) on 16×16, the paper's 11×11 on 32×32.
- GroupNorm at defective positions uses the statistics of the whole map (our reading: "defective
  features come from the full input"); visible positions use visible-only statistics (the paper).
- The pixel-patch encoder sees the mask as a second channel (a black visible pixel and a missing
  one are both 0 in the masked frame); each perspective gets a learned type embedding. Ours.
- Reranking: the paper ranks candidates with CLIP; offline we pass any `scorer` (sample.py: the
  digit classifier of judge.py, the probability of the caption's digit; or NÜWA's caption score,
  log p(z | caption) − log p(z | None), `sample.nuwa_caption_scorer`).
- Training-mask mix and the 50 % skip-less decoding rate are our numbers (the paper trains with a
  mix of no mask, full mask and random boxes, and without skips part of the time, no rates given).
- `init_vqgan` (optional): DF-VQGAN may start from a trained plain VQGAN's weights (the parameter
  names are the same). Our option for short CPU runs; the README says when a run used it.
- MP-S2S shares one token embedding between the visible-token encoder and the decoder input, and
  puts a LayerNorm on each perspective before concatenating them. Ours.
- The output is not pasted back into the input: visible pixels are the DF-VQGAN's decoding of the
  visible features (within a small tolerance of the input), as in the paper.
- `cell_encoder` (the frame tokenizer of `make models`: f = 8, 8×8 tokens): E reads each token's own
  cell, so a visible token never sees the hole, with nothing to mask; the one symmetrical connection
  is at the token resolution. `freeze_tokens` then keeps E and the codebook of `init_vqgan` and
  trains G alone, so the DF-VQGAN's tokens are exactly the plain VQGAN's (ours).
- MP-S2S takes NÜWA's learning aids (nuwa.py): the head tied to the code embeddings, and a code's
  embedding includes a projection of the pixels the tokenizer draws for it (`tie_head`,
  `pixel_codes`, on by default; both False = the paper). Optional relative positions in the
  decoder's 3DNA (`relative_bias`, `relative_keys`).
- Captions dropped to "None" in training (`cond_drop_prob`) and classifier-free guidance at sampling
  (`guidance_scale`): an option, as in nuwa.py; the paper has neither.
- `init_nuwa` (optional): MP-S2S's caption path and decoder start from a NÜWA trained on the same
  tokens (`init_from_nuwa`); the paper trains MP-S2S from scratch. Our option for CPU budgets.
- The text encoder is a small transformer over our closed word vocabulary (`text_layers`, 0 = the
  caption memory is LayerNorm(word + position), as NÜWA's tiny model); the paper uses CLIP's.
- The decoder reads the visible tokens in its own input (teacher forcing over the whole frame, the
  visible tokens forced when sampling), besides the visible-token perspective; the official LIP
  code feeds [MASK] at visible positions of the decoder input. Ours lets the raster decoder see the
  visible strokes right above and left of each hole token through its 3DNA window.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import nuwa
import vqgan

# ---------------------------------------------------------------------------------------------
# 1. Configurations
# ---------------------------------------------------------------------------------------------


@dataclass
class DFVQGANConfig:
    # --- the tokenizer (same names and meanings as vqgan.VQGANConfig, whose modules are reused)
    resolution: int = 64  # frame side H = W in pixels, grey frames (paper: 256, RGB)
    ch: int = 16  # width at full resolution (VQGAN: 128)
    ch_mult: tuple[int, ...] = (1, 2, 4)  # width per level; f = 2^(len - 1) = 4 (paper: F8)
    num_res_blocks: int = 1  # residual blocks per encoder level (VQGAN: 2)
    mid_attention: bool = True  # one attention block at the token resolution (VQGAN: yes)
    # DEVIATION (LIP §3.1): E may read each token's own f×f cell only (vqgan.CellEncoder, the frame
    # tokenizer of `make models`). A visible cell's token then cannot see the hole at all, and the one
    # symmetrical connection is at the token resolution (the only level such an encoder has).
    cell_encoder: bool = False  # E sees only each token's own f×f pixel cell (the paper: a conv stack)
    norm_groups: int = 8  # GroupNorm groups
    codebook_size: int = 512  # K (paper: 8192)
    embed_dim: int = 32  # d_B, dimension of a code
    beta: float = 0.25  # commitment weight β (VQ-VAE eq. 3)
    ema: bool = True  # EMA codebook updates (see vqgan.py's deviations)
    ema_decay: float = 0.99  # γ of the EMA updates
    ema_eps: float = 1e-5  # Laplace smoothing of the EMA counts
    data_init: bool = True  # initialise the codes from the first batch's encoder outputs
    dead_code_threshold: float = 1.0  # restart codes used less than this (tokens per batch); 0 = off
    disc_weight: float = 0.1  # weight of the adaptive-weighted GAN term
    disc_start: int = 1500  # step at which the GAN terms switch on
    disc_ch: int = 32  # PatchGAN width of its first layer
    disc_layers: int = 2  # strided PatchGAN layers
    # --- what DF-VQGAN adds (LIP §3.1)
    mask_none_prob: float = 0.2  # P(a training frame has no mask) (paper: a mix, no rate given)
    mask_full_prob: float = 0.1  # P(the whole frame is missing); the rest get random boxes (data.py)
    skip_prob: float = 0.5  # P(a training frame is decoded with the symmetrical connections)
    # With init_vqgan, pass --dead-code-threshold 0: restarts re-seed unused codes on (mostly black)
    # encoder outputs, and a 300 s fine-tune with them spread black 4×4 cells over 407 codes (entropy
    # 4.6 nats; the plain VQGAN: 322, 3.5; without restarts: 274, 3.5), which MP-S2S pays for.
    init_vqgan: str = ""  # plain VQGAN checkpoint to start from ("" = from scratch; our option)
    # Keep E and the codebook of `init_vqgan` as they are, and train G alone (our option): the tokens are
    # then exactly the plain VQGAN's, so a NÜWA trained on them can start MP-S2S (LIPConfig.init_nuwa).
    # Sound with a cell encoder only, which is defect-free as it is (a global E must learn to be).
    freeze_tokens: bool = False
    # --- optimisation (train.py --stage dfvqgan)
    batch_size: int = 8  # frames per step
    frames_per_clip: int = 4  # frames taken from each training clip of a batch
    lr: float = 2e-3  # Adam learning rate (as the tiny VQGAN)
    betas: tuple[float, float] = (0.9, 0.99)  # Adam betas
    grad_clip: float = 1.0  # clip the gradient norm of each optimizer step; 0 = off

    @property
    def downsample(self) -> int:
        """f, as the plain VQGAN of the same network computes it."""
        return self.vqgan_config().downsample

    @property
    def token_shape(self) -> tuple[int, int]:
        """(h, w) token grid of one frame, as the plain VQGAN of the same network computes it."""
        return self.vqgan_config().token_shape

    def vqgan_config(self) -> vqgan.VQGANConfig:
        """The plain VQGAN configuration of the same network: DF-VQGAN reuses its modules."""
        shared = {f.name for f in fields(vqgan.VQGANConfig)} & {f.name for f in fields(self)}
        return vqgan.VQGANConfig(**{name: getattr(self, name) for name in shared})

    @classmethod
    def preset(cls, name: str, **overrides) -> DFVQGANConfig:
        presets = {
            "tiny": {},  # the defaults: the tiny VQGAN's network (CPU, minutes)
            "small": dict(ch=64, num_res_blocks=2, norm_groups=16, codebook_size=1024, embed_dim=64,
                          batch_size=64, lr=1e-3, disc_start=5000, disc_ch=64, disc_layers=3, disc_weight=0.2),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


@dataclass
class LIPConfig:
    # --- MP-S2S (LIP §3.2); the transformer fields are read by nuwa.EncoderLayer / DecoderLayer
    dim: int = 128  # D, model width (paper: not at our scale)
    num_heads: int = 4  # nh
    text_layers: int = 1  # layers of the text encoder (perspective 1)
    token_layers: int = 2  # layers of the visible-token encoder, bidirectional (perspective 2)
    pixel_layers: int = 2  # layers of the pixel-patch encoder, bidirectional (perspective 3)
    decoder_layers: int = 4  # causal decoder layers over the frame's tokens
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio · D
    codebook_size: int = 512  # K of the DF-VQGAN whose tokens are predicted
    token_h: int = 16  # token rows of a frame
    token_w: int = 16  # token columns of a frame
    patch: int = 4  # pixel-patch side of perspective 3 (= f, so patches and tokens share a grid)
    text_len: int = 16  # L, caption words after padding
    # DEVIATION (LIP §4): radius 5 = an 11×11 window on 16×16 tokens; the paper's 11×11 is on 32×32.
    extent: tuple[int, int, int] = (0, 5, 5)  # (e_t, e_h, e_w) of the decoder's causal self-attention
    dropout: float = 0.0  # residual dropout
    backend: str = "blocked"  # 3DNA implementation (nearby_attention.py)
    # DEVIATION (LIP §3.3; ours, as nuwa.py's option): captions dropped to "None" in training, so that
    # sampling can use classifier-free guidance (`inpaint(..., guidance_scale=s)`). 0 = the paper.
    cond_drop_prob: float = 0.0  # P(caption → "None") per training frame
    # --- what makes the tiny model learn ink codes (NÜWA's learning aids, nuwa.py); both False = the paper
    tie_head: bool = True  # the output head shares the code embedding's matrix
    pixel_codes: bool = True  # a code's embedding (and tied logit) includes a projection of its pixels
    # DEVIATION (the official LIP code feeds [MASK] at visible positions of the decoder input, so the
    # decoder reads visible tokens only through the perspectives): ours feeds the visible tokens
    # themselves, so the raster decoder sees the strokes just above and left of a hole token in its
    # own window. `visible_input=False` is the official way (measured side by side: README, LIP).
    visible_input: bool = True
    relative_bias: bool = False  # decoder 3DNA: a learned score per head and offset (nuwa.py); needed by init_nuwa
    relative_keys: bool = False  # decoder 3DNA: + q · r_offset (nuwa.py); needed by init_nuwa
    # DEVIATION (LIP §3.2 trains MP-S2S from scratch; our option for CPU budgets): start the caption
    # embedding, code embeddings, target positions and every decoder layer from a NÜWA trained on the
    # same frame tokens (`init_from_nuwa`); the visible-token and pixel encoders start fresh.
    init_nuwa: str = ""  # NÜWA checkpoint to start from ("" = from scratch)
    # --- training (train.py --stage lip); the model ignores these fields
    dfvqgan_ckpt: str = "out/dfvqgan/ckpt.pt"  # the frozen DF-VQGAN whose tokens MP-S2S predicts
    frames: int = 10  # frames of the captioned clips one frame is taken from (as NÜWA's t2i stage)
    num_digits: int = 1  # digits per captioned training clip
    box_mask_prob: float = 0.4  # P(random LIP boxes); then half-digit masks, then half-frame masks
    half_digit_prob: float = 0.4  # P(half of the digit's ink box is missing); the rest: half frames
    batch_size: int = 2  # frames per step (NÜWA's tiny t2i: 2)
    lr: float = 3e-3  # AdamW learning rate (NÜWA's tiny preset)
    weight_decay: float = 0.01  # AdamW weight decay on matrices
    warmup_steps: int = 10  # linear warm-up
    grad_clip: float = 1.0  # clip the global gradient norm

    @classmethod
    def preset(cls, name: str, **overrides) -> LIPConfig:
        presets = {
            "tiny": {},  # CPU, minutes
            "small": dict(dim=256, num_heads=8, token_layers=4, pixel_layers=4, decoder_layers=8, batch_size=16,
                          lr=1e-3, warmup_steps=100),  # one GPU
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


# ---------------------------------------------------------------------------------------------
# 2. Relative estimation: layers whose visible outputs read visible inputs only (LIP §3.1)
# ---------------------------------------------------------------------------------------------


def pool_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel mask (B, 1, H, W) → mask (B, 1, size, size) at a coarser grid: defective iff any pixel
    of the block is missing (max-pooling). At the token grid this defines the hole tokens."""
    factor = mask.shape[-1] // size
    return mask if factor == 1 else F.max_pool2d(mask.float(), factor) > 0  # (B, 1, size, size)


def token_mask(mask: torch.Tensor, token_shape: tuple[int, int]) -> torch.Tensor:
    """Hole tokens (B, h, w): the pixel mask (B, 1, H, W) max-pooled to the token grid."""
    return pool_mask(mask, token_shape[0])[:, 0]  # (B, h, w)


def masked_conv(conv: nn.Conv2d, x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y = conv(x ⊙ (1 − m)) at visible outputs, conv(x) at defective ones; returns (y, m_out).

    m (B, 1, H, W) is the input's mask; a stride-s convolution max-pools it by s."""
    m_out = m if conv.stride == (1, 1) else pool_mask(m, m.shape[-1] // conv.stride[0])  # (B, 1, H', W')
    if not m.any() or m.all():  # nothing visible reads a hole (or nothing is visible): one plain conv
        return conv(x), m_out
    visible = conv(x.masked_fill(m, 0.0))  # (B, C', H', W'): the relative estimate
    return torch.where(m_out, conv(x), visible), m_out


def masked_group_norm(norm: nn.GroupNorm, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """GroupNorm whose statistics at visible positions come from visible entries only:
    μ_g = Σ_visible x / n_g, σ²_g = Σ_visible (x − μ_g)² / n_g over the channels of group g."""
    full = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)  # (B, C, H, W)
    if not m.any() or m.all():
        return full
    B, C, H, W = x.shape
    G = norm.num_groups
    dtype = x.dtype  # under bf16 autocast F.group_norm computes in float32: so do the visible statistics
    x = x.to(torch.promote_types(dtype, torch.float32))  # bf16 → float32; float32 / float64 unchanged
    keep = (~m).to(x.dtype).view(B, 1, 1, H * W)  # (B, 1, 1, H·W)
    grouped = x.masked_fill(m, 0.0).view(B, G, C // G, H * W)  # (B, G, C/G, H·W), holes exactly 0
    count = keep.sum(-1, keepdim=True).clamp_min(1.0) * (C // G)  # (B, 1, 1, 1) n_g
    mean = grouped.sum((-2, -1), keepdim=True) / count  # (B, G, 1, 1)
    var = ((grouped - mean) ** 2 * keep).sum((-2, -1), keepdim=True) / count  # (B, G, 1, 1)
    visible = ((x.view(B, G, C // G, H * W) - mean) / torch.sqrt(var + norm.eps)).view(B, C, H, W)
    visible = visible * norm.weight.view(1, C, 1, 1) + norm.bias.view(1, C, 1, 1)  # (B, C, H, W)
    # DEVIATION (LIP §3.1): defective positions keep whole-map statistics (our reading of the paper).
    return torch.where(m, full.to(visible.dtype), visible).to(dtype)


def masked_res_block(block: vqgan.ResBlock, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """vqgan.ResBlock with masked norms and convolutions; the 1×1 shortcut is position-wise."""
    h, _ = masked_conv(block.conv1, F.silu(masked_group_norm(block.norm1, x, m)), m)  # (B, C', H, W)
    h, _ = masked_conv(block.conv2, F.silu(masked_group_norm(block.norm2, h, m)), m)  # (B, C', H, W)
    return block.shortcut(x) + h


def masked_attention(block: vqgan.AttnBlock, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """vqgan.AttnBlock in which a visible query gives defective keys probability 0:
    softmax(q kᵀ / √C + bias), bias = −∞ where (query visible, key defective), else 0."""
    B, C, H, W = x.shape
    q, k, v = block.qkv(masked_group_norm(block.norm, x, m)).view(B, 3, C, H * W).transpose(2, 3).unbind(1)
    scores = q @ k.transpose(1, 2) / math.sqrt(C)  # (B, N, N)
    defective = m.view(B, H * W)  # (B, N)
    blind = ~defective[:, :, None] & defective[:, None, :]  # (B, N, N) visible query, defective key
    attention = scores.masked_fill(blind, -math.inf).softmax(-1)  # (B, N, N); no row is empty
    h = (attention @ v).transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
    return x + block.proj(h)


# ---------------------------------------------------------------------------------------------
# 3. DF-VQGAN: a VQGAN's modules, run with relative estimation and symmetrical connections
# ---------------------------------------------------------------------------------------------


class DFVQGAN(nn.Module):
    """Defect-free VQGAN (LIP §3.1). Same parameters (and names) as vqgan.VQGAN, other forward passes.

    encode(x, mask) → (tokens z (B, h, w), skips); decode(z, skips, mask) → x̂ (B, 1, H, W).
    x is (B, 1, H, W) in [0, 1]; mask bool (B, 1, H, W), True = missing. Without skips, decode is
    the plain VQGAN decoder; with them, the visible features of the masked frame come back."""

    def __init__(self, config: DFVQGANConfig):
        super().__init__()
        self.config = config
        base = config.vqgan_config()
        self.encoder = vqgan.CellEncoder(base) if config.cell_encoder else vqgan.Encoder(base)
        self.quantizer = vqgan.VectorQuantizer(base)
        self.decoder = vqgan.Decoder(base)
        self.discriminator = vqgan.PatchDiscriminator(base) if config.disc_weight > 0 else None
        if config.freeze_tokens:
            if not config.cell_encoder:
                raise ValueError("freeze_tokens keeps E as it is: only a cell encoder is defect-free without "
                                 "training (set --cell-encoder, or drop --freeze-tokens)")
            self.encoder.requires_grad_(False)
            self.quantizer.requires_grad_(False)

    def train(self, mode: bool = True) -> DFVQGAN:
        """With freeze_tokens, E and the codebook stay in eval mode: no EMA update, no restart."""
        super().train(mode)
        if self.config.freeze_tokens:
            self.encoder.eval()
            self.quantizer.eval()
        return self

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def check_input(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Fail early on a wrong frame or mask; returns the mask (all visible when None)."""
        R = self.config.resolution
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, R, R):
            raise ValueError(f"DF-VQGAN expects frames (B, 1, {R}, {R}), got {tuple(x.shape)}")
        if mask is None:
            return torch.zeros_like(x, dtype=torch.bool)
        if mask.dtype != torch.bool or mask.shape != x.shape:
            raise ValueError(f"the mask must be bool of the frames' shape {tuple(x.shape)} (True = missing), "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        return mask

    def as_plain_vqgan(self) -> vqgan.VQGAN:
        """A plain vqgan.VQGAN with a copy of these weights (same names): no masks, no skips."""
        plain = vqgan.VQGAN(self.config.vqgan_config()).to(self.quantizer.codebook.device)
        plain.load_state_dict(self.state_dict())
        return plain.train(self.training)

    @torch.no_grad()
    def code_patches(self) -> torch.Tensor:
        """What each code looks like (K, f·f), as vqgan.VQGAN.code_patches draws it (MP-S2S's pixel codes)."""
        return self.as_plain_vqgan().eval().code_patches()

    def tokenizer_parameters(self) -> list[nn.Parameter]:
        """E, B (when gradient-trained) and G: what the tokenizer's optimizer steps (train.py)."""
        return [p for m in (self.encoder, self.quantizer, self.decoder) for p in m.parameters() if p.requires_grad]

    # --- encoder with relative estimation ------------------------------------------------------

    def encode_features(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x (B, 1, H, W), mask (B, 1, H, W) → (E(x) (B, d_B, h, w), skips): the output of every
        level (before it halves) and of the middle block, each (B, C_l, H_l, W_l).

        A cell encoder (`cell_encoder`) reads each token's own f×f cell and nothing else: a token
        whose cell has no missing pixel is a function of visible pixels by construction, so there is
        nothing to mask; its one skip is the cell features at the token resolution (B, C, h, w)."""
        encoder = self.encoder
        if isinstance(encoder, vqgan.CellEncoder):
            h = encoder.conv_in(x)  # (B, C, h, w): kernel = stride = f, one cell each
            for block in encoder.mlp:
                h = h + block(h)  # (B, C, h, w), per cell
            return encoder.conv_out(F.silu(h)), [h]  # the skip joins the decoder's middle block
        h, m = masked_conv(encoder.conv_in, x, mask)  # (B, ch, H, W)
        skips = []
        for block in encoder.down:
            if isinstance(block, vqgan.ResBlock):
                h = masked_res_block(block, h, m)  # (B, C_l, H_l, W_l)
            else:  # the stride-2 convolution between levels: the level is done
                skips.append(h)
                h, m = masked_conv(block, h, m)  # (B, C_l, H_l / 2, W_l / 2), mask max-pooled by 2
        skips.append(h)  # the last level
        for block in encoder.mid:
            if isinstance(block, vqgan.ResBlock):
                h = masked_res_block(block, h, m)
            elif isinstance(block, vqgan.AttnBlock):
                h = masked_attention(block, h, m)  # (B, C, h, w)
        skips.append(h)  # the middle block
        h, _ = masked_conv(encoder.conv_out, F.silu(masked_group_norm(encoder.norm_out, h, m)), m)
        return h, skips  # (B, d_B, h, w)

    def encode(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Frames and masks (B, 1, H, W) → (tokens (B, h, w), skips). Visible tokens and visible skip
        entries do not depend on the hole's pixels; hole tokens are whatever the hole held."""
        mask = self.check_input(x, mask)
        z_e, skips = self.encode_features(x, mask)
        _, indices, _ = self.quantizer(z_e)  # (B, h, w)
        return indices, skips

    # --- decoder with symmetrical connections ----------------------------------------------------

    @staticmethod
    def connect(h: torch.Tensor, skip: torch.Tensor, mask: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Symmetrical connection (LIP §3.1): h ← (skip·(1 − m) + h·m + h) / 2 where `gate` (B,) is True.

        At visible positions h becomes the mean of the encoder's and the decoder's feature; at
        defective ones h is unchanged (h·m + h = 2h)."""
        m = pool_mask(mask, h.shape[-1]).to(h.dtype)  # (B, 1, H_l, W_l)
        connected = (skip * (1 - m) + h * m + h) / 2  # (B, C_l, H_l, W_l)
        return torch.where(gate.view(-1, 1, 1, 1), connected, h)

    def decode_codes(self, z_q: torch.Tensor, skips: list[torch.Tensor] | None, mask: torch.Tensor | None,
                     gate: torch.Tensor | None = None) -> torch.Tensor:
        """G(B[z]) (B, 1, H, W), with the skips joined at every mirrored stage (when given)."""
        decoder, levels = self.decoder, len(self.config.ch_mult)
        if skips is not None and gate is None:
            gate = torch.ones(z_q.shape[0], dtype=torch.bool, device=z_q.device)
        pending = list(skips) if skips is not None else []  # mirrored: the last skip joins first

        def join(h: torch.Tensor) -> torch.Tensor:  # a cell encoder's skips run out after the middle block
            return self.connect(h, pending.pop(), mask, gate) if pending else h

        h = join(decoder.mid(decoder.conv_in(z_q)))  # (B, C, h, w) ← the encoder's middle block
        blocks = iter(decoder.up)  # per level: num_res_blocks + 1 ResBlocks, then (upsample, conv)
        for level in reversed(range(levels)):
            for _ in range(self.config.num_res_blocks + 1):
                h = next(blocks)(h)  # (B, C_l, H_l, W_l)
            h = join(h)  # ← the encoder's level l
            if level > 0:
                h = next(blocks)(next(blocks)(h))  # nearest upsampling, conv: (B, C_l, 2 H_l, 2 W_l)
        return decoder.conv_out(F.silu(decoder.norm_out(h)))  # (B, 1, H, W)

    def decode(self, indices: torch.Tensor, skips: list[torch.Tensor] | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens (B, h, w) → x̂ (B, 1, H, W). With `skips` (from encode) the pixel `mask` is needed."""
        if skips is not None and mask is None:
            raise ValueError("decoding with skips needs the pixel mask they were encoded with")
        dtype = self.decoder.conv_in.weight.dtype
        return self.decode_codes(self.quantizer.lookup(indices).to(dtype), skips, mask)

    # --- training ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, use_skips=True,
                step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x, mask (B, 1, H, W) → (x̂, losses). use_skips: a bool or a bool per frame (B,).

        loss = rec_loss + codebook_loss + commitment_loss + λ · disc_weight · gan_loss (vqgan.py);
        rec_loss is the L1 error over every pixel, the hole included (the decoder must draw it)."""
        mask = self.check_input(x, mask)
        z_e, skips = self.encode_features(x, mask)
        z_q, _, losses = self.quantizer(z_e)  # (B, d_B, h, w) straight-through, float32
        gate = torch.as_tensor(use_skips, device=x.device).expand(x.shape[0])  # (B,)
        x_rec = self.decode_codes(z_q.to(z_e.dtype), skips, mask, gate)  # (B, 1, H, W)
        losses["rec_loss"] = (x_rec.float() - x.float()).abs().mean()
        losses["gan_loss"] = torch.zeros((), device=x.device)
        losses["adaptive_weight"] = torch.zeros((), device=x.device)
        if self.discriminator is not None and self.training and step >= self.config.disc_start and \
                torch.is_grad_enabled():
            losses["gan_loss"] = -self.discriminator(x_rec).mean()  # hinge generator loss
            losses["adaptive_weight"] = vqgan.adaptive_weight(losses["rec_loss"], losses["gan_loss"],
                                                              self.decoder.conv_out.weight)
        losses["loss"] = (losses["rec_loss"] + losses["codebook_loss"] + losses["commitment_loss"]
                          + self.config.disc_weight * losses["adaptive_weight"] * losses["gan_loss"])
        return x_rec, losses

    def discriminator_loss(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        """Hinge loss of D (vqgan.py): (mean relu(1 − D(x)) + mean relu(1 + D(sg[x̂]))) / 2."""
        real, fake = self.discriminator(x), self.discriminator(x_rec.detach())  # (B, 1, H', W')
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


# ---------------------------------------------------------------------------------------------
# 4. MP-S2S: three perspectives of the known, a causal decoder over the frame's tokens (LIP §3.2)
# ---------------------------------------------------------------------------------------------


def hole_token_loss(logits: torch.Tensor, targets: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """LIP §3.3: L = − mean over hole tokens p of log p(y_p | y_<p, text, visible tokens, pixels).

    logits (B, N, K), targets (B, h, w), hole (B, h, w). Only hole positions enter the loss, so the
    gradient at visible positions is exactly 0 (tested)."""
    B, N, K = logits.shape
    picked = hole.reshape(B, N)  # (B, N)
    if not picked.any():
        return logits.sum() * 0.0  # no hole token in the batch: a zero loss that still has a graph
    chosen = logits[picked]  # (n, K): the n hole tokens of the batch
    chosen = chosen.to(torch.promote_types(chosen.dtype, torch.float32))  # bf16 under autocast → float32
    return F.cross_entropy(chosen, targets.reshape(B, N)[picked])


class MPS2S(nuwa.CodeEmbeddings, nn.Module):
    """Multi-perspective sequence to sequence. forward(text, tokens, hole, image, mask) → logits (B, N, K).

    Codes go in and out as in NÜWA (nuwa.CodeEmbeddings: code_vectors, logits, set_code_pixels)."""

    def __init__(self, config: LIPConfig):
        super().__init__()
        if not 0.0 <= config.cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob is a probability, got {config.cond_drop_prob}")
        self.config = config
        self.tokenizer = nuwa.TextTokenizer(config.text_len)
        D, grid = config.dim, (1, config.token_h, config.token_w)
        # Perspective 1: the caption (1 × 1 × L), full attention.
        self.text_embed = nn.Embedding(len(self.tokenizer.vocabulary), D)
        self.text_pos = nuwa.PositionEmbedding3D((1, 1, config.text_len), D)
        self.text_encoder = nn.ModuleList(nuwa.EncoderLayer(config) for _ in range(config.text_layers))
        # Perspective 2: the visible tokens, hole tokens replaced by [MASK], bidirectional.
        # DEVIATION (LIP §3.2): one token embedding for the visible-token encoder and the decoder's input (ours).
        self.token_embed = nn.Embedding(config.codebook_size, D)
        self.mask_embed = nn.Parameter(torch.zeros(D))  # the learned [MASK]
        self.token_pos = nuwa.PositionEmbedding3D(grid, D)
        self.token_encoder = nn.ModuleList(nuwa.EncoderLayer(config) for _ in range(config.token_layers))
        # Perspective 3: pixel patches of the masked frame (and of the mask), bidirectional.
        self.patch_embed = nn.Conv2d(2, D, config.patch, stride=config.patch)  # a linear map per patch
        self.patch_pos = nuwa.PositionEmbedding3D(grid, D)
        self.pixel_encoder = nn.ModuleList(nuwa.EncoderLayer(config) for _ in range(config.pixel_layers))
        # DEVIATION (LIP §3.2): a learned type embedding tells the decoder which perspective a key is from.
        self.perspective = nn.Parameter(torch.zeros(3, D))
        # DEVIATION (LIP §3.2): a LayerNorm per perspective before concatenation, so no perspective's scale dominates (ours).
        self.memory_norm = nn.ModuleList(nn.LayerNorm(D) for _ in range(3))
        # The decoder: causal 3DNA self-attention, full cross-attention to the three perspectives.
        self.bos = nn.Parameter(torch.zeros(D))
        self.target_pos = nuwa.PositionEmbedding3D(grid, D)
        self.decoder = nn.ModuleList(nuwa.DecoderLayer(config) for _ in range(config.decoder_layers))
        self.decoder_norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, config.codebook_size, bias=False)
        self.apply(nuwa.NUWA._init_weights)
        if config.tie_head:
            # DEVIATION (LIP §3.2 does not say; as nuwa.py): logits are h · e_k, the embedding of code k.
            self.head.weight = self.token_embed.weight
        if config.pixel_codes:
            # DEVIATION (LIP §3.2 embeds a code by a free vector; as nuwa.py): e_k = E[k] + W · pixels_k,
            # pixels_k the f × f cell the DF-VQGAN draws for code k (`set_code_pixels`, stored with the
            # model). Without it, 5,000 steps learnt only the black code: every ink token of a
            # half-hidden digit cost 5.5 nats, about a uniform guess among the ink codes (README, NÜWA-LIP).
            self.add_pixel_codes(config.patch ** 2)

    @property
    def token_shape(self) -> tuple[int, int, int]:
        return (1, self.config.token_h, self.config.token_w)

    def check_inputs(self, text, tokens, hole, image, mask) -> None:
        _, h, w = self.token_shape
        P = self.config.patch
        B = text.shape[0]
        if text.shape != (B, self.config.text_len):
            raise ValueError(f"text must be (B, {self.config.text_len}) word ids, got {tuple(text.shape)}")
        if tokens.shape != (B, h, w) or hole.shape != (B, h, w) or hole.dtype != torch.bool:
            raise ValueError(f"tokens and hole must be (B, {h}, {w}) (hole bool), got {tuple(tokens.shape)}, "
                             f"{tuple(hole.shape)} {hole.dtype}")
        if image.shape != (B, 1, h * P, w * P) or mask.shape != image.shape or mask.dtype != torch.bool:
            raise ValueError(f"image and mask must be (B, 1, {h * P}, {w * P}) (mask bool), got "
                             f"{tuple(image.shape)}, {tuple(mask.shape)} {mask.dtype}")

    def encode(self, text, tokens, hole, image, mask) -> torch.Tensor:
        """The decoder's memory: [text (B, L, D); visible tokens (B, N, D); pixel patches (B, N, D)]
        → (B, L + 2N, D). Nothing of the hole reaches it: hole tokens are [MASK], hole pixels are 0."""
        self.check_inputs(text, tokens, hole, image, mask)
        B = text.shape[0]
        grid = self.token_shape
        known = F.embedding(tokens.masked_fill(hole, 0), self.code_vectors()).view(B, -1, self.config.dim)  # (B, N, D)
        known = torch.where(hole.view(B, -1, 1), self.mask_embed.to(known.dtype), known)  # [MASK] at holes
        known = known + self.token_pos(grid)  # (B, N, D)
        for layer in self.token_encoder:
            known = layer(known, grid, None)  # (B, N, D), bidirectional
        visible_pixels = torch.cat([image.masked_fill(mask, 0.0), mask.to(image.dtype)], 1)  # (B, 2, H, W)
        patches = self.patch_embed(visible_pixels).flatten(2).transpose(1, 2) + self.patch_pos(grid)  # (B, N, D)
        for layer in self.pixel_encoder:
            patches = layer(patches, grid, None)  # (B, N, D)
        parts = [norm(part) + type_embedding for norm, part, type_embedding
                 in zip(self.memory_norm[1:], (known, patches), self.perspective[1:])]
        return torch.cat([self.encode_caption(text), *parts], 1)  # (B, L + 2N, D)

    def encode_caption(self, text: torch.Tensor) -> torch.Tensor:
        """Perspective 1, the caption: word ids (B, L) → LayerNorm(text encoder(word + position)) + its
        type vector (B, L, D). With text_layers = 0 this is NÜWA's caption memory (init_from_nuwa)."""
        x = self.text_embed(text) + self.text_pos((1, 1, self.config.text_len))  # (B, L, D)
        for layer in self.text_encoder:
            x = layer(x, (1, 1, self.config.text_len), None)  # (B, L, D), full attention
        return self.memory_norm[0](x) + self.perspective[0]

    def decoder_input(self, tokens: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
        """[bos, y_0, …, y_{N-2}] + the position each input predicts: (B, h, w) → (B, N, D) (as NÜWA).
        With visible_input=False (the official code) a visible y_p enters as the learned [MASK]."""
        B = tokens.shape[0]
        shifted = F.embedding(tokens.reshape(B, -1)[:, :-1], self.code_vectors())  # (B, N - 1, D)
        if not self.config.visible_input:
            visible = ~hole.reshape(B, -1)[:, :-1, None]  # (B, N - 1, 1)
            shifted = torch.where(visible, self.mask_embed.to(shifted.dtype), shifted)
        return torch.cat([self.bos.expand(B, 1, -1), shifted], 1) + self.target_pos(self.token_shape)  # (B, N, D)

    def decode_logits(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        for layer in self.decoder:
            x = layer(x, self.token_shape, memory, (1, 1, memory.shape[1]), None)  # (B, N, D)
        return self.logits(x)  # (B, N, K)

    def forward(self, text, tokens, hole, image, mask) -> torch.Tensor:
        """Teacher-forced logits (B, N, K) for every position of the frame (hole or not)."""
        return self.decode_logits(self.decoder_input(tokens, hole), self.encode(text, tokens, hole, image, mask))

    def loss(self, text, tokens, hole, image, mask) -> torch.Tensor:
        """Cross-entropy on the hole tokens only (LIP §3.3). In training, a `cond_drop_prob` share of
        the captions becomes "None" (for classifier-free guidance)."""
        if self.training and self.config.cond_drop_prob > 0:
            drop = torch.rand(text.shape[0], device=text.device) < self.config.cond_drop_prob  # (B,)
            text = torch.where(drop[:, None], self.none_text(text.shape[0]).to(text.device), text)
        return hole_token_loss(self(text, tokens, hole, image, mask), tokens, hole)

    def none_text(self, batch: int) -> torch.Tensor:
        """The unconditional caption "None" as word ids (batch, L)."""
        return self.tokenizer.encode([None] * batch)

    # --- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, text, tokens, hole, image, mask, *, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True,
                 guidance_scale: float | None = None) -> torch.Tensor:
        """Sample the hole tokens in raster order; visible tokens are forced. → tokens (B, h, w).

        use_cache=False recomputes the whole decoder at every position (the slow reference; a test
        proves both give the same tokens). temperature 0 is greedy. guidance_scale s (classifier-free
        guidance, for models trained with `cond_drop_prob` > 0): logits = l_None + s · (l_caption −
        l_None), where the "None" pass keeps the same visible tokens and pixels: s > 1 pushes the fill
        towards what the caption says beyond what the visible part already shows."""
        threads = torch.get_num_threads()
        if use_cache and self.bos.device.type == "cpu":
            torch.set_num_threads(1)  # one-token steps: threads only add synchronisation (nuwa.py)
        try:
            return self._generate(text, tokens, hole, image, mask, temperature, top_k, generator, use_cache,
                                  guidance_scale)
        finally:
            torch.set_num_threads(threads)

    def _generate(self, text, tokens, hole, image, mask, temperature, top_k, generator, use_cache, guidance_scale):
        B, h, w = tokens.shape
        N = h * w
        memories = [self.encode(text, tokens, hole, image, mask)]  # (B, L + 2N, D) per pass
        if guidance_scale is not None:
            memories.append(self.encode(self.none_text(B).to(text.device), tokens, hole, image, mask))
        memory_shape = (1, 1, memories[0].shape[1])
        known, sample_at = tokens.reshape(B, N), hole.reshape(B, N)  # (B, N) each
        out = known.clone()  # visible tokens already in place; hole tokens are overwritten in order
        caches = [[(layer.self_attn.new_cache(), layer.cross_attn.new_cache()) for layer in self.decoder]
                  for _ in memories]  # one set per pass
        positions = self.target_pos(self.token_shape)  # (N, D)
        vectors = self.code_vectors()  # (K, D), once for all steps
        for p in range(N):
            if use_cache:
                x_p = self.bos.expand(B, 1, -1) if p == 0 else F.embedding(out[:, p - 1:p], vectors)
                if p > 0 and not self.config.visible_input:  # the official input: [MASK] after a visible token
                    x_p = torch.where(sample_at[:, p - 1:p, None], x_p, self.mask_embed.to(x_p.dtype))
                x_p = x_p + positions[p]  # (B, 1, D), the same input for every pass
                states = []
                for memory, pass_caches in zip(memories, caches):
                    x = x_p
                    for layer, layer_caches in zip(self.decoder, pass_caches):
                        x = layer.step(x, p, self.token_shape, layer_caches, memory, memory_shape, None)  # (B, 1, D)
                    states.append(x)
                if not sample_at[:, p].any():
                    continue  # every frame knows y_p: its state is cached, no logits needed
                logits = [self.logits(x, vectors)[:, 0] for x in states]  # (B, K) per pass
            else:
                if not sample_at[:, p].any():
                    continue
                x = self.decoder_input(out.view(B, h, w), hole)  # (B, N, D)
                logits = [self.decode_logits(x, memory)[:, p] for memory in memories]  # (B, K) per pass
            if guidance_scale is None:
                logits = logits[0]
            else:
                logits = logits[1] + guidance_scale * (logits[0] - logits[1])  # classifier-free guidance
            sampled = nuwa.sample_logits(logits, temperature, top_k, None, generator)  # (B,)
            out[:, p] = torch.where(sample_at[:, p], sampled, out[:, p])
        return out.view(B, h, w)


# What must agree for a NÜWA's weights to fit MP-S2S: the shapes of every copied tensor, and how logits are formed.
NUWA_SHARED_FIELDS = ("dim", "num_heads", "decoder_layers", "mlp_ratio", "codebook_size", "token_h", "token_w",
                      "text_len", "extent", "relative_bias", "relative_keys", "tie_head", "pixel_codes")


@torch.no_grad()
def init_from_nuwa(model: MPS2S, source: nuwa.NUWA) -> list[str]:
    """Copy a trained NÜWA's text→image path into MP-S2S; returns the names of the tensors set.

    NÜWA (encoder_layers = 0) reads a caption as LayerNorm(word + position) and predicts a frame's
    codes with its decoder; MP-S2S's caption perspective is LayerNorm(word + position) + a type vector
    (zero at the start), its decoder the same layers. Copied: word embeddings, the caption's and the
    target's position tables (time row 0: one frame), the caption LayerNorm, bos, code embeddings and
    code pixels, every decoder layer, the final LayerNorm. Were the memory the caption alone, MP-S2S
    would give NÜWA's text→image logits exactly (tested); the visible-token and pixel perspectives
    are new keys its cross-attention learns to read."""
    mine, theirs = model.config, source.config
    comparable = lambda value: tuple(value) if isinstance(value, (list, tuple)) else value  # extents: list or tuple
    wrong = [f"{name}: MP-S2S {getattr(mine, name)!r}, NÜWA {getattr(theirs, name)!r}" for name in NUWA_SHARED_FIELDS
             if comparable(getattr(mine, name)) != comparable(getattr(theirs, name))]
    if theirs.encoder_layers != 0 or mine.text_layers != 0:
        wrong.append(f"text layers: MP-S2S {mine.text_layers}, NÜWA encoder_layers {theirs.encoder_layers} (both must be 0)")
    if model.tokenizer.vocabulary != source.tokenizer.vocabulary:
        wrong.append("caption vocabularies differ")
    if wrong:
        raise ValueError("this NÜWA cannot start MP-S2S; set the MP-S2S flags to match (--set FIELD=VALUE): "
                         + "; ".join(wrong))
    L = mine.text_len
    pairs = {"text_embed.weight": source.text_embed.weight,
             "text_pos.time.weight": source.cond_pos.time.weight[:1],
             "text_pos.height.weight": source.cond_pos.height.weight[:1],
             "text_pos.width.weight": source.cond_pos.width.weight[:L],
             "memory_norm.0.weight": source.encoder_norm.weight, "memory_norm.0.bias": source.encoder_norm.bias,
             "bos": source.bos, "token_embed.weight": source.token_embed.weight,
             "target_pos.time.weight": source.target_pos.time.weight[:1],
             "target_pos.height.weight": source.target_pos.height.weight,
             "target_pos.width.weight": source.target_pos.width.weight,
             "decoder_norm.weight": source.decoder_norm.weight, "decoder_norm.bias": source.decoder_norm.bias}
    if mine.pixel_codes:
        pairs.update({"code_pixels": source.code_pixels, "pixel_embed.weight": source.pixel_embed.weight})
    if not mine.tie_head:
        pairs["head.weight"] = source.head.weight
    pairs.update({f"decoder.{name}": value for name, value in source.decoder.state_dict().items()})
    targets = model.state_dict()
    for name, value in pairs.items():
        if targets[name].shape != value.shape:
            raise ValueError(f"{name}: MP-S2S {tuple(targets[name].shape)}, NÜWA {tuple(value.shape)}")
        targets[name].copy_(value)
    return sorted(pairs)


# ---------------------------------------------------------------------------------------------
# 5. Inpainting: K candidates, visible tokens forced, decoded with the masked frame's skips
# ---------------------------------------------------------------------------------------------

Scorer = Callable[[torch.Tensor, str], torch.Tensor]  # (pixels (K, 1, H, W), caption) → scores (K,)


def check_inpainting_inputs(tokenizer: DFVQGAN, image: torch.Tensor, mask: torch.Tensor, captions: list[str]) -> None:
    """Clear errors for the mistakes a caller makes: shapes, dtypes, range, masks with no hole."""
    R = tokenizer.config.resolution
    if image.dim() != 4 or tuple(image.shape[1:]) != (1, R, R):
        raise ValueError(f"image must be (B, 1, {R}, {R}) in [0, 1], got shape {tuple(image.shape)}")
    if not image.is_floating_point() or image.min() < 0 or image.max() > 1:
        raise ValueError("image must be a float tensor with values in [0, 1]")
    if mask.dtype != torch.bool or mask.shape != image.shape:
        raise ValueError(f"mask must be a bool tensor of the image's shape {tuple(image.shape)} (True = missing), "
                         f"got {mask.dtype} of shape {tuple(mask.shape)}")
    if len(captions) != image.shape[0]:
        raise ValueError(f"{image.shape[0]} image(s) but {len(captions)} caption(s)")
    nothing_missing = [i for i in range(len(mask)) if not mask[i].any()]
    if nothing_missing:
        raise ValueError(f"mask of image(s) {nothing_missing} has no missing pixel: there is nothing to inpaint "
                         f"(DFVQGAN.decode(*DFVQGAN.encode(x, mask), mask) reconstructs a frame)")


@torch.no_grad()
def inpaint(model: MPS2S, tokenizer: DFVQGAN, image: torch.Tensor, mask: torch.Tensor, captions, *,
            candidates: int = 1, scorer: Scorer | None = None, temperature: float = 1.0, top_k: int | None = None,
            generator: torch.Generator | None = None, use_cache: bool = True,
            guidance_scale: float | None = None) -> tuple[torch.Tensor, dict]:
    """Fill the missing pixels of `image` (B, 1, H, W) under `mask` (B, 1, H, W) as `captions` say.

    Returns (pixels (B, 1, H, W) in [0, 1], info). Per image, K = `candidates` token grids are
    sampled (visible tokens forced, hole tokens drawn), decoded with the DF-VQGAN skips of the
    masked image, and the candidate with the highest `scorer` score is kept (the first if no scorer).
    info: "candidates" (B, K, 1, H, W), "scores" (B, K) or None, "best" (B,), "tokens" (B, K, h, w),
    "hole" (B, h, w) the hole tokens, "reconstruction" (B, 1, H, W) = decode of the visible input alone.

    An all-missing mask is allowed: every token is sampled and no skip carries anything, i.e. plain
    text-to-image. A mask with no missing pixel is a ValueError (nothing to inpaint).
    """
    captions = [captions] if isinstance(captions, str) else list(captions)
    if tokenizer.training or model.training:
        raise ValueError("inpaint needs models in eval mode (in training mode the DF-VQGAN's codebook would "
                         "update itself from the masked frame): call .eval() first; lip.load_lip does")
    check_inpainting_inputs(tokenizer, image, mask, captions)
    if candidates < 1:
        raise ValueError(f"candidates must be ≥ 1, got {candidates}")
    device = model.bos.device
    image, mask = image.to(device), mask.to(device)
    B, K = image.shape[0], candidates
    masked = image.masked_fill(mask, 0.0)  # the hole's content is never read
    indices, skips = tokenizer.encode(masked, mask)  # (B, h, w); visible entries exact
    hole = token_mask(mask, indices.shape[-2:])  # (B, h, w)
    reconstruction = tokenizer.decode(indices, skips, mask).clamp(0, 1)  # (B, 1, H, W)
    text = model.tokenizer.encode(captions).to(device)  # (B, L)
    repeat = lambda t: t.repeat_interleave(K, 0)  # (B, ...) → (B·K, ...), candidates of an image adjacent
    tokens = model.generate(repeat(text), repeat(indices), repeat(hole), repeat(masked), repeat(mask),
                            temperature=temperature, top_k=top_k, generator=generator, use_cache=use_cache,
                            guidance_scale=guidance_scale)  # (B·K, h, w)
    pixels = tokenizer.decode(tokens, [repeat(s) for s in skips], repeat(mask)).clamp(0, 1)  # (B·K, 1, H, W)
    pixels = pixels.view(B, K, *pixels.shape[1:])  # (B, K, 1, H, W)
    scores, best = None, torch.zeros(B, dtype=torch.long, device=device)
    if scorer is not None:
        # DEVIATION (LIP §3.3): the paper reranks with CLIP; the caller's scorer stands in for it.
        scores, best = rerank(pixels, captions, scorer)
    chosen = pixels[torch.arange(B, device=device), best]  # (B, 1, H, W)
    info = {"candidates": pixels, "scores": scores, "best": best, "tokens": tokens.view(B, K, *tokens.shape[1:]),
            "hole": hole, "reconstruction": reconstruction}
    return chosen, info


def rerank(candidates: torch.Tensor, captions: list[str], scorer: Scorer) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every frame's K candidates under its caption: candidates (B, K, 1, H, W) → scores (B, K)
    and the index of the best (B,). (LIP §3.3 ranks with CLIP; `inpaint` calls this with its scorer.)"""
    B, K = candidates.shape[:2]
    scores = torch.stack([torch.as_tensor(scorer(candidates[b], captions[b]), dtype=torch.float32).reshape(K)
                          for b in range(B)]).to(candidates.device)  # (B, K)
    return scores, scores.argmax(1)


# ---------------------------------------------------------------------------------------------
# 6. Masks for training and evaluation (1 = missing; data.py has boxes and half frames)
# ---------------------------------------------------------------------------------------------

SIDES = ("top", "bottom", "left", "right")
INK_LEVEL = 0.5  # a pixel is ink above this grey level (data.py's sketch threshold)


def half_digit_mask(frame: torch.Tensor, side: str) -> torch.Tensor:
    """Half of the ink's bounding box is missing: the `side` half of the box around the pixels above
    INK_LEVEL (rounded outwards). frame (1, H, W) → bool (1, H, W); the whole frame if it has no ink."""
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}; expected one of {SIDES}")
    ink = frame[0] > INK_LEVEL  # (H, W)
    mask = torch.zeros_like(frame, dtype=torch.bool)  # (1, H, W)
    if not ink.any():
        return ~mask
    rows, cols = ink.any(1).nonzero()[:, 0], ink.any(0).nonzero()[:, 0]
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    ym, xm = (y0 + y1) // 2, (x0 + x1) // 2
    box = {"top": (y0, ym, x0, x1), "bottom": (ym, y1, x0, x1), "left": (y0, y1, x0, xm), "right": (y0, y1, xm, x1)}
    top, bottom, left, right = box[side]
    mask[0, top:bottom, left:right] = True
    return mask


def item_rng(seed: int, step: int, index: int) -> np.random.Generator:
    """The random stream of item `index` of training step `step`: a pure function of the three, so a
    resumed or distributed run draws the same masks (train.py's exact-resume rule)."""
    return np.random.default_rng([seed, step, index])


def training_mask(frame: torch.Tensor, rng: np.random.Generator, box_prob: float, half_digit_prob: float) -> torch.Tensor:
    """One MP-S2S training mask (1, H, W): LIP's random boxes, half of the digit, or half of the frame."""
    kind = rng.random()
    if kind < box_prob:
        return data.random_box_mask(rng, frame.shape[-1])
    side = SIDES[int(rng.integers(len(SIDES)))]
    if kind < box_prob + half_digit_prob:
        return half_digit_mask(frame, side)
    return data.half_mask(side, frame.shape[-1])


def tokenizer_training_mask(rng: np.random.Generator, config: DFVQGANConfig) -> torch.Tensor:
    """One DF-VQGAN training mask (1, H, W) from LIP §3.1's mix: none, all missing, or random boxes."""
    kind, size = rng.random(), config.resolution
    if kind < config.mask_none_prob:
        return torch.zeros(1, size, size, dtype=torch.bool)
    if kind < config.mask_none_prob + config.mask_full_prob:
        return torch.ones(1, size, size, dtype=torch.bool)
    return data.random_box_mask(rng, size)


# ---------------------------------------------------------------------------------------------
# 7. Loading trained models (checkpoints written by train.py --stage dfvqgan / lip)
# ---------------------------------------------------------------------------------------------


def config_from(cls, values: dict, path) -> object:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path} has config fields {cls.__name__} does not know: {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def load_checkpoint(path, stage: str, map_location="cpu") -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no {stage} checkpoint at {path}; train one with "
                                f"`python train.py --stage {stage} --preset tiny`")
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if checkpoint.get("stage") != stage:
        raise ValueError(f"{path} is a checkpoint of stage {checkpoint.get('stage')!r}, not {stage!r}")
    return checkpoint


def load_dfvqgan(path, *, map_location="cpu") -> DFVQGAN:
    """The DF-VQGAN stored at `path` by `train.py --stage dfvqgan`, in eval mode."""
    checkpoint = load_checkpoint(path, "dfvqgan", map_location)
    model = DFVQGAN(config_from(DFVQGANConfig, checkpoint["config"], path))
    model.load_state_dict(checkpoint["model"])
    return model.to(map_location).eval()


# What an MP-S2S checkpoint written before these fields existed was trained with: the paper's choices.
LEGACY_LIP_DEFAULTS = dict(tie_head=False, pixel_codes=False)


def load_lip(path, *, dfvqgan_ckpt: str | None = None, map_location="cpu") -> tuple[MPS2S, DFVQGAN]:
    """(MP-S2S, its DF-VQGAN), both in eval mode; the DF-VQGAN path is the one recorded in the
    checkpoint unless `dfvqgan_ckpt` overrides it. Their codebooks and token grids must agree, and
    the DF-VQGAN's codes must mean what they meant at training (`check_code_meaning`)."""
    checkpoint = load_checkpoint(path, "lip", map_location)
    model = MPS2S(config_from(LIPConfig, {**LEGACY_LIP_DEFAULTS, **checkpoint["config"]}, path))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise ValueError(f"{path} does not match the MP-S2S its config describes (tie_head={model.config.tie_head}, "
                         f"pixel_codes={model.config.pixel_codes}, codebook_size={model.config.codebook_size}, "
                         f"token grid {model.config.token_h}×{model.config.token_w}): {error}") from error
    tokenizer_path = dfvqgan_ckpt or model.config.dfvqgan_ckpt
    tokenizer = load_dfvqgan(tokenizer_path, map_location=map_location)
    check_pair(model.config, tokenizer.config)
    check_code_meaning(model, tokenizer, tokenizer_path)
    return model.to(map_location).eval(), tokenizer


def check_code_meaning(model: MPS2S, tokenizer: DFVQGAN, path: str) -> None:
    """Refuse a DF-VQGAN whose codes mean something else than the ones this MP-S2S learnt: the same K
    and grid are not enough (two tokenizers number their codes differently, and inpaintings would
    decode as noise). The pixels stored with the model (`code_pixels`) are what each code looked like
    at training: drawn by the DF-VQGAN itself, or, for a model started from a NÜWA (`init_nuwa`), by
    the plain VQGAN that the DF-VQGAN froze its tokens from (its `init_vqgan`, read from the current
    folder when relative; when that file is absent the check cannot be made, and a warning says so).
    Models without pixel codes store nothing to compare."""
    if not model.config.pixel_codes:
        return
    if not model.config.init_nuwa:
        model.check_code_pixels(tokenizer, path, flag="--dfvqgan")
        return
    plain_path = tokenizer.config.init_vqgan
    if not (tokenizer.config.freeze_tokens and plain_path):
        raise ValueError(f"{path} is not a DF-VQGAN that keeps a plain VQGAN's tokens (init_vqgan="
                         f"{plain_path!r}, freeze_tokens={tokenizer.config.freeze_tokens}), but this MP-S2S was "
                         f"started from a NÜWA and predicts such tokens: pass the DF-VQGAN it was trained with")
    if not Path(plain_path).exists():  # e.g. a model copied to another machine without that file
        warnings.warn(f"cannot check that {path} gives the codes this MP-S2S learnt: the plain VQGAN whose tokens "
                      f"it froze ({plain_path}) is not there. Inpaintings decode as noise if it is another one.",
                      stacklevel=3)
        return
    model.check_code_pixels(vqgan.load_vqgan(plain_path), f"{path} (its tokens are those of {plain_path})",
                            flag="--dfvqgan")  # the plain tokenizer whose pixels init_from_nuwa copied in


def check_pair(config: LIPConfig, tokenizer_config: DFVQGANConfig) -> None:
    """MP-S2S predicts the DF-VQGAN's tokens: K, the token grid and the patch size must match."""
    if (config.codebook_size, (config.token_h, config.token_w)) != (tokenizer_config.codebook_size,
                                                                     tokenizer_config.token_shape) \
            or config.patch != tokenizer_config.downsample:
        raise ValueError(f"the DF-VQGAN gives {tokenizer_config.codebook_size} codes on a {tokenizer_config.token_shape} "
                         f"grid (f = {tokenizer_config.downsample}), but MP-S2S expects {config.codebook_size} codes on "
                         f"({config.token_h}, {config.token_w}) with patch {config.patch}: set --codebook-size / "
                         f"--token-h / --token-w / --patch to match")

