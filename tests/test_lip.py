"""Tests for dfvqgan.py and lip.py (NÜWA-LIP): the relative-estimation layers against slow references,
hole invariance of DF-VQGAN's visible tokens (untrained and trained), symmetrical connections, visible
pixels of an inpainting, the hole-only loss, MP-S2S leaks and causality, cached = uncached
sampling, inpaint's candidates and bad inputs; and the dfvqgan / lip stages and `sample.py inpaint`
end to end on tiny checkpoints."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import needs_mnist, position_weighted_sum

import dfvqgan
import lip
import nuwa
import reader
import tasks
import vqgan

K = 32  # codebook size of the toy models
CAPTIONS = ["digit 3 is moving up", "digit 4 is moving left then right", "digit 7 is moving down"]


def toy_tokenizer(dtype=torch.float64, cell_encoder=False) -> dfvqgan.DFVQGAN:
    config = dfvqgan.DFVQGANConfig.preset("tiny", ch=8, norm_groups=4, codebook_size=K, embed_dim=8,
                                          disc_ch=8, cell_encoder=cell_encoder)
    torch.manual_seed(0)
    return dfvqgan.DFVQGAN(config).to(dtype).eval()


def toy_model(**overrides) -> lip.MPS2S:
    toy = dict(dim=32, num_heads=2, text_layers=1, token_layers=1, pixel_layers=1, decoder_layers=2,
               codebook_size=K)
    config = lip.LIPConfig.preset("tiny", **{**toy, **overrides})
    torch.manual_seed(1)
    return lip.MPS2S(config).double().eval()


def box_masks() -> torch.Tensor:
    """Three frames' masks: a middle box, two boxes touching the borders, a corner and a 1-pixel line."""
    mask = torch.zeros(3, 1, 64, 64, dtype=torch.bool)
    mask[0, :, 21:43, 9:37] = True
    mask[1, :, 0:13, 50:64] = True
    mask[1, :, 40:64, 0:9] = True
    mask[2, :, 58:64, 58:64] = True
    mask[2, :, 30, :] = True
    return mask


def frames(dtype=torch.float64, seed=0) -> torch.Tensor:
    return torch.rand(3, 1, 64, 64, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained_tokenizer() -> dfvqgan.DFVQGAN:
    """The toy DF-VQGAN after 30 Adam steps on a fixed batch with LIP's mask mix (float32; seconds)."""
    model = toy_tokenizer(torch.float32).train()
    x = frames(torch.float32).clamp(0.5, 1) * (frames(torch.float32, 1) > 0.7)  # sparse bright strokes
    optimizer = torch.optim.Adam(model.tokenizer_parameters(), lr=3e-3)
    config = model.config
    for step in range(30):
        masks = torch.stack([lip.tokenizer_training_mask(lip.item_rng(0, step, i), config) for i in range(3)])
        _, losses = model(x, masks, use_skips=torch.tensor([True, False, step % 2 == 0]), step=step)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    return model.eval()


# --- relative estimation: each masked layer against a slow, obvious reference ----------------


def test_masked_group_norm_equals_statistics_over_visible_entries():
    norm = torch.nn.GroupNorm(2, 4).double()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    m = dfvqgan.pool_mask(box_masks(), 8)  # (3, 1, 8, 8)
    out = dfvqgan.masked_group_norm(norm, x, m)
    full = norm(x)
    for b in range(3):
        for g in range(2):
            channels = slice(2 * g, 2 * g + 2)
            visible = x[b, channels][:, ~m[b, 0]]  # (2, n_visible)
            mean, var = visible.mean(), visible.var(unbiased=False)
            expected = (x[b, channels] - mean) / torch.sqrt(var + norm.eps) \
                * norm.weight[channels, None, None] + norm.bias[channels, None, None]
            got = out[b, channels]
            assert torch.allclose(got[:, ~m[b, 0]], expected[:, ~m[b, 0]], atol=1e-12)
            assert torch.allclose(got[:, m[b, 0]], full[b, channels][:, m[b, 0]], atol=1e-12)


def test_masked_attention_equals_a_loop_over_queries():
    block = vqgan.AttnBlock(8, 4).double()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    m = dfvqgan.pool_mask(box_masks()[:2], 4)  # (2, 1, 4, 4)
    out = dfvqgan.masked_attention(block, x, m)
    h = dfvqgan.masked_group_norm(block.norm, x, m)
    q, k, v = block.qkv(h).view(2, 3, 8, 16).unbind(1)  # (2, C, N) each
    for b in range(2):
        defective = m[b].view(16)
        attended = torch.zeros(8, 16, dtype=torch.float64)
        for i in range(16):
            # A visible query reads visible keys only.
            keys = torch.ones(16, dtype=torch.bool) if defective[i] else ~defective
            weights = ((q[b, :, i:i + 1] * k[b][:, keys]).sum(0) / math.sqrt(8)).softmax(0)  # (n_keys,)
            attended[:, i] = (v[b][:, keys] * weights).sum(1)
        expected = x[b] + block.proj(attended.view(1, 8, 4, 4))[0]
        assert torch.allclose(out[b], expected, atol=1e-12)


@pytest.mark.parametrize("cell_encoder", [False, True])
def test_without_holes_or_with_only_holes_dfvqgan_encodes_as_the_plain_vqgan(cell_encoder):
    model = toy_tokenizer(torch.float32, cell_encoder)
    plain = vqgan.VQGAN(model.config.vqgan_config()).eval()
    plain.load_state_dict(model.state_dict())  # the same parameters, by name
    x = frames(torch.float32)
    tokens = plain.encode(x)
    assert torch.equal(model.encode(x)[0], tokens)
    assert torch.equal(model.encode(x, torch.ones_like(x, dtype=torch.bool))[0], tokens)


# --- Bar 1: visible tokens do not depend on the hole's pixels -----------------------------------


@pytest.mark.parametrize("trained, cell_encoder", [(False, False), (True, False), (False, True)])
def test_visible_tokens_and_skips_are_identical_whatever_the_hole_contains(trained, cell_encoder, request):
    model = (request.getfixturevalue("trained_tokenizer").double() if trained
             else toy_tokenizer(cell_encoder=cell_encoder))
    x, mask = frames(), box_masks()
    hole = lip.token_mask(mask, model.config.token_shape)  # (3, 16, 16)
    indices, skips = model.encode(x, mask)
    changed_somewhere = False
    for content in (torch.zeros_like(x), torch.ones_like(x), frames(seed=5), frames(seed=6) * 100 - 50):
        other_indices, other_skips = model.encode(torch.where(mask, content, x), mask)
        assert torch.equal(indices[~hole], other_indices[~hole])
        for skip, other in zip(skips, other_skips):
            visible = ~dfvqgan.pool_mask(mask, skip.shape[-1]).expand_as(skip)
            assert torch.equal(skip[visible], other[visible])
        changed_somewhere |= not torch.equal(indices[hole], other_indices[hole])
    assert changed_somewhere  # the hole tokens do see the hole: the test could fail
    model.float()


def test_a_plain_vqgan_leaks_hole_pixels_into_visible_tokens():
    """The problem DF-VQGAN solves (receptive spreading): the same weights, run plainly, do leak."""
    model = toy_tokenizer()
    x, mask = frames(), box_masks()
    hole = lip.token_mask(mask, model.config.token_shape)
    plain_tokens = lambda frame: model.quantizer(model.encoder(frame))[1]
    changed = plain_tokens(x) != plain_tokens(torch.where(mask, torch.ones_like(x), x))
    assert changed[~hole].any()


def test_hole_tokens_are_the_max_pooled_mask():
    mask = box_masks()
    hole = lip.token_mask(mask, (16, 16))
    for b in range(3):
        for i in range(16):
            for j in range(16):
                assert bool(hole[b, i, j]) == bool(mask[b, 0, 4 * i:4 * i + 4, 4 * j:4 * j + 4].any())


# --- symmetrical connections and the decoder ---------------------------------------------------


def test_symmetrical_connection_formula():
    h, skip = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    mask = dfvqgan.pool_mask(box_masks()[:2], 16)  # (2, 1, 16, 16) pixel mask of a 16-pixel "frame"
    out = dfvqgan.DFVQGAN.connect(h, skip, mask, torch.tensor([True, False]))
    m = dfvqgan.pool_mask(mask, 4)[0].expand(3, 4, 4)
    assert torch.allclose(out[0][~m], (skip[0][~m] + h[0][~m]) / 2) and torch.equal(out[0][m], h[0][m])
    assert torch.equal(out[1], h[1])  # gate off: the skip-less decoder


@pytest.mark.parametrize("cell_encoder", [False, True])
def test_decode_of_encode_equals_the_forward_reconstruction(cell_encoder):
    model = toy_tokenizer(cell_encoder=cell_encoder)
    x, mask = frames(), box_masks()
    indices, skips = model.encode(x, mask)
    with torch.no_grad():
        with_skips, _ = model(x, mask, use_skips=True)
        without, _ = model(x, mask, use_skips=False)
    assert torch.allclose(model.decode(indices, skips, mask), with_skips, atol=1e-12)
    assert torch.allclose(model.decode(indices), without, atol=1e-12)
    assert not torch.allclose(with_skips, without)  # the connection is used (a cell encoder's one included)
    with pytest.raises(ValueError, match="needs the pixel mask"):
        model.decode(indices, skips)


# --- Bar 2: visible pixels of an inpainting are the reconstruction of the visible input ----------

VISIBLE_TOLERANCE = 0.02  # mean |Δ| per visible pixel (frames in [0, 1]) after the 30-step toy training


def test_visible_pixels_of_an_inpainting_match_the_reconstruction_of_the_visible_input(trained_tokenizer):
    """The hole's sampled tokens reach visible pixels only through the decoder's receptive field
    (convolutions, middle attention); the symmetrical connections hold visible pixels near the
    reconstruction of the visible input (the trained models' figure is in benchmarks/bench_lip.py)."""
    tokenizer = trained_tokenizer.double()
    x = frames().clamp(0.5, 1) * (frames(seed=1) > 0.7)
    mask = box_masks()
    indices, skips = tokenizer.encode(x.masked_fill(mask, 0), mask)
    hole = lip.token_mask(mask, tokenizer.config.token_shape)
    reconstruction = tokenizer.decode(indices, skips, mask)
    visible = ~mask
    deltas = {}
    for use_skips in (True, False):
        changes = []
        for seed in range(3):  # three random fillings of the hole tokens
            fill = torch.randint(K, indices.shape, generator=torch.Generator().manual_seed(seed))
            filled = torch.where(hole, fill, indices)
            out = tokenizer.decode(filled, skips, mask) if use_skips else tokenizer.decode(filled)
            reference = reconstruction if use_skips else tokenizer.decode(indices)
            changes.append((out - reference).abs()[visible].mean())
        deltas[use_skips] = max(changes)
    tokenizer.float()
    assert deltas[True] < VISIBLE_TOLERANCE


# --- Bar 3 and MP-S2S: the loss reads hole tokens only; nothing of the hole leaks in ------------


def toy_inputs(model: lip.MPS2S, batch: int = 2):
    """Text, tokens, hole, image, mask for a 4×4-token toy grid (16×16 pixels)."""
    text = model.vocabulary.encode(CAPTIONS[:batch])
    tokens = torch.randint(K, (batch, 4, 4), generator=torch.Generator().manual_seed(2))
    mask = dfvqgan.pool_mask(box_masks()[:batch], 16)  # (B, 1, 16, 16)
    image = torch.rand(batch, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return text, tokens, lip.token_mask(mask, (4, 4)), image, mask


def test_hole_token_loss_has_exactly_zero_gradient_at_visible_positions():
    model = toy_model(token_h=4, token_w=4)
    text, tokens, hole, image, mask = toy_inputs(model)
    logits = model(text, tokens, hole, image, mask)  # (B, N, K)
    logits.retain_grad()
    lip.hole_token_loss(logits, tokens, hole).backward()
    visible = ~hole.view(2, -1)
    assert visible.any() and hole.any()
    assert logits.grad[visible].abs().max() == 0
    assert (logits.grad[~visible].abs().sum(-1) > 0).all()
    # and the value is the mean cross-entropy over the hole tokens
    expected = F.cross_entropy(logits[~visible], tokens.view(2, -1)[~visible])
    assert torch.allclose(lip.hole_token_loss(logits, tokens, hole), expected)


def test_logits_ignore_hole_pixels_and_a_hole_token_is_seen_only_by_later_positions():
    model = toy_model(token_h=4, token_w=4)
    text, tokens, hole, image, mask = toy_inputs(model)
    logits = model(text, tokens, hole, image, mask)
    assert torch.equal(model(text, tokens, hole, torch.where(mask, 1 - image, image), mask), logits)
    q = int(hole[0].view(-1).nonzero()[0])  # the first hole token of frame 0
    changed = tokens.clone().view(2, -1)
    changed[0, q] = (changed[0, q] + 1) % K
    delta = (model(text, changed.view_as(tokens), hole, image, mask) - logits)[0].abs().amax(-1)  # (N,)
    assert delta[:q + 1].max() == 0  # not through the [MASK]ed token encoder, not at or before q
    assert delta[q + 1:].max() > 0  # the causal decoder reads it afterwards


@pytest.mark.parametrize("temperature, guidance, visible_input",
                         [(0.0, None, True), (1.0, None, True), (1.0, 2.5, True), (1.0, None, False)])
def test_cached_generation_gives_the_tokens_of_full_recomputation(temperature, guidance, visible_input):
    model = toy_model(token_h=4, token_w=4, visible_input=visible_input)
    text, tokens, hole, image, mask = toy_inputs(model)
    sample = lambda cache: model.generate(text, tokens, hole, image, mask, temperature=temperature, top_k=8,
                                          generator=torch.Generator().manual_seed(4), use_cache=cache,
                                          guidance_scale=guidance)
    cached = sample(True)
    assert torch.equal(cached, sample(False))
    assert torch.equal(cached[~hole], tokens[~hole])  # visible tokens forced


def test_guidance_mixes_the_caption_and_none_logits_and_scale_one_is_the_caption():
    """Greedy guided sampling = argmax of l_None + s (l_caption − l_None), position by position."""
    # The untrained toy caption moves logits by ~1 %: large enough that the toy model's guided tokens
    # differ from its unguided ones.
    SCALE = 100.0
    model = toy_model(token_h=4, token_w=4)
    text, tokens, hole, image, mask = toy_inputs(model)
    greedy = lambda s: model.generate(text, tokens, hole, image, mask, temperature=0.0, use_cache=True,
                                      guidance_scale=s)
    assert torch.equal(greedy(1.0), greedy(None))
    guided = greedy(SCALE)
    none = model.none_text(text.shape[0])
    B, h, w = tokens.shape
    with torch.no_grad():  # the slow reference: both passes recomputed on the guided tokens so far
        for p in range(h * w):
            conditioned = model(text, guided, hole, image, mask)[:, p]  # (B, K); causal: later tokens unread
            unconditioned = model(none, guided, hole, image, mask)[:, p]
            expected = (unconditioned + SCALE * (conditioned - unconditioned)).argmax(-1)
            at = hole.view(B, -1)[:, p]
            assert torch.equal(guided.view(B, -1)[at, p], expected[at])
    assert not torch.equal(guided, greedy(None))  # the None pass changes something: the test can fail


def test_caption_dropout_trains_on_none_captions():
    model = toy_model(token_h=4, token_w=4, cond_drop_prob=1.0)
    text, tokens, hole, image, mask = toy_inputs(model)
    none = model.none_text(text.shape[0])
    model.train()
    with torch.no_grad():
        dropped = model.loss(text, tokens, hole, image, mask)
        expected = lip.hole_token_loss(model(none, tokens, hole, image, mask), tokens, hole)
        kept = lip.hole_token_loss(model(text, tokens, hole, image, mask), tokens, hole)
    model.eval()
    assert torch.allclose(dropped, expected, atol=1e-12) and not torch.allclose(dropped, kept)
    assert torch.allclose(model.loss(text, tokens, hole, image, mask), kept, atol=1e-12)  # eval: no dropout
    with pytest.raises(ValueError, match="probability"):
        toy_model(cond_drop_prob=1.5)


# --- our options for CPU budgets: frozen tokens, MP-S2S started from a NÜWA -------------------


def test_the_official_decoder_input_reads_visible_tokens_only_through_the_perspectives():
    """visible_input=False: changing a visible token changes the logits only through the memory."""
    model = toy_model(token_h=4, token_w=4, visible_input=False)
    text, tokens, hole, image, mask = toy_inputs(model)
    at = (~hole[0]).nonzero()[0]  # a visible position of frame 0
    changed = tokens.clone()
    changed[0, at[0], at[1]] = (tokens[0, at[0], at[1]] + 1) % K
    memory = model.encode(text, tokens, hole, image, mask)
    with torch.no_grad():
        same_input = model.decode_logits(model.decoder_input(changed, hole), memory)
        unchanged = model.decode_logits(model.decoder_input(tokens, hole), memory)
        assert torch.allclose(same_input, unchanged, atol=1e-12)
        ours = toy_model(token_h=4, token_w=4)  # visible_input=True: the decoder input does change
        assert not torch.equal(ours.decoder_input(changed, hole), ours.decoder_input(tokens, hole))


def test_frozen_tokens_keep_the_plain_cell_vqgans_tokens_while_the_decoder_learns():
    config = dfvqgan.DFVQGANConfig.preset("tiny", ch=8, norm_groups=4, codebook_size=K, embed_dim=8,
                                          disc_ch=8, cell_encoder=True, freeze_tokens=True)
    torch.manual_seed(0)
    model = dfvqgan.DFVQGAN(config).train()
    x, mask = frames(torch.float32), box_masks()
    before, decoder = model.encode(x)[0], model.decoder.conv_out.weight.clone()
    optimizer = torch.optim.Adam(model.tokenizer_parameters(), lr=1e-2)
    for step in range(3):
        _, losses = model(x, mask, use_skips=True, step=step)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert torch.equal(model.encode(x)[0], before)  # no EMA update, no data init, no gradient
    assert not torch.equal(model.decoder.conv_out.weight, decoder)
    assert all(not p.requires_grad for p in [*model.encoder.parameters(), *model.quantizer.parameters()])
    with pytest.raises(ValueError, match="cell encoder"):
        dfvqgan.DFVQGAN(dfvqgan.DFVQGANConfig.preset("tiny", freeze_tokens=True))


NUWA_LIKE = dict(dim=32, num_heads=2, decoder_layers=2, codebook_size=K, token_h=8, token_w=8,
                 extent=(2, 2, 2), relative_bias=True, relative_keys=True, tie_head=True)


@pytest.mark.parametrize("pixel_codes", [False, True])
def test_mps2s_started_from_a_nuwa_gives_its_text_to_image_logits_on_the_caption_alone(pixel_codes):
    torch.manual_seed(0)
    source = nuwa.NUWA(nuwa.NUWAConfig(encoder_layers=0, pixel_codes=pixel_codes, **NUWA_LIKE))
    source = source.double().eval()
    with torch.no_grad():  # every parameter away from its initial value (zero tables, identity projections)
        for parameter in source.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        if pixel_codes:
            source.set_code_pixels(torch.rand(K, 64, dtype=torch.float64))
    model = toy_model(text_layers=0, patch=8, pixel_codes=pixel_codes, **NUWA_LIKE)
    assert "decoder.0.self_attn.position_bias" in lip.init_from_nuwa(model, source)
    tokens = torch.randint(K, (3, 8, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = source(nuwa.text_condition(source.vocabulary, CAPTIONS), tokens[:, None])  # (3, 64, K)
        every = torch.ones_like(tokens, dtype=torch.bool)
        caption = model.encode_caption(model.vocabulary.encode(CAPTIONS))
        got = model.decode_logits(model.decoder_input(tokens, every), caption)
    assert torch.allclose(got, expected, atol=1e-10)


def test_a_nuwa_that_does_not_fit_is_refused_naming_the_field():
    source = nuwa.NUWA(nuwa.NUWAConfig(encoder_layers=0, pixel_codes=False, **NUWA_LIKE))
    with pytest.raises(ValueError, match="extent"):
        other = toy_model(text_layers=0, patch=8, pixel_codes=False, **{**NUWA_LIKE, "extent": (0, 2, 2)})
        lip.init_from_nuwa(other, source)
    with pytest.raises(ValueError, match="text layers"):
        lip.init_from_nuwa(toy_model(text_layers=1, patch=8, pixel_codes=False, **NUWA_LIKE), source)


# --- inpaint: candidates, reranking, bad inputs -------------------------------------------------


def test_a_dfvqgan_whose_codes_mean_other_pixels_is_refused(tmp_path):
    """load_lip compares what each code looked like at training (code_pixels) with what the DF-VQGAN
    it is handed draws, or, for an MP-S2S started from a NÜWA, with the plain VQGAN whose tokens that
    DF-VQGAN froze. Same K and grid, other codes: refused, naming the file."""
    import checkpoints

    def save(stage: str, model, name: str) -> str:
        path = tmp_path / name
        checkpoints.save({"stage": stage, "config": checkpoints.config_to_dict(model.config),
                          "model": model.state_dict()}, path)
        return str(path)

    shape = dict(ch=8, norm_groups=4, codebook_size=K, embed_dim=8, cell_encoder=True)
    plains = []
    for seed in (0, 1):  # two plain cell VQGANs: the same shapes, codes numbered differently
        torch.manual_seed(seed)
        config = vqgan.VQGANConfig.preset("tiny")
        for field, value in shape.items():
            setattr(config, field, value)
        plains.append(save("vqgan", vqgan.VQGAN(config), f"plain{seed}.pt"))
    tokenizers = {}
    for name, extra in (("own", dict(init_vqgan=plains[0], freeze_tokens=True)),
                        ("other_plain", dict(init_vqgan=plains[1], freeze_tokens=True)), ("unfrozen", {})):
        torch.manual_seed(len(tokenizers))
        model = dfvqgan.DFVQGAN(dfvqgan.DFVQGANConfig.preset("tiny", **shape, disc_ch=8, **extra))
        tokenizers[name] = (model, save("dfvqgan", model, f"{name}.pt"))
    drawn_by_itself, from_nuwa = toy_model(), toy_model(init_nuwa="nuwa.pt")
    drawn_by_itself.set_code_pixels(tokenizers["unfrozen"][0].code_patches())
    from_nuwa.set_code_pixels(vqgan.load_vqgan(plains[0]).code_patches())  # as init_from_nuwa copies them in
    for model, own in ((drawn_by_itself, "unfrozen"), (from_nuwa, "own")):
        model.config.dfvqgan_ckpt = tokenizers[own][1]
        path = save("lip", model.float(), f"lip_{own}.pt")
        lip.load_lip(path)  # its own tokenizer: accepted
        for other in {"unfrozen", "own", "other_plain"} - {own}:
            with pytest.raises(ValueError, match=f"{other}.pt"):
                lip.load_lip(path, dfvqgan_ckpt=tokenizers[other][1])
    Path(plains[0]).unlink()  # the plain VQGAN left behind: the check cannot be made, and says so
    with pytest.warns(UserWarning, match="cannot check .*plain0.pt"):
        lip.load_lip(tmp_path / "lip_own.pt")


@pytest.fixture(scope="module")
def pair():
    return toy_model(), toy_tokenizer()


def test_inpaint_keeps_visible_tokens_and_picks_the_best_scored_candidate(pair):
    model, tokenizer = pair
    x, mask = frames()[:2], box_masks()[:2]
    calls = []

    def scorer(pixels, caption):
        calls.append(caption)
        return -pixels.flatten(1).mean(1)  # prefers the darkest candidate

    result, info = lip.inpaint(model, tokenizer, x, mask, CAPTIONS[:2], candidates=3, scorer=scorer,
                               generator=torch.Generator().manual_seed(0))
    assert result.shape == (2, 1, 64, 64) and info["candidates"].shape == (2, 3, 1, 64, 64)
    assert calls == CAPTIONS[:2] and info["scores"].shape == (2, 3)
    indices, _ = tokenizer.encode(x, mask)
    for b in range(2):
        assert torch.equal(info["tokens"][b][:, ~info["hole"][b]], indices[b][~info["hole"][b]].expand(3, -1))
        darkest = info["candidates"][b].flatten(1).mean(1).argmin()
        assert info["best"][b] == darkest and torch.equal(result[b], info["candidates"][b, darkest])
    assert 0 <= result.min() and result.max() <= 1


def test_inpaint_bad_inputs_are_clear_errors(pair):
    model, tokenizer = pair
    x, mask = frames()[:1], box_masks()[:1]
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        lip.inpaint(model, tokenizer, x, mask.double(), CAPTIONS[0])
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        lip.inpaint(model, tokenizer, x, mask[:, :, :32], CAPTIONS[0])
    with pytest.raises(ValueError, match="image must be"):
        lip.inpaint(model, tokenizer, x[:, :, :32], mask, CAPTIONS[0])
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        lip.inpaint(model, tokenizer, x * 255, mask, CAPTIONS[0])
    with pytest.raises(ValueError, match="no missing pixel"):
        lip.inpaint(model, tokenizer, x, torch.zeros_like(mask), CAPTIONS[0])
    with pytest.raises(ValueError, match="1 image"):
        lip.inpaint(model, tokenizer, x, mask, CAPTIONS[:2])
    with pytest.raises(ValueError, match="unknown caption word"):
        lip.inpaint(model, tokenizer, x, mask, "digit 3 is dancing")
    codebook = tokenizer.quantizer.embedding.clone() if hasattr(tokenizer.quantizer, "embedding") else None
    tokenizer.train()
    try:  # in training mode the quantiser would update its codebook from the masked frame
        with pytest.raises(ValueError, match="eval mode"):
            lip.inpaint(model, tokenizer, x, mask, CAPTIONS[0])
    finally:
        tokenizer.eval()
    if codebook is not None:
        assert torch.equal(codebook, tokenizer.quantizer.embedding)


def test_an_all_missing_mask_is_text_to_image(pair):
    """Documented behaviour: every token is sampled and the skips carry nothing."""
    model, tokenizer = pair
    x, full = frames()[:1], torch.ones(1, 1, 64, 64, dtype=torch.bool)
    result, info = lip.inpaint(model, tokenizer, x, full, CAPTIONS[0],
                               generator=torch.Generator().manual_seed(0))
    assert info["hole"].all()
    assert torch.allclose(result, tokenizer.decode(info["tokens"][:, 0]).clamp(0, 1), atol=1e-12)
    other, _ = lip.inpaint(model, tokenizer, 1 - x, full, CAPTIONS[0],
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(result, other)  # nothing of the (entirely missing) frame was read


def test_digit_scorer_is_the_classifier_probability_of_the_caption_digit():

    class ThreeForInk(torch.nn.Module):  # a stand-in classifier: the more ink, the surer it is of a 3
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(0.1))

        def forward(self, crops):
            logits = torch.zeros(len(crops), 10)
            logits[:, 3] = crops.flatten(1).sum(1) * self.scale
            return logits

    assert reader.caption_digit("digit 7 is moving up and digit 2 is moving left") == 7
    with pytest.raises(ValueError, match="names no digit"):
        reader.caption_digit("None")
    pixels = torch.zeros(3, 1, 64, 64)
    pixels[1, 0, 10:20, 10:16] = 1.0
    pixels[2, 0, 10:30, 10:20] = 1.0
    scores = reader.digit_scorer(ThreeForInk())(pixels, "digit 3 is moving up")
    assert scores[0] == 0 and 0 < scores[1] < scores[2] <= 1  # no ink: 0; more ink: more likely a 3
    assert reader.digit_scorer(ThreeForInk())(pixels, "digit 4 is moving up")[2] < scores[2]


def test_nuwa_caption_scorer_prefers_the_candidate_its_caption_explains():

    class TokensInPixels:  # a stand-in tokenizer: the token ids are written in the pixels' top-left corner
        def encode(self, pixels):
            return pixels[:, 0, :3, :4].round().long()  # (K, 3, 4)

    config = nuwa.NUWAConfig.preset("tiny", dim=32, num_heads=2, decoder_layers=2, codebook_size=8, token_h=3,
                                    token_w=4, max_frames=2, pixel_codes=False)
    torch.manual_seed(0)
    model = nuwa.NUWA(config)
    captions = ["digit 1 is moving left", "digit 2 is moving left"]
    # (2, 1, 3, 4): caption i → code i + 1
    grids = torch.stack([torch.full((1, 3, 4), 1), torch.full((1, 3, 4), 2)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):  # "None" sees both grids, each caption only its own
        loss = (model.loss(nuwa.text_condition(model.vocabulary, captions), grids)
                + model.loss(nuwa.none_condition(model.vocabulary, 2), grids))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    pixels = torch.zeros(2, 1, 64, 64)
    pixels[0, 0, :3, :4], pixels[1, 0, :3, :4] = 1.0, 2.0
    score = tasks.nuwa_caption_scorer(model, TokensInPixels())
    first, second = score(pixels, captions[0]), score(pixels, captions[1])
    assert first[0] > 0 > first[1] and second[1] > 0 > second[0]  # log p(z | caption) − log p(z | None)


# --- masks ---------------------------------------------------------------------------------


def test_half_digit_mask_covers_the_named_half_of_the_ink_box():
    frame = torch.zeros(1, 64, 64)
    frame[0, 10:30, 20:34] = 1.0  # ink box rows 10-29, columns 20-33
    expected = {"top": (10, 20, 20, 34), "bottom": (20, 30, 20, 34),
                "left": (10, 30, 20, 27), "right": (10, 30, 27, 34)}
    for side, (y0, y1, x0, x1) in expected.items():
        mask = lip.half_digit_mask(frame, side)
        box = torch.zeros_like(mask)
        box[0, y0:y1, x0:x1] = True
        assert torch.equal(mask, box), side
    assert lip.half_digit_mask(torch.zeros(1, 64, 64), "top").all()  # no ink: everything is missing
    with pytest.raises(ValueError, match="unknown side"):
        lip.half_digit_mask(frame, "middle")


def test_training_masks_are_a_function_of_seed_step_and_item():
    frame = torch.zeros(1, 64, 64)
    frame[0, 10:30, 20:34] = 1.0
    draw = lambda *key: lip.training_mask(frame, lip.item_rng(*key), 0.4, 0.4)
    assert torch.equal(draw(0, 5, 1), draw(0, 5, 1))
    masks = [draw(0, 5, i) for i in range(12)]
    assert not all(torch.equal(masks[0], m) for m in masks[1:])
    assert all(m.any() and m.dtype == torch.bool and m.shape == (1, 64, 64) for m in masks)
    config = dfvqgan.DFVQGANConfig()
    kinds = [lip.tokenizer_training_mask(lip.item_rng(0, 0, i), config).float().mean().item()
             for i in range(60)]
    assert 0.0 in kinds and 1.0 in kinds and any(0 < k < 1 for k in kinds)  # none, full, boxes


# --- training stages and sample.py, end to end on tiny checkpoints ----------------------------

TINY_DFVQGAN = ["--ch", "8", "--norm-groups", "4", "--codebook-size", str(K), "--embed-dim", "8",
                "--disc-ch", "8", "--batch-size", "4", "--frames-per-clip", "2", "--disc-start", "1"]
TINY_LIP = ["--dim", "32", "--num-heads", "2", "--token-layers", "1", "--pixel-layers", "1",
            "--decoder-layers", "1", "--codebook-size", str(K), "--batch-size", "2"]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    import train

    out = tmp_path_factory.mktemp("lip_run")
    common = ["--preset", "tiny", "--max-steps", "2", "--sample-every", "0", "--device", "cpu",
              "--out", str(out)]
    train.main(["--stage", "dfvqgan", *common, *TINY_DFVQGAN])
    train.main(["--stage", "lip", *common, *TINY_LIP, "--dfvqgan-ckpt", str(out / "dfvqgan" / "ckpt.pt")])
    return out


@needs_mnist
def test_dfvqgan_and_lip_stages_train_and_resume(run_folder, tmp_path, monkeypatch):
    import shutil

    import stages
    import train

    folder = shutil.copytree(run_folder, tmp_path / "run")  # the module's run stays as trained for the others
    tokenizer_path = str(run_folder / "dfvqgan" / "ckpt.pt")  # the one the LIP recorded, left at step 2
    for stage, flags in (("lip", [*TINY_LIP, "--dfvqgan-ckpt", tokenizer_path]), ("dfvqgan", TINY_DFVQGAN)):
        path = folder / stage / "ckpt.pt"
        checkpoint = torch.load(path, weights_only=True)
        assert checkpoint["step"] == 2 and (folder / stage / "samples.png").stat().st_size > 0
        train.main(["--stage", stage, "--preset", "tiny", "--max-steps", "3", "--sample-every", "0",
                    "--device", "cpu", "--out", str(folder), "--resume", *flags])
        assert torch.load(path, weights_only=True)["step"] == 3
        if stage == "lip":  # resumed on the DF-VQGAN it was trained with
            model, tokenizer = lip.load_lip(folder / "lip" / "ckpt.pt", dfvqgan_ckpt=tokenizer_path)
            assert model.config.dim == 32 and tokenizer.config.codebook_size == K and not model.training
    # The DF-VQGAN trained one step further draws other pixels.
    with pytest.raises(ValueError, match="not the tokenizer this model was trained on"):
        lip.load_lip(folder / "lip" / "ckpt.pt", dfvqgan_ckpt=str(folder / "dfvqgan" / "ckpt.pt"))
    # Nor does training resume when the recorded file was trained on since (here: the path the LIP
    # recorded now gives the DF-VQGAN trained one step further): the stored code pixels would hide the
    # new drawing.
    trained_on = dfvqgan.load_dfvqgan(folder / "dfvqgan" / "ckpt.pt").requires_grad_(False)
    monkeypatch.setattr(stages, "frozen_dfvqgan", lambda path, device: trained_on)
    with pytest.raises(ValueError, match="cannot resume .*code_pixels"):
        train.main(["--stage", "lip", "--preset", "tiny", "--max-steps", "4", "--sample-every", "0",
                    "--device", "cpu", "--out", str(folder), "--resume", *TINY_LIP,
                    "--dfvqgan-ckpt", tokenizer_path])
    assert torch.load(folder / "lip" / "ckpt.pt", weights_only=True)["step"] == 3  # untouched
    log = (folder / "lip" / "log.jsonl").read_text()
    assert "hole_fraction" in log


@needs_mnist
def test_stage_batches_are_deterministic_and_lip_uses_the_nuwa_t2i_frames():
    import batches
    import nuwa

    config = lip.LIPConfig.preset("tiny", batch_size=2)
    first, again = batches.lip_batch(config, 0, 7, 1, 2), batches.lip_batch(config, 0, 7, 1, 2)
    assert torch.equal(first["mask"], again["mask"]) and torch.equal(first["image"], again["image"])
    t2i = batches.nuwa_batch(nuwa.NUWAConfig.preset("tiny", tasks="t2i", seg_ckpt=""), 0, 7, 1, 2)["t2i"]
    assert torch.equal(first["image"], t2i["video"][:, 0]) and first["caption"] == t2i["caption"]
    tokenizer_config = dfvqgan.DFVQGANConfig.preset("tiny", batch_size=4, frames_per_clip=2)
    one = batches.dfvqgan_batch(tokenizer_config, 0, 3, 0, 1)
    halves = [batches.dfvqgan_batch(tokenizer_config, 0, 3, part, 2) for part in range(2)]
    assert torch.equal(one["mask"], torch.cat([h["mask"] for h in halves]))  # micro-batches cut one batch
    assert torch.equal(one["use_skips"], torch.cat([h["use_skips"] for h in halves]))


@needs_mnist
def test_sample_inpaint_writes_pictures_and_rejects_bad_files(run_folder, tmp_path):
    from PIL import Image

    import sample

    ckpt = str(run_folder / "lip" / "ckpt.pt")
    common = ["inpaint", "--ckpt", ckpt, "--dfvqgan", str(run_folder / "dfvqgan" / "ckpt.pt"),
              "--device", "cpu", "--classifier", ""]
    written = sample.main([*common, "--out", str(tmp_path / "default"), "--candidates", "2"])
    assert written and all(path.stat().st_size > 1000 for path in written)
    frame = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[20:40, 10:50] = 255
    Image.fromarray(frame).save(tmp_path / "frame.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    written = sample.main([*common, "--image", str(tmp_path / "frame.png"), "--mask",
                           str(tmp_path / "mask.png"), "--caption", "digit 5 is moving up",
                           "--out", str(tmp_path / "files")])
    assert written
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(ValueError, match="no missing pixel"):
        sample.main([*common, "--image", str(tmp_path / "frame.png"), "--mask", str(tmp_path / "empty.png"),
                     "--caption", "digit 5 is moving up", "--out", str(tmp_path / "bad")])
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="64×64"):
        sample.main([*common, "--image", str(tmp_path / "frame.png"), "--mask", str(tmp_path / "small.png"),
                     "--caption", "digit 5 is moving up", "--out", str(tmp_path / "bad")])
    (tmp_path / "garbage.png").write_bytes(b"not a picture")
    with pytest.raises(ValueError, match="not a readable image"):
        sample.main([*common, "--image", str(tmp_path / "frame.png"), "--mask", str(tmp_path / "garbage.png"),
                     "--caption", "digit 5 is moving up", "--out", str(tmp_path / "bad")])
    with pytest.raises(ValueError, match="--image and --mask"):
        sample.main([*common, "--image", str(tmp_path / "frame.png"), "--out", str(tmp_path / "bad")])


@needs_mnist
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_both_stages_train_under_torchrun(mode, tmp_path):
    """Two CPU processes (gloo), DDP or FSDP2: each stage trains 2 steps and writes one whole checkpoint."""
    from test_distributed import (
        torchrun,  # the shared launcher (exit status checked, output shown on failure)
    )

    just_trained = str(tmp_path / "dfvqgan" / "ckpt.pt")
    for stage, flags in (("dfvqgan", TINY_DFVQGAN), ("lip", [*TINY_LIP, "--dfvqgan-ckpt", just_trained])):
        result = torchrun("train.py", "--stage", stage, "--preset", "tiny", "--max-steps", "2",
                          "--sample-every", "0", "--device", "cpu", "--out", str(tmp_path), *flags,
                          *(["--fsdp"] if mode == "fsdp" else []), timeout=300)
        assert result.stdout.count(f"stage {stage}; seed 0;") == 1  # rank 0 alone prints
        checkpoint = torch.load(tmp_path / stage / "ckpt.pt", weights_only=True)
        assert checkpoint["step"] == 2 and checkpoint["world"] == 2
    model, tokenizer = lip.load_lip(tmp_path / "lip" / "ckpt.pt", dfvqgan_ckpt=just_trained)
    assert not model.training and not tokenizer.training


# Seeded generation, pinned: the same seeds must keep giving these tokens (conftest: pinned seeds).
PINNED_FILL = [
    [8, 15, 13, 8, 31, 30, 7, 11, 16, 16, 10, 17, 31, 11, 21, 15],
    [31, 31, 26, 29, 28, 20, 5, 7, 4, 6, 4, 10, 29, 19, 7, 6],
]


def test_seeded_inpainting_gives_the_pinned_tokens():
    model = toy_model(token_h=4, token_w=4)
    generator = torch.Generator().manual_seed(4)
    drawn = model.generate(*toy_inputs(model), temperature=1.0, top_k=8, generator=generator)
    assert drawn.flatten(1).tolist() == PINNED_FILL
    # And the numbers behind them: a position-weighted sum of the teacher-forced logits (float64).
    with torch.no_grad():
        logits = model(*toy_inputs(model))
    assert position_weighted_sum(logits) == pytest.approx(0.8082201939645215, rel=1e-9)
