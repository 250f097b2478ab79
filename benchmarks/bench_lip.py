"""NÜWA-LIP measured: visible-pixel fidelity (DF-VQGAN vs plain VQGAN) and language-guided inpainting
of half-hidden digits (LIP vs NÜWA's zero-shot completion), with the digit classifier as the judge.

    python benchmarks/bench_lip.py [--quick] [--n 200] [--candidates 4] [--swap 100] [--guidance S]
                                   [--temperature T] [--seed S] [--json]

Data: the first n one-digit clips of the held-out captioned split (data.CaptionedMovingMNIST
"heldout": MNIST test digits), frame 0 of each. Mask of item i: the half `lip.SIDES[i % 4]` (top,
bottom, left, right) of the digit's ink box is missing (lip.half_digit_mask). Every score reads the
whole frame the way reader.video_digit reads a one-digit frame (locate, crop, classify).

Rows:
- visible MSE: mean squared error per visible pixel between the input and (a) DF-VQGAN's
  decode(encode(masked frame, mask)) with the symmetrical connections (hole tokens: whatever the
  zero-filled hole gives; inpainting replaces them), the same without skips, (b) the plain VQGAN's
  decode(encode(masked frame)); given the real hole as well (the tokenizers' round trip of the whole
  frame, scored on the visible pixels): (c) DF-VQGAN with skips, (d) the plain VQGAN; and of the
  inpainted frames of both methods (what a user gets).
- inpaint-vs-reconstruction: mean |Δ| per visible pixel between LIP's inpainted frame and DF-VQGAN's
  reconstruction of the visible input (the hole's sampled tokens reach visible pixels only through
  the decoder's receptive field).
- caption digit accuracy: how often the classifier reads the caption's digit in the masked input
  (the floor: what the visible half already gives away), in LIP's inpainting (first candidate: K = 1,
  and the best of K by the digit scorer of sample.py), and in NÜWA's completion (plain VQGAN tokens of
  the masked frame, tasks.edit_image: raster decoder, visible tokens given, hole tokens sampled under
  the caption), also K = 1 and best of K. The real frame's accuracy is the ceiling. The digit scorer
  is the judge itself, so LIP's best of K is also reranked by a model that is not the judge, as the
  paper reranks with CLIP: NÜWA's caption score (tasks.nuwa_caption_scorer, `_nuwa_rerank` keys).
- black-cell codes: how many codes (and what entropy) each tokenizer uses for an all-black f×f
  cell of the whole frames: redundancy the token predictors pay for in cross-entropy.
- caption use, teacher-forced (no sampling, seconds): MP-S2S's nats per hole token of the real
  frame's tokens under the true caption, under a swapped caption (the digit word replaced by
  another digit, `swapped_caption`) and under "None"; the gap per frame and the share of frames the
  true caption explains better. A model that ignores its caption has gap 0 and 50 %.
- caption swap (`--swap n`, default 100): the first n frames inpainted once more under the swapped
  caption, K candidates. `swap_follows_swapped` is how often the first (one-sample) swapped fill is
  read as the swapped digit; `swap_follows_both` how often a pair follows its caption both times
  (the true fill read as the true digit and the swapped fill as the swapped one): the caption, not
  the visible half, chose the digit. The `_nuwa_rerank` keys: both fills of a pair are the best of K
  by NÜWA's caption score.
- `--guidance s`: LIP samples with classifier-free guidance (models trained with
  `--cond-drop-prob`; lip.MPS2S.generate).

The last printed line is one JSON object (--json prints only that); the measured figures are in
RESULTS.md (NÜWA-LIP). `--quick` (8 frames, K = 2) takes seconds on a CPU; the full run (K = 4,
swap 100 with K = 4) minutes on one thread.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import classifier  # noqa: E402
import data  # noqa: E402
import lip  # noqa: E402
import nuwa  # noqa: E402
import reader  # noqa: E402
import runtime  # noqa: E402
import tasks  # noqa: E402
from dfvqgan import DFVQGAN  # noqa: E402

SEED = 0
CHUNK = 25  # frames inpainted per generate call (× K candidates rows)


def heldout_frames(n: int) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
    """(frames (n, 1, 64, 64), half-digit masks (n, 1, 64, 64), captions, digits (n,))."""
    clips = data.CaptionedMovingMNIST("heldout", num_frames=2, num_digits=1, length=n)
    items = [clips[i] for i in range(n)]
    frames = torch.stack([item["video"][0] for item in items])
    masks = torch.stack([lip.half_digit_mask(frame, lip.SIDES[i % 4]) for i, frame in enumerate(frames)])
    digits = torch.stack([item["digits"][0] for item in items])
    return frames, masks, [item["caption"] for item in items], digits


def swapped_caption(caption: str, digit: int, index: int) -> tuple[str, int]:
    """The caption with its digit word replaced by another digit; item `index` takes the
    (index mod 9 + 1)-th next digit, so the swaps cycle through all nine other digits."""
    other = (digit + 1 + index % 9) % 10
    return caption.replace(f"digit {digit}", f"digit {other}"), other


def digits_read(pixels: torch.Tensor, judge) -> torch.Tensor:
    """The digit read in each frame (n, 1, 64, 64) as reader.video_digit reads a one-digit frame with
    the digit classifier `judge`: (n,)."""
    return torch.tensor([reader.video_digit(frame[None], judge) for frame in pixels.float().cpu()])


def digit_accuracy(pixels: torch.Tensor, digits: torch.Tensor, judge) -> float:
    """Share of frames (n, 1, 64, 64) whose digit, read as reader.video_digit reads it, is the caption's."""
    return float((digits_read(pixels, judge) == digits.cpu()).float().mean())


@torch.no_grad()
def caption_use(model: lip.MPS2S, dfvqgan: DFVQGAN, frames, masks, captions, swapped) -> dict:
    """Teacher-forced nats per hole token of the real frames' tokens under the true, the swapped and
    the "None" caption (module docstring)."""
    tokens, _ = dfvqgan.encode(frames, masks)  # (n, h, w): hole tokens of the real frame
    hole = lip.token_mask(masks, tokens.shape[-2:])  # (n, h, w)
    masked = frames.masked_fill(masks, 0.0)
    weights = hole.flatten(1).float()  # (n, N)

    def nats(text_captions) -> torch.Tensor:  # (n,) summed over each frame's hole tokens
        logits = model(model.vocabulary.encode(text_captions), tokens, hole, masked, masks)  # (n, N, K)
        per_token = nuwa.code_nats(logits.float(), tokens)  # (n, N)
        return (per_token * weights).sum(1)

    true, other, none = nats(captions), nats(swapped), nats([None] * len(captions))
    count = weights.sum()
    return {"hole_nats_true_caption": float(true.sum() / count),
            "hole_nats_swapped_caption": float(other.sum() / count),
            "hole_nats_none_caption": float(none.sum() / count),
            "caption_gap_nats_per_frame": float((other - true).mean()),
            "true_caption_explains_better": float((true < other).float().mean())}


def visible_mse(pixels: torch.Tensor, frames: torch.Tensor, masks: torch.Tensor) -> float:
    visible = ~masks
    return float((pixels.float().cpu() - frames)[visible].pow(2).mean())


@torch.no_grad()
def evaluate_inpainting(lip_ckpt: str, baseline_ckpt: str, classifier_path: str, *, n: int = 200,
                        candidates: int = 4, top_k: int | None = runtime.TOP_K, vqgan_ckpt: str | None = None,
                        dfvqgan_ckpt: str | None = None, seed: int = SEED, swap: int = 100,
                        guidance: float | None = None, temperature: float = 1.0) -> dict:
    """Every number of the table (module docstring). Sampling: the same top_k for both; LIP at
    `temperature`, NÜWA's completion at temperature 1."""
    frames, masks, captions, digits = heldout_frames(n)
    masked = frames.masked_fill(masks, 0.0)
    swaps = [swapped_caption(c, int(d), i) for i, (c, d) in enumerate(zip(captions, digits))]
    judge = classifier.load_classifier(classifier_path)
    scorer = reader.digit_scorer(judge)
    model, dfvqgan = lip.load_lip(lip_ckpt, dfvqgan_ckpt=dfvqgan_ckpt)
    nuwa_models = tasks.Models(baseline_ckpt, vqgan_ckpt)  # its tokenizer checked: NÜWA completes, reranks
    baseline, plain = nuwa_models.nuwa, nuwa_models.vqgan
    result: dict = {"n": n, "candidates": candidates, "top_k": top_k, "seed": seed, "guidance": guidance,
                    "temperature": temperature,
                    "mask": "half of the digit's ink box"}
    result.update(caption_use(model, dfvqgan, frames, masks, captions, [c for c, _ in swaps]))

    # --- visible-pixel fidelity of the tokenizers (bar 2) ------------------------------------
    indices, skips = dfvqgan.encode(masked, masks)
    df_reconstruction = dfvqgan.decode(indices, skips, masks).clamp(0, 1)
    plain_round_trip = lambda x: plain.decode(plain.encode(x)).clamp(0, 1)
    result["visible_mse_dfvqgan_skips"] = visible_mse(df_reconstruction, frames, masks)
    result["visible_mse_dfvqgan_no_skips"] = visible_mse(dfvqgan.decode(indices).clamp(0, 1), frames, masks)
    result["visible_mse_vqgan_masked"] = visible_mse(plain_round_trip(masked), frames, masks)
    result["visible_mse_vqgan_whole_frame"] = visible_mse(plain_round_trip(frames), frames, masks)
    whole_indices, whole_skips = dfvqgan.encode(frames, masks)  # hole tokens of the real hole (an oracle)
    result["visible_mse_dfvqgan_skips_whole_frame"] = visible_mse(
        dfvqgan.decode(whole_indices, whole_skips, masks).clamp(0, 1), frames, masks)

    # --- how many codes stand for plain black (the entropy the token predictors must learn) ----
    black = F.max_pool2d(frames, frames.shape[-1] // indices.shape[-1])[:, 0] == 0  # (n, h, w) empty cells
    for name, tokens in (("dfvqgan", dfvqgan.encode(frames)[0]), ("vqgan", plain.encode(frames))):
        counts = torch.bincount(tokens[black], minlength=dfvqgan.codebook_size).float()
        p = counts[counts > 0] / counts.sum()
        result[f"black_cell_codes_{name}"] = int((counts > 0).sum())
        result[f"black_cell_entropy_nats_{name}"] = float(-(p * p.log()).sum())

    # --- inpainting: LIP and NÜWA's zero-shot completion, K candidates each -------------------
    generator = torch.Generator().manual_seed(seed)
    nuwa_scorer = tasks.nuwa_caption_scorer(baseline, plain)

    def best_of(candidates: torch.Tensor, part_captions: list[str], by: lip.Scorer) -> torch.Tensor:
        """Each frame's best candidate by `by`: (b, K, 1, H, W) → (b, 1, H, W)."""
        _, best = lip.rerank(candidates, part_captions, by)
        return candidates[torch.arange(len(best)), best]

    lip_first, lip_best, lip_reranked, nuwa_first, nuwa_best = [], [], [], [], []
    timings = {"lip_s": 0.0, "nuwa_s": 0.0}
    for start in range(0, n, CHUNK):
        part = slice(start, min(n, start + CHUNK))
        tick = time.perf_counter()
        chosen, info = lip.inpaint(model, dfvqgan, frames[part], masks[part], captions[part],
                                   candidates=candidates, scorer=scorer, top_k=top_k, generator=generator,
                                   guidance_scale=guidance, temperature=temperature)
        timings["lip_s"] += time.perf_counter() - tick
        lip_first.append(info["candidates"][:, 0])
        lip_best.append(chosen)
        lip_reranked.append(best_of(info["candidates"], captions[part], nuwa_scorer))
        tick = time.perf_counter()
        b = chosen.shape[0]
        plain_tokens = plain.encode(masked[part])[:, None].repeat_interleave(candidates, 0)  # (b·K, 1, h, w)
        hole = lip.token_mask(masks[part], plain_tokens.shape[-2:])[:, None].repeat_interleave(candidates, 0)
        repeated = [c for c in captions[part] for _ in range(candidates)]
        tokens = tasks.edit_image(baseline, plain_tokens, repeated, hole, temperature=1.0, top_k=top_k,
                                  generator=generator)  # (b·K, 1, h, w)
        pixels = plain.decode(tokens[:, 0]).clamp(0, 1).view(b, candidates, 1, *frames.shape[-2:])
        timings["nuwa_s"] += time.perf_counter() - tick
        nuwa_first.append(pixels[:, 0])
        nuwa_best.append(best_of(pixels, captions[part], scorer))
        print(f"  {part.stop}/{n} frames inpainted ({timings['lip_s']:.0f} s LIP, "
              f"{timings['nuwa_s']:.0f} s NÜWA)", file=sys.stderr)
    lip_first, lip_best, lip_reranked, nuwa_first, nuwa_best = (
        torch.cat(x) for x in (lip_first, lip_best, lip_reranked, nuwa_first, nuwa_best))

    # --- caption swap: the same frames and masks under another digit's caption -----------------
    # K candidates again: the first is the one-sample fill, NÜWA's caption score reranks them.
    swap = min(swap, n)
    swapped_fills, swapped_reranked = [], []
    for start in range(0, swap, CHUNK):
        part = slice(start, min(swap, start + CHUNK))
        part_captions = [c for c, _ in swaps[part]]
        _, info = lip.inpaint(model, dfvqgan, frames[part], masks[part], part_captions, candidates=candidates,
                              top_k=top_k, generator=generator, guidance_scale=guidance,
                              temperature=temperature)
        swapped_fills.append(info["candidates"][:, 0])
        swapped_reranked.append(best_of(info["candidates"], part_captions, nuwa_scorer))
    if swap:
        swapped_digits = torch.tensor([d for _, d in swaps[:swap]])
        pairs = (("", lip_first, swapped_fills), ("_nuwa_rerank", lip_reranked, swapped_reranked))
        for suffix, true_fills, fills in pairs:
            follows_swapped = digits_read(torch.cat(fills), judge) == swapped_digits  # (swap,)
            follows_true = digits_read(true_fills[:swap], judge) == digits[:swap].cpu()
            result.update({f"swap_follows_swapped{suffix}": float(follows_swapped.float().mean()),
                           f"swap_follows_true{suffix}": float(follows_true.float().mean()),
                           f"swap_follows_both{suffix}":
                               float((follows_swapped & follows_true).float().mean())})
        result["swap_n"] = swap
    result["visible_mse_lip_inpainted"] = visible_mse(lip_best, frames, masks)
    result["visible_mse_nuwa_inpainted"] = visible_mse(nuwa_best, frames, masks)
    visible_change = (lip_best - df_reconstruction).abs()[~masks]
    result["lip_inpaint_vs_reconstruction_visible_mae"] = float(visible_change.mean())
    result["accuracy_real_frame"] = digit_accuracy(frames, digits, judge)
    result["accuracy_masked_input"] = digit_accuracy(masked, digits, judge)
    result["accuracy_lip_k1"] = digit_accuracy(lip_first, digits, judge)
    result[f"accuracy_lip_best_of_{candidates}"] = digit_accuracy(lip_best, digits, judge)
    result[f"accuracy_lip_best_of_{candidates}_nuwa_rerank"] = digit_accuracy(lip_reranked, digits, judge)
    result["accuracy_nuwa_k1"] = digit_accuracy(nuwa_first, digits, judge)
    result[f"accuracy_nuwa_best_of_{candidates}"] = digit_accuracy(nuwa_best, digits, judge)
    result.update({k: round(v, 1) for k, v in timings.items()})
    result["pictures"] = {"frames": frames[:8], "masked": masked[:8], "lip": lip_first[:8],
                          "nuwa": nuwa_first[:8]}
    if swap >= 8:
        result["pictures"]["swapped"] = torch.cat(swapped_fills)[:8]
        result["swapped_captions_shown"] = [c for c, _ in swaps[:8]]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lip", default="out/lip/ckpt.pt", help="train.py --stage lip checkpoint")
    parser.add_argument("--baseline", default="out/nuwa/ckpt.pt",
                        help="NÜWA checkpoint trained on text→image (make models'), on the same frame "
                             "tokenizer")
    parser.add_argument("--classifier", default="out/classifier")
    parser.add_argument("--n", type=int, default=200, help="held-out frames")
    parser.add_argument("--candidates", type=int, default=4,
                        help="K samples per frame, reranked by the digit scorer")
    parser.add_argument("--top-k", type=int, default=runtime.TOP_K,
                        help=f"sample among the k likeliest codes (default {runtime.TOP_K}, as every "
                             "reported figure)")
    parser.add_argument("--swap", type=int, default=100,
                        help="frames inpainted again under a swapped caption")
    parser.add_argument("--guidance", type=float, default=None,
                        help="LIP's classifier-free guidance scale (a model trained with --cond-drop-prob)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="LIP's sampling temperature (0 = greedy)")
    parser.add_argument("--seed", type=int, default=SEED,
                        help="seed of the sampling generator (the frames stay the same)")
    parser.add_argument("--quick", action="store_true", help="8 frames, 2 candidates")
    parser.add_argument("--png", default="out/lip_bench/inpainting.png", help="picture of the first 8 frames")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    n, candidates, swap = (8, 2, 8) if args.quick else (args.n, args.candidates, args.swap)
    torch.manual_seed(args.seed)
    if not args.json:
        print(f"seed {args.seed}; device cpu; torch {torch.__version__}; {n} held-out frames, "
              f"K = {candidates}")
    with runtime.one_cpu_thread("cpu"):  # token-by-token sampling throughout (runtime.py)
        result = evaluate_inpainting(args.lip, args.baseline, args.classifier, n=n, candidates=candidates,
                                     top_k=args.top_k, swap=swap, guidance=args.guidance,
                                     temperature=args.temperature, seed=args.seed)
    pictures = result.pop("pictures")
    shown = result.pop("swapped_captions_shown", None)
    # One row per frame: real, masked, LIP, NÜWA (and the swapped caption's fill).
    rows = [torch.stack(list(group)) for group in zip(*pictures.values())]
    header = "frame | masked | LIP (K = 1) | NÜWA completion (K = 1)"
    header += " | LIP, swapped caption" if shown else ""
    captions = [header + (f": {shown[0]}" if shown else "")] + ([f"swapped: {c}" for c in shown[1:]] if shown
                                                               else [""] * (len(rows) - 1))
    data.save_grid(rows, args.png, captions=captions)
    if not args.json:
        print(f"{'measure':<48} {'value':>10}")
        for key, value in result.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                print(f"{key:<48} {value:>10.4f}" if isinstance(value, float) else f"{key:<48} {value:>10}")
        print(f"wrote {args.png}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
