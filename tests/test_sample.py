"""Every NÜWA task runs end to end from checkpoints through sample.py (tiny, briefly trained models)."""

import numpy as np
import pytest

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
