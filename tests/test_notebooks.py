"""Every notebook in notebooks/ runs top to bottom with NUWA_QUICK=1 (new notebooks join automatically)."""

import pytest
from run_notebooks import NOTEBOOKS, run_notebook


def test_notebook_folder_is_collected():
    # The parametrised test below picks up every notebook; this guards against a moved folder.
    assert all(path.suffix == ".ipynb" for path in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    run_notebook(path, tmp_path / path.name, quick=True)
    assert (tmp_path / path.name).stat().st_size > 0
