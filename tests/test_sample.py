"""Every NÜWA task runs end to end from checkpoints through sample.py (tiny, briefly trained models)."""

import numpy as np
import pytest
import torch

import sample
import train

TASKS = {
    "t2i": ["--caption", "digit 3 is moving left"],
    "s2i": [],
    "complete": ["--keep-rows", "4"],
    "edit-image": ["--caption", "digit 5 is moving up", "--box", "0,0,32,64"],
    "t2v": ["--caption", "digit 3 is moving left then right", "--frames", "3"],
    "s2v": ["--frames", "3"],
    "predict": ["--given", "2", "--frames", "4"],
    "edit-video": ["--caption", "digit 3 is moving down", "--frames", "3", "--keep-frames", "1"],
}
TOKENIZER = ["--preset", "tiny", "--ch", "8", "--ch-mult", "1", "2", "2", "2", "--codebook-size", "32",
             "--embed-dim", "8", "--batch-size", "4", "--max-steps", "2", "--sample-every", "0"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    for stage in ("vqgan", "seg"):
        train.main(["--stage", stage, *TOKENIZER, "--out", str(out)])
    train.main(["--stage", "nuwa", "--preset", "tiny", "--dim", "32", "--num-heads", "2", "--encoder-layers", "1",
                "--decoder-layers", "1", "--codebook-size", "32", "--sketch-codebook-size", "32",
                "--frames", "3", "--predict-frames", "4", "--batch-size", "2", "--max-steps", "2", "--token-h", "8", "--token-w", "8",
                "--sample-every", "0", "--vqgan-ckpt", str(out / "vqgan" / "ckpt.pt"),
                "--seg-ckpt", str(out / "seg" / "ckpt.pt"), "--out", str(out)])
    return out / "nuwa" / "ckpt.pt"


@pytest.mark.parametrize("task", list(TASKS))
def test_task_runs_from_checkpoint(task, checkpoint, tmp_path):
    written = sample.main([task, "--ckpt", str(checkpoint), "--out", str(tmp_path), "-n", "2", "--device", "cpu",
                           *TASKS[task]])
    assert written and all(path.stat().st_size > 1000 for path in written)
    assert any(path.suffix == ".gif" for path in written) == (task in ("t2v", "s2v", "predict", "edit-video"))


def test_bad_inputs_fail_before_any_work(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="unknown caption word"):
        sample.main(["t2v", "--ckpt", str(checkpoint), "--out", str(tmp_path), "--caption", "digit 3 is dancing"])
    with pytest.raises(ValueError, match="does not fit the position tables"):
        sample.main(["t2v", "--ckpt", str(checkpoint), "--out", str(tmp_path), "--caption", "digit 3 is moving up",
                     "--frames", "40"])
    bad_sketch = tmp_path / "sketch.npy"
    np.save(bad_sketch, np.zeros((1, 32, 32), dtype=np.int64))
    with pytest.raises(ValueError, match="sketch must be 64×64"):
        sample.main(["s2i", "--ckpt", str(checkpoint), "--out", str(tmp_path), "--sketch", str(bad_sketch)])
    with pytest.raises(FileNotFoundError, match="no NÜWA checkpoint"):
        sample.main(["t2i", "--ckpt", str(tmp_path / "missing.pt"), "--caption", "digit 1 is moving up"])


@pytest.fixture(scope="module")
def infinity_checkpoint(checkpoint):
    out = checkpoint.parent.parent  # the tokenizer above has f = 8: 8×8 tokens per 64×64 frame
    train.main(["--stage", "infinity", "--preset", "tiny", "--dim", "16", "--num-heads", "2", "--layers", "1",
                "--codebook-size", "32", "--token-px", "8", "--patch-size", "4", "4", "--batch-size", "2",
                "--max-steps", "2", "--sample-every", "0", "--vqgan-ckpt", str(out / "vqgan" / "ckpt.pt"),
                "--out", str(out)])
    return out / "infinity" / "ckpt.pt"


@pytest.mark.parametrize("options, expected", [
    (["--width", "256", "--caption", "3 7"], ["infinity_column_64x256.png"]),
    (["--width", "128", "--direction", "left"], ["infinity_left_64x128.png"]),  # outpaints a held-out frame
    (["--frames", "4", "--given", "1"], ["infinity.gif", "infinity.png"]),
])
def test_infinity_draws_canvases_outpaintings_and_videos(infinity_checkpoint, tmp_path, options, expected):
    from PIL import Image

    written = sample.main(["infinity", "--ckpt", str(infinity_checkpoint), "--out", str(tmp_path), "-n", "2",
                           "--device", "cpu", *options])
    assert [path.name for path in written] == expected and all(path.stat().st_size > 500 for path in written)
    if expected[0].endswith("x256.png"):
        assert Image.open(written[0]).size == (256, 2 * 64 + 4)  # two canvases at full resolution


def test_infinity_bad_sizes_and_directions_are_clear_errors(infinity_checkpoint, tmp_path):
    base = ["infinity", "--ckpt", str(infinity_checkpoint), "--out", str(tmp_path), "--device", "cpu"]
    with pytest.raises(ValueError, match="does not divide into patches"):
        sample.main([*base, "--width", "80"])  # 10 token columns: not whole patches of 4
    with pytest.raises(ValueError, match="smaller than one patch|does not divide"):
        sample.main([*base, "--width", "16", "--height", "16"])
    with pytest.raises(SystemExit):  # argparse names the allowed directions
        sample.main([*base, "--direction", "diagonal"])
    with pytest.raises(ValueError, match="--image is for outpainting"):
        sample.main([*base, "--image", "x.png"])
    with pytest.raises(FileNotFoundError, match="no NÜWA-Infinity checkpoint"):
        sample.main(["infinity", "--ckpt", str(tmp_path / "missing.pt")])


def test_inpaint_reranks_its_candidates_by_the_nuwa_it_is_given(checkpoint, tmp_path, monkeypatch):
    """`sample.py inpaint --candidates K --rerank-nuwa CKPT`: the K candidates go to that NÜWA's caption
    score (with the caption asked for), not to the digit classifier, and a missing NÜWA is a clear error."""
    from test_lip import TINY_DFVQGAN, TINY_LIP

    common = ["--preset", "tiny", "--max-steps", "1", "--sample-every", "0", "--device", "cpu", "--out", str(tmp_path)]
    train.main(["--stage", "dfvqgan", *common, *TINY_DFVQGAN])
    train.main(["--stage", "lip", *common, *TINY_LIP, "--dfvqgan-ckpt", str(tmp_path / "dfvqgan" / "ckpt.pt")])
    scored = []
    make_scorer = sample.nuwa_caption_scorer

    def recording_scorer(model, tokenizer):
        score = make_scorer(model, tokenizer)

        def record(pixels, caption):
            scores = score(pixels, caption)
            scored.append((tuple(pixels.shape), caption, model.config.dim, scores))
            return scores

        return record

    monkeypatch.setattr(sample, "nuwa_caption_scorer", recording_scorer)
    base = ["inpaint", "--ckpt", str(tmp_path / "lip" / "ckpt.pt"), "--device", "cpu", "--candidates", "3",
            "--caption", "digit 7 is moving up", "--out", str(tmp_path / "pictures")]
    written = sample.main([*base, "--rerank-nuwa", str(checkpoint), "--classifier", "no/classifier/here"])
    assert [path.name for path in written] == ["inpaint.png", "inpaint_result.png"]
    assert len(scored) == 1
    shape, caption, dim, scores = scored[0]
    assert shape == (3, 1, 64, 64) and caption == "digit 7 is moving up" and scores.shape == (3,)
    assert dim == 32 and torch.isfinite(scores).all()  # the NÜWA of --rerank-nuwa (dim 32), not another
    with pytest.raises(FileNotFoundError, match="no NÜWA checkpoint"):
        sample.main([*base, "--rerank-nuwa", str(tmp_path / "missing.pt")])
