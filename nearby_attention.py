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
1. Geometry and the rule: `project`, `nearby_rule`, `nearby_mask` (the single source of truth), and
   `relative_offset`, which entry of a relative position table a (query, key) pair reads.
2. `nearby_attention_reference`: loops over every query and its neighbourhood (the spec).
3. Dense backend: one fused attention call with the (N, N) boolean mask. O(N²).
4. Blocked backend: query tiles attend to their tile plus a halo of the extents. O(N). Training
   keeps small calls' scores for autograd (`_blocked_kept`) and recomputes large ones chunk by chunk.
5. Flex backend: FlexAttention with a block-sparse mask, tokens ordered tile by tile (CUDA).
6. `nearby_attention`: input checks and the choice of backend.
7. `NearbyAttention`: the nn.Module (projections, heads, self or cross, relative tables) and its
   decode step over a rolling KV cache of the last e_t + 1 frames; each step gathers its window
   through a table built once per frame (`_self_step_plan`, `_cross_step_plan`), from the same
   `nearby_rule`.

Glossary: B batch, nh heads, hs head size, D = nh·hs width, (T, H, W) query grid, (T', H', W')
key/value (condition) grid, V = offset_count(extent) entries of a relative table (one per window
offset, plus bos), N = T·H·W and Nq / Nk query / key counts, (e_t, e_h, e_w) extents,
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
- DEVIATION (NÜWA §3.2): optional relative positions inside the window. A table of one score per
  head and 3D offset (a − i', b − j', c − k') of the key from the query's projection, b + q·rᵀ/√hs
  (a learned bias as in Swin / Neighborhood Attention, plus Shaw et al.'s relative keys), is added
  to the scores; `relative_offset` says which entry each pair reads, and every backend, the decode
  step and the reference add the same entries (tested in float64, forward and gradients; flex in
  float32: its CPU forward here, with gradients on CUDA). The
  paper has absolute position embeddings only; without relative ones the tiny models never learn
  to copy from the previous frame (README, learning probes).
- The blocked and flex backends are engineering, not approximations: they compute the same
  function as the reference (tested in float64).
- Projections have no biases, as in the paper's Q = X·W^Q, K = C·W^K, V = C·W^V.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Shape3 = tuple[int, int, int]

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

BACKENDS = ("reference", "dense", "blocked", "flex")
# Query tile of the blocked backend, (t, h, w): one frame of 8×8 queries balances the halo overhead
# (keys per query grow as tiles shrink) against the cost per key (which grows as tiles grow). Measured
# on 2 CPU cores, a causal layer with relative tables, forward + backward, batch 4 × 4 heads, extent
# (2, 2, 2): 1×8×8 beat 2×8×8 at (10, 8, 8) (16 vs 24 ms), (20, 8, 8) (34 vs 39) and (10, 16, 16)
# (145 vs 180): a one-frame tile reads 3 frames of keys, a two-frame tile 4 for twice the queries.
BLOCKED_TILE: Shape3 = (1, 8, 8)
# FlexAttention skips work in blocks of 128×128 (its default BLOCK_SIZE). A 2×8×8 space-time tile
# is exactly 128 tokens, so one compact tile fills one block when tokens are listed tile by tile.
FLEX_TILE: Shape3 = (2, 8, 8)
# Queries per chunk of tiles in the blocked backend, per device type. A chunk's gathered boxes and
# their gradients are its working memory, and each chunk costs a dozen kernel calls. On 2 CPU cores
# (bench_3dna.py) 256 to 2048 ran equally fast on an idle machine; with another process competing
# for the cores, small chunks were up to 3× slower, large ones used more memory. 512 (four 2×8×8
# tiles) kept both within bounds. GPUs want large launches instead. Chosen here, not in the paper.
BLOCKED_CHUNK_QUERIES = {"cpu": 512, "cuda": 16384}
# Backward holds a chunk's tiles, their gradients and the kernel's scratch, about 4× what forward
# holds per query (measured with bench_3dna.py), so forward runs chunks this many times larger.
FORWARD_CHUNKS_PER_BACKWARD = 4
# The blocked backend keeps its tiles' scores for backward when they take at most this many bytes,
# and lets autograd differentiate plain tensor ops (no second forward, no per-chunk kernel calls).
# Larger calls run chunk by chunk and recompute each chunk in backward, so memory stays O(N). At the
# demo's shapes (10 frames of 8×8 tokens, batch 4 × 4 heads: 10 MB of scores per layer), a causal
# layer with a per-query relative table, forward + backward on 2 CPU cores, took 24 ms kept against
# 35 ms recomputed (2×8×8 tiles; README, "Training speed on a CPU"). Chosen here, not in the paper.
BLOCKED_KEEP_BYTES = 64 * 2**20
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


def offset_count(extent: Shape3) -> int:
    """Entries of a relative position table: one per 3D offset of the window, plus one for bos."""
    return math.prod(2 * e + 1 for e in extent) + 1


def relative_offset(q_index: Tensor, kv_index: Tensor, q_shape: Shape3, kv_shape: Shape3, extent: Shape3) -> Tensor:
    """Which entry of a relative position table the pair (query p, key at grid position s) reads.

    The offset is (a − i', b − j', c − k'): the key's (a, b, c) minus the query's projection, each in
    [−e, e] inside the window, flattened as ((Δt + e_t)·(2e_h + 1) + Δh + e_h)·(2e_w + 1) + Δw + e_w.
    Outside the window the offset is clamped (those pairs are masked anyway). bos, which has no
    position, reads the last entry, offset_count(extent) − 1: callers substitute it.
    The dense, blocked, flex and decode paths index their tables with this function, as they build
    their masks from `nearby_rule`; the reference computes the same offsets in its own loops, so the
    tests compare two independent readings.
    """
    query = raster_to_coords(q_index, q_shape)
    key = raster_to_coords(kv_index, kv_shape)
    index = None
    for i, a, n, m, e in zip(query, key, q_shape, kv_shape, extent):
        offset = (a - project(i, n, m)).clamp(-e, e) + e  # in 0 .. 2e
        index = offset if index is None else index * (2 * e + 1) + offset
    return index


def bos_first(offsets: Tensor, extent: Shape3) -> Tensor:
    """Entries (..., L) of keys that hold grid positions, with bos's entry (the last) put in front: (..., 1 + L)."""
    return torch.cat([torch.full_like(offsets[..., :1], offset_count(extent) - 1), offsets], dim=-1)


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
                               bos: bool = False, bias: Tensor | None = None) -> Tensor:
    """y_ijk = softmax(q_ijk · K_N^T / √hs + b_N) · V_N, one query at a time. The spec, not for speed.

    Written from the paper's set definition with plain Python loops; it does not use `nearby_mask`
    or `relative_offset`, so the tests compare two independent readings of the rule. q (B, nh, Nq, hs),
    k/v (B, nh, Nk, hs). bias, optional: a relative position table, one score per 3D offset
    (a − i', b − j', c − k') of the key from the query's projection, the last entry for bos; shaped
    (nh, V) or per query (B, nh, Nq, V), V = offset_count(extent) (DEVIATION from NÜWA §3.2, which has
    absolute positions only; see NearbyAttention).
    """
    q_shape, kv_shape, extent = _check_geometry(q_shape, kv_shape, extent, causal, bos)
    _check_qkv(q, k, v, q_shape, kv_shape)
    bias = bias_table(bias, q, extent)
    (T, H, W), (T2, H2, W2), (e_t, e_h, e_w) = q_shape, kv_shape, extent
    scale = 1.0 / math.sqrt(q.shape[-1])  # the 1/√d of scaled dot-product attention
    rows = []
    for p in range(T * H * W):
        i, j, k_ = p // (H * W), (p // W) % H, p % W  # the query's (i, j, k): y_p's position
        i2, j2, k2 = i * T2 // T, j * H2 // H, k_ * W2 // W  # its projection (i', j', k')
        keys = [0] if bos else []  # key indices r this query may read; bos is always one
        entries = [(2 * e_t + 1) * (2 * e_h + 1) * (2 * e_w + 1)] if bos else []  # bias entry of each key
        for a in range(max(0, i2 - e_t), min(T2, i2 + e_t + 1)):  # |a - i'| <= e_t, clipped
            for b in range(max(0, j2 - e_h), min(H2, j2 + e_h + 1)):  # |b - j'| <= e_h
                for c in range(max(0, k2 - e_w), min(W2, k2 + e_w + 1)):  # |c - k'| <= e_w
                    s = (a * H2 + b) * W2 + c  # raster index of the neighbour C_abc
                    r = s + 1 if bos else s  # the key that holds it (shifted by one after bos)
                    if not causal or r <= p:  # causal: only keys up to the query's own input
                        keys.append(r)
                        # The offset (a − i', b − j', c − k'), each shifted into 0 .. 2e, flattened.
                        entries.append(((a - i2 + e_t) * (2 * e_h + 1) + b - j2 + e_h) * (2 * e_w + 1) + c - k2 + e_w)
        index = torch.tensor(keys, device=q.device)
        scores = q[:, :, p:p + 1] @ k[:, :, index].transpose(-1, -2) * scale  # (B, nh, 1, L)
        if bias is not None:
            scores = scores + bias[:, :, p, torch.tensor(entries, device=q.device)][:, :, None, :]  # + (B, nh, 1, L)
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


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _cached_offsets(q_shape: Shape3, kv_shape: Shape3, extent: Shape3, bos: bool, device: torch.device) -> Tensor:
    """relative_offset of every (query, key) pair, (Nq, Nk) long; with bos, key 0 reads the bos entry."""
    offsets = relative_offset(torch.arange(math.prod(q_shape), device=device)[:, None],
                              torch.arange(math.prod(kv_shape), device=device)[None, :],
                              q_shape, kv_shape, extent)  # (Nq, Nk) over grid positions s
    if bos:  # key r holds y_{r-1}: shift by one column, bos first
        offsets = bos_first(offsets[:, :-1], extent)  # (Nq, Nk) over keys r
    return offsets


def biased_mask(table: Tensor, offsets: Tensor, allowed: Tensor) -> Tensor:
    """The additive attention mask of a relative position table: table[b, h, p, offset of (p, key)]
    where the rule allows the pair, −∞ elsewhere. table (B, nh, Nq, V), offsets (Nq, Nk) long,
    allowed (Nq, Nk) bool (or anything broadcasting to (B, nh, Nq, Nk)) → (B, nh, Nq, Nk)."""
    B, nh, n_q, _ = table.shape
    entries = table.gather(3, offsets.expand(B, nh, n_q, offsets.shape[-1]))  # (B, nh, Nq, Nk)
    return entries.masked_fill(~allowed, -math.inf)


def _dense_attention(q, k, v, q_shape, kv_shape, extent, causal, bos, bias=None) -> Tensor:
    """O(Nq·Nk) time and mask memory: simple and obviously right, the baseline to beat."""
    mask = _cached_mask(q_shape, kv_shape, extent, causal, bos, q.device)  # (Nq, Nk)
    if bias is not None:
        offsets = _cached_offsets(q_shape, kv_shape, extent, bos, q.device)  # (Nq, Nk)
        mask = biased_mask(bias, offsets, mask)  # (B, nh, Nq, Nk) float
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, Nq, hs)


# ---------------------------------------------------------------------------------------------
# 4. Blocked backend: query tiles attend to their tile plus a halo of the extents
# ---------------------------------------------------------------------------------------------
# Cut the query grid into tiles of (t, h, w). Every query of a tile projects into one box of the
# condition grid; widened by the extents, the box holds every key any of them may read. A tile's
# queries and its box are gathered with one index_select each and run through the fused kernel as
# (Q queries × L keys) with a small per-tile mask. Work: N/Q tiles × Q·L = O(N·L), linear in N.
#
# Memory is kept linear and small too: boxes overlap, so gathered keys are a few times larger than
# k itself. Tiles therefore run in chunks, and — FlashAttention's trick one level up — backward
# re-gathers and recomputes each chunk instead of keeping every gathered box alive in between.
# When the scores of all tiles are small (BLOCKED_KEEP_BYTES), training takes the plain route
# instead: every tile at once in ordinary tensor ops that autograd differentiates (`_blocked_kept`).

def _axis_plan(size: int, kv_size: int, tile: int, radius: int, causal: bool) -> tuple[Tensor, Tensor]:
    """One axis: the query slots of every tile, and the kv indices of every tile's box.

    Returns slots (tiles, tile), unclamped (the last tile may reach past the grid), and kv_index
    (tiles, L). Every box has the same length L, so tiles batch together, and never repeats an
    index (a key counted twice would get twice its softmax weight): boxes are shifted to fit inside
    the grid, never padded.
    """
    tiles = -(-size // tile)  # ceil(size / tile)
    slots = torch.arange(tiles * tile).view(tiles, tile)  # (tiles, tile) query slots
    first, last = slots[:, 0], slots[:, -1].clamp(max=size - 1)  # (tiles,) the real queries' range
    low = (project(first, size, kv_size) - radius).clamp(min=0)  # window start of the first query
    # Causal self-attention never reads later frames; the spatial axes keep both sides (earlier
    # frames show right and lower neighbours), so only the time axis is trimmed.
    high = project(last, size, kv_size) + (0 if causal else radius)
    high = high.clamp(max=kv_size - 1)  # window end of the last query
    length = min(int((high - low + 1).max()), kv_size)  # L: the widest box, at most the whole axis
    start = low.clamp(max=kv_size - length)  # shift (not pad) so the box fits in the grid
    kv_index = start[:, None] + torch.arange(length)  # (tiles, L)
    return slots, kv_index


def _combine_axes(index_t: Tensor, index_h: Tensor, index_w: Tensor, shape: Shape3) -> Tensor:
    """Raster indices of the boxes index_t × index_h × index_w of every tile: (n_tiles, box volume)."""
    _, H, W = shape
    n_t, n_h, n_w = index_t.shape[0], index_h.shape[0], index_w.shape[0]
    raster = ((index_t[:, None, None, :, None, None] * H + index_h[None, :, None, None, :, None]) * W
              + index_w[None, None, :, None, None, :])  # (n_t, n_h, n_w, len_t, len_h, len_w)
    return raster.reshape(n_t * n_h * n_w, -1)  # (n_tiles, box volume)


@dataclass(frozen=True)
class _BlockedPlan:
    q_slots: Tensor  # (n_tiles, Q) raster index of every query slot (slots past the edge repeat one)
    real: Tensor  # (n_tiles, Q) True for slots inside the grid (the others are dropped)
    slot_of: Tensor  # (Nq,) where query p sits among the n_tiles·Q flattened slots
    kv_gather: Tensor  # (n_tiles, L') key index r of every key of every tile (bos first, if any)
    mask: Tensor  # (1, n_tiles, Q, L') the per-tile mask, broadcast over B·nh (4D: the fused kernels want it)
    chunk: int  # tiles per chunk
    offsets: Tensor | None  # (n_tiles, Q, L') relative_offset of every pair, when a bias is used
    kept_index: Tensor | None  # (n_tiles·Q·L',) where each pair's entry sits among the tiles' flattened
    # (n_tiles, Q, V + 1) table rows: its offset, or V (one past the table: −∞) where the mask forbids it


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _blocked_plan(q_shape: Shape3, kv_shape: Shape3, extent: Shape3, causal: bool, bos: bool,
                  tile: Shape3, device: torch.device, relative: bool = False) -> _BlockedPlan:
    """Index tables and the per-tile mask; cached, since a model reuses a few geometries."""
    tile = tuple(min(t, s) for t, s in zip(tile, q_shape))  # a tile never exceeds the grid
    plans = [_axis_plan(s, s2, t, e, causal and axis == 0)
             for axis, (s, s2, t, e) in enumerate(zip(q_shape, kv_shape, tile, extent))]
    slots, boxes = [plan[0] for plan in plans], [plan[1] for plan in plans]  # per axis
    real = _combine_axes(*(s < n for s, n in zip(slots, q_shape)), (1, 1, 1)) == 3  # (n_tiles, Q)
    slots = [s.clamp(max=n - 1) for s, n in zip(slots, q_shape)]  # extra slots repeat the edge
    q_slots = _combine_axes(*slots, q_shape)  # (n_tiles, Q) raster positions p
    kv_box = _combine_axes(*boxes, kv_shape)  # (n_tiles, L) grid positions s
    # The mask from the same two pieces as nearby_mask: the window factorises over the axes, one
    # (tiles, tile, L_axis) table per axis, combined by broadcasting straight into booleans.
    near = [window_1d(s[:, :, None], b[:, None, :], n, m, e)
            for s, b, n, m, e in zip(slots, boxes, q_shape, kv_shape, extent)]  # (tiles_x, tile_x, L_x)
    n_tiles, n_slots, n_box = q_slots.shape[0], q_slots.shape[1], kv_box.shape[1]
    mask = (near[0][:, None, None, :, None, None, :, None, None]
            & near[1][None, :, None, None, :, None, None, :, None]
            & near[2][None, None, :, None, None, :, None, None, :])  # (n_t, n_h, n_w, t, h, w, L_t, L_h, L_w)
    mask = mask.reshape(n_tiles, n_slots, n_box)  # (n_tiles, Q, L)
    if causal:
        mask &= raster_causal(q_slots[:, :, None], kv_box[:, None, :], bos)  # (n_tiles, Q, L)
    kv_gather = kv_box  # without bos, grid position s is key s
    offsets = None
    if relative:  # which bias entry each (query slot, key) pair reads
        offsets = relative_offset(q_slots[:, :, None], kv_box[:, None, :], q_shape, kv_shape, extent)  # (n_tiles, Q, L)
        if bos:
            offsets = bos_first(offsets, extent)  # (n_tiles, Q, 1 + L), as kv_gather below
    if bos:
        # Key r holds y_{r-1}, so position s is key s + 1; y_{N-1} is no key: its clamped index is a
        # duplicate that the rule always masks (s = N - 1 < p never holds). bos leads every box.
        n_k = math.prod(kv_shape)
        kv_gather = torch.cat([torch.zeros_like(kv_box[:, :1]), (kv_box + 1).clamp(max=n_k - 1)], 1)  # (n_tiles, 1 + L)
        mask = torch.cat([torch.ones_like(mask[:, :, :1]), mask], dim=2)  # (n_tiles, Q, 1 + L)
    # Where each real query's slot is, to read the results back in raster order.
    slot_of = torch.empty(math.prod(q_shape), dtype=torch.long)  # (Nq,)
    slot_of[q_slots[real]] = torch.arange(real.numel())[real.flatten()]
    chunk = max(1, BLOCKED_CHUNK_QUERIES.get(torch.device(device).type, BLOCKED_CHUNK_QUERIES["cpu"]) // n_slots)
    kept_index = None
    if offsets is not None:
        row_size = offset_count(extent) + 1  # the table's V entries and one of −∞
        kept = offsets.masked_fill(~mask, row_size - 1)  # (n_tiles, Q, L')
        kept_index = (kept + torch.arange(n_tiles * n_slots).view(n_tiles, n_slots, 1) * row_size).flatten()
    return _BlockedPlan(*(x.to(device) for x in (q_slots, real, slot_of, kv_gather, mask[None])), chunk,
                        *(None if x is None else x.to(device) for x in (offsets, kept_index)))


def _gather_tiles(x: Tensor, index: Tensor) -> Tensor:
    """Rows of x (B·nh, N, hs) picked by index (c, M) -> (B·nh, c, M, hs): tiles act as heads."""
    return x.index_select(1, index.flatten()).view(x.shape[0], *index.shape, x.shape[2])  # (B·nh, c, M, hs)


def _chunk_tiles(q, k, v, plan: _BlockedPlan, tiles: slice) -> tuple[Tensor, Tensor, Tensor]:
    """Gather one chunk of tiles; q, k, v are (B·nh, N, hs). Tiles take the place of heads."""
    q_tiles = _gather_tiles(q, plan.q_slots[tiles])  # (B·nh, c, Q, hs)
    k_tiles = _gather_tiles(k, plan.kv_gather[tiles])  # (B·nh, c, L', hs)
    v_tiles = _gather_tiles(v, plan.kv_gather[tiles])  # (B·nh, c, L', hs)
    return q_tiles, k_tiles, v_tiles


def _chunk_mask(plan: _BlockedPlan, tiles: slice, table: Tensor | None) -> Tensor:
    """One chunk's mask: boolean (1, c, Q, L') shared by every sequence and head, or with a relative
    position table (B·nh, Nq, V) the additive mask (B·nh, c, Q, L') of its entries."""
    if table is None:
        return plan.mask[:, tiles]  # (1, c, Q, L')
    rows = _gather_tiles(table, plan.q_slots[tiles])  # (B·nh, c, Q, V): each slot's row of the table
    return biased_mask(rows, plan.offsets[tiles], plan.mask[:, tiles])  # (B·nh, c, Q, L')


class _BlockedAttention(torch.autograd.Function):
    """Chunked tile attention that recomputes each chunk in backward (memory O(N), not O(N·L))."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, plan: _BlockedPlan) -> Tensor:
        # q, k, v are (B·nh, N, hs). Only they are saved: no gathered box outlives its chunk.
        ctx.save_for_backward(q, k, v, bias)
        ctx.plan = plan
        out = q.new_empty(q.shape[0], *plan.q_slots.shape, q.shape[2])  # (B·nh, n_tiles, Q, hs)
        # Forward keeps no gradients, so its chunks can be FORWARD_CHUNKS_PER_BACKWARD times larger
        # for the same memory as backward's (fewer, larger kernel calls).
        chunk = plan.chunk * FORWARD_CHUNKS_PER_BACKWARD
        for c in range(0, plan.q_slots.shape[0], chunk):
            tiles = slice(c, c + chunk)
            # The mask (1, c, Q, L') broadcasts over B·nh: each tile has its own, like a head would.
            out[:, tiles] = F.scaled_dot_product_attention(*_chunk_tiles(q, k, v, plan, tiles),
                                                           attn_mask=_chunk_mask(plan, tiles, bias))  # (B·nh, c, Q, hs)
        return out.flatten(1, 2).index_select(1, plan.slot_of)  # (B·nh, Nq, hs): raster order, no extras

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, bias = ctx.saved_tensors
        plan = ctx.plan
        # Sum tile gradients in at least float32: bos alone collects one term from every tile, and
        # bfloat16 sums of that many terms lose most of their digits.
        acc = torch.promote_types(q.dtype, torch.float32)
        grad_q, grad_k, grad_v = (torch.zeros_like(x, dtype=acc) for x in (q, k, v))  # (B·nh, N, hs)
        grad_bias = None if bias is None else torch.zeros_like(bias, dtype=acc)  # (B·nh, Nq, V)
        for c in range(0, plan.q_slots.shape[0], plan.chunk):
            tiles = slice(c, c + plan.chunk)
            # Re-gather the chunk and recompute its attention, with the tiles (and the chunk's
            # additive mask, if biased) as autograd leaves.
            leaves = [x.requires_grad_() for x in _chunk_tiles(q, k, v, plan, tiles)]
            mask = _chunk_mask(plan, tiles, bias)
            if bias is not None:
                leaves.append(mask.requires_grad_())
            with torch.enable_grad():
                out = F.scaled_dot_product_attention(*leaves[:3], attn_mask=mask)  # (B·nh, c, Q, hs)
            # The upstream gradient of every slot; the extra slots (dropped in forward) get zero.
            grad_tiles = _gather_tiles(grad_out, plan.q_slots[tiles])  # (B·nh, c, Q, hs)
            grad_tiles = grad_tiles * plan.real[tiles, :, None].to(grad_tiles.dtype)
            dq, dk, dv, *d_mask = torch.autograd.grad(out, leaves, grad_tiles)  # tile gradients
            if bias is not None:
                # Each mask entry is table[b, h, p, offset]: its gradient adds to that entry (masked
                # pairs have zero weight, so zero gradient), first into each slot's row, then the
                # rows into the table (extra slots carry zero gradient).
                BH, c, Q, _ = d_mask[0].shape
                offsets = plan.offsets[tiles].expand(BH, -1, -1, -1)  # (B·nh, c, Q, L')
                rows = torch.zeros(BH, c, Q, bias.shape[-1], dtype=acc, device=bias.device)
                rows.scatter_add_(3, offsets, d_mask[0].to(acc))  # (B·nh, c, Q, V)
                grad_bias.index_add_(1, plan.q_slots[tiles].flatten(), rows.flatten(1, 2))
            # A gather's gradient is a scatter-add: a key in several boxes sums their gradients.
            # The CPU kernel returns gradients laid out (B·nh, M, c, hs); reading them in that order
            # (index transposed to match) is a view, where flattening (c, M) would copy them.
            for grad, index, tile_grad in ((grad_q, plan.q_slots, dq), (grad_k, plan.kv_gather, dk),
                                           (grad_v, plan.kv_gather, dv)):
                grad.index_add_(1, index[tiles].t().flatten(), tile_grad.transpose(1, 2).flatten(1, 2).to(acc))
        grad_bias = None if bias is None else grad_bias.to(bias.dtype)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), grad_bias, None


def _blocked_kept(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, plan: _BlockedPlan) -> Tensor:
    """Every tile at once in plain tensor ops, differentiated by autograd, which keeps the scores.

    q, k, v (B·nh, N, hs), bias (B·nh, Nq, V) or None → (B·nh, Nq, hs). The same function as
    `_BlockedAttention`; faster while the scores are small (BLOCKED_KEEP_BYTES).
    """
    # Gathered in at least float32, so that the gathers' gradients (scatter-adds: bos collects one
    # term per tile) are summed in float32 under bf16 autocast; the matmuls still run in autocast's dtype.
    acc = torch.promote_types(q.dtype, torch.float32)
    q_tiles, k_tiles, v_tiles = _chunk_tiles(*(x.to(acc) for x in (q, k, v)), plan, slice(None))  # (B·nh, n, Q|L', hs)
    BH, n, Q, hs = q_tiles.shape
    if bias is None:
        entries = torch.zeros_like(plan.mask, dtype=acc).masked_fill(~plan.mask, -math.inf)  # (1, n, Q, L')
        entries = entries.expand(BH, -1, -1, -1)
    else:
        # Each slot's row of the table plus one entry of −∞, which the pairs the rule forbids read.
        rows = F.pad(_gather_tiles(bias.to(acc), plan.q_slots), (0, 1), value=-math.inf)  # (B·nh, n, Q, V + 1)
        # One index_select over the flattened rows: the same entries as rows.gather(3, offsets), and
        # with its backward 1.6× faster on a CPU (the gather's index is broadcast over B·nh).
        entries = rows.view(BH, -1).index_select(1, plan.kept_index).view(BH, n, Q, -1)  # (B·nh, n, Q, L')
    # entries + q·kᵀ/√hs in one pass over the scores, the tiles flattened into the batch.
    scores = torch.baddbmm(entries.reshape(BH * n, Q, -1), q_tiles.reshape(BH * n, Q, hs),
                           k_tiles.reshape(BH * n, -1, hs).transpose(1, 2), alpha=1 / math.sqrt(hs))
    out = scores.softmax(dim=-1) @ v_tiles.reshape(BH * n, -1, hs)  # (B·nh·n_tiles, Q, hs)
    return out.view(BH, n * Q, hs).index_select(1, plan.slot_of).to(q.dtype)  # (B·nh, Nq, hs): raster order


def _blocked_attention(q, k, v, q_shape, kv_shape, extent, causal, bos, tile: Shape3, bias=None) -> Tensor:
    """Tiles of Q queries × their box of L keys: O(N·L) time; O(N) memory when the scores are large."""
    B, nh, n_q, hs = q.shape
    plan = _blocked_plan(q_shape, kv_shape, extent, causal, bos, tile, q.device, bias is not None)
    q, k, v = (x.reshape(B * nh, x.shape[2], hs) for x in (q, k, v))  # (B·nh, N, hs)
    if bias is not None:
        bias = bias.reshape(B * nh, n_q, bias.shape[-1])  # (B·nh, Nq, V)
    score_bytes = B * nh * plan.mask.numel() * max(q.element_size(), 4)
    if torch.is_grad_enabled() and score_bytes <= BLOCKED_KEEP_BYTES:
        out = _blocked_kept(q, k, v, bias, plan)  # (B·nh, Nq, hs)
    else:
        out = _BlockedAttention.apply(q, k, v, bias, plan)  # (B·nh, Nq, hs)
    return out.view(B, nh, n_q, hs)  # (B, nh, Nq, hs)


# ---------------------------------------------------------------------------------------------
# 5. Flex backend: FlexAttention with a block mask from the same rule
# ---------------------------------------------------------------------------------------------
# FlexAttention evaluates mask_mod(b, h, q_idx, kv_idx) on 128×128 blocks and skips empty ones. In
# raster order one block of 128 queries is a thin strip of rows whose windows touch many blocks of
# keys; listed tile by tile (2×8×8 = 128 tokens each) a block is a compact space-time box and most
# key blocks are empty. The mask is order-free, so we permute q/k/v into tile order, attend, and
# un-permute: the result is the same function, only the work skipped differs.

def tile_order(shape: Shape3, tile: Shape3 = FLEX_TILE) -> Tensor:
    """Raster indices listed tile by tile (tiles in raster order, raster order inside a tile): (N,)."""
    t, h, w = raster_to_coords(torch.arange(math.prod(shape)), shape)  # (N,) each
    tiles_h, tiles_w = -(-shape[1] // tile[1]), -(-shape[2] // tile[2])
    tile_id = ((t // tile[0]) * tiles_h + h // tile[1]) * tiles_w + w // tile[2]  # (N,)
    in_tile = ((t % tile[0]) * tile[1] + h % tile[1]) * tile[2] + w % tile[2]  # (N,)
    return torch.argsort(tile_id * math.prod(tile) + in_tile)  # (N,)


@functools.cache
def _compiled_flex_attention():
    """FlexAttention only runs fast when compiled (otherwise it materialises every score)."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def flex_mask_mod(q_shape: Shape3, kv_shape: Shape3, extent: Shape3, causal: bool, bos: bool,
                  device: torch.device | str | None = None):
    """The rule as FlexAttention's mask_mod over tile-ordered tokens: (q_order, kv_order, mask_mod).

    q_order[i] is the raster position of the i-th query in tile order; kv_order[j] is the key index
    r (into k and v) of the j-th key in tile order; mask_mod(b, h, i, j) is the rule for that pair.
    """
    q_order = tile_order(q_shape).to(device)  # (Nq,) raster positions in tile order
    kv_order = tile_order(kv_shape).to(device)  # (Nk,) grid positions s in tile order
    if bos:
        # List bos first, then key r = s + 1 for every grid position s in tile order; y_{N-1} is
        # never a key. kv_order now holds key indices r, so it can index k and v directly.
        n_k = kv_order.numel()
        kv_order = torch.cat([kv_order.new_zeros(1), kv_order[kv_order != n_k - 1] + 1])  # (N,)

    def mask_mod(batch, head, q_idx, kv_idx):
        # batch/head are unused: the mask is the same for every sequence and head.
        q_index, r = q_order[q_idx], kv_order[kv_idx]  # back to raster positions / key indices
        if not bos:
            return nearby_rule(q_index, r, q_shape, kv_shape, extent, causal)
        return (r == 0) | nearby_rule(q_index, (r - 1).clamp(min=0), q_shape, kv_shape, extent, causal, bos)

    return q_order, kv_order, mask_mod


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _flex_plan(q_shape: Shape3, kv_shape: Shape3, extent: Shape3, causal: bool, bos: bool,
               device: torch.device):
    """Token orders for q and k/v, the inverse query order, and the BlockMask (cached)."""
    from torch.nn.attention.flex_attention import create_block_mask
    q_order, kv_order, mask_mod = flex_mask_mod(q_shape, kv_shape, extent, causal, bos, device)
    # On CUDA, compiling the mask creation evaluates mask_mod block by block instead of over the
    # whole (Nq, Nk) grid at once (gigabytes at 32k tokens); the CPU path stays eager.
    block_mask = create_block_mask(mask_mod, None, None, q_order.numel(), kv_order.numel(), device=device,
                                   _compile=torch.device(device).type == "cuda")
    return q_order, kv_order, torch.argsort(q_order), block_mask


def flex_score_mod(q_order: Tensor, kv_order: Tensor, q_shape: Shape3, kv_shape: Shape3, extent: Shape3,
                   bos: bool, bias: Tensor):
    """A relative position table (B, nh, Nq, V) as FlexAttention's score_mod over tile-ordered tokens
    (orders as returned by `flex_mask_mod`): score + table[b, h, p, relative_offset(p, key)], bos its
    own entry."""

    def score_mod(score, batch, head, q_idx, kv_idx):
        q_index, r = q_order[q_idx], kv_order[kv_idx]
        if not bos:
            return score + bias[batch, head, q_index, relative_offset(q_index, r, q_shape, kv_shape, extent)]
        entry = relative_offset(q_index, (r - 1).clamp(min=0), q_shape, kv_shape, extent)
        return score + bias[batch, head, q_index, torch.where(r == 0, offset_count(extent) - 1, entry)]

    return score_mod


def _flex_attention(q, k, v, q_shape, kv_shape, extent, causal, bos, bias=None) -> Tensor:
    """Tile-ordered tokens through compiled FlexAttention; the un-permuted result is raster order."""
    q_order, kv_order, q_inverse, block_mask = _flex_plan(q_shape, kv_shape, extent, causal, bos, q.device)
    q, k, v = q[:, :, q_order], k[:, :, kv_order], v[:, :, kv_order]  # (B, nh, N, hs), tile order
    score_mod = None
    if bias is not None:
        score_mod = flex_score_mod(q_order, kv_order, q_shape, kv_shape, extent, bos, bias.contiguous())
    out = _compiled_flex_attention()(q, k, v, score_mod=score_mod, block_mask=block_mask)  # (B, nh, Nq, hs)
    return out[:, :, q_inverse]  # (B, nh, Nq, hs), raster order


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


def bias_table(bias: Tensor | None, q: Tensor, extent: Shape3) -> Tensor | None:
    """A relative position table as (B, nh, Nq, V) in q's dtype: one per head (nh, V), or per query
    (B, nh, Nq, V) (or anything broadcasting to it); V = offset_count(extent). Wrong sizes are errors."""
    if bias is None:
        return None
    B, nh, n_q, _ = q.shape
    table = bias[None, :, None, :] if bias.dim() == 2 else bias
    V = offset_count(extent)
    if table.dim() != 4 or table.shape[-1] != V or any(t not in (1, n) for t, n in zip(table.shape[:3], (B, nh, n_q))):
        raise ValueError(f"relative position bias must be (heads, offset_count(extent)) = ({nh}, {V}) or per query "
                         f"(B, heads, Nq, {V}) = ({B}, {nh}, {n_q}, {V}) for extent {extent}; got {tuple(bias.shape)}")
    return table.to(q.dtype).expand(B, nh, n_q, V)


def relative_table(q: Tensor, position_bias: Tensor | None, relative_keys: Tensor | None) -> Tensor | None:
    """The relative position table of queries q (B, nh, Nq, hs) from a layer's stored parameters,
    b (nh, V) and r (nh, V, hs), both divided by RELATIVE_GAIN: b + q·rᵀ/√hs, as (nh, V) with b alone,
    (B, nh, Nq, V) with r; None with neither. 3DNA's layers and NÜWA-Infinity's blocks use it."""
    table = None if position_bias is None else RELATIVE_GAIN * position_bias.to(q.dtype)  # (nh, V)
    if relative_keys is not None:
        keys = RELATIVE_GAIN * relative_keys.to(q.dtype)  # (nh, V, hs)
        by_query = torch.einsum("bhqd,hvd->bhqv", q, keys) / math.sqrt(q.shape[-1])  # (B, nh, Nq, V)
        table = by_query if table is None else by_query + table[None, :, None, :]  # (B, nh, Nq, V)
    return table


def nearby_attention(q: Tensor, k: Tensor, v: Tensor, q_shape, kv_shape, extent, causal: bool,
                     bos: bool = False, backend: str = "blocked", *, tile=BLOCKED_TILE,
                     bias: Tensor | None = None) -> Tensor:
    """3DNA: q (B, nh, Nq, hs) attends to k, v (B, nh, Nk, hs) within `nearby_mask`; -> (B, nh, Nq, hs).

    backend: "reference" (loops), "dense" (O(N²) mask), "blocked" (linear; CPU and GPU), "flex"
    (FlexAttention: CUDA; the CPU runs its forward only, compiled). `tile`: the blocked query tile.
    bias: optional relative position table added to the scores, (nh, V) or per query (B, nh, Nq, V)
    with V = offset_count(extent) (see `relative_offset`); every backend adds the same entries as the
    reference, and its gradient flows back to the table.
    """
    q_shape, kv_shape, extent = _check_geometry(q_shape, kv_shape, extent, causal, bos)
    _check_qkv(q, k, v, q_shape, kv_shape)
    bias = bias_table(bias, q, extent)
    if backend == "reference":
        return nearby_attention_reference(q, k, v, q_shape, kv_shape, extent, causal, bos, bias)
    if backend == "dense":
        return _dense_attention(q, k, v, q_shape, kv_shape, extent, causal, bos, bias)
    if backend == "blocked":
        return _blocked_attention(q, k, v, q_shape, kv_shape, extent, causal, bos, _as_shape("tile", tile, 1), bias)
    if backend == "flex":
        return _flex_attention(q, k, v, q_shape, kv_shape, extent, causal, bos, bias)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


# ---------------------------------------------------------------------------------------------
# 7. The module and its decode step
# ---------------------------------------------------------------------------------------------

@dataclass
class NearbyCache:
    """What one attention layer keeps between decode steps of one generation (see `step`)."""

    keys: Tensor | None = None  # (B, nh, 1 + (e_t + 1)·H·W, hs): bos, then frame t in slot t mod (e_t + 1)
    values: Tensor | None = None
    past_k: Tensor | None = None  # (B, nh, p + 1, hs): every key so far (full attention, extent None)
    past_v: Tensor | None = None
    context_k: Tensor | None = None  # (B, nh, Nk, hs): cross-attention keys, projected once
    context_v: Tensor | None = None
    context_shape: Shape3 | None = None  # (T', H', W') of the context grid

    def nbytes(self) -> int:
        """Memory held by the cache's tensors, in bytes."""
        tensors = [getattr(self, f.name) for f in fields(self)]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


# A decode step reads one query's window. Building it from aranges at every step costs dozens of
# tiny kernel launches per layer and token, so the windows of one frame's H·W positions are
# tabulated together, each padded to one box length L (positions off the grid point anywhere and are
# masked), with the mask from the same `nearby_rule`. One table per frame, not per video: memory
# stays independent of the video's length, and the least-recently used tables are dropped.

@dataclass(frozen=True)
class _StepPlan:
    index: Tensor  # (H·W, L) where each key of each position's window lives (cache buffer or context)
    allowed: Tensor  # (H·W, 1, 1, L) bool: on the grid and allowed by the rule, ready for the fused kernel
    offsets: Tensor  # (H·W, L) the relative position entry of each key (relative_offset; bos: the last)


def _box_around(centre: tuple[Tensor, Tensor, Tensor], shape: Shape3, offsets: tuple[Tensor, Tensor, Tensor]):
    """Coordinates centre + offset on each axis, broadcast to (n, L_t, L_h, L_w), clamped onto the
    grid, and whether each was on it before clamping."""
    coords = [c[:, None, None, None] + o.view(*[-1 if a == axis else 1 for a in range(3)])
              for axis, (c, o) in enumerate(zip(centre, offsets))]  # broadcasting to (n, L_t, L_h, L_w)
    inside = functools.reduce(torch.logical_and, ((c >= 0) & (c < n) for c, n in zip(coords, shape)))
    coords = [c.clamp(0, n - 1) for c, n in zip(coords, shape)]
    return coords, inside


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _self_step_plan(frame_shape: tuple[int, int], extent: Shape3, lookback: int, slot: int, n_slots: int,
                    device: torch.device) -> _StepPlan:
    """Causal self-attention with bos, for the queries of one frame i (in buffer slot `slot`).

    Key 0 is bos; then y_p's window over frames i - lookback .. i (lookback = min(i, e_t)). The rule
    only compares time coordinates by their difference, so it is evaluated on a local grid of
    lookback + 1 frames whose last frame is i: every frame i >= e_t with the same slot shares a table.
    """
    H, W = frame_shape
    local = (lookback + 1, H, W)  # local frame a is frame i - lookback + a
    p = lookback * H * W + torch.arange(H * W)  # (H·W,) the queries of frame i, local raster indices
    offsets = (torch.arange(-lookback, 1), torch.arange(-extent[1], extent[1] + 1),
               torch.arange(-extent[2], extent[2] + 1))  # causal: no later frames
    (f, r, c), inside = _box_around(raster_to_coords(p, local), local, offsets)
    s = (f * H + r) * W + c  # (H·W, L_t, L_h, L_w) local grid positions
    allowed = inside & nearby_rule(p[:, None, None, None], s, local, local, extent, causal=True, bos=True)
    buffer = 1 + (((slot - lookback + f) % n_slots) * H + r) * W + c  # where s lives (0 is bos)
    index = torch.cat([torch.zeros_like(p)[:, None], buffer.flatten(1)], dim=1)  # (H·W, 1 + L)
    allowed = torch.cat([torch.ones_like(allowed.flatten(1)[:, :1]), allowed.flatten(1)], dim=1)  # (H·W, 1 + L)
    offsets = relative_offset(p[:, None, None, None], s, local, local, extent).flatten(1)  # (H·W, L)
    offsets = bos_first(offsets, extent)  # (H·W, 1 + L), as index
    return _StepPlan(index.to(device), allowed[:, None, None, :].to(device), offsets.to(device))


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _cross_step_plan(q_shape: Shape3, kv_shape: Shape3, extent: Shape3, frame: int,
                     device: torch.device) -> _StepPlan:
    """Cross-attention for the queries of one frame: the box around each projected (i', j', k')."""
    H, W = q_shape[1:]
    p = frame * H * W + torch.arange(H * W)  # (H·W,) raster indices of the frame's queries
    centre = tuple(project(x, n, m) for x, n, m in zip(raster_to_coords(p, q_shape), q_shape, kv_shape))
    offsets = tuple(torch.arange(-e, e + 1) for e in extent)
    (a, b, c), inside = _box_around(centre, kv_shape, offsets)
    s = (a * kv_shape[1] + b) * kv_shape[2] + c  # (H·W, L_t, L_h, L_w) context positions
    allowed = inside & nearby_rule(p[:, None, None, None], s, q_shape, kv_shape, extent, causal=False)
    offsets = relative_offset(p[:, None, None, None], s, q_shape, kv_shape, extent).flatten(1)  # (H·W, L)
    return _StepPlan(s.flatten(1).to(device), allowed.flatten(1)[:, None, None, :].to(device), offsets.to(device))


# The relative tables are stored divided by this gain. Adam moves every parameter by about lr per
# step whatever its scale, so a stored score reaches 5 in ~1,700 steps at lr 3e-3, and attention
# stays blurred over the window all that time; times the gain, in ~170. (Measured with the copy probe,
# benchmarks/bench_learn.py; README.) A reparametrisation: the function is b + q·rᵀ/√hs either way,
# but stored tables mean gain × value, so changing it changes every saved model.
RELATIVE_GAIN = 10.0
MODULE_EXTENT = "module"  # default of the per-call `extent` argument: use the extent given at construction


class NearbyAttention(nn.Module):
    """Multi-head 3DNA: self-attention (causal or not) or cross-attention to a context grid.

    extent=None means full attention (the paper's extent ∞, used for text conditions).
    context_dim given means cross-attention; cross-attention is never causal.

    Relative positions inside the window. DEVIATION (NÜWA §3.2): the paper has absolute positions only.
    - relative_bias=True adds a learned score b[h, o] per head and 3D offset o of the key from the
      query's (projected) position (Swin and Neighborhood Attention do this inside their windows):
      a head can read "the same place one frame back" whatever the content.
    - relative_keys=True also adds q · r[h, o] / √hs, a learned vector per head and offset (Shaw et
      al. 2018's relative key embeddings): what a query holds chooses *where* it looks, e.g. a
      caption's direction chooses the neighbour a moving block comes from.
    Both are zero at the start (the layer attends as the paper's), live in one table per call,
    (B, nh, Nq, V) = b + q·rᵀ/√hs, that every backend and the decode step index with
    `relative_offset`, and apply to windowed calls only: full attention (extent None, text) has no
    grid to take offsets on. The tiny models need them to learn motion (README, learning probes).
    """

    def __init__(self, dim: int, num_heads: int, extent: tuple[int, int, int] | None, *, causal: bool = False,
                 context_dim: int | None = None, backend: str = "blocked", relative_bias: bool = False,
                 relative_keys: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if context_dim is not None and causal:
            raise ValueError("cross-attention (context_dim given) is never causal")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        self.num_heads, self.head_size = num_heads, dim // num_heads  # nh, hs
        self.extent = None if extent is None else _as_shape("extent", extent, 0)
        self.causal, self.is_cross, self.backend = causal, context_dim is not None, backend
        kv_dim = dim if context_dim is None else context_dim
        self.q_proj = nn.Linear(dim, dim, bias=False)  # W^Q, all heads at once
        self.k_proj = nn.Linear(kv_dim, dim, bias=False)  # W^K
        self.v_proj = nn.Linear(kv_dim, dim, bias=False)  # W^V
        self.out_proj = nn.Linear(dim, dim, bias=False)  # mixes the concatenated heads
        # DEVIATION (NÜWA §3.2, see the class docstring): b (nh, V) and r (nh, V, hs), V =
        # offset_count(extent): one score / one key vector per head and window offset, the last for
        # bos; zero at the start, so an untrained layer attends exactly as without them.
        self.position_bias = self.relative_keys = None
        if relative_bias and self.extent is not None:
            self.position_bias = nn.Parameter(torch.zeros(num_heads, offset_count(self.extent)))
        if relative_keys and self.extent is not None:
            self.relative_keys = nn.Parameter(torch.zeros(num_heads, offset_count(self.extent), self.head_size))

    def _heads(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (B, nh, N, hs)."""
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.head_size).transpose(1, 2)  # (B, nh, N, hs)

    def _merge(self, y: Tensor) -> Tensor:
        """(B, nh, N, hs) -> (B, N, D), then the output projection."""
        B, nh, N, hs = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(B, N, nh * hs))  # (B, N, D)

    def _extent(self, extent) -> Shape3 | None:
        """The extent of one call: the module's own, or a per-call one. NÜWA's encoder and its
        cross-attention read text in full (extent None) and sketches nearby, with the same weights."""
        if isinstance(extent, str) and extent == MODULE_EXTENT:
            return self.extent
        extent = None if extent is None else _as_shape("extent", extent, 0)
        has_table = self.position_bias is not None or self.relative_keys is not None
        if extent is not None and has_table and extent != self.extent:
            raise ValueError(f"this layer's relative position table covers the extent {self.extent}; it cannot "
                             f"attend with extent {extent}")
        return extent

    def _bias(self, q: Tensor, extent) -> Tensor | None:
        """The relative position table of a windowed call, b + q·rᵀ/√hs: (nh, V) or (B, nh, Nq, V);
        None for full attention or without one."""
        if extent is None:
            return None
        return relative_table(q, self.position_bias, self.relative_keys)

    def _context_shape(self, context: Tensor | None, kv_shape, extent) -> Shape3:
        """The context grid: given, or (1, 1, L) for a flat (text) context under full attention."""
        if context is None:
            raise ValueError("cross-attention needs `context` (B, Nk, context_dim)")
        if kv_shape is None:
            if extent is not None:
                raise ValueError("nearby cross-attention needs kv_shape, the (T', H', W') grid of the context")
            kv_shape = (1, 1, context.shape[1])
        kv_shape = _as_shape("kv_shape", kv_shape, 1)
        if context.shape[1] != math.prod(kv_shape):
            raise ValueError(f"context holds {context.shape[1]} tokens but kv_shape={kv_shape} has {math.prod(kv_shape)}")
        return kv_shape

    def forward(self, x: Tensor, q_shape, context: Tensor | None = None, kv_shape=None,
                bos: bool = False, extent=MODULE_EXTENT) -> Tensor:
        """x (B, Nq, D) on grid q_shape -> (B, Nq, D). Self: keys from x. Cross: keys from context.

        bos=True: x is the decoder input [bos, y_0, ..., y_{N-2}]. It changes causal self-attention
        only: in cross-attention the query at input p uses y_p's window either way (position p).
        """
        B, n_q, _ = x.shape
        q_shape, extent = _as_shape("q_shape", q_shape, 1), self._extent(extent)
        if n_q != math.prod(q_shape):
            raise ValueError(f"x holds {n_q} tokens but q_shape={q_shape} has {math.prod(q_shape)}")
        if self.is_cross:
            kv_shape, source, bos = self._context_shape(context, kv_shape, extent), context, False
        elif context is not None:
            raise ValueError("this is a self-attention layer (no context_dim); it takes no context")
        else:
            kv_shape, source = q_shape, x
            if bos and not self.causal:
                raise ValueError("bos=True describes a causal decoder; this layer is not causal")
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(source)), self._heads(self.v_proj(source))
        if extent is None:
            # Full attention (extent ∞). Causal: key r <= p, the same rule with or without bos.
            # On the CPU it runs in float32 even under bf16 autocast: there the fused kernel's bf16
            # backward was 10× slower than its float32 one at NÜWA's text cross-attention (profile of a step).
            on_cpu = q.device.type == "cpu"
            dtype = torch.promote_types(q.dtype, torch.float32) if on_cpu else q.dtype
            with torch.autocast("cpu", enabled=False) if on_cpu else contextlib.nullcontext():
                y = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype),
                                                   is_causal=self.causal).to(q.dtype)  # (B, nh, Nq, hs)
        else:
            y = nearby_attention(q, k, v, q_shape, kv_shape, extent, self.causal, bos,
                                 backend=self.backend, bias=self._bias(q, extent))  # (B, nh, Nq, hs)
        return self._merge(y)  # (B, Nq, D)

    def new_cache(self) -> NearbyCache:
        """An empty cache for one generation (one per layer)."""
        return NearbyCache()

    def step(self, x_p: Tensor, p: int, q_shape, cache: NearbyCache, context: Tensor | None = None,
             kv_shape=None, extent=MODULE_EXTENT) -> Tensor:
        """One decode step: x_p (B, 1, D), decoder input number p (p = 0 is bos) -> (B, 1, D).

        Equals row p of forward(x, q_shape, bos=True). The query predicts y_p and reads y_p's window.
        Call it for p = 0, 1, 2, ... in order with one `new_cache()` per generation. Cross-attention
        projects `context` on its first call and reuses it from the cache afterwards.
        """
        q_shape = _as_shape("q_shape", q_shape, 1)
        if x_p.shape[1] != 1 or not 0 <= p < math.prod(q_shape):
            raise ValueError(f"step takes one token (B, 1, D) at 0 <= p < {math.prod(q_shape)}; got "
                             f"{tuple(x_p.shape)} at p={p}")
        q = self._heads(self.q_proj(x_p))  # (B, nh, 1, hs)
        extent = self._extent(extent)
        if self.is_cross:
            keys, values, allowed, offsets = self._cross_window(p, q_shape, cache, context, kv_shape, extent)
        elif self.causal:
            keys, values, allowed, offsets = self._self_window(x_p, p, q_shape, cache, extent)
        else:
            raise ValueError("step() decodes causal self-attention or cross-attention; a non-causal "
                             "self-attention layer would need tokens not generated yet")
        bias = self._bias(q, extent)
        bias = None if bias is None else bias_table(bias, q, extent)  # (B, nh, 1, V)
        if bias is not None:  # the window's entries of the table, −∞ where the rule forbids: (B, nh, 1, L)
            allowed = biased_mask(bias, offsets[None], allowed)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)  # (B, nh, 1, hs)
        return self._merge(y)  # (B, 1, D)

    def _self_window(self, x_p: Tensor, p: int, q_shape: Shape3, cache: NearbyCache, extent):
        """Store key r = p (it holds y_{p-1}, or bos), then gather bos + y_p's causal window."""
        k, v = self._heads(self.k_proj(x_p)), self._heads(self.v_proj(x_p))  # (B, nh, 1, hs)
        if extent is None:
            # Full causal attention keeps every key: r <= p. Memory grows with p (extent ∞).
            cache.past_k = k if p == 0 else torch.cat([cache.past_k, k], dim=2)  # (B, nh, p + 1, hs)
            cache.past_v = v if p == 0 else torch.cat([cache.past_v, v], dim=2)  # (B, nh, p + 1, hs)
            return cache.past_k, cache.past_v, None, None
        T, H, W = q_shape
        # y_p reads frames i - e_t .. i only, so e_t + 1 frames (fewer if the video is shorter) suffice.
        n_slots = min(extent[0] + 1, T)
        if p == 0:
            B, nh, _, hs = k.shape
            cache.keys = k.new_zeros(B, nh, 1 + n_slots * H * W, hs)  # bos, then the rolling frames
            cache.values = v.new_zeros(B, nh, 1 + n_slots * H * W, hs)
            slot = 0  # key 0 is bos
        else:
            # Key r = p holds y_{p-1}: write it at its grid position, overwriting frame t - n_slots,
            # which no later query can see (their windows start at frame >= t - e_t).
            t, h, w = raster_to_coords(p - 1, q_shape)
            slot = 1 + ((t % n_slots) * H + h) * W + w
        cache.keys[:, :, slot] = k[:, :, 0]
        cache.values[:, :, slot] = v[:, :, 0]
        # y_p's window from its frame's table; the rule masks off-grid and not-yet-written positions.
        i, position = divmod(p, H * W)
        plan = _self_step_plan((H, W), extent, min(i, extent[0]), i % n_slots, n_slots, x_p.device)
        index = plan.index[position]  # (1 + L,)
        return (cache.keys.index_select(2, index), cache.values.index_select(2, index), plan.allowed[position],
                plan.offsets[position])  # (B, nh, 1 + L, hs) twice, (1, 1, 1 + L), (1 + L,)

    def _cross_window(self, p: int, q_shape: Shape3, cache: NearbyCache, context, kv_shape, extent):
        """Project the context once (first call), then gather y_p's projected window from it."""
        if cache.context_k is None:
            cache.context_shape = self._context_shape(context, kv_shape, extent)
            cache.context_k = self._heads(self.k_proj(context))  # (B, nh, Nk, hs)
            cache.context_v = self._heads(self.v_proj(context))  # (B, nh, Nk, hs)
        if extent is None:
            return cache.context_k, cache.context_v, None, None  # full attention to the whole context
        i, position = divmod(p, q_shape[1] * q_shape[2])
        plan = _cross_step_plan(q_shape, cache.context_shape, extent, i, cache.context_k.device)
        index = plan.index[position]  # (L,) the box around y_p's projected position
        return (cache.context_k.index_select(2, index), cache.context_v.index_select(2, index),
                plan.allowed[position], plan.offsets[position])  # (B, nh, L, hs) twice, (1, 1, L), (L,)
