"""NÜWA-Infinity: autoregressive over autoregressive generation of canvases and videos of any size.

Paper: Wu et al., "NÜWA-Infinity: Autoregressive over Autoregressive Generation for Infinite
Visual Synthesis", arXiv 2207.09814 (NeurIPS 2022). Implemented, named as in the paper's method
section (cited by name below, not by number): "autoregressive over autoregressive" (AR over AR: a
global patch-level AR over a local token-level AR), the Nearby Context Pool (NCP), the Arbitrary
Direction Controller (ADC: patch orders, and where each context patch lies), and render-and-optimize
training. Tokens come from the frozen VQ-GAN of vqgan.py (NÜWA §3.1).

In plain words: a canvas (or a video) is a grid of VQ tokens, cut into patches of ph × pw tokens
(one frame deep). A patch-level order (the ADC's direction) says which patch comes next. Inside the
current patch, a small causal transformer predicts the tokens one by one in raster order; besides
the tokens already made in this patch it attends to (a) the caption and (b) the patches around it
that came earlier in the order, within patch-offset extents (e_t, e_h, e_w). Those context patches
come from the NCP, which keeps every finished patch's per-layer keys and values exactly as long as a
later patch still needs them. Memory therefore depends on the extents and on the canvas's size
across the order, never along it (a wide canvas in a column order, a tall one in a row order, a
video frame by frame): a model trained on 64×128 canvases draws a 64×2048 strip column by column
with the same memory and time per patch. Each context patch's keys get a learned per-head bias indexed by
its offset (dt, dh, dw) from the current patch, so each head can weigh context by where it lies
(left, above, the frame before) whatever the order. A bias only reweights attention: what a head
reads carries no offset of its own, so it learns "how much from where", not "what is where".
Training walks the patches of a canvas in a sampled order and backpropagates each patch's loss at
once, with the pooled context detached (render-and-optimize).

Learning aids (on by default, `PAPER_SCHEME` turns them off), the ones NÜWA's tiny model needed
(nuwa.py, README "Learning probes"): token-level relative positions, a score b and a relative key r
per head and 3D token offset (dt, dy, dx) of a key from the token being predicted, *across* patch
borders (the row just above, in the patch above; the same place one frame back), so a head can
continue a stroke that a context patch began; the tied head; pixel code embeddings; identity-
initialised value and output projections. Offsets are taken from token positions, never from the
canvas's absolute position, so the pool and the flat cost are unchanged.

Which reading of "AR over AR" this is. There is one transformer, the token-level AR (section 4).
The "global patch-level AR" is not a second network here: it is the patch order (the ADC's
direction) plus the pool, i.e. each patch is generated conditioned on the cached states of the
patches before it, so the patches form an autoregressive sequence without a model of their own. A
separate small patch-level transformer over pooled per-patch summaries, whose output conditions the
token-level model, would be another reading; it is not built (module deviations).

Render-and-optimize, at what granularity. Each patch's loss is backpropagated as soon as the patch
is rendered, so a graph is one patch deep; the gradients of all patches of the training canvases
are averaged, and the optimizer steps once per canvas batch (train.py's units: one unit per patch,
one step per batch). Per-patch optimizer steps are not offered.

Sections: 1. configuration · 2. patches, orders (ADC) and the context rule · 3. the Nearby Context
Pool · 4. the model (token-level AR inside a patch) · 5. render-and-optimize training, data ·
6. generation with the pool, and the pool-free reference · 7. pixels, pictures, checkpoints.

Glossary: B batch, T frames, H W token rows / columns of the grid, (ph, pw) patch size in tokens,
P = ph·pw tokens per patch, (nT, nH, nW) the patch grid, a patch (t, i, j) its coordinates there,
order the list of patches in generation order, index a position in that list, (e_t, e_h, e_w)
extents in patches, (dt, dh, dw) a context patch's offset from the current one, C context tokens,
L caption length, D width, nh heads, hs head size, K codebook size, f pixels per token (VQ-GAN: 8),
S the pool bound (`pool_bound`), y_p the token at position p of the current patch.

What the pool caches, and why: per-layer key/value states of each finished patch, computed once
when the patch is made (with its own context), detached. Not the embedded tokens: with tokens, every
patch would re-run all layers over all its context tokens (a cost of (1 + context patches) patch
passes per patch instead of one), and a patch's context could only reach its direct neighbours.
With states, information flows across the canvas through the layers, like Transformer-XL memory.
The price is that a context patch's states depend on *its* context, so the pool-free reference
(`generate_reference`) recomputes every earlier patch from its tokens, in order, for every patch.

The frozen VQ-GAN on canvases wider than 64 px: it is convolutional, so a 64×W canvas is one
(64/f)×(W/f) token grid (f = 8 now: 8×(W/8)). Measured on the first, f = 4 tokenizer: its middle
attention block and GroupNorm see the whole canvas, so tokens of a canvas differ from tokens of its
64-px tiles, but 64×128 and 64×512 strips reconstructed as well as 64×64 frames (MSE per 64×64
block: 4.0 and 4.7 vs 5.1). The f = 8 cell tokenizer encodes each 8×8 cell on its own (its tokens
do not depend on the width at all); its decoder's attention costs O((W/f)²) memory: decoding, not
Infinity, is what grows with the canvas.

Deviations from the paper (each also marked `# DEVIATION` where it happens):
- Scale and data: 64×W grey canvases of MNIST digits (`DigitCanvases`) and Moving MNIST videos, not
  the paper's landscapes (LHQC) and its 38912×2048 showcase; a tiny model; the f = 8 cell VQ-GAN (8
  tokens per 64 px, K = 512); patches of 4×4 tokens (32×32 px), not 16×16 tokens of an F16 VQ-GAN.
- Learning aids the paper does not have (above): token-level relative positions across patches, a
  tied head, pixel code embeddings, identity-initialised attention projections; every layer reads the
  caption's embedded words (`text_encoder` False) rather than a caption run through the blocks.
- Classifier-free guidance at sampling (`guide`, off by default), as NÜWA's option: the paper does not
  use it. It is what makes the tiny models follow their caption, and keep a video's digit (README).
- Video: Moving MNIST clips, optionally captioned with their digits' names (`video_captions`).
- Captions are sets of digit names ("3 7": the digits drawn come from these classes). A left-to-right
  list cannot be followed by a model that only knows relative positions. No caption is the word
  "None" (as in NÜWA), and training drops captions to "None" with probability none_prob.
- What the NCP caches is our choice (above): per-layer keys and values of finished patches.
- The ADC's "order-aware positional embeddings" are, here, a learned per-layer, per-head bias on
  the attention logits indexed by the context patch's offset (dt, dh, dw). Cached keys cannot be
  re-embedded for every new current patch; a bias on them can. There are no absolute patch positions
  at all, which is what lets a model trained on 2×4 patches draw any width; tokens inside a patch
  have learned positions.
- Video: the `video` order goes frame by frame (raster inside a frame), so one model and one pool serve
  canvases and videos. A frame may be cut into patches like a canvas; `make infinity`'s video model uses
  one patch per frame (8×8 tokens): quarter-frame patches learned less in the same time (README).
- The context rule is a box: every earlier patch within the extents. The paper describes nearby
  context in words; the box is our precise reading.
- "AR over AR" is read as one token-level transformer plus the patch order and the pool; there is
  no separate patch-level network (above). Render-and-optimize steps the optimizer once per canvas
  batch, with every patch's gradient accumulated (above); the paper does not state the granularity.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

import data
import nearby_attention
import nuwa
import vqgan as vqgan_module

Patch = tuple[int, int, int]  # (t, i, j) on the patch grid

# ---------------------------------------------------------------------------------------------
# 1. Configuration
# ---------------------------------------------------------------------------------------------

DIRECTIONS = ("raster", "column", "right", "left", "up", "down", "video")
OUTPAINTING = ("right", "left", "up", "down")  # directions that start from given patches


# The paper's scheme: none of the learning aids (train.py: --relative-radius 0 --no-tie-head --no-pixel-codes
# --no-identity-init --text-encoder).
PAPER_SCHEME = dict(relative_radius=0, tie_head=False, pixel_codes=False, identity_init=False, text_encoder=True)


# What a checkpoint written before these fields existed was trained with.
LEGACY_DEFAULTS = PAPER_SCHEME


@dataclass
class InfinityConfig:
    dim: int = 128  # D, model width (paper: not reproduced here)
    num_heads: int = 4  # nh
    layers: int = 4  # transformer blocks of the token-level AR
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio · D (the usual transformer value)
    codebook_size: int = 512  # K, VQ-GAN codes (our tiny VQ-GAN; paper: an F16 VQ-GAN)
    # f, pixels per token: 8, the f = 8 cell tokenizer of `make models` (vqgan.py --cell-encoder --ch-mult
    # 1 2 4 4), on which the tiny NÜWA learnt to draw digits (README); the first Infinity used f = 4.
    token_px: int = 8
    # DEVIATION (scale): 4×4 tokens = 32×32 px of our f = 8 VQ-GAN; the paper: 16×16 tokens of an F16 VQ-GAN.
    patch_size: tuple[int, int] = (4, 4)  # (ph, pw) tokens per patch
    extent: tuple[int, int, int] = (1, 1, 1)  # (e_t, e_h, e_w) context extents in patches
    # --- learning aids, as in NÜWA (nuwa.py); each a DEVIATION, all off = the paper's scheme
    # Token-level relative positions: each head scores a key by its 3D token offset (dt, dy, dx) from
    # the token being predicted, dy and dx clipped to ±relative_radius, across patch borders (a
    # bias b and relative keys q·r, as NÜWA's 3DNA). 0: only the ADC's per-patch offset bias.
    relative_radius: int = 3
    tie_head: bool = True  # logits are h · e_k, the code's own embedding
    pixel_codes: bool = True  # a code's embedding includes a projection of the 8×8 pixels it draws
    identity_init: bool = True  # attention's value and output projections start as the identity
    # False: every layer reads the caption's embedded words themselves (word + position), as NÜWA's tiny
    # model without encoder layers; True: the caption first passes through the blocks (the first Infinity).
    text_encoder: bool = False
    text_len: int = 4  # L, caption words after padding (our captions: one or two digit names)
    # --- training data (train.py --stage infinity)
    data: str = "canvas"  # "canvas": DigitCanvases; "video": Moving MNIST clips, frame by frame
    canvas_height: int = 64  # training canvas height in pixels (one VQ-GAN frame high)
    canvas_width: int = 128  # training canvas width in pixels: 2×4 patches of 32 px
    frames: int = 4  # T of training videos (data="video")
    video_digits: int = 1  # digits per Moving MNIST training clip (data="video")
    # data="video": caption each clip with its digits' names ("3"), dropped to "None" with none_prob, as
    # canvases are captioned. The caption is the one thing every patch of every frame sees, however long the
    # video: it can hold the digit's identity where the two frames of context drift. False: uncaptioned clips.
    video_captions: bool = False
    # Orders sampled in training (ADC), each equally often. `right` is the same order as `column` and
    # `down` the same as `raster`, so the four distinct orders are listed once each.
    directions: str = "raster,column,left,up"
    none_prob: float = 0.25  # P(caption → "None") per training canvas, so captions are optional
    # --- optimisation; the model itself ignores these fields
    vqgan_ckpt: str = "out/vqgan/ckpt.pt"  # the frozen tokenizer whose codes this model predicts
    batch_size: int = 4  # canvases per step; each is walked patch by patch
    lr: float = 2e-3  # AdamW learning rate (paper: not reproduced)
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_steps: int = 10  # linear learning-rate warm-up
    grad_clip: float = 1.0  # clip the global gradient norm

    @property
    def token_h(self) -> int:  # token rows of a 64-px frame (the grid code pixels are read on)
        return data.CANVAS // self.token_px

    @property
    def token_w(self) -> int:
        return data.CANVAS // self.token_px

    @classmethod
    def preset(cls, name: str, **overrides) -> InfinityConfig:
        presets = {
            "tiny": {},  # CPU, minutes: the defaults above
            "small": dict(dim=256, num_heads=8, layers=8, batch_size=16, lr=1e-3, warmup_steps=100),  # one GPU
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(presets)} (the paper's "
                             f"model sizes are not reproduced)")
        return cls(**{**presets[name], **overrides})


# ---------------------------------------------------------------------------------------------
# 2. Patches, orders (ADC) and the context rule (NCP)
# ---------------------------------------------------------------------------------------------


def patch_grid(config: InfinityConfig, grid_shape: tuple[int, int, int]) -> Patch:
    """Token grid (T, H, W) → patch grid (nT, nH, nW); a clear error when it does not cut evenly."""
    if len(grid_shape) != 3:
        raise ValueError(f"grid shape must be (T, H, W) tokens, got {tuple(grid_shape)}")
    T, H, W = grid_shape
    ph, pw = config.patch_size
    if T < 1 or H < ph or W < pw:
        raise ValueError(f"grid {tuple(grid_shape)} tokens is smaller than one patch of {ph}×{pw} tokens "
                         f"({ph * config.token_px}×{pw * config.token_px} px)")
    if H % ph or W % pw:
        raise ValueError(f"grid {H}×{W} tokens does not divide into patches of {ph}×{pw} tokens; use "
                         f"multiples of {ph * config.token_px}×{pw * config.token_px} px")
    return (T, H // ph, W // pw)


def check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {list(DIRECTIONS)}")


def patch_order(direction: str, grid: Patch) -> list[Patch]:
    """ADC: the global patch order. Time is always outermost (frame by frame); inside a frame:

    raster / down / video: rows top → bottom, each left → right;   up: rows bottom → top.
    column / right: columns left → right, each top → bottom;       left: columns right → left.
    (right ≡ column and down ≡ raster as orders; the outpainting names say where the given part is.)"""
    check_direction(direction)
    nT, nH, nW = grid
    rows, cols = list(range(nH)), list(range(nW))
    # DEVIATION (ADC): video patches are quarters of a frame, so `video` is raster, frame by frame.
    if direction in ("raster", "down", "video", "up"):
        inner = [(i, j) for i in (rows[::-1] if direction == "up" else rows) for j in cols]
    else:
        inner = [(i, j) for j in (cols[::-1] if direction == "left" else cols) for i in rows]
    return [(t, i, j) for t in range(nT) for i, j in inner]


def within(q: Patch, p: Patch, extent) -> bool:
    return all(abs(a - b) <= e for a, b, e in zip(q, p, extent))


def context_rule(order: list[Patch], index: int, extent) -> list[Patch]:
    """The single source of truth (NCP): the context of patch order[index] is every patch that
    comes earlier in the order and lies within the extents, |dt| ≤ e_t, |dh| ≤ e_h, |dw| ≤ e_w,
    listed in order. O(index); the pool computes the same set in O(pool size)."""
    # DEVIATION (NCP): "nearby" read as this box of extents around the current patch.
    return [q for q in order[:index] if within(q, order[index], extent)]


def last_uses(order: list[Patch], extent) -> dict[Patch, int]:
    """For each patch, the index of the last patch whose context holds it (its own index if none):
    the pool evicts it right after that patch. O(patches · box) by scanning the extent box."""
    rank = {p: i for i, p in enumerate(order)}
    e_t, e_h, e_w = extent
    last = {}
    for p, r in rank.items():
        t, i, j = p
        users = [rank[q] for q in ((t + a, i + b, j + c) for a in range(-e_t, e_t + 1)
                                   for b in range(-e_h, e_h + 1) for c in range(-e_w, e_w + 1)) if q in rank]
        last[p] = max([u for u in users if u > r], default=r)
    return last


def pool_bound(direction: str, grid: Patch, extent) -> int:
    """S, the most patches the pool holds after any step. Along the order's axes from outermost to
    innermost, lengths (n1, n2, n3) and extents clipped to e_k ≤ n_k − 1, a patch's last user is at
    most S = e1·n2·n3 + e2·n3 + e3 places after it, so only patches of the last S places are alive.
    It depends on the grid's short side only if the order runs along the long side: for a wide
    canvas, column orders (column/right/left) are flat in the width, row orders grow with it."""
    check_direction(direction)
    nT, nH, nW = grid
    e_t, e_h, e_w = extent
    if direction in ("column", "right", "left"):
        axes = [(nT, e_t), (nW, e_w), (nH, e_h)]
    else:
        axes = [(nT, e_t), (nH, e_h), (nW, e_w)]
    (n1, e1), (n2, e2), (n3, e3) = [(n, min(e, n - 1)) for n, e in axes]
    return e1 * n2 * n3 + e2 * n3 + e3


# ---------------------------------------------------------------------------------------------
# 3. The Nearby Context Pool (NCP)
# ---------------------------------------------------------------------------------------------


class NearbyContextPool:
    """Finished patches' states, kept exactly as long as a later patch needs them.

    `add(patch, states)` stores a patch's per-layer keys/values (layers, 2, B, nh, P, hs), detached;
    `select(patch)` returns the pooled patches within the extents, in order (all pooled patches are
    earlier); `evict(index)` drops every patch whose last use (`last_uses`) is ≤ index. The caller
    walks the order: select → make the patch → add → evict."""

    def __init__(self, order: list[Patch], extent):
        self.order, self.extent = list(order), tuple(extent)
        self.rank = {p: i for i, p in enumerate(self.order)}
        self.last_use = last_uses(self.order, self.extent)
        self.states: dict[Patch, torch.Tensor] = {}  # insertion = order, so select() is sorted
        self.next_index = 0  # the index of the patch that `add` expects next

    def add(self, patch: Patch, states: torch.Tensor) -> None:
        if patch != self.order[self.next_index]:
            raise ValueError(f"patch {patch} added out of order; expected {self.order[self.next_index]}")
        # Render-and-optimize: pooled context is a constant, no gradient flows into it.
        # DEVIATION (NCP): what is cached is per-layer keys/values (module docstring: why).
        self.states[patch] = states.detach()
        self.next_index += 1

    def select(self, patch: Patch) -> list[tuple[Patch, torch.Tensor]]:
        return [(q, s) for q, s in self.states.items() if within(q, patch, self.extent)]

    def evict(self, index: int) -> list[Patch]:
        gone = [q for q in self.states if self.last_use[q] <= index]
        for q in gone:
            del self.states[q]
        return gone

    def __len__(self) -> int:
        return len(self.states)

    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.states.values())


# ---------------------------------------------------------------------------------------------
# 4. The model: token-level AR inside the current patch, attending to caption and context
# ---------------------------------------------------------------------------------------------


class ContextLayout(NamedTuple):
    """Where the context keys lie, for one current patch: `bias` (layers, nh, C), the ADC's score per
    context patch repeated over its P keys, and `positions` (C, 3), each key's token offset
    (dt, dy, dx) from the current patch's first token (for the token-level relative positions)."""

    bias: torch.Tensor
    positions: torch.Tensor


class Block(nn.Module):
    """Pre-norm attention + MLP. A query attends to prefix keys (caption, context patches; with an
    additive bias) and to its own patch's keys causally. `forward` is the full (teacher-forced) pass,
    `step` one token of generation over key/value buffers filled as the patch grows.

    With relative positions (config.relative_radius > 0), a query's score of a key also gets
    b[h, o] + q·r[h, o]/√hs, o the key's token offset from the position the query predicts (the
    `relative_index` of the model); keys without a position (the caption) get nothing."""

    def __init__(self, config: InfinityConfig):
        super().__init__()
        D, self.nh = config.dim, config.num_heads
        self.norm_attn, self.norm_mlp = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D, bias=False)  # Q = X·W^Q, K = X·W^K, V = X·W^V
        self.proj = nn.Linear(D, D)
        hidden = config.mlp_ratio * D
        self.mlp = nn.Sequential(nn.Linear(D, hidden), nn.GELU(), nn.Linear(hidden, D))
        self.position_bias = self.relative_keys = None
        if config.relative_radius:
            # DEVIATION (NÜWA-Infinity learns order-aware positional embeddings of patches only): one
            # score b and one key vector r per head and token offset, the last slot for bos; zero at
            # first, stored divided by RELATIVE_GAIN (nearby_attention: why), as NÜWA's 3DNA tables.
            count = relative_offsets(config)
            self.position_bias = nn.Parameter(torch.zeros(self.nh, count))  # (nh, V)
            self.relative_keys = nn.Parameter(torch.zeros(self.nh, count, D // self.nh))  # (nh, V, hs)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, D = x.shape
        qkv = self.qkv(self.norm_attn(x)).view(B, N, 3, self.nh, D // self.nh)  # (B, N, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 × (B, nh, N, hs)
        return q, k, v

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        B, nh, N, hs = attended.shape
        x = x + self.proj(attended.transpose(1, 2).reshape(B, N, nh * hs))  # (B, N, D)
        return x + self.mlp(self.norm_mlp(x))  # (B, N, D)

    def relative_scores(self, q: torch.Tensor, index: torch.Tensor | None):
        """b[h, o] + q·r[h, o]/√hs at each (query, key) of index (Nq, Nk) (offset slots, or V for a
        key without a position) → (B, nh, Nq, Nk); 0 without relative positions."""
        if index is None or self.position_bias is None:
            return 0.0
        B, nh = q.shape[:2]
        table = nearby_attention.relative_table(q, self.position_bias, self.relative_keys)  # (B, nh, Nq, V)
        table = F.pad(table, (0, 1))  # slot V: no position, no score
        return table.gather(-1, index.expand(B, nh, -1, -1))  # (B, nh, Nq, Nk)

    def forward(self, x, prefix_k, prefix_v, prefix_bias, causal: bool, index=None):
        """x (B, N, D), prefix keys/values (B, nh, C, hs), prefix_bias (nh, C), relative index
        (N, C + N) or None → x', own (k, v)."""
        q, k, v = self.heads(x)  # (B, nh, N, hs)
        N, C = x.shape[1], prefix_k.shape[2]
        own = torch.zeros(N, N, dtype=x.dtype, device=x.device)  # (N, N)
        if causal:
            own = own.masked_fill(torch.ones(N, N, dtype=torch.bool, device=x.device).triu(1), -math.inf)
        mask = torch.cat([prefix_bias[:, None, :].expand(-1, N, C), own.expand(self.nh, N, N)], -1)  # (nh, N, C+N)
        mask = mask + self.relative_scores(q, index)  # (nh or B·nh, N, C+N)
        keys, values = torch.cat([prefix_k, k], 2), torch.cat([prefix_v, v], 2)  # (B, nh, C+N, hs)
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, nh, N, hs)
        return self.finish(x, attended), (k, v)

    def step(self, x_p, slot: int, key_buffer, value_buffer, bias_row, index_row=None):
        """One token: x_p (B, 1, D); its key/value go to `slot` of the buffers (B, nh, C+P, hs);
        it attends to slots 0 … slot with bias_row (nh, C+P) and relative index_row (C+P) or None."""
        q, k, v = self.heads(x_p)  # (B, nh, 1, hs)
        key_buffer[:, :, slot:slot + 1], value_buffer[:, :, slot:slot + 1] = k, v
        mask = bias_row[:, None, :slot + 1]  # (nh, 1, slot+1)
        if index_row is not None:
            mask = mask + self.relative_scores(q, index_row[None, :slot + 1])  # (B, nh, 1, slot+1)
        attended = F.scaled_dot_product_attention(q, key_buffer[:, :, :slot + 1], value_buffer[:, :, :slot + 1],
                                                  attn_mask=mask)  # (B, nh, 1, hs)
        return self.finish(x_p, attended)


def relative_offsets(config: InfinityConfig) -> int:
    """V + 1 slots of a relative table: (2e_t + 1)(2R + 1)² token offsets, then bos."""
    side = 2 * config.relative_radius + 1
    return (2 * config.extent[0] + 1) * side * side + 1


class Infinity(nuwa.CodeEmbeddings, nn.Module):
    """The local token-level AR of NÜWA-Infinity, with the ADC's offset bias. Patch-level work
    (orders, pool) lives in the functions of sections 5 and 6. Codes in and out (tied head, pixel
    codes) as NÜWA's (nuwa.CodeEmbeddings)."""

    def __init__(self, config: InfinityConfig):
        super().__init__()
        self.config = config
        D, (ph, pw) = config.dim, config.patch_size
        if D % config.num_heads:
            raise ValueError(f"dim {D} is not divisible by num_heads {config.num_heads}")
        if config.relative_radius < 0:
            raise ValueError(f"relative_radius must be ≥ 0 (0: no token-level relative positions), "
                             f"got {config.relative_radius}")
        self.tokenizer = nuwa.TextTokenizer(config.text_len)
        self.text_embed = nn.Embedding(len(self.tokenizer.vocabulary), D)
        self.text_pos = nn.Embedding(config.text_len, D)
        self.token_embed = nn.Embedding(config.codebook_size, D)
        self.bos = nn.Parameter(torch.zeros(D))
        self.pos_h, self.pos_w = nn.Embedding(ph, D), nn.Embedding(pw, D)  # position inside a patch
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.decoder_norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, config.codebook_size, bias=False)
        self.apply(nuwa.NUWA._init_weights)
        # ADC: a learned bias per layer and head for each offset (dt, dh, dw) of a context
        # patch, added to the attention logits of all its keys. Zero at first: no preference yet.
        # DEVIATION (ADC): the paper learns order-aware positional embeddings; cached keys take a bias.
        e_t, e_h, e_w = config.extent
        self.offset_bias = nn.Parameter(torch.zeros(config.layers, config.num_heads, 2 * e_t + 1, 2 * e_h + 1,
                                                     2 * e_w + 1))
        if config.tie_head:
            # DEVIATION (as nuwa.py): logits are h · e_k, so copying a neighbour's embedding predicts its code.
            self.head.weight = self.token_embed.weight
        if config.identity_init:
            # DEVIATION (as nuwa.py): W^V = W^O = I, so a head passes on what it reads from the first step.
            for block in self.blocks:
                with torch.no_grad():
                    nn.init.eye_(block.qkv.weight[2 * D:])
                    nn.init.eye_(block.proj.weight)
        if config.pixel_codes:
            # DEVIATION (as nuwa.py): e_k = E[k] + W · pixels_k, the f × f cell the tokenizer draws for code
            # k (set by `set_code_pixels`, from vqgan.VQGAN.code_patches; train.py does it), so codes that
            # look alike start alike, and a stroke learnt in one place is a stroke everywhere.
            self.add_pixel_codes(config.token_px ** 2)

    @property
    def patch_tokens(self) -> int:
        return self.config.patch_size[0] * self.config.patch_size[1]  # P

    def empty_states(self, B: int, n: int = 0) -> torch.Tensor:
        nh = self.config.num_heads
        return self.bos.new_zeros(self.config.layers, 2, B, nh, n, self.config.dim // nh)

    def text_states(self, captions: list[str | None] | None, B: int) -> torch.Tensor:
        """Caption (None → the word "None") → per-layer (k, v) (layers, 2, B, nh, L, hs): the caption
        is a prefix every patch attends to. Each layer's keys and values are its projections of the
        embedded words (word + position); with `text_encoder`, of the words after the blocks before
        it, run over the caption non-causally."""
        ids = self.tokenizer.encode([None] * B if captions is None else list(captions)).to(self.bos.device)  # (B, L)
        if ids.shape[0] != B:
            raise ValueError(f"{ids.shape[0]} captions for a batch of {B}")
        x = self.text_embed(ids) + self.text_pos.weight  # (B, L, D)
        states, none = [], self.empty_states(B)[0, 0]  # none: (B, nh, 0, hs)
        no_bias = x.new_zeros(self.config.num_heads, 0)
        for block in self.blocks:
            if self.config.text_encoder:
                x, (k, v) = block(x, none, none, no_bias, causal=False)  # (B, L, D)
            else:
                # DEVIATION (as NÜWA's tiny model without encoder layers, nuwa.py): a caption run through
                # shared blocks collapsed into one summary of its words there; here every layer reads
                # the words themselves, and the patch's queries pick the word they need.
                _, k, v = block.heads(x)  # (B, nh, L, hs)
            states.append(torch.stack([k, v]))
        return torch.stack(states)  # (layers, 2, B, nh, L, hs)

    def context_bias(self, offsets: list[Patch]) -> torch.Tensor:
        """ADC: offsets of the context patches → bias (layers, nh, C = len(offsets)·P) on their keys.
        The context rule keeps every offset inside the extents; one outside would be a bug there."""
        if not offsets:
            return self.offset_bias.new_zeros(self.config.layers, self.config.num_heads, 0)
        extent = torch.tensor(self.config.extent)
        offsets = torch.tensor(offsets)  # (patches, 3)
        if bool((offsets.abs() > extent).any()):
            raise ValueError(f"context offsets {offsets.tolist()} reach beyond the extents {self.config.extent}")
        index = (offsets + extent).tolist()  # (patches, 3)
        per_patch = torch.stack([self.offset_bias[:, :, a, b, c] for a, b, c in index], -1)  # (layers, nh, patches)
        return per_patch.repeat_interleave(self.patch_tokens, dim=-1)  # (layers, nh, C)

    def token_positions(self) -> torch.Tensor:
        """(dt, dy, dx) of the P tokens of a patch from its first token, raster order: (P, 3)."""
        ph, pw = self.config.patch_size
        rows, cols = torch.meshgrid(torch.arange(ph), torch.arange(pw), indexing="ij")
        return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(ph * pw, 3)  # (P, 3)

    def context_layout(self, offsets: list[Patch]) -> ContextLayout:
        """Patch offsets of the context patches → their ADC bias and their keys' token positions."""
        ph, pw = self.config.patch_size
        if not offsets:
            return ContextLayout(self.context_bias([]), torch.zeros(0, 3, dtype=torch.long))
        corner = torch.tensor([(dt, dh * ph, dw * pw) for dt, dh, dw in offsets])  # (patches, 3)
        positions = (corner[:, None] + self.token_positions()[None]).reshape(-1, 3)  # (C, 3)
        return ContextLayout(self.context_bias(offsets), positions)

    def relative_index(self, positions: torch.Tensor, text_len: int) -> torch.Tensor | None:
        """Which slot of the relative tables each (query, key) pair of a patch reads → (P + 1, L + C + 1 + P).

        Queries are the P + 1 inputs; input i predicts the token at raster position i of the patch (the
        last, i = P, stands just after it). Keys: the caption (slot V, no position), the context tokens
        at `positions` (C, 3), bos (the bos slot V − 1) and the patch's P tokens. The offset is the key's
        (dt, dy, dx) from the query's, dt clipped to ±e_t and dy, dx to ±relative_radius."""
        R = self.config.relative_radius
        if not R:
            return None
        e_t, P, pw = self.config.extent[0], self.patch_tokens, self.config.patch_size[1]
        V = relative_offsets(self.config) - 1  # the bos slot; V + 1 is "no position"
        inputs = torch.arange(P + 1)
        queries = torch.stack([torch.zeros_like(inputs), inputs // pw, inputs % pw], -1)  # (P + 1, 3)
        keys = torch.cat([positions.cpu(), self.token_positions()])  # (C + P, 3)
        d = keys[None] - queries[:, None]  # (P + 1, C + P, 3)
        dt, dy, dx = d[..., 0].clamp(-e_t, e_t) + e_t, d[..., 1].clamp(-R, R) + R, d[..., 2].clamp(-R, R) + R
        slots = (dt * (2 * R + 1) + dy) * (2 * R + 1) + dx  # (P + 1, C + P)
        C = positions.shape[0]
        text = torch.full((P + 1, text_len), V + 1)
        bos = torch.full((P + 1, 1), V)
        return torch.cat([text, slots[:, :C], bos, slots[:, C:]], 1).to(self.bos.device)  # (P + 1, L + C + 1 + P)

    def inputs(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """[bos, y_0 + pos(0), …, y_{P−1} + pos(P−1)]: every token at its own position, after a
        learned start. Input i < P predicts y_i; the last input y_{P−1} predicts nothing but gives
        the patch's last token its keys and values, so the pool holds all P tokens (a patch's
        bottom-right token borders the patches to its right and below). (B, P) → (B, P + 1, D)."""
        B, P = patch_tokens.shape
        tokens = F.embedding(patch_tokens, self.code_vectors()) + self.positions()  # (B, P, D)
        return torch.cat([self.bos.expand(B, 1, -1), tokens], 1)  # (B, P + 1, D)

    def positions(self) -> torch.Tensor:
        ph, pw = self.config.patch_size
        h = self.pos_h.weight[:, None]  # (ph, 1, D)
        w = self.pos_w.weight[None]  # (1, pw, D)
        return (h + w).reshape(ph * pw, -1)  # (P, D), raster inside the patch

    def prefix(self, text: torch.Tensor, context: torch.Tensor, bias: torch.Tensor):
        """Caption then context states (layers, 2, B, nh, L+C, hs), and their bias (layers, nh, L+C)."""
        states = torch.cat([text, context], dim=4)  # (layers, 2, B, nh, L+C, hs)
        text_bias = bias.new_zeros(self.config.layers, self.config.num_heads, text.shape[4])
        return states, torch.cat([text_bias, bias], -1)  # (layers, nh, L+C)

    def forward(self, patch_tokens, text, context, layout: ContextLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced pass over one patch: tokens (B, P), caption states, context states
        (layers, 2, B, nh, C, hs) and their layout (bias, positions) → logits (B, P, K) for every y_p
        and the patch's own per-layer states (layers, 2, B, nh, P, hs), which the pool will keep."""
        B, P = patch_tokens.shape
        assert P == self.patch_tokens, f"a patch has {self.patch_tokens} tokens, got {P}"
        prefix, prefix_bias = self.prefix(text, context, layout.bias)
        index = self.relative_index(layout.positions, text.shape[4])  # (P + 1, L + C + P + 1) or None
        x, own = self.inputs(patch_tokens), []  # (B, P + 1, D)
        for layer, block in enumerate(self.blocks):
            x, (k, v) = block(x, prefix[layer, 0], prefix[layer, 1], prefix_bias[layer], causal=True,
                              index=index)  # (B, P+1, D)
            own.append(torch.stack([k, v])[:, :, :, 1:])  # the P tokens' keys and values (bos is not pooled)
        return self.logits(x[:, :P]), torch.stack(own)  # (B, P, K), (layers, 2, B, nh, P, hs)

    def generate_patch(self, text, context, layout: ContextLayout, forced, keep, sampling: dict,
                       guidance: float | None = None):
        """Token-level AR: sample one patch token by token. forced/keep (B, P): kept tokens are
        written, not sampled. → tokens (B, P), states (layers, 2, B, nh, P, hs), logits (B, P, K).

        guidance s (classifier-free): the batch is two halves, the same canvases under their captions
        and under "None"; each token is sampled once from u + s·(c − u) and written into both halves,
        and the logits returned are those guided ones (B/2, P, K)."""
        if bool(keep.all()):  # a given patch: one teacher-forced pass makes its states
            logits, states = self(forced, text, context, layout)
            return forced, states, guide(logits, guidance)
        B, P = forced.shape
        prefix, prefix_bias = self.prefix(text, context, layout.bias)
        index = self.relative_index(layout.positions, text.shape[4])  # (P + 1, L + C + P + 1) or None
        start = prefix.shape[4]  # bos, then the patch's own P tokens, follow the prefix
        buffers = torch.cat([prefix, self.empty_states(B, P + 1)], dim=4)  # (layers, 2, B, nh, L+C+1+P, hs)
        bias_rows = torch.cat([prefix_bias, prefix_bias.new_zeros(*prefix_bias.shape[:2], P + 1)], -1)  # (layers, nh, …)
        positions, tokens, logits = self.positions(), forced.clone(), []
        codes = self.code_vectors()  # (K, D), once per patch
        for p in range(P + 1):  # input p is bos (p = 0) or y_{p−1} at its own position; the last predicts nothing
            x_p = self.bos.expand(B, 1, -1) if p == 0 else F.embedding(tokens[:, p - 1:p], codes) + positions[p - 1]
            for layer, block in enumerate(self.blocks):
                x_p = block.step(x_p, start + p, buffers[layer, 0], buffers[layer, 1], bias_rows[layer],
                                 None if index is None else index[p])  # (B, 1, D)
            if p == P:  # y_{P−1}'s keys and values are in the buffers now: the patch is complete
                break
            logits.append(guide(self.logits(x_p, codes)[:, 0], guidance))  # (B, K), or (B/2, K) guided
            sampled = nuwa.sample_logits(logits[-1], **sampling)  # (B,) or (B/2,)
            if guidance is not None:
                sampled = sampled.repeat(2)  # the captioned and the "None" half draw the same token
            tokens[:, p] = torch.where(keep[:, p], forced[:, p], sampled)
        states = buffers[:, :, :, :, start + 1:].clone()  # (layers, 2, B, nh, P, hs): the tokens, not bos
        return tokens, states, torch.stack(logits, 1)  # (B, P), states, (B, P, K)


def guide(logits: torch.Tensor, guidance: float | None) -> torch.Tensor:
    """Classifier-free guidance over a doubled batch (captioned half, then the "None" half) along
    dim 0: u + s·(c − u). None: the logits as they are. An option we add; the paper does not use it."""
    if guidance is None:
        return logits
    conditional, unconditional = logits.chunk(2)
    return unconditional + guidance * (conditional - unconditional)


def gather_context(model: Infinity, patch: Patch, selected: list[tuple[Patch, torch.Tensor]], B: int):
    """Selected (patch, states) → context states (layers, 2, B, nh, C, hs) and their ContextLayout
    (the ADC bias (layers, nh, C) and each key's token position from the current patch)."""
    if not selected:
        return model.empty_states(B), model.context_layout([])
    states = torch.cat([s for _, s in selected], dim=4)  # (layers, 2, B, nh, C, hs)
    offsets = [tuple(a - b for a, b in zip(q, patch)) for q, _ in selected]  # (dt, dh, dw) each
    return states, model.context_layout(offsets)


def cut(tokens: torch.Tensor, patch: Patch, patch_size) -> torch.Tensor:
    """The tokens of one patch, raster inside it: (B, T, H, W) → (B, P)."""
    (t, i, j), (ph, pw) = patch, patch_size
    return tokens[:, t, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw].reshape(tokens.shape[0], ph * pw)


def paste(tokens: torch.Tensor, patch: Patch, patch_size, values: torch.Tensor) -> None:
    (t, i, j), (ph, pw) = patch, patch_size
    tokens[:, t, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw] = values.view(-1, ph, pw)


# ---------------------------------------------------------------------------------------------
# 5. Render-and-optimize training  and the training data
# ---------------------------------------------------------------------------------------------


def training_grid(config: InfinityConfig) -> tuple[int, int, int]:
    """Token grid (T, H, W) of one training canvas (or clip)."""
    if config.data not in ("canvas", "video"):
        raise ValueError(f"unknown training data {config.data!r}; expected 'canvas' or 'video'")
    if config.data == "video":
        T, height, width = config.frames, data.CANVAS, data.CANVAS
    else:
        T, height, width = 1, config.canvas_height, config.canvas_width
    if height % config.token_px or width % config.token_px:
        raise ValueError(f"canvas {height}×{width} px is not a multiple of f = {config.token_px} px per token")
    return (T, height // config.token_px, width // config.token_px)


def num_patches(config: InfinityConfig) -> int:
    """Patches of one training canvas: the number of render-and-optimize units per micro-batch."""
    return math.prod(patch_grid(config, training_grid(config)))


def training_directions(config: InfinityConfig) -> list[str]:
    directions = [d for d in config.directions.split(",") if d]
    if not directions:
        raise ValueError("config.directions names no direction")
    for direction in directions:
        check_direction(direction)
    return directions


def training_order(config: InfinityConfig, seed: int, step: int) -> tuple[str, list[Patch]]:
    """ADC in training: the step's direction, drawn from (seed, step) so that every
    micro-batch and process of a step walks the same order, and that order."""
    directions = training_directions(config)
    direction = directions[np.random.default_rng([seed, step]).integers(len(directions))]
    return direction, patch_order(direction, patch_grid(config, training_grid(config)))


def patch_loss(model: Infinity, tokens: torch.Tensor, order: list[Patch], index: int,
               pool: NearbyContextPool, captions: list[str | None] | None = None) -> torch.Tensor:
    """Render-and-optimize, one patch: L = −(1/P) Σ_p log p(y_p | y_<p, context, caption) for
    the patch order[index] of tokens (B, T, H, W), its context from the pool (constants). Then its
    own states go to the pool, detached, and every patch no later patch needs is evicted. The
    caller backpropagates the returned loss at once, so the graph is one patch deep."""
    if tokens.dim() != 4:
        raise ValueError(f"tokens must be (B, T, H, W), got shape {tuple(tokens.shape)}")
    if pool.next_index != index:
        raise ValueError(f"patch index {index}, but the pool expects index {pool.next_index} next")
    B, patch = tokens.shape[0], order[index]
    text = model.text_states(captions, B)  # recomputed per patch: it is a graph of its own
    context, layout = gather_context(model, patch, pool.select(patch), B)
    targets = cut(tokens, patch, model.config.patch_size).to(model.bos.device)  # (B, P)
    logits, states = model(targets, text, context, layout)  # (B, P, K)
    pool.add(patch, states)
    pool.evict(index)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())  # a contiguous row of K codes per token


def unit_loss(model: Infinity, tokens: torch.Tensor, captions, *, unit: int, carry: dict, step: int,
              seed: int = 0) -> torch.Tensor:
    """For train.py's units: unit 0 draws the step's order and opens a pool in `carry`; unit u is
    `patch_loss` of patch order[u]. tokens (B, T, H, W) stay the same for all units of a step."""
    if unit == 0:
        carry["direction"], carry["order"] = training_order(model.config, seed, step)
        carry["pool"] = NearbyContextPool(carry["order"], model.config.extent)
    return patch_loss(model, tokens, carry["order"], unit, carry["pool"], captions)


SLOT_PX = 32  # one digit per 32 px of width: one patch column of 8 tokens (chosen here)
CANVAS_CLASSES = (1, 2)  # a canvas draws its digits from one or two classes, named by its caption


class DigitCanvases(Dataset):
    """Deterministic canvases of MNIST digits on black, for NÜWA-Infinity only (so it lives here).

    A canvas of height × width px has one digit per SLOT_PX-wide slot, jittered within the slot and
    anywhere vertically, overlapping by pixel-wise maximum. Its digits come from one or two classes;
    the caption names them in increasing order ("3 7"), or is None with probability none_prob.
    Items: `image` float (1, H, W) in [0, 1], `caption` str | None, `digits` int64 (slots,)."""

    def __init__(self, split: str = "train", height: int = 64, width: int = 128, seed: int = 0,
                 length: int | None = None, none_prob: float = 0.0, root=None):
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
        if height < data.DIGIT or width < SLOT_PX:
            raise ValueError(f"a digit canvas must be at least {data.DIGIT}×{SLOT_PX} px, got {height}×{width}")
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
    """Infinity's caption of a canvas or a Moving MNIST clip: the set of its digits' names, increasing ("3 7")."""
    return " ".join(str(d) for d in sorted(set(int(d) for d in digits)))


@functools.lru_cache(maxsize=4)  # built once per process: loading MNIST takes seconds
def training_source(kind: str, height: int, width: int, frames: int, digits: int, none_prob: float, seed: int):
    if kind == "video":
        return data.MovingMNIST("train", num_frames=frames, num_digits=digits, seed=seed)
    return DigitCanvases("train", height, width, seed, none_prob=none_prob)


def training_batch(config: InfinityConfig, seed: int, step: int, part: int = 0, parts: int = 1) -> dict:
    """Micro-batch `part` of `parts` of step `step`, on the CPU: `pixels` (b, T, 1, H, W) and
    `caption` (list of b, None entries for "None"; Moving MNIST clips are uncaptioned)."""
    if config.batch_size % parts:
        raise ValueError(f"batch_size {config.batch_size} does not split into {parts} micro-batches")
    b = config.batch_size // parts
    source = training_source(config.data, config.canvas_height, config.canvas_width, config.frames,
                             config.video_digits, config.none_prob, seed)
    items = [source[(step * config.batch_size + part * b + i) % len(source)] for i in range(b)]
    if config.data == "video":
        captions = [None] * b
        if config.video_captions:  # the digits' names; "None" with probability none_prob (drawn per item)
            drops = np.random.default_rng([seed, step, part]).random(b) < config.none_prob
            captions = [None if drop else clip_caption(item["digits"]) for item, drop in zip(items, drops)]
        return {"pixels": torch.stack([item["video"] for item in items]), "caption": captions}
    return {"pixels": torch.stack([item["image"][None] for item in items]), "caption": [item["caption"] for item in items]}


# ---------------------------------------------------------------------------------------------
# 6. Generation: with the pool (flat memory), and the pool-free reference
# ---------------------------------------------------------------------------------------------


@dataclass
class GenerationTrace:
    """What generation reports per patch, when a trace is passed (tests and the benchmark)."""

    keep_logits: bool = False  # also keep every patch's logits (B, P, K): memory O(canvas)
    pool_patches: list[int] = field(default_factory=list)  # pool size after the patch's eviction
    pool_bytes: list[int] = field(default_factory=list)  # bytes of pooled states, likewise
    context_patches: list[int] = field(default_factory=list)  # patches the patch attended to
    context_bytes: list[int] = field(default_factory=list)  # bytes of its gathered context and own states
    seconds: list[float] = field(default_factory=list)  # wall time of the patch
    logits: list[torch.Tensor] = field(default_factory=list)

    def record(self, pool, selected, context_bytes, logits, seconds) -> None:
        self.pool_patches.append(len(pool))
        self.pool_bytes.append(pool.nbytes())
        self.context_patches.append(len(selected))
        self.context_bytes.append(context_bytes)
        self.seconds.append(seconds)
        if self.keep_logits:
            self.logits.append(logits)


def prepare(model: Infinity, grid_shape, direction: str, given, captions, batch_size):
    """Checks shared by both generators → (order, B, forced tokens, keep mask), both (B, T, H, W)."""
    check_direction(direction)
    grid = patch_grid(model.config, grid_shape)
    if direction in OUTPAINTING and (given is None or not bool(given[1].any())):
        raise ValueError(f"outpainting direction {direction!r} needs given patches: pass given=(tokens, keep) "
                         f"with some keep True, or use 'raster', 'column' or 'video'")
    sizes = {n for n in (batch_size, None if captions is None else len(captions),
                         None if given is None else given[0].shape[0]) if n is not None}
    if len(sizes) > 1:
        raise ValueError(f"batch sizes disagree: batch_size, captions and given say {sorted(sizes)}")
    B = sizes.pop() if sizes else 1
    device = model.bos.device
    forced = torch.zeros(B, *grid_shape, dtype=torch.long, device=device)  # (B, T, H, W)
    keep = torch.zeros(B, *grid_shape, dtype=torch.bool, device=device)  # (B, T, H, W)
    if given is not None:
        if tuple(given[0].shape) != (B, *grid_shape) or tuple(given[1].shape) != (B, *grid_shape):
            raise ValueError(f"given tokens and keep mask must both be {(B, *grid_shape)}, got "
                             f"{tuple(given[0].shape)} and {tuple(given[1].shape)}")
        forced, keep = given[0].to(device).long(), given[1].to(device).bool()
        if bool(keep.all()):
            raise ValueError("every token is given: there is nothing to generate (make the canvas larger than "
                             "the given part)")
        kept = forced[keep]
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= model.config.codebook_size):
            raise ValueError(f"given tokens must lie in [0, {model.config.codebook_size})")
    return patch_order(direction, grid), B, forced, keep


def doubled(guidance: float | None, captions, forced, keep, B: int):
    """Guidance runs the batch twice, under the captions and under "None": (captions, forced, keep) of
    2B rows. Without guidance, unchanged."""
    if guidance is None:
        return captions, forced, keep
    if not guidance >= 0:
        raise ValueError(f"guidance must be ≥ 0 (1 = the captioned model alone), got {guidance}")
    if captions is None or all(c is None for c in captions):
        raise ValueError("guidance needs captions: it pushes the captioned model away from the uncaptioned one")
    return list(captions) + [None] * B, forced.repeat(2, 1, 1, 1), keep.repeat(2, 1, 1, 1)


@torch.no_grad()
def generate(model: Infinity, grid_shape: tuple[int, int, int], direction: str = "column", *, given=None,
             captions: list[str | None] | None = None, batch_size: int | None = None, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None, progress: bool = False,
             trace: GenerationTrace | None = None, guidance: float | None = None) -> torch.Tensor:
    """AR over AR: tokens (B, T, H, W) for a token grid of `grid_shape`, patch by patch in the
    ADC order of `direction`, each patch token by token with its context from the NCP.

    given: (tokens, keep) both (B, T, H, W): kept tokens are copied exactly (outpainting; required by
    right / left / up / down, whose orders start from the given side). temperature 0 is greedy.
    guidance s: classifier-free guidance (`guide`; two passes per token, two pools in one batch).
    Memory: the pool (≤ pool_bound patches) plus one patch, whatever the canvas's long side."""
    order, B, forced, keep = prepare(model, grid_shape, direction, given, captions, batch_size)
    captions, forced, keep = doubled(guidance, captions, forced, keep, B)
    sampling = dict(temperature=temperature, top_k=top_k, generator=generator)
    size = model.config.patch_size
    threads = torch.get_num_threads()
    if model.bos.device.type == "cpu":  # thousands of tiny kernels: more threads only synchronise (as nuwa.py)
        torch.set_num_threads(1)
    try:
        rows = forced.shape[0]  # B, or 2B with guidance
        text = model.text_states(captions, rows)  # (layers, 2, rows, nh, L, hs), once per canvas
        pool = NearbyContextPool(order, model.config.extent)
        tokens = forced.clone()  # (rows, T, H, W); the output, O(canvas) at 8 bytes a token
        for index, patch in enumerate(tqdm(order, desc="patches", unit="patch", disable=not progress, leave=False)):
            start = time.perf_counter()
            selected = pool.select(patch)
            context, layout = gather_context(model, patch, selected, rows)
            made, states, logits = model.generate_patch(text, context, layout, cut(forced, patch, size),
                                                        cut(keep, patch, size), sampling, guidance)
            paste(tokens, patch, size, made)
            pool.add(patch, states)
            pool.evict(index)
            if trace is not None:
                trace.record(pool, selected, context.nbytes + states.nbytes, logits, time.perf_counter() - start)
        return tokens[:B]
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def generate_reference(model: Infinity, grid_shape: tuple[int, int, int], direction: str = "column", *,
                       given=None, captions: list[str | None] | None = None, batch_size: int | None = None,
                       temperature: float = 1.0, top_k: int | None = None,
                       generator: torch.Generator | None = None, trace: GenerationTrace | None = None,
                       guidance: float | None = None) -> torch.Tensor:
    """The slow reference of `generate`, with no pool: for every patch, recompute the states of all
    earlier patches from the tokens made so far (each with its own context by `context_rule`, in
    order, teacher-forced), then take the current patch's context by `context_rule`. O(patches²)."""
    order, B, forced, keep = prepare(model, grid_shape, direction, given, captions, batch_size)
    captions, forced, keep = doubled(guidance, captions, forced, keep, B)
    sampling = dict(temperature=temperature, top_k=top_k, generator=generator)
    size, extent = model.config.patch_size, model.config.extent
    rows = forced.shape[0]  # B, or 2B with guidance
    text = model.text_states(captions, rows)
    tokens = forced.clone()  # (rows, T, H, W)
    for index, patch in enumerate(order):
        states = {}  # every earlier patch, recomputed from its tokens
        for earlier, q in enumerate(order[:index]):
            selected = [(r, states[r]) for r in context_rule(order, earlier, extent)]
            states[q] = model(cut(tokens, q, size), text, *gather_context(model, q, selected, rows))[1]
        selected = [(q, states[q]) for q in context_rule(order, index, extent)]
        context, layout = gather_context(model, patch, selected, rows)
        made, own, logits = model.generate_patch(text, context, layout, cut(forced, patch, size),
                                                 cut(keep, patch, size), sampling, guidance)
        paste(tokens, patch, size, made)
        if trace is not None:
            trace.context_patches.append(len(selected))
            if trace.keep_logits:
                trace.logits.append(logits)
    return tokens[:B]


def outpaint_given(source: torch.Tensor, grid_shape: tuple[int, int, int], direction: str):
    """Place source tokens (B, T, h, w) on the side where `direction` starts (right: the left edge;
    left: the right edge; down: the top; up: the bottom) → (tokens, keep), both (B, T, H, W)."""
    if direction not in OUTPAINTING:
        raise ValueError(f"outpainting needs one of {list(OUTPAINTING)}, got {direction!r}")
    B, T, h, w = source.shape
    _, H, W = grid_shape
    if T != grid_shape[0] or h > H or w > W or (direction in ("right", "left") and h != H) or \
            (direction in ("up", "down") and w != W):
        raise ValueError(f"source {(T, h, w)} tokens does not fit the {direction!r} side of grid {tuple(grid_shape)}")
    tokens = torch.zeros(B, *grid_shape, dtype=torch.long, device=source.device)  # (B, T, H, W)
    keep = torch.zeros_like(tokens, dtype=torch.bool)
    rows = slice(H - h, H) if direction == "up" else slice(0, h)
    cols = slice(W - w, W) if direction == "left" else slice(0, w)
    tokens[:, :, rows, cols], keep[:, :, rows, cols] = source, True
    return tokens, keep


# ---------------------------------------------------------------------------------------------
# 7. Pixels, pictures and checkpoints
# ---------------------------------------------------------------------------------------------


def check_tokenizer(model: Infinity, vqgan) -> None:
    """The VQ-GAN must be the kind the model predicts codes of: the same f and codebook size."""
    f, K = vqgan.config.downsample, vqgan.config.codebook_size
    if (f, K) != (model.config.token_px, model.config.codebook_size):
        raise ValueError(f"this VQ-GAN has f = {f} px per token and {K} codes, but the Infinity model was trained "
                         f"on f = {model.config.token_px} and {model.config.codebook_size} codes (its vqgan_ckpt "
                         f"{model.config.vqgan_ckpt!r})")


@torch.no_grad()
def generate_canvas(model: Infinity, vqgan, height_px: int, width_px: int, direction: str = "column", *,
                    source: torch.Tensor | None = None, captions=None, batch_size: int | None = None,
                    **sampling) -> torch.Tensor:
    """Pixels (B, 1, height_px, width_px) in [0, 1]. The *tokens* of `source` pixels (B, 1, h, w) are
    kept exactly on the side `direction` starts from (outpainting); their pixels are re-decoded with
    the rest, so they come back as the VQ-GAN reconstructs them in this larger canvas, not bit for
    bit. The whole canvas is one VQ-GAN grid (module docstring)."""
    f = model.config.token_px
    if height_px % f or width_px % f:
        raise ValueError(f"canvas {height_px}×{width_px} px is not a multiple of f = {f} px per token")
    check_tokenizer(model, vqgan)
    grid_shape = (1, height_px // f, width_px // f)
    given = None
    if source is not None:
        given = outpaint_given(vqgan.encode(source.to(model.bos.device).float())[:, None], grid_shape, direction)
    tokens = generate(model, grid_shape, direction, given=given, captions=captions, batch_size=batch_size, **sampling)
    return vqgan.decode(tokens[:, 0]).float().clamp(0, 1)  # (B, 1, H, W)


@torch.no_grad()
def generate_video(model: Infinity, vqgan, frames: int, *, given_frames: torch.Tensor | None = None,
                   captions=None, batch_size: int | None = None, **sampling) -> torch.Tensor:
    """Frames (B, T, 1, 64, 64) in [0, 1], frame by frame (`video` order); `given_frames`
    (B, k, 1, 64, 64) are kept as the first k frames (prediction)."""
    check_tokenizer(model, vqgan)
    h = w = data.CANVAS // model.config.token_px
    grid_shape = (frames, h, w)
    given = None
    if given_frames is not None:
        B, k = given_frames.shape[:2]
        if k >= frames:
            raise ValueError(f"generate_video needs frames > {k} given frames, got {frames}")
        tokens = torch.zeros(B, *grid_shape, dtype=torch.long, device=model.bos.device)
        keep = torch.zeros_like(tokens, dtype=torch.bool)
        tokens[:, :k], keep[:, :k] = vqgan.encode_video(given_frames.to(model.bos.device).float()), True
        given = (tokens, keep)
    tokens = generate(model, grid_shape, "video", given=given, captions=captions, batch_size=batch_size, **sampling)
    return vqgan.decode_video(tokens).float().clamp(0, 1)  # (B, T, 1, 64, 64)


def tiles(canvas: torch.Tensor, width: int = data.CANVAS) -> torch.Tensor:
    """A canvas (1, H, W) as a row of tiles (W / width, 1, H, width): data.save_grid draws rows of frames."""
    return torch.stack(canvas.split(width, dim=-1))


VISUAL_CAPTION = "3 7"  # a two-class caption seen in training


@torch.no_grad()
def visualise(model: Infinity, vqgan, path) -> Path:
    """PNG: canvases 4× wider than training (with and without a caption), and outpainting to the
    right and to the left of a held-out canvas's half; for video configs, a clip twice as long."""
    config, device = model.config, model.bos.device
    was_training = model.training
    model.eval()
    sampling = dict(temperature=1.0, top_k=16, generator=torch.Generator(device=device).manual_seed(0))
    if config.data == "video":
        clip = data.MovingMNIST("test", num_frames=2 * config.frames, num_digits=config.video_digits, length=1)[0]
        captions = [clip_caption(clip["digits"])] if config.video_captions else None
        made = generate_video(model, vqgan, 2 * config.frames, given_frames=clip["video"][None, :2],
                              captions=captions, **sampling)
        rows, labels = [clip["video"], made[0].cpu()], ["real clip", "first 2 frames given, the rest generated"]
        data.save_gif(rows, Path(path).with_suffix(".gif"), captions=labels)
    else:
        H, W = config.canvas_height, config.canvas_width
        wide = generate_canvas(model, vqgan, H, 4 * W, "column", captions=[VISUAL_CAPTION, None], **sampling)
        real = DigitCanvases("test", H, W, length=1)[0]["image"][None]  # (1, 1, H, W)
        half = W // 2
        right = generate_canvas(model, vqgan, H, 2 * W, "right", source=real[..., :half], **sampling)
        left = generate_canvas(model, vqgan, H, 2 * W, "left", source=real[..., half:], **sampling)
        rows = [tiles(c.cpu()) for c in (wide[0], wide[1], real[0], right[0], left[0])]
        labels = [f"{H}×{4 * W} px, caption {VISUAL_CAPTION!r}", f"{H}×{4 * W} px, no caption",
                  "a held-out canvas", f"its left {half} px given, outpainted right",
                  f"its right {half} px given, outpainted left"]
    model.train(was_training)
    return data.save_grid(rows, path, captions=labels, max_frames=max(len(r) for r in rows))


def load_infinity(path, *, map_location="cpu") -> Infinity:
    """The model stored at `path` by `train.py --stage infinity`, in eval mode."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no NÜWA-Infinity checkpoint at {path}; train one with "
                                f"`python train.py --stage infinity --preset tiny --out out`")
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if checkpoint.get("stage") != "infinity":
        raise ValueError(f"{path} is a checkpoint of stage {checkpoint.get('stage')!r}, not 'infinity'")
    known = {f.name for f in fields(InfinityConfig)}
    unknown = sorted(set(checkpoint["config"]) - known)
    if unknown:
        raise ValueError(f"{path} has config fields InfinityConfig does not know: {unknown}")
    values = {**LEGACY_DEFAULTS, **checkpoint["config"]}  # written before the learning aids: the paper's scheme
    config = InfinityConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    model = Infinity(config)
    # Before the learning aids, the final LayerNorm was called `norm`.
    state = {("decoder_norm." + k[len("norm."):] if k.startswith("norm.") else k): v
             for k, v in checkpoint["model"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{path} does not match the model its config describes (relative_radius="
                         f"{config.relative_radius}, tie_head={config.tie_head}, pixel_codes={config.pixel_codes}, "
                         f"patch_size={config.patch_size}): {error}") from error
    return model.to(map_location).eval()


def load_with_tokenizer(path, *, vqgan_ckpt: str | None = None, map_location="cpu") -> tuple[Infinity, vqgan_module.VQGAN]:
    """(the model at `path`, its frame VQ-GAN), both in eval mode. The VQ-GAN is the one recorded in
    the checkpoint unless `vqgan_ckpt` overrides it, and it must be the one the model was trained on:
    the same f and codebook size (check_tokenizer) and codes that draw the stored pixels
    (nuwa.CodeEmbeddings.check_code_pixels)."""
    model = load_infinity(path, map_location=map_location)
    vqgan_path = vqgan_ckpt or model.config.vqgan_ckpt
    tokenizer = vqgan_module.load_vqgan(vqgan_path, map_location=map_location).to(map_location).eval()
    check_tokenizer(model, tokenizer)
    model.check_code_pixels(tokenizer, vqgan_path)
    return model, tokenizer
