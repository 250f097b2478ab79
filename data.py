"""MNIST-video data for NÜWA-mini: MNIST loading, Moving MNIST, captions, sketches and masks.

Everything the models train on comes from this file. It implements no paper equation; it builds
the small, fully controlled stand-ins for the papers' data sets:

- NÜWA (arXiv 2111.12417) pre-trains on text→image, text→video and video prediction, and
  fine-tunes on sketch→image / sketch→video. Here: captioned Moving MNIST clips, their
  per-pixel sketch maps, and the classic 20-frame Moving MNIST for 10→10 prediction.
- NÜWA-LIP (arXiv 2202.05009) trains with random box masks; NÜWA's image completion uses a
  half-image mask. Both are generated here (1 = missing / defective).

Sections, in reading order:
1. MNIST IDX files: root resolution, checksums, verified download, parsing.
2. Font-digit fallback for machines with neither MNIST nor the internet.
3. Trajectories (the Srivastava et al. 2015 protocol) and rendering by pixel-wise maximum.
4. `MovingMNIST` (unconditional / prediction) and `CaptionedMovingMNIST` (text, sketch).
5. Masks, collate, and pictures (PNG grids, GIFs) with a small command line.

Glossary (the same letters in every file): B batch, T frames, H W pixel height/width (64 here),
D number of digits in a clip, d a digit class 0-9.

Deviations from the papers' data (these are data sets of our own making, stated here once):
- Our Moving MNIST test set is generated from MNIST *test* digits with a fixed seed, not the
  official `mnist_test_seq.npy` (not obtainable offline). Report it as "our test set (seed S)".
- The captioned set follows Sync-DRAW's idea (one or two digits, each bouncing along one axis,
  a compositional held-out split) with our own closed vocabulary, listed in `VOCABULARY`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

import runtime

# ---------------------------------------------------------------------------------------------
# 1. MNIST IDX files
# ---------------------------------------------------------------------------------------------

# The four original files and their SHA-256 (the same values as ../shared/data/mnist/SHA256SUMS).
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
# The usual public mirrors, tried in order (LeCun's own page often refuses scripted downloads).
MNIST_MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]
DOWNLOAD_TIMEOUT_S = 30  # per connection attempt; chosen so a dead mirror fails fast


class MNISTNotFoundError(FileNotFoundError):
    """MNIST is neither on disk nor downloadable (the only case the font fallback covers)."""


class MNISTChecksumError(ValueError):
    """A file exists (or was served) but its bytes are not the known MNIST file."""


def mnist_root(root: str | os.PathLike | None = None) -> Path:
    """Where MNIST lives: the `root` argument, else $NUWA_DATA, else ~/.cache/nuwa/mnist."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("NUWA_DATA"):
        return Path(os.environ["NUWA_DATA"]).expanduser()
    return Path.home() / ".cache" / "nuwa" / "mnist"


def cache_dir() -> Path:
    """Where derived arrays (the fixed test sets) are cached: $NUWA_CACHE or ~/.cache/nuwa."""
    return Path(os.environ.get("NUWA_CACHE", Path.home() / ".cache" / "nuwa")).expanduser()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checksum_error(path: Path, expected: str, actual: str, origin: str) -> MNISTChecksumError:
    return MNISTChecksumError(
        f"{origin} {path} is corrupt, truncated or not the MNIST file it is named after:\n"
        f"  expected sha256 {expected}\n  actual   sha256 {actual}\n"
        f"Fix: delete {path} and run again to re-download it, or copy the verified file "
        f"(e.g. from ../shared/data/mnist/) into {path.parent}."
    )


def _download(name: str, folder: Path) -> Path:
    """Fetch `name` from the first mirror that serves the right bytes; rename into place only
    after the checksum matches, so an interrupted or corrupt download never looks like data."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = MNIST_SHA256[name]
    failures = []
    for mirror in MNIST_MIRRORS:
        url = mirror + name
        tmp = tempfile.NamedTemporaryFile(dir=folder, prefix=f".{name}.", suffix=".part", delete=False)
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, tmp:
                total = int(response.headers.get("Content-Length") or 0) or None
                with runtime.progress(total=total, unit="B", unit_scale=True, desc=f"download {name}",
                                      leave=False) as bar:
                    for chunk in iter(lambda: response.read(1 << 16), b""):
                        tmp.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
                tmp.flush()
                os.fsync(tmp.fileno())
            actual = digest.hexdigest()
            if actual != expected:
                failures.append(_checksum_error(folder / name, expected, actual, f"the download {url} for"))
                continue
            os.replace(tmp.name, folder / name)  # atomic: the file appears whole or not at all
            return folder / name
        except (urllib.error.URLError, OSError, ValueError) as err:
            failures.append(err)
        finally:
            if os.path.exists(tmp.name):
                os.unlink(tmp.name)
    checksum_failures = [f for f in failures if isinstance(f, MNISTChecksumError)]
    if checksum_failures:  # a server answered with wrong bytes: that is an error, not "offline"
        raise checksum_failures[0]
    raise MNISTNotFoundError(
        f"could not find {folder / name} nor download it from any mirror "
        f"({'; '.join(str(f) for f in failures)}).\nFix: set NUWA_DATA to a folder holding the four "
        f"MNIST .gz files (e.g. ../shared/data/mnist), or run with internet access."
    )


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Parse an IDX file: magic (0, 0, dtype=0x08 uint8, ndim), ndim big-endian int32 sizes, data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expected_ndim:
        raise MNISTChecksumError(f"{path} is not an IDX file of {expected_ndim}-d uint8 data "
                                 "(bad magic number).")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">i4", count=expected_ndim, offset=4))
    offset = 4 + 4 * expected_ndim
    if len(raw) - offset != int(np.prod(shape)):
        raise MNISTChecksumError(f"{path} holds {len(raw) - offset} bytes of data, its header says {shape}.")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def load_mnist(split: str = "train", root=None, download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Load MNIST: images uint8 (N, 28, 28) and labels int64 (N,). Every file is checksummed first."""
    if split not in MNIST_FILES:
        raise ValueError(f"unknown MNIST split {split!r}; expected one of {sorted(MNIST_FILES)}")
    folder = mnist_root(root)
    if not folder.is_dir() and not download:
        raise MNISTNotFoundError(
            f"MNIST folder {folder} does not exist (download=False). Fix: point root= or NUWA_DATA "
            f"at a folder with the four MNIST .gz files, or allow download."
        )
    paths = []
    for name in MNIST_FILES[split]:
        path = folder / name
        if not path.exists():
            if not download:
                raise MNISTNotFoundError(f"{path} is missing (download=False). "
                                         "Fix: copy the MNIST files there.")
            path = _download(name, folder)
        actual = _sha256(path)
        if actual != MNIST_SHA256[name]:
            raise _checksum_error(path, MNIST_SHA256[name], actual, "the file")
        paths.append(path)
    images = _read_idx(paths[0], expected_ndim=3)  # (N, 28, 28)
    labels = _read_idx(paths[1], expected_ndim=1).astype(np.int64)  # (N,)
    if len(images) != len(labels):
        raise MNISTChecksumError(f"{paths[0]} has {len(images)} images but {paths[1]} "
                                 f"has {len(labels)} labels.")
    return images, labels


# ---------------------------------------------------------------------------------------------
# 2. Font-digit fallback
# ---------------------------------------------------------------------------------------------

FONT_DIGITS_PER_CLASS = 200  # enough variety for a demo; chosen here, not from any paper


def font_digits(split: str = "train",
                per_class: int = FONT_DIGITS_PER_CLASS) -> tuple[np.ndarray, np.ndarray]:
    """Digits 0-9 drawn with matplotlib's bundled fonts, jittered (rotation, scale, shift, stroke).

    A stand-in so the demo runs on a machine with neither MNIST nor the internet. Returns the
    same types as `load_mnist`: uint8 (N, 28, 28), int64 (N,). Deterministic per split.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    glyphs = []  # (10 * n_styles, 28, 28) float in [0, 1]
    styles = [("DejaVu Sans", "normal"), ("DejaVu Sans", "bold"), ("DejaVu Serif", "normal"),
              ("DejaVu Serif", "bold"), ("DejaVu Sans Mono", "bold")]
    for family, weight in styles:
        for digit in range(10):
            fig = Figure(figsize=(1, 1), dpi=28)
            canvas = FigureCanvasAgg(fig)
            fig.patch.set_facecolor("black")
            fig.text(0.5, 0.5, str(digit), color="white", ha="center", va="center",
                     fontsize=22, family=family, weight=weight)
            canvas.draw()
            glyphs.append(np.asarray(canvas.buffer_rgba())[:, :, 0].astype(np.float32) / 255.0)
    glyphs = torch.from_numpy(np.stack(glyphs))[:, None]  # (10 * n_styles, 1, 28, 28)
    labels = torch.arange(10).repeat(len(styles))  # (10 * n_styles,)

    gen = torch.Generator().manual_seed({"train": 1, "test": 2}[split])
    n = 10 * per_class
    pick = torch.randint(len(glyphs), (n,), generator=gen)
    angle = (torch.rand(n, generator=gen) - 0.5) * (np.pi / 6)  # ±15°
    scale = 0.85 + 0.3 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.2  # ±2.8 px in [-1, 1] units
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / scale, -torch.sin(angle) / scale
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / scale, torch.cos(angle) / scale
    theta[:, :, 2] = shift
    grid = torch.nn.functional.affine_grid(theta, (n, 1, 28, 28), align_corners=False)
    images = torch.nn.functional.grid_sample(glyphs[pick], grid, align_corners=False)  # (n, 1, 28, 28)
    thicker = torch.rand(n, generator=gen) < 0.5  # stroke width jitter by a 3x3 max filter
    images[thicker] = torch.nn.functional.max_pool2d(images[thicker], 3, stride=1, padding=1)
    images = (images[:, 0].clamp(0, 1) * 255).round().to(torch.uint8)
    return images.numpy(), labels[pick].numpy().astype(np.int64)


def load_digits(split: str = "train", root=None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST when it can be found or downloaded; otherwise font digits, with a warning.

    A corrupt MNIST file is still an error: only a *missing* data set falls back.
    """
    try:
        return load_mnist(split, root=root, download=True)
    except MNISTNotFoundError as err:
        warnings.warn(
            f"MNIST is unavailable ({err}).\nFalling back to font digits rendered with matplotlib: results "
            f"are NOT comparable to MNIST. Get MNIST by setting NUWA_DATA to a folder with the four .gz "
            f"files (e.g. ../shared/data/mnist) or by running once with internet access.",
            stacklevel=2,
        )
        return font_digits(split)


# ---------------------------------------------------------------------------------------------
# 3. Trajectories and rendering
# ---------------------------------------------------------------------------------------------

CANVAS = 64  # Moving MNIST canvas side, pixels (Srivastava et al. 2015)
DIGIT = 28  # MNIST digit side, pixels
FREE_RANGE = CANVAS - DIGIT  # 36: the top-left corner moves inside [0, 36]
STEP = 0.1  # distance per frame in units of the free range: 0.1 * 36 = 3.6 px (Srivastava)
SKETCH_THRESHOLD = 0.5  # a pixel belongs to a digit's sketch class when brighter than this


def bounce_trajectory(start: np.ndarray, velocity: np.ndarray,
                      num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """The Srivastava protocol: move, then clamp to [0, 1] and negate the velocity component of
    the axis that hit the wall. As in the original generator, the position is updated before the
    first frame is recorded. Returns (positions (T, 2) in [0, 1], velocities (T, 2)), axes (y, x)."""
    position, velocity = start.astype(np.float64).copy(), velocity.astype(np.float64).copy()
    positions, velocities = np.empty((num_frames, 2)), np.empty((num_frames, 2))
    for t in range(num_frames):
        position += velocity
        for axis in range(2):  # each wall only flips its own axis
            if position[axis] <= 0.0:
                position[axis], velocity[axis] = 0.0, -velocity[axis]
            elif position[axis] >= 1.0:
                position[axis], velocity[axis] = 1.0, -velocity[axis]
        positions[t], velocities[t] = position, velocity
    return positions, velocities


def corners(positions: np.ndarray) -> np.ndarray:
    """Unit-square positions → integer top-left pixel corners (T, 2), truncated as the original."""
    return (positions * FREE_RANGE).astype(np.int64)


def render(digit_images: list[np.ndarray], digit_corners: list[np.ndarray], num_frames: int) -> np.ndarray:
    """Paste each 28×28 digit at its corner in every frame; overlapping digits combine by
    pixel-wise maximum. Returns the per-digit layers, uint8 (D, T, 64, 64); the video is their max."""
    layers = np.zeros((len(digit_images), num_frames, CANVAS, CANVAS), dtype=np.uint8)  # (D, T, 64, 64)
    for layer, image, corner in zip(layers, digit_images, digit_corners):
        for t in range(num_frames):
            y, x = corner[t]
            layer[t, y:y + DIGIT, x:x + DIGIT] = image
    return layers


def sketch_from_layers(layers: np.ndarray, digits: list[int]) -> np.ndarray:
    """Per-pixel class map (T, 64, 64) int64: 0 = background, 1 + d where digit d's pixel is
    brighter than the threshold; on overlap the brighter digit wins."""
    brightest = layers.argmax(axis=0)  # (T, 64, 64) index of the brighter digit
    value = layers.max(axis=0)  # (T, 64, 64)
    classes = 1 + np.asarray(digits, dtype=np.int64)[brightest]  # (T, 64, 64)
    return np.where(value > SKETCH_THRESHOLD * 255, classes, 0)


# ---------------------------------------------------------------------------------------------
# 4. Data sets
# ---------------------------------------------------------------------------------------------

SPLIT_CODES = {"train": 0, "test": 1, "heldout": 2}  # mixed into every item's random seed
DEFAULT_LENGTH = {"train": 100_000, "test": 1_000, "heldout": 1_000}  # train is generated on the fly


def _item_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Every item depends only on (seed, split, index): reproducible in any worker, any order."""
    return np.random.default_rng([seed, SPLIT_CODES[split], index])


def _check_common(split: str, splits: tuple[str, ...], num_digits: int, num_frames: int) -> None:
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; expected one of {list(splits)}")
    if num_digits not in (1, 2):
        raise ValueError(f"num_digits must be 1 or 2, got {num_digits}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")


class MovingMNIST(Dataset):
    """Moving MNIST (Srivastava et al. 2015): digits bouncing in a 64×64 canvas.

    Items are dicts with `video` float (T, 1, 64, 64) in [0, 1] and `digits` int64 (D,).
    `split="train"` draws MNIST train digits, generated on the fly; `split="test"` is a fixed set
    from MNIST test digits, built once and cached as .npy (uint8) in `cache_dir()`.
    """

    def __init__(self, split: str = "train", num_frames: int = 20, num_digits: int = 2, seed: int = 0,
                 length: int | None = None, root=None):
        _check_common(split, ("train", "test"), num_digits, num_frames)
        self.split, self.num_frames, self.num_digits, self.seed = split, num_frames, num_digits, seed
        self.length = DEFAULT_LENGTH[split] if length is None else length
        self.images, self.labels = load_digits(split, root=root)
        self._videos = self._cached_test_set() if split == "test" else None

    def __len__(self) -> int:
        return self.length

    def make(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Generate item `index` from scratch: (video uint8 (T, 64, 64), digits (D,))."""
        rng = _item_rng(self.seed, self.split, index)
        picks = rng.integers(len(self.images), size=self.num_digits)
        digit_corners = []
        for _ in range(self.num_digits):
            theta = rng.random() * 2 * np.pi  # uniform direction, as in the original generator
            velocity = STEP * np.array([np.sin(theta), np.cos(theta)])
            positions, _ = bounce_trajectory(rng.random(2), velocity, self.num_frames)
            digit_corners.append(corners(positions))
        layers = render([self.images[i] for i in picks], digit_corners, self.num_frames)
        return layers.max(axis=0), self.labels[picks]  # pixel-wise maximum of the digits

    def _cached_test_set(self) -> np.ndarray:
        name = f"moving_mnist_test_seed{self.seed}_n{self.length}_t{self.num_frames}_d{self.num_digits}.npy"
        path = cache_dir() / name
        if path.exists():
            try:
                return np.load(path, mmap_mode="r")
            except (ValueError, OSError):
                pass  # a damaged cache is rebuilt, never trusted
        videos = np.stack([self.make(i)[0] for i in range(self.length)])  # (N, T, 64, 64) uint8
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, videos)
        os.replace(tmp, path)
        return videos

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        if self._videos is not None:
            video, digits = np.array(self._videos[index]), self.labels[_item_digit_picks(self, index)]
        else:
            video, digits = self.make(index)
        return {
            "video": torch.from_numpy(video).float().div_(255.0)[:, None],  # (T, 1, 64, 64)
            "digits": torch.from_numpy(np.asarray(digits, dtype=np.int64)),  # (D,)
        }


def _item_digit_picks(dataset: MovingMNIST, index: int) -> np.ndarray:
    """The digit draws of item `index` (the first numbers of its random stream), without rendering."""
    rng = _item_rng(dataset.seed, dataset.split, index)
    return rng.integers(len(dataset.images), size=dataset.num_digits)


# --- captions ---------------------------------------------------------------------------------

DIGIT_WORDS = [str(d) for d in range(10)]
# The motion words by (axis, sign): axis 0 moves along rows (y), axis 1 along columns (x).
MOTION_WORDS = {(0, -1): "up", (0, +1): "down", (1, -1): "left", (1, +1): "right"}
MOTION_PHRASES = ["up", "down", "left", "right", "up then down", "down then up",
                  "left then right", "right then left"]
# The closed vocabulary of every caption (CaptionVocabulary below adds <pad> and None).
VOCABULARY = ["digit", "is", "moving", "and", "then", "up", "down", "left", "right"] + DIGIT_WORDS
AXES = ("vertical", "horizontal")  # axis 0 moves along rows (y), axis 1 along columns (x)
# The compositional split: in training each digit moves along one axis only, and the held-out
# split shows it moving along the other (Sync-DRAW's idea). Even digits: horizontal in training.
TRAIN_AXIS = {d: (1 if d % 2 == 0 else 0) for d in range(10)}
MIN_VISIBLE_PX = 2  # a leg of motion shorter than this at the clip's start or end is not named


def motion_phrase(axis: int, corner_track: np.ndarray) -> str:
    """Name the motion actually drawn: the sequence of directions along `axis`, joined by "then".

    `corner_track` is the integer corner coordinate along the axis, per frame (T,). Frames where
    the digit does not move are skipped; a first or last leg shorter than MIN_VISIBLE_PX pixels
    (a digit grazing the wall) is not named. Zero bounces give "left", one "left then right", and
    a clip with two bounces (possible from 12 frames on) is named the same way:
    "left then right then left" — no new words, the vocabulary stays closed.
    """
    steps = np.diff(corner_track)
    legs: list[list[int]] = []  # [sign, pixels travelled]
    for step in steps[steps != 0]:
        sign = int(np.sign(step))
        if legs and legs[-1][0] == sign:
            legs[-1][1] += abs(int(step))
        else:
            legs.append([sign, abs(int(step))])
    if len(legs) > 1 and legs[-1][1] < MIN_VISIBLE_PX:
        legs.pop()
    if len(legs) > 1 and legs[0][1] < MIN_VISIBLE_PX:
        legs.pop(0)
    if not legs:
        raise ValueError("the digit does not move in this clip; a caption needs at least one step")
    return " then ".join(MOTION_WORDS[(axis, sign)] for sign, _ in legs)


PAD, NONE = "<pad>", "None"  # NONE is the constant condition of unconditional tasks (NÜWA §4)


@dataclass
class CaptionVocabulary:
    """The closed word vocabulary of our captions (VOCABULARY) plus <pad> and None: a caption ↔
    L word ids. Unknown words are errors. (A "tokenizer" in this project is always a VQ-GAN.)"""

    length: int = 16  # L, caption slots after padding
    words: list[str] = field(default_factory=lambda: [PAD, NONE] + VOCABULARY)  # id → word

    def __post_init__(self):
        self.index = {word: i for i, word in enumerate(self.words)}  # word → id

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, captions: list[str | None]) -> torch.Tensor:
        """Captions → (B, L) word ids; `None` (the object or the word) is the unconditional caption."""
        ids = torch.full((len(captions), self.length), self.index[PAD], dtype=torch.long)  # (B, L)
        for row, caption in enumerate(captions):
            words = [NONE] if caption is None else caption.split()
            unknown = [w for w in words if w not in self.index]
            if unknown:
                raise ValueError(f"unknown caption word(s) {unknown} in {caption!r}; the vocabulary is "
                                 f"{self.words[1:]}")
            if len(words) > self.length:
                raise ValueError(f"caption {caption!r} has {len(words)} words; at most {self.length} fit")
            ids[row, :len(words)] = torch.tensor([self.index[w] for w in words])
        return ids

    def decode(self, ids: torch.Tensor) -> list[str]:
        """(B, L) word ids → captions, without the padding."""
        return [" ".join(self.words[i] for i in row.tolist() if self.words[i] != PAD) for row in ids]


def make_caption(digits: list[int], motions: list[str]) -> str:
    """`digit 3 is moving left then right` and `digit 3 is moving up and digit 7 is moving right`."""
    return " and ".join(f"digit {d} is moving {m}" for d, m in zip(digits, motions))


class CaptionedMovingMNIST(Dataset):
    """Text-to-video Moving MNIST: one or two distinct digits, each bouncing along one axis.

    Items: `video` float (T, 1, 64, 64), `caption` str, `digits` int64 (D,), `motions` list[str],
    `sketch` int64 (T, 64, 64), and `mask` bool (1, 64, 64) when `mask` is "box" or "half".
    Splits: "train" (MNIST train digits, training combinations, on the fly), "test" (MNIST test
    digits, training combinations) and "heldout" (MNIST test digits, unseen (digit, axis) pairs).
    """

    def __init__(self, split: str = "train", num_frames: int = 10, num_digits: int = 1, seed: int = 0,
                 length: int | None = None, mask: str | None = None, root=None):
        _check_common(split, ("train", "test", "heldout"), num_digits, num_frames)
        if num_frames < 2:
            raise ValueError("a captioned clip needs num_frames >= 2 for its motion to be visible")
        if mask not in (None, "box", "half"):
            raise ValueError(f"mask must be None, 'box' or 'half', got {mask!r}")
        self.split, self.num_frames, self.num_digits, self.seed = split, num_frames, num_digits, seed
        self.length, self.mask = DEFAULT_LENGTH[split] if length is None else length, mask
        images, labels = load_digits("train" if split == "train" else "test", root=root)
        self.images = images
        self.by_class = [np.flatnonzero(labels == d) for d in range(10)]

    def __len__(self) -> int:
        return self.length

    def axis_of(self, digit: int) -> int:
        return TRAIN_AXIS[digit] if self.split != "heldout" else 1 - TRAIN_AXIS[digit]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        rng = _item_rng(self.seed, self.split, index)
        digits = [int(d) for d in rng.choice(10, size=self.num_digits, replace=False)]  # distinct
        images, digit_corners, motions = [], [], []
        for digit in digits:
            images.append(self.images[rng.choice(self.by_class[digit])])
            axis = self.axis_of(digit)
            velocity = np.zeros(2)
            velocity[axis] = STEP * rng.choice([-1.0, 1.0])
            while True:  # redraw the rare start whose digit would not move visibly at all
                start = rng.random(2)
                track = corners(bounce_trajectory(start, velocity, self.num_frames)[0])
                if np.abs(np.diff(track[:, axis])).sum() >= MIN_VISIBLE_PX:
                    break
            digit_corners.append(track)
            motions.append(motion_phrase(axis, track[:, axis]))
        layers = render(images, digit_corners, self.num_frames)  # (D, T, 64, 64)
        item = {
            "video": torch.from_numpy(layers.max(axis=0)).float().div_(255.0)[:, None],  # (T, 1, 64, 64)
            "caption": make_caption(digits, motions),
            "digits": torch.tensor(digits, dtype=torch.int64),  # (D,)
            "motions": motions,
            "sketch": torch.from_numpy(sketch_from_layers(layers, digits)),  # (T, 64, 64)
        }
        if self.mask == "box":
            item["mask"] = random_box_mask(rng)
        elif self.mask == "half":
            item["mask"] = half_mask(("top", "bottom", "left", "right")[rng.integers(4)])
        return item


# ---------------------------------------------------------------------------------------------
# 5. Masks, collate, pictures
# ---------------------------------------------------------------------------------------------

# NÜWA-LIP's random box masks: total area 50-70 %, each box 10-30 %, aspect ratio 0.3-3.3.
BOX_TOTAL_AREA = (0.5, 0.7)
BOX_AREA = (0.1, 0.3)
BOX_ASPECT = (0.3, 3.3)
MAX_STALLED_BOXES = 100  # draws in a row adding nothing before a mask near its maximum is finished


def random_box_mask(rng: np.random.Generator, size: int = CANVAS) -> torch.Tensor:
    """Union of random boxes until the missing area reaches a target in BOX_TOTAL_AREA. bool (1, S, S)."""
    target = rng.uniform(*BOX_TOTAL_AREA)
    mask = np.zeros((size, size), dtype=bool)
    stalled = 0  # draws in a row that added nothing (overshooting boxes, or boxes inside the mask)
    while mask.mean() < target:
        # Near the 70 % maximum a box (≥ 10 %) fits only if it lies almost inside the mask already,
        # and a target within one pixel of 70 % cannot be reached at all (a training run hung on
        # one): after 100 draws in a row that add nothing, stop if the total is inside BOX_TOTAL_AREA.
        if stalled >= MAX_STALLED_BOXES and mask.mean() >= BOX_TOTAL_AREA[0]:
            break
        area = rng.uniform(*BOX_AREA) * size * size
        aspect = np.exp(rng.uniform(np.log(BOX_ASPECT[0]), np.log(BOX_ASPECT[1])))  # width / height
        height = int(round(min(size, max(1.0, np.sqrt(area / aspect)))))
        width = int(round(min(size, max(1.0, area / height))))
        top, left = rng.integers(0, size - height + 1), rng.integers(0, size - width + 1)
        candidate = mask.copy()
        candidate[top:top + height, left:left + width] = True
        if candidate.mean() <= BOX_TOTAL_AREA[1]:  # reject a box that overshoots the maximum
            stalled = 0 if candidate.sum() > mask.sum() else stalled + 1
            mask = candidate
        else:
            stalled += 1
    return torch.from_numpy(mask)[None]  # (1, S, S)


def half_mask(missing: str = "bottom", size: int = CANVAS) -> torch.Tensor:
    """Half-image mask for completion: the named half is missing (True). bool (1, S, S)."""
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    half = size // 2
    regions = {"top": (slice(0, half), slice(None)), "bottom": (slice(half, None), slice(None)),
               "left": (slice(None), slice(0, half)), "right": (slice(None), slice(half, None))}
    if missing not in regions:
        raise ValueError(f"unknown half {missing!r}; expected one of {list(regions)}")
    mask[(0, *regions[missing])] = True
    return mask


def collate(items: list[dict]) -> dict:
    """Stack a list of items into a batch dict: tensors gain a leading B, strings stay lists.

    `video` (B, T, 1, 64, 64), `digits` (B, D), `sketch` (B, T, 64, 64), `mask` (B, 1, 64, 64),
    `caption` list[str], `motions` list[list[str]]. Deterministic: it only stacks.
    """
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def to_uint8_frames(video) -> np.ndarray:
    """Any (T, 1, H, W) or (T, H, W) tensor/array in [0, 1] → uint8 (T, H, W)."""
    video = video.detach().cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    if video.ndim == 4:
        video = video[:, 0]
    return (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)


def save_gif(videos, path, captions=None, fps: int = 5, scale: int = 2) -> Path:
    """Write one GIF of several clips side by side (each (T, 1, H, W) in [0, 1]); returns the path."""
    from PIL import Image

    clips = [to_uint8_frames(v) for v in videos]
    frames = []
    for t in range(max(len(c) for c in clips)):
        row = np.concatenate([np.pad(c[min(t, len(c) - 1)], 1, constant_values=128) for c in clips], axis=1)
        size = (row.shape[1] * scale, row.shape[0] * scale)
        frames.append(Image.fromarray(row).resize(size, Image.NEAREST))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    if captions:
        path.with_suffix(".txt").write_text("\n".join(captions) + "\n")
    return path


def save_grid(videos, path, captions=None, max_frames: int = 10) -> Path:
    """PNG grid: one clip per row, frames left to right, the caption above each row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clips = [to_uint8_frames(v)[:max_frames] for v in videos]
    cols = max(len(c) for c in clips)
    fig, axes = plt.subplots(len(clips), cols, figsize=(1.1 * cols, 1.35 * len(clips)), squeeze=False)
    for row, clip in enumerate(clips):
        for col in range(cols):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(clip):
                ax.imshow(clip[col], cmap="gray", vmin=0, vmax=255)
        if captions:
            axes[row, 0].set_title(captions[row], loc="left", fontsize=8, x=0.0)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.93, wspace=0.05, hspace=0.45)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Render captioned Moving MNIST samples (GIF + PNG grid).")
    parser.add_argument("--out", default="out/demo", help="output folder")
    parser.add_argument("--split", default="train", choices=list(SPLIT_CODES))
    parser.add_argument("--num-digits", type=int, default=2, choices=[1, 2])
    parser.add_argument("--num-frames", type=int, default=10)
    parser.add_argument("-n", type=int, default=6, help="number of clips")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"seed {args.seed}; MNIST from {mnist_root()}")
    dataset = CaptionedMovingMNIST(args.split, num_frames=args.num_frames, num_digits=args.num_digits,
                                   seed=args.seed)
    batch = collate([dataset[i] for i in range(args.n)])
    out = Path(args.out)
    gif = save_gif(batch["video"], out / "captioned_moving_mnist.gif", captions=batch["caption"])
    png = save_grid(batch["video"], out / "captioned_moving_mnist.png", captions=batch["caption"])
    for caption in batch["caption"]:
        print(" ", caption)
    print(f"wrote {gif} and {png}")


if __name__ == "__main__":
    main()
