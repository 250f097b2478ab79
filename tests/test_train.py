"""Tests for train.py, stages.py and batches.py: each stage runs a few CPU steps and writes a checkpoint
that loads; configs are checked on resume; saves are atomic; the flags cover every field; the schedule;
NaN stops a run; the budget is said and progress is plain lines off a terminal; NÜWA's task mix;
benchmarks/bench_train.py measures. Runs across processes, resume and signals: test_distributed.py."""

import contextlib
import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import needs_mnist, position_weighted_sum

import batches
import checkpoints
import data
import stages
import train
import vqgan

ROOT = Path(__file__).resolve().parents[1]

# A few-thousand-parameter tokenizer: the point is the plumbing, not the learning.
SMALL_FLAGS = ["--ch", "8", "--norm-groups", "4", "--codebook-size", "32", "--embed-dim", "8",
               "--batch-size", "4", "--frames-per-clip", "2", "--disc-ch", "8", "--disc-start", "1",
               "--sample-every", "2", "--log-every", "1", "--device", "cpu"]


def run_stage(stage: str, out, *extra: str):
    train.main(["--stage", stage, "--preset", "tiny", "--max-steps", "3", "--out", str(out), *SMALL_FLAGS,
                *extra])
    return out / stage / "ckpt.pt"


@needs_mnist
@pytest.mark.parametrize("stage", ["vqgan", "seg"])
def test_each_stage_runs_three_steps_and_writes_a_checkpoint_that_loads(stage, tmp_path, capsys):
    path = run_stage(stage, tmp_path)
    assert "seed 0" in capsys.readouterr().out  # the seed is printed
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["stage"] == stage and checkpoint["step"] == 3
    assert checkpoint["config"]["codebook_size"] == 32 and isinstance(checkpoint["config"], dict)
    assert set(checkpoint["optimizers"]) == ({"vqgan", "disc"} if stage == "vqgan" else {"vqgan"})
    model = vqgan.load_vqgan(path)
    assert not model.training and model.config.rec_loss == ("l1" if stage == "vqgan" else "ce")
    log = [json.loads(line) for line in open(tmp_path / stage / "log.jsonl")]
    assert log[0]["step"] == 1
    assert {"rec_loss", "codebook_loss", "commitment_loss", "usage", "perplexity"} <= set(log[0])
    if stage == "vqgan":
        assert "disc_loss" not in log[0] and "disc_loss" in log[-1]  # D trains from disc_start on
    for picture in ("samples.png", "samples_step000002.png", "losses.png"):
        assert (tmp_path / stage / picture).stat().st_size > 0


@needs_mnist
def test_resume_continues_and_another_config_is_rejected_naming_the_field(tmp_path):
    path = run_stage("vqgan", tmp_path)
    run_stage("vqgan", tmp_path, "--resume", "--max-steps", "4")
    assert torch.load(path, weights_only=True)["step"] == 4
    with pytest.raises(ValueError, match="codebook_size: expected 16, found 32"):
        run_stage("vqgan", tmp_path, "--resume", "--max-steps", "5", "--codebook-size", "16")
    stored = checkpoints.config_from(vqgan.VQGANConfig, torch.load(path, weights_only=True)["config"], path)
    other = dataclasses.replace(stored, embed_dim=4)
    with pytest.raises(ValueError, match="embed_dim: expected 4, found 8"):
        vqgan.load_vqgan(path, config=other)
    with pytest.raises(ValueError, match="stage 'vqgan', not 'seg'"):
        train.resume_checkpoint(path, "seg", other, train.STAGES["seg"])


def test_resume_reads_a_checkpoint_older_than_a_config_field_as_trained_the_old_way(tmp_path):
    # A NÜWA checkpoint written before relative_bias & co. existed was trained the paper's way.
    import nuwa
    paper = nuwa.NUWAConfig.preset("tiny", **nuwa.PAPER_SCHEME)
    old = {k: v for k, v in checkpoints.config_to_dict(paper).items() if k not in nuwa.LEGACY_DEFAULTS}
    checkpoints.save({"stage": "nuwa", "config": old, "model": {}}, tmp_path / "ckpt.pt")
    stage = train.STAGES["nuwa"]
    train.resume_checkpoint(tmp_path / "ckpt.pt", "nuwa", paper, stage)
    with pytest.raises(ValueError, match="relative_bias: expected True, found False"):
        train.resume_checkpoint(tmp_path / "ckpt.pt", "nuwa", nuwa.NUWAConfig.preset("tiny"), stage)


def test_v2v_is_scored_on_its_predicted_half_only(monkeypatch):
    import nuwa
    seen = {}

    class Recorder:
        config = nuwa.NUWAConfig.preset("tiny", tasks="v2v", predict_frames=4, seg_ckpt="")
        vocabulary = data.CaptionVocabulary()
        bos = torch.zeros(1)

        def loss(self, cond, targets, loss_mask=None):
            seen["targets"], seen["mask"] = targets, loss_mask
            return torch.zeros(())

    class Frames:
        def encode_video(self, video):
            return torch.zeros(video.shape[0], video.shape[1], 2, 2, dtype=torch.long)

    monkeypatch.setattr(stages, "frozen_tokenizer", lambda *args: Frames())
    stages.nuwa_loss(Recorder(), {"v2v": {"video": torch.zeros(3, 4, 1, 8, 8)}}, step=0, carry=stages.Carry(),
                     autocast=contextlib.nullcontext)
    assert seen["mask"].shape == seen["targets"].shape
    assert not seen["mask"][:, :2].any() and seen["mask"][:, 2:].all()  # frames 2, 3 of 4: the predicted half
    Recorder.config.v2v_loss_on_given = True  # the paper's loss, over every token
    stages.nuwa_loss(Recorder(), {"v2v": {"video": torch.zeros(3, 4, 1, 8, 8)}}, step=0, carry=stages.Carry(),
                     autocast=contextlib.nullcontext)
    assert seen["mask"] is None


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoints.save({"step": 1, "weights": torch.ones(3)}, path)
    real_save = torch.save

    def crash_half_way(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. the job is killed while writing

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save({"step": 2, "weights": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["step"] == 1  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # and no temporary file is left


def test_every_config_field_is_a_flag(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--stage", "vqgan", "-h"])
    help_text = capsys.readouterr().out
    for name in list(vqgan.VQGANConfig.__dataclass_fields__) + list(train.TrainConfig.__dataclass_fields__):
        assert f"--{name.replace('_', '-')}" in help_text, name
    assert "d_B, dimension of one code" in help_text  # the field's comment is its help
    stage, config, run = train.parse_args(["--stage", "seg", "--codebook_size", "64", "--ch-mult", "1", "2",
                                           "--no-ema", "--max-seconds", "5"])
    assert stage == "seg" and config.in_channels == 11 and config.codebook_size == 64
    assert config.ch_mult == (1, 2) and config.ema is False and run.max_seconds == 5.0


def test_cosine_schedule_over_whichever_budget_ends_first():
    run = train.TrainConfig(max_steps=100, max_seconds=10.0, lr_min_ratio=0.1)
    assert train.lr_factor(run, 0, 0.0) == pytest.approx(1.0)
    assert train.lr_factor(run, 50, 1.0) == pytest.approx(0.55)  # half-way in steps
    assert train.lr_factor(run, 10, 5.0) == pytest.approx(0.55)  # half-way in time
    assert train.lr_factor(run, 100, 1.0) == pytest.approx(0.1)
    assert train.lr_factor(train.TrainConfig(lr_schedule="constant", max_steps=10), 9, 0.0) == 1.0


def test_a_run_without_a_budget_says_it_runs_until_stopped():
    assert "runs until stopped (Ctrl-C" in train.budget_line(train.TrainConfig())
    both = train.budget_line(train.TrainConfig(max_steps=3, max_seconds=60))
    assert both.startswith("budget: 3 steps or 60 s, whichever comes first (Ctrl-C")
    assert train.budget_line(train.TrainConfig(max_seconds=60)).startswith("budget: 60 s (Ctrl-C")


@needs_mnist
def test_off_a_terminal_the_run_prints_plain_progress_lines_and_no_bar(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "PLAIN_PROGRESS_SECONDS", 0.0)  # a line at every step
    run_stage("vqgan", tmp_path)
    out, err = capsys.readouterr()
    assert "budget: 3 steps" in out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 1", "step 2", "step 3"]
    assert "loss" in lines[0] and "tokens/s" in lines[0]
    assert "\r" not in err and "step/s" not in err  # no tqdm bar in a log file


def nan_stage(nan_from_step: int) -> train.Stage:
    """The vqgan stage with a loss that trains the decoder's last layer and turns NaN at a given step."""

    def loss(model, batch, *, step, carry, autocast):
        value = (model.decoder.conv_out.weight ** 2).sum()  # a real gradient for the optimizer
        return {"loss": value * math.nan if step >= nan_from_step else value}

    return dataclasses.replace(train.STAGES["vqgan"],
                               batch=lambda config, seed, step, part, parts: torch.zeros(1),
                               phases=[train.Phase("vqgan", loss, stages.tokenizer_parameters)])


def test_non_finite_loss_stops_the_run_with_the_step(tmp_path, monkeypatch):
    monkeypatch.setitem(train.STAGES, "nan", nan_stage(0))
    config = vqgan.VQGANConfig(ch=8, norm_groups=4, codebook_size=32, embed_dim=8, disc_ch=8)
    with pytest.raises(FloatingPointError, match="at step 0"):
        train.train("nan", config, train.TrainConfig(out=str(tmp_path), max_steps=3, device="cpu"))
    assert not (tmp_path / "nan" / "ckpt.pt").exists()


def test_non_finite_loss_keeps_the_last_good_checkpoint_and_finite_weights(tmp_path, monkeypatch):
    monkeypatch.setitem(train.STAGES, "nan", nan_stage(2))
    config = vqgan.VQGANConfig(ch=8, norm_groups=4, codebook_size=32, embed_dim=8, disc_ch=8)
    with pytest.raises(FloatingPointError, match="at step 2"):
        train.train("nan", config, train.TrainConfig(out=str(tmp_path), max_steps=5, ckpt_every=1,
                                                     sample_every=0, device="cpu"))
    checkpoint = torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 2  # steps 0 and 1 were good; step 2 stopped before its optimizer step
    weights = [value for value in checkpoint["model"].values() if value.is_floating_point()]
    assert all(torch.isfinite(value).all() for value in weights)


def load_bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_mnist
def test_bench_train_measures_tokens_per_second_and_flops(tmp_path):
    bench = load_bench_train()
    small_tokenizer = dict(ch=8, norm_groups=4, codebook_size=32, embed_dim=8, disc_ch=8, batch_size=4,
                           frames_per_clip=2)
    small_nuwa = dict(dim=32, num_heads=2, encoder_layers=1, decoder_layers=1, frames=2, predict_frames=2,
                      batch_size=1, tasks="t2v,v2v,s2i", **bench.untrained_tokenizers(tmp_path))
    for stage, overrides in (("vqgan", small_tokenizer), ("nuwa", small_nuwa)):
        row = bench.measure(stage, "tiny", torch.device("cpu"), warmup=1, steps=1, overrides=overrides)
        assert row["stage"] == stage and row["step_s"] > 0 and row["flops_per_step"] > 0
        assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / row["step_s"], rel=1e-3)
    assert row["tokens_per_step"] == 1 * 16 * 16 * (2 + 2 + 1)  # NÜWA: target tokens of t2v, v2v and s2i
    assert bench.peak_tflops(torch.device("cpu"), None) is None  # no MFU without a GPU's peak


@needs_mnist
def test_bench_train_procs_measures_the_same_global_step_over_two_processes():
    # --procs 2 (make demo's two CPU processes under DDP) must time the same global batch as one
    # process: the same target tokens per step and, each process computing its half, the same
    # FLOPs (a process measuring only its own half would count about half).
    small = ["--demo", "--quick", "--steps", "1", "--no-bf16", "--threads", "1", "--set", "dim=32",
             "--set", "num_heads=2", "--set", "decoder_layers=1", "--set", "frames=2",
             "--set", "predict_frames=2"]
    rows = []
    for procs in ("1", "2"):
        command = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), *small, "--procs", procs]
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["processes"] == int(procs)
        rows.append(report["results"][0])
    one, two = rows
    assert two["tokens_per_step"] == one["tokens_per_step"] == 4 * 8 * 8 * (2 + 2)  # t2v + v2v, 4 clips each
    # Each process also computes the batch-independent code vectors (pixel codes) once: a few % more.
    assert one["flops_per_step"] <= two["flops_per_step"] <= 1.1 * one["flops_per_step"]
    assert two["step_s"] > 0


def test_bf16_autocast_where_it_is_fast(monkeypatch):
    # CUDA always; a CPU only with native bf16 matmuls and only for stages that opt in (NÜWA); never
    # with --no-bf16.
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    nuwa_stage, tokenizer_stage = train.STAGES["nuwa"], train.STAGES["vqgan"]
    assert nuwa_stage.cpu_bf16 and not tokenizer_stage.cpu_bf16
    for native in (True, False):
        monkeypatch.setattr(train, "cpu_has_bf16", lambda native=native: native)
        with train.autocast_for(nuwa_stage, cpu, True)():
            assert torch.is_autocast_enabled("cpu") == native
            if native:
                assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert train.autocast_for(nuwa_stage, cpu, False) is contextlib.nullcontext
        assert train.autocast_for(tokenizer_stage, cpu, True) is contextlib.nullcontext
        assert train.autocast_for(tokenizer_stage, cuda, True) is not contextlib.nullcontext
    assert isinstance(train.cpu_has_bf16(), bool)


@needs_mnist
@pytest.mark.slow
def test_bench_train_quick_prints_one_json_object_last():
    result = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--quick"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert [(r["stage"], r["preset"]) for r in summary["results"]] == [("vqgan", "tiny"), ("nuwa", "tiny")]
    assert all(r["tokens_per_s"] > 0 and r["flops_per_step"] > 0 for r in summary["results"])


@needs_mnist
def test_the_text_to_image_curriculum_and_per_task_batch_sizes():
    import nuwa
    config = nuwa.NUWAConfig.preset("tiny", tasks="t2i,t2v", t2i_steps=2, frames=3, seg_ckpt="", token_h=8,
                                    token_w=8)
    assert [sorted(batches.nuwa_batch(config, 0, step, 0, 1)) for step in range(3)] == [
        ["t2i"], ["t2i"], ["t2i", "t2v"]]
    assert batches.nuwa_tokens_per_batch(config, 1) == config.batch_size * 64  # counts the phase's tasks
    assert batches.nuwa_tokens_per_batch(config, 2) == config.batch_size * 64 * 4
    mixed = nuwa.NUWAConfig.preset("tiny", tasks="t2i,v2v", batch_size=4, v2v_batch_size=2, predict_frames=4,
                                   seg_ckpt="", token_h=8, token_w=8)
    batch = batches.nuwa_batch(mixed, 0, 0, 0, 1)
    assert len(batch["t2i"]["caption"]) == 4 and batch["v2v"]["video"].shape[0] == 2  # each task its own
    assert batches.nuwa_tokens_per_batch(mixed) == 4 * 64 + 2 * 4 * 64
    with pytest.raises(ValueError, match="t2i_steps=2 needs t2i"):
        batches.nuwa_tasks(nuwa.NUWAConfig.preset("tiny", tasks="t2v", t2i_steps=2, seg_ckpt=""))
    # Three phases: text→image, then the opening frames alone (their own batch), then the mix.
    phased = nuwa.NUWAConfig.preset("tiny", tasks="t2i,t2v", t2i_steps=1, start_steps=2, start_batch_size=5,
                                    frames=3, seg_ckpt="", token_h=8, token_w=8)
    assert [sorted(batches.nuwa_batch(phased, 0, step, 0, 1)) for step in range(4)] == [
        ["t2i"], ["t2v_start"], ["t2v_start"], ["t2i", "t2v"]]
    assert [batches.nuwa_tokens_per_batch(phased, step) for step in (1, 3)] == [
        5 * 2 * 64, phased.batch_size * 64 * 4]
    # The mix may take fewer opening-frame clips than their own phase (mix_start_batch_size).
    fewer = nuwa.NUWAConfig.preset("tiny", tasks="t2v,t2v_start", start_steps=2, start_batch_size=5,
                                   mix_start_batch_size=3, frames=3, seg_ckpt="", token_h=8, token_w=8)
    opening = [batches.nuwa_batch(fewer, 0, step, 0, 1)["t2v_start"]["video"] for step in (1, 2)]
    assert [video.shape[0] for video in opening] == [5, 3]
    assert batches.nuwa_tokens_per_batch(fewer, 2) == (fewer.batch_size * 3 + 3 * 2) * 64
    with pytest.raises(ValueError, match="mix_start_batch_size ≥ 0"):
        batches.nuwa_tasks(nuwa.NUWAConfig.preset("tiny", tasks="t2v_start", mix_start_batch_size=-1,
                                                  seg_ckpt=""))
    with pytest.raises(ValueError, match="start_steps must be ≥ 0"):
        batches.nuwa_tasks(nuwa.NUWAConfig.preset("tiny", tasks="t2v", start_steps=-1, seg_ckpt=""))


@needs_mnist
def test_the_opening_frames_task_draws_its_own_clips_under_whole_clip_captions():
    import nuwa
    config = nuwa.NUWAConfig.preset("tiny", tasks="t2v,t2v_start", frames=6, start_frames=2,
                                    start_batch_size=3, batch_size=2, seg_ckpt="", token_h=8, token_w=8)
    batch = batches.nuwa_batch(config, 0, 5, 0, 1)
    opening = batch["t2v_start"]
    assert tuple(opening["video"].shape) == (3, 2, 1, 64, 64) and len(opening["caption"]) == 3
    clips = batches.captioned_clips("train", 6, 1, 0)
    index = len(clips) // 2 + 5 * 3  # its own stream of clips: not the t2v batch's
    assert opening["caption"][0] == clips[index]["caption"]  # the caption of all 6 frames
    torch.testing.assert_close(opening["video"][0], clips[index]["video"][:2])
    assert opening["caption"] != batch["t2v"]["caption"][:3]
    assert batches.nuwa_tokens_per_batch(config) == 2 * 6 * 64 + 3 * 2 * 64
    with pytest.raises(ValueError, match="1 ≤ start_frames ≤ frames"):
        batches.nuwa_tasks(nuwa.NUWAConfig.preset("tiny", tasks="t2v_start", start_frames=11, seg_ckpt=""))
    with pytest.raises(ValueError, match="start_batch_size ≥ 0"):
        batches.nuwa_tasks(nuwa.NUWAConfig.preset("tiny", tasks="t2v_start", start_batch_size=-1,
                                                  seg_ckpt=""))


def test_bench_train_set_flags_are_typed_and_unknown_fields_refused():
    bench = load_bench_train()
    assert bench.parse_sets(["backend=dense", "relative_keys=false", "batch_size=2", "extent=1,2,2"]) == {
        "backend": "dense", "relative_keys": False, "batch_size": 2, "extent": (1, 2, 2)}
    with pytest.raises(SystemExit, match="no field 'speed'"):
        bench.parse_sets(["speed=11"])


@needs_mnist
def test_infinity_stage_backpropagates_patch_by_patch_and_resumes_exactly(tmp_path, monkeypatch):
    """Render-and-optimize through the shared loop: one forward/backward unit per patch of the
    step's order (8 patches of a 64×128 canvas), and a resumed run repeats the uninterrupted losses."""
    import infinity

    tokenizer = run_stage("vqgan", tmp_path / "tok")
    calls = []
    unit_loss = infinity.unit_loss
    monkeypatch.setattr(infinity, "unit_loss", lambda *a, **k: calls.append(k["unit"]) or unit_loss(*a, **k))
    flags = ["--stage", "infinity", "--preset", "tiny", "--dim", "16", "--num-heads", "2", "--layers", "1",
             "--batch-size", "2", "--codebook-size", "32", "--vqgan-ckpt", str(tokenizer), "--device", "cpu",
             "--log-every", "1", "--sample-every", "0",
             "--token-px", "4", "--patch-size", "8", "8"]  # an f = 4 tokenizer
    train.main([*flags, "--max-steps", "3", "--out", str(tmp_path / "whole")])
    patches = infinity.num_patches(infinity.InfinityConfig.preset("tiny"))
    assert patches == 8 and calls == list(range(patches)) * 3
    train.main([*flags, "--max-steps", "1", "--out", str(tmp_path / "parts")])
    train.main([*flags, "--max-steps", "3", "--out", str(tmp_path / "parts"), "--resume"])
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / run / "infinity" / "log.jsonl")]
              for run in ("whole", "parts")]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    model = infinity.load_infinity(tmp_path / "whole" / "infinity" / "ckpt.pt")
    assert model.config.dim == 16 and not model.training
    assert (tmp_path / "whole" / "infinity" / "samples.png").stat().st_size > 0


@needs_mnist
def test_an_image_only_nuwa_run_draws_text_to_image_samples(tmp_path):
    """`--tasks t2i` (NÜWA-LIP's baseline) has no video task to draw: the run must still end cleanly."""
    tokenizer = run_stage("vqgan", tmp_path / "tok")
    train.main(["--stage", "nuwa", "--preset", "tiny", "--tasks", "t2i", "--dim", "32", "--num-heads", "2",
                "--encoder-layers", "1", "--decoder-layers", "1", "--codebook-size", "32",
                "--batch-size", "2", "--max-steps", "1", "--sample-every", "0",
                "--vqgan-ckpt", str(tokenizer), "--seg-ckpt", "", "--device", "cpu", "--out", str(tmp_path)])
    assert (tmp_path / "nuwa" / "samples.png").stat().st_size > 0
    assert torch.load(tmp_path / "nuwa" / "ckpt.pt", weights_only=True)["step"] == 1


# Micro-batch 1 of 2 of step 3 at seed 0, per stage: Σ x_i · sin(i) of every tensor, as the batch
# functions drew them before they moved into batches.py (train.py and infinity.py at a0dde02).
PINNED_BATCHES = {
    "vqgan": {"": 117.335157},
    "seg": {"": -2.149458},
    "nuwa": {"s2i/sketch": 212.635516, "s2i/video": 18.033485, "t2i/video": 18.033485, "t2v/video": 4.912641,
             "t2v_start/video": -0.049661, "v2v/video": 147.859233},
    "dfvqgan": {"mask": 1.791212, "use_skips": 1.050417, "x": 117.335157},
    "lip": {"image": 18.033485, "mask": -0.899985},
    "infinity": {"pixels": 1.893877},
}


def tensors_of(batch, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return {prefix: batch}
    found = {}
    for key, value in batch.items():
        if isinstance(value, (dict, torch.Tensor)):
            found.update(tensors_of(value, f"{prefix}/{key}" if prefix else key))
    return found


@needs_mnist
def test_the_same_seeds_give_the_same_batches_in_every_stage():
    """Every stage's batch is a pure function of (config, seed, step, part, parts), pinned."""
    import infinity
    import lip
    import nuwa

    configs = {"vqgan": vqgan.VQGANConfig.preset("tiny"), "seg": vqgan.VQGANConfig.preset("tiny", seg=True),
               "nuwa": nuwa.NUWAConfig.preset("tiny", tasks="t2i,t2v,v2v,s2i,t2v_start", seg_ckpt="unused"),
               "dfvqgan": stages.STAGES["dfvqgan"].preset("tiny"), "lip": lip.LIPConfig.preset("tiny"),
               "infinity": infinity.InfinityConfig.preset("tiny")}
    for name, config in configs.items():
        batch = train.STAGES[name].batch(config, 0, 3, 1, 2)
        sums = {key: position_weighted_sum(value.double()) for key, value in tensors_of(batch).items()}
        assert sums == pytest.approx(PINNED_BATCHES[name], abs=1e-6), name
    nuwa_batch = train.STAGES["nuwa"].batch(configs["nuwa"], 0, 3, 1, 2)
    assert nuwa_batch["t2v"]["caption"] == ["digit 9 is moving up then down"]
    assert nuwa_batch["t2v_start"]["caption"] == ["digit 8 is moving left"]
    lip_batch = train.STAGES["lip"].batch(configs["lip"], 0, 3, 1, 2)
    assert lip_batch["caption"] == ["digit 9 is moving up then down"]  # the frames of nuwa's t2i
    assert train.STAGES["infinity"].batch(configs["infinity"], 0, 3, 1, 2)["caption"] == ["4", "3"]
