"""DF-VQGAN: the defect-free VQGAN of NÜWA-LIP, a tokenizer of frames with missing pixels.

Paper: Ni et al., "NÜWA-LIP: Language Guided Image Inpainting with Defect-free VQGAN",
arXiv 2202.05009 (CVPR 2023). Section implemented: §3.1 DF-VQGAN (relative estimation and
symmetrical connections). MP-S2S, which predicts the missing tokens, and inpainting are in lip.py.

In plain words. Inpainting is given a frame x whose pixels under a mask m are missing. Encoding a
masked frame with a plain VQGAN goes wrong twice: hole pixels leak into the tokens of the visible
area through the receptive field of every convolution and through attention ("receptive
spreading"), and quantisation distorts the visible area ("information loss"). DF-VQGAN fixes both
with the modules (and parameter names) of vqgan.VQGAN, run in other forward passes:
- relative estimation: every layer of the encoder computes a visible feature from visible inputs
  only, so a visible token is the same whatever the hole contains (tested bit for bit);
- symmetrical connections: the decoder takes the encoder's visible features back at every mirrored
  stage, so visible detail goes around the quantiser.

The defect rule, per layer. A feature at resolution r is *defective* iff any pixel of its
(64/r)×(64/r) block is missing: the pixel mask max-pooled to r. Stride-1 layers keep the mask; a
stride-2 convolution max-pools it by 2 (the same thing, composed). The token grid is the last
resolution, so a *hole token* is a token whose feature is defective. A visible output must not
depend on any hole pixel; the 3×3 receptive field of a visible output near the hole does cover
defective inputs, so instead of growing the mask by the receptive field (which would make a 16×16
grid entirely defective after a few layers and global attention), every spatial mixing reads
visible positions only. Position-wise layers (1×1 convs, swish, residual sums, the quantiser) mix
nothing. By induction over the layers, every visible feature is a function of visible pixels
only: exactly, not about.

Equations (plain text; m = 1 at defective positions, ⊙ elementwise):
    masked conv:    y = conv(x ⊙ (1 − m))  at visible outputs,   y = conv(x)  at defective ones
    GroupNorm:      μ_g, σ²_g over the visible entries of group g (visible outputs), over all (defective)
    attention:      softmax(q kᵀ / √C + bias), bias = −∞ where (query visible, key defective), else 0
    connection:     h ← (skip · (1 − m) + h · m + h) / 2   (symmetrical connection, §3.1)
    loss:           rec_loss + codebook_loss + commitment_loss + λ · disc_weight · gan_loss (vqgan.py)

Sections: 1. configuration · 2. relative estimation (mask-aware layers) · 3. DF-VQGAN · 4. loading.

Glossary: B batch, C channels, H W pixels (64), h w token grid, f = H/h downsampling, K codebook
size, d_B code dimension, m mask (True = missing / defective), x̂ reconstruction, z tokens, B[z]
codes, E encoder, G decoder, D discriminator.

Deviations from the paper (each also marked `# DEVIATION` at its line):
- Scale: 64×64 grey frames, f = 4 (16×16 tokens), K = 512, widths 16-64; the paper: 256 px RGB,
  F8 (32×32 tokens), K = 8192.
- GroupNorm at defective positions uses the statistics of the whole map (our reading: "defective
  features come from the full input"); visible positions use visible-only statistics (the paper).
- Training-mask mix and the 50 % skip-less decoding rate are our numbers (the paper trains with a
  mix of no mask, full mask and random boxes, and without skips part of the time, no rates given).
- `init_vqgan` (optional): DF-VQGAN may start from a trained plain VQGAN's weights (the parameter
  names are the same). Our option for short CPU runs.
- `cell_encoder` (a frame tokenizer with f = 8, 8×8 tokens): E reads each token's own cell, so a
  visible token never sees the hole, with nothing to mask; the one symmetrical connection is at the
  token resolution. `freeze_tokens` then keeps E and the codebook of `init_vqgan` and trains G
  alone, so the DF-VQGAN's tokens are exactly the plain VQGAN's (ours).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import quantizer
import vqgan

# ---------------------------------------------------------------------------------------------
# 1. Configuration
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
    # tokenizer that `make models` trains). A visible cell's token then cannot see the hole at all,
    # and the one symmetrical connection is at the token resolution (the only level it has).
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
    # encoder outputs (measured: black 4×4 cells spread over 407 codes, 274 without), which MP-S2S pays for.
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
                          batch_size=64, lr=1e-3, disc_start=5000, disc_ch=64, disc_layers=3,
                          disc_weight=0.2),
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
        self.quantizer = quantizer.VectorQuantizer(base)
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
        modules = (self.encoder, self.quantizer, self.decoder)
        return [p for m in modules for p in m.parameters() if p.requires_grad]

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

    def encode(self, x: torch.Tensor,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
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
# 4. Loading a trained DF-VQGAN (a checkpoint written by train.py --stage dfvqgan)
# ---------------------------------------------------------------------------------------------

# The config fields that decide which weights a DF-VQGAN has (named when a state dict does not fit).
SHAPE_FIELDS = ("ch", "ch_mult", "num_res_blocks", "mid_attention", "cell_encoder", "codebook_size",
                "embed_dim", "disc_weight", "disc_ch", "disc_layers")


def load_dfvqgan(path, *, map_location="cpu") -> DFVQGAN:
    """The DF-VQGAN stored at `path` by `train.py --stage dfvqgan`, in eval mode."""
    checkpoint = checkpoints.read(path, stage="dfvqgan", map_location=map_location,
                                  fix="train one with `python train.py --stage dfvqgan --preset tiny`")
    config = checkpoints.config_from(DFVQGANConfig, checkpoint["config"], path)
    model = checkpoints.load_weights(DFVQGAN(config), checkpoint["model"], path, shape_fields=SHAPE_FIELDS)
    return model.to(map_location).eval()
