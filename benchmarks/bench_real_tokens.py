"""The real-token probe: the tiny NÜWA on text→video over a trained tokenizer's tokens of real clips.

The learning probes (bench_learn.py) use synthetic codes whose floor is known. This one asks the
same question of real data: how fast does the model learn the *ink* tokens, the few that carry the
digit (the background is one code and is learnt in a few steps)? It tokenizes 3,000 captioned
training clips and 64 held-out ones once, then trains for a wall-clock budget and prints, every
50 steps, the teacher-forced cross-entropy on the held-out clips split into: ink tokens of frame 0
(drawing the caption's digit from nothing), ink tokens of frames 1 … T−1 (carrying the digit on as
it moves), background tokens, and all tokens; and `direction_gap`: how many more nats frame 1 of
a held-out clip costs under its caption with every direction word flipped (evaluate.py word-use):
0 when the model does not read where the digit goes first. The last line is one JSON object.
`--train-frames k` trains on the clips' first k frames only, under the whole clip's caption (as
batches.py's t2v_start task does).

    python benchmarks/bench_real_tokens.py --vqgan out/demo/vqgan/ckpt.pt --max-seconds 420
    python benchmarks/bench_real_tokens.py --vqgan out/demo/vqgan/ckpt.pt --paper   # absolute positions only
    python benchmarks/bench_real_tokens.py --vqgan out/vqgan/ckpt.pt --set pixel_codes=false   # one aid off

Measured figures: RESULTS.md (learning probes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_learn  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import nuwa  # noqa: E402
import runtime  # noqa: E402
import stages  # noqa: E402
import vqgan  # noqa: E402


@torch.no_grad()
def tokenized_clips(tokenizer: vqgan.VQGAN, split: str, n: int,
                    frames: int) -> tuple[torch.Tensor, list[str]]:
    """n one-digit captioned clips of `split` → tokens (n, T, h, w) and their captions."""
    clips = data.CaptionedMovingMNIST(split, num_frames=frames, num_digits=1, seed=0)
    items = [clips[i] for i in range(n)]
    tokens = torch.cat([tokenizer.encode_video(torch.stack([item["video"] for item in items[i:i + 50]]))
                        for i in range(0, n, 50)])  # (n, T, h, w)
    return tokens, [item["caption"] for item in items]


@torch.no_grad()
def split_losses(model: nuwa.NUWA, tokens: torch.Tensor, captions: list[str], background: int) -> dict:
    """Teacher-forced nats/token on held-out clips: frame-0 ink, later ink, background, all."""
    ink = tokens.flatten(2) != background  # (B, T, h·w)
    flipped = [evaluate.changed_caption(caption, "direction") for caption in captions]
    opening = tokens[:, :2]  # frames 0 and 1: a causal decoder scores them alike in any longer clip
    cell_count = opening[0, 0].numel()

    def frame1_nats(texts: list[str]) -> torch.Tensor:  # (B,) nats of frame 1, summed over its tokens
        nats = model.token_nats(nuwa.text_condition(model.vocabulary, texts), opening)  # (B, 2·h·w)
        return nats[:, cell_count:].sum(1)

    with runtime.evaluating(model):
        loss = model.token_nats(nuwa.text_condition(model.vocabulary, captions), tokens)  # (B, N)
        loss = loss.view(*tokens.shape[:2], -1)  # (B, T, h·w)
        gap = frame1_nats(flipped) - frame1_nats(captions)  # (B,)
    return {"frame0_ink": loss[:, 0][ink[:, 0]].mean().item(),
            "later_ink": loss[:, 1:][ink[:, 1:]].mean().item(),
            "background": loss[~ink].mean().item(), "all": loss.mean().item(),
            "direction_gap": gap.mean().item()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vqgan", default="out/demo/vqgan/ckpt.pt", help="a trained tokenizer (make demo's)")
    parser.add_argument("--max-seconds", type=float, default=420.0, help="training budget (wall clock)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--train-frames", type=int, default=0,
                        help="train on the first k frames only, under the whole clip's caption (0 = all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--paper", action="store_true",
                        help="the paper's scheme (no relative tables, untied head, two encoder layers)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="NUWAConfig overrides, as in bench_learn.py (e.g. pixel_codes=false)")
    args = parser.parse_args(argv)
    overrides = bench_learn.parse_overrides(args.set)
    torch.set_num_threads(args.threads)
    tokenizer = vqgan.load_vqgan(args.vqgan).eval()
    train_tokens, train_captions = tokenized_clips(tokenizer, "train", 3000, args.frames)
    test_tokens, test_captions = tokenized_clips(tokenizer, "test", 64, args.frames)
    background = int(torch.bincount(train_tokens.flatten()).argmax())  # the code of an empty cell
    h, w = train_tokens.shape[2:]
    torch.manual_seed(0)
    scheme = nuwa.TINY_PAPER_SCHEME if args.paper else {}
    config = nuwa.NUWAConfig.preset("tiny", codebook_size=tokenizer.codebook_size, token_h=h, token_w=w,
                                    **{**scheme, **overrides})
    model = nuwa.NUWA(config)
    if model.config.pixel_codes:
        model.set_code_pixels(tokenizer.code_patches())
    groups = nuwa.parameter_groups(model, 0.01)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=stages.TRANSFORMER_BETAS)
    generator = torch.Generator().manual_seed(1)
    curve, step, start = [], 0, time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        if step % 50 == 0 or elapsed > args.max_seconds:
            losses = split_losses(model, test_tokens, test_captions, background)
            rounded = {k: round(v, 4) for k, v in losses.items()}
            curve.append({"step": step, "seconds": round(elapsed, 1), **rounded})
            print(" ".join(f"{k} {v}" for k, v in curve[-1].items()), flush=True)
        if elapsed > args.max_seconds:
            break
        picks = torch.randint(len(train_tokens), (args.batch_size,), generator=generator)
        for group in optimizer.param_groups:  # linear warm-up over 10 steps, then constant
            group["lr"] = args.lr * min(1.0, (step + 1) / 10)
        cond = nuwa.text_condition(model.vocabulary, [train_captions[i] for i in picks])
        loss = model.loss(cond, train_tokens[picks][:, :args.train_frames or None])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
    summary = {"scheme": "paper" if args.paper else "default", "vqgan": args.vqgan, "curve": curve,
               "final": curve[-1]}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
