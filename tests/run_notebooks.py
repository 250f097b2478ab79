"""Execute the notebooks in notebooks/ top to bottom (used by the tests and by `make notebooks`).

`python tests/run_notebooks.py --inplace` re-executes every notebook with a real (not quick) run
and saves the outputs into the committed copy, so readers see the pictures without running.
"""

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 900  # per cell; the quick runs take well under a minute per cell


def run_notebook(path: Path, out_path: Path | None = None, quick: bool = True) -> None:
    """Run one notebook in a fresh kernel with the repository root as working directory."""
    import nbformat
    from nbclient import NotebookClient

    os.environ["NUWA_QUICK"] = "1" if quick else "0"
    os.environ.setdefault("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    if out_path is not None:
        nbformat.write(notebook, out_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inplace", action="store_true", help="save outputs into notebooks/ (full run)")
    parser.add_argument("names", nargs="*", help="notebook names (default: all)")
    args = parser.parse_args()
    for path in NOTEBOOKS:
        if args.names and path.name not in args.names and path.stem not in args.names:
            continue
        print(f"running {path.name}", flush=True)
        run_notebook(path, path if args.inplace else None, quick=not args.inplace)
    sys.exit(0)


if __name__ == "__main__":
    main()
