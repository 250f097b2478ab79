"""VQ-GAN: the per-frame tokenizer of NÜWA, and VQ-GAN-Seg for sketch maps.

Papers: NÜWA (Wu et al., arXiv 2111.12417) §3.1 "3D Data Representation", which tokenizes images
and every video frame with one 2D VQ-GAN, and VQ-GAN itself (Esser et al., "Taming Transformers",
arXiv 2012.09841) §3.1-3.2, built on VQ-VAE (van den Oord et al., arXiv 1711.00937) §3.1-3.2 and its
EMA codebook (appendix A.1; Razavi et al., arXiv 1906.00446).

Summary. An encoder E turns a frame x (C, H, W) into a grid of vectors E(x) (d_B, h, w); each vector
is replaced by its nearest code of a learned codebook B (K, d_B); the index of that code is the
token. A decoder G maps the codes back to a frame x̂. A video is tokenized frame by frame, so images
and videos share one codebook (NÜWA §3.1). The tokenizer is trained with

    L = rec_loss + codebook_loss + commitment_loss + λ · disc_weight · gan_loss  (+ perceptual_loss)

and a PatchGAN discriminator D is trained with its own hinge loss. VQ-GAN-Seg is the same class with
one-hot class maps as input (in_channels = number of classes) and cross-entropy as rec_loss.

Sections: 1. configuration and presets · 2. encoder (global or per cell) and decoder · 3. PatchGAN
discriminator and the adaptive weight · 4. the VQGAN module (encode / decode / forward, video and
sketch helpers) · 5. pictures of reconstructions · 6. loading a trained tokenizer. The codebook
(nearest code, straight-through, EMA, initialisation, dead-code restart) is quantizer.py.

Glossary: B batch, T frames, C channels of a frame (1 grey, or the number of classes for a sketch),
H W frame height/width in pixels, h w token grid (H/f, W/f), f downsampling factor, K codebook size,
d_B code dimension, M = B·h·w vectors quantized in a batch, z_i the token at grid position i,
E(x) encoder output, B[z] the codes looked up, G decoder, D discriminator, sg[·] stop-gradient,
β commitment weight, γ EMA decay, λ adaptive GAN weight.

Loss names and what trains what (tests/test_vqgan.py checks each):
- rec_loss       ||x − x̂||_1 (frames) or CE(x̂, classes) (sketches): trains G, and E through the
                 straight-through estimator; never the codebook.
- codebook_loss  ||sg[E(x)] − B[z]||²: moves the chosen codes towards the encoder outputs. With EMA
                 updates (the default) the codes are not parameters: the EMA update *replaces* this
                 term's gradient step (VQ-VAE appendix A.1), so it is reported but trains nothing.
- commitment_loss β·||E(x) − sg[B[z]]||², β = 0.25: keeps E close to its codes; trains E only.
- gan_loss       hinge generator loss −D(x̂), times λ = ||∇_{G_last} L_rec|| / (||∇_{G_last} gan_loss||
                 + 1e-4) clamped to [0, 1e4], times disc_weight, from step disc_start on.
- disc_loss      hinge loss of D: relu(1 − D(x)) + relu(1 + D(x̂)); trains D only (own optimizer).

Deviations from the paper (each also marked `# DEVIATION` where it happens):
- Tiny scale: 64×64 grey frames → 16×16 tokens (f = 4), K = 512, a narrow network (width 16),
  one residual block per level and attention only in the middle block. NÜWA: 336×336 RGB → 21×21
  (f = 16), K = 12,288. The tiny preset is f = 4 because f = 8 reconstructs too blurrily within a
  few CPU minutes; `--ch_mult 1 2 4 4` gives f = 8 (8×8 tokens: a 10-frame clip is 640 tokens, not
  2,560), which `make demo` uses with the cell encoder: its short clips are what a tiny NÜWA can
  learn to draw digits from on a CPU.
- `cell_encoder=True` swaps VQGAN's encoder, which sees the whole frame, for a per-cell one (each
  token reads only its own f×f pixels; `CellEncoder`). The global encoder spreads the empty cells
  (most of a Moving MNIST frame) over many codes, noise that a transformer must then model; the cell
  encoder puts them on one code and reconstructs about as well (`python evaluate.py recon`).
- No perceptual loss by default: no pretrained VGG / LPIPS weights exist offline. The term is
  pluggable (`model.perceptual = a module returning a scalar distance`) and weighted by
  `perceptual_weight`, which is 0 in the tiny and small presets.
- β sits on the commitment term as in VQ-VAE eq. 3. (The public VQGAN code multiplies the codebook
  term by β instead; we do not repeat that.)
- EMA codebook updates, data-dependent initialisation and dead-code restart are on by default
  (quantizer.py, which lists them); the papers train the codebook by gradient (`ema=False`).
- VQ-GAN-Seg: NÜWA gives no loss details; we use cross-entropy as rec_loss and switch the GAN off in
  the seg variant (the class maps are reconstructed almost exactly by cross-entropy alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import data
import quantizer
import runtime

# ---------------------------------------------------------------------------------------------
# 1. Configuration
# ---------------------------------------------------------------------------------------------

NUM_SKETCH_CLASSES = 11  # background + digits 0-9 (data.py: class 1 + d is digit d)
ADAPTIVE_WEIGHT_EPS = 1e-4  # Esser et al. eq. 7: λ = ||∇rec|| / (||∇gan|| + δ), δ = 1e-4
ADAPTIVE_WEIGHT_MAX = 1e4  # the same code clamps λ to [0, 1e4]
DISC_SLOPE = 0.2  # LeakyReLU slope of the PatchGAN (Isola et al. 2017, and VQGAN)
DISC_MAX_MULT = 8  # PatchGAN widths stop doubling at 8 × disc_ch (Isola et al.; VQGAN)
DISC_INIT_STD = 0.02  # N(0, 0.02) initial discriminator weights (DCGAN, kept by VQGAN)


@dataclass
class VQGANConfig:
    # --- what is tokenized
    in_channels: int = 1  # channels of a frame: 1 grey (paper: 3 RGB); VQ-GAN-Seg: number of classes
    resolution: int = 64  # frame side H = W in pixels (NÜWA: 336; Moving MNIST: 64)
    rec_loss: str = "l1"  # "l1" for frames (VQGAN); "ce" = cross-entropy over classes (VQ-GAN-Seg)
    # --- encoder E and decoder G (VQGAN's convolutional U-shaped stack, without skips)
    ch: int = 16  # width at full resolution (VQGAN: 128)
    ch_mult: tuple[int, ...] = (1, 2, 4)  # width multiplier per level; len - 1 halvings, f = 2^(len-1)
    num_res_blocks: int = 1  # residual blocks per level in E (G has one more, as VQGAN) (VQGAN: 2)
    mid_attention: bool = True  # one non-local attention block at the lowest resolution (VQGAN: yes)
    cell_encoder: bool = False  # E sees only each token's own f×f pixel cell (CellEncoder; VQGAN: no)
    norm_groups: int = 8  # GroupNorm groups; must divide every width (VQGAN: 32)
    # --- codebook B
    codebook_size: int = 512  # K (NÜWA: 12,288)
    embed_dim: int = 32  # d_B, dimension of one code (VQGAN: 256)
    beta: float = 0.25  # β, weight of the commitment term (VQ-VAE eq. 3: 0.25)
    ema: bool = True  # EMA codebook updates (VQ-VAE appendix); False: trained by codebook_loss's gradient
    ema_decay: float = 0.99  # γ of the EMA updates (VQ-VAE appendix: 0.99)
    ema_eps: float = 1e-5  # ε of the Laplace smoothing of the EMA counts (Sonnet's VQ-VAE-2 code)
    data_init: bool = True  # initialise the codes from encoder outputs of the first training batch
    # Restart codes whose EMA usage (tokens per batch) fell below this; 0 = off. At 1.0 a code not used
    # in every batch was moved each step and half of K stayed unused; at 0.03 every code is used
    # (measured on the f = 8 cell tokenizer). Rare codes (a stroke's end, a thin join) tell an 8 from a 3.
    dead_code_threshold: float = 0.03
    # --- losses
    perceptual_weight: float = 0.0  # weight of the pluggable perceptual term (VQGAN: 1.0 with LPIPS)
    disc_weight: float = 0.1  # weight of the adaptive-weighted GAN term (VQGAN: 0.8)
    disc_start: int = 1500  # step at which the GAN terms switch on (VQGAN: 250k on ImageNet). Tiny: a
    # 300 s run on 2 busy cores made 943 steps, so D only joins runs that get more compute than that
    disc_ch: int = 32  # PatchGAN width of its first layer (VQGAN: 64)
    disc_layers: int = 2  # strided PatchGAN layers (VQGAN: 3)
    # --- optimisation (Adam for E, B, G and another for D)
    batch_size: int = 8  # frames per step (VQGAN: 12 per GPU); at equal frames seen, 8 beat 16 by 2x in MSE
    frames_per_clip: int = 4  # frames taken from each training clip of a batch (cheap data, still varied)
    lr: float = 2e-3  # Adam learning rate (VQGAN: 4.5e-6 × total batch size)
    betas: tuple[float, float] = (0.9, 0.99)  # Adam betas (VQGAN: 0.5, 0.9; ours converge faster early)
    grad_clip: float = 1.0  # clip the gradient norm of each optimizer step to this; 0 = off

    @property
    def downsample(self) -> int:
        """f: every level but the last halves the resolution."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def token_shape(self) -> tuple[int, int]:
        """(h, w) token grid of one resolution × resolution frame."""
        side = self.resolution // self.downsample
        return (side, side)

    @classmethod
    def preset(cls, name: str, *, seg: bool = False, **overrides) -> VQGANConfig:
        """`tiny` (CPU, minutes), `small` (one GPU), `paper` (NÜWA's sizes; build it on the meta
        device only), with any field overridden. `seg=True` gives the VQ-GAN-Seg variant of the
        preset (SEG_FIELDS); overrides win over both."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {list(PRESETS)}")
        return cls(**{**PRESETS[name], **(SEG_FIELDS if seg else {}), **overrides})


# Presets differ only in these fields from the defaults above (which are the tiny preset).
PRESETS: dict[str, dict] = {
    # DEVIATION (NÜWA §3.1): f = 4 and K = 512 at 64×64 grey, not f = 16 and K = 12,288 at 336 RGB;
    # f = 8 reconstructs too blurrily in a few CPU minutes (module docstring).
    "tiny": {},
    "small": dict(ch=64, num_res_blocks=2, norm_groups=16, codebook_size=1024, embed_dim=64,
                  batch_size=64, lr=1e-3, disc_start=5000, disc_ch=64, disc_layers=3, disc_weight=0.2),
    # NÜWA §3.1: 336 → 21×21 (f = 16), K = 12,288; the network sizes are VQGAN's f16 model.
    "paper": dict(in_channels=3, resolution=336, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                  norm_groups=32, codebook_size=12288, embed_dim=256, ema=False, perceptual_weight=1.0,
                  disc_weight=0.8, disc_start=250_001, disc_ch=64, disc_layers=3, batch_size=12,
                  lr=4.5e-6 * 12, frames_per_clip=1),
}
# VQ-GAN-Seg (NÜWA §3.1, sketches): the same network on one-hot class maps, trained by cross-entropy.
# DEVIATION (NÜWA §3.1): the GAN is off for VQ-GAN-Seg; cross-entropy alone suffices here.
SEG_FIELDS: dict = dict(in_channels=NUM_SKETCH_CLASSES, rec_loss="ce", disc_weight=0.0)


# ---------------------------------------------------------------------------------------------
# 2. Encoder E and decoder G (VQGAN §3.1: a convolutional stack with residual blocks, one
#    self-attention block at the lowest resolution, GroupNorm and swish)
# ---------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """GroupNorm → swish → conv, twice, plus a (1×1-projected) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out_ch, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, out_ch, H, W)
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h·w positions of a feature map, with a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).view(B, 3, C, H * W).transpose(2, 3)  # (B, 3, H·W, C)
        h = F.scaled_dot_product_attention(qkv[:, 0:1], qkv[:, 1:2], qkv[:, 2:3])  # (B, 1, H·W, C)
        h = h[:, 0].transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj(h)


class Encoder(nn.Module):
    """E: (B, C, H, W) → (B, d_B, H/f, W/f)."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        groups = config.norm_groups
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        previous = widths[0]
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(previous, width, groups))
                previous = width
            if level < len(widths) - 1:  # halve the resolution between levels
                blocks.append(nn.Conv2d(previous, previous, 3, stride=2, padding=1))
        self.down = nn.Sequential(*blocks)
        mid_attention = AttnBlock(previous, groups) if config.mid_attention else nn.Identity()
        self.mid = nn.Sequential(ResBlock(previous, previous, groups), mid_attention,
                                 ResBlock(previous, previous, groups))
        self.norm_out = nn.GroupNorm(groups, previous)
        self.conv_out = nn.Conv2d(previous, config.embed_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(self.conv_in(x))  # (B, ch·ch_mult[-1], h, w)
        h = self.mid(h)  # (B, ch·ch_mult[-1], h, w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, d_B, h, w)


class CellEncoder(nn.Module):
    """E with a receptive field of exactly one f×f pixel cell: (B, C, H, W) → (B, d_B, H/f, W/f).

    A convolution whose kernel and stride are both f reads every cell once; then a per-cell MLP
    (1×1 convolutions with a residual, no normalisation, no attention) maps it to the code vector.
    Nothing outside a cell reaches its token, so equal cells get equal tokens wherever they are and
    whatever surrounds them. On Moving MNIST every empty cell becomes one and the same token.

    Why it exists: the global encoder above sees the whole frame through its receptive field,
    GroupNorm statistics and attention, so the black cells of a frame are spread over hundreds of
    codes that depend on where the digit is (measured on the tiny tokenizer: ~300 codes, ~3.5 nats
    per black cell). A transformer that writes a frame in raster order cannot know, above the digit,
    which of them comes next; it spends its capacity on that noise and samples it back as artefacts.
    The decoder G keeps its full context, so reconstructions still use the neighbouring codes.
    """

    # DEVIATION (VQGAN §3.1): the VQGAN encoder is a deep convolutional stack seeing the whole image.

    def __init__(self, config: VQGANConfig):
        super().__init__()
        f, width = config.downsample, config.ch * config.ch_mult[-1]
        self.conv_in = nn.Conv2d(config.in_channels, width, f, stride=f)  # one f×f cell → one vector
        self.mlp = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Conv2d(width, width, 1), nn.SiLU(),
                                               nn.Conv2d(width, width, 1))
                                 for _ in range(config.num_res_blocks + 1))
        self.conv_out = nn.Conv2d(width, config.embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, width, h, w)
        for block in self.mlp:
            h = h + block(h)  # (B, width, h, w), still cell by cell
        return self.conv_out(F.silu(h))  # (B, d_B, h, w)


class Decoder(nn.Module):
    """G: (B, d_B, h, w) → (B, C, h·f, w·f); the mirror image of E, with nearest upsampling."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        groups = config.norm_groups
        previous = widths[-1]
        self.conv_in = nn.Conv2d(config.embed_dim, previous, 3, padding=1)
        mid_attention = AttnBlock(previous, groups) if config.mid_attention else nn.Identity()
        self.mid = nn.Sequential(ResBlock(previous, previous, groups), mid_attention,
                                 ResBlock(previous, previous, groups))
        blocks: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(config.num_res_blocks + 1):  # one more than E, as in VQGAN
                blocks.append(ResBlock(previous, widths[level], groups))
                previous = widths[level]
            if level > 0:  # double the resolution between levels
                blocks += [nn.Upsample(scale_factor=2, mode="nearest"),
                           nn.Conv2d(previous, previous, 3, padding=1)]
        self.up = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(groups, previous)
        # G_last: the adaptive GAN weight compares gradient norms at this layer's weight.
        self.conv_out = nn.Conv2d(previous, config.in_channels, 3, padding=1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(codes))  # (B, ch·ch_mult[-1], h, w)
        h = self.up(h)  # (B, ch, H, W)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W)


# ---------------------------------------------------------------------------------------------
# 3. PatchGAN discriminator D and the adaptive weight λ (VQGAN §3.2, eq. 7)
# ---------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """D: (B, C, H, W) → a grid of real/fake logits, one per overlapping patch (Isola et al. 2017)."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        width = config.disc_ch
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, width, 4, stride=2, padding=1),
                                   nn.LeakyReLU(DISC_SLOPE)]
        for _ in range(1, config.disc_layers):
            layers += [nn.Conv2d(width, 2 * width, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(2 * width), nn.LeakyReLU(DISC_SLOPE)]
            width *= 2
        last_width = min(2 * width, DISC_MAX_MULT * config.disc_ch)  # one more doubling, at stride 1
        layers += [nn.Conv2d(width, last_width, 4, padding=1, bias=False), nn.BatchNorm2d(last_width),
                   nn.LeakyReLU(DISC_SLOPE), nn.Conv2d(last_width, 1, 4, padding=1)]
        self.net = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, DISC_INIT_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, H', W')


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN eq. 7: λ = ||∇_{G_last} L_rec|| / (||∇_{G_last} L_GAN|| + δ), clamped to [0, 1e4], detached.

    It balances the two terms so the GAN gradient at the decoder's last layer is as large as the
    reconstruction gradient, whatever their raw scales.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + ADAPTIVE_WEIGHT_EPS)
    return weight.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()


# ---------------------------------------------------------------------------------------------
# 4. VQGAN
# ---------------------------------------------------------------------------------------------


class VQGAN(nn.Module):
    """Tokenizer: `encode` frames to tokens, `decode` tokens to frames, `forward` for training.

    Frames are floats in [0, 1] of shape (B, C, H, W); for VQ-GAN-Seg, C one-hot class channels
    and `decode` returns class logits. H and W must be multiples of f = config.downsample.
    """

    def __init__(self, config: VQGANConfig):
        super().__init__()
        if config.rec_loss not in ("l1", "ce"):
            raise ValueError(f"rec_loss must be 'l1' or 'ce', got {config.rec_loss!r}")
        if config.dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold is a usage in tokens per batch (0 = no restarts), got "
                             f"{config.dead_code_threshold}")
        self.config = config
        self.encoder = CellEncoder(config) if config.cell_encoder else Encoder(config)
        self.quantizer = quantizer.VectorQuantizer(config)
        self.decoder = Decoder(config)
        self.discriminator = PatchDiscriminator(config) if config.disc_weight > 0 else None
        # Pluggable perceptual distance (VQGAN: LPIPS); a module (x̂, x) → scalar. None offline.
        self.perceptual: nn.Module | None = None

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def check_input(self, x: torch.Tensor) -> None:
        """Fail early, saying what was expected, instead of deep inside a convolution."""
        f, C = self.config.downsample, self.config.in_channels
        if x.dim() != 4 or x.shape[1] != C:
            hint = " (for a video use encode_video)" if x.dim() == 5 else ""
            raise ValueError(f"VQGAN expects frames of shape (B, {C}, H, W) with in_channels={C}, got "
                             f"{tuple(x.shape)}{hint}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"frame size {tuple(x.shape[2:])} is not divisible by the downsampling "
                             f"factor f={f}; expected H and W that are multiples of {f} "
                             f"(e.g. {self.config.resolution})")

    # --- the three paths: encode, decode, forward -------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Frames (B, C, H, W) → tokens z (B, H/f, W/f), int64 in [0, K)."""
        self.check_input(x)
        _, indices, _ = self.quantizer(self.encoder(x))  # (B, h, w)
        return indices

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Tokens z (B, h, w) → x̂ = G(B[z]) (B, C, H, W); class logits for VQ-GAN-Seg."""
        return self.decoder(self.quantizer.lookup(indices))  # (B, C, H, W)

    @torch.no_grad()
    def empty_code(self) -> int:
        """The code of an empty cell: the commonest code of an all-black frame."""
        size = self.config.resolution
        blank = torch.zeros(1, self.config.in_channels, size, size, device=self.quantizer.codebook.device)
        empty = self.encode(blank)  # (1, h, w)
        return int(empty.flatten().mode().values)

    @torch.no_grad()
    def blank_codes(self, threshold: float = 0.25) -> torch.Tensor:
        """(K,) bool: codes whose own cell draws no pixel brighter than `threshold` (empty cells),
        and always the code of an empty cell itself (`empty_code`): a briefly trained tokenizer may
        decode it with a faint grey (0.25 on `make demo`'s, whose all-empty frames then slipped past
        the threshold and were kept as first frames)."""
        blank = self.code_patches().amax(1) < threshold
        blank[self.empty_code()] = True
        return blank

    @torch.no_grad()
    def code_patches(self) -> torch.Tensor:
        """What each code looks like: code k decoded alone in the middle of an empty frame, cropped to
        its own f × f cell. Returns (K, f·f) pixels; NÜWA's pixel code embeddings read them."""
        if self.config.in_channels != 1:
            raise ValueError("code_patches is defined for frame tokenizers (one grey channel), "
                             "not VQ-GAN-Seg")
        f, (h, w) = self.config.downsample, self.config.token_shape
        device = self.quantizer.codebook.device
        grids = torch.full((self.codebook_size, h, w), self.empty_code(), dtype=torch.long, device=device)
        grids[:, h // 2, w // 2] = torch.arange(self.codebook_size, device=device)  # code k at the centre
        cells = []
        for chunk in grids.split(64):
            frames = self.decode(chunk).clamp(0, 1)  # (k, 1, H, W)
            cells.append(frames[:, 0, (h // 2) * f:(h // 2 + 1) * f, (w // 2) * f:(w // 2 + 1) * f])
        return torch.cat(cells).flatten(1)  # (K, f·f)

    def forward(self, x: torch.Tensor, *, step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x (B, C, H, W) → (x̂ (B, C, H, W), losses). `losses["loss"]` is the tokenizer's objective;
        the GAN term joins from `step >= disc_start` in training mode. Also reports codebook usage,
        perplexity and λ."""
        self.check_input(x)
        z_q, _, losses = self.quantizer(self.encoder(x))  # (B, d_B, h, w)
        x_rec = self.decoder(z_q)  # (B, C, H, W)
        losses["rec_loss"] = self.reconstruction_loss(x_rec, x)
        losses["perceptual_loss"] = self.perceptual_loss(x_rec, x)
        rec_total = losses["rec_loss"] + self.config.perceptual_weight * losses["perceptual_loss"]  # L_rec
        losses["gan_loss"] = torch.zeros((), device=x.device)
        losses["adaptive_weight"] = torch.zeros((), device=x.device)
        gan_on = self.discriminator is not None and self.training and step >= self.config.disc_start
        if gan_on and torch.is_grad_enabled():
            losses["gan_loss"] = -self.discriminator(self.as_image(x_rec)).mean()  # hinge generator loss
            losses["adaptive_weight"] = adaptive_weight(rec_total, losses["gan_loss"],
                                                        self.decoder.conv_out.weight)
        losses["loss"] = (rec_total + losses["codebook_loss"] + losses["commitment_loss"]
                          + self.config.disc_weight * losses["adaptive_weight"] * losses["gan_loss"])
        return x_rec, losses

    # --- loss terms --------------------------------------------------------------------------

    def reconstruction_loss(self, x_rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """rec_loss: mean |x − x̂| (VQGAN), or cross-entropy of the logits x̂ against the one-hot x."""
        if self.config.rec_loss == "ce":
            return F.cross_entropy(x_rec.float(), x.argmax(1))
        return (x_rec.float() - x.float()).abs().mean()

    def perceptual_loss(self, x_rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # DEVIATION (VQGAN §3.2): LPIPS needs pretrained VGG weights, unavailable offline; off by default.
        if self.config.perceptual_weight == 0:
            return torch.zeros((), device=x.device)
        if self.perceptual is None:
            raise RuntimeError("perceptual_weight > 0 but no perceptual network is set: assign "
                               "model.perceptual = a module (x_rec, x) -> scalar, or use "
                               "--perceptual_weight 0")
        return self.perceptual(self.as_image(x_rec), x)

    def as_image(self, x_rec: torch.Tensor) -> torch.Tensor:
        """What D sees of a reconstruction: the frame itself, or class probabilities for sketches."""
        return x_rec.softmax(1) if self.config.rec_loss == "ce" else x_rec

    def discriminator_loss(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        """disc_loss, hinge (VQGAN): mean relu(1 − D(x)) + mean relu(1 + D(x̂)), halved. Trains D only."""
        real = self.discriminator(x)  # (B, 1, H', W')
        fake = self.discriminator(self.as_image(x_rec).detach())  # (B, 1, H', W')
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())

    def tokenizer_parameters(self) -> list[nn.Parameter]:
        """Parameters of E, B (when gradient-trained) and G: what the tokenizer's optimizer steps."""
        modules = [self.encoder, self.quantizer, self.decoder]
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    # --- videos and sketches: time folded into the batch (NÜWA tokenizes frame by frame) ------

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) → tokens (B, T, h, w)."""
        B, T = video.shape[:2]
        indices = self.encode(video.reshape(B * T, *video.shape[2:]))  # (B·T, h, w)
        return indices.view(B, T, *indices.shape[1:])  # (B, T, h, w)

    def decode_video(self, indices: torch.Tensor) -> torch.Tensor:
        """Tokens (B, T, h, w) → frames (B, T, C, H, W) (class logits for VQ-GAN-Seg)."""
        B, T = indices.shape[:2]
        frames = self.decode(indices.reshape(B * T, *indices.shape[2:]))  # (B·T, C, H, W)
        return frames.view(B, T, *frames.shape[1:])  # (B, T, C, H, W)

    def encode_sketch(self, sketch: torch.Tensor) -> torch.Tensor:
        """Class maps int64 (B, T, H, W) → VQ-GAN-Seg tokens (B, T, h, w)."""
        return self.encode_video(sketch_to_onehot(sketch, self.config.in_channels))

    def decode_sketch(self, indices: torch.Tensor) -> torch.Tensor:
        """VQ-GAN-Seg tokens (B, T, h, w) → class maps int64 (B, T, H, W) (argmax of the logits)."""
        return self.decode_video(indices).argmax(2)  # (B, T, H, W)


def sketch_to_onehot(sketch: torch.Tensor, num_classes: int = NUM_SKETCH_CLASSES) -> torch.Tensor:
    """Class map int64 (..., H, W) → float one-hot (..., num_classes, H, W), VQ-GAN-Seg's input."""
    onehot = F.one_hot(sketch, num_classes).float()  # (..., H, W, classes)
    return onehot.movedim(-1, -3)  # (..., classes, H, W)


# ---------------------------------------------------------------------------------------------
# 5. Pictures: held-out clips next to their reconstructions decode(encode(x))
# ---------------------------------------------------------------------------------------------

GRID_CLIPS, GRID_FRAMES = 4, 10  # 4 fixed held-out clips, 10 frames each (chosen here: one screen)


@torch.no_grad()
def reconstruction_grid(model: VQGAN, path) -> Path:
    """PNG: rows alternate a fixed Moving MNIST test clip and its reconstruction decode(encode(x))."""
    clips = data.MovingMNIST("test", num_frames=GRID_FRAMES, num_digits=2, length=GRID_CLIPS)
    video = torch.stack([clips[i]["video"] for i in range(GRID_CLIPS)])  # (4, T, 1, 64, 64)
    device = next(model.parameters()).device
    with runtime.evaluating(model):
        tokens = model.encode_video(video.to(device))  # (4, T, h, w)
        rec = model.decode_video(tokens).float().clamp(0, 1).cpu()  # (4, T, 1, 64, 64)
    rows = [clip for pair in zip(video, rec) for clip in pair]
    captions = [t for _ in range(GRID_CLIPS) for t in ("input", "reconstruction")]
    return data.save_grid(rows, path, captions=captions)


@torch.no_grad()
def sketch_reconstruction_grid(model: VQGAN, path) -> Path:
    """PNG: rows alternate held-out sketch maps and their VQ-GAN-Seg reconstructions (class / 10 as grey)."""
    clips = data.CaptionedMovingMNIST("heldout", num_frames=GRID_FRAMES, num_digits=2, length=GRID_CLIPS)
    sketch = torch.stack([clips[i]["sketch"] for i in range(GRID_CLIPS)])  # (4, T, 64, 64)
    device = next(model.parameters()).device
    with runtime.evaluating(model):
        rec = model.decode_sketch(model.encode_sketch(sketch.to(device))).cpu()  # (4, T, 64, 64)
    scale = float(NUM_SKETCH_CLASSES - 1)  # class c drawn as grey level c / 10
    rows = [clip.float() / scale for pair in zip(sketch, rec) for clip in pair]
    captions = [t for _ in range(GRID_CLIPS) for t in ("sketch", "reconstruction")]
    return data.save_grid(rows, path, captions=captions)


# ---------------------------------------------------------------------------------------------
# 6. Loading a trained tokenizer (train.py writes it; checkpoints.py reads it)
# ---------------------------------------------------------------------------------------------

STAGES = ("vqgan", "seg")  # the train.py stages whose checkpoints hold a VQGAN
# The config fields that decide which weights a VQGAN has (named when a checkpoint does not fit).
SHAPE_FIELDS = ("in_channels", "ch", "ch_mult", "num_res_blocks", "mid_attention", "cell_encoder",
                "codebook_size", "embed_dim", "disc_ch", "disc_layers")


def load_vqgan(path, *, config: VQGANConfig | None = None, map_location="cpu") -> VQGAN:
    """The tokenizer stored at `path` (train.py --stage vqgan or seg), ready in eval mode.

    A missing or corrupt file, or a checkpoint of another stage, is an error that says how to train
    one. With `config`, a checkpoint trained with any other configuration is rejected, naming the fields.
    """
    checkpoint = checkpoints.read(path, stage=STAGES, map_location=map_location,
                                  fix="train one with `python train.py --stage vqgan` (or `--stage seg`)")
    model = VQGAN(checkpoints.config_from(VQGANConfig, checkpoint["config"], path))
    if config is not None:
        # Fields added after the file was written compare with the defaults config_from gave them.
        checkpoints.check_config(path, checkpoint, config, defaults=checkpoints.config_to_dict(model.config))
    checkpoints.load_weights(model, checkpoint["model"], path, shape_fields=SHAPE_FIELDS)
    return model.to(map_location).eval()
