"""Tests for 3DNA: the rule (nearby_window.py), every backend against the loop reference
(nearby_kernels.py), the layer and its decode step (nearby_attention.py). Correctness checks run in
float64 on the CPU; flex runs on CUDA (marked gpu) and, compiled for the CPU, under the slow marker."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import nearby_attention as na
import nearby_kernels as kernels

HAS_CUDA = torch.cuda.is_available()
TOL = 1e-10  # float64 agreement between two orderings of the same sums

# (q_shape, kv_shape, extent, causal, bos, tile): odd shapes that no tile divides, extents larger
# than the grid, cross-attention that shrinks and that grows the grid, images (T = 1), extent 0.
CASES = {
    "causal_bos": ((3, 5, 7), (3, 5, 7), (1, 1, 2), True, True, (1, 2, 3)),
    "causal_no_bos": ((3, 5, 7), (3, 5, 7), (1, 2, 1), True, False, (2, 2, 2)),
    "self_noncausal": ((3, 5, 7), (3, 5, 7), (1, 1, 2), False, False, (2, 3, 2)),
    "cross_shrink": ((3, 5, 7), (2, 3, 4), (1, 1, 1), False, False, (1, 2, 3)),
    "cross_grow": ((3, 5, 4), (5, 7, 9), (0, 1, 2), False, False, (2, 2, 3)),
    "extent_beyond_grid": ((3, 4, 5), (3, 4, 5), (4, 9, 9), True, True, (2, 3, 2)),
    "image_causal": ((1, 6, 5), (1, 6, 5), (3, 2, 2), True, True, (1, 4, 4)),
    "extent_zero": ((2, 4, 5), (2, 4, 5), (0, 0, 0), True, True, (1, 3, 3)),
}


def random_qkv(q_shape, kv_shape, *, batch=2, heads=3, head_size=4, dtype=torch.float64, device="cpu",
               seed=0):
    generator = torch.Generator().manual_seed(seed)
    n_q, n_k = math.prod(q_shape), math.prod(kv_shape)
    shapes = [(batch, heads, n_q, head_size), (batch, heads, n_k, head_size), (batch, heads, n_k, head_size)]
    return [torch.randn(s, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
            for s in shapes]


def out_and_grads(fn, q, k, v, seed=1):
    """Output and the q, k, v gradients of <output, a fixed random tensor>."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad((out * weights.to(out)).sum(), leaves)
    return [out.detach(), *grads]


def _module(extent, *, causal=False, context_dim=None, backend="blocked", dim=12, heads=3, seed=0):
    torch.manual_seed(seed)
    return na.NearbyAttention(dim, heads, extent, causal=causal, context_dim=context_dim,
                              backend=backend).double()


def brute_force_mask(q_shape, kv_shape, extent, causal, bos):
    """The 3DNA rule of NÜWA §3.2 (nearby_window.py's docstring), spelled out with loops over every
    (query, key) pair."""
    (T, H, W), (T2, H2, W2), (e_t, e_h, e_w) = q_shape, kv_shape, extent
    n_q, n_k = T * H * W, T2 * H2 * W2
    mask = torch.zeros(n_q, n_k, dtype=torch.bool)
    for p, (i, j, k) in enumerate(itertools.product(range(T), range(H), range(W))):
        ip, jp, kp = i * T2 // T, j * H2 // H, k * W2 // W
        for r in range(n_k):
            if bos and r == 0:
                mask[p, r] = True  # bos is always allowed
                continue
            s = r - 1 if bos else r  # the grid position of the token key r holds
            a, b, c = s // (H2 * W2), (s // W2) % H2, s % W2
            near = abs(a - ip) <= e_t and abs(b - jp) <= e_h and abs(c - kp) <= e_w
            mask[p, r] = near and (not causal or r <= p)
    return mask


# ---------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_mask_matches_the_definition(name):
    q_shape, kv_shape, extent, causal, bos, _ = CASES[name]
    expected = brute_force_mask(q_shape, kv_shape, extent, causal, bos)
    assert torch.equal(na.nearby_mask(q_shape, kv_shape, extent, causal, bos), expected)


def test_projection_formula_on_unequal_grids():
    # (i', j', k') = (⌊i·T'/T⌋, ⌊j·H'/H⌋, ⌊k·W'/W⌋), by hand: T=3 -> T'=5 and H=5 -> H'=2.
    assert na.project(torch.arange(3), 3, 5).tolist() == [0, 1, 3]
    assert na.project(torch.arange(5), 5, 2).tolist() == [0, 0, 0, 1, 1]
    # With extent 0 every query sees exactly its projected position.
    q_shape, kv_shape = (3, 5, 4), (5, 2, 7)
    mask = na.nearby_mask(q_shape, kv_shape, (0, 0, 0), causal=False)
    for p, (i, j, k) in enumerate(itertools.product(*(range(n) for n in q_shape))):
        (only,) = mask[p].nonzero().flatten().tolist()
        assert only == ((i * 5 // 3) * 2 + j * 2 // 5) * 7 + k * 7 // 4


def test_windows_are_clipped_not_shifted():
    # A corner query of a 1×6×6 grid with radius 1 sees a 2×2 box, not a shifted 3×3 one.
    mask = na.nearby_mask((1, 6, 6), (1, 6, 6), (0, 1, 1), causal=False)
    assert sorted(mask[0].nonzero().flatten().tolist()) == [0, 1, 6, 7]


def test_causal_window_keeps_right_and_lower_neighbours_of_earlier_frames():
    shape, extent = (3, 4, 4), (1, 1, 1)
    mask = na.nearby_mask(shape, shape, extent, causal=True)
    p = (1 * 4 + 1) * 4 + 1  # query (1, 1, 1)
    assert mask[p, (0 * 4 + 2) * 4 + 2]  # (0, 2, 2): lower-right, earlier frame: allowed
    assert mask[p, (1 * 4 + 1) * 4 + 0]  # (1, 1, 0): left, same frame: allowed
    assert not mask[p, (1 * 4 + 1) * 4 + 2]  # (1, 1, 2): right, same frame: later in raster order
    assert not mask[p, (1 * 4 + 2) * 4 + 0]  # (1, 2, 0): lower-left, same frame: later
    # The full 3×3 window of frame 0, row 0 of frame 1 (3), then (1, 1, 0) and the query itself.
    assert mask[p].sum() == 9 + 3 + 2
    assert mask[p].sum() == mask[p, : p + 1].sum()  # nothing later than the query


def test_tile_order_is_a_permutation_and_the_flex_mask_is_the_rule():
    from torch.nn.attention.flex_attention import create_mask

    for name in ("causal_bos", "cross_shrink", "causal_no_bos"):
        q_shape, kv_shape, extent, causal, bos, _ = CASES[name]
        q_order, kv_order, mask_mod = kernels.flex_mask_mod(q_shape, kv_shape, extent, causal, bos)
        assert torch.equal(q_order.sort().values, torch.arange(math.prod(q_shape)))
        assert torch.equal(kv_order.sort().values, torch.arange(math.prod(kv_shape)))
        flex_mask = create_mask(mask_mod, None, None, q_order.numel(), kv_order.numel(), device="cpu")[0, 0]
        rule = na.nearby_mask(q_shape, kv_shape, extent, causal, bos)  # (Nq, Nk) in raster order
        assert torch.equal(flex_mask, rule[q_order][:, kv_order])


# ---------------------------------------------------------------------------------------------
# Every backend equals the reference (float64, forward and gradients)
# ---------------------------------------------------------------------------------------------

def _reference_against_masked_softmax(q, k, v, mask):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("name", CASES)
def test_reference_is_masked_softmax_attention(name):
    # The loop reference and the mask are two independent readings of the paper: they must agree.
    q_shape, kv_shape, extent, causal, bos, _ = CASES[name]
    q, k, v = random_qkv(q_shape, kv_shape)
    mask = brute_force_mask(q_shape, kv_shape, extent, causal, bos)
    expected = _reference_against_masked_softmax(q, k, v, mask)
    got = na.nearby_attention_reference(q, k, v, q_shape, kv_shape, extent, causal, bos)
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)


# The blocked backend has two routes to one function: small calls keep their scores for autograd
# (`_blocked_kept`), large ones recompute chunk by chunk (`_BlockedAttention`). "recompute" forces
# the second on these small cases.
BLOCKED_ROUTES = [("dense", None), ("blocked", "case"), ("blocked", "default"), ("blocked", "recompute")]


def blocked_route(tile, monkeypatch) -> None:
    if tile == "recompute":
        monkeypatch.setattr(kernels, "BLOCKED_KEEP_BYTES", 0)


@pytest.mark.parametrize("backend,tile", BLOCKED_ROUTES)
@pytest.mark.parametrize("name", CASES)
def test_backend_equals_reference(name, backend, tile, monkeypatch):
    blocked_route(tile, monkeypatch)
    q_shape, kv_shape, extent, causal, bos, case_tile = CASES[name]
    q, k, v = random_qkv(q_shape, kv_shape)
    kwargs = {"tile": case_tile} if tile in ("case", "recompute") else {}
    expected = out_and_grads(
        lambda *x: na.nearby_attention_reference(*x, q_shape, kv_shape, extent, causal, bos), q, k, v)
    got = out_and_grads(lambda *x: na.nearby_attention(*x, q_shape, kv_shape, extent, causal, bos,
                                                       backend=backend, **kwargs), q, k, v)
    for what, g, e in zip(("output", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=TOL, msg=lambda m, w=what: f"{w}: {m}")


@pytest.mark.parametrize("route", ["kept", "recompute"])
def test_blocked_gradcheck(route, monkeypatch):
    # Finite differences through autograd's backward (kept scores) and the hand-written one (chunks
    # of one tile, recomputed).
    blocked_route(route, monkeypatch)
    q_shape, extent = (2, 3, 4), (1, 1, 1)
    q, k, v = (x.requires_grad_() for x in random_qkv(q_shape, q_shape, batch=1, heads=2, head_size=3))
    fn = lambda q, k, v: na.nearby_attention(q, k, v, q_shape, q_shape, extent, True, True, tile=(1, 2, 2))
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_blocked_uses_several_chunks_and_stays_exact(monkeypatch):
    # A tiny chunk size forces many chunks through forward and the recomputing backward.
    monkeypatch.setitem(kernels.BLOCKED_CHUNK_QUERIES, "cpu", 4)
    blocked_route("recompute", monkeypatch)
    kernels._blocked_plan.cache_clear()
    q_shape, kv_shape, extent, causal, bos, tile = CASES["causal_bos"]
    q, k, v = random_qkv(q_shape, kv_shape)
    expected = out_and_grads(lambda *x: na.nearby_attention(*x, q_shape, kv_shape, extent, causal, bos,
                                                            backend="dense"), q, k, v)
    got = out_and_grads(lambda *x: na.nearby_attention(*x, q_shape, kv_shape, extent, causal, bos, tile=tile),
                        q, k, v)
    assert kernels._blocked_plan(q_shape, kv_shape, extent, causal, bos, tile, torch.device("cpu")).chunk == 1
    kernels._blocked_plan.cache_clear()
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=TOL)


@pytest.mark.parametrize("causal,bos", [(True, True), (True, False), (False, False)])
def test_extents_covering_the_grid_give_full_attention(causal, bos):
    shape = (3, 4, 5)
    q, k, v = random_qkv(shape, shape)
    got = na.nearby_attention(q, k, v, shape, shape, (2, 3, 4), causal, bos, tile=(1, 2, 2))
    # Full causal attention: key r <= p, which is also the bos layout's rule with every window full.
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)


def test_bfloat16_blocked_matches_dense():
    # Any float dtype: bfloat16 on the CPU, compared at bfloat16 precision.
    q_shape, kv_shape, extent, causal, bos, tile = CASES["causal_bos"]
    q, k, v = random_qkv(q_shape, kv_shape, dtype=torch.bfloat16, head_size=16)
    got = na.nearby_attention(q, k, v, q_shape, kv_shape, extent, causal, bos, tile=tile)
    expected = na.nearby_attention_reference(*(x.double() for x in (q, k, v)), q_shape, kv_shape, extent,
                                             causal, bos)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=3e-2)


def test_blocked_keeps_small_scores_and_recomputes_large_ones(monkeypatch):
    # The route follows the size of the scores (B·nh · tiles · Q · L' floats), and only under autograd.
    q_shape, kv_shape, extent, causal, bos, tile = CASES["causal_bos"]
    q, k, v = (x.requires_grad_() for x in random_qkv(q_shape, kv_shape))
    kept = []
    monkeypatch.setattr(kernels, "_blocked_kept",
                        lambda *args, real=kernels._blocked_kept: kept.append(1) or real(*args))
    attend = lambda: na.nearby_attention(q, k, v, q_shape, kv_shape, extent, causal, bos, tile=tile)
    attend()
    assert kept == [1]  # small: plain autograd ops
    with torch.no_grad():
        attend()
    assert kept == [1]  # nothing to keep without autograd: the chunked forward
    monkeypatch.setattr(kernels, "BLOCKED_KEEP_BYTES", 0)
    attend()
    assert kept == [1]  # too large: recomputed in chunks


@pytest.mark.parametrize("route", ["kept", "recompute"])
def test_bf16_autocast_blocked_with_table_matches_the_reference(route, monkeypatch):
    # Training on a CPU with bf16 matmuls runs the layers under autocast: both routes, forward and
    # the gradients of q, k, v and a per-query table, against the float64 reference at bf16 precision.
    blocked_route(route, monkeypatch)
    q_shape, kv_shape, extent, causal, bos, tile = CASES["causal_bos"]
    q, k, v = random_qkv(q_shape, kv_shape, head_size=16)
    bias = random_bias(q.shape[1], extent, per_query=(q.shape[0], q.shape[2]))
    expected = _out_and_all_grads(lambda q, k, v, b: na.nearby_attention_reference(
        q, k, v, q_shape, kv_shape, extent, causal, bos, b), q, k, v, bias)

    def autocast_blocked(q, k, v, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            # In the model q, k, v and the table come out of bf16 projections.
            q, k, v, b = (x.to(torch.bfloat16) for x in (q, k, v, b))
            out = na.nearby_attention(q, k, v, q_shape, kv_shape, extent, causal, bos, tile=tile, bias=b)
        assert out.dtype == torch.bfloat16
        return out.double()

    got = _out_and_all_grads(autocast_blocked, *(x.float() for x in (q, k, v, bias)))
    for what, g, e in zip(("output", "dq", "dk", "dv", "dbias"), got, expected):
        scale = e.abs().max().item()
        torch.testing.assert_close(g.double(), e, rtol=0, atol=0.05 * scale,
                                   msg=lambda m, w=what: f"{w}: {m}")


def test_full_attention_runs_in_float32_under_cpu_autocast():
    # Text cross-attention (extent None) leaves bf16 autocast on the CPU, where the fused kernel's
    # bf16 backward was 10× slower: the same result as float32 up to the projections' rounding.
    torch.manual_seed(0)
    layer = na.NearbyAttention(16, 2, None, context_dim=16)
    x, memory = torch.randn(2, 12, 16), torch.randn(2, 5, 16)
    expected = layer(x, (1, 3, 4), context=memory)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x, (1, 3, 4), context=memory)
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=3e-2)


# ---------------------------------------------------------------------------------------------
# Causality and coverage, by perturbation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["dense", "blocked"])
def test_causality_by_perturbation(backend):
    # Decoder input [bos, y_0, ...]: changing y_q (key q + 1) changes no output at positions <= q.
    shape, extent = (3, 4, 5), (1, 1, 1)
    q, k, v = random_qkv(shape, shape)
    run = lambda k, v: na.nearby_attention(q, k, v, shape, shape, extent, True, True, backend=backend,
                                           **({"tile": (1, 2, 3)} if backend == "blocked" else {}))
    base = run(k, v)
    for y_q in (0, 17, 33, 58):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, y_q + 1] += 3.0
        v2[:, :, y_q + 1] += 3.0
        changed = (run(k2, v2) - base).abs().amax(dim=(0, 1, 3)) > 0  # (N,) per position
        assert not changed[: y_q + 1].any(), f"y_{y_q} leaked into earlier outputs"
        assert changed[y_q + 1:].any()  # not vacuous: someone later does read it


@pytest.mark.parametrize("backend", ["dense", "blocked"])
def test_coverage_every_in_window_earlier_position_matters(backend):
    # Query p predicts y_p at (2, 2, 2); every earlier token in its window — right and lower
    # neighbours in earlier frames included — must change its output, and nothing else may.
    shape, extent = (4, 5, 6), (1, 1, 2)
    T, H, W = shape
    q, k, v = random_qkv(shape, shape, batch=1, heads=1)
    p = (2 * H + 2) * W + 2
    run = lambda v: na.nearby_attention(q, k, v, shape, shape, extent, True, True, backend=backend,
                                        **({"tile": (1, 2, 2)} if backend == "blocked" else {}))[0, 0, p]
    base = run(v)
    influential = set()
    for s in range(p):  # y_s, held by key s + 1
        v2 = v.clone()
        v2[:, :, s + 1] += 1.0
        if not torch.equal(run(v2), base):
            influential.add(s)
    window = {(a * H + b) * W + c for a in (1, 2) for b in (1, 2, 3) for c in (0, 1, 2, 3, 4)}
    assert influential == {s for s in window if s < p}
    assert (1 * H + 3) * W + 4 in influential  # lower-right neighbour in the previous frame


# ---------------------------------------------------------------------------------------------
# The relative position bias: a learned score per head and window offset
# ---------------------------------------------------------------------------------------------

def random_bias(heads, extent, seed=2, per_query=None):
    """A table per head (nh, V), or per query (B, nh, Nq, V) when per_query = (B, Nq)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (heads, na.offset_count(extent)) if per_query is None else (per_query[0], heads, per_query[1],
                                                                          na.offset_count(extent))
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def test_relative_offset_counts_from_the_projection():
    # Query (1, 2, 3) on a 2×4×6 grid projects to (0, 1, 1) on a 1×2×2 grid; key (0, 0, 1) lies at
    # offset (0, −1, 0), entry ((0 + 1)·3 + (−1 + 1))·3 + 0 + 1 = 10 with extents (1, 1, 1).
    q_index = torch.tensor((1 * 4 + 2) * 6 + 3)
    assert int(na.relative_offset(q_index, torch.tensor(1), (2, 4, 6), (1, 2, 2), (1, 1, 1))) == 10
    assert na.offset_count((1, 1, 1)) == 28  # 27 offsets + bos


def _out_and_all_grads(fn, q, k, v, bias, seed=1):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, bias)]
    out = fn(*leaves)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return [out.detach(), *torch.autograd.grad((out * weights.to(out)).sum(), leaves)]


@pytest.mark.parametrize("per_query", [False, True])
@pytest.mark.parametrize("backend,tile", BLOCKED_ROUTES)
@pytest.mark.parametrize("name", CASES)
def test_biased_backend_equals_reference(name, backend, tile, per_query, monkeypatch):
    # Forward and the gradients of q, k, v and the table (one per head, or one per query), float64,
    # against the loop reference.
    blocked_route(tile, monkeypatch)
    q_shape, kv_shape, extent, causal, bos, case_tile = CASES[name]
    q, k, v = random_qkv(q_shape, kv_shape)
    bias = random_bias(q.shape[1], extent, per_query=(q.shape[0], q.shape[2]) if per_query else None)
    kwargs = {"tile": case_tile} if tile in ("case", "recompute") else {}
    expected = _out_and_all_grads(lambda q, k, v, b: na.nearby_attention_reference(
        q, k, v, q_shape, kv_shape, extent, causal, bos, b), q, k, v, bias)
    got = _out_and_all_grads(lambda q, k, v, b: na.nearby_attention(
        q, k, v, q_shape, kv_shape, extent, causal, bos, backend=backend, bias=b, **kwargs), q, k, v, bias)
    for what, g, e in zip(("output", "dq", "dk", "dv", "dbias"), got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=TOL, msg=lambda m, w=what: f"{w}: {m}")
    if name != "extent_zero":  # there each query reads bos alone: a softmax over one key has no gradient
        assert expected[4].abs().sum() > 0  # the table does receive gradient


def test_reference_bias_is_an_additive_score():
    # An independent reading: masked softmax over q·k/√d + bias[h, offset] built with nearby_mask
    # and a brute-force offset from the coordinates.
    q_shape, kv_shape, extent = (2, 3, 4), (2, 3, 4), (1, 1, 2)
    q, k, v = random_qkv(q_shape, kv_shape)
    bias = random_bias(q.shape[1], extent)
    n = math.prod(q_shape)
    entries = torch.full((n, n + 1), na.offset_count(extent) - 1)  # bos column stays the bos entry
    for p, (i, j, c) in enumerate(itertools.product(*map(range, q_shape))):
        for s, (a, b, d) in enumerate(itertools.product(*map(range, kv_shape))):
            offset = [max(-e, min(e, x)) + e for x, e in zip((a - i, b - j, d - c), extent)]
            entries[p, s + 1] = (offset[0] * 3 + offset[1]) * 5 + offset[2]
    mask = na.nearby_mask(q_shape, kv_shape, extent, True, True)
    # Key r holds y_{r-1} (bos at r = 0): its entry is column r; y_{N-1} is no key.
    table = bias[:, entries[:, :n]]  # (nh, N, N)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + table
    expected = logits.masked_fill(~mask, -math.inf).softmax(-1) @ v
    got = na.nearby_attention_reference(q, k, v, q_shape, kv_shape, extent, True, True, bias)
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)


def test_bias_of_the_wrong_size_is_a_clear_error():
    shape = (2, 3, 4)
    q, k, v = random_qkv(shape, shape)
    per_head = r"relative position bias must be \(heads, offset_count\(extent\)\) = \(3, 28\)"
    with pytest.raises(ValueError, match=per_head):
        na.nearby_attention(q, k, v, shape, shape, (1, 1, 1), False,
                            bias=torch.zeros(3, 27, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"per query \(B, heads, Nq, 28\) = \(2, 3, 24, 28\)"):
        na.nearby_attention(q, k, v, shape, shape, (1, 1, 1), False,
                            bias=torch.zeros(2, 3, 23, 28, dtype=torch.float64))
    layer = na.NearbyAttention(12, 3, (1, 1, 1), relative_bias=True)
    with pytest.raises(ValueError, match="covers the extent"):
        layer(torch.randn(1, 24, 12), shape, extent=(2, 1, 1))


def _biased_module(extent, backend="blocked", **kwargs):
    """A module with both relative tables (static b and query-dependent r), filled at random (divided
    by the gain the module multiplies them by, so no softmax saturates and hides a wrong entry)."""
    layer = _module(extent, **kwargs)
    biased = na.NearbyAttention(12, 3, extent, causal=kwargs.get("causal", False), backend=backend,
                                context_dim=kwargs.get("context_dim"), relative_bias=True,
                                relative_keys=True).double()
    biased.load_state_dict(layer.state_dict(), strict=False)
    if biased.position_bias is not None:
        with torch.no_grad():
            biased.position_bias.copy_(random_bias(3, extent) / na.RELATIVE_GAIN)
            keys = torch.randn(biased.relative_keys.shape, dtype=torch.float64,
                               generator=torch.Generator().manual_seed(5))
            biased.relative_keys.copy_(keys / na.RELATIVE_GAIN)
    return biased


def test_module_relative_tables_backends_agree_with_gradients():
    # The module's table b + q·rᵀ/√hs through every backend: outputs and every parameter's gradient.
    shape = (3, 4, 5)
    x = torch.randn(2, math.prod(shape), 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    results = []
    for backend in ("reference", "dense", "blocked"):
        layer = _biased_module((1, 1, 2), backend=backend, causal=True)
        out = layer(x, shape, bos=True)
        grads = torch.autograd.grad((out * out.detach().cos()).sum(), list(layer.parameters()))
        results.append([out.detach(), *grads])
    for got in results[1:]:
        for g, e in zip(got, results[0]):
            torch.testing.assert_close(g, e, rtol=0, atol=TOL)
    names = [name for name, _ in layer.named_parameters()]
    assert results[0][1 + names.index("relative_keys")].abs().sum() > 0


def test_zero_bias_changes_nothing():
    # Fresh tables are zero: an untrained layer with both attends exactly like the paper's.
    shape = (3, 4, 5)
    x = torch.randn(2, math.prod(shape), 12, dtype=torch.float64)
    plain = _module((1, 1, 2), causal=True)
    biased = na.NearbyAttention(12, 3, (1, 1, 2), causal=True, relative_bias=True,
                                relative_keys=True).double()
    biased.load_state_dict(plain.state_dict(), strict=False)
    torch.testing.assert_close(biased(x, shape, bos=True), plain(x, shape, bos=True), rtol=0, atol=TOL)


# ---------------------------------------------------------------------------------------------
# The module and its decode step
# ---------------------------------------------------------------------------------------------

def test_module_backends_agree():
    shape = (3, 4, 5)
    x = torch.randn(2, math.prod(shape), 12, dtype=torch.float64)
    outs = [_module((1, 1, 2), causal=True, backend=b)(x, shape, bos=True)
            for b in ("reference", "dense", "blocked")]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=TOL)
    assert outs[0].shape == x.shape


@pytest.mark.parametrize("biased", [False, True], ids=["plain", "relative"])
@pytest.mark.parametrize("extent", [(1, 1, 2), (2, 0, 1), (6, 1, 1), (1, 4, 9), None])
def test_self_decode_step_equals_forward(extent, biased):
    # "relative": random relative tables b and r, which the step reads from its per-frame plans.
    shape = (4, 3, 5)
    layer = _biased_module(extent, causal=True) if biased else _module(extent, causal=True)
    x = torch.randn(2, math.prod(shape), 12, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x, shape, bos=True)
        if biased:  # the full pass itself against the loop reference, tables included
            reference = _biased_module(extent, backend="reference", causal=True)
            torch.testing.assert_close(reference(x, shape, bos=True), full, rtol=0, atol=TOL)
        cache = layer.new_cache()
        steps = torch.cat([layer.step(x[:, p:p + 1], p, shape, cache) for p in range(x.shape[1])], dim=1)
    torch.testing.assert_close(steps, full, rtol=0, atol=TOL)


@pytest.mark.parametrize("biased", [False, True], ids=["plain", "relative"])
@pytest.mark.parametrize("extent,kv_shape", [((1, 1, 1), (2, 5, 3)), ((0, 2, 1), (6, 2, 4)),
                                             ((3, 4, 4), (2, 2, 3)), (None, (1, 1, 7))])
def test_cross_decode_step_equals_forward(extent, kv_shape, biased):
    shape = (4, 3, 5)
    layer = _biased_module(extent, context_dim=8) if biased else _module(extent, context_dim=8)
    x = torch.randn(2, math.prod(shape), 12, dtype=torch.float64)
    context = torch.randn(2, math.prod(kv_shape), 8, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x, shape, context=context, kv_shape=kv_shape, bos=True)
        cache = layer.new_cache()
        steps = [layer.step(x[:, :1], 0, shape, cache, context=context, kv_shape=kv_shape)]
        steps += [layer.step(x[:, p:p + 1], p, shape, cache) for p in range(1, x.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=TOL)


def test_cache_memory_does_not_grow_with_video_length():
    layer = _module((1, 1, 1), causal=True)
    sizes = {}
    for frames in (4, 16):
        shape = (frames, 3, 3)
        x = torch.randn(1, math.prod(shape), 12, dtype=torch.float64)
        cache = layer.new_cache()
        with torch.no_grad():
            for p in range(x.shape[1]):
                layer.step(x[:, p:p + 1], p, shape, cache)
        sizes[frames] = cache.nbytes()
    # bos plus e_t + 1 = 2 frames of 3×3 keys and values, 12 float64 channels each.
    assert sizes[4] == sizes[16] == 2 * (1 + 2 * 9) * 12 * 8


# ---------------------------------------------------------------------------------------------
# Bad input gives clear errors
# ---------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    shape = (2, 3, 4)
    q, k, v = random_qkv(shape, shape)
    with pytest.raises(ValueError, match="q holds N=24 tokens but q_shape=.2, 3, 5. has 30"):
        na.nearby_attention(q, k, v, (2, 3, 5), shape, (1, 1, 1), False)
    with pytest.raises(ValueError, match="k/v hold 24/24 tokens but kv_shape"):
        na.nearby_attention(q, k, v, shape, (2, 2, 4), (1, 1, 1), False)
    with pytest.raises(ValueError, match="extent must be three radii, each >= 0"):
        na.nearby_attention(q, k, v, shape, shape, (1, -1, 1), False)
    with pytest.raises(ValueError, match="cross-attention is never causal"):
        na.nearby_mask(shape, (2, 3, 2), (1, 1, 1), causal=True)
    with pytest.raises(ValueError, match="pass causal=True"):
        na.nearby_mask(shape, shape, (1, 1, 1), causal=False, bos=True)
    with pytest.raises(ValueError, match="unknown backend"):
        na.nearby_attention(q, k, v, shape, shape, (1, 1, 1), False, backend="sparse")
    with pytest.raises(ValueError, match="never causal"):
        na.NearbyAttention(12, 3, (1, 1, 1), causal=True, context_dim=8)
    with pytest.raises(ValueError, match="x holds 24 tokens"):
        _module((1, 1, 1))(torch.randn(1, 24, 12, dtype=torch.float64), (2, 3, 5))
    with pytest.raises(ValueError, match="needs kv_shape"):
        _module((1, 1, 1), context_dim=8)(torch.randn(1, 24, 12, dtype=torch.float64), shape,
                                          context=torch.randn(1, 6, 8, dtype=torch.float64))


def test_callers_reach_the_rule_and_the_kernels_through_nearby_attention():
    # nuwa.py, infinity.py, the notebooks and the README use these as nearby_attention.X: the same
    # objects as where they live, not copies.
    import nearby_window as window
    for name in ("nearby_mask", "nearby_rule", "project", "offset_count", "relative_offset", "relative_table",
                 "RELATIVE_GAIN"):
        assert getattr(na, name) is getattr(window, name), name
    for name in ("BACKENDS", "nearby_attention", "nearby_attention_reference"):
        assert getattr(na, name) is getattr(kernels, name), name


# ---------------------------------------------------------------------------------------------
# Flex (FlexAttention): CUDA, or the CPU through torch.compile (slow to compile)
# ---------------------------------------------------------------------------------------------

FLEX_CASES = ["causal_bos", "self_noncausal", "cross_shrink", "cross_grow"]


def _flex_matches_reference(name, device, dtype, atol, grads=True, biased=False):
    q_shape, kv_shape, extent, causal, bos, _ = CASES[name]
    q, k, v = random_qkv(q_shape, kv_shape, head_size=16)
    # One table per query and sequence: a wrong query order or batch index in score_mod shows.
    bias = random_bias(q.shape[1], extent, per_query=(q.shape[0], q.shape[2]))
    reference = lambda q, k, v, b=bias: na.nearby_attention_reference(q, k, v, q_shape, kv_shape, extent,
                                                                      causal, bos, b if biased else None)
    flex = lambda q, k, v, b=bias: na.nearby_attention(q, k, v, q_shape, kv_shape, extent, causal, bos,
                                                       backend="flex", bias=b if biased else None)
    moved = [x.to(device=device, dtype=dtype) for x in (q, k, v, bias)]
    if grads and biased:
        expected, got = _out_and_all_grads(reference, q, k, v, bias), _out_and_all_grads(flex, *moved)
    elif grads:
        expected, got = out_and_grads(reference, q, k, v), out_and_grads(flex, *moved[:3])
    else:
        expected, got = [reference(q, k, v)], [flex(*moved[:3], moved[3])]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double().cpu(), e, rtol=0, atol=atol)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["causal_bos", "cross_grow"])
@pytest.mark.parametrize("biased", [False, True])
def test_flex_forward_equals_reference_on_cpu(name, biased):
    # FlexAttention has no CPU backward (torch 2.13), so only the forward is checked here.
    _flex_matches_reference(name, "cpu", torch.float32, 1e-5, grads=False, biased=biased)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("name", FLEX_CASES)
@pytest.mark.parametrize("biased", [False, True])
def test_flex_equals_reference_on_cuda(name, biased):
    # Triton's float32 dots may use tf32.
    _flex_matches_reference(name, "cuda", torch.float32, 2e-3, biased=biased)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("name", CASES)
def test_blocked_equals_reference_on_cuda(name):
    q_shape, kv_shape, extent, causal, bos, tile = CASES[name]
    q, k, v = random_qkv(q_shape, kv_shape)
    expected = out_and_grads(
        lambda *x: na.nearby_attention_reference(*x, q_shape, kv_shape, extent, causal, bos), q, k, v)
    got = out_and_grads(lambda *x: na.nearby_attention(*x, q_shape, kv_shape, extent, causal, bos, tile=tile),
                        *(x.cuda() for x in (q, k, v)))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.cpu(), e, rtol=0, atol=TOL)


def test_bench_3dna_reports_its_json_contract(tmp_path):
    # The benchmark's last line is a contract (scripts parse it); a tiny grid keeps this to seconds.
    import json
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_3dna.py"
    done = subprocess.run([sys.executable, str(script), "--quick", "--shape", "2,6,6"],
                          capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("shape", "extent", "dense_s", "blocked_s", "speedup", "max_abs_diff", "scaling"):
        assert key in result, key
    assert result["shape"] == [2, 6, 6]
    assert [row["T"] for row in result["scaling"]] == [1, 2, 4]
    assert result["speedup"] == pytest.approx(result["dense_s"] / result["blocked_s"])
    assert result["max_abs_diff"] < 1e-4  # float32: the two backends compute the same function
