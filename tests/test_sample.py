"""Every task runs end to end from checkpoints through sample.py (tiny, briefly trained models); the
command line's flags mean the same thing in every sub-command, and its checkpoint defaults are where
the Makefile writes them."""

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import runtime
import sample
import tasks
import train

TASKS = {
    "t2i": ["--caption", "digit 3 is moving left"],
    "s2i": [],
    "complete": ["--keep-rows", "4"],
    "edit-image": ["--caption", "digit 5 is moving up", "--box", "0,0,32,64"],
    "t2v": ["--caption", "digit 3 is moving left then right", "--frames", "3"],
    "s2v": ["--frames", "3"],
    "predict": ["--given", "2", "--frames", "4"],
    "edit-video": ["--caption", "digit 3 is moving down", "--frames", "3", "--given", "1"],
}
TOKENIZER = ["--preset", "tiny", "--ch", "8", "--ch-mult", "1", "2", "2", "2", "--codebook-size", "32",
             "--embed-dim", "8", "--batch-size", "4", "--max-steps", "2", "--sample-every", "0"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    for stage in ("vqgan", "seg"):
        train.main(["--stage", stage, *TOKENIZER, "--out", str(out)])
    train.main(["--stage", "nuwa", "--preset", "tiny", "--dim", "32", "--num-heads", "2", "--encoder-layers",
                "1", "--decoder-layers", "1", "--codebook-size", "32", "--sketch-codebook-size", "32",
                "--frames", "3", "--predict-frames", "4", "--batch-size", "2", "--max-steps", "2",
                "--token-h", "8", "--token-w", "8",
                "--sample-every", "0", "--vqgan-ckpt", str(out / "vqgan" / "ckpt.pt"),
                "--seg-ckpt", str(out / "seg" / "ckpt.pt"), "--out", str(out)])
    return out / "nuwa" / "ckpt.pt"


@pytest.mark.parametrize("task", list(TASKS))
def test_task_runs_from_checkpoint(task, checkpoint, tmp_path):
    written = sample.main([task, "--ckpt", str(checkpoint), "--out", str(tmp_path), "-n", "2", "--device",
                           "cpu", *TASKS[task]])
    assert written and all(path.stat().st_size > 1000 for path in written)
    assert any(path.suffix == ".gif" for path in written) == (task in ("t2v", "s2v", "predict", "edit-video"))


def test_bad_inputs_fail_before_any_work(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="unknown caption word"):
        sample.main(["t2v", "--ckpt", str(checkpoint), "--out", str(tmp_path), "--caption",
                     "digit 3 is dancing"])
    with pytest.raises(ValueError, match="does not fit the position tables"):
        sample.main(["t2v", "--ckpt", str(checkpoint), "--out", str(tmp_path), "--caption",
                     "digit 3 is moving up", "--frames", "40"])
    bad_sketch = tmp_path / "sketch.npy"
    np.save(bad_sketch, np.zeros((1, 32, 32), dtype=np.int64))
    with pytest.raises(ValueError, match="sketch must be 64×64"):
        sample.main(["s2i", "--ckpt", str(checkpoint), "--out", str(tmp_path), "--sketch", str(bad_sketch)])
    with pytest.raises(FileNotFoundError, match="no NÜWA checkpoint"):
        sample.main(["t2i", "--ckpt", str(tmp_path / "missing.pt"), "--caption", "digit 1 is moving up"])
    with pytest.raises(ValueError, match="--given 4 must be .* fewer than --frames 4"):
        sample.main(["predict", "--ckpt", str(checkpoint), "--given", "4", "--frames", "4"])


@pytest.mark.parametrize("task, options", [
    ("t2v", ["--caption", "digit 3 is moving left", "--frames", "3"]),
    ("s2v", ["--frames", "2"]),
    ("predict", ["--given", "2", "--frames", "4"]),
    ("edit-video", ["--caption", "digit 3 is moving down", "--given", "1", "--frames", "3"]),
])
def test_frames_counts_the_output_video_given_frames_included(task, options, checkpoint, monkeypatch):
    """`--frames F --given G` is a video of F frames whose first G are the input's (identical in
    every sample), the same in every sub-command."""
    drawn = []
    monkeypatch.setattr(sample, "write_outputs", lambda samples, *rest: drawn.append(samples) or [])
    sample.main([task, "--ckpt", str(checkpoint), "-n", "2", "--device", "cpu", *options])
    frames = int(options[options.index("--frames") + 1])
    assert drawn[0].shape == (2, frames, 1, 64, 64)
    if "--given" in options:
        given = int(options[options.index("--given") + 1])
        assert torch.equal(drawn[0][0, :given], drawn[0][1, :given])


def test_a_video_file_gives_its_first_frames(checkpoint, tmp_path, monkeypatch):
    """A longer file is cut to --frames; a shorter one is an error that names the flag."""
    drawn = []
    monkeypatch.setattr(sample, "write_outputs", lambda samples, *rest: drawn.append(samples) or [])
    clip = tmp_path / "clip.npy"
    np.save(clip, data.MovingMNIST("test", num_frames=6, num_digits=1)[0]["video"][:, 0].numpy())
    base = ["edit-video", "--ckpt", str(checkpoint), "-n", "1", "--device", "cpu", "--video", str(clip),
            "--caption", "digit 3 is moving down", "--given", "1"]
    sample.main([*base, "--frames", "3"])
    assert drawn[0].shape[1] == 3
    with pytest.raises(ValueError, match="the video has 6 frames, fewer than --frames 8"):
        sample.main([*base, "--frames", "8"])


def test_checkpoint_defaults_are_where_make_writes_them(tmp_path, monkeypatch):
    """NÜWA: out/nuwa/ckpt.pt (`make models`) when it exists, else out/demo/nuwa/ckpt.pt (`make demo`);
    a missing checkpoint is an error that names the make target writing it."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no NÜWA checkpoint at out/nuwa/ckpt.pt \(`make models` "
                                                r"writes out/nuwa/ckpt.pt; `make demo` writes out/demo"):
        sample.main(["t2i", "--caption", "digit 1 is moving up"])
    with pytest.raises(FileNotFoundError, match="no NÜWA-LIP checkpoint at out/lip/ckpt.pt .*`make lip`"):
        sample.main(["inpaint"])
    with pytest.raises(FileNotFoundError, match="no NÜWA-Infinity checkpoint at out/infinity/ckpt.pt .*"
                                                "`make infinity`"):
        sample.main(["infinity"])
    with pytest.raises(FileNotFoundError, match="at out/infinity_video/infinity/ckpt.pt .*`make infinity`"):
        sample.main(["infinity", "--frames", "4"])
    with pytest.raises(FileNotFoundError, match="no NÜWA checkpoint at mine.pt .*`make models`"):
        sample.main(["t2v", "--ckpt", "mine.pt", "--caption", "digit 1 is moving up"])
    demo = Path("out/demo/nuwa/ckpt.pt")
    demo.parent.mkdir(parents=True)
    demo.touch()
    assert sample.checkpoint(None, "NÜWA") == str(demo)
    models = Path("out/nuwa/ckpt.pt")
    models.parent.mkdir(parents=True)
    models.touch()
    assert sample.checkpoint(None, "NÜWA") == str(models)


def test_every_sub_command_and_flag_says_what_it_does():
    """Help on every sub-command and flag; one set of sampling flags (top-k 16) and one device default."""
    commands = next(a for a in sample.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    assert set(helps) == set(commands.choices) and all(helps.values())
    for name, sub in commands.choices.items():
        assert sub.description, name
        for action in sub._actions:
            assert action.help, (name, action.dest)
        defaults = {action.dest: action.default for action in sub._actions}
        assert defaults["top_k"] == runtime.TOP_K == 16 and defaults["device"] == runtime.DEFAULT_DEVICE, name
        if "frames" in defaults:
            assert "given frames included" in sub._option_string_actions["--frames"].help, name


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


def test_infinity_frames_counts_the_output_video_given_frames_included(infinity_checkpoint, tmp_path,
                                                                        monkeypatch):
    """NÜWA-Infinity's `--frames F --given G` means what NÜWA's does: F frames, the first G given."""
    drawn = []
    monkeypatch.setattr(data, "save_gif", lambda clips, path, **options: drawn.append(clips) or path)
    sample.main(["infinity", "--ckpt", str(infinity_checkpoint), "--out", str(tmp_path), "-n", "2",
                 "--device", "cpu", "--frames", "3", "--given", "2"])
    assert [clip.shape for clip in drawn[0]] == [(3, 1, 64, 64)] * 2
    assert torch.equal(drawn[0][0][:2], drawn[0][1][:2])


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

    common = ["--preset", "tiny", "--max-steps", "1", "--sample-every", "0", "--device", "cpu",
              "--out", str(tmp_path)]
    train.main(["--stage", "dfvqgan", *common, *TINY_DFVQGAN])
    train.main(["--stage", "lip", *common, *TINY_LIP, "--dfvqgan-ckpt",
                str(tmp_path / "dfvqgan" / "ckpt.pt")])
    scored = []
    make_scorer = tasks.nuwa_caption_scorer

    def recording_scorer(model, tokenizer):
        score = make_scorer(model, tokenizer)

        def record(pixels, caption):
            scores = score(pixels, caption)
            scored.append((tuple(pixels.shape), caption, model.config.dim, scores))
            return scores

        return record

    monkeypatch.setattr(tasks, "nuwa_caption_scorer", recording_scorer)
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
