"""Tests for infinity.py with patches.py's generation loop: given patches kept, pool = pool-free
reference, render-and-optimize gradients, bad inputs, the ADC offset bias, token-level relative
positions, guidance, checkpoints old and new, pictures, the benchmark, pinned seeds.
(The patch level alone, orders and the pool, is tests/test_patches.py.)"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import needs_mnist

import checkpoints
import infinity as inf
import patches
import synthesis

K = 11  # codebook size of the toy models


def toy_model(**overrides) -> inf.Infinity:
    """float64, width 16, patches of 2×2 tokens; a random offset bias, random token-level relative
    tables and random code pixels, so that every term of the scores and embeddings is exercised."""
    config = inf.InfinityConfig.preset("tiny", dim=16, num_heads=2, layers=2, codebook_size=K,
                                       patch_size=(2, 2), **overrides)
    torch.manual_seed(0)
    model = inf.Infinity(config).double().eval()
    with torch.no_grad():
        model.offset_bias.normal_()
        for block in model.blocks:
            if block.position_bias is not None:
                block.position_bias.normal_(std=0.1)
                block.relative_keys.normal_(std=0.1)
        if config.pixel_codes:
            model.set_code_pixels(torch.rand(K, config.token_px ** 2, dtype=torch.float64))
    return model


def given_for(direction, B, grid_shape, generator):
    """Random source tokens on the side the outpainting direction starts from (one patch deep)."""
    T, H, W = grid_shape
    shape = (B, T, H, 2) if direction in ("right", "left") else (B, T, 2, W)
    return patches.outpaint_given(torch.randint(K, shape, generator=generator), grid_shape, direction)


# --- orders in training (ADC) ------------------------------------------------------------------


def test_training_order_is_deterministic_and_samples_every_direction():
    config = inf.InfinityConfig.preset("tiny")
    assert inf.num_patches(config) == 8  # 64×128 px = 16×32 tokens = 2×4 patches of 8×8
    draws = [inf.training_order(config, 0, step) for step in range(60)]
    assert draws == [inf.training_order(config, 0, step) for step in range(60)]
    assert {d for d, _ in draws} == set(inf.training_directions(config))
    assert all(order == patches.patch_order(d, (1, 2, 4)) for d, order in draws)


# --- generation --------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", patches.OUTPAINTING)
def test_given_patches_are_kept_exactly(direction):
    model = toy_model()
    gen = torch.Generator().manual_seed(1)
    grid_shape = (1, 4, 6)
    tokens, keep = given_for(direction, 2, grid_shape, gen)
    keep[0, 0, 3, 5] = True  # plus one lone kept token inside a generated patch
    tokens[0, 0, 3, 5] = 7
    made = patches.generate(model, grid_shape, direction, given=(tokens, keep), temperature=1.0,
                            generator=gen)
    assert torch.equal(made[keep], tokens[keep])
    assert not torch.equal(made[~keep], tokens[~keep])  # the rest was generated


def pooled_and_reference(direction: str, captions: list, guidance: float | None = None):
    """Greedy canvases of the pooled generator and of the pool-free reference, with their traces."""
    model = toy_model()
    grid_shape = (2, 4, 6) if direction == "video" else (1, 4, 6)
    given = None
    if direction in patches.OUTPAINTING:
        given = given_for(direction, 2, grid_shape, torch.Generator().manual_seed(2))
    traces = [patches.GenerationTrace(keep_logits=True) for _ in range(2)]
    made = [g(model, grid_shape, direction, given=given, captions=captions, temperature=0, guidance=guidance,
              trace=trace) for g, trace in zip((patches.generate, patches.generate_reference), traces)]
    return model, grid_shape, given, made, traces


@pytest.mark.parametrize("direction", patches.DIRECTIONS)
def test_pool_generation_equals_the_pool_free_reference(direction):
    captions = ["3 7", None]
    model, grid_shape, given, (fast, slow), traces = pooled_and_reference(direction, captions)
    assert torch.equal(fast, slow)  # greedy, float64: token-identical
    assert traces[0].context_patches == traces[1].context_patches
    for fast_logits, slow_logits in zip(traces[0].logits, traces[1].logits):  # every step of every patch
        torch.testing.assert_close(fast_logits, slow_logits, rtol=1e-10, atol=1e-10)
    # Sampling draws the same numbers from the same generator, so sampled canvases agree too.
    sampled = [g(model, grid_shape, direction, given=given, captions=captions, temperature=1.0, top_k=5,
                 generator=torch.Generator().manual_seed(3))
               for g in (patches.generate, patches.generate_reference)]
    assert torch.equal(*sampled)


def test_generation_memory_is_that_of_the_pool():
    model = toy_model()
    traces = []
    for W in (8, 32):  # 4 and 16 patch columns, 2 patch rows
        traces.append(patches.GenerationTrace())
        patches.generate(model, (1, 4, W), "column", temperature=0, trace=traces[-1])
    assert max(traces[0].pool_bytes) == max(traces[1].pool_bytes) > 0
    assert max(traces[1].pool_patches) <= patches.pool_bound("column", (1, 2, 16), model.config.extent)


# --- training ----------------------------------------------------------------------------------


def run_patches(model, tokens, order, captions, per_patch: bool):
    pool = patches.NearbyContextPool(order, model.config.extent)
    model.zero_grad()
    losses = [inf.patch_loss(model, tokens, order, index, pool, captions) for index in range(len(order))] \
        if not per_patch else []
    if per_patch:
        for index in range(len(order)):
            loss = inf.patch_loss(model, tokens, order, index, pool, captions)
            loss.backward()  # render-and-optimize: at once, the graph is one patch deep
            losses.append(loss.detach())
            assert all(not s.requires_grad and s.grad_fn is None for s in pool.states.values())
    else:
        sum(losses).backward()
    return torch.stack([l.detach() for l in losses]), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_render_and_optimize_gradients_equal_the_summed_loss_with_detached_context():
    model = toy_model().train()
    tokens = torch.randint(K, (2, 1, 4, 6), generator=torch.Generator().manual_seed(4))
    order = patches.patch_order("column", (1, 2, 3))
    captions = ["3", None]
    losses_a, grads_a = run_patches(model, tokens, order, captions, per_patch=True)
    losses_b, grads_b = run_patches(model, tokens, order, captions, per_patch=False)
    torch.testing.assert_close(losses_a, losses_b, rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-12, atol=1e-14, msg=name)
    # The detach matters: a pool that kept the graph gives other gradients (so this test can fail).
    add = patches.NearbyContextPool.add
    try:
        def add_with_graph(pool, patch, states):
            add(pool, patch, states)
            pool.states[patch] = states
        patches.NearbyContextPool.add = add_with_graph
        _, grads_graph = run_patches(model, tokens, order, captions, per_patch=False)
    finally:
        patches.NearbyContextPool.add = add
    assert not torch.allclose(grads_graph["token_embed.weight"], grads_b["token_embed.weight"])


def test_patch_loss_is_the_mean_cross_entropy_of_the_patch():
    model = toy_model()
    tokens = torch.randint(K, (2, 1, 2, 4), generator=torch.Generator().manual_seed(5))
    order = patches.patch_order("raster", (1, 1, 2))
    pool = patches.NearbyContextPool(order, model.config.extent)
    inf.patch_loss(model, tokens, order, 0, pool)
    context, bias = patches.gather_context(model, order[1], pool.select(order[1]), 2)
    logits, _ = model(patches.cut(tokens, order[1], (2, 2)), model.text_states(None, 2), context, bias)
    expected = -logits.log_softmax(-1).gather(-1, patches.cut(tokens, order[1], (2, 2))[..., None]).mean()
    torch.testing.assert_close(inf.patch_loss(model, tokens, order, 1, pool), expected)


def test_overfits_one_canvas_and_regenerates_it():
    config = inf.InfinityConfig.preset("tiny", dim=32, num_heads=2, layers=2, codebook_size=K,
                                       patch_size=(2, 2), directions="raster")
    torch.manual_seed(0)
    model = inf.Infinity(config)
    tokens = torch.randint(K, (1, 1, 4, 4), generator=torch.Generator().manual_seed(6))
    order = patches.patch_order("raster", (1, 2, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    # 300 steps: with every token at its own position (the last one pooled too) this toy sits on a
    # plateau near loss 0.3 around step 150-200 on one thread, and converges by step 300.
    for _ in range(300):
        optimizer.zero_grad()
        pool = patches.NearbyContextPool(order, config.extent)
        for index in range(len(order)):
            loss = inf.patch_loss(model, tokens, order, index, pool, ["5"])
            loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    made = patches.generate(model.eval(), (1, 4, 4), "raster", captions=["5"], temperature=0)
    assert torch.equal(made, tokens)


# --- the ADC offset bias -----------------------------------------------------------------------


def test_offset_bias_changes_outputs_and_has_gradients():
    model = toy_model().train()
    tokens = torch.randint(K, (1, 1, 2, 4), generator=torch.Generator().manual_seed(7))
    order = patches.patch_order("raster", (1, 1, 2))  # the second patch's context is its left neighbour
    pool = patches.NearbyContextPool(order, model.config.extent)
    inf.patch_loss(model, tokens, order, 0, pool)
    selected = pool.select(order[1])  # before patch 1 is done: then patch 0 is evicted
    model.zero_grad()
    loss = inf.patch_loss(model, tokens, order, 1, pool)
    loss.backward()
    grad = model.offset_bias.grad  # (layers, nh, 3, 3, 3)
    e_t, e_h, e_w = model.config.extent
    used = grad[:, :, e_t, e_h, e_w - 1]  # offset (0, 0, −1)
    assert (used != 0).all()  # every layer and head learns from the left neighbour's offset
    others = grad.clone()
    others[:, :, e_t, e_h, e_w - 1] = 0
    assert torch.count_nonzero(others) == 0  # and no other offset was involved
    with torch.no_grad():
        before = model(patches.cut(tokens, order[1], (2, 2)), model.text_states(None, 1),
                       *patches.gather_context(model, order[1], selected, 1))[0]
        model.offset_bias[:, :, e_t, e_h, e_w - 1] += 1.0
        after = model(patches.cut(tokens, order[1], (2, 2)), model.text_states(None, 1),
                      *patches.gather_context(model, order[1], selected, 1))[0]
    assert (before - after).abs().max() > 1e-3


def test_offset_bias_tells_apart_where_the_context_lies():
    # The same context states placed to the left or above give different logits.
    model = toy_model()
    states = torch.randn(2, 2, 1, 2, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    patch = (0, 1, 1)
    outputs = []
    for neighbour in [(0, 1, 0), (0, 0, 1)]:
        context, bias = patches.gather_context(model, patch, [(neighbour, states)], 1)
        tokens = torch.zeros(1, 4, dtype=torch.long)
        outputs.append(model(tokens, model.text_states(None, 1), context, bias)[0])
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3


# --- bad inputs --------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    model = toy_model()
    with pytest.raises(ValueError, match="smaller than one patch"):
        patches.generate(model, (1, 1, 6), "column")
    with pytest.raises(ValueError, match="unknown direction 'diagonal'"):
        patches.generate(model, (1, 4, 6), "diagonal")
    with pytest.raises(ValueError, match="does not divide into patches"):
        patches.generate(model, (1, 4, 5), "column")
    with pytest.raises(ValueError, match="needs given patches"):
        patches.generate(model, (1, 4, 6), "right")
    with pytest.raises(ValueError, match="needs given patches"):  # a mask that keeps nothing
        patches.generate(model, (1, 4, 6), "left", given=(torch.zeros(1, 1, 4, 6, dtype=torch.long),
                                                           torch.zeros(1, 1, 4, 6, dtype=torch.bool)))
    with pytest.raises(ValueError, match="batch sizes disagree"):
        patches.generate(model, (1, 4, 6), "column", captions=["3"], batch_size=2)
    with pytest.raises(ValueError, match="multiple of f = 8"):
        synthesis.generate_canvas(model, None, 64, 130)
    with pytest.raises(ValueError, match="does not fit"):
        patches.outpaint_given(torch.zeros(1, 1, 3, 2, dtype=torch.long), (1, 4, 6), "right")
    with pytest.raises(ValueError, match="unknown caption word"):
        patches.generate(model, (1, 2, 2), "column", captions=["seven"])
    with pytest.raises(ValueError, match="unknown preset"):
        inf.InfinityConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown direction"):
        inf.training_order(inf.InfinityConfig.preset("tiny", directions="raster,sideways"), 0, 0)
    order = patches.patch_order("column", (1, 2, 3))
    pool = patches.NearbyContextPool(order, (1, 1, 1))
    with pytest.raises(ValueError, match="out of order"):
        pool.add(order[1], torch.zeros(1))
    with pytest.raises(ValueError, match="expects index 0"):
        inf.patch_loss(model, torch.zeros(1, 1, 4, 6, dtype=torch.long), order, 1, pool)


# --- data and pictures -------------------------------------------------------------------------


@needs_mnist
def test_digit_canvases_are_deterministic_and_captioned():
    import batches  # Infinity's training canvases live with every stage's batches

    canvases = batches.DigitCanvases("test", 64, 128, seed=0, length=20, none_prob=0.3)
    again = batches.DigitCanvases("test", 64, 128, seed=0, length=20, none_prob=0.3)
    captions = []
    for index in range(20):
        item = canvases[index]
        assert item["image"].shape == (1, 64, 128) and 0 <= item["image"].min() and item["image"].max() <= 1
        assert torch.equal(item["image"], again[index]["image"])
        assert item["caption"] == again[index]["caption"]
        assert len(item["digits"]) == 128 // batches.SLOT_PX
        if item["caption"] is not None:
            assert item["caption"] == " ".join(str(d) for d in sorted(set(item["digits"].tolist())))
        captions.append(item["caption"])
    assert None in captions and any(c is not None for c in captions)
    with pytest.raises(ValueError, match="at least"):
        batches.DigitCanvases("test", 16, 128)


@needs_mnist
def test_training_batch_is_deterministic():
    import batches

    config = inf.InfinityConfig.preset("tiny", dim=16, num_heads=2, layers=1, batch_size=2, canvas_width=64)
    batch = batches.infinity_batch(config, 0, 3, 0, 1)
    assert batch["pixels"].shape == (2, 1, 1, 64, 64) and len(batch["caption"]) == 2
    assert torch.equal(batch["pixels"], batches.infinity_batch(config, 0, 3, 0, 1)["pixels"])


def cell_tokenizer():
    """Untrained, shapes only: the f = 8 cell tokenizer the tiny Infinity is built for."""
    import vqgan

    torch.manual_seed(0)
    config = dataclasses.replace(vqgan.VQGANConfig.preset("tiny"), cell_encoder=True, ch_mult=(1, 2, 4, 4))
    return vqgan.VQGAN(config).eval()


def test_visualise_draws_canvases_and_refuses_another_tokenizer(tmp_path):
    import vqgan

    config = inf.InfinityConfig.preset("tiny", dim=16, num_heads=2, layers=1, batch_size=2, canvas_width=64)
    tokenizer = cell_tokenizer()
    model = inf.Infinity(config)
    model.set_code_pixels(tokenizer.code_patches())
    held_out = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(0))  # any canvas will do
    path = synthesis.visualise(model, tokenizer, tmp_path / "infinity.png", real=held_out)
    assert path.exists() and path.stat().st_size > 1000 and model.training  # its mode is restored
    with pytest.raises(ValueError, match=r"held-out canvas must be \(1, 64, 64\)"):
        synthesis.visualise(model, tokenizer, tmp_path / "wrong.png", real=torch.rand(1, 64, 128))
    f4 = vqgan.VQGAN(vqgan.VQGANConfig.preset("tiny")).eval()
    with pytest.raises(ValueError, match="f = 4 .* f = 8"):
        synthesis.generate_canvas(model, f4, 64, 64)


def test_visualise_draws_a_video_twice_as_long_from_two_given_frames(tmp_path):
    config = inf.InfinityConfig.preset("tiny", dim=16, num_heads=2, layers=1, data="video", frames=2,
                                       patch_size=(8, 8), video_captions=True)
    tokenizer = cell_tokenizer()
    model = inf.Infinity(config).eval()
    model.set_code_pixels(tokenizer.code_patches())
    clip = torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(0))  # (2T, 1, 64, 64)
    path = synthesis.visualise(model, tokenizer, tmp_path / "video.png", real=clip, caption="3")
    assert path.exists() and path.with_suffix(".gif").exists() and not model.training


def test_a_checkpoint_loads_ready_and_an_old_one_loads_as_it_was_trained(tmp_path):
    model = toy_model().float()
    config = checkpoints.config_to_dict(model.config)
    checkpoints.save({"stage": "infinity", "config": config, "model": model.state_dict()},
                     tmp_path / "new.pt")
    loaded = inf.load_infinity(tmp_path / "new.pt")
    assert not loaded.training and loaded.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    # Written before the learning aids: no such config fields, and the final LayerNorm called `norm`.
    paper = inf.Infinity(inf.InfinityConfig.preset("tiny", dim=16, num_heads=2, layers=1, **inf.PAPER_SCHEME))
    old_config = {k: v for k, v in checkpoints.config_to_dict(paper.config).items()
                  if k not in inf.LEGACY_DEFAULTS}
    old_state = {k.replace("decoder_norm.", "norm."): v for k, v in paper.state_dict().items()}
    checkpoints.save({"stage": "infinity", "config": old_config, "model": old_state}, tmp_path / "old.pt")
    old = inf.load_infinity(tmp_path / "old.pt")
    assert old.config == paper.config and torch.equal(old.decoder_norm.weight, paper.decoder_norm.weight)
    with pytest.raises(FileNotFoundError, match="train.py --stage infinity"):
        inf.load_infinity(tmp_path / "missing.pt")
    checkpoints.save({"stage": "nuwa", "config": config, "model": {}}, tmp_path / "nuwa.pt")
    with pytest.raises(ValueError, match="stage 'nuwa', not 'infinity'"):
        inf.load_infinity(tmp_path / "nuwa.pt")
    wrong = {**config, "relative_radius": 1}
    checkpoints.save({"stage": "infinity", "config": wrong, "model": model.state_dict()},
                     tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="relative_radius=1"):
        inf.load_infinity(tmp_path / "wrong.pt")


# --- the benchmark -----------------------------------------------------------------------------


def test_bench_infinity_reports_its_json_contract():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_infinity.py"
    done = subprocess.run([sys.executable, str(script), "--quick", "--dim", "16", "--layers", "1",
                           "--height", "64", "--width", "64"], capture_output=True, text=True, check=True,
                          timeout=300)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("widths", "patches", "s_per_patch", "pool_bytes", "peak_bytes", "time_ratio_4x",
                "time_ratio_16x", "memory_ratio_4x", "memory_ratio_16x"):
        assert key in result, key
    assert result["widths"] == [64, 256, 1024]
    peak = result["peak_bytes"]
    assert result["memory_ratio_16x"] == pytest.approx(peak[2] / peak[0], rel=1e-3)
    assert result["memory_ratio_16x"] <= 1.3  # the pool does not grow with the width


def test_tiles_cut_a_canvas_into_frames_for_save_grid():
    canvas = torch.arange(2 * 256, dtype=torch.float32).view(1, 2, 256)
    row = synthesis.tiles(canvas)
    assert row.shape == (4, 1, 2, 64) and torch.equal(torch.cat(list(row), dim=-1), canvas)


def test_every_token_of_a_patch_reaches_its_pooled_states():
    """The pool must hold the whole patch: the last token y_{P-1} (bottom-right, next to the patches
    to the right and below) changes the patch's keys and values like any other token does."""
    model = toy_model()
    tokens = torch.randint(K, (1, 4), generator=torch.Generator().manual_seed(9))
    text = model.text_states(None, 1)
    context, bias = model.empty_states(1), model.context_layout([])
    _, states = model(tokens, text, context, bias)
    for p in (0, 3):  # the first and the last token of the 2×2 patch
        changed = tokens.clone()
        changed[0, p] = (changed[0, p] + 1) % K
        _, other = model(changed, text, context, bias)
        assert (other - states).abs().max() > 1e-3, f"token {p} does not reach the pooled states"
        assert torch.equal(other[..., :p, :], states[..., :p, :])  # earlier tokens' states are causal
    keep_none = torch.zeros_like(tokens, dtype=torch.bool)
    generated, states_made, _ = model.generate_patch(text, context, bias, tokens, keep_none,
                                                     dict(temperature=0.0))
    _, states_forced = model(generated, text, context, bias)
    # The cached steps pool what the full pass does.
    assert torch.allclose(states_made, states_forced, atol=1e-10)


def test_given_tokens_that_cover_everything_or_leave_the_codebook_are_clear_errors():
    model = toy_model()
    tokens = torch.zeros(1, 1, 2, 4, dtype=torch.long)
    keep = torch.ones_like(tokens, dtype=torch.bool)
    with pytest.raises(ValueError, match="nothing to generate"):
        patches.generate(model, (1, 2, 4), "right", given=(tokens, keep))
    keep[..., 2:] = False
    with pytest.raises(ValueError, match=r"given tokens must lie in \[0, 11\)"):
        patches.generate(model, (1, 2, 4), "right", given=(tokens + K, keep))


# --- token-level relative positions ------------------------------------------------------------


def loop_attention(block, x, prefix_k, prefix_v, prefix_bias, key_positions, query_positions, gain, R, e_t):
    """The slow reference of Block.forward's attention with relative positions: every (batch, head,
    query, key) score written out, the offset taken from explicit positions (None: no position;
    "bos": the bos slot), clipped by hand; then softmax and the weighted sum."""
    q, k, v = block.heads(x)  # (B, nh, N, hs)
    B, nh, N, hs = q.shape
    keys, values = torch.cat([prefix_k, k], 2), torch.cat([prefix_v, v], 2)
    C = prefix_k.shape[2]
    side = 2 * R + 1
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(nh):
            for i in range(N):
                scores = []
                for j in range(C + N):
                    if j >= C and j - C > i:
                        continue  # causal inside the patch
                    s = q[b, h, i] @ keys[b, h, j] / hs ** 0.5 + (prefix_bias[h, j] if j < C else 0.0)
                    where = key_positions[j]
                    if where is not None:
                        if where == "bos":
                            slot = (2 * e_t + 1) * side * side
                        else:
                            dt, dy, dx = (a - c for a, c in zip(where, query_positions[i]))
                            dt, dy, dx = max(-e_t, min(e_t, dt)), max(-R, min(R, dy)), max(-R, min(R, dx))
                            slot = ((dt + e_t) * side + dy + R) * side + dx + R
                        relative = q[b, h, i] @ block.relative_keys[h, slot] / hs ** 0.5
                        s = s + gain * (block.position_bias[h, slot] + relative)
                    scores.append((j, s))
                weights = torch.stack([s for _, s in scores]).softmax(0)
                out[b, h, i] = sum(w * values[b, h, j] for w, (j, _) in zip(weights, scores))
    return block.finish(x, out)


def test_relative_positions_equal_a_loop_over_every_query_and_key():
    """float64, forward and gradients: the gathered relative tables of Block.forward against the
    loop above, for a patch with context to its left and above (offsets across the patch border)."""
    import nearby_attention

    model = toy_model(relative_radius=2).train()
    ph, pw = model.config.patch_size
    P, L = ph * pw, model.config.text_len
    generator = torch.Generator().manual_seed(11)
    neighbours = [(0, 0, -1), (0, -1, 0), (0, -1, -1)]
    context = torch.randn(2, 2, 2, 2, len(neighbours) * P, 8, dtype=torch.float64, generator=generator)
    layout = model.context_layout(neighbours)
    text = model.text_states(["3 7", None], 2)
    prefix, prefix_bias = model.prefix(text, context, layout.bias)
    x = torch.randn(2, P + 1, 16, dtype=torch.float64, generator=generator)
    index = model.relative_index(layout.positions, L)
    block = model.blocks[0]
    fast, _ = block(x, prefix[0, 0], prefix[0, 1], prefix_bias[0], causal=True, index=index)
    # Key positions written out: caption (none), context tokens, bos, the patch's own tokens.
    key_positions = [None] * L
    for dt, dh, dw in neighbours:
        key_positions += [(dt, dh * ph + r, dw * pw + c) for r in range(ph) for c in range(pw)]
    key_positions += ["bos"] + [(0, r, c) for r in range(ph) for c in range(pw)]
    query_positions = [(0, i // pw, i % pw) for i in range(P + 1)]
    slow = loop_attention(block, x, prefix[0, 0], prefix[0, 1], prefix_bias[0], key_positions,
                          query_positions,
                          nearby_attention.RELATIVE_GAIN, 2, model.config.extent[0])
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    weights = torch.randn(fast.shape, dtype=torch.float64, generator=generator)
    tables = [block.position_bias, block.relative_keys, block.qkv.weight]
    grads = [torch.autograd.grad((out * weights).sum(), tables,
                                 retain_graph=True)
             for out in (fast, slow)]
    for fast_grad, slow_grad in zip(*grads):
        torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-10, atol=1e-12)
    assert grads[0][0].abs().sum() > 0 and grads[0][1].abs().sum() > 0


def test_cached_steps_give_the_logits_of_the_full_pass_with_relative_positions():
    model = toy_model()
    neighbours = [(0, 0, -1), (0, -1, 0)]
    context = torch.randn(2, 2, 1, 2, 2 * model.patch_tokens, 8, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(12))
    layout = model.context_layout(neighbours)
    text = model.text_states(["5"], 1)
    forced = torch.zeros(1, model.patch_tokens, dtype=torch.long)
    sampling = dict(temperature=1.0, top_k=None, generator=torch.Generator().manual_seed(0))
    made, _, step_logits = model.generate_patch(text, context, layout, forced,
                                                torch.zeros_like(forced, dtype=torch.bool), sampling)
    full_logits, _ = model(made, text, context, layout)
    torch.testing.assert_close(step_logits, full_logits, rtol=1e-10, atol=1e-10)
    # The relative tables matter: without them the same tokens score otherwise.
    with torch.no_grad():
        for block in model.blocks:
            block.position_bias.zero_()
            block.relative_keys.zero_()
    assert (model(made, text, context, layout)[0] - full_logits).abs().max() > 1e-3


def test_learning_aid_options_are_validated_and_the_paper_scheme_has_none():
    with pytest.raises(ValueError, match="relative_radius must be ≥ 0"):
        toy_model(relative_radius=-1)
    paper = inf.Infinity(inf.InfinityConfig.preset("tiny", **inf.PAPER_SCHEME))
    assert all(block.position_bias is None for block in paper.blocks)
    assert paper.head.weight is not paper.token_embed.weight and not hasattr(paper, "pixel_embed")
    aided = inf.Infinity(inf.InfinityConfig.preset("tiny"))
    assert aided.head.weight is aided.token_embed.weight
    D = aided.config.dim
    assert torch.equal(aided.blocks[0].qkv.weight[2 * D:], torch.eye(D))
    with pytest.raises(ValueError, match="code pixels of shape"):
        aided.set_code_pixels(torch.zeros(3, 3))


def test_each_layer_reads_the_caption_words_themselves_unless_text_encoder():
    """text_encoder=False (the default): a word's keys and values at every layer depend on that word
    and its slot only, so changing the second word leaves the first word's states as they were;
    text_encoder=True (the first Infinity) mixes the caption through the blocks."""
    for text_encoder in (False, True):
        model = toy_model(text_encoder=text_encoder)
        a, b = model.text_states(["3 7"], 1), model.text_states(["3 8"], 1)  # (layers, 2, 1, nh, L, hs)
        same_first_word = torch.equal(a[..., 0, :], b[..., 0, :])
        assert same_first_word != text_encoder
        assert not torch.equal(a[..., 1, :], b[..., 1, :])


@needs_mnist
def test_video_training_captions_name_the_clip_digits():
    import batches

    config = inf.InfinityConfig.preset("tiny", data="video", patch_size=(8, 8), video_captions=True,
                                       none_prob=0.25)
    drawn = [batches.infinity_batch(config, 0, step, 0, 1) for step in range(6)]
    captions = [c for batch in drawn for c in batch["caption"]]
    assert any(c is None for c in captions) and any(c is not None for c in captions)
    source = batches.infinity_source("video", 64, 128, 4, 1, 0.25, 0)
    for step, batch in enumerate(drawn):
        for i, caption in enumerate(batch["caption"]):
            if caption is not None:
                assert caption == str(int(source[step * config.batch_size + i]["digits"][0]))
    plain = inf.InfinityConfig.preset("tiny", data="video", patch_size=(8, 8))
    assert batches.infinity_batch(plain, 0, 0, 0, 1)["caption"] == [None] * plain.batch_size


# --- classifier-free guidance ------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["column", "right", "video"])
def test_guided_pool_generation_equals_the_guided_reference(direction):
    captions = ["3 7", "1"]
    model, grid_shape, given, (fast, slow), traces = pooled_and_reference(direction, captions, guidance=2.5)
    assert torch.equal(fast, slow) and fast.shape == (2, *grid_shape)
    for fast_logits, slow_logits in zip(traces[0].logits, traces[1].logits):
        assert fast_logits.shape[0] == 2  # the guided logits of the B canvases, not of the doubled batch
        torch.testing.assert_close(fast_logits, slow_logits, rtol=1e-10, atol=1e-10)
    plain = patches.GenerationTrace(keep_logits=True)
    patches.generate(model, grid_shape, direction, given=given, captions=captions, temperature=0, trace=plain)
    assert (plain.logits[-1] - traces[0].logits[-1]).abs().max() > 1e-3  # guidance 2.5 changes the scores


def test_guidance_is_u_plus_s_times_c_minus_u_and_one_is_the_captioned_model():
    model = toy_model()
    trace = patches.GenerationTrace(keep_logits=True)
    patches.generate(model, (1, 2, 2), "raster", captions=["3 7"], temperature=0, guidance=3.0, trace=trace)
    empty = model.empty_states(1), model.context_layout([])
    tokens = torch.zeros(1, 4, dtype=torch.long)  # the first token's logits do not depend on the tokens
    conditional = model(tokens, model.text_states(["3 7"], 1), *empty)[0][:, 0]
    unconditional = model(tokens, model.text_states(None, 1), *empty)[0][:, 0]
    torch.testing.assert_close(trace.logits[0][:, 0], unconditional + 3.0 * (conditional - unconditional))
    plain = patches.generate(model, (1, 4, 6), "column", captions=["3 7"], temperature=0)
    guided = patches.generate(model, (1, 4, 6), "column", captions=["3 7"], temperature=0, guidance=1.0)
    assert torch.equal(guided, plain)
    with pytest.raises(ValueError, match="guidance must be ≥ 0"):
        patches.generate(model, (1, 4, 6), "column", captions=["3"], guidance=-1.0)
    with pytest.raises(ValueError, match="guidance needs captions"):
        patches.generate(model, (1, 4, 6), "column", batch_size=1, guidance=2.0)


# Seeded generation, pinned: the same seeds must keep giving these tokens (conftest: pinned seeds).
PINNED_VIDEO = [
    [3, 3, 5, 1, 5, 1, 5, 4, 1, 3, 4, 4, 5, 3, 1, 5, 1, 5, 5, 10, 5, 5, 10, 5, 4, 10, 10, 5, 4, 1, 3,
     5, 1, 4, 0, 1, 4, 1, 4, 5, 5, 1, 1, 10, 10, 10, 10, 5],
    [8, 1, 1, 1, 4, 10, 7, 1, 1, 1, 1, 5, 4, 1, 5, 3, 10, 1, 4, 10, 3, 4, 3, 10, 4, 10, 4, 10, 10, 4,
     1, 5, 5, 0, 1, 4, 4, 1, 5, 1, 0, 10, 1, 5, 10, 10, 5, 4],
]


def test_seeded_generation_gives_the_pinned_tokens():
    model = toy_model()
    drawn = patches.generate(model, (2, 4, 6), "video", captions=["3 7", None], temperature=1.0, top_k=5,
                             generator=torch.Generator().manual_seed(3))
    assert drawn.flatten(1).tolist() == PINNED_VIDEO
    # And the numbers behind them: the summed loss of every patch of that video, teacher-forced (float64).
    order = patches.patch_order("video", (2, 2, 3))
    pool = patches.NearbyContextPool(order, model.config.extent)
    with torch.no_grad():
        total = sum(inf.patch_loss(model, drawn, order, index, pool, ["3 7", None])
                    for index in range(len(order)))
    assert float(total) == pytest.approx(25.962425346498197, rel=1e-9)
