"""NÜWA: a 3D transformer encoder-decoder over token grids, and the raster sampling loop.

Paper: Wu et al., "NÜWA: Visual Synthesis Pre-training for Neural visUal World creAtion",
arXiv 2111.12417 (ECCV 2022). Sections implemented here: §3.1 (every modality is a 3D grid of
tokens; this file consumes the grids that vqgan.py produces), §3.2 (3D Nearby Attention, imported
from nearby_attention.py), §3.3 (the 3D encoder-decoder, Eq. 6-9) and §3.4 (the training
objective, Eq. 10). The eight tasks of §4 (T2I, S2I, I2I, TI2I, T2V, S2V, V2V, TV2V) are in tasks.py.

In plain words: a condition C (a caption, a sketch, or the word "None") is a grid of tokens that
an encoder of non-causal 3DNA layers turns into a memory. A decoder reads the target's tokens in
raster order (frame, row, column), each layer doing causal 3DNA self-attention, 3DNA
cross-attention to the memory and an MLP, and predicts the next VQ token. Generation samples one
token at a time, a rolling key/value cache making each step O(window), not O(N); that loop
(section 6) is shared with NÜWA-LIP's MP-S2S (lip.py), whose decoder is the same.

Equations (plain text; p is a target position in raster order):
    position (Eq. 6):   Pos(t, i, j) = Pos_t[t] + Pos_h[i] + Pos_w[j]   (three learned tables)
    encoder (Eq. 7):    C⁽ˡ⁾ = 3DNA(C⁽ˡ⁻¹⁾, C⁽ˡ⁻¹⁾)   (non-causal; + pre-norm and MLP)
    decoder (Eq. 8-9):  Y⁽ˡ⁾_p = 3DNA(Y⁽ˡ⁻¹⁾_≤p, Y⁽ˡ⁻¹⁾_≤p) + 3DNA(Y⁽ˡ⁻¹⁾_p, C⁽ᴸ⁾),  input Y⁽⁰⁾ =
                        [bos, e(y_0), …, e(y_{N-2})] + Pos   (shifted right by one)
    loss (Eq. 10):      L = − Σ_p log p(y_p | y_<p, C)
    guidance (ours):    l = l_None + s · (l_C − l_None)

Sections: 1. configuration · 2. conditions (captions as data.CaptionVocabulary ids, sketches,
None) · 3. building blocks · 4. code embeddings · 5. the model · 6. raster decoding and sampling
(shared with lip.MPS2S) · 7. the optimiser's parameter groups · 8. loading a checkpoint.

Glossary: B batch, T frames, h w token rows/columns per frame, N = T·h·w target tokens,
Nc condition tokens, D width, nh heads, hs head size, K codebook size, L caption length,
e_t e_h e_w extents (radii), p a target position in raster order, y_p the target token at p,
e_k the embedding of code k, s the guidance scale.

Deviations from the paper (each also marked at its line; the `paper` preset and PAPER_SCHEME turn
off the learning aids, TINY_PAPER_SCHEME is the paper's model at the tiny scale):
- Scale: the `tiny` preset is ~100× narrower and shallower than the paper's 870M model, over the
  tokens of our small VQ-GAN on 64×64 Moving MNIST frames (16×16 tokens per frame).
- Captions are padded to L words with a learned <pad> word, attended like any word (the paper does
  not say how it pads). Decoder input p carries the position of the target p it predicts.
- Learning aids, without which the tiny model does not learn to copy a token from the previous
  frame (benchmarks/bench_learn.py): relative positions in every 3DNA window (`relative_bias`,
  `relative_keys`: a score b[h, o] + q·r[h, o]/√hs per head and 3D offset o); the head tied to the
  code embeddings (`tie_head`); self-attention's W^V = W^O = I at the start (`identity_init`); and
  pixel code embeddings (`pixel_codes`): e_k = E[k] + W · pixels_k, the f × f pixels the tokenizer
  draws for code k, so what is learnt about a stroke carries over to its shifted copies' codes.
- First-frame context (`first_frame_context`, an experiment, OFF by default): input p of frame 0
  also carries W_f · the mean embedding of the codes drawn so far in that frame.
- No encoder layers in the tiny model (`encoder_layers` 0; the paper has 12): the memory is
  LayerNorm(token + position) of each caption word or sketch token (a tiny encoder collapsed the
  caption into one summary that lost the words' order).
- V2V is trained on the predicted half only (`v2v_loss_on_given` False; the paper: every token),
  and the opening frames get more training (the `t2v_start` task re-weights Eq. 10's terms).
- Classifier-free guidance is an option we add (off by default); the "None" pass is fed exactly
  the same decoder input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import data
import runtime
from nearby_attention import NearbyAttention

# ---------------------------------------------------------------------------------------------
# 1. Configuration
# ---------------------------------------------------------------------------------------------


# The paper's model: absolute positions only, an untied head, no copying initialisation (the paper
# states none; ours is GPT-2's, `init_weights`), V2V trained on every token (NUWAConfig).
PAPER_SCHEME = dict(relative_bias=False, relative_keys=False, tie_head=False, identity_init=False,
                    pixel_codes=False, first_frame_context=False, v2v_loss_on_given=True)
# The paper's model at the tiny scale: those switches and a two-layer encoder (the `paper` preset has 12).
TINY_PAPER_SCHEME = {**PAPER_SCHEME, "encoder_layers": 2}


@dataclass
class NUWAConfig:
    dim: int = 128  # D, model width (paper: 1280)
    num_heads: int = 4  # nh, attention heads (paper: 20)
    # DEVIATION (tiny model; paper: 12): no encoder layers, the memory is LayerNorm(word + position) of
    # every caption slot (module docstring); `--encoder-layers 2` trains a tiny encoder.
    encoder_layers: int = 0  # L_enc, 3DNA layers over the condition (paper: 12)
    decoder_layers: int = 4  # L_dec, 3DNA layers over the target (paper: 24)
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio · D (the usual transformer value)
    codebook_size: int = 512  # K, VQ-GAN codes for images/frames (paper: 12,288)
    sketch_codebook_size: int = 512  # K of VQ-GAN-Seg, the sketch tokenizer
    token_h: int = 16  # token rows per frame: the tiny VQ-GAN's 64 px / 4 (paper: 21 for 336 px)
    token_w: int = 16  # token columns per frame (paper: 21)
    max_frames: int = 20  # size of the time tables; 10 → 10 prediction needs 20 (paper: 10 frames)
    text_len: int = 16  # L, caption length in words after padding (our captions have ≤ 15 words)
    extent: tuple[int, int, int] = (2, 2, 2)  # (e_t, e_h, e_w) of visual 3DNA (paper, video: 3,3,3)
    dropout: float = 0.0  # residual dropout (paper: not stated; off at our scale)
    cond_drop_prob: float = 0.0  # P(condition → "None") in training, for guidance (paper: 0, no CFG)
    backend: str = "blocked"  # 3DNA implementation used in full passes (see nearby_attention.py)
    # --- what makes a small model learn video (benchmarks/bench_learn.py); all False = the paper
    relative_bias: bool = True  # a learned score per head and 3D offset in every 3DNA window
    relative_keys: bool = True  # + q · r_offset: the query chooses the offset it reads (Shaw et al.)
    tie_head: bool = True  # the output head shares the target token embedding's matrix
    identity_init: bool = True  # decoder self-attention's value and output projections start as identity
    pixel_codes: bool = True  # a code's embedding (and tied logit) includes a projection of its pixels
    first_frame_context: bool = False  # frame 0's input p adds a projection of the mean code so far
    # --- training (train.py --stage nuwa); the model itself ignores these fields
    vqgan_ckpt: str = "out/vqgan/ckpt.pt"  # the frame tokenizer whose codes this model predicts
    seg_ckpt: str = "out/seg/ckpt.pt"  # the sketch tokenizer; "" = train without sketch tasks
    tasks: str = "t2v,t2i,v2v,s2v,s2i"  # tasks summed in every step (NÜWA §3.4 mixes T2I, V2V, T2V)
    t2i_steps: int = 0  # curriculum option: text→image alone for the first t2i_steps steps, then `tasks`
    start_steps: int = 0  # curriculum option: then t2v_start alone for start_steps steps, then `tasks`
    frames: int = 10  # T of text→video and sketch→video clips (paper: 10)
    num_digits: int = 1  # digits per captioned training clip (data.CaptionedMovingMNIST: 1 or 2)
    predict_frames: int = 20  # V2V clips: the first half is given, the second predicted (10 → 10)
    v2v_loss_on_given: bool = False  # V2V loss also on the given half (True) or on the predicted half only
    batch_size: int = 8  # clips per task per step (paper: 128 in total)
    v2v_batch_size: int = 0  # V2V clips per step (20 frames each: the costliest task); 0 = batch_size
    start_frames: int = 2  # task t2v_start: the first start_frames frames of a clip, under its whole caption
    start_batch_size: int = 0  # t2v_start clips per step; 0 = batch_size
    mix_start_batch_size: int = 0  # t2v_start clips per mix step after start_steps; 0 = start_batch_size
    lr: float = 1e-3  # Adam learning rate (paper: 1e-3)
    weight_decay: float = 0.01  # AdamW weight decay (paper: not stated)
    warmup_steps: int = 100  # linear learning-rate warm-up (paper: not stated)
    grad_clip: float = 1.0  # clip the global gradient norm (paper: not stated)

    @classmethod
    def preset(cls, name: str, **overrides) -> NUWAConfig:
        presets = {
            # CPU, trains in minutes: short runs want many small steps at a high rate (measured on the
            # demo's 7-minute budget: batch 2 at 3e-3 reaches a lower loss than batch 4 at 2e-3 or 1e-3).
            "tiny": dict(batch_size=2, lr=3e-3, warmup_steps=10),
            "small": dict(dim=256, num_heads=8, encoder_layers=4, decoder_layers=8),  # one GPU
            "paper": dict(dim=1280, num_heads=20, encoder_layers=12, decoder_layers=24,
                          codebook_size=12_288, sketch_codebook_size=12_288, token_h=21, token_w=21,
                          max_frames=10, extent=(3, 3, 3), **PAPER_SCHEME),  # NÜWA §4.1; only built on "meta"
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


# ---------------------------------------------------------------------------------------------
# 2. Conditions: a caption (data.CaptionVocabulary's word ids) as a 1 × 1 × L grid, a sketch, or None
# ---------------------------------------------------------------------------------------------

class Condition(NamedTuple):
    """What the encoder reads: `kind` is "text" or "sketch"; `tokens` a grid (B, Tc, Hc, Wc).

    Text is the grid 1 × 1 × L; a sketch is VQ-GAN-Seg tokens per frame; "None" is text."""

    kind: str
    tokens: torch.Tensor


def text_condition(vocabulary: data.CaptionVocabulary, captions: list[str | None]) -> Condition:
    """Captions as the condition grid (B, 1, 1, L) of word ids."""
    return Condition("text", vocabulary.encode(captions)[:, None, None, :])  # (B, 1, 1, L)


def none_condition(vocabulary: data.CaptionVocabulary, batch_size: int) -> Condition:
    """The unconditional condition: the single word "None" (NÜWA's I2I and V2V)."""
    return text_condition(vocabulary, [None] * batch_size)


def sketch_condition(sketch_tokens: torch.Tensor) -> Condition:
    """VQ-GAN-Seg tokens (B, T, h, w) as the condition grid."""
    if sketch_tokens.dim() != 4:
        raise ValueError(f"sketch tokens must be (B, T, h, w), got shape {tuple(sketch_tokens.shape)}")
    return Condition("sketch", sketch_tokens)


class Memory(NamedTuple):
    """What a decoder cross-attends to: the encoder's output, its grid, and how far to read it."""

    states: torch.Tensor  # (B, Nc, D)
    shape: tuple[int, int, int]  # its grid (Tc, Hc, Wc), Nc = Tc·Hc·Wc
    extent: tuple[int, int, int] | None  # the 3DNA extent of cross-attention; None = in full (text)


# ---------------------------------------------------------------------------------------------
# 3. Building blocks
# ---------------------------------------------------------------------------------------------


class PositionEmbedding3D(nn.Module):
    """Three learned tables, for time, height and width, summed at every grid position (NÜWA §3.3)."""

    def __init__(self, max_shape: tuple[int, int, int], dim: int):
        super().__init__()
        self.max_shape = tuple(max_shape)
        self.time, self.height, self.width = (nn.Embedding(n, dim) for n in max_shape)

    def forward(self, shape: tuple[int, int, int]) -> torch.Tensor:
        check_shape_fits(shape, self.max_shape)
        T, H, W = shape
        device = self.time.weight.device
        t = self.time(torch.arange(T, device=device))[:, None, None]  # (T, 1, 1, D)
        h = self.height(torch.arange(H, device=device))[None, :, None]  # (1, H, 1, D)
        w = self.width(torch.arange(W, device=device))[None, None, :]  # (1, 1, W, D)
        return (t + h + w).reshape(T * H * W, -1)  # (N, D) in raster order


def check_shape_fits(shape, max_shape) -> None:
    if len(shape) != 3 or any(s < 1 or s > m for s, m in zip(shape, max_shape)):
        raise ValueError(f"grid shape {tuple(shape)} does not fit the position tables (T, H, W) ≤ "
                         f"{tuple(max_shape)} of this model/checkpoint")


def relative_positions(config) -> dict:
    """NearbyAttention's relative-position switches (DEVIATION, NÜWA §3.2: the paper has absolute
    positions only; see the module docstring). NÜWA's layers are shared with LIP and Infinity, whose
    configs have no such fields: for them, the paper's absolute positions only."""
    return {name: getattr(config, name, False) for name in ("relative_bias", "relative_keys")}


class MLP(nn.Sequential):
    def __init__(self, config: NUWAConfig):
        hidden = config.mlp_ratio * config.dim
        super().__init__(nn.Linear(config.dim, hidden), nn.GELU(), nn.Linear(hidden, config.dim),
                         nn.Dropout(config.dropout))


class EncoderLayer(nn.Module):
    """Pre-norm non-causal 3DNA self-attention + MLP over the condition (NÜWA Eq. 6-7).

    Text conditions use full attention (the paper's extent ∞ for text)."""

    def __init__(self, config: NUWAConfig):
        super().__init__()
        self.norm_attn, self.norm_mlp = nn.LayerNorm(config.dim), nn.LayerNorm(config.dim)
        self.attn = NearbyAttention(config.dim, config.num_heads, config.extent, causal=False,
                                    backend=config.backend, **relative_positions(config))
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, shape, extent) -> torch.Tensor:
        x = x + self.attn(self.norm_attn(x), shape, extent=extent)  # (B, Nc, D)
        return x + self.mlp(self.norm_mlp(x))  # (B, Nc, D)


class DecoderLayer(nn.Module):
    """Pre-norm causal 3DNA self-attention, 3DNA cross-attention to the encoder output, MLP
    (NÜWA Eq. 8-9). `forward` is the full (training) pass, `step` one position of generation."""

    def __init__(self, config: NUWAConfig):
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_mlp = (nn.LayerNorm(config.dim) for _ in range(3))
        self.self_attn = NearbyAttention(config.dim, config.num_heads, config.extent, causal=True,
                                         backend=config.backend, **relative_positions(config))
        self.cross_attn = NearbyAttention(config.dim, config.num_heads, config.extent, context_dim=config.dim,
                                          backend=config.backend, **relative_positions(config))
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, shape, memory: Memory) -> torch.Tensor:
        x = x + self.self_attn(self.norm_self(x), shape, bos=True)  # (B, N, D)
        x = x + self.cross_attn(self.norm_cross(x), shape, context=memory.states, kv_shape=memory.shape,
                                extent=memory.extent)  # (B, N, D)
        return x + self.mlp(self.norm_mlp(x))  # (B, N, D)

    def step(self, x_p: torch.Tensor, p: int, shape, caches, memory: Memory) -> torch.Tensor:
        self_cache, cross_cache = caches
        x_p = x_p + self.self_attn.step(self.norm_self(x_p), p, shape, self_cache)  # (B, 1, D)
        x_p = x_p + self.cross_attn.step(self.norm_cross(x_p), p, shape, cross_cache, context=memory.states,
                                         kv_shape=memory.shape, extent=memory.extent)  # (B, 1, D)
        return x_p + self.mlp(self.norm_mlp(x_p))  # (B, 1, D)


# ---------------------------------------------------------------------------------------------
# 4. Code embeddings: codes in and out of a decoder (shared with lip.MPS2S and infinity.Infinity)
# ---------------------------------------------------------------------------------------------


def init_weights(module: nn.Module) -> None:
    """GPT-2's small normal initialisation, N(0, 0.02²) weights and zero biases, for every linear
    and embedding layer (the paper does not state its initialisation). Use: `model.apply(init_weights)`."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


class CodeEmbeddings:
    """Codes in and out of a decoder over VQ tokens: what NUWA, lip.MPS2S and infinity.Infinity share.

    A host module has `config.tie_head`, `config.pixel_codes`, `config.token_h/token_w`, and the
    modules `token_embed` (E, K × D), `head`, `decoder_norm` and, with pixel codes, `pixel_embed` (W)
    and the buffer `code_pixels` (K, f·f). See the deviations on the tied head and pixel codes."""

    def add_pixel_codes(self, cell: int) -> None:
        """Build the pixel-code path: the buffer `code_pixels` (K, cell), filled by `set_code_pixels`,
        and W (cell → D), initialised as every other weight. Hosts call it last in __init__, so every
        other weight starts as in a model without pixel codes (paired ablations)."""
        self.register_buffer("code_pixels", torch.zeros(self.config.codebook_size, cell))  # (K, f·f)
        self.pixel_embed = nn.Linear(cell, self.token_embed.embedding_dim, bias=False)
        init_weights(self.pixel_embed)

    def code_vectors(self) -> torch.Tensor:
        """The embedding of every code (K, D): e_k = E[k], plus W · pixels_k with pixel_codes."""
        if not self.config.pixel_codes:
            return self.token_embed.weight  # (K, D)
        return self.token_embed.weight + self.pixel_embed(self.code_pixels.to(self.pixel_embed.weight.dtype))

    def logits(self, x: torch.Tensor, code_vectors: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's output stream (..., D) → next-code logits (..., K)."""
        x = self.decoder_norm(x)
        if self.config.tie_head and self.config.pixel_codes:
            return F.linear(x, self.code_vectors() if code_vectors is None else code_vectors)  # h · e_k
        return self.head(x)  # (..., K); tied without pixels: head.weight is E

    @torch.no_grad()
    def set_code_pixels(self, pixels: torch.Tensor) -> None:
        """Copy in what each code looks like: (K, f·f) pixels from the frame tokenizer
        (vqgan.VQGAN.code_patches). Stored with the model, so a checkpoint carries them."""
        if not self.config.pixel_codes:
            raise ValueError("this model has pixel_codes=False: it has no code pixels to set")
        if tuple(pixels.shape) != tuple(self.code_pixels.shape):
            raise ValueError(f"code pixels of shape {tuple(pixels.shape)} do not fit this model's "
                             f"{tuple(self.code_pixels.shape)} (codebook_size × the f × f pixels of a "
                             f"{self.config.token_h} × {self.config.token_w} token grid on {data.CANVAS} px)")
        self.code_pixels.copy_(pixels)

    @torch.no_grad()
    def check_code_pixels(self, tokenizer, path: str, flag: str = "--vqgan") -> None:
        """Refuse a frame tokenizer other than the one this model was trained on. Its codes must draw
        the pixels stored with the model (`code_pixels`): the same code count is not enough, since
        two tokenizers number their codes differently and the samples would decode as noise. (A
        relative `vqgan_ckpt` recorded at training is read from the current folder.) Models
        without pixel codes store nothing to compare and are not checked."""
        if not self.config.pixel_codes:
            return
        if not same_code_pixels(tokenizer.code_patches(), self.code_pixels):
            raise ValueError(f"{path} is not the tokenizer this model was trained on: its codes draw other "
                             f"pixels than the ones stored with the model (code_pixels). Pass the right one "
                             f"({flag} PATH) or run from the folder the model was trained in")


def same_code_pixels(drawn: torch.Tensor, stored: torch.Tensor) -> bool:
    """Do two (K, f·f) tables of code pixels say the same thing? (Within 10⁻³: a tokenizer drawing its
    codes on another device or thread count differs in the last bits.) The one rule by which a model
    with pixel codes recognises the tokenizer it was trained on, at load and at resume."""
    return drawn.shape == stored.shape and torch.allclose(drawn.to(stored), stored, atol=1e-3)


def code_nats(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """− log p of each target code under teacher-forced logits (B, N, K); targets hold B·N codes
    (any shape, raster order) → (B, N). NÜWA's loss and every evaluation or probe that scores a sequence
    of codes use it (MP-S2S's loss keeps hole tokens only: lip.hole_token_loss)."""
    # One row of K codes per token: the softmax runs over contiguous memory (over a transposed
    # (B, K, N) view it strode across N: 29.5 → 10.7 ms per call with its backward on a CPU).
    nats = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")  # (B·N,)
    return nats.view(logits.shape[:2])  # (B, N)


# ---------------------------------------------------------------------------------------------
# 5. The model
# ---------------------------------------------------------------------------------------------


class NUWA(CodeEmbeddings, nn.Module):
    """The 3D encoder-decoder of NÜWA §3.3. Conditions and targets are token grids."""

    def __init__(self, config: NUWAConfig):
        super().__init__()
        self.config = config
        self.vocabulary = data.CaptionVocabulary(config.text_len)
        D = config.dim
        # Condition side: one word/sketch embedding per modality, its own position tables.
        self.text_embed = nn.Embedding(len(self.vocabulary), D)
        self.sketch_embed = nn.Embedding(config.sketch_codebook_size, D)
        cond_max = (config.max_frames, config.token_h, max(config.token_w, config.text_len))
        self.cond_pos = PositionEmbedding3D(cond_max, D)
        self.encoder = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.encoder_norm = nn.LayerNorm(D)
        # Target side: VQ token embedding, learned bos, its own position tables.
        self.token_embed = nn.Embedding(config.codebook_size, D)
        self.bos = nn.Parameter(torch.zeros(D))
        self.target_pos = PositionEmbedding3D((config.max_frames, config.token_h, config.token_w), D)
        self.decoder = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_layers))
        self.decoder_norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, config.codebook_size, bias=False)
        self.apply(init_weights)
        if config.tie_head:  # DEVIATION (NÜWA §3.3 does not say): logits h · e_k; copying e_k predicts code k
            self.head.weight = self.token_embed.weight
        if config.identity_init:
            # DEVIATION (the paper states no initialisation): W^V = W^O = I in decoder self-attention, so
            # each head passes on the token it reads from the first step: learning to copy is then
            # learning *where* to look.
            for layer in self.decoder:
                for linear in (layer.self_attn.v_proj, layer.self_attn.out_proj):
                    nn.init.eye_(linear.weight)
        if config.pixel_codes:
            # DEVIATION (NÜWA §3.3 embeds a code by a free vector): e_k = E[k] + W · pixels_k, pixels_k the
            # f × f cell the tokenizer draws for code k (`set_code_pixels`, stored with the model).
            self.add_pixel_codes((data.CANVAS // config.token_h) * (data.CANVAS // config.token_w))
        if config.first_frame_context:
            # OPTION, off by default (not in NÜWA §3.3): frame 0's input p adds W_f · frame_so_far. W_f
            # starts at zero and is built last, so every other weight starts as without it.
            self.first_frame_proj = nn.Linear(D, D, bias=False)
            nn.init.zeros_(self.first_frame_proj.weight)

    # --- encoder ------------------------------------------------------------------------------

    def encode(self, cond: Condition) -> Memory:
        """Condition → the memory (B, Nc, D), its grid and the extent to attend it with (Eq. 6-7)."""
        tokens = cond.tokens.to(self.bos.device)  # (B, Tc, Hc, Wc)
        B, Tc, Hc, Wc = tokens.shape
        if cond.kind == "text":
            embed, extent = self.text_embed, None  # text is attended in full (extent ∞)
        elif cond.kind == "sketch":
            embed, extent = self.sketch_embed, self.config.extent
        else:
            raise ValueError(f"unknown condition kind {cond.kind!r}; expected 'text' or 'sketch'")
        if int(tokens.max()) >= embed.num_embeddings or int(tokens.min()) < 0:
            raise ValueError(f"{cond.kind} token ids must lie in [0, {embed.num_embeddings})")
        shape = (Tc, Hc, Wc)
        x = embed(tokens.reshape(B, -1)) + self.cond_pos(shape)  # (B, Nc, D)
        for layer in self.encoder:
            x = layer(x, shape, extent)  # (B, Nc, D)
        return Memory(self.encoder_norm(x), shape, extent)

    # --- decoder ------------------------------------------------------------------------------

    def decoder_input(self, targets: torch.Tensor) -> torch.Tensor:
        """Shift right: [bos, e(y_0), …, e(y_{N-2})], each plus the position of the token it predicts.

        targets (B, T, h, w) → (B, N, D)."""
        B, T, h, w = targets.shape
        embedded = F.embedding(targets.reshape(B, -1), self.code_vectors())  # (B, N, D), raster order
        # DEVIATION (NÜWA §3.3): input p carries the position of the target p it predicts (our choice).
        x = shift_right(self.bos, embedded[:, :-1]) + self.target_pos((T, h, w))  # (B, N, D)
        if self.config.first_frame_context:
            context = self.first_frame_proj(frame_so_far(embedded[:, :h * w]))  # (B, hw, D)
            x = torch.cat([x[:, :h * w] + context, x[:, h * w:]], dim=1)  # (B, N, D): frame 0 only
        return x

    def input_stepper(self, shape: tuple[int, int, int], code_vectors: torch.Tensor) -> StepInput:
        """`decoder_input` one position at a time, for cached generation: input_at(tokens (B, N), p)
        → (B, 1, D), called for p = 0, 1, … in order (frame 0's context is a running sum)."""
        positions = self.target_pos(shape)  # (N, D), once for all steps
        frame = shape[1] * shape[2]  # h·w tokens of frame 0
        frame_sum = None  # Σ of frame 0's code vectors before p (first_frame_context)

        def input_at(tokens: torch.Tensor, p: int) -> torch.Tensor:
            nonlocal frame_sum
            previous = previous_code(self.bos, tokens, p, code_vectors)  # (B, 1, D)
            x_p = previous + positions[p]  # (B, 1, D)
            if self.config.first_frame_context and p < frame:
                frame_sum = torch.zeros_like(previous) if p == 0 else frame_sum + previous
                x_p = x_p + self.first_frame_proj(frame_sum / max(p, 1))  # (B, 1, D)
            return x_p

        return input_at

    def forward(self, cond: Condition, targets: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits: targets (B, T, h, w) → logits (B, N, K) for y_p at every p."""
        return self.decode_logits(self.decoder_input(targets), targets.shape[1:], self.encode(cond))

    def decode_logits(self, x: torch.Tensor, shape, memory: Memory) -> torch.Tensor:
        """Decoder input (B, N, D) over the grid `shape` → logits (B, N, K)."""
        return self.logits(run_decoder(self.decoder, x, tuple(shape), memory))  # (B, N, K)

    def loss(self, cond: Condition, targets: torch.Tensor,
             loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """NÜWA Eq. 10: L = − Σ_p log p(y_p | y_<p, C), averaged over the (optionally masked) targets."""
        self.check_targets(targets)
        if self.training and self.config.cond_drop_prob > 0:
            cond = self.drop_condition(cond)
        per_token = self.token_nats(cond, targets)  # (B, N)
        if loss_mask is None:
            return per_token.mean()
        weights = loss_mask.reshape(per_token.shape).to(per_token.dtype)  # (B, N)
        return (per_token * weights).sum() / weights.sum().clamp(min=1)

    def token_nats(self, cond: Condition, targets: torch.Tensor) -> torch.Tensor:
        """− log p(y_p | y_<p, C) of every target token, teacher-forced: targets (B, T, h, w) → (B, N)."""
        return code_nats(self(cond, targets), targets)  # (B, N)

    def drop_condition(self, cond: Condition) -> Condition:
        """Replace a random fraction of text conditions by "None" (for classifier-free guidance)."""
        if cond.kind != "text":
            return cond
        drop = torch.rand(cond.tokens.shape[0], device=cond.tokens.device) < self.config.cond_drop_prob
        none = none_condition(self.vocabulary, cond.tokens.shape[0]).tokens.to(cond.tokens.device)
        return Condition("text", torch.where(drop[:, None, None, None], none, cond.tokens))

    def check_targets(self, targets: torch.Tensor) -> None:
        if targets.dim() != 4:
            raise ValueError(f"targets must be token grids (B, T, h, w), got shape {tuple(targets.shape)}")
        check_shape_fits(targets.shape[1:], self.target_pos.max_shape)

    # --- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, cond: Condition, target_shape: tuple[int, int, int], *,
                 given: tuple[torch.Tensor, torch.Tensor] | None = None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True,
                 guidance_scale: float | None = None, caches: list | None = None,
                 progress: bool = False) -> torch.Tensor:
        """Sample target tokens (B, T, h, w) one position at a time in raster order (`sample_raster`).

        given: a (tokens (B, T, h, w), keep (B, T, h, w) bool) pair; kept positions are written,
        not sampled (prefixes for I2I/V2V, everything outside the edit box for TI2I).
        temperature = 0 is greedy. guidance_scale s (optional classifier-free guidance):
        logits = l_None + s · (l_cond − l_None), both passes fed the same decoder input.
        use_cache=False recomputes the whole decoder at every position (the slow reference).
        caches: optional fresh `[model.new_caches()]` (one per pass) to inspect after generation.
        progress: show a progress bar over the N positions (on a terminal).
        """
        check_shape_fits(target_shape, self.target_pos.max_shape)
        with runtime.one_cpu_thread(self.bos.device, enabled=use_cache):
            memories = [self.encode(cond)]
            if guidance_scale is not None:
                memories.append(self.encode(none_condition(self.vocabulary, cond.tokens.shape[0])))
            code_vectors = self.code_vectors()  # (K, D), once for all steps
            tokens = sample_raster(self, memories, target_shape, code_vectors=code_vectors,
                                   input_at=self.input_stepper(target_shape, code_vectors),
                                   decoder_input=self.decoder_input, given=given,
                                   guidance_scale=guidance_scale, use_cache=use_cache, caches=caches,
                                   progress=progress, temperature=temperature, top_k=top_k, top_p=top_p,
                                   generator=generator)  # (B, N)
        return tokens.view(-1, *target_shape)  # (B, T, h, w)

    def new_caches(self) -> list:
        """Empty key/value caches of every decoder layer, for one pass of `generate(caches=...)`."""
        return decoder_caches(self.decoder)


def frame_so_far(embedded: torch.Tensor) -> torch.Tensor:
    """Mean embedding of the codes before each position of one frame (zero at its first position):
    embedded (B, S, D), S = h·w codes in raster order → (B, S, D). What `first_frame_context` adds to
    frame 0's decoder input (through W_f); generation keeps the same running sum."""
    sums = F.pad(embedded.cumsum(1)[:, :-1], (0, 0, 1, 0))  # (B, S, D): Σ of slots 0 … i−1
    counts = torch.arange(embedded.shape[1], device=embedded.device).clamp(min=1).to(embedded.dtype)  # (S,)
    return sums / counts[:, None]  # (B, S, D)


# ---------------------------------------------------------------------------------------------
# 6. Raster decoding, shared by NUWA and lip.MPS2S: the decoder's input, a full pass, one cached
#    step, one token's sampling, guidance, and the token-by-token sampling loop
# ---------------------------------------------------------------------------------------------

StepInput = Callable[[torch.Tensor, int], torch.Tensor]  # (tokens so far (B, N), p) → input p (B, 1, D)


def shift_right(bos: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
    """The decoder reads the target shifted right by one: [bos, e(y_0), …, e(y_{N-2})].
    bos (D,), embedded (B, N − 1, D) the inputs after bos → (B, N, D)."""
    return torch.cat([bos.expand(embedded.shape[0], 1, -1), embedded], dim=1)  # (B, N, D)


def previous_code(bos: torch.Tensor, tokens: torch.Tensor, p: int,
                  code_vectors: torch.Tensor) -> torch.Tensor:
    """Input p of the shifted decoder, before its position: bos at p = 0, else e(y_{p−1}).
    tokens (B, N) → (B, 1, D)."""
    if p == 0:
        return bos.expand(tokens.shape[0], 1, -1)  # (B, 1, D)
    return F.embedding(tokens[:, p - 1:p], code_vectors)  # (B, 1, D)


def run_decoder(layers: nn.ModuleList, x: torch.Tensor, shape: tuple[int, int, int],
                memory: Memory) -> torch.Tensor:
    """The full (teacher-forced) pass of the decoder layers (Eq. 8-9): x (B, N, D) → (B, N, D)."""
    for layer in layers:
        x = layer(x, shape, memory)  # (B, N, D)
    return x


def step_decoder(layers: nn.ModuleList, x_p: torch.Tensor, p: int, shape: tuple[int, int, int], caches: list,
                 memory: Memory) -> torch.Tensor:
    """One position of the decoder layers, reading earlier positions from the caches: x_p (B, 1, D)
    → (B, 1, D), equal to position p of `run_decoder` (tested: cached = uncached)."""
    for layer, layer_caches in zip(layers, caches):
        x_p = layer.step(x_p, p, shape, layer_caches, memory)  # (B, 1, D)
    return x_p


def decoder_caches(layers: nn.ModuleList) -> list:
    """Empty (self-attention, cross-attention) key/value caches of every decoder layer: one pass."""
    return [(layer.self_attn.new_cache(), layer.cross_attn.new_cache()) for layer in layers]


def cache_nbytes(caches: list) -> int:
    """Bytes held by generation caches: a list (one per pass) of per-layer (self, cross) caches."""
    return sum(cache.nbytes() for per_pass in caches for layer in per_pass for cache in layer)


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits (B, K): greedy when temperature == 0, else softmax sampling
    restricted to the top-k codes and/or the smallest set whose probability reaches top_p."""
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature ≥ 0 (0 = greedy), top_k ≥ 1 and 0 < top_p ≤ 1 "
                         f"(or None); got temperature={temperature}, top_k={top_k}, top_p={top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits.float() / temperature  # (B, K)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, K)
        sorted_probs = sorted_logits.softmax(dim=-1)  # (B, K)
        # Drop a code when the codes ranked above it already reach top_p (the first is always kept).
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # (B, K)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)  # back to code order
        logits = logits.masked_fill(drop, -math.inf)
    probs = logits.softmax(dim=-1)  # (B, K)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)


def guide(conditioned: torch.Tensor, unconditioned: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (ours; the papers do not use it): l = l_None + s · (l_C − l_None)."""
    return unconditioned + scale * (conditioned - unconditioned)


@torch.no_grad()
def sample_raster(model: nn.Module, memories: list[Memory], shape: tuple[int, int, int], *,
                  code_vectors: torch.Tensor, input_at: StepInput, decoder_input: Callable,
                  given: tuple[torch.Tensor, torch.Tensor] | None = None, guidance_scale: float | None = None,
                  use_cache: bool = True, caches: list | None = None, progress: bool = False,
                  draw_kept: bool = True, **sampling) -> torch.Tensor:
    """Sample a grid of codes (B, N) one position at a time in raster order: p(y_p | y_<p, memory).

    model: a NUWA or lip.MPS2S (its `decoder` layers and `logits`). memories: one per pass, the
    condition's first; with guidance_scale s the second is the "None" pass and the logits are
    `guide`d. Every pass reads the same decoder input: input_at(tokens so far, p) → (B, 1, D) in a
    cached step, decoder_input(tokens (B, *shape)) → (B, N, D) in the slow reference (use_cache=False:
    the whole decoder recomputed at every position). given: (tokens, keep) of any shape holding B·N;
    kept positions are written, not sampled. draw_kept: whether a position that every row keeps
    still draws from `sampling` (temperature, top_k, top_p, generator: `sample_logits`); NÜWA draws
    at every position, so its random stream does not depend on `given`; MP-S2S skips them (most of a
    frame is visible). caches: optional fresh `decoder_caches` per pass, to inspect afterwards."""
    B, N = memories[0].states.shape[0], math.prod(shape)
    tokens = torch.zeros(B, N, dtype=torch.long, device=code_vectors.device)  # (B, N), filled in order
    keep = None
    if given is not None:
        given_tokens, keep = (part.reshape(B, N).to(code_vectors.device) for part in given)  # (B, N) each
        tokens = given_tokens.clone()
    if use_cache and caches is None:
        caches = [decoder_caches(model.decoder) for _ in memories]
    for p in runtime.progress(range(N), enabled=progress, desc="tokens", unit="tok", leave=False):
        if use_cache:  # every pass steps (its caches need position p) with the same input
            x_p = input_at(tokens, p)  # (B, 1, D)
            states = [step_decoder(model.decoder, x_p, p, shape, c, m) for c, m in zip(caches, memories)]
        if not draw_kept and keep is not None and bool(keep[:, p].all()):
            continue  # every row knows y_p: no logits needed
        if use_cache:
            logits = [model.logits(x, code_vectors)[:, 0] for x in states]  # (B, K) per pass
        else:
            x = decoder_input(tokens.view(B, *shape))  # (B, N, D); positions ≥ p unread (causal)
            logits = [model.logits(run_decoder(model.decoder, x, shape, m))[:, p] for m in memories]
        logits_p = logits[0] if guidance_scale is None else guide(logits[0], logits[1], guidance_scale)
        sampled = sample_logits(logits_p, **sampling)  # (B,)
        tokens[:, p] = sampled if keep is None else torch.where(keep[:, p], tokens[:, p], sampled)
    return tokens


# ---------------------------------------------------------------------------------------------
# 7. The optimiser's parameter groups
# ---------------------------------------------------------------------------------------------


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices only (the usual transformer practice). Relative
    position tables are not decayed either: a table entry is trained only by the pairs at its
    offset, and decay would pull the sharp scores that copying needs back towards a blurred window."""
    def decays(name: str, parameter: torch.Tensor) -> bool:
        return parameter.dim() >= 2 and not name.endswith(("position_bias", "relative_keys"))
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------
# 8. Loading a trained model (a checkpoint written by train.py --stage nuwa)
# ---------------------------------------------------------------------------------------------

# What a checkpoint written before these fields existed was trained with: the paper's choices.
LEGACY_DEFAULTS = PAPER_SCHEME
# The config fields that decide which weights a NÜWA has (named when a state dict does not fit).
SHAPE_FIELDS = ("relative_bias", "relative_keys", "extent", "tie_head", "pixel_codes", "first_frame_context")


def load_nuwa(path, *, map_location="cpu") -> NUWA:
    """The NÜWA model stored at `path` by `train.py --stage nuwa`, in eval mode. Checkpoints written
    before the learning aids existed were trained the paper's way (LEGACY_DEFAULTS)."""
    checkpoint = checkpoints.read(path, stage="nuwa", map_location=map_location,
                                  fix="train one with `python train.py --stage nuwa --preset tiny`")
    config = checkpoints.config_from(NUWAConfig, checkpoint["config"], path, defaults=LEGACY_DEFAULTS)
    model = checkpoints.load_weights(NUWA(config), checkpoint["model"], path, shape_fields=SHAPE_FIELDS)
    return model.to(map_location).eval()
