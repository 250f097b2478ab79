"""The command line of the three papers' generators: a trained checkpoint → PNG / GIF files.

Papers: NÜWA (Wu et al., arXiv 2111.12417) §4, its eight visual synthesis tasks; NÜWA-LIP (Ni et
al., arXiv 2202.05009) §3.3, language-guided inpainting with reranked candidates; NÜWA-Infinity
(Wu et al., arXiv 2207.09814) §3, canvases and videos of any size, patch by patch. The generators
live in tasks.py, lip.py and infinity.py; this file reads the inputs (pixels → tokens), runs one
task and writes what it drew beside its input.

    make demo
    python sample.py t2v --ckpt out/demo/nuwa/ckpt.pt --caption "digit 3 is moving up then down"

Sub-commands, each with the paper's task and the checkpoint it reads by default:
  NÜWA §4 (tasks.py): out/nuwa/ckpt.pt of `make models` if it exists, else out/demo/nuwa/ckpt.pt
  of `make demo`
    t2i         T2I   caption → image
    s2i         S2I   sketch (class map) → image
    complete    I2I   the top token rows of an image → the rest (zero-shot)
    edit-image  TI2I  image + caption + box → the box drawn again as the caption says (zero-shot)
    t2v         T2V   caption → video
    s2v         S2V   sketch video → video
    predict     V2V   the first --given frames of a video → the rest
    edit-video  TV2V  video + caption → its first --given frames kept, the rest drawn as the caption
                      says (zero-shot)
  NÜWA-LIP §3.3 (lip.py): out/lip/ckpt.pt of `make lip`
    inpaint     image + mask + caption → the masked pixels filled as the caption says, the best of
                --candidates by a judge
  NÜWA-Infinity §3 (infinity.py): out/infinity/ckpt.pt of `make infinity` (a video: its
  out/infinity_video/infinity/ckpt.pt)
    infinity    a canvas of any size (--width, --height, --direction), outpainting from --image
                (--direction right / left / up / down), or a long video (--frames > 1)

Flags mean the same thing in every sub-command: `--frames` is the number of frames of the output
video, given frames included; `--given` how many of them are given, not drawn; `--index i` the
held-out item used when no input file is given (so every command runs out of the box); the
sampling flags (`--temperature`, `--top-k` 16 by default, `--top-p`, `--guidance`, `--seed`) come
from runtime.add_sampling_flags.

Inputs: images are 64×64 grey PNGs (`--image`), videos GIFs or .npy arrays (T, 64, 64) (`--video`),
sketches .npy class maps (64, 64) or (T, 64, 64) (`--sketch`: 0 = background, 1 + d = digit d),
masks 64×64 PNGs, white = missing (`--mask`). A NÜWA checkpoint records the tokenizers it was
trained with (`vqgan_ckpt`, `seg_ckpt`); `--vqgan` / `--seg` override them.

Glossary: n samples, T frames, H W pixels (64), h w token grid, K candidates (inpaint), z tokens.

Deviations from the papers:
- NÜWA-LIP reranks its candidates with CLIP; offline, a candidate is scored by our digit classifier
  (classifier.py: its probability of the caption's digit) or, with --rerank-nuwa, by a NÜWA's caption
  score log p(z | caption) − log p(z | None), a text-image model trained apart from the judge.
- `--redraw-empty` (t2i, t2v) draws a first frame that holds no ink again (ours: tasks.text_to_image).
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
import patches
import reader
import runtime
import synthesis
import tasks

# ---------------------------------------------------------------------------------------------
# Checkpoints: where the Makefile's recipes write them
# ---------------------------------------------------------------------------------------------

# Per model, (path, the make target that writes it), in the order they are looked for.
CHECKPOINTS = {
    "NÜWA": (("out/nuwa/ckpt.pt", "make models"), ("out/demo/nuwa/ckpt.pt", "make demo")),
    "NÜWA-LIP": (("out/lip/ckpt.pt", "make lip"),),
    "NÜWA-Infinity": (("out/infinity/ckpt.pt", "make infinity"),),
    "NÜWA-Infinity video": (("out/infinity_video/infinity/ckpt.pt", "make infinity"),),
}


def default_checkpoint(model: str) -> str:
    """The first of `model`'s checkpoints that exists (the first one when none does)."""
    paths = [path for path, _ in CHECKPOINTS[model]]
    return next((path for path in paths if Path(path).exists()), paths[0])


def checkpoint(path: str | None, model: str) -> str:
    """`path` (or `model`'s default when None), which must exist: else an error that says which make
    target writes the checkpoint."""
    path = path or default_checkpoint(model)
    if not Path(path).exists():
        writers = "; ".join(f"`{target}` writes {where}" for where, target in CHECKPOINTS[model])
        raise FileNotFoundError(f"no {model} checkpoint at {path} ({writers}; or pass --ckpt)")
    return path


def checkpoint_help(model: str) -> str:
    return "default: " + ", else ".join(f"{path} ({target})" for path, target in CHECKPOINTS[model])


# ---------------------------------------------------------------------------------------------
# Loading inputs
# ---------------------------------------------------------------------------------------------


def heldout_item(index: int, frames: int) -> dict:
    return data.CaptionedMovingMNIST("heldout", num_frames=frames, num_digits=1)[index]


def load_video(path: str | None, index: int, frames: int) -> torch.Tensor:
    """A video (1, T, 1, 64, 64) in [0, 1]: the first `frames` frames of a GIF / .npy file (fewer
    if the file is shorter), or test item `index` of two-digit Moving MNIST."""
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
    return torch.from_numpy(array[:frames])[None, :, None]  # (1, T, 1, 64, 64)


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
    """Class maps int64 (1, T, 64, 64): the first `frames` of a .npy file ((64, 64) or (T, 64, 64);
    fewer if the file is shorter), or held-out item `index`."""
    if path is None:
        return heldout_item(index, max(frames, 2))["sketch"][None, :frames]
    sketch = torch.from_numpy(np.load(path).astype(np.int64))
    sketch = sketch[None] if sketch.dim() == 2 else sketch
    if sketch.dim() != 3 or sketch.min() < 0 or sketch.max() > 10:
        raise ValueError(f"{path}: expected class maps (T, 64, 64) with values 0-10, got shape "
                         f"{tuple(sketch.shape)} and values {int(sketch.min())}-{int(sketch.max())}")
    return sketch[None, :frames]


def load_mask(path: str) -> torch.Tensor:
    """A 64×64 PNG (white = missing, anything above mid-grey) → bool mask (1, 1, 64, 64)."""
    from PIL import Image

    try:
        mask = np.asarray(Image.open(path).convert("L")) > 127
    except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: not a readable image ({error}); expected a 64×64 PNG, "
                         "white = missing") from error
    if mask.shape != (data.CANVAS, data.CANVAS):
        raise ValueError(f"{path}: expected a {data.CANVAS}×{data.CANVAS} mask, got {mask.shape}")
    return torch.from_numpy(mask)[None, None]


def check_frames(found: int, needed: int, what: str, flag: str) -> None:
    """An input with fewer frames than a flag asks for is an error, before any sampling."""
    if found < needed:
        raise ValueError(f"the {what} has {found} frames, fewer than {flag} {needed}")


def pixel_box_to_tokens(box: str, token_shape: tuple[int, int]) -> torch.Tensor:
    """"y0,x0,y1,x1" in pixels → token mask (1, 1, h, w): a token is edited if its cell meets the box."""
    y0, x0, y1, x1 = (int(v) for v in box.split(","))
    if not (0 <= y0 < y1 <= data.CANVAS and 0 <= x0 < x1 <= data.CANVAS):
        raise ValueError(f"box {box} must satisfy 0 ≤ y0 < y1 ≤ {data.CANVAS} and "
                         f"0 ≤ x0 < x1 ≤ {data.CANVAS}")
    h, w = token_shape
    cell_h, cell_w = data.CANVAS // h, data.CANVAS // w
    mask = torch.zeros(1, 1, h, w, dtype=torch.bool)
    mask[..., y0 // cell_h:(y1 - 1) // cell_h + 1, x0 // cell_w:(x1 - 1) // cell_w + 1] = True
    return mask


# ---------------------------------------------------------------------------------------------
# NÜWA's eight tasks
# ---------------------------------------------------------------------------------------------


def run_task(args, models: tasks.Models) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """Run one sub-command: (samples (n, T, 1, 64, 64), the input shown beside them, captions)."""
    model, n = models.nuwa, args.n
    sampling = dict(runtime.sampling_options(args, models.device), guidance_scale=args.guidance,
                    progress=True)
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
        frames = 1 if args.task == "s2i" else args.frames
        sketch = load_sketch(args.sketch, args.index, frames)  # (1, T, 64, 64)
        check_frames(sketch.shape[1], frames, "sketch", "--frames")
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
    else:  # predict, edit-video: the first --given frames of --frames come from the video
        shown = load_video(args.video, args.index, args.frames)  # shown whole: the real continuation
        if args.task == "predict":
            check_frames(shown.shape[1], args.given, "video", "--given")
            video_tokens = models.tokens(shown[:, :args.given]).expand(n, -1, -1, -1)  # (n, given, h, w)
            tokens = tasks.predict_video(model, video_tokens, args.frames, **sampling)
        else:
            check_frames(shown.shape[1], args.frames, "video", "--frames")
            video_tokens = models.tokens(shown).expand(n, -1, -1, -1)  # (n, T, h, w)
            tokens = tasks.edit_video(model, video_tokens, captions, args.given, **sampling)
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


# ---------------------------------------------------------------------------------------------
# NÜWA-Infinity: canvases of any size, outpainting, long videos
# ---------------------------------------------------------------------------------------------


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
    model, tokenizer = infinity.load_with_tokenizer(args.ckpt, vqgan_ckpt=args.vqgan,
                                                    map_location=args.device)
    sampling = dict(runtime.sampling_options(args, args.device), guidance=args.guidance, progress=True)
    captions = [args.caption] * args.n if args.caption else None
    out = Path(args.out)
    if args.frames > 1:  # a video, frame by frame
        if args.direction not in (None, "video"):
            raise ValueError(f"a video (--frames {args.frames}) is generated frame by frame; drop "
                             f"--direction {args.direction!r} (or pass --direction video)")
        given = None
        if args.given:
            given = load_video(args.video, args.index, args.given)  # (1, given, 1, 64, 64)
            check_frames(given.shape[1], args.given, "video", "--given")
            given = given.expand(args.n, -1, -1, -1, -1)
        video = synthesis.generate_video(model, tokenizer, args.frames, given_frames=given, captions=captions,
                                         batch_size=args.n, **sampling).cpu()  # (n, T, 1, 64, 64)
        labels = [f"sample {i}" + (f", first {args.given} frames given" if args.given else "")
                  for i in range(args.n)]
        return [data.save_gif(list(video), out / "infinity.gif", captions=labels),
                data.save_grid(list(video), out / "infinity.png", captions=labels, max_frames=args.frames)]
    args.direction = args.direction or "column"
    source = None
    if args.direction in patches.OUTPAINTING:  # the given image sits where the direction starts
        source = load_image(args.image, args.index)[:, 0].expand(args.n, -1, -1, -1)  # (n, 1, 64, 64)
    elif args.image is not None:
        raise ValueError("--image is for outpainting: pass --direction right, left, up or down, "
                         f"not {args.direction!r}")
    canvases = synthesis.generate_canvas(model, tokenizer, args.height, args.width, args.direction,
                                         source=source, captions=captions, batch_size=args.n,
                                         **sampling)  # (n, 1, H, W)
    return [save_canvases(canvases, out / f"infinity_{args.direction}_{args.height}x{args.width}.png")]


# ---------------------------------------------------------------------------------------------
# NÜWA-LIP: language-guided inpainting, candidates reranked by a judge
# ---------------------------------------------------------------------------------------------


def run_inpaint(args) -> list[Path]:
    """Inpaint one frame; writes inpaint.png (frame | mask | masked | result, then the other candidates)
    and inpaint_result.png (the chosen frame at 64×64)."""
    if (args.image is None) != (args.mask is None):
        raise ValueError("pass both --image and --mask, or neither (then a held-out frame and half of "
                         "its digit)")
    rerank_nuwa = checkpoint(args.rerank_nuwa, "NÜWA") if args.candidates > 1 and args.rerank_nuwa else None
    if args.image is None:
        item = heldout_item(args.index, 2)
        image = item["video"][:1]  # (1, 1, 64, 64)
        mask = lip.half_digit_mask(image[0], args.half)[None]  # (1, 1, 64, 64)
        caption = args.caption or item["caption"]
    else:
        if not args.caption:
            raise ValueError(f"--caption is needed with --image ({CAPTION_HELP})")
        image, mask, caption = load_image(args.image, 0)[0], load_mask(args.mask), args.caption
    model, tokenizer = lip.load_lip(args.ckpt, dfvqgan_ckpt=args.dfvqgan, map_location=args.device)
    scorer, judged_by = None, ""
    if rerank_nuwa:
        reranker = tasks.Models(rerank_nuwa, device=args.device)  # its own tokenizer, checked
        scorer, judged_by = tasks.nuwa_caption_scorer(reranker.nuwa, reranker.vqgan), "NÜWA's caption score"
    elif args.candidates > 1 and args.classifier:
        digit_classifier = classifier.load_classifier(args.classifier, args.device)
        scorer, judged_by = reader.digit_scorer(digit_classifier), "the digit classifier"
    result, info = lip.inpaint(model, tokenizer, image, mask, [caption], candidates=args.candidates,
                               scorer=scorer, guidance_scale=args.guidance,
                               **runtime.sampling_options(args, args.device))
    best = int(info["best"][0])
    others = [info["candidates"][0, k].cpu() for k in range(args.candidates) if k != best]
    strip = torch.stack([image[0], mask[0].float(), image[0].masked_fill(mask[0], 0.5), result[0].cpu(),
                         *others])  # (3 + K, 1, 64, 64)
    label = caption + (f" (best of {args.candidates} by {judged_by})" if scorer else "")
    out = Path(args.out)
    written = [data.save_grid([strip], out / "inpaint.png", captions=[label], max_frames=len(strip))]
    from PIL import Image

    Image.fromarray(data.to_uint8_frames(result.cpu())[0]).save(out / "inpaint_result.png")
    return written + [out / "inpaint_result.png"]


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

FRAMES_HELP = "frames of the output video, given frames included (default %(default)s)"
GIVEN_HELP = "how many of the --frames are given (the video's first frames), not drawn (default %(default)s)"
CAPTION_HELP = f"the caption, words from: {' '.join(data.VOCABULARY)}"
RECORDED = "default: the one the checkpoint records"

# NÜWA's sub-commands: (one-line help, description, the inputs they take).
NUWA_COMMANDS = {
    "t2i": ("T2I: caption → image",
            "NÜWA §4, text-to-image: one frame drawn token by token under the caption.", ["caption"]),
    "s2i": ("S2I: sketch → image",
            "NÜWA §4, sketch-to-image: a frame whose digits fill the sketch's class map "
            "(VQ-GAN-Seg tokens as the condition).", ["sketch"]),
    "complete": ("I2I: the top of an image → the rest",
                 "NÜWA §4, image completion (zero-shot): the top --keep-rows token rows are given, "
                 "the rest is drawn under the caption \"None\".", ["image", "keep_rows"]),
    "edit-image": ("TI2I: the box of an image drawn again as the caption says",
                   "NÜWA §4, text-guided image manipulation (zero-shot): tokens outside --box are given, "
                   "tokens inside are drawn under the new caption.", ["image", "caption", "box"]),
    "t2v": ("T2V: caption → video",
            "NÜWA §4, text-to-video: --frames frames drawn under the caption.", ["caption", "frames"]),
    "s2v": ("S2V: sketch video → video",
            "NÜWA §4, sketch-to-video: one frame per sketch frame (the first --frames of --sketch).",
            ["sketch", "frames"]),
    "predict": ("V2V: the first frames of a video → the rest",
                "NÜWA §4, video prediction: the first --given frames of --video are given under the caption "
                "\"None\", the rest of the --frames are drawn. The input shown beside the samples is the "
                "real video, continuation included.", ["video", "frames", "given"]),
    "edit-video": ("TV2V: a video drawn again as the caption says",
                   "NÜWA §4, text-guided video manipulation (zero-shot): the first --given frames of --video "
                   "are kept, the rest of the --frames are drawn under the new caption.",
                   ["video", "caption", "frames", "given"]),
}


def add_run_flags(sub: argparse.ArgumentParser, model: str, *, samples: int | None) -> None:
    """The flags every sub-command shares: checkpoint, output folder, samples (-n; None: the
    sub-command draws one, as inpaint with its --candidates), held-out item, device."""
    sub.add_argument("--ckpt", default=None, help=f"{model} checkpoint ({checkpoint_help(model)})")
    sub.add_argument("--out", default="out/samples",
                     help="folder of the PNG / GIF files (default %(default)s)")
    if samples is not None:
        sub.add_argument("-n", type=int, default=samples, help="number of samples (default %(default)s)")
    sub.add_argument("--index", type=int, default=0,
                     help="item used when no input file is given: of the held-out split for images and "
                          "sketches, of the test split for videos (default %(default)s)")
    sub.add_argument("--device", default=runtime.DEFAULT_DEVICE, help="cpu or cuda (default %(default)s)")


def add_nuwa_task(commands, task: str) -> None:
    summary, description, inputs = NUWA_COMMANDS[task]
    sub = commands.add_parser(task, help=summary, description=description)
    add_run_flags(sub, "NÜWA", samples=4)
    sub.add_argument("--vqgan", default=None, help=f"VQ-GAN checkpoint ({RECORDED})")
    sub.add_argument("--seg", default=None, help=f"VQ-GAN-Seg (sketch tokenizer) checkpoint ({RECORDED})")
    runtime.add_sampling_flags(sub, guidance=True, top_p=True)
    if "caption" in inputs:
        sub.add_argument("--caption", required=True, help=CAPTION_HELP)
    if task in ("t2i", "t2v"):
        sub.add_argument("--redraw-empty", action="store_true",
                         help="draw the first frame again while it holds no ink (a local window cannot tell)")
    if "sketch" in inputs:
        sub.add_argument("--sketch", default=None,
                         help=".npy class map(s) (64, 64) or (T, 64, 64); default: held-out item --index")
    if "image" in inputs:
        sub.add_argument("--image", default=None, help="64×64 grey PNG; default: held-out item --index")
    if "video" in inputs:
        sub.add_argument("--video", default=None,
                         help="GIF or .npy (T, 64, 64); default: two-digit test item --index")
    if "frames" in inputs:
        sub.add_argument("--frames", type=int, default=20 if task == "predict" else 10, help=FRAMES_HELP)
    if "given" in inputs:
        sub.add_argument("--given", type=int, default=10 if task == "predict" else 1, help=GIVEN_HELP)
    if "keep_rows" in inputs:
        sub.add_argument("--keep-rows", type=int, default=8,
                         help="token rows given, from the top (default %(default)s: the top half of 16)")
    if "box" in inputs:
        sub.add_argument("--box", default="16,16,48,48",
                         help="the box drawn again: y0,x0,y1,x1 in pixels (default %(default)s)")


def add_infinity(commands) -> None:
    sub = commands.add_parser(
        "infinity", help="NÜWA-Infinity: a canvas of any size, outpainting, a long video",
        description="NÜWA-Infinity §3: a canvas of any size drawn patch by patch in the order of --direction "
                    "(each patch token by token, its context from the Nearby Context Pool), outpainting from "
                    "--image, or with --frames > 1 a video frame by frame.")
    add_run_flags(sub, "NÜWA-Infinity", samples=1)
    sub.add_argument("--vqgan", default=None, help=f"VQ-GAN checkpoint ({RECORDED})")
    runtime.add_sampling_flags(sub, guidance=True)
    sub.add_argument("--width", type=int, default=512,
                     help="canvas width in pixels, whole patches (default %(default)s)")
    sub.add_argument("--height", type=int, default=64, help="canvas height in pixels (default %(default)s)")
    sub.add_argument("--frames", type=int, default=1,
                     help=FRAMES_HELP + "; 1: a canvas; > 1: a video (--ckpt then defaults to "
                          f"{CHECKPOINTS['NÜWA-Infinity video'][0][0]})")
    sub.add_argument("--given", type=int, default=0, help=GIVEN_HELP)
    sub.add_argument("--direction", default=None, choices=patches.DIRECTIONS,
                     help="patch order (default: column for a canvas, video for --frames > 1); right / left "
                          "outpaint a 64 px high --image sideways, up / down need --width 64")
    sub.add_argument("--caption", default=None, help="digit names, e.g. \"3 7\" (default: none)")
    sub.add_argument("--image", default=None,
                     help="64×64 grey PNG to outpaint from; default: held-out item --index")
    sub.add_argument("--video", default=None,
                     help="GIF or .npy (T, 64, 64) whose first --given frames start the video; default: "
                          "two-digit test item --index")


def add_inpaint(commands) -> None:
    sub = commands.add_parser(
        "inpaint", help="NÜWA-LIP: fill the masked pixels of a frame as the caption says",
        description="NÜWA-LIP §3.3: the masked pixels of a frame filled as the caption says (MP-S2S "
                    "draws the hole's tokens, DF-VQGAN decodes them with the visible pixels); with "
                    "--candidates K > 1 the best of K by a judge (the paper's CLIP; here the digit "
                    "classifier or --rerank-nuwa).")
    add_run_flags(sub, "NÜWA-LIP", samples=None)
    sub.add_argument("--dfvqgan", default=None, help=f"DF-VQGAN checkpoint ({RECORDED})")
    runtime.add_sampling_flags(sub, guidance=True)
    sub.add_argument("--image", default=None, help="64×64 grey PNG; default: held-out item --index")
    sub.add_argument("--mask", default=None,
                     help="64×64 PNG, white = missing; default: half of the digit (--half)")
    sub.add_argument("--half", default="bottom", choices=lip.SIDES,
                     help="the default mask's missing half (default %(default)s)")
    sub.add_argument("--caption", default=None, help=CAPTION_HELP + "; default: the held-out item's")
    sub.add_argument("--candidates", type=int, default=1,
                     help="K samples, the best kept when K > 1 (default %(default)s)")
    sub.add_argument("--classifier", default=classifier.DEFAULT_CLASSIFIER_DIR,
                     help="digit classifier that reranks the candidates (evaluate.py classifier; default "
                          "%(default)s); \"\" = no reranking")
    sub.add_argument("--rerank-nuwa", default="",
                     help="rerank by this NÜWA's caption score instead of the classifier (as LIP reranks "
                          "with CLIP; e.g. out/nuwa/ckpt.pt)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    for task in NUWA_COMMANDS:
        add_nuwa_task(commands, task)
    add_infinity(commands)
    add_inpaint(commands)
    return parser


def check_given(args) -> None:
    """--given counts the first of the --frames: at least one for prediction, fewer than --frames."""
    if not hasattr(args, "given"):
        return
    least = 1 if args.task == "predict" else 0
    if not least <= args.given < args.frames:
        raise ValueError(f"--given {args.given} must be at least {least} and fewer than --frames "
                         f"{args.frames} (the frames of the output video, given frames included)")


def main(argv=None) -> list[Path]:
    args = build_parser().parse_args(argv)
    check_given(args)
    if args.task == "infinity":
        video = args.frames > 1 and not args.ckpt  # a video model by default
        args.ckpt = checkpoint(args.ckpt, "NÜWA-Infinity video" if video else "NÜWA-Infinity")
        print(f"seed {args.seed}; NÜWA-Infinity {args.ckpt}; device {args.device}")
        written = run_infinity(args)
    elif args.task == "inpaint":
        args.ckpt = checkpoint(args.ckpt, "NÜWA-LIP")
        print(f"seed {args.seed}; NÜWA-LIP inpainting {args.ckpt}; device {args.device}")
        written = run_inpaint(args)
    else:
        args.ckpt = checkpoint(args.ckpt, "NÜWA")
        models = tasks.Models(args.ckpt, args.vqgan, args.seg, device=args.device)
        print(f"seed {args.seed}; task {args.task}; NÜWA {args.ckpt}; device {args.device}")
        samples, shown, captions = run_task(args, models)
        written = write_outputs(samples, shown, captions, Path(args.out), args.task)
    print("wrote " + ", ".join(str(p) for p in written))
    return written


if __name__ == "__main__":
    main()
