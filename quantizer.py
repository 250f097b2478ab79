"""Vector quantization: the codebook that turns an encoder's vectors into tokens (NÜWA §3.1).

Papers: VQ-VAE (van den Oord et al., arXiv 1711.00937) §3.1-3.2 and its EMA codebook (appendix A.1;
Razavi et al., arXiv 1906.00446), as VQ-GAN (Esser et al., arXiv 2012.09841) §3.1 and NÜWA
(Wu et al., arXiv 2111.12417) §3.1 use it.

Summary. A codebook B (K, d_B): each encoder vector E(x)_i becomes the index of its nearest code,

    z_i = argmin_j ||E(x)_i − B_j||²                                   (VQ-VAE eq. 1-2)

and the decoder reads B[z], with the straight-through estimator carrying the decoder's gradient
back to the encoder unchanged. The two codebook-side loss terms of VQ-VAE eq. 3:
codebook_loss ||sg[E(x)] − B[z]||² (reported only when the codes follow the EMA below) and
commitment_loss β·||E(x) − sg[B[z]]||². vqgan.VQGAN owns one of these; dfvqgan.DFVQGAN shares it.

Glossary: K codebook size, d_B code dimension, M vectors quantized in a batch (B·h·w), z_i a token,
sg[·] stop-gradient, β commitment weight, γ EMA decay, N_k the EMA count and m_k the EMA sum of code k.

Deviations from the papers (on by default; `ema=False` in the VQGANConfig trains B by gradient as
the papers do). At small scale a gradient-trained codebook collapses to a handful of codes, so:
- EMA updates of the codes (VQ-VAE appendix A.1, which VQ-GAN does not use);
- data-dependent initialisation: the first training batch's distinct encoder outputs become the codes;
- dead-code restart: a code chosen less than `dead_code_threshold` times (EMA count) is moved onto a
  random distinct encoder output of the batch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:  # the config is vqgan.py's; imported for the annotation only (vqgan imports us)
    from vqgan import VQGANConfig


class VectorQuantizer(nn.Module):
    """The codebook B (K, d_B) with nearest-code lookup and the two codebook-side loss terms.

    Robustness (all on by default, see the module docstring's deviations):
    - EMA updates (VQ-VAE appendix A.1): N_k ← γ N_k + (1 − γ) n_k, m_k ← γ m_k + (1 − γ) Σ_{z_i = k} E(x)_i,
      B_k = m_k / N̂_k with Laplace-smoothed counts N̂_k = (N_k + ε) / (Σ N + K ε) · Σ N.
    - data-dependent initialisation: the first training batch's encoder outputs become the codes.
    - dead-code restart: a code whose usage N_k fell below `dead_code_threshold` tokens per batch is
      moved onto a random distinct encoder output of the current batch, and starts again as if used once
      per batch; unused, it is moved again about ln(1 / threshold) / (1 − γ) steps later (~350 at 0.03).
      The first codes (data-dependent initialisation) start at the threshold instead: unused, at once.
    All of this runs in float32 and only in training mode; eval mode is a pure lookup.
    """

    # DEVIATION (VQGAN §3, VQ-VAE §3.2): the papers train B by the gradient of codebook_loss with none of
    # the three aids above; at small scale that collapses to a few codes. ema=False restores it.

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        K, d = config.codebook_size, config.embed_dim
        # With EMA the codes are state, not trained parameters: requires_grad=False keeps them out
        # of the optimizer and makes codebook_loss a reported number without a gradient path.
        self.codebook = nn.Parameter(torch.randn(K, d) / math.sqrt(d), requires_grad=not config.ema)
        self.register_buffer("cluster_size", torch.zeros(K))  # N_k: EMA of tokens per batch per code
        self.register_buffer("embed_sum", torch.zeros(K, d))  # m_k: EMA of the summed E(x) per code
        self.register_buffer("initialized", torch.tensor(False))  # data-dependent init done?

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z_i = argmin_j ||z_i − B_j||² = argmin_j (||B_j||² − 2 z_i·B_j); z (M, d_B) → (M,)."""
        codebook = self.codebook.float()  # (K, d_B)
        distances = (codebook * codebook).sum(1) - 2 * z @ codebook.t()  # (M, K); ||z_i||² is constant in j
        return distances.argmin(1)  # (M,)

    def forward(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """E(x) (B, d_B, h, w) → (B[z] with a straight-through gradient (B, d_B, h, w), z (B, h, w),
        losses)."""
        B, d, h, w = z_e.shape
        with torch.autocast(z_e.device.type, enabled=False):  # distances and EMA in float32
            z = z_e.float().permute(0, 2, 3, 1).reshape(B * h * w, d)  # (M, d_B)
            if self.training and self.config.data_init and not bool(self.initialized):
                self.initialise(z.detach())
            indices = self.nearest(z.detach())  # (M,)
            z_q = self.codebook[indices].float()  # (M, d_B): B[z]
            losses = {
                # ||sg[E(x)] − B[z]||²: gradient only to the codes (none at all with EMA).
                "codebook_loss": F.mse_loss(z_q, z.detach()),
                # β·||E(x) − sg[B[z]]||²: gradient only to the encoder.
                "commitment_loss": self.config.beta * F.mse_loss(z, z_q.detach()),
            }
            losses.update(self.statistics(indices))
            if self.training:
                self.update(z.detach(), indices)
            # Straight-through estimator (VQ-VAE eq. 2 discussion): the value is exactly B[z]
            # (z − sg[z] is exactly 0), the gradient w.r.t. E(x) is the identity, and the decoder's
            # loss sends no gradient to the codes. Exactness makes decode(encode(x)) bit-equal.
            z_q_st = z_q.detach() + (z - z.detach())  # (M, d_B)
        z_q_st = z_q_st.view(B, h, w, d).permute(0, 3, 1, 2)  # (B, d_B, h, w)
        return z_q_st, indices.view(B, h, w), losses

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """z (B, h, w) → B[z] (B, d_B, h, w): the same values the forward pass hands the decoder."""
        if indices.dtype != torch.long or indices.min() < 0 or indices.max() >= self.config.codebook_size:
            raise ValueError(f"token indices must be int64 in [0, {self.config.codebook_size}), got "
                             f"{indices.dtype} in [{int(indices.min())}, {int(indices.max())}]")
        z_q = self.codebook[indices].float()  # (B, h, w, d_B)
        return z_q.permute(0, 3, 1, 2)  # (B, d_B, h, w)

    def statistics(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Codebook health of this batch: usage (fraction of codes used) and perplexity exp(H(p))."""
        counts = torch.bincount(indices, minlength=self.config.codebook_size).float()  # (K,)
        p = counts / counts.sum()  # (K,)
        entropy = -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum()
        return {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}

    @torch.no_grad()
    def initialise(self, z: torch.Tensor) -> None:
        """Data-dependent init: K random distinct encoder outputs become the codes (each one, then
        repeats, if fewer)."""
        K = self.config.codebook_size
        z = distinct(z)
        picks = torch.randperm(len(z), device=z.device)[:K] if len(z) >= K else torch.cat([  # (K,)
            torch.arange(len(z), device=z.device), torch.randint(len(z), (K - len(z),), device=z.device)])
        self.codebook.data.copy_(z[picks])
        # The first codes start at the threshold: placed before the encoder has learnt anything, the ones no
        # encoder output chooses next step are moved at once (a short run collapses onto a few codes
        # otherwise). Codes restarted later start higher (restart_dead_codes). Without restarts: at 1.
        self.cluster_size.fill_(self.config.dead_code_threshold or 1.0)
        self.embed_sum.copy_(self.codebook.data * self.cluster_size[:, None])
        self.initialized.fill_(True)

    @torch.no_grad()
    def update(self, z: torch.Tensor, indices: torch.Tensor) -> None:
        """One training step of codebook bookkeeping: usage EMA, EMA codes, dead-code restart."""
        cfg, K = self.config, self.config.codebook_size
        counts = torch.bincount(indices, minlength=K).float()  # n_k (K,)
        # N_k (K,): the usage EMA, kept in both modes
        self.cluster_size.mul_(cfg.ema_decay).add_(counts, alpha=1 - cfg.ema_decay)
        if cfg.ema:
            sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, z)  # Σ_{z_i = k} E(x)_i (K, d_B)
            self.embed_sum.mul_(cfg.ema_decay).add_(sums, alpha=1 - cfg.ema_decay)  # m_k
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + cfg.ema_eps) / (total + K * cfg.ema_eps) * total  # N̂_k (K,)
            self.codebook.data.copy_(self.embed_sum / smoothed[:, None])  # B_k = m_k / N̂_k
        if cfg.dead_code_threshold > 0:
            self.restart_dead_codes(z)

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor) -> None:
        """Move every code used less than the threshold onto a random encoder output of this batch."""
        dead = self.cluster_size < self.config.dead_code_threshold  # (K,)
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        z = distinct(z)
        picks = torch.randint(len(z), (n_dead,), device=z.device)  # (n_dead,)
        self.codebook.data[dead] = z[picks]
        # A restarted code starts as if used once per batch (or at the threshold, if that is higher).
        # Unused from then on, it lives ln(start / threshold) / (1 − γ) steps before it is moved again
        # (at a threshold of 1 that would be one step: only codes used in nearly every batch would stay).
        start = max(self.config.dead_code_threshold, 1.0)
        self.cluster_size[dead] = start
        self.embed_sum[dead] = z[picks] * start


def distinct(z: torch.Tensor) -> torch.Tensor:
    """The distinct rows of z (M, d_B). A cell encoder maps every empty cell to the very same vector;
    drawn from all M rows, most new codes would land on that one vector, tie with each other and die."""
    return torch.unique(z, dim=0)
