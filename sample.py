"""Command line for NÜWA's eight tasks with trained checkpoints → PNG / GIF files.

    python sample.py t2v --ckpt out/nuwa/ckpt.pt --caption "digit 3 is moving left" --out out/samples

Sub-commands (NÜWA §4; the task functions live in tasks.py, this file adds pixels ↔ tokens):
  t2i         caption → image                   s2i         sketch → image
  complete    top part of an image → the rest   edit-image  image + caption + box → edited image
  t2v         caption → video                   s2v         sketch video → video
  predict     first frames → the next frames    edit-video  video + new caption → re-generated video

NÜWA-Infinity (infinity.py), with a checkpoint of `train.py --stage infinity`:
  infinity    a canvas of any size (--width, --height, --direction), outpainting from --image
              (--direction right / left / up / down), or a long video (--frames > 1)

NÜWA-LIP (lip.py), with a checkpoint of `train.py --stage lip`:
  inpaint     image + mask + caption → the missing pixels filled as the caption says
              (--image FRAME.png --mask MASK.png, white = missing; --candidates K reranked by the
              digit classifier of classifier.py, or with --rerank-nuwa CKPT by NÜWA's caption score,
              two offline stand-ins for CLIP)

Inputs: images are 64×64 grey PNGs (`--image`), videos GIFs or .npy arrays (`--video`), sketches
.npy class maps (`--sketch`: 0 = background, 1 + d = digit d). Without a file, `--index i` takes
item i of the held-out Moving MNIST data (data.py), so every command runs out of the box.

The NÜWA checkpoint records the tokenizer checkpoints it was trained with (`vqgan_ckpt`,
`seg_ckpt`); `--vqgan` / `--seg` override them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import classifier
import data
import infinity
import lip
import nuwa
import reader
import tasks
import vqgan

# ---------------------------------------------------------------------------------------------
# Reading inputs
# ---------------------------------------------------------------------------------------------


def heldout_item(index: int, frames: int) -> dict:
    return data.CaptionedMovingMNIST("heldout", num_frames=frames, num_digits=1)[index]


def load_video(path: str | None, index: int, frames: int) -> torch.Tensor:
    """A video (1, T, 1, 64, 64) in [0, 1] from a GIF / .npy file, or held-out Moving MNIST item."""
    if path is None:
        return data.MovingMNIST("test", num_frames=frames, num_digits=2)[index]["video"][None]
    if path.endswith(".npy"):
        array = np.load(path).astype(np.float32)
        array = array / 255.0 if array.max() > 1 else array
    else:
        from PIL import Image, ImageSequence

        array = np.stack([np.asarray(f.convert("L"), dtype=np.float32) / 255.0
                          for f in ImageSequence.Iterator(Image.open(path))])
    if array.ndim == 4:
        array = array[:, 0]
    if array.ndim != 3 or array.shape[1:] != (data.CANVAS, data.CANVAS):
        raise ValueError(f"{path}: expected frames of {data.CANVAS}×{data.CANVAS} pixels, got {array.shape}")
    return torch.from_numpy(array)[None, :, None]  # (1, T, 1, 64, 64)


def load_image(path: str | None, index: int) -> torch.Tensor:
    """An image (1, 1, 1, 64, 64) in [0, 1] from a PNG, or held-out item `index`."""
    if path is None:
        return heldout_item(index, 2)["video"][None, :1]
    from PIL import Image

    image = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    if image.shape != (data.CANVAS, data.CANVAS):
        raise ValueError(f"{path}: expected a {data.CANVAS}×{data.CANVAS} image, got {image.shape}")
    return torch.from_numpy(image)[None, None, None]


def load_sketch(path: str | None, index: int, frames: int) -> torch.Tensor:
    """Class maps int64 (1, T, 64, 64) from a .npy file ((64, 64) or (T, 64, 64)), or item `index`."""
    if path is None:
        return heldout_item(index, max(frames, 2))["sketch"][None, :frames]
    sketch = torch.from_numpy(np.load(path).astype(np.int64))
    sketch = sketch[None] if sketch.dim() == 2 else sketch
    if sketch.dim() != 3 or sketch.min() < 0 or sketch.max() > 10:
        raise ValueError(f"{path}: expected class maps (T, 64, 64) with values 0-10, got shape "
                         f"{tuple(sketch.shape)} and values {int(sketch.min())}-{int(sketch.max())}")
    return sketch[None]


def pixel_box_to_tokens(box: str, token_shape: tuple[int, int]) -> torch.Tensor:
    """"y0,x0,y1,x1" in pixels → token mask (1, 1, h, w): a token is edited if its cell meets the box."""
    y0, x0, y1, x1 = (int(v) for v in box.split(","))
    if not (0 <= y0 < y1 <= data.CANVAS and 0 <= x0 < x1 <= data.CANVAS):
        raise ValueError(f"box {box} must satisfy 0 ≤ y0 < y1 ≤ {data.CANVAS} and 0 ≤ x0 < x1 ≤ {data.CANVAS}")
    h, w = token_shape
    cell_h, cell_w = data.CANVAS // h, data.CANVAS // w
    mask = torch.zeros(1, 1, h, w, dtype=torch.bool)
    mask[..., y0 // cell_h:(y1 - 1) // cell_h + 1, x0 // cell_w:(x1 - 1) // cell_w + 1] = True
    return mask


# ---------------------------------------------------------------------------------------------
# The tasks
# ---------------------------------------------------------------------------------------------


def run_task(args, models: tasks.Models) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """Run one sub-command: (samples (n, T, 1, 64, 64), the input shown beside them, captions)."""
    model, n = models.nuwa, args.n
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    generator=torch.Generator(device=models.device).manual_seed(args.seed),
                    guidance_scale=args.guidance, progress=True)
    captions = [args.caption] * n if getattr(args, "caption", None) else []
    if args.task in ("t2i", "t2v") or args.task.startswith("edit"):
        model.vocabulary.encode(captions)  # unknown words: an error before any work starts
    shown = None
    if args.task in ("t2i", "t2v") and args.redraw_empty:
        sampling.update(blank_codes=models.vqgan.blank_codes())  # frame 0 drawn again while empty
    if args.task == "t2i":
        tokens = tasks.text_to_image(model, captions, **sampling)
    elif args.task == "t2v":
        tokens = tasks.text_to_video(model, captions, args.frames, **sampling)
    elif args.task in ("s2i", "s2v"):
        sketch = load_sketch(args.sketch, args.index, 1 if args.task == "s2i" else args.frames)
        shown = sketch.float().div(10.0)[:, :, None]  # class maps shown as grey levels
        sketch_tokens = models.sketch_tokens(sketch).expand(n, -1, -1, -1)
        task = tasks.sketch_to_image if args.task == "s2i" else tasks.sketch_to_video
        tokens = task(model, sketch_tokens, **sampling)
    elif args.task in ("complete", "edit-image"):
        shown = load_image(args.image, args.index)
        image_tokens = models.tokens(shown).expand(n, -1, -1, -1)  # (n, 1, h, w)
        if args.task == "complete":
            tokens = tasks.complete_image(model, image_tokens, args.keep_rows, **sampling)
        else:
            box = pixel_box_to_tokens(args.box, image_tokens.shape[-2:]).expand_as(image_tokens)
            tokens = tasks.edit_image(model, image_tokens, captions, box.to(image_tokens.device), **sampling)
    else:  # predict, edit-video
        shown = load_video(args.video, args.index, args.frames)
        video_tokens = models.tokens(shown).expand(n, -1, -1, -1)  # (n, T, h, w)
        if args.task == "predict":
            if video_tokens.shape[1] < args.given:
                raise ValueError(f"the video has {video_tokens.shape[1]} frames, fewer than --given {args.given}")
            tokens = tasks.predict_video(model, video_tokens[:, :args.given], args.frames, **sampling)
        else:
            tokens = tasks.edit_video(model, video_tokens, captions, args.keep_frames, **sampling)
    return models.pixels(tokens), shown, captions


def write_outputs(samples, shown, captions, out: Path, task: str) -> list[Path]:
    """Images → one PNG strip; videos → a GIF and a PNG grid. The input, if any, comes first."""
    clips = ([shown[0]] if shown is not None else []) + list(samples)
    labels = (["input"] if shown is not None else []) + [captions[i] if captions else f"sample {i}"
                                                         for i in range(len(samples))]
    stem = out / task.replace("-", "_")
    written = [data.save_grid(clips, stem.with_suffix(".png"), captions=labels, max_frames=samples.shape[1])]
    if samples.shape[1] > 1:
        written.append(data.save_gif(clips, stem.with_suffix(".gif"), captions=labels))
    return written


# --- NÜWA-Infinity: canvases of any size, outpainting, long videos ------------------------------


def save_canvases(canvases: torch.Tensor, path: Path) -> Path:
    """Canvases (n, 1, H, W) in [0, 1] → one PNG at full resolution, stacked with grey gaps."""
    from PIL import Image

    gap = 4
    n, _, H, W = canvases.shape
    sheet = np.full((n * H + (n - 1) * gap, W), 0.5, dtype=np.float32)
    for i, canvas in enumerate(canvases.cpu().numpy()):
        sheet[i * (H + gap): i * (H + gap) + H] = canvas[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((sheet * 255).round().astype(np.uint8)).save(path)
    return path


def run_infinity(args) -> list[Path]:
    """Generate with the Nearby Context Pool: memory stays that of a few patches whatever the size."""
    model, tokenizer = infinity.load_with_tokenizer(args.ckpt, vqgan_ckpt=args.vqgan, map_location=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, generator=generator, progress=True,
                    guidance=args.guidance)
    captions = [args.caption] * args.n if args.caption else None
    out = Path(args.out)
    if args.frames > 1:  # a video, frame by frame
        if args.direction not in (None, "video"):
            raise ValueError(f"a video (--frames {args.frames}) is generated frame by frame; drop --direction "
                             f"{args.direction!r} (or pass --direction video)")
        given = load_video(args.video, args.index, args.given)[:, :args.given].expand(args.n, -1, -1, -1, -1) \
            if args.given else None
        video = infinity.generate_video(model, tokenizer, args.frames, given_frames=given, captions=captions,
                                        batch_size=args.n, **sampling).cpu()  # (n, T, 1, 64, 64)
        labels = [f"sample {i}" + (f", first {args.given} frames given" if args.given else "") for i in range(args.n)]
        return [data.save_gif(list(video), out / "infinity.gif", captions=labels),
                data.save_grid(list(video), out / "infinity.png", captions=labels, max_frames=args.frames)]
    args.direction = args.direction or "column"
    source = None
    if args.direction in infinity.OUTPAINTING:  # the given image sits where the direction starts
        source = load_image(args.image, args.index)[:, 0].expand(args.n, -1, -1, -1)  # (n, 1, 64, 64)
    elif args.image is not None:
        raise ValueError(f"--image is for outpainting: pass --direction right, left, up or down, not {args.direction!r}")
    canvases = infinity.generate_canvas(model, tokenizer, args.height, args.width, args.direction, source=source,
                                        captions=captions, batch_size=args.n, **sampling)  # (n, 1, H, W)
    return [save_canvases(canvases, out / f"infinity_{args.direction}_{args.height}x{args.width}.png")]


# --- NÜWA-LIP: language-guided inpainting ---------------------------------------------------------


def caption_digit(caption: str) -> int:
    """The digit a caption names first: "digit 3 is moving up" → 3."""
    words = caption.split()
    if "digit" not in words[:-1] or not words[words.index("digit") + 1].isdigit():
        raise ValueError(f"caption {caption!r} names no digit (expected 'digit D ...')")
    return int(words[words.index("digit") + 1])


def digit_scorer(digit_classifier: classifier.DigitClassifier) -> lip.Scorer:
    """Rerank inpaintings as LIP reranks with CLIP (§3.3), offline: a candidate's score is the digit
    classifier's probability of the caption's digit for the biggest blob of ink in the frame (the
    blob reader.read_video would follow), 0 when the frame shows no digit at all."""
    @torch.no_grad()
    def score(pixels: torch.Tensor, caption: str) -> torch.Tensor:
        digit, scores = caption_digit(caption), []
        for frame in pixels.float().cpu():  # (1, H, W)
            blobs = reader.locate_digits(frame)[0]
            if not blobs:
                scores.append(0.0)
                continue
            crop = reader.crop_digit(frame[0], blobs[0])[None, None]  # (1, 1, 28, 28)
            device = next(digit_classifier.parameters()).device
            scores.append(float(digit_classifier(crop.to(device)).softmax(-1)[0, digit]))
        return torch.tensor(scores)  # (K,)

    return score


def nuwa_caption_scorer(model: nuwa.NUWA, tokenizer: vqgan.VQGAN) -> lip.Scorer:
    """Rerank inpaintings with a text-image model trained apart from the judge, as LIP reranks with
    CLIP (§3.3): a candidate's score is how much better NÜWA's text→image explains its tokens under the
    caption than under "None", log p(z | caption) − log p(z | None) in nats (teacher-forced, one
    frame). The digit classifier that scores the benchmark plays no part in the choice."""

    @torch.no_grad()
    def score(pixels: torch.Tensor, caption: str) -> torch.Tensor:
        tokens = tokenizer.encode(pixels.to(model.bos.device))[:, None]  # (K, 1, h, w)
        K = tokens.shape[0]
        under_caption = model.token_nats(nuwa.text_condition(model.vocabulary, [caption] * K), tokens).sum(1)  # (K,)
        under_none = model.token_nats(nuwa.none_condition(model.vocabulary, K), tokens).sum(1)  # (K,)
        return (under_none - under_caption).cpu()  # log p(z | caption) − log p(z | None)

    return score


def load_mask(path: str) -> torch.Tensor:
    """A 64×64 PNG (white = missing, anything above mid-grey) → bool mask (1, 1, 64, 64)."""
    from PIL import Image

    try:
        mask = np.asarray(Image.open(path).convert("L")) > 127
    except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: not a readable image ({error}); expected a 64×64 PNG, white = missing") from error
    if mask.shape != (data.CANVAS, data.CANVAS):
        raise ValueError(f"{path}: expected a {data.CANVAS}×{data.CANVAS} mask, got {mask.shape}")
    return torch.from_numpy(mask)[None, None]


def run_inpaint(args) -> list[Path]:
    """Inpaint one frame; writes inpaint.png (frame | mask | masked | result, then the other candidates)
    and inpaint_result.png (the chosen frame at 64×64)."""
    if (args.image is None) != (args.mask is None):
        raise ValueError("pass both --image and --mask, or neither (then a held-out frame and half of its digit)")
    if args.image is None:
        item = heldout_item(args.index, 2)
        image = item["video"][:1]  # (1, 1, 64, 64)
        mask = lip.half_digit_mask(image[0], args.half)[None]  # (1, 1, 64, 64)
        caption = args.caption or item["caption"]
    else:
        if not args.caption:
            raise ValueError("--caption is needed with --image (words from: " + " ".join(data.VOCABULARY) + ")")
        image, mask, caption = load_image(args.image, 0)[0], load_mask(args.mask), args.caption
    if not Path(args.ckpt).exists():
        raise FileNotFoundError(f"no NÜWA-LIP checkpoint at {args.ckpt}; train one with "
                                f"`python train.py --stage dfvqgan` then `python train.py --stage lip`")
    model, tokenizer = lip.load_lip(args.ckpt, dfvqgan_ckpt=args.dfvqgan, map_location=args.device)
    scorer, judged_by = None, ""
    if args.candidates > 1 and args.rerank_nuwa:
        reranker = tasks.Models(args.rerank_nuwa, device=args.device)  # its own tokenizer, checked
        scorer, judged_by = nuwa_caption_scorer(reranker.nuwa, reranker.vqgan), "NÜWA's caption score"
    elif args.candidates > 1 and args.classifier:
        digit_classifier = classifier.load_classifier(args.classifier, args.device)
        scorer, judged_by = digit_scorer(digit_classifier), "the digit classifier"
    result, info = lip.inpaint(model, tokenizer, image, mask, [caption], candidates=args.candidates, scorer=scorer,
                               temperature=args.temperature, top_k=args.top_k, guidance_scale=args.guidance,
                               generator=torch.Generator(device=args.device).manual_seed(args.seed))
    best = int(info["best"][0])
    others = [info["candidates"][0, k].cpu() for k in range(args.candidates) if k != best]
    strip = torch.stack([image[0], mask[0].float(), image[0].masked_fill(mask[0], 0.5), result[0].cpu(), *others])
    label = caption + (f" (best of {args.candidates} by {judged_by})" if scorer else "")
    out = Path(args.out)
    written = [data.save_grid([strip], out / "inpaint.png", captions=[label], max_frames=len(strip))]
    from PIL import Image

    Image.fromarray(data.to_uint8_frames(result.cpu())[0]).save(out / "inpaint_result.png")
    return written + [out / "inpaint_result.png"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = parser.add_subparsers(dest="task", required=True)
    specs = {
        "t2i": ["caption"], "s2i": ["sketch"], "complete": ["image", "keep_rows"],
        "edit-image": ["image", "caption", "box"], "t2v": ["caption", "frames"],
        "s2v": ["sketch", "frames"], "predict": ["video", "given", "frames"],
        "edit-video": ["video", "caption", "frames", "keep_frames"],
    }
    for task, options in specs.items():
        sub = tasks.add_parser(task)
        sub.add_argument("--ckpt", default="out/nuwa/ckpt.pt", help="NÜWA checkpoint (train.py --stage nuwa)")
        sub.add_argument("--vqgan", default=None, help="override the recorded VQ-GAN checkpoint")
        sub.add_argument("--seg", default=None, help="override the recorded VQ-GAN-Seg checkpoint")
        sub.add_argument("--out", default="out/samples")
        sub.add_argument("-n", type=int, default=4, help="number of samples")
        sub.add_argument("--index", type=int, default=0, help="held-out item used when no input file is given")
        sub.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
        sub.add_argument("--top-k", type=int, default=None)
        sub.add_argument("--top-p", type=float, default=None)
        sub.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        if "caption" in options:
            sub.add_argument("--caption", required=True, help=f"words from: {' '.join(data.VOCABULARY)}")
        if task in ("t2i", "t2v"):
            sub.add_argument("--redraw-empty", action="store_true",
                             help="draw the first frame again while it holds no ink (a local window cannot tell)")
        if "sketch" in options:
            sub.add_argument("--sketch", default=None, help=".npy class map(s); default: held-out item")
        if "image" in options:
            sub.add_argument("--image", default=None, help="64×64 grey PNG; default: held-out item")
        if "video" in options:
            sub.add_argument("--video", default=None, help="GIF or .npy (T, 64, 64); default: test item")
        if "frames" in options:
            sub.add_argument("--frames", type=int, default=20 if task == "predict" else 10)
        if "given" in options:
            sub.add_argument("--given", type=int, default=10, help="frames given to the predictor")
        if "keep_rows" in options:
            sub.add_argument("--keep-rows", type=int, default=8, help="token rows kept (the top half of 16)")
        if "keep_frames" in options:
            sub.add_argument("--keep-frames", type=int, default=1)
        if "box" in options:
            sub.add_argument("--box", default="16,16,48,48", help="edit box y0,x0,y1,x1 in pixels")
    sub = tasks.add_parser("infinity", help="NÜWA-Infinity: a canvas of any size, outpainting, a long video")
    sub.add_argument("--ckpt", default="out/infinity/ckpt.pt", help="train.py --stage infinity checkpoint")
    sub.add_argument("--vqgan", default=None, help="override the recorded VQ-GAN checkpoint")
    sub.add_argument("--out", default="out/samples")
    sub.add_argument("-n", type=int, default=1, help="number of samples")
    sub.add_argument("--width", type=int, default=512, help="canvas width in pixels (a multiple of the patch)")
    sub.add_argument("--height", type=int, default=64, help="canvas height in pixels")
    sub.add_argument("--frames", type=int, default=1, help="> 1: a video of this many frames, frame by frame")
    sub.add_argument("--direction", default=None, choices=infinity.DIRECTIONS,
                     help="patch order (default: column for a canvas, video for --frames > 1); right / left "
                          "outpaint a 64 px high --image sideways, up / down need --width 64")
    sub.add_argument("--caption", default=None, help="digit names, e.g. \"3 7\" (default: none)")
    sub.add_argument("--image", default=None, help="64×64 grey PNG to outpaint from; default: held-out item")
    sub.add_argument("--video", default=None, help="GIF or .npy whose first --given frames start the video")
    sub.add_argument("--given", type=int, default=0, help="frames given to a video (0: none)")
    sub.add_argument("--index", type=int, default=0, help="held-out item used when no input file is given")
    sub.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    sub.add_argument("--top-k", type=int, default=None)
    sub.add_argument("--guidance", type=float, default=None,
                     help="classifier-free guidance scale (needs --caption; Infinity trains with captions dropped)")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sub = tasks.add_parser("inpaint", help="NÜWA-LIP: fill the masked pixels of a frame as the caption says")
    sub.add_argument("--ckpt", default="out/lip/ckpt.pt", help="train.py --stage lip checkpoint")
    sub.add_argument("--dfvqgan", default=None, help="override the recorded DF-VQGAN checkpoint")
    sub.add_argument("--image", default=None, help="64×64 grey PNG; default: held-out item --index")
    sub.add_argument("--mask", default=None, help="64×64 PNG, white = missing; default: half of the digit (--half)")
    sub.add_argument("--half", default="bottom", choices=lip.SIDES, help="the default mask's missing half")
    sub.add_argument("--caption", default=None, help=f"words from: {' '.join(data.VOCABULARY)}; default: the item's")
    sub.add_argument("--candidates", type=int, default=1, help="K samples, reranked by --classifier when K > 1")
    sub.add_argument("--classifier", default="out/classifier", help="digit classifier (evaluate.py classifier); "
                                                                    "\"\" = no reranking")
    sub.add_argument("--rerank-nuwa", default="", help="rerank by this NÜWA's caption score instead of the classifier "
                                                      "(as LIP reranks with CLIP; e.g. out/nuwa/ckpt.pt)")
    sub.add_argument("--out", default="out/samples")
    sub.add_argument("--index", type=int, default=0, help="held-out item used when no input file is given")
    sub.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    sub.add_argument("--top-k", type=int, default=None)
    sub.add_argument("--guidance", type=float, default=None,
                     help="classifier-free guidance scale (a model trained with --cond-drop-prob)")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv=None) -> list[Path]:
    args = build_parser().parse_args(argv)
    if args.task == "infinity":
        print(f"seed {args.seed}; NÜWA-Infinity; device {args.device}")
        written = run_infinity(args)
        print("wrote " + ", ".join(str(p) for p in written))
        return written
    if args.task == "inpaint":
        print(f"seed {args.seed}; NÜWA-LIP inpainting; device {args.device}")
        written = run_inpaint(args)
        print("wrote " + ", ".join(str(p) for p in written))
        return written
    models = tasks.Models(args.ckpt, args.vqgan, args.seg, device=args.device)
    print(f"seed {args.seed}; task {args.task}; device {args.device}")
    samples, shown, captions = run_task(args, models)
    written = write_outputs(samples, shown, captions, Path(args.out), args.task)
    print("wrote " + ", ".join(str(p) for p in written))
    return written


if __name__ == "__main__":
    main()
