"""The 3D window of 3D Nearby Attention (3DNA): which keys a query may read — NÜWA §3.2, Eq. 4
(Wu et al., arXiv 2111.12417).

Every modality in NÜWA is a 3D grid of tokens (T frames × H rows × W columns). 3DNA lets each query
see only a small space-time box around it, or around its projection onto another grid. This file is
that rule and nothing else: grid geometry, the neighbourhood, the attention mask, and which entry of
a relative position table each (query, key) pair reads. The kernels that attend through the rule
are in nearby_kernels.py; the attention layer in nearby_attention.py.

The neighbourhood (NÜWA §3.2, Eq. 4). A query at (i, j, k) on
the target grid of shape (T, H, W) attends to a condition grid C of shape (T', H', W'). Project the
query onto C,

    (i', j', k') = (⌊i·T'/T⌋, ⌊j·H'/H⌋, ⌊k·W'/W⌋),

and keep every condition position (a, b, c) with |a − i'| ≤ e_t, |b − j'| ≤ e_h, |c − k'| ≤ e_w:

    N(i, j, k) = { C_abc : |a − i'| ≤ e_t, |b − j'| ≤ e_h, |c − k'| ≤ e_w }

The extents are radii (a window of 2e + 1 per axis) and windows are clipped at the border. The
window factorises over the three axes (`window_1d`). Causal self-attention (the decoder) intersects
it with "strictly earlier in raster order, or itself" (`raster_causal`). With bos, the decoder input
is [bos, y_0, …, y_{N−2}]: key r ≥ 1 holds the token at grid position s = r − 1, and key 0 (bos) is
readable by every query. `nearby_rule` answers the question for any (query, key) pairs;
`nearby_mask` builds the whole (Nq, Nk) mask; every fast path builds its masks from the same pieces.

Relative positions. The offset of key (a, b, c) from the query's projection, (a − i', b − j', c − k'),
each in [−e, e] inside the window, selects one of V = offset_count(extent) entries of a table (one
per offset, plus one for bos), flattened as

    entry = ((Δt + e_t)·(2e_h + 1) + Δh + e_h)·(2e_w + 1) + Δw + e_w.

A layer's table is b + q·rᵀ/√hs (`relative_table`): a learned score b per head and offset, plus a
learned key vector r per head and offset dotted with the query.

Glossary: B batch, nh heads, hs head size, (T, H, W) query grid, (T', H', W') key/value (condition)
grid, N = T·H·W and Nq / Nk query / key counts, (e_t, e_h, e_w) extents, p a query's raster index,
r a key's index, s the grid position of the token a key holds (s = r without bos, s = r − 1 with
bos), V = offset_count(extent) entries of a relative table, L keys in a window.

Deviations from the paper (and choices the paper leaves open):
- The paper does not say how causality meets the 3D window. We use raster order: a query sees the
  whole window in earlier frames (right and lower neighbours included) and the raster-earlier part
  of its own frame. (The only public re-implementation sees just an above-left corner box.)
- The decoder input is shifted by a learned bos; the query at input position p predicts y_p and
  uses y_p's window (not the window of the token y_{p−1} it reads). The paper does not spell this out.
- DEVIATION (NÜWA §3.2): optional relative positions inside the window (a learned bias as in Swin /
  Neighborhood Attention, plus Shaw et al.'s relative keys). The paper has absolute position
  embeddings only; see NearbyAttention (nearby_attention.py) for why the tiny models need them.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

Shape3 = tuple[int, int, int]

# How many distinct (shapes, extent, ...) masks and plans each cache keeps; a model has only a few.
PLAN_CACHE_SIZE = 64
# The relative tables are stored divided by this gain. Adam moves every parameter by about lr per
# step whatever its scale, so a stored score reaches 5 in ~1,700 steps at lr 3e-3, and attention
# stays blurred over the window all that time; times the gain, in ~170 (the copy probe,
# benchmarks/bench_learn.py). A reparametrisation: the function is b + q·rᵀ/√hs either way, but
# stored tables mean gain × value, so changing it changes every saved model.
RELATIVE_GAIN = 10.0


# ---------------------------------------------------------------------------------------------
# 1. Arguments: grid shapes and extents
# ---------------------------------------------------------------------------------------------

def as_shape(name: str, values, minimum: int) -> Shape3:
    """Validate a (t, h, w) triple of ints >= minimum (grid sizes >= 1, extents >= 0)."""
    values = tuple(int(v) for v in values)
    if len(values) != 3 or any(v < minimum for v in values):
        what = "radii, each >= 0" if minimum == 0 else "sizes, each >= 1"
        raise ValueError(f"{name} must be three {what} (t, h, w); got {values}")
    return values


def check_geometry(q_shape, kv_shape, extent, causal: bool, bos: bool) -> tuple[Shape3, Shape3, Shape3]:
    """The argument checks shared by every entry point; returns normalised int tuples."""
    q_shape, kv_shape = as_shape("q_shape", q_shape, 1), as_shape("kv_shape", kv_shape, 1)
    extent = as_shape("extent", extent, 0)
    if causal and q_shape != kv_shape:
        raise ValueError(f"causal attention is self-attention on one grid, but q_shape={q_shape} and "
                         f"kv_shape={kv_shape} differ: cross-attention is never causal (pass causal=False)")
    if bos and not causal:
        raise ValueError("bos=True describes the decoder's shifted input [bos, y_0, ..., y_(N-2)] in "
                         "causal self-attention; pass causal=True (cross-attention ignores bos)")
    return q_shape, kv_shape, extent


# ---------------------------------------------------------------------------------------------
# 2. The rule: raster coordinates, the projection, the window, causality, the mask
# ---------------------------------------------------------------------------------------------

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
    q_shape, kv_shape, extent = check_geometry(q_shape, kv_shape, extent, causal, bos)
    n_q, n_k = math.prod(q_shape), math.prod(kv_shape)
    # The window factorises over the axes: one small (S, S') table per axis, combined by broadcasting
    # straight into booleans (no N² integer temporaries).
    near_t, near_h, near_w = (
        window_1d(torch.arange(n, device=device)[:, None], torch.arange(m, device=device)[None, :], n, m, e)
        for n, m, e in zip(q_shape, kv_shape, extent))  # (S, S') each
    mask = (near_t[:, None, None, :, None, None] & near_h[None, :, None, None, :, None]
            & near_w[None, None, :, None, None, :])  # (T, H, W, T', H', W')
    mask = mask.reshape(n_q, n_k)  # (Nq, Nk) over grid positions s
    if causal:
        mask &= raster_causal(torch.arange(n_q, device=device)[:, None],
                              torch.arange(n_k, device=device)[None, :], bos)
    if bos:
        # Key r holds y_{r-1}: column r is position s = r - 1; key 0 is bos, readable by every query.
        mask = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1)  # (N, N) over keys r
    return mask


# ---------------------------------------------------------------------------------------------
# 3. Relative positions inside the window: which table entry a pair reads, and the tables
# ---------------------------------------------------------------------------------------------

def offset_count(extent: Shape3) -> int:
    """Entries of a relative position table: one per 3D offset of the window, plus one for bos."""
    return math.prod(2 * e + 1 for e in extent) + 1


def relative_offset(q_index: Tensor, kv_index: Tensor, q_shape: Shape3, kv_shape: Shape3,
                    extent: Shape3) -> Tensor:
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
    """Entries (..., L) of keys that hold grid positions, with bos's entry (the last) put in front:
    (..., 1 + L)."""
    return torch.cat([torch.full_like(offsets[..., :1], offset_count(extent) - 1), offsets], dim=-1)


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


def bias_table(bias: Tensor | None, q: Tensor, extent: Shape3) -> Tensor | None:
    """A relative position table as (B, nh, Nq, V) in q's dtype: one per head (nh, V), or per query
    (B, nh, Nq, V) (or anything broadcasting to it); V = offset_count(extent). Wrong sizes are errors."""
    if bias is None:
        return None
    B, nh, n_q, _ = q.shape
    table = bias[None, :, None, :] if bias.dim() == 2 else bias
    V = offset_count(extent)
    wrong_size = any(t not in (1, n) for t, n in zip(table.shape[:3], (B, nh, n_q)))
    if table.dim() != 4 or table.shape[-1] != V or wrong_size:
        raise ValueError(f"relative position bias must be (heads, offset_count(extent)) = ({nh}, {V}) or "
                         f"per query (B, heads, Nq, {V}) = ({B}, {nh}, {n_q}, {V}) for extent {extent}; "
                         f"got {tuple(bias.shape)}")
    return table.to(q.dtype).expand(B, nh, n_q, V)


def biased_mask(table: Tensor, offsets: Tensor, allowed: Tensor) -> Tensor:
    """The additive attention mask of a relative position table: table[b, h, p, offset of (p, key)]
    where the rule allows the pair, −∞ elsewhere. table (B, nh, Nq, V), offsets (Nq, Nk) long,
    allowed (Nq, Nk) bool (or anything broadcasting to (B, nh, Nq, Nk)) → (B, nh, Nq, Nk)."""
    B, nh, n_q, _ = table.shape
    entries = table.gather(3, offsets.expand(B, nh, n_q, offsets.shape[-1]))  # (B, nh, Nq, Nk)
    return entries.masked_fill(~allowed, -math.inf)
