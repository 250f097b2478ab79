"""3D Nearby Attention (3DNA) — NÜWA §3.2 (Wu et al., arXiv 2111.12417).

Every modality in NÜWA is a 3D grid of tokens (T frames × H rows × W columns). Full attention over a
video costs O(N²) in N = T·H·W tokens; 3DNA lets each query see only a small space-time box around
it (or around its projection onto another grid), so the cost is O(N · box) — linear in N. The paper
applies the same idea to self-attention (encoder and causal decoder) and to cross-attention from
the decoder into the encoder output.

The neighbourhood (NÜWA §3.2). A query at (i, j, k) on the target grid of shape (T, H, W) attends
to a condition grid C of shape (T', H', W'). Project the query onto C,

    (i', j', k') = (⌊i·T'/T⌋, ⌊j·H'/H⌋, ⌊k·W'/W⌋),

and keep every condition position (a, b, c) with |a − i'| ≤ e_t, |b − j'| ≤ e_h, |c − k'| ≤ e_w:

    N(i, j, k) = { C_abc : |a − i'| ≤ e_t, |b − j'| ≤ e_h, |c − k'| ≤ e_w }
    y_ijk      = softmax(q_ijk · K_N^T / √hs) · V_N          (K_N, V_N: keys/values of N(i, j, k))

The extents are radii (a window of 2e + 1 per axis) and windows are clipped at the border.
Causal self-attention (the decoder) intersects the window with "strictly earlier in raster order,
or itself"; the decoder input is [bos, y_0, …, y_{N−2}] (see `nearby_mask`).

Sections, in reading order:
1. Geometry and the rule: `project`, `nearby_rule`, `nearby_mask` (the single source of truth).
2. `nearby_attention_reference`: loops over every query and its neighbourhood (the spec).
3. Dense backend: one fused attention call with the (N, N) boolean mask. O(N²).
4. Blocked backend: query tiles attend to their tile plus a halo of the extents. O(N).
5. Flex backend: FlexAttention with a block-sparse mask, tokens ordered tile by tile (CUDA).
6. `nearby_attention`: input checks and the choice of backend.
7. `NearbyAttention`: the nn.Module (projections, heads, self or cross) and its decode step over a
   rolling KV cache of the last e_t + 1 frames.

Glossary: B batch, nh heads, hs head size, D = nh·hs width, (T, H, W) query grid, (T', H', W')
key/value (condition) grid, N = T·H·W and Nq / Nk query / key counts, (e_t, e_h, e_w) extents,
p a query's raster index, r a key's index, s the grid position of the token a key holds
(s = r without bos, s = r − 1 with bos), Q / L queries per tile / keys per tile (blocked).

Deviations from the paper (and choices the paper leaves open):
- The paper does not say how causality meets the 3D window. We use raster order: a query sees the
  whole window in earlier frames (right and lower neighbours included) and the raster-earlier part
  of its own frame. (The only public re-implementation sees just an above-left corner box.)
- The decoder input is shifted by a learned bos; the query at input position p predicts y_p and
  uses y_p's window (not the window of the token y_{p−1} it reads). The paper does not spell this out.
- DEVIATION (NÜWA §3.2): the paper has no generation cache. We add a per-layer KV cache that keeps
  bos and the last e_t + 1 frames only (rolling), so decoding memory does not grow with T.
- The blocked and flex backends are engineering, not approximations: they compute the same
  function as the reference (tested in float64).
- Projections have no biases, as in the paper's Q = X·W^Q, K = C·W^K, V = C·W^V.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

Shape3 = tuple[int, int, int]

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

BACKENDS = ("reference", "dense", "blocked", "flex")
# Query tile of the blocked backend, (t, h, w). Chosen with benchmarks/bench_3dna.py on 2 CPU cores
# at (10, 32, 32), extent (2, 2, 2): two frames of 8×8 queries (128) balance the halo overhead
# (keys per query grow as tiles shrink) against the cost per key (which grows as tiles grow).
BLOCKED_TILE: Shape3 = (2, 8, 8)
# FlexAttention skips work in blocks of 128×128 (its default BLOCK_SIZE). A 2×8×8 space-time tile
# is exactly 128 tokens, so one compact tile fills one block when tokens are listed tile by tile.
FLEX_TILE: Shape3 = (2, 8, 8)
# Queries per chunk of tiles in the blocked backend, per device type. A chunk's gathered boxes and
# their gradients are its working memory. On 2 CPU cores, 256 (two 2×8×8 tiles) ran as fast as
# larger chunks with a fraction of the memory; a GPU wants large launches instead. Chosen here.
BLOCKED_CHUNK_QUERIES = {"cpu": 256, "cuda": 16384}
# How many distinct (shapes, extent, ...) masks and plans to keep; a model has only a few.
PLAN_CACHE_SIZE = 64


# ---------------------------------------------------------------------------------------------
# 1. Geometry and the rule
# ---------------------------------------------------------------------------------------------

def _as_shape(name: str, values, minimum: int) -> Shape3:
    """Validate a (t, h, w) triple of ints >= minimum (grid sizes >= 1, extents >= 0)."""
    values = tuple(int(v) for v in values)
    if len(values) != 3 or any(v < minimum for v in values):
        what = "radii, each >= 0" if minimum == 0 else "sizes, each >= 1"
        raise ValueError(f"{name} must be three {what} (t, h, w); got {values}")
    return values


def _check_geometry(q_shape, kv_shape, extent, causal: bool, bos: bool) -> tuple[Shape3, Shape3, Shape3]:
    """The argument checks shared by every entry point; returns normalised int tuples."""
    q_shape, kv_shape = _as_shape("q_shape", q_shape, 1), _as_shape("kv_shape", kv_shape, 1)
    extent = _as_shape("extent", extent, 0)
    if causal and q_shape != kv_shape:
        raise ValueError(f"causal attention is self-attention on one grid, but q_shape={q_shape} and "
                         f"kv_shape={kv_shape} differ: cross-attention is never causal (pass causal=False)")
    if bos and not causal:
        raise ValueError("bos=True describes the decoder's shifted input [bos, y_0, ..., y_(N-2)] in causal "
                         "self-attention; pass causal=True (cross-attention ignores bos)")
    return q_shape, kv_shape, extent


def raster_to_coords(index, shape: Shape3):
    """(t, h, w) of a raster index (int or int tensor): frame-major, then row, then column."""
    _, H, W = shape
    return index // (H * W), (index // W) % H, index % W


def project(index, size: int, kv_size: int):
    """The paper's coordinate projection on one axis: i' = ⌊i · S' / S⌋ (int or int tensor, exact floor)."""
    return index * kv_size // size


def window_1d(q_coord: Tensor, kv_coord: Tensor, size: int, kv_size: int, radius: int) -> Tensor:
    """One axis of the neighbourhood: |a - i'| <= e with i' = ⌊i·S'/S⌋ (broadcasting int tensors)."""
    return (kv_coord - project(q_coord, size, kv_size)).abs() <= radius


def raster_causal(q_index: Tensor, kv_index: Tensor, bos: bool) -> Tensor:
    """Raster-order causality on one grid (s: the grid position of the token a key holds).

    Without bos the query sees tokens up to itself (s <= p). With bos, key r holds y_{r-1} and is
    allowed iff r <= p, i.e. s = r - 1 < p: strictly earlier tokens.
    """
    return kv_index < q_index if bos else kv_index <= q_index


def nearby_rule(q_index: Tensor, kv_index: Tensor, q_shape: Shape3, kv_shape: Shape3, extent: Shape3,
                causal: bool, bos: bool = False) -> Tensor:
    """May the query at raster index q_index attend to the grid position kv_index? (NÜWA §3.2)

    Both are integer tensors that broadcast against each other; the result has their broadcast shape.
    kv_index is the grid position s of the token a key holds: with bos, key r >= 1 holds y_{r-1}, so
    callers pass s = r - 1 (bos itself, key 0, is always allowed and is handled by the caller).
    The blocked, flex and decode paths build their masks from this function, and `nearby_mask`
    from the same two pieces (`window_1d`, `raster_causal`), so they cannot disagree on the rule.
    """
    query = raster_to_coords(q_index, q_shape)  # the query's (i, j, k) on the target grid
    key = raster_to_coords(kv_index, kv_shape)  # the candidate's (a, b, c) on the condition grid
    allowed = functools.reduce(torch.logical_and, (
        window_1d(i, a, n, m, e) for i, a, n, m, e in zip(query, key, q_shape, kv_shape, extent)))
    return allowed & raster_causal(q_index, kv_index, bos) if causal else allowed


def nearby_mask(q_shape, kv_shape, extent, causal: bool, bos: bool = False, *,
                device: torch.device | str | None = None) -> Tensor:
    """The 3DNA attention mask, True = may attend: BoolTensor (Nq, Nk). The single source of truth.

    Without bos, query p and key r are raster positions on their grids. With bos (causal decoder
    self-attention only) the keys are the decoder input [bos, y_0, ..., y_{N-2}]: the query at p
    predicts y_p and uses y_p's window; key r >= 1 (holding y_{r-1}) is allowed iff r <= p and
    y_{r-1} lies in y_p's window; key 0 (bos) is always allowed, so no row is empty.
    """
    q_shape, kv_shape, extent = _check_geometry(q_shape, kv_shape, extent, causal, bos)
    n_q, n_k = math.prod(q_shape), math.prod(kv_shape)
    # The window factorises over the axes: one small (S, S') table per axis, combined by broadcasting
    # straight into booleans (no N² integer temporaries).
    near_t, near_h, near_w = (window_1d(torch.arange(n, device=device)[:, None], torch.arange(m, device=device)[None, :],
                                        n, m, e) for n, m, e in zip(q_shape, kv_shape, extent))  # (S, S') each
    mask = (near_t[:, None, None, :, None, None] & near_h[None, :, None, None, :, None]
            & near_w[None, None, :, None, None, :])  # (T, H, W, T', H', W')
    mask = mask.reshape(n_q, n_k)  # (Nq, Nk) over grid positions s
    if causal:
        mask &= raster_causal(torch.arange(n_q, device=device)[:, None], torch.arange(n_k, device=device)[None, :], bos)
    if bos:
        # Key r holds y_{r-1}: column r is position s = r - 1; key 0 is bos, readable by every query.
        mask = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1)  # (N, N) over keys r
    return mask


# ---------------------------------------------------------------------------------------------
# 2. The reference: loops over every query and its neighbourhood
# ---------------------------------------------------------------------------------------------

def nearby_attention_reference(q: Tensor, k: Tensor, v: Tensor, q_shape, kv_shape, extent, causal: bool,
                               bos: bool = False) -> Tensor:
    """y_ijk = softmax(q_ijk · K_N^T / √hs) · V_N, one query at a time. The spec, not for speed.

    Written from the paper's set definition with plain Python loops; it does not use `nearby_mask`,
    so the tests compare two independent readings of the rule. q (B, nh, Nq, hs), k/v (B, nh, Nk, hs).
    """
    q_shape, kv_shape, extent = _check_geometry(q_shape, kv_shape, extent, causal, bos)
    _check_qkv(q, k, v, q_shape, kv_shape)
    (T, H, W), (T2, H2, W2), (e_t, e_h, e_w) = q_shape, kv_shape, extent
    scale = 1.0 / math.sqrt(q.shape[-1])  # the 1/√d of scaled dot-product attention
    rows = []
    for p in range(T * H * W):
        i, j, k_ = p // (H * W), (p // W) % H, p % W  # the query's (i, j, k): y_p's position
        i2, j2, k2 = i * T2 // T, j * H2 // H, k_ * W2 // W  # its projection (i', j', k')
        keys = [0] if bos else []  # key indices r this query may read; bos is always one
        for a in range(max(0, i2 - e_t), min(T2, i2 + e_t + 1)):  # |a - i'| <= e_t, clipped
            for b in range(max(0, j2 - e_h), min(H2, j2 + e_h + 1)):  # |b - j'| <= e_h
                for c in range(max(0, k2 - e_w), min(W2, k2 + e_w + 1)):  # |c - k'| <= e_w
                    s = (a * H2 + b) * W2 + c  # raster index of the neighbour C_abc
                    r = s + 1 if bos else s  # the key that holds it (shifted by one after bos)
                    if not causal or r <= p:  # causal: only keys up to the query's own input
                        keys.append(r)
        index = torch.tensor(keys, device=q.device)
        scores = q[:, :, p:p + 1] @ k[:, :, index].transpose(-1, -2) * scale  # (B, nh, 1, L)
        rows.append(scores.softmax(dim=-1) @ v[:, :, index])  # (B, nh, 1, hs)
    return torch.cat(rows, dim=2)  # (B, nh, Nq, hs)


# ---------------------------------------------------------------------------------------------
# 3. Dense backend: the whole (Nq, Nk) mask through one fused attention call
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _cached_mask(q_shape: Shape3, kv_shape: Shape3, extent: Shape3, causal: bool, bos: bool,
                 device: torch.device) -> Tensor:
    """nearby_mask, built once per geometry and device (training calls it every step)."""
    return nearby_mask(q_shape, kv_shape, extent, causal, bos, device=device)


def _dense_attention(q, k, v, q_shape, kv_shape, extent, causal, bos) -> Tensor:
    """O(Nq·Nk) time and mask memory: simple and obviously right, the baseline to beat."""
    mask = _cached_mask(q_shape, kv_shape, extent, causal, bos, q.device)  # (Nq, Nk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, Nq, hs)


# ---------------------------------------------------------------------------------------------
# 6. The entry point
# ---------------------------------------------------------------------------------------------

def _check_qkv(q: Tensor, k: Tensor, v: Tensor, q_shape: Shape3, kv_shape: Shape3) -> None:
    """Clear errors for tensors that do not match the grids they claim to hold."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, nh, N, hs); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] != math.prod(q_shape):
        raise ValueError(f"q holds N={q.shape[2]} tokens but q_shape={q_shape} has {math.prod(q_shape)}")
    if k.shape[2] != math.prod(kv_shape) or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k/v hold {k.shape[2]}/{v.shape[2]} tokens but kv_shape={kv_shape} has "
                         f"{math.prod(kv_shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, heads or head size")


def nearby_attention(q: Tensor, k: Tensor, v: Tensor, q_shape, kv_shape, extent, causal: bool,
                     bos: bool = False, backend: str = "dense") -> Tensor:
    """3DNA: q (B, nh, Nq, hs) attends to k, v (B, nh, Nk, hs) within `nearby_mask`; -> (B, nh, Nq, hs).

    backend: "reference" (loops) or "dense" (O(N²) mask).
    """
    q_shape, kv_shape, extent = _check_geometry(q_shape, kv_shape, extent, causal, bos)
    _check_qkv(q, k, v, q_shape, kv_shape)
    if backend == "reference":
        return nearby_attention_reference(q, k, v, q_shape, kv_shape, extent, causal, bos)
    if backend == "dense":
        return _dense_attention(q, k, v, q_shape, kv_shape, extent, causal, bos)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
