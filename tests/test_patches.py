"""Tests for patches.py, the patch level of NÜWA-Infinity without a model: the ADC's orders, the
pool's bound and eviction, and that the pool's selection equals the context rule."""

import pytest
import torch

import patches

EXTENTS = [(1, 1, 1), (1, 2, 1), (0, 1, 2)]


def walk(order, extent):
    """Run a pool over an order with dummy states: (pool sizes, evicted per index, selected per index)."""
    pool = patches.NearbyContextPool(order, extent)
    sizes, evicted, selected = [], [], []
    for index, patch in enumerate(order):
        selected.append([q for q, _ in pool.select(patch)])
        pool.add(patch, torch.zeros(1))
        evicted.append(pool.evict(index))
        sizes.append(len(pool))
    return sizes, evicted, selected


# --- the patch grid and the orders (ADC) -------------------------------------------------------


def test_patch_grid_cuts_a_token_grid_evenly_or_says_which_sizes_fit():
    assert patches.patch_grid((2, 8, 32), patch_size=(4, 4), token_px=8) == (2, 2, 8)
    with pytest.raises(ValueError, match="smaller than one patch of 4×4 tokens \\(32×32 px\\)"):
        patches.patch_grid((1, 2, 8), patch_size=(4, 4), token_px=8)
    with pytest.raises(ValueError, match="multiples of 32×32 px"):
        patches.patch_grid((1, 8, 10), patch_size=(4, 4), token_px=8)


def test_orders_by_hand():
    grid = (1, 2, 3)
    order = patches.patch_order
    assert order("raster", grid) == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1), (0, 1, 2)]
    assert order("column", grid) == [(0, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1), (0, 0, 2), (0, 1, 2)]
    assert order("left", grid) == [(0, 0, 2), (0, 1, 2), (0, 0, 1), (0, 1, 1), (0, 0, 0), (0, 1, 0)]
    assert order("up", grid) == [(0, 1, 0), (0, 1, 1), (0, 1, 2), (0, 0, 0), (0, 0, 1), (0, 0, 2)]
    assert order("right", grid) == order("column", grid)
    assert order("down", grid) == order("raster", grid)
    video = order("video", (2, 1, 2))
    assert video == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1)]  # frame by frame
    for direction in patches.DIRECTIONS:  # every order is a permutation of the grid
        assert sorted(order(direction, (2, 3, 4))) == sorted(order("raster", (2, 3, 4)))


# --- the Nearby Context Pool -------------------------------------------------------------------


@pytest.mark.parametrize("direction", patches.DIRECTIONS)
@pytest.mark.parametrize("extent", EXTENTS)
def test_pool_never_holds_more_than_the_bound(direction, extent):
    for grid in [(1, 5, 40), (1, 40, 5), (4, 6, 7)]:  # much larger than the extents along some axis
        sizes, _, _ = walk(patches.patch_order(direction, grid), extent)
        bound = patches.pool_bound(direction, grid, extent)
        assert max(sizes) <= bound, (grid, max(sizes), bound)
        assert sizes[-1] == 0  # everything is evicted at the end
        assert bound < 0.5 * len(sizes) or grid[0] > 1  # the bound is far below the canvas


@pytest.mark.parametrize("extent", EXTENTS)
def test_pool_is_flat_along_the_order_long_side(extent):
    # Column orders: the pool does not grow with the width; row orders: not with the height.
    for direction in ("column", "right", "left"):
        peaks = [max(walk(patches.patch_order(direction, (1, 4, W)), extent)[0]) for W in (10, 20, 40)]
        assert len(set(peaks)) == 1 and peaks[0] <= patches.pool_bound(direction, (1, 4, 40), extent)
    for direction in ("raster", "down", "up", "video"):
        peaks = [max(walk(patches.patch_order(direction, (1, H, 4)), extent)[0]) for H in (10, 20, 40)]
        assert len(set(peaks)) == 1


def brute_force_last_use(order, extent) -> dict:
    """The last index whose context (by the rule) holds each patch; its own index if none does."""
    last = {p: i for i, p in enumerate(order)}
    for index in range(len(order)):
        for q in patches.context_rule(order, index, extent):
            last[q] = max(last[q], index)
    return last


@pytest.mark.parametrize("direction", patches.DIRECTIONS)
@pytest.mark.parametrize("extent", EXTENTS)
def test_each_patch_is_evicted_right_after_its_last_use(direction, extent):
    order = patches.patch_order(direction, (2, 3, 5))
    last = brute_force_last_use(order, extent)
    assert patches.last_uses(order, extent) == last
    _, evicted, _ = walk(order, extent)
    evicted_at = {q: index for index, gone in enumerate(evicted) for q in gone}
    assert evicted_at == last  # every patch evicted exactly once, right after its last use


@pytest.mark.parametrize("direction", patches.DIRECTIONS)
@pytest.mark.parametrize("extent", EXTENTS)
def test_selected_context_equals_the_rule(direction, extent):
    grid = (2, 3, 4)
    order = patches.patch_order(direction, grid)
    rank = {p: i for i, p in enumerate(order)}
    _, _, selected = walk(order, extent)
    for index, patch in enumerate(order):
        # Brute force from coordinates: every patch of the grid earlier in the order and in the box.
        expected = sorted((q for q in rank if rank[q] < index and all(
            abs(a - b) <= e for a, b, e in zip(q, patch, extent))), key=rank.get)
        assert selected[index] == expected == patches.context_rule(order, index, extent)


def test_context_by_hand():
    # The centre of a 3×3 grid, extents 1: raster sees the row above and its left neighbour;
    # column order sees the column to its left and the patch above it.
    raster, column = patches.patch_order("raster", (1, 3, 3)), patches.patch_order("column", (1, 3, 3))
    centre = (0, 1, 1)
    rule = patches.context_rule
    assert rule(raster, raster.index(centre), (1, 1, 1)) == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0)]
    assert rule(column, column.index(centre), (1, 1, 1)) == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (0, 0, 1)]
