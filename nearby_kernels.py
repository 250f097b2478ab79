"""The kernels of 3D Nearby Attention (3DNA): attention restricted to the 3D window — NÜWA §3.2
(Wu et al., arXiv 2111.12417), Eq. 5 over the neighbourhood of Eq. 4 (nearby_window.py).

Full attention over a video costs O(N²) in N = T·H·W tokens; 3DNA lets each query see only the keys
of its window N(i, j, k) (nearby_window.py), so the cost is O(N · L), linear in N:

    y_ijk = softmax(q_ijk · K_Nᵀ / √hs + b_N) · V_N     (Eq. 5; K_N, V_N: keys/values of N(i, j, k))

with b_N the optional relative position entries of the window's keys (a DEVIATION, see below).

Here the same function is computed four ways, the slow obvious one first:
1. `nearby_attention_reference`: loops over every query and its neighbourhood, written from the
   paper's set definition (it uses neither `nearby_mask` nor `relative_offset`, so the tests compare
   two independent readings of the rule). Slow; the one every other path is checked against.
2. Dense: one fused attention call with the (Nq, Nk) boolean mask. O(N²) time and memory.
3. Blocked: query tiles attend to their tile's box of keys (the tile's projection widened by the
   extents). O(N·L) time; O(N) memory. Small training calls keep the scores for autograd
   (`_blocked_kept`); large ones recompute each chunk of tiles in backward (`_BlockedAttention`).
4. Flex: FlexAttention with a block-sparse mask, tokens listed tile by tile (CUDA; the CPU runs its
   forward only).
`nearby_attention(...)` checks its arguments and picks one (`backend`).

Glossary: B batch, nh heads, hs head size, (T, H, W) query grid, (T', H', W') key/value grid,
N = T·H·W and Nq / Nk query / key counts, (e_t, e_h, e_w) extents, p a query's raster index, r a
key's index, s the grid position of the token a key holds (s = r − 1 with bos), V =
offset_count(extent) entries of a relative table, Q / L queries per tile / keys per tile (blocked),
L' = L (+ 1 with bos).

Deviations from the paper:
- The causal rule (raster order) and the bos shift are choices the paper leaves open; see
  nearby_window.py.
- DEVIATION (NÜWA §3.2): every kernel can add a relative position table to the scores (`bias`);
  the paper has absolute positions only (see nearby_attention.py). Every backend adds the same entries
  as the reference (tested in float64, forward and gradients; flex in float32).
- The blocked and flex backends are engineering, not approximations: they compute the same function
  as the reference (tested in float64).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from nearby_window import (
    PLAN_CACHE_SIZE,
    Shape3,
    as_shape,
    bias_table,
    biased_mask,
    bos_first,
    check_geometry,
    nearby_mask,
    nearby_rule,
    offset_count,
    project,
    raster_causal,
    raster_to_coords,
    relative_offset,
    window_1d,
)

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

BACKENDS = ("reference", "dense", "blocked", "flex")
# Query tile of the blocked backend, (t, h, w). Smaller tiles read more keys per query (the halo),
# larger ones pay more per key; a one-frame tile reads e_t + 1 frames of keys, a two-frame tile one
# more for twice the queries. Chosen here (bench_3dna.py: 1×8×8 was the fastest on 2 CPU cores).
BLOCKED_TILE: Shape3 = (1, 8, 8)
# FlexAttention skips work in blocks of 128×128 (its default BLOCK_SIZE). A 2×8×8 space-time tile
# is exactly 128 tokens, so one compact tile fills one block when tokens are listed tile by tile.
FLEX_TILE: Shape3 = (2, 8, 8)
# Queries per chunk of tiles in the blocked backend, per device type. A chunk's gathered boxes and
# their gradients are its working memory, and each chunk costs a dozen kernel calls: small chunks
# were slow on a busy CPU, large ones use more memory (bench_3dna.py); GPUs want large launches.
# Chosen here, not in the paper.
BLOCKED_CHUNK_QUERIES = {"cpu": 512, "cuda": 16384}
# Backward holds a chunk's tiles, their gradients and the kernel's scratch, about 4× what forward
# holds per query (measured with bench_3dna.py), so forward runs chunks this many times larger.
FORWARD_CHUNKS_PER_BACKWARD = 4
# The blocked backend keeps its tiles' scores for backward when they take at most this many bytes,
# and lets autograd differentiate plain tensor ops (no second forward, no per-chunk kernel calls).
# Larger calls run chunk by chunk and recompute each chunk in backward, so memory stays O(N). The
# demo's layers (10 MB of scores) run faster kept than recomputed. Chosen here, not in the paper.
BLOCKED_KEEP_BYTES = 64 * 2**20


# ---------------------------------------------------------------------------------------------
# 1. Arguments
# ---------------------------------------------------------------------------------------------

def _check_qkv(q: Tensor, k: Tensor, v: Tensor, q_shape: Shape3, kv_shape: Shape3) -> None:
    """Clear errors for tensors that do not match the grids they claim to hold."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, nh, N, hs); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[2] != math.prod(q_shape):
        raise ValueError(f"q holds N={q.shape[2]} tokens but q_shape={q_shape} has {math.prod(q_shape)}")
    if k.shape[2] != math.prod(kv_shape) or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k/v hold {k.shape[2]}/{v.shape[2]} tokens but kv_shape={kv_shape} has "
                         f"{math.prod(kv_shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, heads or head size")



# ---------------------------------------------------------------------------------------------
# 2. The reference: loops over every query and its neighbourhood
# ---------------------------------------------------------------------------------------------

def nearby_attention_reference(q: Tensor, k: Tensor, v: Tensor, q_shape, kv_shape, extent, causal: bool,
                               bos: bool = False, bias: Tensor | None = None) -> Tensor:
    """y_ijk = softmax(q_ijk · K_N^T / √hs + b_N) · V_N, one query at a time. The definition, not for speed.

    Written from the paper's set definition with plain Python loops; it does not use `nearby_mask`
    or `relative_offset`, so the tests compare two independent readings of the rule. q (B, nh, Nq, hs),
    k/v (B, nh, Nk, hs). bias, optional: a relative position table, one score per 3D offset
    (a − i', b − j', c − k') of the key from the query's projection, the last entry for bos; shaped
    (nh, V) or per query (B, nh, Nq, V), V = offset_count(extent) (DEVIATION from NÜWA §3.2, which has
    absolute positions only; see NearbyAttention).
    """
    q_shape, kv_shape, extent = check_geometry(q_shape, kv_shape, extent, causal, bos)
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
                        entries.append(((a - i2 + e_t) * (2 * e_h + 1) + b - j2 + e_h) * (2 * e_w + 1)
                                       + c - k2 + e_w)
        index = torch.tensor(keys, device=q.device)
        scores = q[:, :, p:p + 1] @ k[:, :, index].transpose(-1, -2) * scale  # (B, nh, 1, L)
        if bias is not None:
            entry_index = torch.tensor(entries, device=q.device)  # (L,)
            scores = scores + bias[:, :, p, entry_index][:, :, None, :]  # + (B, nh, 1, L)
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
def _cached_offsets(q_shape: Shape3, kv_shape: Shape3, extent: Shape3, bos: bool,
                    device: torch.device) -> Tensor:
    """relative_offset of every (query, key) pair, (Nq, Nk) long; with bos, key 0 reads the bos entry."""
    offsets = relative_offset(torch.arange(math.prod(q_shape), device=device)[:, None],
                              torch.arange(math.prod(kv_shape), device=device)[None, :],
                              q_shape, kv_shape, extent)  # (Nq, Nk) over grid positions s
    if bos:  # key r holds y_{r-1}: shift by one column, bos first
        offsets = bos_first(offsets[:, :-1], extent)  # (Nq, Nk) over keys r
    return offsets


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
        offsets = relative_offset(q_slots[:, :, None], kv_box[:, None, :], q_shape, kv_shape,
                                  extent)  # (n_tiles, Q, L)
        if bos:
            offsets = bos_first(offsets, extent)  # (n_tiles, Q, 1 + L), as kv_gather below
    if bos:
        # Key r holds y_{r-1}, so position s is key s + 1; y_{N-1} is no key: its clamped index is a
        # duplicate that the rule always masks (s = N - 1 < p never holds). bos leads every box.
        n_k = math.prod(kv_shape)
        kv_gather = torch.cat([torch.zeros_like(kv_box[:, :1]), (kv_box + 1).clamp(max=n_k - 1)],
                              dim=1)  # (n_tiles, 1 + L)
        mask = torch.cat([torch.ones_like(mask[:, :, :1]), mask], dim=2)  # (n_tiles, Q, 1 + L)
    # Where each real query's slot is, to read the results back in raster order.
    slot_of = torch.empty(math.prod(q_shape), dtype=torch.long)  # (Nq,)
    slot_of[q_slots[real]] = torch.arange(real.numel())[real.flatten()]
    chunk_queries = BLOCKED_CHUNK_QUERIES.get(torch.device(device).type, BLOCKED_CHUNK_QUERIES["cpu"])
    chunk = max(1, chunk_queries // n_slots)
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
            chunk_qkv = _chunk_tiles(q, k, v, plan, tiles)  # (B·nh, c, Q, hs), (B·nh, c, L', hs) twice
            mask = _chunk_mask(plan, tiles, bias)  # (1 or B·nh, c, Q, L')
            out[:, tiles] = F.scaled_dot_product_attention(*chunk_qkv, attn_mask=mask)  # (B·nh, c, Q, hs)
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
                grad.index_add_(1, index[tiles].t().flatten(),
                                tile_grad.transpose(1, 2).flatten(1, 2).to(acc))
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
    q_tiles, k_tiles, v_tiles = _chunk_tiles(*(x.to(acc) for x in (q, k, v)), plan,
                                             slice(None))  # (B·nh, n, Q|L', hs)
    BH, n, Q, hs = q_tiles.shape
    if bias is None:
        entries = torch.zeros_like(plan.mask, dtype=acc).masked_fill(~plan.mask, -math.inf)  # (1, n, Q, L')
        entries = entries.expand(BH, -1, -1, -1)
    else:
        # Each slot's row of the table plus one entry of −∞, which the pairs the rule forbids read.
        rows = F.pad(_gather_tiles(bias.to(acc), plan.q_slots), (0, 1),
                     value=-math.inf)  # (B·nh, n, Q, V + 1)
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
    q_shape, kv_shape, extent = check_geometry(q_shape, kv_shape, extent, causal, bos)
    _check_qkv(q, k, v, q_shape, kv_shape)
    bias = bias_table(bias, q, extent)
    if backend == "reference":
        return nearby_attention_reference(q, k, v, q_shape, kv_shape, extent, causal, bos, bias)
    if backend == "dense":
        return _dense_attention(q, k, v, q_shape, kv_shape, extent, causal, bos, bias)
    if backend == "blocked":
        tile = as_shape("tile", tile, 1)
        return _blocked_attention(q, k, v, q_shape, kv_shape, extent, causal, bos, tile, bias)
    if backend == "flex":
        return _flex_attention(q, k, v, q_shape, kv_shape, extent, causal, bos, bias)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")

