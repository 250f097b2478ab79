"""3D Nearby Attention (3DNA), the layer — NÜWA §3.2 (Wu et al., arXiv 2111.12417), Eq. 4-5.

Every modality in NÜWA is a 3D grid of tokens (T frames × H rows × W columns). `NearbyAttention` is
one multi-head attention layer whose queries on one grid read keys and values from a small
space-time window around them (self-attention, causal in the decoder) or around their projection
onto another grid (cross-attention from the decoder into the encoder output):

    Q = X·W^Q,  K = C·W^K,  V = C·W^V                              (per head; C = X for self-attention)
    y_ijk = softmax(q_ijk · K_Nᵀ / √hs + b_N) · V_N                  (Eq. 5; N = N(i, j, k) of Eq. 4)
    Y = concat(heads)·W^O

The window rule lives in nearby_window.py and the attention kernels in nearby_kernels.py; this
file holds the layer and the generation path:
1. `NearbyCache`: what a layer keeps between decode steps (a rolling buffer of the last e_t + 1
   frames for self-attention, the projected context for cross-attention).
2. Decode-step plans: for each frame, the window of each of its H·W positions as an index into the
   cache, built once from the same `nearby_rule` and `relative_offset` (`_self_step_plan`,
   `_cross_step_plan`).
3. `NearbyAttention`: projections, heads, self or cross, optional relative position tables,
   `forward` over whole grids and `step`, one token at a time, equal to a row of `forward`.

The names other files use from nearby_window.py and nearby_kernels.py (`nearby_attention`,
`nearby_mask`, `relative_table`, `RELATIVE_GAIN`, `BACKENDS`, ...) are imported below, so
`nearby_attention.X` keeps working for each of them.

Glossary: B batch, nh heads, hs head size, D = nh·hs width, (T, H, W) query grid, (T', H', W')
key/value (condition) grid, N = T·H·W and Nq / Nk query / key counts, (e_t, e_h, e_w) extents,
p a decoder input position (0 is bos), V = offset_count(extent) entries of a relative table,
L keys in a window (1 + L with bos).

Deviations from the paper (and choices the paper leaves open):
- Causality inside the 3D window (raster order) and the bos shift: see nearby_window.py.
- DEVIATION (NÜWA §3.2): the paper has no generation cache. We add a per-layer KV cache that keeps
  bos and the last e_t + 1 frames only (rolling), so decoding memory does not grow with T.
- DEVIATION (NÜWA §3.2): optional relative positions inside the window, b + q·rᵀ/√hs added to the
  scores (a learned bias per head and 3D offset, as in Swin / Neighborhood Attention, plus Shaw et
  al.'s relative keys). The paper has absolute position embeddings only; without relative ones the
  tiny models do not learn to copy from the previous frame. Zero at the start, so an untrained layer
  attends as the paper's; every backend, the decode step and the reference add the same entries.
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

# What the layer is built on: the kernels (the loop reference beside the dense, blocked and flex
# backends) and the 3D window with its relative position tables. The names in __all__ are also what
# callers reach as `nearby_attention.X` (nuwa.py, infinity.py, the notebooks, the README).
from nearby_kernels import BACKENDS, nearby_attention, nearby_attention_reference
from nearby_window import (
    PLAN_CACHE_SIZE,
    RELATIVE_GAIN,
    Shape3,
    as_shape,
    bias_table,
    biased_mask,
    bos_first,
    nearby_mask,
    nearby_rule,
    offset_count,
    project,
    raster_to_coords,
    relative_offset,
    relative_table,
)

__all__ = [
    "BACKENDS", "MODULE_EXTENT", "RELATIVE_GAIN", "NearbyAttention", "NearbyCache", "nearby_attention",
    "nearby_attention_reference", "nearby_mask", "nearby_rule", "offset_count", "project", "relative_offset",
    "relative_table",
]

MODULE_EXTENT = "module"  # default of the per-call `extent` argument: use the extent given at construction


# ---------------------------------------------------------------------------------------------
# 1. The cache of one layer for one generation
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


# ---------------------------------------------------------------------------------------------
# 2. Decode-step plans: each frame's windows as indices into the cache
# ---------------------------------------------------------------------------------------------

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


def _box_around(centre: tuple[Tensor, Tensor, Tensor], shape: Shape3,
                offsets: tuple[Tensor, Tensor, Tensor]) -> tuple[list[Tensor], Tensor]:
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
    allowed = allowed.flatten(1)  # (H·W, L)
    allowed = torch.cat([torch.ones_like(allowed[:, :1]), allowed], dim=1)  # (H·W, 1 + L)
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
    allowed = allowed.flatten(1)[:, None, None, :]  # (H·W, 1, 1, L)
    return _StepPlan(s.flatten(1).to(device), allowed.to(device), offsets.to(device))


# ---------------------------------------------------------------------------------------------
# 3. The layer
# ---------------------------------------------------------------------------------------------

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
    Both are zero at the start (the layer attends as the paper's), are stored divided by
    RELATIVE_GAIN (nearby_window.py says why), live in one table per call,
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
        self.extent = None if extent is None else as_shape("extent", extent, 0)
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
            self.relative_keys = nn.Parameter(
                torch.zeros(num_heads, offset_count(self.extent), self.head_size))

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
        extent = None if extent is None else as_shape("extent", extent, 0)
        has_table = self.position_bias is not None or self.relative_keys is not None
        if extent is not None and has_table and extent != self.extent:
            raise ValueError(f"this layer's relative position table covers the extent {self.extent}; it "
                             f"cannot attend with extent {extent}")
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
                raise ValueError("nearby cross-attention needs kv_shape, the (T', H', W') grid of the "
                                 "context")
            kv_shape = (1, 1, context.shape[1])
        kv_shape = as_shape("kv_shape", kv_shape, 1)
        if context.shape[1] != math.prod(kv_shape):
            raise ValueError(f"context holds {context.shape[1]} tokens but kv_shape={kv_shape} has "
                             f"{math.prod(kv_shape)}")
        return kv_shape

    def forward(self, x: Tensor, q_shape, context: Tensor | None = None, kv_shape=None,
                bos: bool = False, extent=MODULE_EXTENT) -> Tensor:
        """x (B, Nq, D) on grid q_shape -> (B, Nq, D). Self: keys from x. Cross: keys from context.

        bos=True: x is the decoder input [bos, y_0, ..., y_{N-2}]. It changes causal self-attention
        only: in cross-attention the query at input p uses y_p's window either way (position p).
        """
        B, n_q, _ = x.shape
        q_shape, extent = as_shape("q_shape", q_shape, 1), self._extent(extent)
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
        q = self._heads(self.q_proj(x))  # (B, nh, Nq, hs)
        k, v = self._heads(self.k_proj(source)), self._heads(self.v_proj(source))  # (B, nh, Nk, hs)
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
        q_shape = as_shape("q_shape", q_shape, 1)
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
        # keys and values (B, nh, 1 + L, hs), the mask (1, 1, 1 + L), the table entries (1 + L,)
        return (cache.keys.index_select(2, index), cache.values.index_select(2, index),
                plan.allowed[position], plan.offsets[position])

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
