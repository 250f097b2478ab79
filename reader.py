"""The video reader: a Moving MNIST video back into its caption, with classical image processing
around the digit classifier.

    from classifier import load_classifier
    import reader
    reading = reader.read_video(video, load_classifier("out/classifier"))  # video (T, 1, 64, 64) in [0, 1]
    reading.digits, reading.motions    # [3], ["up then down"]
    reading.caption                    # "digit 3 is moving up then down"

Papers: NÜWA (arXiv 2111.12417) measures how well a video shows its text with CLIPSIM, the CLIP
similarity of text and frames; CLIP does not exist offline and knows nothing of Moving MNIST. Our
stand-in reads the video back into a caption in data.py's words and compares it with the text it was
generated from (evaluate.py's caption accuracy). The reading, frame by frame and then over time:
1. locate: threshold the ink, grow it by a 5×5 max filter, take 8-connected components (found by
   label propagation), drop specks: each remaining blob is a digit, or two touching digits;
2. classify: crop 28×28 around each blob's centre of mass, as MNIST lays digits out, and ask the
   digit classifier (classifier.py);
3. track: follow the D digits from a frame where they are apart, matching blobs to predicted
   places (constant velocity) and finding a digit hidden in a merged blob by template matching;
   digits that touch in every frame are cut apart along their ink, or by k-means where strokes
   cross; crossing digits are followed by their whole-pixel steps (Viterbi: which digit took which);
4. name: each track's motion by data.motion_phrase, the very rule that wrote the captions, and its
   digit by a majority vote over frames (the pair classifier names two crossing digits);
   `score_reading` compares the reading with the true caption, order-free.
A judge must be right about real videos before it may judge a model: `python evaluate.py
caption-check` runs the reader on real captioned clips.

Sections: 1. finding the digits of a frame · 2. following digits through a video · 3. two digits
that overlap in every frame · 4. reading a video, and scoring a reading · 5. reading single frames
and NÜWA-Infinity's canvas slots · 6. scoring inpaintings for NÜWA-LIP's reranking (`digit_scorer`).

Glossary: T frames, H W pixels (64 × 64 frames; digits are 28 × 28), D digits per clip, F the
classifier's feature width; a blob is one connected bright region of a frame; a track is one
digit's centres of mass (T, 2), (y, x) in pixels.

Deviations from the paper: CLIPSIM is a learned similarity of any text and image; the reader
knows only data.py's caption grammar (digits and motion phrases), so its score says whether a video
shows its caption, not how alike they are, and it cannot be compared with a published CLIPSIM.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import data
from classifier import PAIRS, DigitClassifier, PairClassifier, centre_crops, nearest_pixel

# ---------------------------------------------------------------------------------------------
# 1. Finding the digits of a frame: ink, blobs, crops, the classifier's labels
# ---------------------------------------------------------------------------------------------
# Measured on the 10,000 MNIST test digits (the numbers behind the constants below): ink above 0.3
# covers at least 31 pixels of every digit; at 8-connectivity 1.8 % of digits (ink > 0.5) break into
# several pieces, none do after a 5×5 dilation; every digit's ink fits a 20×20 box; the centre of mass
# sits at (13.99, 14.01) of the 28×28 field.

INK_THRESHOLD = 0.3  # a pixel is ink when brighter than this (background is 0, strokes near 1)
BLOB_DILATION = 5  # the ink is grown by a 5×5 max filter before finding components: joins broken strokes
MIN_BLOB_PIXELS = 12  # fewer ink pixels than this is a speck (noise in generated frames), not a digit
MAX_DIGIT_BOX = 24  # a blob whose ink box is taller or wider is more than one digit (20 + slack for blur)
MNIST_CENTRE = 14  # crops put the blob's centre of mass here, where MNIST puts every digit's
SEARCH_RADIUS = 8  # px searched around a merged digit's predicted place: steps are 3.6 px (data.STEP)
TIE_BREAK = 0.01  # template cost per px² away from the predicted place: decides between equal fits only
SPLIT_THRESHOLD = data.SKETCH_THRESHOLD  # touching digits are cut apart along their undilated ink above this
KMEANS_ITERATIONS = 20  # Lloyd iterations when the digits' strokes overlap (converges in a few)


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected components of binary masks (N, H, W) → labels int64 (N, H, W), 0 = background.

    Label propagation: every foreground pixel starts with its own number (1 … H·W); a 3 × 3 max
    filter, restricted to the mask, spreads the largest number through each component. At the fixed
    point all pixels of a component carry one label. Iterations ≤ the longest path inside a component."""
    N, H, W = mask.shape
    inside = mask.float()  # (N, H, W)
    labels = torch.arange(1, H * W + 1, dtype=torch.float32, device=mask.device).view(1, H, W) * inside
    while True:
        spread = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * inside  # (N, H, W)
        if torch.equal(spread, labels):
            return labels.long()
        labels = spread


@dataclass
class Blob:
    """One bright connected region of a frame: a digit, two touching digits, or a speck."""

    y: float  # centre of mass of the ink (intensity-weighted), row, pixels
    x: float  # centre of mass of the ink, column, pixels
    box: tuple[int, int, int, int]  # ink bounding box (y0, x0, y1, x1), ends exclusive
    pixels: int  # number of ink pixels
    region: torch.Tensor = field(repr=False)  # (H, W) bool: the dilated component, all this blob's pixels
    label: int = -1  # the classifier's digit for the crop around the blob (-1 before classification)
    confidence: float = 0.0  # its softmax probability
    features: np.ndarray | None = field(default=None, repr=False)  # (F,) penultimate features, for FLD
    split: str = ""  # "" found whole; "ink" / "kmeans" cut out of a blob of touching digits (`split_blob`)

    @property
    def single(self) -> bool:
        """Small enough to be one digit (two touching digits make a wider or taller blob)."""
        y0, x0, y1, x1 = self.box
        return y1 - y0 <= MAX_DIGIT_BOX and x1 - x0 <= MAX_DIGIT_BOX


def as_frames(video: torch.Tensor) -> torch.Tensor:
    """A video (T, 1, H, W) or (T, H, W), or one frame (H, W), in [0, 1] → float frames (T, H, W) on the
    CPU."""
    video = torch.as_tensor(video).detach().float().cpu()
    if video.dim() == 4 and video.shape[1] == 1:
        video = video[:, 0]
    elif video.dim() == 2:
        video = video[None]
    if video.dim() != 3:
        raise ValueError(f"expected a video (T, 1, H, W) or (T, H, W) or a frame (H, W), "
                         f"got {tuple(video.shape)}")
    if video.numel() and video.max() > 1.0 + 1e-3:
        raise ValueError(f"frames must be in [0, 1], got values up to {video.max().item():.3g} "
                         "(divide by 255?)")
    return video


def blob_from_pixels(frame: torch.Tensor, ink: torch.Tensor, region: torch.Tensor, split: str) -> Blob:
    """A Blob for the ink pixels `ink` (H, W) bool owning the pixels `region` (H, W) bool.

    The centre of mass is that of the ink pixels only: a faint neighbour never pulls it, and for a
    real digit it moves by exactly the digit's integer step, so tracks of real clips are exact."""
    rows, cols = (torch.arange(n, dtype=torch.float64) for n in frame.shape)
    weights = (frame * ink).double()  # (H, W)
    mass = weights.sum()
    ys, xs = ink.any(1).nonzero()[:, 0], ink.any(0).nonzero()[:, 0]
    box = (int(ys[0]), int(xs[0]), int(ys[-1]) + 1, int(xs[-1]) + 1)
    return Blob((weights.sum(1) @ rows / mass).item(), (weights.sum(0) @ cols / mass).item(), box,
                int(ink.sum()), region, split=split)


def locate_digits(video: torch.Tensor) -> list[list[Blob]]:
    """Every digit-like blob of every frame, biggest first: threshold the ink, grow it by a 5×5 max
    filter, take 8-connected components, drop specks. Returns one list of Blobs per frame."""
    frames = as_frames(video)  # (T, H, W)
    T, H, W = frames.shape
    ink = frames > INK_THRESHOLD  # (T, H, W)
    grown = F.max_pool2d(ink[:, None].float(), BLOB_DILATION, stride=1, padding=BLOB_DILATION // 2)[:, 0] > 0
    labels = connected_components(grown)  # (T, H, W)
    found = []
    for t in range(T):
        blobs = []
        for number in labels[t].unique()[1:].tolist():  # [0] is the background
            region = labels[t] == number  # (H, W)
            blob_ink = ink[t] & region  # (H, W)
            if blob_ink.sum() >= MIN_BLOB_PIXELS:
                blobs.append(blob_from_pixels(frames[t], blob_ink, region, ""))
        found.append(sorted(blobs, key=lambda b: -b.pixels))
    return found


def crop_digit(frame: torch.Tensor, blob: Blob) -> torch.Tensor:
    """The 28×28 crop (MNIST's layout) with the blob's centre of mass at (14, 14); pixels of other
    blobs are blanked, pixels beyond the frame are black. frame (H, W) → (28, 28)."""
    masked = frame * blob.region  # (H, W)
    pad = data.DIGIT
    padded = F.pad(masked, (pad, pad, pad, pad))  # (H + 56, W + 56)
    top, left = nearest_pixel(blob.y) - MNIST_CENTRE + pad, nearest_pixel(blob.x) - MNIST_CENTRE + pad
    return padded[top:top + data.DIGIT, left:left + data.DIGIT]  # (28, 28)


@torch.no_grad()
def classify_blobs(frames: torch.Tensor, blobs: list[tuple[int, Blob]], classifier: DigitClassifier) -> None:
    """Fill in label, confidence and features of (frame index, Blob) pairs, in one forward pass."""
    if not blobs:
        return
    device = next(classifier.parameters()).device
    crops = torch.stack([crop_digit(frames[t], blob) for t, blob in blobs])[:, None]  # (n, 1, 28, 28)
    features = classifier.embed(crops.to(device))  # (n, F)
    probs = classifier.head(features).softmax(-1).cpu()  # (n, 10)
    confidence, label = probs.max(-1)  # (n,), (n,)
    for i, (_, blob) in enumerate(blobs):
        blob.label, blob.confidence = int(label[i]), float(confidence[i])
        blob.features = features[i].cpu().numpy()


# ---------------------------------------------------------------------------------------------
# 2. Following digits through a video: templates, cuts, tracks
# ---------------------------------------------------------------------------------------------


@dataclass
class Template:
    """A digit's appearance, kept from the last frame where it was seen apart: its ink inside its ink
    box, and where its centre of mass lies relative to the box's top-left corner."""

    image: torch.Tensor  # (h, w)
    offset: np.ndarray  # (2,) centre of mass − top-left corner


def template_of(frame: torch.Tensor, blob: Blob) -> Template:
    y0, x0, y1, x1 = blob.box
    ink_only = frame * (blob.region & (frame > INK_THRESHOLD))  # (H, W)
    return Template(ink_only[y0:y1, x0:x1].clone(), np.array([blob.y - y0, blob.x - x0]))


def match_template(frame: torch.Tensor, template: Template, predicted: np.ndarray) -> np.ndarray:
    """Where a digit lies in a frame where it touches another: the placement within SEARCH_RADIUS of
    the predicted centre that leaves the least of the template's ink unexplained,

        cost(o) = Σ_pixels max(0, template − frame[o + pixel]) + TIE_BREAK · |o − o_predicted|²,

    one-sided because digits combine by pixel-wise maximum: at the true place the frame is at
    least as bright as the digit alone (cost 0 for a real clip). Returns the centre of mass (y, x)."""
    H, W = frame.shape
    h, w = template.image.shape
    R = SEARCH_RADIUS
    corner = np.round(predicted - template.offset).astype(np.int64)  # predicted top-left (y, x)
    corner = np.clip(corner, [-h, -w], [H, W])  # a wild prediction (generated clip) stays near the frame
    pad = max(h, w) + R
    padded = F.pad(frame, (pad, pad, pad, pad))  # (H + 2 pad, W + 2 pad)
    y0, x0 = int(corner[0]) + pad - R, int(corner[1]) + pad - R
    window = padded[y0:y0 + h + 2 * R, x0:x0 + w + 2 * R]  # (h + 2R, w + 2R)
    placements = F.unfold(window[None, None], (h, w))[0]  # (h·w, (2R+1)²), row-major over (dy, dx)
    unexplained = (template.image.reshape(-1, 1) - placements).clamp_min(0).sum(0)  # ((2R+1)²,)
    offsets = torch.arange(-R, R + 1, dtype=torch.float32)
    distance2 = offsets[:, None] ** 2 + offsets[None, :] ** 2  # (2R+1, 2R+1)
    best = int((unexplained + TIE_BREAK * distance2.flatten()).argmin())
    dy, dx = divmod(best, 2 * R + 1)
    return corner + np.array([dy - R, dx - R]) + template.offset


def digits_apart(blobs: list[Blob], num_digits: int) -> list[Blob] | None:
    """The D digit blobs of a frame when its digits are seen apart (the D biggest blobs, each
    digit-sized), else None (digits touch, or fewer blobs than digits)."""
    biggest = blobs[:num_digits]
    return biggest if len(biggest) == num_digits and all(b.single for b in biggest) else None


def split_blob(frame: torch.Tensor, blob: Blob, parts: int = 2) -> list[Blob] | None:
    """Cut a blob of touching digits into `parts` digit blobs, or None when no cut looks like digits.

    1. "ink": digits whose ink comes close (they merge after dilation) but does not overlap fall
       apart into separate 8-connected components of the undilated ink above SPLIT_THRESHOLD; the
       `parts` biggest components are the digits, smaller ones join the nearest. Exact for real clips.
    2. "kmeans": strokes that cross cannot be cut exactly; weighted k-means on the ink pixels'
       coordinates (initialised at the two ends of their principal axis) gives each digit a side.
    Every pixel of the blob's region then belongs to the part owning its nearest ink pixel."""
    ink = (frame > INK_THRESHOLD) & blob.region  # (H, W)
    points = ink.nonzero().double()  # (n, 2) (y, x) of the ink pixels
    weights = frame[ink].double()  # (n,)
    strong = (frame > SPLIT_THRESHOLD) & blob.region
    labels = connected_components(strong[None])[0][ink]  # (n,) component of each ink pixel (0: faint)
    numbers, sizes = labels[labels > 0].unique(return_counts=True)
    if (sizes >= MIN_BLOB_PIXELS).sum() >= parts:
        method = "ink"
        keep = numbers[sizes.argsort(descending=True)[:parts]]  # the digits' components
        anchors = [points[labels == number] for number in keep]
        owner = torch.stack([torch.cdist(points, a).min(1).values for a in anchors]).argmin(0)  # (n,)
    else:
        method = "kmeans"
        mean = (weights[:, None] * points).sum(0) / weights.sum()
        centred = points - mean  # (n, 2)
        covariance = (weights[:, None] * centred).T @ centred  # (2, 2)
        axis = torch.linalg.eigh(covariance).eigenvectors[:, -1]  # the principal axis (2,)
        along = centred @ axis  # (n,)
        owner = (along > along.median()).long()  # the two ends start the two clusters
        if parts != 2:
            raise ValueError(f"k-means splitting is written for 2 digits, got parts={parts}")
        for _ in range(KMEANS_ITERATIONS):
            centres = torch.stack([(weights[owner == k, None] * points[owner == k]).sum(0)
                                   / weights[owner == k].sum().clamp_min(1e-9) for k in range(parts)])
            new_owner = torch.cdist(points, centres).argmin(1)  # (n,)
            if torch.equal(new_owner, owner):
                break
            owner = new_owner
    region_points = blob.region.nonzero().double()  # (m, 2)
    region_owner = owner[torch.cdist(region_points, points).argmin(1)]  # (m,) owner of the nearest ink pixel
    result = []
    for k in range(parts):
        part_ink, part_region = torch.zeros_like(ink), torch.zeros_like(ink)
        part_ink[tuple(points[owner == k].long().T)] = True
        part_region[tuple(region_points[region_owner == k].long().T)] = True
        if part_ink.sum() < MIN_BLOB_PIXELS:
            return None
        result.append(blob_from_pixels(frame, part_ink, part_region, method))
    return result if all(b.single for b in result) else None


def split_apart(frame: torch.Tensor, blobs: list[Blob], num_digits: int) -> list[Blob] | None:
    """Two digits seen as one blob, cut in two by `split_blob` (one-digit clips need no cutting)."""
    if num_digits != 2 or len(blobs) != 1:
        return None
    return split_blob(frame, blobs[0], 2)


def track_digits(frames: torch.Tensor, blobs: list[list[Blob]],
                 num_digits: int) -> list[tuple[np.ndarray, list]]:
    """Follow D digits through a video: [(centres (T, 2), the Blob of each frame or None)] per digit.

    Start at the first frame where the digits are apart; walk forward, then backward. In a frame
    where they are apart, give each digit the blob nearest its predicted centre (constant velocity:
    previous centre + last step), trying every assignment; where they touch, find each digit by
    `match_template`. Digits that touch in every frame (two digits moving side by side: a quarter of
    our 2-digit clips) are cut apart with `split_blob`: frames cut along the ink are used as if the
    digits were apart, and only when no frame can be cut that way are the k-means cuts used.
    Returns [] when no frame shows the D digits (the video cannot be read)."""
    T = len(frames)
    apart = [digits_apart(frame_blobs, num_digits) for frame_blobs in blobs]
    if all(a is None for a in apart):
        cuts = [split_apart(frames[t], blobs[t], num_digits) for t in range(T)]
        clean = [cut if cut is not None and cut[0].split == "ink" else None for cut in cuts]
        apart = clean if any(c is not None for c in clean) else cuts
    seen = [t for t in range(T) if apart[t] is not None]
    if not seen:
        return []
    start = seen[0]
    first = sorted(apart[start], key=lambda b: (b.x, b.y))  # left to right: a fixed order of digits
    centres = np.full((num_digits, T, 2), np.nan)  # (D, T, 2)
    chosen: list[list[Blob | None]] = [[None] * T for _ in range(num_digits)]
    for k, blob in enumerate(first):
        centres[k, start], chosen[k][start] = (blob.y, blob.x), blob
    for direction in (+1, -1):
        templates = [template_of(frames[start], blob) for blob in first]
        stop = T if direction > 0 else -1
        for t in range(start + direction, stop, direction):
            previous = centres[:, t - direction]  # (D, 2)
            before = t - 2 * direction
            known = 0 <= before < T and not np.isnan(centres[:, before]).any()
            predicted = previous + (previous - centres[:, before] if known else 0.0)  # (D, 2)
            if apart[t] is not None:
                candidates = [np.array([b.y, b.x]) for b in apart[t]]
                order = min(itertools.permutations(range(num_digits)),
                            key=lambda perm: sum(np.linalg.norm(predicted[k] - candidates[j])
                                                 for k, j in enumerate(perm)))
                for k, j in enumerate(order):
                    centres[k, t], chosen[k][t] = candidates[j], apart[t][j]
                    templates[k] = template_of(frames[t], apart[t][j])
            else:
                for k in range(num_digits):
                    centres[k, t] = match_template(frames[t], templates[k], predicted[k])
    return [(centres[k], chosen[k]) for k in range(num_digits)]


# ---------------------------------------------------------------------------------------------
# 3. Two digits that overlap in every frame: tracks from whole-pixel steps
# ---------------------------------------------------------------------------------------------


def shifted(frame: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The frame (H, W) moved by (dy, dx) whole pixels, black coming in at the edges."""
    H, W = frame.shape
    out = torch.zeros_like(frame)
    moved = frame[max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
    out[max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = moved
    return out


# A digit's step between two frames: at most 5 px, along one axis.
STEP_SHIFTS = [(0, 0)] + [(sign * n, 0) for n in range(1, 6) for sign in (1, -1)] + \
              [(0, sign * n) for n in range(1, 6) for sign in (1, -1)]


SECOND_STEP_COST = 4.0  # grey levels summed over pixels: two digits moving alike have one step, not two


def two_steps(before: torch.Tensor, after: torch.Tensor) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The two whole-pixel steps (dy, dx) that best carry frame `before` (H, W) to frame `after`, and
    the centre (y, x) in `after` of the ink each step explains better than the other.

    Each digit moves rigidly by its own step along one axis, and the frame is the pixel-wise maximum
    of the digits, so every ink pixel of `after` is its digit's pixel of `before`, moved by that
    digit's step. The pair of steps (s₁, s₂) of STEP_SHIFTS minimising

        Σ_{ink of after} min_k |after − move(before, s_k)|
          + Σ_{ink of before} min_k |before − move⁻¹(after, s_k)|

    plus SECOND_STEP_COST when s₁ ≠ s₂, explains both frames (two digits moving alike give s₁ = s₂)."""
    forward = torch.stack([(after - shifted(before, dy, dx)).abs() for dy, dx in STEP_SHIFTS])  # (S, H, W)
    backward = torch.stack([(before - shifted(after, -dy, -dx)).abs() for dy, dx in STEP_SHIFTS])  # (S, H, W)
    forward = forward[:, after > INK_THRESHOLD]  # (S, n)
    backward = backward[:, before > INK_THRESHOLD]  # (S, m)
    cost = (torch.minimum(forward[:, None], forward[None]).sum(-1)
            + torch.minimum(backward[:, None], backward[None]).sum(-1))  # (S, S)
    # A second step always explains a few more pixels; it must pay for itself (Occam's razor).
    cost = cost + SECOND_STEP_COST * (1 - torch.eye(len(STEP_SHIFTS)))
    first, second = divmod(int(cost.argmin()), len(STEP_SHIFTS))
    # Where each step's digit is in `after`: the centre of the ink pixels it explains better than the other.
    points = (after > INK_THRESHOLD).nonzero().double()  # (n, 2)
    centres = []
    for mine, other in ((first, second), (second, first)):
        owned = forward[mine] < forward[other]  # (n,)
        centres.append(points[owned].mean(0).numpy() if owned.any() else points.mean(0).numpy())
    steps = [np.array(STEP_SHIFTS[k], dtype=np.float64) for k in (first, second)]
    return steps, centres


TURN_COST = 40.0  # px: a digit reverses only at a wall (at most once or twice a clip), so turns cost
AXIS_COST = 80.0  # px: and it never changes axis


def turn_cost(step: np.ndarray, following: np.ndarray) -> float:
    """What it costs one digit to take `step` and then `following`: a reversal or a change of axis."""
    if not step.any() or not following.any():
        return 0.0
    if (step[0] != 0) != (following[0] != 0):
        return AXIS_COST
    return TURN_COST if (step * following).sum() < 0 else 0.0


def tracks_from_steps(frames: torch.Tensor, centres: np.ndarray) -> np.ndarray:
    """Tracks (D=2, T, 2) of two digits that overlap in every frame, rebuilt from whole-pixel steps.

    The k-means cuts give each digit a rough centre per frame, but crossing strokes pull a centre
    around by a few pixels: enough to invent a bounce. Instead, take the two steps of `two_steps`
    for every pair of frames and decide which digit took which (keep or swap) by dynamic programming
    (Viterbi over the T − 1 choices): the cost of a choice is how far each step's explained ink lies
    from that digit's rough centre, plus TURN_COST / AXIS_COST for every reversal or change of axis
    it makes a digit perform. Then add each digit's steps up."""
    T = len(frames)
    found = [two_steps(frames[t], frames[t + 1]) for t in range(T - 1)]
    options = []  # per step, per choice (0 keep, 1 swap): (the steps of digit 0 and 1, the choice's own cost)
    for t, (steps, owners) in enumerate(found):
        choices = []
        for order in ((0, 1), (1, 0)):
            distance = sum(np.linalg.norm(centres[k, t + 1] - owners[order[k]]) for k in range(2))
            choices.append(([steps[order[0]], steps[order[1]]], distance))
        options.append(choices)
    total = [cost for _, cost in options[0]]  # best cost of each choice at the current step
    back: list[list[int]] = []
    for t in range(1, T - 1):
        new_total, pointers = [], []
        for steps, cost in options[t]:
            arrive = [total[p] + sum(turn_cost(options[t - 1][p][0][k], steps[k]) for k in range(2))
                      for p in range(2)]
            best = int(np.argmin(arrive))
            new_total.append(arrive[best] + cost)
            pointers.append(best)
        total, back = new_total, back + [pointers]
    choice = [int(np.argmin(total))]
    for pointers in reversed(back):
        choice.insert(0, pointers[choice[0]])
    tracks = np.zeros_like(centres)  # (2, T, 2)
    tracks[:, 0] = centres[:, 0]
    for t in range(T - 1):
        steps = options[t][choice[t]][0]
        for k in range(2):
            tracks[k, t + 1] = tracks[k, t] + steps[k]
    return tracks


# ---------------------------------------------------------------------------------------------
# 4. Reading a video: motions, digits, the caption, and how it compares with the truth
# ---------------------------------------------------------------------------------------------


def read_motion(centres: np.ndarray) -> tuple[int, str | None]:
    """(axis, motion phrase) of a track of centres (T, 2): the axis it travelled further along, and
    data.motion_phrase — the rule that wrote the captions — applied to the track rounded to pixels
    (a real digit's centre moves exactly as its corner does). None when it does not move."""
    travel = np.abs(np.diff(centres, axis=0)).sum(0)  # (2,) pixels travelled along y and x
    axis = int(np.argmax(travel))
    track = np.floor(centres[:, axis] + 0.5).astype(np.int64)  # (T,)
    try:
        return axis, data.motion_phrase(axis, track)
    except ValueError:  # the digit stands still: no phrase names that
        return axis, None


def majority_digit(blobs: list[Blob]) -> int:
    """The most frequent label (ties: the larger summed confidence); -1 without any blob."""
    if not blobs:
        return -1
    votes = Counter(b.label for b in blobs)
    confidence = Counter()
    for b in blobs:
        confidence[b.label] += b.confidence
    return max(votes, key=lambda label: (votes[label], confidence[label]))


@dataclass
class DigitTrack:
    """One digit followed through a video."""

    centres: np.ndarray  # (T, 2) centre of mass (y, x) per frame
    apart: list[bool]  # per frame: seen as its own blob (True) or found by template matching (False)
    digit: int  # majority vote of the classifier over the frames where it was apart (-1: never)
    axis: int  # 0 = vertical (up / down), 1 = horizontal (left / right)
    motion: str | None  # e.g. "left then right"; None when it did not move


@dataclass
class VideoReading:
    """What the reader saw: every blob of every frame, and the tracked digits."""

    blobs: list[list[Blob]]  # per frame, biggest first, each with the classifier's label
    tracks: list[DigitTrack]  # one per digit; empty when the digits were never seen apart
    cut: str = ""  # "ink" / "kmeans" when the digits touched in every frame and had to be cut apart;
    # after a "kmeans" cut the two digits are named by the pair classifier when the classifier has one

    @property
    def digits(self) -> list[int]:
        return [track.digit for track in self.tracks]

    @property
    def motions(self) -> list[str | None]:
        return [track.motion for track in self.tracks]

    @property
    def caption(self) -> str | None:
        """The caption this video shows, in data.make_caption's words; None when unreadable."""
        if not self.tracks or any(t.digit < 0 or t.motion is None for t in self.tracks):
            return None
        return data.make_caption(self.digits, self.motions)


@torch.no_grad()
def read_video(video: torch.Tensor, classifier: DigitClassifier,
               num_digits: int | None = None) -> VideoReading:
    """Locate, classify and track the digits of one video (T, 1, 64, 64) in [0, 1].

    num_digits: how many digits to follow (a caption says); None = the most common blob count."""
    frames = as_frames(video)  # (T, H, W)
    blobs = locate_digits(frames)
    if num_digits is None:
        counts = Counter(len(b) for b in blobs if b)
        num_digits = max(counts, key=lambda n: (counts[n], -n)) if counts else 1
    followed = track_digits(frames, blobs, num_digits)
    located = [(t, blob) for t, frame_blobs in enumerate(blobs) for blob in frame_blobs]
    cut_out = [(t, blob) for _, chosen in followed for t, blob in enumerate(chosen)
               if blob is not None and blob.split]
    classify_blobs(frames, located + cut_out, classifier)
    kinds = {blob.split for _, blob in cut_out}
    cut = "kmeans" if "kmeans" in kinds else "ink" if "ink" in kinds else ""
    crossing = cut == "kmeans" and num_digits == 2  # strokes overlap in every frame: no clean cut exists
    if crossing:  # follow the pixels' whole steps, not the k-means halves' centres
        steps = tracks_from_steps(frames, np.stack([centres for centres, _ in followed]))  # (2, T, 2)
        followed = [(steps[k], chosen) for k, (_, chosen) in enumerate(followed)]
    tracks = []
    for centres, chosen in followed:
        axis, motion = read_motion(centres)
        seen_apart = [blob for blob in chosen if blob is not None]
        tracks.append(DigitTrack(centres, [blob is not None for blob in chosen], majority_digit(seen_apart),
                                 axis, motion))
    if crossing and getattr(classifier, "pair", None) is not None:
        pair = read_pair(frames, blobs, classifier.pair)
        give_pair_to_tracks(pair, tracks, [chosen for _, chosen in followed])
    return VideoReading(blobs, tracks, cut)


def give_pair_to_tracks(pair: tuple[int, int], tracks: list[DigitTrack],
                        chosen: list[list[Blob | None]]) -> None:
    """Set the two tracks' digits to the pair's, in the order that the labels of each track's k-means
    halves (weighted by confidence) agree with more."""
    support = [Counter() for _ in tracks]
    for k, blobs in enumerate(chosen):
        for blob in blobs:
            if blob is not None:
                support[k][blob.label] += blob.confidence
    a, b = pair
    order = (a, b) if support[0][a] + support[1][b] >= support[0][b] + support[1][a] else (b, a)
    for track, digit in zip(tracks, order):
        track.digit = digit


@torch.no_grad()
def read_pair(frames: torch.Tensor, blobs: list[list[Blob]],
              pair_classifier: PairClassifier) -> tuple[int, int]:
    """The two digits (a ≤ b) of a clip whose digits overlap in every frame: the pair classifier on each
    frame's biggest blob (the two digits together), its log-probabilities summed over the frames."""
    whole = [frame * frame_blobs[0].region  # (H, W)
             for frame, frame_blobs in zip(frames, blobs) if frame_blobs]
    device = next(pair_classifier.parameters()).device
    log_probs = pair_classifier(centre_crops(torch.stack(whole)).to(device)).log_softmax(-1).sum(0)  # (55,)
    return PAIRS[int(log_probs.argmax())]


def video_digit(video: torch.Tensor, classifier: DigitClassifier) -> int:
    """The digit of a single-digit clip (or image, T = 1): majority vote over frames; -1 if none found."""
    reading = read_video(video, classifier, num_digits=1)
    return reading.digits[0] if reading.tracks else -1


def score_reading(reading: VideoReading, digits: list[int], motions: list[str]) -> dict[str, bool]:
    """Compare a reading with the caption's (digits, motions). Order-free: "digit 3 … and digit 7 …"
    equals "digit 7 … and digit 3 …".

    caption: the set of (digit, motion) pairs matches;  digit: the digits match, whatever they do;
    motion: the motion phrases match, whoever does them."""
    read_pairs = sorted((d, m or "") for d, m in zip(reading.digits, reading.motions))
    true_pairs = sorted(zip((int(d) for d in digits), motions))
    return {"caption": read_pairs == true_pairs,
            "digit": sorted(d for d, _ in read_pairs) == sorted(d for d, _ in true_pairs),
            "motion": sorted(m for _, m in read_pairs) == sorted(m for _, m in true_pairs)}


def reading_features(readings: list[VideoReading]) -> np.ndarray:
    """Penultimate features (n, F) of every blob crop in every frame of the readings: FLD's samples.
    A frame's blobs are what the classifier saw of it, so digits drawn badly move the features."""
    rows = [blob.features for reading in readings for frame in reading.blobs for blob in frame]
    return np.stack(rows) if rows else np.zeros((0, 0))


# ---------------------------------------------------------------------------------------------
# 5. Reading single frames and canvas slots
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def read_biggest(video: torch.Tensor, classifier: DigitClassifier) -> list[Blob | None]:
    """The biggest blob of each frame of a video (T, 1, H, W) or (T, H, W), classified; None for a
    frame without any."""
    frames = as_frames(video)  # (T, H, W)
    biggest = [(t, blobs[0]) for t, blobs in enumerate(locate_digits(frames)) if blobs]
    classify_blobs(frames, biggest, classifier)
    found: list[Blob | None] = [None] * len(frames)
    for t, blob in biggest:
        found[t] = blob
    return found


def digits_found(frame: torch.Tensor, digits: torch.Tensor, classifier: DigitClassifier) -> bool:
    """Does the reader find exactly the clip's digits (one or two) in one frame (1, 64, 64)? A
    prediction that keeps its digits legible to the end passes; one that dissolves them does not.
    As many ink blobs as digits or more: the classifier names the biggest ones; two digits in one blob
    (they overlap): the pair classifier names both, when the classifier file has one."""
    frames = as_frames(frame)  # (1, H, W)
    blobs = locate_digits(frames)[0]  # biggest first
    count = len(digits)
    if len(blobs) >= count:
        classify_blobs(frames, [(0, blob) for blob in blobs[:count]], classifier)
        found = [blob.label for blob in blobs[:count]]
    elif count == 2 and blobs and getattr(classifier, "pair", None) is not None:
        found = list(read_pair(frames, [blobs], classifier.pair))
    else:
        return False
    return sorted(found) == sorted(digits.tolist())


def read_slots(canvases: torch.Tensor, classifier: DigitClassifier, slot: int) -> list[tuple[int, float]]:
    """Cut canvases (B, 1, H, W) into slot-wide columns (NÜWA-Infinity's training canvases put one
    digit in each 32 px column) and read each: (digit, confidence) of its biggest ink blob, or
    (-1, 0.0) if none. A slot is centred in a 64-px-wide black frame, what the reader was built for."""
    B, _, H, W = canvases.shape
    if W % slot:
        raise ValueError(f"canvas width {W} is not a multiple of the {slot} px slot")
    columns = canvases[:, 0].unfold(-1, slot, slot)  # (B, H, W/slot, slot)
    columns = columns.permute(0, 2, 1, 3).reshape(-1, H, slot)  # (B·W/slot, H, slot)
    side = max(0, data.CANVAS - slot)
    frames = F.pad(columns.float().cpu(), (side // 2, side - side // 2))  # (n, H, 64)
    return [(-1, 0.0) if blob is None else (blob.label, blob.confidence)
            for blob in read_biggest(frames, classifier)]


# ---------------------------------------------------------------------------------------------
# Scoring inpaintings by the reader: NÜWA-LIP's reranking (§3.3) with a digit classifier for CLIP
# ---------------------------------------------------------------------------------------------


def caption_digit(caption: str) -> int:
    """The digit a caption names first: "digit 3 is moving up" → 3."""
    words = caption.split()
    if "digit" not in words[:-1] or not words[words.index("digit") + 1].isdigit():
        raise ValueError(f"caption {caption!r} names no digit (expected 'digit D ...')")
    return int(words[words.index("digit") + 1])


def digit_scorer(digit_classifier: DigitClassifier) -> Callable[[torch.Tensor, str], torch.Tensor]:
    """Rerank inpaintings as LIP reranks with CLIP (§3.3), offline: a candidate's score is the digit
    classifier's probability of the caption's digit for the biggest blob of ink in the frame (the
    blob read_video would follow), 0 when the frame shows no digit at all."""

    @torch.no_grad()
    def score(pixels: torch.Tensor, caption: str) -> torch.Tensor:
        digit, scores = caption_digit(caption), []
        for frame in pixels.float().cpu():  # (1, H, W)
            blobs = locate_digits(frame)[0]
            if not blobs:
                scores.append(0.0)
                continue
            crop = crop_digit(frame[0], blobs[0])[None, None]  # (1, 1, 28, 28)
            device = next(digit_classifier.parameters()).device
            scores.append(float(digit_classifier(crop.to(device)).softmax(-1)[0, digit]))
        return torch.tensor(scores)  # (K,)

    return score
