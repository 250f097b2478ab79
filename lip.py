"""NÜWA-LIP: language-guided inpainting with MP-S2S over the tokens of a DF-VQGAN.

Paper: Ni et al., "NÜWA-LIP: Language Guided Image Inpainting with Defect-free VQGAN",
arXiv 2202.05009 (CVPR 2023). Sections implemented here: §3.2 MP-S2S (multi-perspective sequence
to sequence) and §3.3 training and inference (the loss on the defective tokens only; candidates
reranked by a judge). §3.1, the DF-VQGAN that turns a frame with missing pixels into tokens
whose visible part does not depend on the hole, is dfvqgan.py.

In plain words. Inpainting is given a frame x whose pixels under a mask m are missing, and a
caption; it must fill the hole as the caption says and keep the visible area as it was. The
DF-VQGAN encodes the masked frame; a *hole token* is one whose f × f cell has a missing pixel.
MP-S2S then predicts the hole's tokens in raster order. Its decoder (NÜWA's: nuwa.DecoderLayer,
and NÜWA's sampling loop nuwa.sample_raster) cross-attends to three "perspectives" of what is
known: the caption, the visible tokens (a bidirectional encoder in which hole tokens are a learned
[MASK]), and the pixel patches of the masked frame. `inpaint` samples K candidates (visible tokens
given), decodes them with the DF-VQGAN's skips of the masked frame, and keeps the one a judge
likes best.

Equations (plain text; p a token position in raster order, H the hole tokens):
    memory:      M = [LN(text); LN(visible tokens, [MASK] at H); LN(pixel patches ⊕ mask)] + type
    decoder:     y_p ~ p(y_p | y_<p, M), NÜWA's causal 3DNA decoder (nuwa.py Eq. 8-9)
    loss (§3.3): L = − mean over p ∈ H of log p(y_p | y_<p, M)
    sampling:    y_p kept for p ∉ H (keep = ~hole), drawn for p ∈ H
    guidance:    l = l_None + s · (l_caption − l_None)   (ours)

Sections: 1. configuration · 2. MP-S2S · 3. starting MP-S2S from a NÜWA · 4. inpainting · 5. masks
for training and evaluation · 6. loading a trained pair.

Glossary: B batch, K codebook size (also: K candidates in `inpaint`, where said), H W pixels
(64), h w token grid, f = H/h downsampling, N = h·w tokens of a frame, D width, nh heads,
L caption length, m mask (True = missing), y_p the token at raster position p, e_t e_h e_w
extents (radii), s the guidance scale.

Deviations from the paper (each also marked `# DEVIATION` at its line):
- Scale: 64×64 grey frames, 16×16 tokens at f = 4 (8×8 with a cell tokenizer, f = 8), K = 512;
  the paper: 256 px RGB, F8 (32×32 tokens), K = 8192. Decoder window: radius 5 (11×11) on 16×16,
  the paper's 11×11 on 32×32.
- The pixel-patch encoder sees the mask as a second channel (a black visible pixel and a missing
  one are both 0 in the masked frame); each perspective gets a learned type embedding. Ours.
- MP-S2S shares one token embedding between the visible-token encoder and the decoder input, and
  puts a LayerNorm on each perspective before concatenating them. Ours.
- Reranking: the paper ranks candidates with CLIP; offline we pass any `scorer` (sample.py: a
  digit classifier's probability of the caption's digit, or NÜWA's caption score
  log p(z | caption) − log p(z | None)).
- Training-mask mix (random boxes, half of the digit, half of the frame): our numbers.
- The output is not pasted back into the input: visible pixels are the DF-VQGAN's decoding of the
  visible features (within a small tolerance of the input), as in the paper.
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
  visible tokens given when sampling), besides the visible-token perspective; the official LIP
  code feeds [MASK] at visible positions of the decoder input (`visible_input=False`). Ours lets
  the raster decoder see the visible strokes right above and left of each hole token.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import data
import nuwa
import runtime
import vqgan
from dfvqgan import DFVQGAN, DFVQGANConfig, load_dfvqgan, pool_mask

# ---------------------------------------------------------------------------------------------
# 1. Configuration
# ---------------------------------------------------------------------------------------------


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
    # own window. `visible_input=False` is the official way, one flag away.
    visible_input: bool = True
    relative_bias: bool = False  # decoder 3DNA: a learned score per head and offset (nuwa.py); for init_nuwa
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
            "small": dict(dim=256, num_heads=8, token_layers=4, pixel_layers=4, decoder_layers=8,
                          batch_size=16, lr=1e-3, warmup_steps=100),  # one GPU
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


# ---------------------------------------------------------------------------------------------
# 2. MP-S2S: three perspectives of the known, a causal decoder over the frame's tokens (LIP §3.2)
# ---------------------------------------------------------------------------------------------


def token_mask(mask: torch.Tensor, token_shape: tuple[int, int]) -> torch.Tensor:
    """Hole tokens (B, h, w): the pixel mask (B, 1, H, W) max-pooled to the token grid (a token is a
    hole token iff any pixel of its cell is missing: DF-VQGAN's defect rule, dfvqgan.py)."""
    return pool_mask(mask, token_shape[0])[:, 0]  # (B, h, w)


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
    return F.cross_entropy(chosen, targets.reshape(B, N)[picked])  # targets (n,) of the n hole tokens


class MPS2S(nuwa.CodeEmbeddings, nn.Module):
    """Multi-perspective sequence to sequence. forward(text, tokens, hole, image, mask) → logits (B, N, K).

    Codes go in and out as in NÜWA (nuwa.CodeEmbeddings: code_vectors, logits, set_code_pixels)."""

    def __init__(self, config: LIPConfig):
        super().__init__()
        if not 0.0 <= config.cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob is a probability, got {config.cond_drop_prob}")
        self.config = config
        self.vocabulary = data.CaptionVocabulary(config.text_len)
        D, grid = config.dim, (1, config.token_h, config.token_w)
        # Perspective 1: the caption (1 × 1 × L), full attention.
        self.text_embed = nn.Embedding(len(self.vocabulary), D)
        self.text_pos = nuwa.PositionEmbedding3D((1, 1, config.text_len), D)
        self.text_encoder = nn.ModuleList(nuwa.EncoderLayer(config) for _ in range(config.text_layers))
        # Perspective 2: the visible tokens, hole tokens replaced by [MASK], bidirectional.
        # DEVIATION (LIP §3.2): one token embedding for the visible-token encoder and the decoder input.
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
        # DEVIATION (LIP §3.2): a LayerNorm per perspective before concatenation: no perspective's scale
        # dominates (ours).
        self.memory_norm = nn.ModuleList(nn.LayerNorm(D) for _ in range(3))
        # The decoder: causal 3DNA self-attention, full cross-attention to the three perspectives.
        self.bos = nn.Parameter(torch.zeros(D))
        self.target_pos = nuwa.PositionEmbedding3D(grid, D)
        self.decoder = nn.ModuleList(nuwa.DecoderLayer(config) for _ in range(config.decoder_layers))
        self.decoder_norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, config.codebook_size, bias=False)
        self.apply(nuwa.init_weights)
        if config.tie_head:
            # DEVIATION (LIP §3.2 does not say; as nuwa.py): logits are h · e_k, the embedding of code k.
            self.head.weight = self.token_embed.weight
        if config.pixel_codes:
            # DEVIATION (LIP §3.2 embeds a code by a free vector; as nuwa.py): e_k = E[k] + W · pixels_k,
            # pixels_k the f × f cell the DF-VQGAN draws for code k (`set_code_pixels`, stored with the
            # model). Without it, 5,000 steps learnt only the black code: every ink token of a
            # half-hidden digit cost 5.5 nats, about a uniform guess among the ink codes.
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
        known = F.embedding(tokens.masked_fill(hole, 0).view(B, -1), self.code_vectors())  # (B, N, D)
        known = torch.where(hole.view(B, -1, 1), self.mask_embed.to(known.dtype), known)  # [MASK] at holes
        known = known + self.token_pos(grid)  # (B, N, D)
        for layer in self.token_encoder:
            known = layer(known, grid, None)  # (B, N, D), bidirectional
        visible_pixels = torch.cat([image.masked_fill(mask, 0.0), mask.to(image.dtype)], 1)  # (B, 2, H, W)
        patches = self.patch_embed(visible_pixels).flatten(2).transpose(1, 2)  # (B, N, D)
        patches = patches + self.patch_pos(grid)  # (B, N, D)
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
        """[bos, e(y_0), …, e(y_{N-2})] + the position each input predicts: (B, h, w) → (B, N, D), as
        NÜWA's (nuwa.shift_right). With visible_input=False (the official code) a visible y_p enters as
        the learned [MASK]."""
        B = tokens.shape[0]
        shifted = F.embedding(tokens.reshape(B, -1)[:, :-1], self.code_vectors())  # (B, N - 1, D)
        if not self.config.visible_input:
            visible = ~hole.reshape(B, -1)[:, :-1, None]  # (B, N - 1, 1)
            shifted = torch.where(visible, self.mask_embed.to(shifted.dtype), shifted)
        return nuwa.shift_right(self.bos, shifted) + self.target_pos(self.token_shape)  # (B, N, D)

    def input_stepper(self, hole: torch.Tensor, code_vectors: torch.Tensor) -> nuwa.StepInput:
        """`decoder_input` one position at a time, for cached generation: input_at(tokens (B, N), p)
        → (B, 1, D). hole (B, h, w) says which inputs are visible (for visible_input=False)."""
        positions = self.target_pos(self.token_shape)  # (N, D), once for all steps
        sampled = hole.reshape(hole.shape[0], -1)  # (B, N)

        def input_at(tokens: torch.Tensor, p: int) -> torch.Tensor:
            x_p = nuwa.previous_code(self.bos, tokens, p, code_vectors)  # (B, 1, D)
            if p > 0 and not self.config.visible_input:  # the official input: [MASK] after a visible token
                x_p = torch.where(sampled[:, p - 1:p, None], x_p, self.mask_embed.to(x_p.dtype))
            return x_p + positions[p]  # (B, 1, D)

        return input_at

    @staticmethod
    def memory(states: torch.Tensor) -> nuwa.Memory:
        """The three perspectives (B, L + 2N, D) as the memory the decoder reads in full."""
        return nuwa.Memory(states, (1, 1, states.shape[1]), None)

    def decode_logits(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Decoder input (B, N, D), the perspectives (B, L + 2N, D) → logits (B, N, K)."""
        x = nuwa.run_decoder(self.decoder, x, self.token_shape, self.memory(memory))  # (B, N, D)
        return self.logits(x)  # (B, N, K)

    def forward(self, text, tokens, hole, image, mask) -> torch.Tensor:
        """Teacher-forced logits (B, N, K) for every position of the frame (hole or not)."""
        memory = self.encode(text, tokens, hole, image, mask)  # (B, L + 2N, D)
        return self.decode_logits(self.decoder_input(tokens, hole), memory)

    def loss(self, text, tokens, hole, image, mask) -> torch.Tensor:
        """Cross-entropy on the hole tokens only (LIP §3.3). In training, a `cond_drop_prob` share of
        the captions becomes "None" (for classifier-free guidance)."""
        if self.training and self.config.cond_drop_prob > 0:
            drop = torch.rand(text.shape[0], device=text.device) < self.config.cond_drop_prob  # (B,)
            text = torch.where(drop[:, None], self.none_text(text.shape[0]).to(text.device), text)
        return hole_token_loss(self(text, tokens, hole, image, mask), tokens, hole)

    def none_text(self, batch: int) -> torch.Tensor:
        """The unconditional caption "None" as word ids (batch, L)."""
        return self.vocabulary.encode([None] * batch)

    # --- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, text: torch.Tensor, given: torch.Tensor, hole: torch.Tensor, image: torch.Tensor,
                 mask: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None, use_cache: bool = True,
                 guidance_scale: float | None = None) -> torch.Tensor:
        """Sample the hole tokens in raster order (nuwa.sample_raster) → tokens (B, h, w).

        The inputs are the model's (forward's): text (B, L) word ids, given (B, h, w) the frame's
        tokens, hole (B, h, w) bool, image and mask (B, 1, H, W). The given tokens outside the hole
        are kept (keep = ~hole, as NUWA.generate's given=(tokens, keep)); hole tokens are sampled.
        use_cache=False recomputes the whole decoder at every position (the slow reference; a test
        proves both give the same tokens). temperature 0 is greedy. guidance_scale s (classifier-free
        guidance, for models trained with `cond_drop_prob` > 0): logits = l_None + s · (l_caption −
        l_None), where the "None" pass keeps the same visible tokens and pixels: s > 1 pushes the fill
        towards what the caption says beyond what the visible part already shows."""
        with runtime.one_cpu_thread(self.bos.device, enabled=use_cache):
            memories = [self.memory(self.encode(text, given, hole, image, mask))]  # (B, L + 2N, D) per pass
            if guidance_scale is not None:
                none = self.none_text(text.shape[0]).to(text.device)
                memories.append(self.memory(self.encode(none, given, hole, image, mask)))
            code_vectors = self.code_vectors()  # (K, D), once for all steps
            tokens = nuwa.sample_raster(self, memories, self.token_shape, code_vectors=code_vectors,
                                        input_at=self.input_stepper(hole, code_vectors),
                                        decoder_input=functools.partial(self.decoder_input, hole=hole),
                                        given=(given, ~hole), guidance_scale=guidance_scale,
                                        use_cache=use_cache, draw_kept=False, temperature=temperature,
                                        top_k=top_k, top_p=top_p, generator=generator)  # (B, N)
        return tokens.view(given.shape)  # (B, h, w)


# ---------------------------------------------------------------------------------------------
# 3. Starting MP-S2S from a trained NÜWA (our option, `init_nuwa`)
# ---------------------------------------------------------------------------------------------

# What must agree for a NÜWA's weights to fit MP-S2S: the shapes of every copied tensor, and how
# logits are formed.
NUWA_SHARED_FIELDS = ("dim", "num_heads", "decoder_layers", "mlp_ratio", "codebook_size", "token_h",
                      "token_w", "text_len", "extent", "relative_bias", "relative_keys", "tie_head",
                      "pixel_codes")


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
    comparable = lambda value: tuple(value) if isinstance(value, (list, tuple)) else value  # extents
    differ = [name for name in NUWA_SHARED_FIELDS
              if comparable(getattr(mine, name)) != comparable(getattr(theirs, name))]
    wrong = [f"{name}: MP-S2S {getattr(mine, name)!r}, NÜWA {getattr(theirs, name)!r}" for name in differ]
    if theirs.encoder_layers != 0 or mine.text_layers != 0:
        wrong.append(f"text layers: MP-S2S {mine.text_layers}, NÜWA encoder_layers {theirs.encoder_layers} "
                     f"(both must be 0)")
    if model.vocabulary.words != source.vocabulary.words:
        wrong.append("caption vocabularies differ")
    if wrong:
        raise ValueError("this NÜWA cannot start MP-S2S; set the MP-S2S flags to match (--set FIELD=VALUE): "
                         + "; ".join(wrong))
    L = mine.text_len
    pairs = {"text_embed.weight": source.text_embed.weight,
             "text_pos.time.weight": source.cond_pos.time.weight[:1],
             "text_pos.height.weight": source.cond_pos.height.weight[:1],
             "text_pos.width.weight": source.cond_pos.width.weight[:L],
             "memory_norm.0.weight": source.encoder_norm.weight,
             "memory_norm.0.bias": source.encoder_norm.bias,
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
# 4. Inpainting: K candidates, visible tokens given, decoded with the masked frame's skips
# ---------------------------------------------------------------------------------------------

Scorer = Callable[[torch.Tensor, str], torch.Tensor]  # (pixels (K, 1, H, W), caption) → scores (K,)


def check_inpainting_inputs(dfvqgan: DFVQGAN, image: torch.Tensor, mask: torch.Tensor,
                            captions: list[str]) -> None:
    """Clear errors for the mistakes a caller makes: shapes, dtypes, range, masks with no hole."""
    R = dfvqgan.config.resolution
    if image.dim() != 4 or tuple(image.shape[1:]) != (1, R, R):
        raise ValueError(f"image must be (B, 1, {R}, {R}) in [0, 1], got shape {tuple(image.shape)}")
    if not image.is_floating_point() or image.min() < 0 or image.max() > 1:
        raise ValueError("image must be a float tensor with values in [0, 1]")
    if mask.dtype != torch.bool or mask.shape != image.shape:
        raise ValueError(f"mask must be a bool tensor of the image's shape {tuple(image.shape)} "
                         f"(True = missing), got {mask.dtype} of shape {tuple(mask.shape)}")
    if len(captions) != image.shape[0]:
        raise ValueError(f"{image.shape[0]} image(s) but {len(captions)} caption(s)")
    nothing_missing = [i for i in range(len(mask)) if not mask[i].any()]
    if nothing_missing:
        raise ValueError(f"mask of image(s) {nothing_missing} has no missing pixel: there is nothing to "
                         f"inpaint (DFVQGAN.decode(*DFVQGAN.encode(x, mask), mask) reconstructs a frame)")


@torch.no_grad()
def inpaint(model: MPS2S, dfvqgan: DFVQGAN, image: torch.Tensor, mask: torch.Tensor, captions, *,
            candidates: int = 1, scorer: Scorer | None = None, temperature: float = 1.0,
            top_k: int | None = None, generator: torch.Generator | None = None, use_cache: bool = True,
            guidance_scale: float | None = None) -> tuple[torch.Tensor, dict]:
    """Fill the missing pixels of `image` (B, 1, H, W) under `mask` (B, 1, H, W) as `captions` say.

    Returns (pixels (B, 1, H, W) in [0, 1], info). Per image, K = `candidates` token grids are
    sampled (visible tokens given, hole tokens drawn), decoded with the DF-VQGAN skips of the
    masked image, and the candidate with the highest `scorer` score is kept (the first if no scorer).
    info: "candidates" (B, K, 1, H, W), "scores" (B, K) or None, "best" (B,), "tokens" (B, K, h, w),
    "hole" (B, h, w) the hole tokens, "reconstruction" (B, 1, H, W) = decode of the visible input alone.

    An all-missing mask is allowed: every token is sampled and no skip carries anything, i.e. plain
    text-to-image. A mask with no missing pixel is a ValueError (nothing to inpaint).
    """
    captions = [captions] if isinstance(captions, str) else list(captions)
    if dfvqgan.training or model.training:
        raise ValueError("inpaint needs models in eval mode (in training mode the DF-VQGAN's codebook would "
                         "update itself from the masked frame): call .eval() first; lip.load_lip does")
    check_inpainting_inputs(dfvqgan, image, mask, captions)
    if candidates < 1:
        raise ValueError(f"candidates must be ≥ 1, got {candidates}")
    device = model.bos.device
    image, mask = image.to(device), mask.to(device)
    B, K = image.shape[0], candidates
    masked = image.masked_fill(mask, 0.0)  # the hole's content is never read
    indices, skips = dfvqgan.encode(masked, mask)  # (B, h, w); visible entries exact
    hole = token_mask(mask, indices.shape[-2:])  # (B, h, w)
    reconstruction = dfvqgan.decode(indices, skips, mask).clamp(0, 1)  # (B, 1, H, W)
    text = model.vocabulary.encode(captions).to(device)  # (B, L)
    repeat = lambda t: t.repeat_interleave(K, 0)  # (B, ...) → (B·K, ...), candidates of an image adjacent
    tokens = model.generate(repeat(text), repeat(indices), repeat(hole), repeat(masked), repeat(mask),
                            temperature=temperature, top_k=top_k, generator=generator, use_cache=use_cache,
                            guidance_scale=guidance_scale)  # (B·K, h, w)
    pixels = dfvqgan.decode(tokens, [repeat(s) for s in skips], repeat(mask)).clamp(0, 1)  # (B·K, 1, H, W)
    pixels = pixels.view(B, K, *pixels.shape[1:])  # (B, K, 1, H, W)
    scores, best = None, torch.zeros(B, dtype=torch.long, device=device)
    if scorer is not None:
        # DEVIATION (LIP §3.3): the paper reranks with CLIP; the caller's scorer stands in for it.
        scores, best = rerank(pixels, captions, scorer)
    chosen = pixels[torch.arange(B, device=device), best]  # (B, 1, H, W)
    info = {"candidates": pixels, "scores": scores, "best": best,
            "tokens": tokens.view(B, K, *tokens.shape[1:]),  # (B, K, h, w)
            "hole": hole, "reconstruction": reconstruction}
    return chosen, info


def rerank(candidates: torch.Tensor, captions: list[str],
           scorer: Scorer) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every frame's K candidates under its caption: candidates (B, K, 1, H, W) → scores (B, K)
    and the index of the best (B,). (LIP §3.3 ranks with CLIP; `inpaint` calls this with its scorer.)"""
    B, K = candidates.shape[:2]
    scores = torch.stack([torch.as_tensor(scorer(candidates[b], captions[b]), dtype=torch.float32).reshape(K)
                          for b in range(B)]).to(candidates.device)  # (B, K)
    return scores, scores.argmax(1)


# ---------------------------------------------------------------------------------------------
# 5. Masks for training and evaluation (1 = missing; data.py has boxes and half frames)
# ---------------------------------------------------------------------------------------------

SIDES = ("top", "bottom", "left", "right")
INK_LEVEL = data.SKETCH_THRESHOLD  # a pixel is ink above this grey level, as in the sketches


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
    box = {"top": (y0, ym, x0, x1), "bottom": (ym, y1, x0, x1),
           "left": (y0, y1, x0, xm), "right": (y0, y1, xm, x1)}
    top, bottom, left, right = box[side]
    mask[0, top:bottom, left:right] = True
    return mask


def item_rng(seed: int, step: int, index: int) -> np.random.Generator:
    """The random stream of item `index` of training step `step`: a pure function of the three, so a
    resumed or distributed run draws the same masks (batches.py's data protocol, on which exact
    resumption relies)."""
    return np.random.default_rng([seed, step, index])


def training_mask(frame: torch.Tensor, rng: np.random.Generator, box_prob: float,
                  half_digit_prob: float) -> torch.Tensor:
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
# 6. Loading a trained pair (checkpoints written by train.py --stage lip and --stage dfvqgan)
# ---------------------------------------------------------------------------------------------


# What an MP-S2S checkpoint written before these fields existed was trained with: the paper's choices.
LEGACY_DEFAULTS = dict(tie_head=False, pixel_codes=False)
# The config fields that decide which weights an MP-S2S has (named when a state dict does not fit).
SHAPE_FIELDS = ("tie_head", "pixel_codes", "codebook_size", "token_h", "token_w", "relative_bias",
                "relative_keys")


def load_lip(path, *, dfvqgan_ckpt: str | None = None, map_location="cpu") -> tuple[MPS2S, DFVQGAN]:
    """(MP-S2S, its DF-VQGAN), both in eval mode; the DF-VQGAN path is the one recorded in the
    checkpoint unless `dfvqgan_ckpt` overrides it. Their codebooks and token grids must agree, and
    the DF-VQGAN's codes must mean what they meant at training (`check_code_meaning`)."""
    checkpoint = checkpoints.read(path, stage="lip", map_location=map_location,
                                  fix="train one with `python train.py --stage lip --preset tiny`")
    config = checkpoints.config_from(LIPConfig, checkpoint["config"], path, defaults=LEGACY_DEFAULTS)
    model = checkpoints.load_weights(MPS2S(config), checkpoint["model"], path, shape_fields=SHAPE_FIELDS)
    dfvqgan_path = dfvqgan_ckpt or config.dfvqgan_ckpt
    dfvqgan = load_dfvqgan(dfvqgan_path, map_location=map_location)
    check_pair(config, dfvqgan.config)
    check_code_meaning(model, dfvqgan, dfvqgan_path)
    return model.to(map_location).eval(), dfvqgan


def check_code_meaning(model: MPS2S, dfvqgan: DFVQGAN, path: str) -> None:
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
        model.check_code_pixels(dfvqgan, path, flag="--dfvqgan")
        return
    plain_path = dfvqgan.config.init_vqgan
    if not (dfvqgan.config.freeze_tokens and plain_path):
        raise ValueError(f"{path} is not a DF-VQGAN that keeps a plain VQGAN's tokens (init_vqgan="
                         f"{plain_path!r}, freeze_tokens={dfvqgan.config.freeze_tokens}), but this MP-S2S "
                         f"was started from a NÜWA and predicts such tokens: pass the DF-VQGAN it was "
                         f"trained with")
    if not Path(plain_path).exists():  # e.g. a model copied to another machine without that file
        warnings.warn(f"cannot check that {path} gives the codes this MP-S2S learnt: the plain VQGAN whose "
                      f"tokens it froze ({plain_path}) is not there. Inpaintings decode as noise if it is "
                      f"another one.",
                      stacklevel=3)
        return
    model.check_code_pixels(vqgan.load_vqgan(plain_path), f"{path} (its tokens are those of {plain_path})",
                            flag="--dfvqgan")  # the plain tokenizer whose pixels init_from_nuwa copied in


def check_pair(config: LIPConfig, dfvqgan_config: DFVQGANConfig) -> None:
    """MP-S2S predicts the DF-VQGAN's tokens: K, the token grid and the patch size must match."""
    found = (dfvqgan_config.codebook_size, dfvqgan_config.token_shape, dfvqgan_config.downsample)
    if found != (config.codebook_size, (config.token_h, config.token_w), config.patch):
        raise ValueError(f"the DF-VQGAN gives {found[0]} codes on a {found[1]} grid (f = {found[2]}), but "
                         f"MP-S2S expects {config.codebook_size} codes on ({config.token_h}, "
                         f"{config.token_w}) with patch {config.patch}: set --codebook-size / --token-h / "
                         f"--token-w / --patch to match")
