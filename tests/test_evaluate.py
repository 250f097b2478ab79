"""Tests for evaluate.py: metric definitions against values computed by hand, and `recon` JSON."""

import json

import pytest
import torch
from conftest import needs_mnist

import evaluate
import train


def test_ssim_of_an_image_with_itself_is_one():
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(evaluate.ssim(x, x), torch.ones(3))
    assert (evaluate.ssim(x, x.flip(-1)) < 0.5).all()


def test_ssim_of_constant_images_matches_the_formula():
    # Constant images have σx = σy = σxy = 0, so SSIM = (2ab + C1) / (a² + b² + C1) exactly.
    a, b = 0.2, 0.5
    x, y = torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b)
    c1 = (0.01 * 1.0) ** 2
    assert evaluate.ssim(x, y).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)


def test_ssim_matches_a_direct_sum_over_one_window():
    # An 11×11 image has exactly one valid window: write the Gaussian-weighted statistics out.
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(11, 11, generator=gen, dtype=torch.float64), torch.rand(11, 11, generator=gen, dtype=torch.float64)
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-coords**2 / (2 * 1.5**2))
    w = g[:, None] * g[None, :]
    w = w / w.sum()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
    cxy = (w * (x - mx) * (y - my)).sum()
    c1, c2 = 0.01**2, 0.03**2
    expected = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    got = evaluate.ssim(x[None, None].float(), y[None, None].float()).item()
    assert got == pytest.approx(expected.item(), abs=1e-5)


def test_frame_mse_and_psnr_conventions():
    x = torch.zeros(2, 1, 64, 64)
    y = torch.full((2, 1, 64, 64), 0.1)
    torch.testing.assert_close(evaluate.frame_mse(y, x), torch.full((2,), 0.01 * 4096))  # summed over pixels
    torch.testing.assert_close(evaluate.psnr(y, x), torch.full((2,), 20.0))  # 10 log10(1 / 0.01)
    with pytest.raises(ValueError, match="expects two"):
        evaluate.ssim(x, y[:1])


@needs_mnist
@pytest.mark.parametrize("stage", ["vqgan", "seg"])
def test_recon_prints_one_json_object_last(stage, tmp_path, capsys):
    # An (almost) untrained tokenizer: the keys and the ranges matter here, not the values.
    train.main(["--stage", stage, "--max-steps", "1", "--out", str(tmp_path), "--ch", "8", "--norm-groups", "4",
                "--codebook-size", "32", "--embed-dim", "8", "--batch-size", "2", "--frames-per-clip", "2",
                "--device", "cpu", "--sample-every", "0"])
    capsys.readouterr()
    evaluate.main(["recon", "--ckpt", str(tmp_path / stage / "ckpt.pt"), "--num-sequences", "2", "--json",
                   "--device", "cpu", "--grid", str(tmp_path / "grid.png")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    metrics = json.loads(last)
    assert 0 < metrics["codebook_usage"] <= 1 and (tmp_path / "grid.png").exists()
    if stage == "vqgan":
        assert {"frame_mse", "psnr", "ssim", "codebook_usage"} <= set(metrics)
        assert metrics["frames"] == 40 and metrics["frame_mse"] > 0 and metrics["psnr"] > 0
        assert -1 <= metrics["ssim"] <= 1
    else:
        assert {"pixel_accuracy", "foreground_accuracy", "codebook_usage"} <= set(metrics)
        assert 0 <= metrics["pixel_accuracy"] <= 1 and metrics["frames"] == 20
