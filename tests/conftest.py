"""Shared test set-up: MNIST location, a private cache folder, and quiet plotting."""

import os
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist"
if not os.environ.get("NUWA_DATA") and SHARED_MNIST.is_dir():
    os.environ["NUWA_DATA"] = str(SHARED_MNIST)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Derived arrays (cached test sets) go to a per-session folder, never the user's cache."""
    os.environ["NUWA_CACHE"] = str(tmp_path_factory.mktemp("nuwa_cache"))
    yield


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread for the tests' tiny tensors: with two, a CPU shared with another busy
    process made them 30x slower (OpenMP threads waiting on a descheduled partner)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mnist_available() -> bool:
    import data

    return all((data.mnist_root() / name).exists() for names in data.MNIST_FILES.values() for name in names)


needs_mnist = pytest.mark.skipif(not mnist_available(), reason="MNIST not found; set NUWA_DATA")


# Pinned seeds (test_nuwa, test_lip, test_infinity): tokens that seeded generation gives with the
# code as it is. Restructuring the code (moving functions, renaming, splitting files) must leave them
# exactly as they are: the same seeds build the same models and draw the same samples. A deliberate
# change of a model, its initialisation or the sampler changes them; update the pins in that commit
# and say so.
def position_weighted_sum(x) -> float:
    """Σ_i x_i · sin(i) over x flattened: one number that moves with any entry of x, however little
    (the pins' check of the float64 numbers behind the tokens)."""
    import torch

    return float((x * torch.arange(x.numel(), dtype=x.dtype).sin().view(x.shape)).sum())
