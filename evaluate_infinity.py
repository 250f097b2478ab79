"""NÜWA-Infinity measured (arXiv 2207.09814): does it keep drawing digits far beyond what it was
trained on? `python evaluate.py infinity --ckpt out/infinity/ckpt.pt [--width 512] [--json]`.

The paper shows canvases and videos much larger than its training images (§4, "infinite visual
synthesis") and scores them with FID against real data. Offline we read them instead:
- canvases (a model trained on canvases of digits): every 32 px slot of a generated canvas
  (--height × --width, e.g. 64×512, four times the training width) is cut out and its biggest ink
  blob read by the digit classifier (classifier.py, through reader.read_slots). `legible_share` is the
  share of slots read with confidence ≥ LEGIBLE_CONFIDENCE; `caption_match` the share of legible
  slots whose digit the canvas's caption names. Real held-out canvases of the same size are the
  ceiling (`real_…`) and their tokenizer round trip what the VQ-GAN alone keeps (`recon_…`).
- videos (a model trained on Moving MNIST clips, frame by frame): from the first --given frames of
  one-digit test clips, --frames frames (100 by default) are generated with the Nearby Context Pool
  and the last 10 are read: is the given digit still there, and does it still move?

Glossary: N canvases or videos, H W pixels, T frames.
Deviations from the paper: the digit classifier replaces FID's Inception network, as in evaluate.py.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

import batches
import data
import infinity
import reader
import runtime
import synthesis
from classifier import load_classifier

# ---------------------------------------------------------------------------------------------
# 1. Canvases: does a canvas far wider than training still read as digits, slot by slot?
# ---------------------------------------------------------------------------------------------
LEGIBLE_CONFIDENCE = 0.9  # a slot reads as a digit when the classifier gives its biggest blob ≥ 90 %


def legibility(readings: list[tuple[int, float]], allowed: list[set[int] | None] | None = None) -> dict:
    """Share of slots read as a digit with confidence ≥ LEGIBLE_CONFIDENCE; with `allowed` (one set
    per slot, None for uncaptioned), also the share of legible slots whose digit the caption names."""
    legible = [confidence >= LEGIBLE_CONFIDENCE for _, confidence in readings]
    metrics = {"legible_share": sum(legible) / max(1, len(readings)),
               "mean_confidence": float(np.mean([c for _, c in readings])) if readings else 0.0}
    if allowed is not None:
        named = [digit in names for (digit, _), names, ok in zip(readings, allowed, legible) if ok and names]
        metrics["caption_match"] = sum(named) / len(named) if named else float("nan")
    return metrics


@torch.no_grad()
def run_infinity(args: argparse.Namespace) -> dict:
    """NÜWA-Infinity: generate canvases --height × --width (e.g. 64×512, 4× the training width) and
    read every 32 px slot; next to the same reading of real held-out canvases of that size (the
    ceiling) and of their tokenizer reconstructions (what the VQ-GAN alone keeps)."""
    model, tokenizer = infinity.load_with_tokenizer(args.ckpt, vqgan_ckpt=args.vqgan,
                                                    map_location=args.device)
    classifier = load_classifier(args.classifier, args.device)
    sampling = runtime.sampling_options(args, args.device)
    if model.config.data == "video":
        return run_infinity_video(args, model, tokenizer, classifier, sampling)
    real = batches.DigitCanvases("test", args.height, args.width, seed=0, length=args.num_canvases)
    # Half the canvases are captioned with a real canvas's digit set, half are not (the "None" caption).
    captions = [real[i]["caption"] if i % 2 == 0 else None for i in range(len(real))]
    print(f"seed {args.seed}; {len(real)} canvases of {args.height}×{args.width} px, "
          f"order {args.direction!r}; temperature {args.temperature}, top-k {args.top_k or 'off'}")
    made, start = [], time.perf_counter()
    for first in runtime.progress(range(0, len(real), args.batch_size), desc="canvases", unit="batch"):
        batch = captions[first:first + args.batch_size]
        guided = args.guidance if any(c is not None for c in batch) else None  # a "None" row is its own guide
        made.append(synthesis.generate_canvas(model, tokenizer, args.height, args.width, args.direction,
                                              captions=batch, batch_size=len(batch), guidance=guided,
                                              **sampling).cpu())  # (b, 1, H, W)
    seconds = time.perf_counter() - start
    made = torch.cat(made)  # (N, 1, H, W)
    images = torch.stack([real[i]["image"] for i in range(len(real))])  # (N, 1, H, W)
    recon = tokenizer.decode(tokenizer.encode(images.to(args.device))).float().clamp(0, 1).cpu()
    slots = args.width // batches.SLOT_PX
    allowed = [set(map(int, c.split())) if c else None for c in captions for _ in range(slots)]
    metrics = legibility(reader.read_slots(made, classifier, batches.SLOT_PX), allowed)
    for prefix, canvases in (("real_", images), ("recon_", recon)):  # the ceiling, and what the VQ-GAN keeps
        read = legibility(reader.read_slots(canvases, classifier, batches.SLOT_PX))
        metrics.update({prefix + name: value for name, value in read.items()})
    metrics.update(slots=slots * len(real), num_canvases=len(real), canvas=[args.height, args.width],
                   training_canvas=[model.config.canvas_height, model.config.canvas_width],
                   direction=args.direction, seconds_per_canvas=seconds / len(real), guidance=args.guidance,
                   **runtime.sampling_report(args))
    if args.grid:
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        rows = [synthesis.tiles(c) for c in made[:4]] + [synthesis.tiles(c) for c in images[:2]]
        labels = [f"generated ({c or 'no caption'})" for c in captions[:4]] + ["real", "real"]
        data.save_grid(rows, args.grid, captions=labels, max_frames=args.width // data.CANVAS)
        print(f"wrote {args.grid}")
    return metrics


# ---------------------------------------------------------------------------------------------
# 2. Videos: does a video far longer than training still hold its digit, and move it?
# ---------------------------------------------------------------------------------------------

LAST_FRAMES = 10  # a long video "still holds its digit" when it is read in most of its last 10 frames


@torch.no_grad()
def run_infinity_video(args: argparse.Namespace, model, tokenizer, classifier, sampling: dict) -> dict:
    """NÜWA-Infinity on video (a model trained with data="video"): from the first --given frames of
    one-digit Moving MNIST test clips, generate --frames frames (100 by default, far longer than
    the training clips) frame by frame with the pool, then read the last 10 frames.

    A model trained on captioned clips (video_captions) gets each clip's digit name as its caption.
    still_read: share of videos whose given digit is read in more than half of their last 10 frames.
    last_frames_read: share of those frames read as the given digit. moving: share of videos whose digit
    (the biggest blob) moves ≥ 1 px per frame on average over the last 10 frames, so a model that
    froze the digit is seen for what it is (a frozen digit stays legible)."""
    frames = args.frames or 100
    # A model trained on captioned clips gets its clip's digit name (--no-caption: "None": what does it add?).
    captioned = model.config.video_captions and not args.no_caption
    if not 0 < args.given < frames:
        raise ValueError(f"need 0 < --given < --frames, got {args.given} and {frames}")
    clips = data.MovingMNIST("test", num_frames=args.given, num_digits=1, seed=0, length=args.num_canvases)
    print(f"seed {args.seed}; {len(clips)} one-digit clips; {args.given} given → {frames} frames; "
          f"temperature {args.temperature}, top-k {args.top_k or 'off'}")
    read, per_frame, moving, made, start = [], [], [], [], time.perf_counter()
    for _, items in runtime.progress(runtime.in_batches(clips, args.batch_size), desc="videos", unit="batch"):
        given = torch.stack([item["video"] for item in items])  # (b, given, 1, 64, 64)
        captions = [batches.clip_caption(item["digits"]) if captioned else None for item in items]
        videos = synthesis.generate_video(model, tokenizer, frames, given_frames=given, batch_size=len(items),
                                          captions=captions, guidance=args.guidance if captioned else None,
                                          **sampling).cpu()  # (b, frames, 1, 64, 64)
        for video, item in zip(videos, items):
            digit = int(item["digits"][0])
            seen = [b for b in reader.read_biggest(video[-LAST_FRAMES:], classifier) if b is not None]
            hits = sum(blob.label == digit for blob in seen)
            read.append(hits > LAST_FRAMES // 2)
            per_frame.append(hits / LAST_FRAMES)
            centres = [(blob.y, blob.x) for blob in seen]
            steps = [math.dist(a, b) for a, b in zip(centres, centres[1:])]
            moving.append(bool(steps) and float(np.mean(steps)) >= 1.0)
        made.append(videos)
    seconds = time.perf_counter() - start
    metrics = {"still_read": float(np.mean(read)), "last_frames_read": float(np.mean(per_frame)),
               "captioned": captioned, "moving": float(np.mean(moving)), "num_videos": len(clips),
               "frames": frames, "given": args.given, "training_frames": model.config.frames,
               "seconds_per_video": seconds / len(clips), "guidance": args.guidance if captioned else None,
               **runtime.sampling_report(args)}
    if args.grid:
        videos = torch.cat(made)[:4]  # (4, frames, 1, 64, 64)
        shown = list(range(0, frames, max(1, frames // 10)))[:10]
        rows = [video[shown] for video in videos]
        data.save_grid(rows, args.grid, captions=[f"frames {shown[0]}…{shown[-1]} of {frames}"] * len(rows),
                       max_frames=len(shown))
        gif = Path(args.grid).with_suffix(".gif")
        data.save_gif(list(videos), gif, captions=[f"{frames} frames, {args.given} given"] * len(videos))
        print(f"wrote {args.grid} and {gif}")
    return metrics
