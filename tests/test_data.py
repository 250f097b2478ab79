"""Tests for data.py: MNIST files and download, the Srivastava protocol, captions, sketches, masks."""

import gzip
import hashlib
import http.server
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from conftest import needs_mnist

import data

# --- MNIST files and download -----------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    return gzip.compress(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_mnist(monkeypatch):
    """Small generated IDX files, with their checksums installed as the known ones."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (12, 28, 28)),
        "train-labels-idx1-ubyte.gz": np.arange(12) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (5, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": np.arange(5) % 10,
    }
    files = {name: _idx_bytes(a) for name, a in arrays.items()}
    monkeypatch.setattr(data, "MNIST_SHA256", {n: hashlib.sha256(b).hexdigest() for n, b in files.items()})
    return files, arrays


@pytest.fixture
def http_server():
    """A local HTTP server on 127.0.0.1 serving a dict {path: bytes} that the test fills in."""
    served: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = served.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()


def _dead_url() -> str:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


def test_download_skips_dead_mirror_and_verifies(tmp_path, monkeypatch, fake_mnist, http_server):
    files, arrays = fake_mnist
    url, served = http_server
    served.update({f"/good/{n}": b for n, b in files.items()})
    monkeypatch.setattr(data, "MNIST_MIRRORS", [_dead_url(), url + "/good/"])
    images, labels = data.load_mnist("train", root=tmp_path / "new_folder")
    assert images.dtype == np.uint8 and images.shape == (12, 28, 28)
    assert labels.dtype == np.int64 and labels.shape == (12,)
    np.testing.assert_array_equal(images, arrays["train-images-idx3-ubyte.gz"])
    assert sorted(p.name for p in (tmp_path / "new_folder").iterdir()) == sorted(data.MNIST_FILES["train"])


def test_download_of_corrupt_file_is_rejected_and_never_left_in_place(tmp_path, monkeypatch, fake_mnist,
                                                                      http_server):
    files, _ = fake_mnist
    url, served = http_server
    served.update({f"/bad/{n}": b[:-7] + b"garbage" for n, b in files.items()})
    monkeypatch.setattr(data, "MNIST_MIRRORS", [url + "/bad/"])
    with pytest.raises(data.MNISTChecksumError) as err:
        data.load_mnist("test", root=tmp_path)
    message = str(err.value)
    name = "t10k-images-idx3-ubyte.gz"
    assert name in message and data.MNIST_SHA256[name] in message
    assert hashlib.sha256(served[f"/bad/{name}"]).hexdigest() in message
    assert "delete" in message  # says how to fix it
    assert list(tmp_path.iterdir()) == []  # no partial or corrupt file left behind


def test_corrupt_file_on_disk_names_file_checksums_and_fix(tmp_path, fake_mnist):
    files, _ = fake_mnist
    for name, body in files.items():
        (tmp_path / name).write_bytes(body)
    truncated = tmp_path / "train-labels-idx1-ubyte.gz"
    truncated.write_bytes(files[truncated.name][:10])
    with pytest.raises(data.MNISTChecksumError) as err:
        data.load_mnist("train", root=tmp_path, download=False)
    message = str(err.value)
    assert str(truncated) in message and data.MNIST_SHA256[truncated.name] in message
    assert hashlib.sha256(files[truncated.name][:10]).hexdigest() in message
    assert data.load_mnist("test", root=tmp_path, download=False)[0].shape == (5, 28, 28)


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown MNIST split"):
        data.load_mnist("validation")
    with pytest.raises(data.MNISTNotFoundError, match="does not exist"):
        data.load_mnist("train", root=tmp_path / "nowhere", download=False)
    with pytest.raises(ValueError, match="unknown split"):
        data.MovingMNIST("heldout")
    with pytest.raises(ValueError, match="num_digits must be 1 or 2"):
        data.CaptionedMovingMNIST("train", num_digits=3)
    with pytest.raises(ValueError, match="num_digits must be 1 or 2"):
        data.MovingMNIST("train", num_digits=0)


def test_font_digit_fallback_warns_when_mnist_unreachable(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MNIST_MIRRORS", [_dead_url()])
    with pytest.warns(UserWarning, match="font digits"):
        images, labels = data.load_digits("train", root=tmp_path)
    assert images.dtype == np.uint8 and images.shape == (10 * data.FONT_DIGITS_PER_CLASS, 28, 28)
    assert sorted(set(labels.tolist())) == list(range(10))
    assert images.reshape(len(images), -1).max(1).min() > 100  # every glyph actually drawn


@needs_mnist
def test_real_mnist_shapes():
    images, labels = data.load_mnist("test")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and labels.dtype == np.int64 and labels.max() == 9


@needs_mnist
def test_load_all_mnist_and_1000_clips_under_10s():
    start = time.perf_counter()
    dataset = data.MovingMNIST("train", num_frames=20, num_digits=2)
    clips = [dataset[i]["video"] for i in range(1000)]
    elapsed = time.perf_counter() - start
    print(f"load MNIST + 1000 clips of 20 frames: {elapsed:.2f} s")
    assert clips[0].shape == (20, 1, 64, 64)
    assert elapsed < 10.0


# --- the Srivastava protocol ------------------------------------------------------------------


def _top_left(frame: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(frame)
    return np.array([rows.min(), cols.min()])


def test_median_displacement_is_3_6_px():
    dataset = data.MovingMNIST("train", num_frames=20, num_digits=1)
    steps = []
    for i in range(200):
        video = dataset[i]["video"][:, 0].numpy()
        corners = np.stack([_top_left(f) for f in video])  # measured on the pixels, not the trajectory
        steps.extend(np.linalg.norm(np.diff(corners, axis=0), axis=1))
    median = float(np.median(steps))
    assert 3.3 <= median <= 3.9, median


def test_bounce_flips_only_the_walls_axis():
    rng = np.random.default_rng(1)
    bounces = 0
    for _ in range(300):
        theta = rng.random() * 2 * np.pi
        velocity = data.STEP * np.array([np.sin(theta), np.cos(theta)])
        positions, velocities = data.bounce_trajectory(rng.random(2), velocity, 20)
        previous = np.vstack([velocity, velocities[:-1]])
        for t in range(20):
            for axis in range(2):
                if velocities[t, axis] != previous[t, axis]:
                    bounces += 1
                    assert velocities[t, axis] == -previous[t, axis]
                    assert positions[t, axis] in (0.0, 1.0)  # only at a wall
                else:
                    assert 0.0 < positions[t, axis] < 1.0 or previous[t, axis] == 0
    assert bounces > 100


def test_compositing_is_pixelwise_maximum():
    dataset = data.MovingMNIST("train", num_frames=20, num_digits=2)
    dataset.images = np.full_like(dataset.images, 153)  # flat squares of brightness 0.6
    overlapping = 0
    for i in range(50):
        video = dataset[i]["video"].numpy()
        assert set(np.unique(np.round(video * 255)).tolist()) <= {0.0, 153.0}  # a sum would give 255
        overlapping += int((video > 0).sum() < 2 * 20 * 28 * 28)
    assert overlapping > 0  # some clips did overlap


def test_test_split_is_fixed_and_cached():
    first = data.MovingMNIST("test", length=30)
    second = data.MovingMNIST("test", length=30)
    for i in (0, 7, 29):
        assert torch.equal(first[i]["video"], second[i]["video"])
        assert torch.equal(first[i]["digits"], second[i]["digits"])
    assert torch.equal(first[5]["video"].mul(255).round().byte()[:, 0], torch.from_numpy(first.make(5)[0]))
    assert any(p.name.startswith("moving_mnist_test_seed0_n30") for p in data.cache_dir().iterdir())
    assert not torch.equal(data.MovingMNIST("test", length=30, seed=1)[0]["video"], first[0]["video"])


# --- captions, splits, sketches ---------------------------------------------------------------

NAMES = {(0, -1): "up", (0, 1): "down", (1, -1): "left", (1, 1): "right"}


def _best_shift(before: np.ndarray, after: np.ndarray, reach: int = 5) -> tuple[int, int]:
    """The integer (dy, dx) that best maps one boolean mask onto the next (max overlap)."""
    best, best_score = (0, 0), -1
    padded = np.pad(before, reach)
    size = before.shape[0]
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            moved = padded[reach - dy:reach - dy + size, reach - dx:reach - dx + size]
            score = np.logical_and(moved, after).sum()
            if score > best_score:
                best, best_score = (dy, dx), score
    return best


def _read_motion(sketch: np.ndarray, digit: int) -> str:
    """Read a digit's motion from its pixels alone: track shifts of its sketch class, then name
    the legs along the axis that moved. Independent of data.motion_phrase."""
    masks = sketch == 1 + digit
    track = np.cumsum([(0, 0)] + [_best_shift(masks[t], masks[t + 1]) for t in range(len(masks) - 1)], axis=0)
    axis = int(np.ptp(track[:, 1]) > np.ptp(track[:, 0]))
    assert np.ptp(track[:, 1 - axis]) == 0, "motion along both axes"
    legs = []
    for step in np.diff(track[:, axis]):
        if step:
            sign = int(np.sign(step))
            if legs and legs[-1][0] == sign:
                legs[-1][1] += abs(step)
            else:
                legs.append([sign, abs(step)])
    legs = [leg for k, leg in enumerate(legs) if leg[1] >= 2 or 0 < k < len(legs) - 1 or len(legs) == 1]
    return " then ".join(NAMES[(axis, sign)] for sign, _ in legs)


@pytest.mark.parametrize("num_digits", [1, 2])
def test_every_caption_matches_visible_motion(num_digits):
    dataset = data.CaptionedMovingMNIST("train", num_frames=10, num_digits=num_digits)
    mismatches = []
    for i in range(500):
        item = dataset[i]
        read = [_read_motion(item["sketch"].numpy(), d) for d in item["digits"].tolist()]
        expected = data.make_caption(item["digits"].tolist(), read)
        if expected != item["caption"]:
            mismatches.append((i, item["caption"], expected))
    assert mismatches == []


def test_caption_words_are_the_closed_vocabulary():
    dataset = data.CaptionedMovingMNIST("heldout", num_digits=2)
    phrases = set()
    for i in range(200):
        item = dataset[i]
        assert set(item["caption"].split()) <= set(data.VOCABULARY)
        phrases.update(item["motions"])
    assert phrases == set(data.MOTION_PHRASES)  # 10 frames: every phrase occurs, none other


def test_two_bounces_are_named_with_two_thens():
    dataset = data.CaptionedMovingMNIST("train", num_frames=20, num_digits=1)
    names = [dataset[i]["motions"][0] for i in range(100)]
    two = [n for n in names if n.count("then") == 2]
    assert two, "20-frame clips should contain double bounces"
    for name in two:
        first, second, third = name.split(" then ")
        assert first == third and {first, second} in ({"left", "right"}, {"up", "down"})
    assert data.motion_phrase(1, np.array([30, 34, 36, 32, 20, 0, 4, 8])) == "right then left then right"


def test_compositional_split_is_disjoint():
    def pairs(split):
        dataset = data.CaptionedMovingMNIST(split, num_digits=2)
        out = set()
        for i in range(300):
            item = dataset[i]
            for digit, motion in zip(item["digits"].tolist(), item["motions"]):
                out.add((digit, "vertical" if motion.split()[0] in ("up", "down") else "horizontal"))
        return out

    train, test, heldout = pairs("train"), pairs("test"), pairs("heldout")
    assert len(train) == len(heldout) == 10 and train == test
    assert train.isdisjoint(heldout)
    assert {d for d, _ in heldout} == set(range(10))


def test_sketch_classes_and_overlap_rule():
    dataset = data.CaptionedMovingMNIST("train", num_digits=2)
    for i in range(20):
        item = dataset[i]
        video, sketch = item["video"][:, 0], item["sketch"]
        assert sketch.dtype == torch.int64 and sketch.shape == video.shape
        assert torch.equal(sketch > 0, video > data.SKETCH_THRESHOLD)
        assert set(sketch.unique().tolist()) <= {0} | {1 + d for d in item["digits"].tolist()}
    layers = np.zeros((2, 1, 64, 64), dtype=np.uint8)
    layers[0, 0, 10, 10], layers[1, 0, 10, 10] = 200, 250
    layers[0, 0, 20, 20] = 255
    sketch = data.sketch_from_layers(layers, [3, 7])
    assert sketch[0, 10, 10] == 1 + 7 and sketch[0, 20, 20] == 1 + 3 and sketch[0, 0, 0] == 0


# --- masks and batches -----------------------------------------------------------------------


def test_box_masks_cover_50_to_70_percent():
    rng = np.random.default_rng(0)
    areas = [data.random_box_mask(rng).float().mean().item() for _ in range(200)]
    assert min(areas) >= 0.5 and max(areas) <= 0.7


def test_half_masks():
    mask = data.half_mask("bottom")
    assert mask.dtype == torch.bool and mask.shape == (1, 64, 64)
    assert mask[0, 32:].all() and not mask[0, :32].any()
    assert data.half_mask("left")[0, :, :32].all() and not data.half_mask("left")[0, :, 32:].any()
    with pytest.raises(ValueError, match="unknown half"):
        data.half_mask("middle")


def test_collate_shapes_and_determinism():
    dataset = data.CaptionedMovingMNIST("train", num_digits=2, mask="box")

    def first_batch(seed):
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True, collate_fn=data.collate,
                                             generator=torch.Generator().manual_seed(seed))
        return next(iter(loader))

    batch = first_batch(3)
    assert batch["video"].shape == (4, 10, 1, 64, 64) and batch["video"].dtype == torch.float32
    assert batch["sketch"].shape == (4, 10, 64, 64) and batch["digits"].shape == (4, 2)
    assert batch["mask"].shape == (4, 1, 64, 64) and batch["mask"].dtype == torch.bool
    assert len(batch["caption"]) == 4 and isinstance(batch["caption"][0], str)
    again = first_batch(3)
    assert torch.equal(batch["video"], again["video"]) and batch["caption"] == again["caption"]
    assert not torch.equal(batch["video"], first_batch(4)["video"])


def test_batches_are_fast_compared_with_a_training_step():
    dataset = data.CaptionedMovingMNIST("train", num_digits=2)
    start = time.perf_counter()
    for b in range(10):
        data.collate([dataset[b * 16 + i] for i in range(16)])
    per_batch = (time.perf_counter() - start) / 10
    print(f"one batch of 16 captioned 10-frame clips: {per_batch * 1e3:.1f} ms")
    assert per_batch < 0.1  # a tiny-preset CPU training step takes several hundred ms


def test_demo_command_writes_gif_and_png(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data.main(["--out", str(tmp_path), "-n", "2"])
    assert (tmp_path / "captioned_moving_mnist.gif").stat().st_size > 1000
    assert (tmp_path / "captioned_moving_mnist.png").stat().st_size > 1000


def test_random_box_mask_finishes_when_no_box_fits_under_the_maximum():
    """This stream (a DF-VQGAN training frame: one draw picks the mask kind, then the boxes) reaches
    a total where almost every box overshoots 70 %: it used to draw for ever and hang a training run."""
    import signal

    import numpy as np

    import data

    rng = np.random.default_rng([0, 1851, 2])
    rng.random()
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("random_box_mask hangs")))
    signal.alarm(10)
    try:
        mask = data.random_box_mask(rng)
    finally:
        signal.alarm(0)
    assert data.BOX_TOTAL_AREA[0] <= mask.float().mean() <= data.BOX_TOTAL_AREA[1]
