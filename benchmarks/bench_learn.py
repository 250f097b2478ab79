"""Learning probes: six synthetic token tasks that isolate what each NÜWA task has to learn.

Paper: Wu et al., "NÜWA", arXiv 2111.12417. The probes train the model of nuwa.py (§3.2 3DNA,
§3.3 the encoder-decoder, the loss of Eq. 10) on miniature versions of the tasks of §4, with no
VQ-GAN and no MNIST: targets are 8×8 grids of K = 64 codes drawn by a rule, so the best reachable
loss (the floor) is known exactly and a model change can be judged in minutes on 2 CPU cores.

    copy     (T2V) T = 4 frames; a 3×3 block of random codes 1..K-1 (new in every clip) on
             background 0 moves one token per frame in the direction the caption names
             ("moving up"). Frame 0 is a guess (the block's place and its 9 codes); frames 1-3 are
             frame 0 shifted, floor 0. It isolates copying never-seen codes from the previous frame
             (causal 3DNA) plus reading the direction from the text. Headline: copy_nats, the mean
             nats/token on frames 1-3. A model that tracks where the block goes but guesses its
             codes sits at 9·ln(63)/64 = 0.58 there; frame 0's floor is (ln 18 + 9·ln 63)/64 = 0.63.
    caption  (T2I) one frame; "digit 3" means digit 3's fixed 3×3 pattern at a uniformly random
             place. The place (one of 6·6 = 36) is not predictable, the rest is: the floor is
             log(36)/64 nats/token. It isolates text → content. Headline: caption_excess = nats − floor.
    sketch   (S2I) the sketch is background 0 plus a random 3×3 block; the target token at (h, w)
             is a fixed permutation of the sketch token at (h, w). Floor 0. It isolates 3DNA
             cross-attention to the projected position (NÜWA Eq. 4-5). Headline: sketch_nats.
    v2v      (V2V) T = 6 frames under "None"; a block moves in one of 4 random directions. Frames
             0-2 are given and the loss is on frames 3-5 only; floor 0, since the direction shows
             from frame 0 to 1. It isolates inferring motion from context. Headline: v2v_nats.
    v2v_two  (V2V, two objects) as v2v, with two blocks of their own codes, each moving its own way,
             apart in every frame (Moving MNIST's test clips hold two digits; the captioned training
             clips one). Floor 0. It asks whether the model can continue two things at once.
             Headline: v2v_two_nats.
    order    (T2V, its opening) T = 2 frames under a bounce caption as the real data has them,
             "digit 7 is moving up then down": the block moves one token the way the *first*
             direction word says. "up then down" and "down then up" hold the same words, so only
             their order tells where the block goes. Headline: order_gap, how many more nats
             frame 1 costs per clip under the caption with its two direction words swapped (as
             evaluate.py word-use): 0 for a model that reads the words but not their order;
             higher is better, "learned" at ≥ 1 nat.

Glossary: B batch, T frames, h w token rows/columns (8, 8), K codebook size (64), S block side (3).

Not in the paper: these probes are our diagnostic. Training follows train.py (AdamW with betas
0.9/0.95 and weight decay on matrices only, linear warm-up, gradient clip 1.0); every step draws
fresh clips from a generator seeded by (seed, step), the held-out clips by a separate stream.

    python benchmarks/bench_learn.py --probe copy --steps 400            # the baseline
    python benchmarks/bench_learn.py --probe copy --set relative_bias=true --set tie_head=true
    python benchmarks/bench_learn.py --probe all --max-seconds 300
    python benchmarks/bench_learn.py --probe order --set encoder_layers=2   # the earlier tiny encoder

`--set field=value` overrides any NUWAConfig field of the `tiny` preset. Every eval prints
nats/token per frame; the last line of stdout is one JSON object. Measured figures: RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402  (after the path set-up, so the script runs from anywhere)
import evaluate  # noqa: E402  (word-use's direction flip, for the order probe)
import nuwa  # noqa: E402
import runtime  # noqa: E402
import stages  # noqa: E402

GRID = 8  # h = w: token rows/columns per frame (chosen here: small enough for minutes on a CPU)
K = 64  # codes of the target (and of the sketch); code 0 is the background
S = 3  # side of the block of codes
BASE = dict(codebook_size=K, sketch_codebook_size=K, token_h=GRID, token_w=GRID, max_frames=8)
THRESHOLD = 0.05  # "learned": headline ≤ 0.05 nats/token, ~1 % of the untrained log K = 4.16
ORDER_LEARNED = 1.0  # the order probe's "learned": frame 1 costs ≥ 1 nat more under the swapped caption
TWO_BLOCK_ATTEMPTS = 1000  # v2v_two redraws its two blocks until they are apart (about 1 in 5 draws are)
PATTERN_SEED, PERMUTATION_SEED = 1234, 5678  # the caption patterns and the sketch permutation, fixed
TRAIN_STREAM, EVAL_STREAM = 0, 1  # (seed, stream, step) seeds every batch
WEIGHT_DECAY, BETAS, GRAD_CLIP = 0.01, stages.TRANSFORMER_BETAS, 1.0  # as stages.nuwa_optimizers
FLAG_FIELDS = {"batch_size": "--batch-size", "lr": "--lr", "warmup_steps": "--warmup"}  # training fields


class Probe(NamedTuple):
    frames: int  # T of the target clip
    shown: tuple[int, ...]  # the frames printed and reported in "per_frame" (v2v: not the given ones)
    scored: tuple[int, ...]  # the frames the headline averages
    headline: str  # the metric's name in the JSON


PROBES = {"copy": Probe(4, (0, 1, 2, 3), (1, 2, 3), "copy_nats"),
          "caption": Probe(1, (0,), (0,), "caption_excess"),
          "sketch": Probe(1, (0,), (0,), "sketch_nats"),
          "v2v": Probe(6, (3, 4, 5), (3, 4, 5), "v2v_nats"),
          "v2v_two": Probe(6, (3, 4, 5), (3, 4, 5), "v2v_two_nats"),
          "order": Probe(2, (0, 1), (1,), "order_gap")}
MOVES = list(data.MOTION_WORDS.items())  # [((axis, sign), word)]: axis 0 moves along rows, 1 along columns
CAPTION_PATTERNS = torch.randint(1, K, (len(data.DIGIT_WORDS), S, S),
                                 generator=torch.Generator().manual_seed(PATTERN_SEED))  # (10, S, S)
_FLIP = evaluate.WORD_CHANGES["direction"]  # up ↔ down, left ↔ right: word-use's own flip
_WORDS = data.CaptionVocabulary()
SWAP_DIRECTIONS = torch.tensor([_WORDS.index[_FLIP.get(word, word)]
                                for word in _WORDS.words])  # word id → the flipped word's id
SKETCH_PERMUTATION = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(
    K - 1, generator=torch.Generator().manual_seed(PERMUTATION_SEED))])  # (K,), 0 ↦ 0


# ---------------------------------------------------------------------------------------------
# Clips
# ---------------------------------------------------------------------------------------------


def placements(frames: int) -> int:
    """Corners where an S×S block moving one token per frame stays inside the grid for `frames`."""
    return (GRID - S + 1 - (frames - 1)) * (GRID - S + 1)


def moving_block(generator: torch.Generator, frames: int, axis: int, sign: int,
                 codes: torch.Tensor) -> torch.Tensor:
    """The S×S `codes` on background 0, moving one token per frame along `axis` → (T, h, w)."""
    travel = frames - 1
    lo, hi = max(0, -sign * travel), GRID - S - max(0, sign * travel)  # start range on the moving axis
    start = [int(torch.randint(0, GRID - S + 1, (1,), generator=generator)) for _ in range(2)]
    start[axis] = int(torch.randint(lo, hi + 1, (1,), generator=generator))
    clip = torch.zeros(frames, GRID, GRID, dtype=torch.long)  # (T, h, w)
    for t in range(frames):
        row, col = start[0] + (sign * t if axis == 0 else 0), start[1] + (sign * t if axis == 1 else 0)
        clip[t, row:row + S, col:col + S] = codes
    return clip


def two_moving_blocks(generator: torch.Generator, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two S×S blocks of fresh codes, each moving one token per frame its own (random) way, drawn
    again until they share no token in any frame → each block's clip (T, h, w); their sum is the clip."""
    for _ in range(TWO_BLOCK_ATTEMPTS):
        blocks = []
        for _ in range(2):
            (axis, sign), _ = MOVES[int(torch.randint(0, len(MOVES), (1,), generator=generator))]
            codes = torch.randint(1, K, (S, S), generator=generator)  # (S, S)
            blocks.append(moving_block(generator, frames, axis, sign, codes))
        if not ((blocks[0] != 0) & (blocks[1] != 0)).any():
            return blocks[0], blocks[1]
    raise RuntimeError(f"no two apart blocks in {TWO_BLOCK_ATTEMPTS} draws of {frames} frames "
                       f"on {GRID}×{GRID}")


def make_batch(probe: str, generator: torch.Generator, batch_size: int, config: nuwa.NUWAConfig | nuwa.NUWA):
    """One batch of `probe` → (cond, targets (B, T, h, w) long, loss_mask (B, T, h, w) bool or None)."""
    config = getattr(config, "config", config)  # a model or its config
    grid = (config.token_h, config.token_w)
    if config.codebook_size < K or config.sketch_codebook_size < K or grid != (GRID, GRID):
        raise ValueError(f"the probes need codebook sizes ≥ {K} and {GRID}×{GRID} token grids")
    vocabulary = data.CaptionVocabulary(config.text_len)
    T, B = PROBES[probe].frames, batch_size
    randint = lambda low, high, size: torch.randint(low, high, size, generator=generator)
    clips, captions = [], []
    for _ in range(B):
        if probe in ("copy", "v2v"):
            (axis, sign), word = MOVES[int(randint(0, len(MOVES), (1,)))]
            clips.append(moving_block(generator, T, axis, sign, randint(1, K, (S, S))))  # (T, h, w)
            captions.append(f"moving {word}")
        elif probe == "v2v_two":  # under "None", like v2v
            clips.append(sum(two_moving_blocks(generator, T)))  # (T, h, w): the blocks never overlap
        elif probe == "order":  # a bounce caption: the first direction word is the move
            (axis, sign), word = MOVES[int(randint(0, len(MOVES), (1,)))]
            clips.append(moving_block(generator, T, axis, sign, randint(1, K, (S, S))))  # (T, h, w)
            digit = data.DIGIT_WORDS[int(randint(0, len(data.DIGIT_WORDS), (1,)))]  # a word to read past
            captions.append(f"digit {digit} is moving {word} then {data.MOTION_WORDS[(axis, -sign)]}")
        elif probe == "caption":
            digit = int(randint(0, len(data.DIGIT_WORDS), (1,)))
            clips.append(moving_block(generator, 1, 0, 1, CAPTION_PATTERNS[digit]))  # (1, h, w)
            captions.append(f"digit {data.DIGIT_WORDS[digit]}")
        elif probe == "sketch":
            clips.append(moving_block(generator, 1, 0, 1, randint(1, K, (S, S))))  # (1, h, w): the sketch
        else:
            raise ValueError(f"unknown probe {probe!r}; expected one of {sorted(PROBES)}")
    clips = torch.stack(clips)  # (B, T, h, w)
    if probe == "sketch":
        return nuwa.sketch_condition(clips), SKETCH_PERMUTATION[clips], None  # target = permuted sketch
    if probe in ("v2v", "v2v_two"):
        mask = torch.zeros(B, T, GRID, GRID, dtype=torch.bool)  # (B, T, h, w)
        mask[:, PROBES[probe].scored] = True
        return nuwa.none_condition(vocabulary, B), clips, mask
    return nuwa.text_condition(vocabulary, captions), clips, None


def floors(probe: str) -> list[float]:
    """The lowest reachable nats/token of each shown frame: the entropy the condition leaves."""
    if probe == "caption":
        return [math.log(placements(1)) / GRID ** 2]  # only the place is unknown
    if probe in ("copy", "order"):  # frame 0: the place (the caption gives the direction), S² codes of K − 1
        first = (math.log(placements(PROBES[probe].frames)) + S * S * math.log(K - 1)) / GRID ** 2
        return [first] + [0.0] * (PROBES[probe].frames - 1)  # later frames: frame 0 shifted
    return [0.0] * len(PROBES[probe].shown)  # determined by the condition and the frames before


# ---------------------------------------------------------------------------------------------
# Model, evaluation, training
# ---------------------------------------------------------------------------------------------


def parse_value(text: str, default):
    """A `--set` value in the type of the field's default: bool (true/false/1/0), tuple ("1,1,1"), …"""
    if isinstance(default, bool) or default is None and text.lower() in ("true", "false"):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected a bool (true/false/1/0), got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(default, tuple):
        kind = type(default[0]) if default else int
        return tuple(kind(part) for part in text.split(","))
    if default is None:
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text
    return type(default)(text)


def parse_overrides(pairs: list[str]) -> dict:
    """["dim=64", "extent=1,1,1"] → {"dim": 64, "extent": (1, 1, 1)}, typed by the tiny preset."""
    base, known = nuwa.NUWAConfig.preset("tiny", **BASE), [f.name for f in fields(nuwa.NUWAConfig)]
    overrides = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects name=value, got {pair!r}")
        if name not in known:
            raise ValueError(f"unknown NUWAConfig field {name!r}; the fields are: {', '.join(known)}")
        if name in FLAG_FIELDS:  # the model ignores training fields; the probe's flags set them
            raise ValueError(f"--set {name} has no effect here; use {FLAG_FIELDS[name]}")
        overrides[name] = parse_value(text, getattr(base, name))
    return overrides


def build_model(overrides: dict) -> nuwa.NUWA:
    unknown = sorted(set(overrides) - {f.name for f in fields(nuwa.NUWAConfig)})
    if unknown:
        raise ValueError(f"unknown NUWAConfig field(s) {unknown}; the fields are: "
                         f"{', '.join(f.name for f in fields(nuwa.NUWAConfig))}")
    return nuwa.NUWA(nuwa.NUWAConfig.preset("tiny", **{**BASE, **overrides}))


def batch_generator(seed: int, stream: int, step: int) -> torch.Generator:
    seed_value = int(np.random.SeedSequence([seed, stream, step]).generate_state(1)[0])
    return torch.Generator().manual_seed(seed_value)


@torch.no_grad()
def evaluate(model: nuwa.NUWA, probe: str, clips) -> dict:
    """Teacher-forced nats/token of each scored frame, and the headline metric, on held-out clips."""
    cond, targets, _ = clips
    B, T, h, w = targets.shape
    with runtime.evaluating(model):
        per_token = model.token_nats(cond, targets)  # (B, N)
        per_frame = per_token.view(B, T, h * w).mean(dim=(0, 2))  # (T,)
        value = float(per_frame[list(PROBES[probe].scored)].mean())
        if probe == "caption":
            value -= floors(probe)[0]  # the excess over the place's entropy
        if probe == "order":  # frame 1's nats per clip under the swapped caption minus under the true one
            swapped = model.token_nats(cond._replace(tokens=SWAP_DIRECTIONS[cond.tokens]), targets)  # (B, N)
            frame1 = lambda nats: nats.view(B, T, h * w)[:, 1].sum(1)  # (B,)
            value = float((frame1(swapped) - frame1(per_token)).mean())
    return {"per_frame": [float(per_frame[t]) for t in PROBES[probe].shown], "value": value}


def optimizer(model: nuwa.NUWA, lr: float) -> torch.optim.AdamW:
    """AdamW with the groups of stages.nuwa_optimizers (weight decay on weight matrices only)."""
    return torch.optim.AdamW(nuwa.parameter_groups(model, WEIGHT_DECAY), lr=lr, betas=BETAS)


def describe(probe: str, step: int, elapsed: float, loss: float | None, result: dict) -> str:
    scored = PROBES[probe].scored
    loss_text = "  n/a" if loss is None else f"{loss:.3f}"
    head = f"{probe:<7} step {step:5d}  t={elapsed:7.1f}s  loss {loss_text}  "
    if probe == "caption":
        nats = result["per_frame"][0]
        return head + f"nats/token {nats:.3f}  (floor {floors(probe)[0]:.3f}, excess {result['value']:.3f})"
    if probe == "sketch":
        return head + f"nats/token {result['value']:.3f}"
    values = " ".join(f"{v:.2f}" for v in result["per_frame"])
    shown = PROBES[probe].shown
    if probe == "order":
        return head + f"nats/token per frame 0-1: {values}  (order gap {result['value']:.2f} nats per clip)"
    return head + (f"nats/token per frame {shown[0]}-{shown[-1]}: {values}  "
                   f"(frames {scored[0]}-{scored[-1]}: {result['value']:.3f})")


def run(probe: str, overrides: dict | None = None, *, steps: int = 600, max_seconds: float | None = None,
        batch_size: int = 8, lr: float = 3e-3, warmup: int = 10, seed: int = 0, eval_every: int = 50,
        eval_clips: int = 64, log=print) -> dict:
    """Train a fresh model on `probe`, evaluating every `eval_every` steps → the JSON summary."""
    overrides = dict(overrides or {})
    torch.manual_seed(seed)  # the model's initialisation
    model = build_model(overrides)
    adamw = optimizer(model, lr)
    held_out = make_batch(probe, batch_generator(seed, EVAL_STREAM, 0), eval_clips, model)
    log(f"{probe}: seed {seed}, {sum(p.numel() for p in model.parameters()):,} parameters, overrides "
        f"{overrides}, batch {batch_size}, lr {lr}, {torch.get_num_threads()} thread(s)")
    start, train_seconds, losses, curve, result = time.perf_counter(), 0.0, [], [], None
    for step in range(steps + 1):
        elapsed = time.perf_counter() - start
        out_of_time = max_seconds is not None and elapsed >= max_seconds
        if step % eval_every == 0 or step == steps or out_of_time:
            result = evaluate(model, probe, held_out)
            curve.append([step, round(elapsed, 2), result["value"]])
            log(describe(probe, step, elapsed, sum(losses) / len(losses) if losses else None, result))
            losses = []
        if step == steps or out_of_time:
            break
        # --- one training step: fresh clips, forward, loss (Eq. 10), backward, clip, step
        tick = time.perf_counter()
        model.train()
        generator = batch_generator(seed, TRAIN_STREAM, step)
        cond, targets, loss_mask = make_batch(probe, generator, batch_size, model)
        for group in adamw.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(1, warmup))  # linear warm-up
        loss = model.loss(cond, targets, loss_mask=loss_mask)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{probe}: non-finite loss {loss.item()} at step {step}")
        adamw.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        adamw.step()
        losses.append(loss.item())
        train_seconds += time.perf_counter() - tick
    if probe == "order":  # higher is better
        goal, first_key = f"≥ {ORDER_LEARNED:g}", f"first_step_at_least_{ORDER_LEARNED:g}"
        first = next((s for s, _, v in curve if v >= ORDER_LEARNED), None)
    else:
        goal, first_key = f"≤ {THRESHOLD}", f"first_step_below_{THRESHOLD}"
        first = next((s for s, _, v in curve if v <= THRESHOLD), None)
    log(f"{probe}: {PROBES[probe].headline} {result['value']:.3f} after {step} steps; "
        f"first step {goal}: {first}")
    return {"probe": probe, "config": overrides, "steps": step,
            "seconds": round(time.perf_counter() - start, 2),
            "seconds_per_step": round(train_seconds / max(1, step), 4), "headline": PROBES[probe].headline,
            "final": result["value"], first_key: first, "curve": curve,
            "frames": list(PROBES[probe].shown), "per_frame": result["per_frame"], "floor": floors(probe),
            "seed": seed, "batch_size": batch_size, "lr": lr}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--probe", choices=[*PROBES, "all"], default="copy")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a NUWAConfig field of the tiny preset (repeatable)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop early after this wall time (per probe)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=10, help="linear learning-rate warm-up steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-clips", type=int, default=64, help="held-out clips (a separate seed stream)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the CPU is shared)")
    parser.add_argument("--backend", default=None, help="NUWAConfig.backend (default: the config's own)")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
    except ValueError as error:
        parser.error(str(error))
    if args.backend is not None:
        overrides["backend"] = args.backend
    torch.set_num_threads(args.threads)
    options = dict(steps=args.steps, max_seconds=args.max_seconds, batch_size=args.batch_size, lr=args.lr,
                   warmup=args.warmup, seed=args.seed, eval_every=args.eval_every, eval_clips=args.eval_clips)
    probes = list(PROBES) if args.probe == "all" else [args.probe]
    results = [run(probe, overrides, **options) for probe in probes]
    summary = results[0] if len(results) == 1 else {"config": overrides, "results": results}
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
