"""NÜWA-Infinity, the token level: the model that draws one patch, and how it is trained.

Paper: Wu et al., "NÜWA-Infinity: Autoregressive over Autoregressive Generation for Infinite
Visual Synthesis", arXiv 2207.09814 (NeurIPS 2022). Implemented, named as in the paper's method
section (cited by name, not by number): the local token-level half of "autoregressive over
autoregressive" (AR over AR), the order-aware bias of the Arbitrary Direction Controller (ADC: where
each context patch lies), and render-and-optimize training. The patch level (the patch grid, the
ADC's orders, the context rule, the Nearby Context Pool (NCP), the patch-by-patch generation loop)
is patches.py. Tokens come from the frozen VQ-GAN of vqgan.py (NÜWA §3.1).

In plain words: inside the current patch of ph × pw tokens, a small causal transformer predicts the
tokens one by one in raster order. Besides the tokens already made in this patch it attends to
(a) the caption and (b) the context patches the NCP hands it (patches.py): their cached per-layer
keys and values. Each context patch's keys get a learned per-head bias indexed by its offset
(dt, dh, dw) from the current patch, so each head can weigh context by where it lies (left, above,
the frame before) whatever the order. A bias only reweights attention: what a head reads carries no
offset of its own, so it learns "how much from where", not "what is where". There are no absolute
patch positions, which is what lets a model trained on 2×4 patches draw any width.

Render-and-optimize: training walks the patches of a canvas in a sampled order (`training_order`)
and backpropagates each patch's loss at once (`patch_loss`), with the pooled context detached, so a
graph is one patch deep: L = −(1/P) Σ_p log p(y_p | y_<p, context, caption). The gradients of all
patches of the training canvases are averaged and the optimizer steps once per canvas batch
(the stage's units in stages.py: one unit per patch, one step per batch). Per-patch optimizer
steps are not offered.

Learning aids (on by default, `PAPER_SCHEME` turns them off), the ones NÜWA's tiny model needed
(nuwa.py): token-level relative positions, a score b and a relative key r per head and 3D token
offset (dt, dy, dx) of a key from the token being predicted, *across* patch borders (the row just
above, in the patch above; the same place one frame back), so a head can continue a stroke that a
context patch began; the tied head; pixel code embeddings; identity-initialised value and output
projections. Offsets are taken from token positions, never from the canvas's absolute position, so
the pool and the flat cost are unchanged.

Pixels in, pixels out (canvases, videos, pictures) are synthesis.py.

Sections: 1. configuration · 2. the model (token-level AR inside a patch) · 3. render-and-optimize
training · 4. the tokenizer the model predicts codes of · 5. checkpoints.

Glossary: B batch, T frames, H W token rows / columns of the grid, (ph, pw) patch size in tokens,
P = ph·pw tokens per patch, a patch (t, i, j) its coordinates on the patch grid, order the list of
patches in generation order, index a position in that list, (e_t, e_h, e_w) extents in patches,
(dt, dh, dw) a context patch's offset from the current one, C context tokens, L caption length,
D width, nh heads, hs head size, K codebook size, f pixels per token (VQ-GAN: 8), R the relative
radius, V the relative offsets, y_p the token at position p of the current patch.

Deviations from the paper (each also marked `# DEVIATION` where it happens; patches.py lists those
of the patch level):
- Scale and data: 64×W grey canvases of MNIST digits and Moving MNIST videos (the batches are
  batches.py's), not the paper's landscapes (LHQC) and its 38912×2048 showcase; a tiny model; the
  f = 8 cell VQ-GAN (8 tokens per 64 px, K = 512); patches of 4×4 tokens (32×32 px), not 16×16
  tokens of an F16 VQ-GAN.
- Learning aids the paper does not have (above): token-level relative positions across patches, a
  tied head, pixel code embeddings, identity-initialised attention projections; every layer reads the
  caption's embedded words (`text_encoder` False) rather than a caption run through the blocks.
- Classifier-free guidance at sampling (`guide`, off by default), as NÜWA's option: the paper does
  not use it.
- Video: Moving MNIST clips, optionally captioned with their digits' names (`video_captions`);
  `make infinity`'s video model uses one patch per frame (8×8 tokens).
- Captions are sets of digit names ("3 7": the digits drawn come from these classes). A left-to-right
  list cannot be followed by a model that only knows relative positions. No caption is the word
  "None" (as in NÜWA), and training drops captions to "None" with probability none_prob.
- The ADC's "order-aware positional embeddings" are, here, a learned per-layer, per-head bias on
  the attention logits indexed by the context patch's offset (dt, dh, dw). Cached keys cannot be
  re-embedded for every new current patch; a bias on them can. Tokens inside a patch have learned
  positions.
- Render-and-optimize steps the optimizer once per canvas batch, with every patch's gradient
  accumulated (above); the paper does not state the granularity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import data
import nearby_attention
import nuwa
import patches
import vqgan as vqgan_module

# ---------------------------------------------------------------------------------------------
# 1. Configuration
# ---------------------------------------------------------------------------------------------

# The paper's scheme: none of the learning aids (train.py: --relative-radius 0 --no-tie-head
# --no-pixel-codes --no-identity-init --text-encoder).
PAPER_SCHEME = dict(relative_radius=0, tie_head=False, pixel_codes=False, identity_init=False,
                    text_encoder=True)

# What a checkpoint written before these fields existed was trained with.
LEGACY_DEFAULTS = PAPER_SCHEME


@dataclass
class InfinityConfig:
    """The token-level model, the patch geometry, and the training data and optimisation of
    `train.py --stage infinity`."""

    dim: int = 128  # D, model width (paper: not reproduced here)
    num_heads: int = 4  # nh
    layers: int = 4  # transformer blocks of the token-level AR
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio · D (the usual transformer value)
    codebook_size: int = 512  # K, VQ-GAN codes (our tiny VQ-GAN; paper: an F16 VQ-GAN)
    # f, pixels per token: 8, the f = 8 cell tokenizer of `make models` (vqgan.py --cell-encoder
    # --ch-mult 1 2 4 4), on which the tiny NÜWA learnt to draw digits (README).
    token_px: int = 8
    # DEVIATION (scale): 4×4 tokens = 32×32 px of our f = 8 VQ-GAN; the paper: 16×16 tokens of an
    # F16 VQ-GAN.
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
    # False: every layer reads the caption's embedded words themselves (word + position), as NÜWA's
    # tiny model without encoder layers; True: the caption first passes through the blocks.
    text_encoder: bool = False
    text_len: int = 4  # L, caption words after padding (our captions: one or two digit names)
    # --- training data (train.py --stage infinity)
    data: str = "canvas"  # "canvas": batches.DigitCanvases; "video": Moving MNIST clips, frame by frame
    canvas_height: int = 64  # training canvas height in pixels (one VQ-GAN frame high)
    canvas_width: int = 128  # training canvas width in pixels: 2×4 patches of 32 px
    frames: int = 4  # T of training videos (data="video")
    video_digits: int = 1  # digits per Moving MNIST training clip (data="video")
    # data="video": caption each clip with its digits' names ("3"), dropped to "None" with none_prob,
    # as canvases are captioned. The caption is the one thing every patch of every frame sees, however
    # long the video: it can hold the digit's identity where the two frames of context drift.
    # False: uncaptioned clips.
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
            # one GPU
            "small": dict(dim=256, num_heads=8, layers=8, batch_size=16, lr=1e-3, warmup_steps=100),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(presets)} (the paper's "
                             f"model sizes are not reproduced)")
        return cls(**{**presets[name], **overrides})


# ---------------------------------------------------------------------------------------------
# 2. The model: token-level AR inside the current patch, attending to caption and context
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
        mask = torch.cat([prefix_bias[:, None, :].expand(-1, N, C), own.expand(self.nh, N, N)],
                         -1)  # (nh, N, C+N)
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
        keys, values = key_buffer[:, :, :slot + 1], value_buffer[:, :, :slot + 1]  # (B, nh, slot+1, hs)
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, nh, 1, hs)
        return self.finish(x_p, attended)


def relative_offsets(config: InfinityConfig) -> int:
    """V + 1 slots of a relative table: (2e_t + 1)(2R + 1)² token offsets, then bos."""
    side = 2 * config.relative_radius + 1
    return (2 * config.extent[0] + 1) * side * side + 1


class Infinity(nuwa.CodeEmbeddings, nn.Module):
    """The local token-level AR of NÜWA-Infinity, with the ADC's offset bias. Patch-level work
    (orders, pool, the generation loop) lives in patches.py. Codes in and out (tied head, pixel
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
        self.vocabulary = data.CaptionVocabulary(config.text_len)  # caption words → ids
        self.text_embed = nn.Embedding(len(self.vocabulary), D)  # one row per caption word
        self.text_pos = nn.Embedding(config.text_len, D)
        self.token_embed = nn.Embedding(config.codebook_size, D)
        self.bos = nn.Parameter(torch.zeros(D))
        self.pos_h, self.pos_w = nn.Embedding(ph, D), nn.Embedding(pw, D)  # position inside a patch
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.decoder_norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, config.codebook_size, bias=False)
        self.apply(nuwa.init_weights)
        # ADC: a learned bias per layer and head for each offset (dt, dh, dw) of a context
        # patch, added to the attention logits of all its keys. Zero at first: no preference yet.
        # DEVIATION (ADC): the paper learns order-aware positional embeddings; cached keys take a bias.
        e_t, e_h, e_w = config.extent
        self.offset_bias = nn.Parameter(torch.zeros(config.layers, config.num_heads, 2 * e_t + 1,
                                                     2 * e_h + 1, 2 * e_w + 1))  # (layers, nh, 3, 3, 3)
        if config.tie_head:
            # DEVIATION (as nuwa.py): logits are h · e_k, so copying a neighbour's embedding predicts
            # its code.
            self.head.weight = self.token_embed.weight
        if config.identity_init:
            # DEVIATION (as nuwa.py): W^V = W^O = I, so a head passes on what it reads from the first
            # step.
            for block in self.blocks:
                with torch.no_grad():
                    nn.init.eye_(block.qkv.weight[2 * D:])
                    nn.init.eye_(block.proj.weight)
        if config.pixel_codes:
            # DEVIATION (as nuwa.py): e_k = E[k] + W · pixels_k, the f × f cell the tokenizer draws for
            # code k (set by `set_code_pixels`, from vqgan.VQGAN.code_patches; stages.py's builder does
            # it), so codes that look alike start alike, and a stroke learnt in one place is a stroke
            # everywhere.
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
        captions = [None] * B if captions is None else list(captions)
        ids = self.vocabulary.encode(captions).to(self.bos.device)  # (B, L)
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

    def context_bias(self, offsets: list[patches.Patch]) -> torch.Tensor:
        """ADC: offsets of the context patches → bias (layers, nh, C = len(offsets)·P) on their keys.
        The context rule keeps every offset inside the extents; one outside would be a bug there."""
        if not offsets:
            return self.offset_bias.new_zeros(self.config.layers, self.config.num_heads, 0)
        extent = torch.tensor(self.config.extent)
        offsets = torch.tensor(offsets)  # (patches, 3)
        if bool((offsets.abs() > extent).any()):
            raise ValueError(f"context offsets {offsets.tolist()} reach beyond the extents "
                             f"{self.config.extent}")
        index = (offsets + extent).tolist()  # (patches, 3)
        per_patch = torch.stack([self.offset_bias[:, :, a, b, c] for a, b, c in index],
                                -1)  # (layers, nh, patches)
        return per_patch.repeat_interleave(self.patch_tokens, dim=-1)  # (layers, nh, C)

    def token_positions(self) -> torch.Tensor:
        """(dt, dy, dx) of the P tokens of a patch from its first token, raster order: (P, 3)."""
        ph, pw = self.config.patch_size
        rows, cols = torch.meshgrid(torch.arange(ph), torch.arange(pw), indexing="ij")
        return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(ph * pw, 3)  # (P, 3)

    def context_layout(self, offsets: list[patches.Patch]) -> ContextLayout:
        """Patch offsets of the context patches → their ADC bias and their keys' token positions."""
        ph, pw = self.config.patch_size
        if not offsets:
            return ContextLayout(self.context_bias([]), torch.zeros(0, 3, dtype=torch.long))
        corner = torch.tensor([(dt, dh * ph, dw * pw) for dt, dh, dw in offsets])  # (patches, 3)
        positions = (corner[:, None] + self.token_positions()[None]).reshape(-1, 3)  # (C, 3)
        return ContextLayout(self.context_bias(offsets), positions)

    def relative_index(self, positions: torch.Tensor, text_len: int) -> torch.Tensor | None:
        """Which slot of the relative tables each (query, key) pair of a patch reads
        → (P + 1, L + C + 1 + P).

        Queries are the P + 1 inputs; input i predicts the token at raster position i of the patch
        (the last, i = P, stands just after it). Keys: the caption (slot V, no position), the context
        tokens at `positions` (C, 3), bos (the bos slot V − 1) and the patch's P tokens. The offset is
        the key's (dt, dy, dx) from the query's, dt clipped to ±e_t and dy, dx to ±relative_radius."""
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
        index = torch.cat([text, slots[:, :C], bos, slots[:, C:]], 1)  # (P + 1, L + C + 1 + P)
        return index.to(self.bos.device)

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

    def forward(self, patch_tokens, text, context,
                layout: ContextLayout) -> tuple[torch.Tensor, torch.Tensor]:
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

    def generate_patch(self, text, context, layout: ContextLayout, given_tokens, keep, sampling: dict,
                       guidance: float | None = None):
        """Token-level AR: sample one patch token by token. given_tokens/keep (B, P): kept tokens are
        written, not sampled. → tokens (B, P), states (layers, 2, B, nh, P, hs), logits (B, P, K).

        guidance s (classifier-free): the batch is two halves, the same canvases under their captions
        and under "None"; each token is sampled once from u + s·(c − u) and written into both halves,
        and the logits returned are those guided ones (B/2, P, K)."""
        if bool(keep.all()):  # a given patch: one teacher-forced pass makes its states
            logits, states = self(given_tokens, text, context, layout)
            return given_tokens, states, guide(logits, guidance)
        B, P = given_tokens.shape
        prefix, prefix_bias = self.prefix(text, context, layout.bias)
        index = self.relative_index(layout.positions, text.shape[4])  # (P + 1, L + C + P + 1) or None
        start = prefix.shape[4]  # bos, then the patch's own P tokens, follow the prefix
        buffers = torch.cat([prefix, self.empty_states(B, P + 1)], dim=4)  # (layers, 2, B, nh, L+C+1+P, hs)
        own_bias = prefix_bias.new_zeros(*prefix_bias.shape[:2], P + 1)  # (layers, nh, 1 + P)
        bias_rows = torch.cat([prefix_bias, own_bias], -1)  # (layers, nh, L+C+1+P)
        positions, tokens, logits = self.positions(), given_tokens.clone(), []
        codes = self.code_vectors()  # (K, D), once per patch
        # Input p is bos (p = 0) or y_{p−1} at its own position; the last input predicts nothing.
        for p in range(P + 1):
            if p == 0:
                x_p = self.bos.expand(B, 1, -1)  # (B, 1, D)
            else:
                x_p = F.embedding(tokens[:, p - 1:p], codes) + positions[p - 1]  # (B, 1, D)
            for layer, block in enumerate(self.blocks):
                x_p = block.step(x_p, start + p, buffers[layer, 0], buffers[layer, 1], bias_rows[layer],
                                 None if index is None else index[p])  # (B, 1, D)
            if p == P:  # y_{P−1}'s keys and values are in the buffers now: the patch is complete
                break
            logits.append(guide(self.logits(x_p, codes)[:, 0], guidance))  # (B, K), or (B/2, K) guided
            sampled = nuwa.sample_logits(logits[-1], **sampling)  # (B,) or (B/2,)
            if guidance is not None:
                sampled = sampled.repeat(2)  # the captioned and the "None" half draw the same token
            tokens[:, p] = torch.where(keep[:, p], given_tokens[:, p], sampled)
        states = buffers[:, :, :, :, start + 1:].clone()  # (layers, 2, B, nh, P, hs): the tokens, not bos
        return tokens, states, torch.stack(logits, 1)  # (B, P), states, (B, P, K)


def guide(logits: torch.Tensor, guidance: float | None) -> torch.Tensor:
    """Classifier-free guidance over a doubled batch (captioned half, then the "None" half) along
    dim 0: u + s·(c − u). None: the logits as they are. An option we add; the paper does not use it."""
    if guidance is None:
        return logits
    conditional, unconditional = logits.chunk(2)
    return nuwa.guide(conditional, unconditional, guidance)


# ---------------------------------------------------------------------------------------------
# 3. Render-and-optimize training
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
        raise ValueError(f"canvas {height}×{width} px is not a multiple of f = {config.token_px} px "
                         f"per token")
    return (T, height // config.token_px, width // config.token_px)


def training_patch_grid(config: InfinityConfig) -> patches.Patch:
    """Patch grid (nT, nH, nW) of one training canvas (or clip)."""
    return patches.patch_grid(training_grid(config), patch_size=config.patch_size, token_px=config.token_px)


def num_patches(config: InfinityConfig) -> int:
    """Patches of one training canvas: the number of render-and-optimize units per micro-batch."""
    return math.prod(training_patch_grid(config))


def training_directions(config: InfinityConfig) -> list[str]:
    """The directions listed in config.directions (ADC), each checked."""
    directions = [d for d in config.directions.split(",") if d]
    if not directions:
        raise ValueError("config.directions names no direction")
    for direction in directions:
        patches.check_direction(direction)
    return directions


def training_order(config: InfinityConfig, seed: int, step: int) -> tuple[str, list[patches.Patch]]:
    """ADC in training: the step's direction, drawn from (seed, step) so that every
    micro-batch and process of a step walks the same order, and that order."""
    directions = training_directions(config)
    direction = directions[np.random.default_rng([seed, step]).integers(len(directions))]
    return direction, patches.patch_order(direction, training_patch_grid(config))


def patch_loss(model: Infinity, tokens: torch.Tensor, order: list[patches.Patch], index: int,
               pool: patches.NearbyContextPool, captions: list[str | None] | None = None) -> torch.Tensor:
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
    context, layout = patches.gather_context(model, patch, pool.select(patch), B)
    targets = patches.cut(tokens, patch, model.config.patch_size).to(model.bos.device)  # (B, P)
    logits, states = model(targets, text, context, layout)  # (B, P, K)
    pool.add(patch, states)
    pool.evict(index)
    # A contiguous row of K codes per token.
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def unit_loss(model: Infinity, tokens: torch.Tensor, captions, *, unit: int, carry, step: int,
              seed: int = 0) -> torch.Tensor:
    """For the stage's units (stages.py): unit 0 draws the step's order and opens a pool in `carry`
    (a stages.Carry: its `direction`, `order` and `pool` are set here); unit u is
    `patch_loss` of patch order[u]. tokens (B, T, H, W) stay the same for all units of a step."""
    if unit == 0:
        carry.direction, carry.order = training_order(model.config, seed, step)
        carry.pool = patches.NearbyContextPool(carry.order, model.config.extent)
    return patch_loss(model, tokens, carry.order, unit, carry.pool, captions)


# ---------------------------------------------------------------------------------------------
# 4. The tokenizer the model predicts codes of
# ---------------------------------------------------------------------------------------------


def check_tokenizer(model: Infinity, vqgan) -> None:
    """The VQ-GAN must be the kind the model predicts codes of: the same f and codebook size."""
    f, K = vqgan.config.downsample, vqgan.config.codebook_size
    if (f, K) != (model.config.token_px, model.config.codebook_size):
        raise ValueError(f"this VQ-GAN has f = {f} px per token and {K} codes, but the Infinity model was "
                         f"trained on f = {model.config.token_px} and {model.config.codebook_size} codes "
                         f"(its vqgan_ckpt {model.config.vqgan_ckpt!r})")


# ---------------------------------------------------------------------------------------------
# 5. Checkpoints
# ---------------------------------------------------------------------------------------------

TRAIN_COMMAND = "train one with `python train.py --stage infinity --preset tiny --out out`"
# The config fields that decide which weights a model has: named when a checkpoint does not fit.
SHAPE_FIELDS = ("relative_radius", "tie_head", "pixel_codes", "patch_size")


def load_infinity(path, *, map_location="cpu") -> Infinity:
    """The model stored at `path` by `train.py --stage infinity`, in eval mode. A checkpoint written
    before the learning aids existed loads as trained, with the paper's scheme (LEGACY_DEFAULTS)."""
    checkpoint = checkpoints.read(path, stage="infinity", fix=TRAIN_COMMAND, map_location=map_location)
    config = checkpoints.config_from(InfinityConfig, checkpoint["config"], path, defaults=LEGACY_DEFAULTS)
    # Before the learning aids, the final LayerNorm was called `norm`.
    state = {("decoder_norm." + k[len("norm."):] if k.startswith("norm.") else k): v
             for k, v in checkpoint["model"].items()}
    model = checkpoints.load_weights(Infinity(config), state, path, shape_fields=SHAPE_FIELDS)
    return model.to(map_location).eval()


def load_with_tokenizer(path, *, vqgan_ckpt: str | None = None,
                        map_location="cpu") -> tuple[Infinity, vqgan_module.VQGAN]:
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
