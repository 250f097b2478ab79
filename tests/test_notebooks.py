"""Every notebook in notebooks/ runs top to bottom with NUWA_QUICK=1 (new notebooks join automatically)
from the repository root, and the cheapest one also from notebooks/, where Jupyter starts the kernel of
a notebook opened there."""

import json

import pytest
from run_notebooks import NOTEBOOKS, ROOT, run_notebook

# The cheapest notebook (no training: masks, counts and small timings) stands for all of them in the second
# folder: every notebook opens with the same cell that finds the repository root.
CHEAPEST = ROOT / "notebooks" / "02_3dna.ipynb"


def test_notebook_folder_is_collected():
    # The parametrised test below picks up every notebook; this guards against a moved folder.
    assert NOTEBOOKS and all(path.suffix == ".ipynb" for path in NOTEBOOKS)
    assert CHEAPEST in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    run_notebook(path, tmp_path / path.name, quick=True)
    assert (tmp_path / path.name).stat().st_size > 0


def test_notebook_runs_from_the_notebooks_folder(tmp_path):
    run_notebook(CHEAPEST, tmp_path / CHEAPEST.name, quick=True, cwd=ROOT / "notebooks")
    assert (tmp_path / CHEAPEST.name).stat().st_size > 0


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_starts_by_finding_the_repository_root(path):
    # A reader may open a notebook from notebooks/: its first code cell moves to the root before any import.
    cells = json.loads(path.read_text())["cells"]
    first = "".join(next(cell for cell in cells if cell["cell_type"] == "code")["source"])
    assert "os.chdir(ROOT)" in first and "sys.path.insert(0, str(ROOT))" in first
