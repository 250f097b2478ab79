"""Tests for vqgan.py: the decode path, which parameters each loss trains, the codebook machinery
(EMA by hand, dead-code restart), the adaptive weight by hand, overfitting, bad input, presets, and
loading a trained tokenizer (every way a checkpoint can be wrong)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import vqgan
from quantizer import VectorQuantizer


def small_config(**overrides) -> vqgan.VQGANConfig:
    """A few-thousand-parameter VQGAN so every test here runs in seconds on 2 cores."""
    config = vqgan.VQGANConfig(ch=8, ch_mult=(1, 2, 2), norm_groups=4, codebook_size=32, embed_dim=8,
                               disc_ch=8, disc_start=0, batch_size=4)
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def blobs(batch: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Frames with a few bright squares on black, like digits on the Moving MNIST canvas. (B, 1, S, S)"""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(batch, 1, size, size)
    for b in range(batch):
        for _ in range(2):
            top, left = torch.randint(0, size - 8, (2,), generator=gen).tolist()
            x[b, 0, top:top + 8, left:left + 8] = 0.5 + 0.5 * torch.rand((), generator=gen)
    return x


def grads_by_part(model: vqgan.VQGAN, loss: torch.Tensor) -> dict[str, bool]:
    """Which parts of the model receive a non-zero gradient from `loss`."""
    parts = {"encoder": list(model.encoder.parameters()), "codebook": [model.quantizer.codebook],
             "decoder": list(model.decoder.parameters()),
             "discriminator": list(model.discriminator.parameters())}
    result = {}
    for name, params in parts.items():
        trainable = [p for p in params if p.requires_grad]
        grads = (torch.autograd.grad(loss, trainable, retain_graph=True, allow_unused=True)
                 if trainable else [])
        result[name] = any(g is not None and g.abs().sum() > 0 for g in grads)
    return result


# --- the decode path ---------------------------------------------------------------------------


def test_decode_of_encode_is_exactly_the_forward_reconstruction():
    torch.manual_seed(0)
    model = vqgan.VQGAN(small_config())
    x = blobs()
    model.train()
    for step in range(3):  # initialise the codebook from data and move the weights a little
        _, losses = model(x, step=step)
        losses["loss"].backward()
    model.eval()
    with torch.no_grad():
        x_rec, _ = model(x)
        tokens = model.encode(x)
        assert tokens.shape == (4, 8, 8) and tokens.dtype == torch.long
        assert torch.equal(model.decode(tokens), x_rec)  # bit for bit, not just close
        video = torch.stack([x, x.flip(0)], dim=1)  # (4, 2, 1, 32, 32)
        video_tokens = model.encode_video(video)
        assert video_tokens.shape == (4, 2, 8, 8)
        assert torch.equal(video_tokens[:, 0], tokens)
        assert torch.equal(model.decode_video(video_tokens)[:, 0], x_rec)


def test_token_shape_and_presets():
    tiny = vqgan.VQGANConfig.preset("tiny")
    assert tiny.downsample == 4 and tiny.token_shape == (16, 16) and tiny.codebook_size == 512
    seg = vqgan.VQGANConfig.preset("tiny", seg=True)
    assert seg.in_channels == vqgan.NUM_SKETCH_CLASSES == 11 and seg.rec_loss == "ce"
    assert seg.disc_weight == 0.0 and tiny.disc_weight > 0  # the GAN is off for VQ-GAN-Seg
    with pytest.raises(ValueError, match="unknown preset"):
        vqgan.VQGANConfig.preset("huge")
    # Config.preset(name, **overrides), as every config of the project: overrides win over the
    # preset and over the seg variant.
    f8 = vqgan.VQGANConfig.preset("tiny", ch_mult=(1, 2, 4, 4), cell_encoder=True)
    assert f8.downsample == 8 and f8.cell_encoder and f8.codebook_size == 512
    seg_small = vqgan.VQGANConfig.preset("small", seg=True, codebook_size=64)
    assert (seg_small.codebook_size, seg_small.rec_loss, seg_small.ch) == (64, "ce", 64)
    with pytest.raises(TypeError, match="no_such_field"):
        vqgan.VQGANConfig.preset("tiny", no_such_field=1)


def test_paper_preset_parameter_count():
    config = vqgan.VQGANConfig.preset("paper")
    assert config.token_shape == (21, 21) and config.downsample == 16 and config.codebook_size == 12288
    with torch.device("meta"):  # nothing is allocated
        model = vqgan.VQGAN(config)
    count = lambda module: sum(p.numel() for p in module.parameters())
    assert count(model.quantizer) == 12288 * 256
    tokenizer = count(model.encoder) + count(model.quantizer) + count(model.decoder)
    print(f"paper preset: tokenizer {tokenizer / 1e6:.1f}M parameters, discriminator "
          f"{count(model.discriminator) / 1e6:.2f}M")
    # VQGAN's f16 model (ch 128, mult 1-1-2-2-4, 2 res blocks) has about 70M parameters besides the
    # codebook; ours omits its attention blocks inside the 16×16 level.
    assert 55e6 < tokenizer - 12288 * 256 < 80e6
    assert count(model.discriminator) == 2_765_633  # VQGAN's 3-layer PatchGAN for RGB, by hand


# --- which parameters each loss trains -----------------------------------------------------------


def test_each_loss_trains_only_its_parameters_straight_through_option():
    torch.manual_seed(0)
    model = vqgan.VQGAN(small_config(ema=False, dead_code_threshold=0.0))
    _, losses = model(blobs(), step=0)  # step >= disc_start: the GAN term is on
    assert grads_by_part(model, losses["commitment_loss"]) == \
        {"encoder": True, "codebook": False, "decoder": False, "discriminator": False}
    # Both terms measure the same distance; β = 0.25 weighs the commitment term, not the codebook term.
    torch.testing.assert_close(losses["commitment_loss"], 0.25 * losses["codebook_loss"])
    assert grads_by_part(model, losses["codebook_loss"]) == \
        {"encoder": False, "codebook": True, "decoder": False, "discriminator": False}
    # The straight-through estimator sends the decoder's losses to E, never to the codes.
    assert grads_by_part(model, losses["rec_loss"]) == \
        {"encoder": True, "codebook": False, "decoder": True, "discriminator": False}
    gan = grads_by_part(model, losses["gan_loss"])
    assert gan["encoder"] and gan["decoder"] and not gan["codebook"]  # (D's share is dropped by train.py)
    x_rec, _ = model(blobs(), step=0)
    assert grads_by_part(model, model.discriminator_loss(blobs(), x_rec)) == \
        {"encoder": False, "codebook": False, "decoder": False, "discriminator": True}
    # The tokenizer's optimizer holds E, B and G but not D.
    held = {id(p) for p in model.tokenizer_parameters()}
    assert id(model.quantizer.codebook) in held
    assert not held & {id(p) for p in model.discriminator.parameters()}


def test_with_ema_the_codebook_is_not_trained_by_gradient():
    model = vqgan.VQGAN(small_config(ema=True))
    _, losses = model(blobs(), step=0)
    assert not model.quantizer.codebook.requires_grad
    assert losses["codebook_loss"].grad_fn is None and losses["codebook_loss"] > 0  # reported, trains nothing
    assert id(model.quantizer.codebook) not in {id(p) for p in model.tokenizer_parameters()}
    assert grads_by_part(model, losses["commitment_loss"])["encoder"]


def test_gan_term_waits_for_disc_start_and_total_loss_is_the_sum():
    torch.manual_seed(0)
    model = vqgan.VQGAN(small_config(disc_start=5, disc_weight=0.3))
    _, before = model(blobs(), step=4)
    assert before["gan_loss"] == 0 and before["adaptive_weight"] == 0
    _, after = model(blobs(), step=5)
    assert after["gan_loss"] != 0 and after["adaptive_weight"] > 0
    expected = (after["rec_loss"] + after["codebook_loss"] + after["commitment_loss"]
                + 0.3 * after["adaptive_weight"] * after["gan_loss"])
    torch.testing.assert_close(after["loss"], expected)
    model.eval()
    _, evaluation = model(blobs(), step=5)
    assert evaluation["gan_loss"] == 0  # never in eval mode


def test_adaptive_weight_matches_hand_computation():
    last = nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    a = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    b = torch.tensor([[1.0, 1.0], [-1.0, 2.0]])
    rec = (last * a).sum()  # ∇ = a
    gan = 3.0 * (last * b).sum()  # ∇ = 3 b
    expected = math.sqrt(0.25 + 1 + 4) / (3.0 * math.sqrt(1 + 1 + 1 + 4) + 1e-4)
    assert vqgan.adaptive_weight(rec, gan, last).item() == pytest.approx(expected, rel=1e-6)
    # A GAN gradient of zero would give ||a|| / 1e-4 = 22,913: clamped to 1e4.
    assert vqgan.adaptive_weight(rec, 0.0 * (last * b).sum(), last).item() == pytest.approx(1e4)


# --- codebook machinery ----------------------------------------------------------------------


def test_ema_update_matches_hand_computation():
    config = small_config(codebook_size=3, embed_dim=2, ema_decay=0.9, ema_eps=1e-5, data_init=False,
                          dead_code_threshold=0.0)
    quantizer = VectorQuantizer(config)
    quantizer.codebook.data = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    quantizer.cluster_size.fill_(1.0)
    quantizer.embed_sum.copy_(quantizer.codebook.data)
    vectors = torch.tensor([[0.1, 0.0], [0.9, 1.1], [1.2, 0.8], [0.2, 0.1]])  # nearest codes 0, 1, 1, 0
    z_e = vectors.t().reshape(1, 2, 1, 4)  # (B=1, d=2, h=1, w=4)
    _, indices, _ = quantizer(z_e)
    assert indices.flatten().tolist() == [0, 1, 1, 0]
    # N = 0.9·1 + 0.1·n with n = (2, 2, 0); m = 0.9·B + 0.1·(sum of assigned vectors)
    N = [0.9 + 0.2, 0.9 + 0.2, 0.9]
    m = [[0.1 * 0.3, 0.1 * 0.1], [0.9 + 0.1 * 2.1, 0.9 + 0.1 * 1.9], [4.5, 4.5]]
    total = sum(N)
    smoothed = [(n + 1e-5) / (total + 3 * 1e-5) * total for n in N]
    expected = torch.tensor([[m[k][j] / smoothed[k] for j in range(2)] for k in range(3)])
    torch.testing.assert_close(quantizer.codebook.data, expected)
    torch.testing.assert_close(quantizer.cluster_size, torch.tensor(N))


def test_dead_codes_are_restarted_onto_encoder_outputs():
    torch.manual_seed(0)
    model = vqgan.VQGAN(small_config(ema=False, dead_code_threshold=1.0))
    x = blobs()
    model(x, step=0)  # data-dependent initialisation
    quantizer = model.quantizer
    quantizer.codebook.data[0] = 1e3  # far from every encoder output: it can never be chosen
    quantizer.cluster_size.fill_(100.0)
    quantizer.cluster_size[0] = 0.0  # and it has not been used for a long time
    before = quantizer.codebook.data.clone()
    z = model.encoder(x).permute(0, 2, 3, 1).reshape(-1, 8).detach()  # the encoder outputs it will see
    model(x, step=1)
    restarted = quantizer.codebook.data[0]
    assert (z - restarted).abs().amax(1).min() < 1e-5  # it now sits on one of the encoder outputs
    assert torch.equal(quantizer.codebook.data[1:], before[1:])  # live codes untouched (no EMA here)
    assert quantizer.cluster_size[0] == 1.0


def test_data_dependent_init_and_usage_statistics():
    torch.manual_seed(0)
    model = vqgan.VQGAN(small_config())
    assert not model.quantizer.initialized
    x = blobs()
    z = model.encoder(x).permute(0, 2, 3, 1).reshape(-1, 8).detach()
    _, losses = model(x, step=0)
    assert model.quantizer.initialized
    # Every code was one of this batch's encoder outputs before the EMA step moved it: the usage is
    # high from the first step on instead of a few codes taking everything.
    assert losses["usage"] > 0.3 and 1.0 <= losses["perplexity"] <= 32
    assert (torch.cdist(model.quantizer.codebook.data, z).min(1).values < 1.0).all()


def test_cell_encoder_tokens_depend_on_their_own_cell_only():
    """CellEncoder: a token is a function of its f×f pixels alone. Every empty cell of every frame
    gets the same token, and changing pixels changes no token outside the cells they are in."""
    torch.manual_seed(0)
    model = vqgan.VQGAN(small_config(cell_encoder=True)).eval()
    f = model.config.downsample
    x = blobs(batch=3)
    with torch.no_grad():
        tokens = model.encode(x)  # (3, h, w)
        empty = x.unfold(2, f, f).unfold(3, f, f).amax((-1, -2))[:, 0] == 0  # (3, h, w) all-black cells
        assert empty.sum() > 10 and tokens[empty].unique().numel() == 1
        assert model.encode(torch.zeros_like(x)).unique().tolist() == tokens[empty].unique().tolist()
        changed = x.clone()
        changed[:, :, :f, :2 * f] = torch.rand(3, 1, f, 2 * f)  # new pixels in the first two cells only
        moved = model.encode(changed)
    outside = torch.ones_like(tokens, dtype=torch.bool)
    outside[:, 0, :2] = False
    assert torch.equal(moved[outside], tokens[outside])
    # The global encoder mixes the whole frame (receptive field, GroupNorm statistics, attention).
    plain = vqgan.VQGAN(small_config()).eval()
    with torch.no_grad():
        z, z_changed = plain.encoder(x), plain.encoder(changed)
    assert not torch.allclose(z[:, :, -1, -1], z_changed[:, :, -1, -1])


def test_restarts_draw_distinct_encoder_outputs():
    """With 90 % of the batch one repeated vector (empty cells of a cell encoder), restarted codes are
    drawn from the distinct vectors, so they do not all pile onto that one vector."""
    torch.manual_seed(0)
    quantizer = VectorQuantizer(small_config(codebook_size=32, embed_dim=8))
    z = torch.zeros(200, 8)
    z[:20] = torch.randn(20, 8)  # 20 distinct vectors, 180 copies of the zero vector
    quantizer.train()
    quantizer.initialise(z)
    assert torch.unique(quantizer.codebook.data, dim=0).shape[0] == 21  # every distinct vector is a code
    quantizer.cluster_size.fill_(0.0)  # all dead
    quantizer.restart_dead_codes(z)
    on_zero = (quantizer.codebook.data.abs().amax(1) == 0).sum().item()
    assert on_zero < 8  # drawn from 21 distinct vectors: about 32 / 21 land on zero, not 29 of 32


def test_restarted_codes_live_long_enough_to_be_used():
    """A restarted code starts as if used once per batch and, unused, is moved again only when its EMA
    usage has decayed below the threshold: after ln(1 / threshold) / (1 − γ) steps, not the next step.
    (At threshold 1 every code not used in every batch was moved each step, and rare codes never stayed.)"""
    torch.manual_seed(0)
    config = small_config(codebook_size=8, embed_dim=4, dead_code_threshold=0.03)
    quantizer = VectorQuantizer(config).train()
    z = torch.randn(64, 4)
    quantizer.initialise(z)
    quantizer.cluster_size[0] = 0.0  # dead now
    quantizer.restart_dead_codes(z)
    assert quantizer.cluster_size[0] == 1.0
    restarted = quantizer.codebook.data[0].clone()
    far = torch.full((64, 4), 50.0) + torch.randn(64, 4)  # batches that never use code 0 ...
    quantizer.codebook.data[1] = 50.0  # ... because code 1 sits on them
    lifetime = math.log(1 / 0.03) / (1 - config.ema_decay)  # ≈ 349 steps
    for _ in range(int(lifetime) - 5):
        quantizer.update(far, torch.full((64,), 1))
    # Still waiting to be used (the EMA's Laplace smoothing moves it a little, not away).
    assert (quantizer.codebook.data[0] - restarted).abs().max() < 0.01
    for _ in range(10):
        quantizer.update(far, torch.full((64,), 1))
    # Moved onto this batch once its usage decayed.
    assert (quantizer.codebook.data[0] - restarted).abs().max() > 10
    with pytest.raises(ValueError, match="dead_code_threshold"):
        vqgan.VQGAN(small_config(dead_code_threshold=-1.0))


# --- learning ------------------------------------------------------------------------------


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = vqgan.VQGAN(small_config(disc_weight=0.0, codebook_size=64))
    x = blobs()
    optimizer = torch.optim.Adam(model.tokenizer_parameters(), lr=3e-3)
    for step in range(150):
        _, losses = model(x, step=step)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        error = (model.decode(model.encode(x)) - x).pow(2).mean().item()
    print(f"per-pixel MSE after 150 steps on one batch: {error:.5f} (blank frame: {x.pow(2).mean():.4f})")
    assert error < 0.08 * x.pow(2).mean().item()  # measured 0.0036 = 5 % of the blank frame's 0.075


def test_vqgan_seg_uses_cross_entropy_and_round_trips_sketches():
    torch.manual_seed(0)
    model = vqgan.VQGAN(small_config(in_channels=11, rec_loss="ce", disc_weight=0.0))
    assert model.discriminator is None
    sketch = torch.zeros(2, 3, 32, 32, dtype=torch.long)
    sketch[:, :, 4:14, 4:14] = 4  # digit 3
    sketch[:, :, 18:28, 10:20] = 8  # digit 7
    onehot = vqgan.sketch_to_onehot(sketch)
    assert onehot.shape == (2, 3, 11, 32, 32) and torch.equal(onehot.argmax(2), sketch)
    logits, losses = model(onehot.flatten(0, 1), step=0)
    torch.testing.assert_close(losses["rec_loss"], F.cross_entropy(logits, sketch.flatten(0, 1)))
    model.eval()
    tokens = model.encode_sketch(sketch)
    assert tokens.shape == (2, 3, 8, 8)
    decoded = model.decode_sketch(tokens)
    assert decoded.shape == sketch.shape and decoded.dtype == torch.long


def test_perceptual_term_is_pluggable_and_off_by_default():
    model = vqgan.VQGAN(small_config(perceptual_weight=0.5, disc_weight=0.0))
    with pytest.raises(RuntimeError, match="no perceptual network"):
        model(blobs())

    class SquaredError(nn.Module):
        def forward(self, x_rec, x):
            return (x_rec - x).pow(2).mean()

    model.perceptual = SquaredError()
    _, losses = model(blobs())
    assert losses["perceptual_loss"] > 0
    torch.testing.assert_close(losses["loss"], losses["rec_loss"] + 0.5 * losses["perceptual_loss"]
                               + losses["codebook_loss"] + losses["commitment_loss"])
    assert vqgan.VQGANConfig.preset("tiny").perceptual_weight == 0.0


# --- bad input ---------------------------------------------------------------------------------


def test_bad_input_says_what_was_expected():
    model = vqgan.VQGAN(small_config())
    with pytest.raises(ValueError, match=r"expects frames of shape \(B, 1, H, W\)"):
        model.encode(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="use encode_video"):
        model.encode(torch.zeros(2, 4, 1, 32, 32))
    with pytest.raises(ValueError, match="not divisible by the downsampling factor f=4"):
        model(torch.zeros(2, 1, 30, 32))
    with pytest.raises(ValueError, match=r"token indices must be int64 in \[0, 32\)"):
        model.decode(torch.full((1, 8, 8), 32))
    with pytest.raises(ValueError, match="rec_loss must be"):
        vqgan.VQGAN(small_config(rec_loss="l2"))


# --- loading a trained tokenizer -----------------------------------------------------------------


def write_checkpoint(model: vqgan.VQGAN, path, *, stage: str = "vqgan"):
    """The file train.py writes for a tokenizer: stage, config as plain values, weights."""
    return checkpoints.save({"stage": stage, "config": checkpoints.config_to_dict(model.config),
                             "model": model.state_dict()}, path)


def test_load_vqgan_gives_the_saved_tokenizer_in_eval_mode(tmp_path):
    torch.manual_seed(0)
    model = vqgan.VQGAN(small_config())
    model(blobs(), step=0)  # initialise the codebook from data, so the codes are not the init's
    path = write_checkpoint(model.eval(), tmp_path / "vqgan" / "ckpt.pt")
    loaded = vqgan.load_vqgan(path)
    assert not loaded.training and loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded.encode(blobs()), model.encode(blobs()))
    # A VQ-GAN-Seg checkpoint loads through the same function; so does one with the expected config.
    seg = vqgan.VQGAN(small_config(in_channels=vqgan.NUM_SKETCH_CLASSES, rec_loss="ce"))
    seg_path = write_checkpoint(seg, tmp_path / "seg" / "ckpt.pt", stage="seg")
    assert vqgan.load_vqgan(seg_path, config=seg.config).config.rec_loss == "ce"


def test_load_vqgan_says_what_is_wrong_with_the_file(tmp_path):
    model = vqgan.VQGAN(small_config())
    with pytest.raises(FileNotFoundError, match="no vqgan or seg checkpoint at .*train.py --stage vqgan"):
        vqgan.load_vqgan(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt or not a checkpoint"):
        vqgan.load_vqgan(corrupt)
    with pytest.raises(ValueError, match="stage 'nuwa', not 'vqgan' or 'seg'"):
        vqgan.load_vqgan(write_checkpoint(model, tmp_path / "nuwa.pt", stage="nuwa"))
    path = write_checkpoint(model, tmp_path / "ckpt.pt")
    other = small_config(embed_dim=4)
    with pytest.raises(ValueError, match="embed_dim: expected 4, found 8"):
        vqgan.load_vqgan(path, config=other)
    unknown = torch.load(path, weights_only=True)
    unknown["config"]["wings"] = 2
    with pytest.raises(ValueError, match=r"fields VQGANConfig does not know: \['wings'\]"):
        vqgan.load_vqgan(checkpoints.save(unknown, tmp_path / "unknown.pt"))
    # Weights of another shape than the stored config describes: the error names the shape fields.
    torn = torch.load(path, weights_only=True)
    torn["config"]["codebook_size"] = 16
    with pytest.raises(ValueError, match="codebook_size=16"):
        vqgan.load_vqgan(checkpoints.save(torn, tmp_path / "torn.pt"))
