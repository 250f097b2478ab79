"""NÜWA-Infinity, the patch level: the global autoregression over patches.

Paper: Wu et al., "NÜWA-Infinity: Autoregressive over Autoregressive Generation for Infinite
Visual Synthesis", arXiv 2207.09814 (NeurIPS 2022). Implemented, named as in the paper's method
section: the patch-level half of "autoregressive over autoregressive" (AR over AR), i.e. the patch
orders of the Arbitrary Direction Controller (ADC), the Nearby Context Pool (NCP), and the loop that
generates a canvas or a video patch by patch. The token-level AR inside one patch, the model, is
infinity.py; the functions here take that model as an argument and never import it.

In plain words: a canvas (or a video) is a grid of VQ tokens (T, H, W), cut into patches of ph × pw
tokens, one frame deep: the patch grid (nT, nH, nW). A direction names a patch order, which says
which patch comes next (time always outermost, so a video goes frame by frame). The context of the
current patch is every patch that came earlier in the order and lies within the extents
(e_t, e_h, e_w) of it: the context rule. The NCP keeps each finished patch's per-layer keys and
values exactly as long as a later patch still needs them, and evicts it right after its last use.
Memory therefore depends on the extents and on the canvas's size *across* the order, never along
it (a wide canvas in a column order, a tall one in a row order, a video frame by frame): a model
trained on 64×128 canvases draws a 64×2048 strip column by column with the same memory and time
per patch (`pool_bound` says how many patches the pool holds at most).

What the pool caches, and why: per-layer key/value states of each finished patch, computed once
when the patch is made (with its own context), detached. Not the embedded tokens: with tokens,
every patch would re-run all layers over all its context tokens (a cost of (1 + context patches)
patch passes per patch instead of one), and a patch's context could only reach its direct
neighbours. With states, information flows across the canvas through the layers, like
Transformer-XL memory. The price is that a context patch's states depend on *its* context, so the
pool-free reference (`generate_reference`) recomputes every earlier patch from its tokens, in
order, for every patch.

Which reading of "AR over AR" this is. There is one transformer, the token-level AR of
infinity.py. The "global patch-level AR" is not a second network here: it is the patch order plus
the pool, i.e. each patch is generated conditioned on the cached states of the patches before it,
so the patches form an autoregressive sequence without a model of their own.

Sections: 1. the patch grid and the orders (ADC) · 2. the context rule · 3. the Nearby Context
Pool · 4. one patch's tokens and context · 5. generation with the pool, and the pool-free
reference · 6. outpainting: given tokens on one side.

Glossary: B batch, T frames, H W token rows / columns of the grid, (ph, pw) patch size in tokens,
P = ph·pw tokens per patch, (nT, nH, nW) the patch grid, a patch (t, i, j) its coordinates there,
order the list of patches in generation order, index a position in that list, (e_t, e_h, e_w)
extents in patches, (dt, dh, dw) a context patch's offset from the current one, C context tokens,
L caption length, D width, nh heads, hs head size, K codebook size, f pixels per token, S the pool
bound (`pool_bound`).

Deviations from the paper (each also marked `# DEVIATION` where it happens):
- Video: the `video` order goes frame by frame (raster inside a frame), so one model and one pool
  serve canvases and videos; a frame may be cut into patches like a canvas.
- The context rule is a box: every earlier patch within the extents. The paper describes nearby
  context in words; the box is our precise reading.
- What the NCP caches is our choice (above): per-layer keys and values of finished patches.
- "AR over AR" is read as one token-level transformer plus the patch order and the pool; there is
  no separate patch-level network (a small transformer over pooled per-patch summaries, whose
  output conditions the token-level model, would be another reading; it is not built).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import runtime

Patch = tuple[int, int, int]  # (t, i, j) on the patch grid

# ---------------------------------------------------------------------------------------------
# 1. The patch grid and the orders (ADC)
# ---------------------------------------------------------------------------------------------

DIRECTIONS = ("raster", "column", "right", "left", "up", "down", "video")
OUTPAINTING = ("right", "left", "up", "down")  # directions that start from given patches


def patch_grid(grid_shape: tuple[int, int, int], *, patch_size: tuple[int, int], token_px: int) -> Patch:
    """Token grid (T, H, W) → patch grid (nT, nH, nW); a clear error when it does not cut evenly
    (token_px, f, only says the sizes in pixels there)."""
    if len(grid_shape) != 3:
        raise ValueError(f"grid shape must be (T, H, W) tokens, got {tuple(grid_shape)}")
    T, H, W = grid_shape
    ph, pw = patch_size
    if T < 1 or H < ph or W < pw:
        raise ValueError(f"grid {tuple(grid_shape)} tokens is smaller than one patch of {ph}×{pw} tokens "
                         f"({ph * token_px}×{pw * token_px} px)")
    if H % ph or W % pw:
        raise ValueError(f"grid {H}×{W} tokens does not divide into patches of {ph}×{pw} tokens; use "
                         f"multiples of {ph * token_px}×{pw * token_px} px")
    return (T, H // ph, W // pw)


def check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {list(DIRECTIONS)}")


def patch_order(direction: str, grid: Patch) -> list[Patch]:
    """ADC: the global patch order. Time is always outermost (frame by frame); inside a frame:

    raster / down / video: rows top → bottom, each left → right;   up: rows bottom → top.
    column / right: columns left → right, each top → bottom;       left: columns right → left.
    (right ≡ column and down ≡ raster as orders; the outpainting names say where the given part is.)"""
    check_direction(direction)
    nT, nH, nW = grid
    rows, cols = list(range(nH)), list(range(nW))
    # DEVIATION (ADC): video patches are quarters of a frame, so `video` is raster, frame by frame.
    if direction in ("raster", "down", "video", "up"):
        inner = [(i, j) for i in (rows[::-1] if direction == "up" else rows) for j in cols]
    else:
        inner = [(i, j) for j in (cols[::-1] if direction == "left" else cols) for i in rows]
    return [(t, i, j) for t in range(nT) for i, j in inner]


# ---------------------------------------------------------------------------------------------
# 2. The context rule (NCP)
# ---------------------------------------------------------------------------------------------


def within(q: Patch, p: Patch, extent) -> bool:
    """Patch q lies in the box of extents around patch p: |dt| ≤ e_t, |dh| ≤ e_h, |dw| ≤ e_w."""
    return all(abs(a - b) <= e for a, b, e in zip(q, p, extent))


def context_rule(order: list[Patch], index: int, extent) -> list[Patch]:
    """The single source of truth (NCP): the context of patch order[index] is every patch that
    comes earlier in the order and lies within the extents, |dt| ≤ e_t, |dh| ≤ e_h, |dw| ≤ e_w,
    listed in order. O(index); the pool computes the same set in O(pool size)."""
    # DEVIATION (NCP): "nearby" read as this box of extents around the current patch.
    return [q for q in order[:index] if within(q, order[index], extent)]


def last_uses(order: list[Patch], extent) -> dict[Patch, int]:
    """For each patch, the index of the last patch whose context holds it (its own index if none):
    the pool evicts it right after that patch. O(patches · box) by scanning the extent box."""
    rank = {p: i for i, p in enumerate(order)}
    e_t, e_h, e_w = extent
    last = {}
    for p, r in rank.items():
        t, i, j = p
        box = ((t + a, i + b, j + c) for a in range(-e_t, e_t + 1)
               for b in range(-e_h, e_h + 1) for c in range(-e_w, e_w + 1))
        users = [rank[q] for q in box if q in rank]
        last[p] = max([u for u in users if u > r], default=r)
    return last


def pool_bound(direction: str, grid: Patch, extent) -> int:
    """S, the most patches the pool holds after any step. Along the order's axes from outermost to
    innermost, lengths (n1, n2, n3) and extents clipped to e_k ≤ n_k − 1, a patch's last user is at
    most S = e1·n2·n3 + e2·n3 + e3 places after it, so only patches of the last S places are alive.
    It depends on the grid's short side only if the order runs along the long side: for a wide
    canvas, column orders (column/right/left) are flat in the width, row orders grow with it."""
    check_direction(direction)
    nT, nH, nW = grid
    e_t, e_h, e_w = extent
    if direction in ("column", "right", "left"):
        axes = [(nT, e_t), (nW, e_w), (nH, e_h)]
    else:
        axes = [(nT, e_t), (nH, e_h), (nW, e_w)]
    (n1, e1), (n2, e2), (n3, e3) = [(n, min(e, n - 1)) for n, e in axes]
    return e1 * n2 * n3 + e2 * n3 + e3


# ---------------------------------------------------------------------------------------------
# 3. The Nearby Context Pool (NCP)
# ---------------------------------------------------------------------------------------------


class NearbyContextPool:
    """Finished patches' states, kept exactly as long as a later patch needs them.

    `add(patch, states)` stores a patch's per-layer keys/values (layers, 2, B, nh, P, hs), detached;
    `select(patch)` returns the pooled patches within the extents, in order (all pooled patches are
    earlier); `evict(index)` drops every patch whose last use (`last_uses`) is ≤ index. The caller
    walks the order: select → make the patch → add → evict."""

    def __init__(self, order: list[Patch], extent):
        self.order, self.extent = list(order), tuple(extent)
        self.rank = {p: i for i, p in enumerate(self.order)}
        self.last_use = last_uses(self.order, self.extent)
        self.states: dict[Patch, torch.Tensor] = {}  # insertion = order, so select() is sorted
        self.next_index = 0  # the index of the patch that `add` expects next

    def add(self, patch: Patch, states: torch.Tensor) -> None:
        if patch != self.order[self.next_index]:
            raise ValueError(f"patch {patch} added out of order; expected {self.order[self.next_index]}")
        # Render-and-optimize: pooled context is a constant, no gradient flows into it.
        # DEVIATION (NCP): what is cached is per-layer keys/values (module docstring: why).
        self.states[patch] = states.detach()
        self.next_index += 1

    def select(self, patch: Patch) -> list[tuple[Patch, torch.Tensor]]:
        return [(q, s) for q, s in self.states.items() if within(q, patch, self.extent)]

    def evict(self, index: int) -> list[Patch]:
        gone = [q for q in self.states if self.last_use[q] <= index]
        for q in gone:
            del self.states[q]
        return gone

    def __len__(self) -> int:
        return len(self.states)

    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.states.values())


# ---------------------------------------------------------------------------------------------
# 4. One patch: its tokens on the grid, and its context from the pool
# ---------------------------------------------------------------------------------------------


def cut(tokens: torch.Tensor, patch: Patch, patch_size) -> torch.Tensor:
    """The tokens of one patch, raster inside it: (B, T, H, W) → (B, P)."""
    (t, i, j), (ph, pw) = patch, patch_size
    return tokens[:, t, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw].reshape(tokens.shape[0], ph * pw)  # (B, P)


def paste(tokens: torch.Tensor, patch: Patch, patch_size, values: torch.Tensor) -> None:
    """Write one patch's tokens (B, P) into the grid tokens (B, T, H, W), in place."""
    (t, i, j), (ph, pw) = patch, patch_size
    tokens[:, t, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw] = values.view(-1, ph, pw)  # (B, ph, pw)


def gather_context(model: nn.Module, patch: Patch, selected: list[tuple[Patch, torch.Tensor]], B: int):
    """Selected (patch, states) → context states (layers, 2, B, nh, C, hs) and the model's
    ContextLayout of them (the ADC bias (layers, nh, C), each key's token position from `patch`).
    `model` is an infinity.Infinity."""
    if not selected:
        return model.empty_states(B), model.context_layout([])
    states = torch.cat([s for _, s in selected], dim=4)  # (layers, 2, B, nh, C, hs)
    offsets = [tuple(a - b for a, b in zip(q, patch)) for q, _ in selected]  # (dt, dh, dw) each
    return states, model.context_layout(offsets)


# ---------------------------------------------------------------------------------------------
# 5. Generation: with the pool (flat memory), and the pool-free reference
# ---------------------------------------------------------------------------------------------


@dataclass
class GenerationTrace:
    """What generation reports per patch, when a trace is passed (tests and the benchmark)."""

    keep_logits: bool = False  # also keep every patch's logits (B, P, K): memory O(canvas)
    pool_patches: list[int] = field(default_factory=list)  # pool size after the patch's eviction
    pool_bytes: list[int] = field(default_factory=list)  # bytes of pooled states, likewise
    context_patches: list[int] = field(default_factory=list)  # patches the patch attended to
    context_bytes: list[int] = field(default_factory=list)  # bytes of its gathered context and own states
    seconds: list[float] = field(default_factory=list)  # wall time of the patch
    logits: list[torch.Tensor] = field(default_factory=list)

    def record(self, pool, selected, context_bytes, logits, seconds) -> None:
        self.pool_patches.append(len(pool))
        self.pool_bytes.append(pool.nbytes())
        self.context_patches.append(len(selected))
        self.context_bytes.append(context_bytes)
        self.seconds.append(seconds)
        if self.keep_logits:
            self.logits.append(logits)


def prepare(model: nn.Module, grid_shape, direction: str, given, captions, batch_size):
    """Checks shared by both generators → (order, B, given tokens, keep mask), both (B, T, H, W)."""
    check_direction(direction)
    config = model.config
    grid = patch_grid(grid_shape, patch_size=config.patch_size, token_px=config.token_px)
    if direction in OUTPAINTING and (given is None or not bool(given[1].any())):
        raise ValueError(f"outpainting direction {direction!r} needs given patches: pass "
                         f"given=(tokens, keep) with some keep True, or use 'raster', 'column' or 'video'")
    sizes = {n for n in (batch_size, None if captions is None else len(captions),
                         None if given is None else given[0].shape[0]) if n is not None}
    if len(sizes) > 1:
        raise ValueError(f"batch sizes disagree: batch_size, captions and given say {sorted(sizes)}")
    B = sizes.pop() if sizes else 1
    device = model.bos.device
    given_tokens = torch.zeros(B, *grid_shape, dtype=torch.long, device=device)  # (B, T, H, W)
    keep = torch.zeros(B, *grid_shape, dtype=torch.bool, device=device)  # (B, T, H, W)
    if given is not None:
        if tuple(given[0].shape) != (B, *grid_shape) or tuple(given[1].shape) != (B, *grid_shape):
            raise ValueError(f"given tokens and keep mask must both be {(B, *grid_shape)}, got "
                             f"{tuple(given[0].shape)} and {tuple(given[1].shape)}")
        given_tokens, keep = given[0].to(device).long(), given[1].to(device).bool()
        if bool(keep.all()):
            raise ValueError("every token is given: there is nothing to generate (make the canvas larger "
                             "than the given part)")
        kept = given_tokens[keep]
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= config.codebook_size):
            raise ValueError(f"given tokens must lie in [0, {config.codebook_size})")
    return patch_order(direction, grid), B, given_tokens, keep


def doubled(guidance: float | None, captions, given_tokens, keep, B: int):
    """Guidance runs the batch twice, under the captions and under "None": (captions, given_tokens, keep) of
    2B rows. Without guidance, unchanged."""
    if guidance is None:
        return captions, given_tokens, keep
    if not guidance >= 0:
        raise ValueError(f"guidance must be ≥ 0 (1 = the captioned model alone), got {guidance}")
    if captions is None or all(c is None for c in captions):
        raise ValueError("guidance needs captions: it pushes the captioned model away from the "
                         "uncaptioned one")
    return list(captions) + [None] * B, given_tokens.repeat(2, 1, 1, 1), keep.repeat(2, 1, 1, 1)


@torch.no_grad()
def generate(model: nn.Module, grid_shape: tuple[int, int, int], direction: str = "column", *, given=None,
             captions: list[str | None] | None = None, batch_size: int | None = None,
             temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None,
             progress: bool = False, trace: GenerationTrace | None = None,
             guidance: float | None = None) -> torch.Tensor:
    """AR over AR: tokens (B, T, H, W) for a token grid of `grid_shape`, patch by patch in the
    ADC order of `direction`, each patch token by token (`model.generate_patch`, model an
    infinity.Infinity) with its context from the NCP.

    given: (tokens, keep) both (B, T, H, W): kept tokens are copied exactly (outpainting; required by
    right / left / up / down, whose orders start from the given side). temperature 0 is greedy.
    guidance s: classifier-free guidance (infinity.guide; two passes per token, two pools in one batch).
    Memory: the pool (≤ pool_bound patches) plus one patch, whatever the canvas's long side."""
    order, B, given_tokens, keep = prepare(model, grid_shape, direction, given, captions, batch_size)
    captions, given_tokens, keep = doubled(guidance, captions, given_tokens, keep, B)
    sampling = dict(temperature=temperature, top_k=top_k, generator=generator)
    size = model.config.patch_size
    with runtime.one_cpu_thread(model.bos.device):
        rows = given_tokens.shape[0]  # B, or 2B with guidance
        text = model.text_states(captions, rows)  # (layers, 2, rows, nh, L, hs), once per canvas
        pool = NearbyContextPool(order, model.config.extent)
        tokens = given_tokens.clone()  # (rows, T, H, W); the output, O(canvas) at 8 bytes a token
        for index, patch in enumerate(runtime.progress(order, enabled=progress, desc="patches", unit="patch",
                                                       leave=False)):
            start = time.perf_counter()
            selected = pool.select(patch)
            context, layout = gather_context(model, patch, selected, rows)
            made, states, logits = model.generate_patch(text, context, layout, cut(given_tokens, patch, size),
                                                        cut(keep, patch, size), sampling, guidance)
            paste(tokens, patch, size, made)
            pool.add(patch, states)
            pool.evict(index)
            if trace is not None:
                trace.record(pool, selected, context.nbytes + states.nbytes, logits,
                             time.perf_counter() - start)
        return tokens[:B]


@torch.no_grad()
def generate_reference(model: nn.Module, grid_shape: tuple[int, int, int], direction: str = "column", *,
                       given=None, captions: list[str | None] | None = None, batch_size: int | None = None,
                       temperature: float = 1.0, top_k: int | None = None,
                       generator: torch.Generator | None = None, trace: GenerationTrace | None = None,
                       guidance: float | None = None) -> torch.Tensor:
    """The slow reference of `generate`, with no pool: for every patch, recompute the states of all
    earlier patches from the tokens made so far (each with its own context by `context_rule`, in
    order, teacher-forced), then take the current patch's context by `context_rule`. O(patches²)."""
    order, B, given_tokens, keep = prepare(model, grid_shape, direction, given, captions, batch_size)
    captions, given_tokens, keep = doubled(guidance, captions, given_tokens, keep, B)
    sampling = dict(temperature=temperature, top_k=top_k, generator=generator)
    size, extent = model.config.patch_size, model.config.extent
    rows = given_tokens.shape[0]  # B, or 2B with guidance
    text = model.text_states(captions, rows)
    tokens = given_tokens.clone()  # (rows, T, H, W)
    for index, patch in enumerate(order):
        states = {}  # every earlier patch, recomputed from its tokens
        for earlier, q in enumerate(order[:index]):
            selected = [(r, states[r]) for r in context_rule(order, earlier, extent)]
            states[q] = model(cut(tokens, q, size), text, *gather_context(model, q, selected, rows))[1]
        selected = [(q, states[q]) for q in context_rule(order, index, extent)]
        context, layout = gather_context(model, patch, selected, rows)
        made, own, logits = model.generate_patch(text, context, layout, cut(given_tokens, patch, size),
                                                 cut(keep, patch, size), sampling, guidance)
        paste(tokens, patch, size, made)
        if trace is not None:
            trace.context_patches.append(len(selected))
            if trace.keep_logits:
                trace.logits.append(logits)
    return tokens[:B]


# ---------------------------------------------------------------------------------------------
# 6. Outpainting: given tokens on the side a direction starts from
# ---------------------------------------------------------------------------------------------


def outpaint_given(source: torch.Tensor, grid_shape: tuple[int, int, int], direction: str):
    """Place source tokens (B, T, h, w) on the side where `direction` starts (right: the left edge;
    left: the right edge; down: the top; up: the bottom) → (tokens, keep), both (B, T, H, W)."""
    if direction not in OUTPAINTING:
        raise ValueError(f"outpainting needs one of {list(OUTPAINTING)}, got {direction!r}")
    B, T, h, w = source.shape
    _, H, W = grid_shape
    wrong_side = (direction in ("right", "left") and h != H) or (direction in ("up", "down") and w != W)
    if T != grid_shape[0] or h > H or w > W or wrong_side:
        raise ValueError(f"source {(T, h, w)} tokens does not fit the {direction!r} side of grid "
                         f"{tuple(grid_shape)}")
    tokens = torch.zeros(B, *grid_shape, dtype=torch.long, device=source.device)  # (B, T, H, W)
    keep = torch.zeros_like(tokens, dtype=torch.bool)
    rows = slice(H - h, H) if direction == "up" else slice(0, h)
    cols = slice(W - w, W) if direction == "left" else slice(0, w)
    tokens[:, :, rows, cols], keep[:, :, rows, cols] = source, True
    return tokens, keep
