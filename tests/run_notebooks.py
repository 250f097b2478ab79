"""Execute the notebooks in notebooks/ top to bottom (used by the tests and by `make notebooks`).

`python tests/run_notebooks.py` runs every notebook quick (`NUWA_QUICK=1`: small sizes, throw-away
models trained for seconds where no checkpoint exists) and saves nothing. `--cwd notebooks` starts the
kernel in notebooks/ instead of the repository root, as Jupyter does for a notebook opened there: each
notebook's first cell finds the root. `python tests/run_notebooks.py --inplace` re-executes every
notebook with a real (not quick) run on the checkpoints of `make models`, `make tasks`, `make lip` and
`make infinity`, and saves the outputs into the committed copy, so readers see the pictures without
running.
"""

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 900  # per cell; the quick runs take well under a minute per cell
WORKING_DIRECTORIES = {"root": ROOT, "notebooks": ROOT / "notebooks"}  # where a reader may open a notebook


def run_notebook(path: Path, out_path: Path | None = None, quick: bool = True, cwd: Path = ROOT) -> None:
    """Run one notebook in a fresh kernel started in `cwd` (the repository root by default)."""
    import nbformat
    from nbclient import NotebookClient

    os.environ["NUWA_QUICK"] = "1" if quick else "0"
    os.environ.setdefault("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    client.execute()
    if out_path is not None:
        nbformat.write(notebook, out_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inplace", action="store_true", help="save outputs into notebooks/ (full run)")
    parser.add_argument("--cwd", choices=sorted(WORKING_DIRECTORIES), default="root",
                        help="folder the kernel starts in (default: the repository root)")
    parser.add_argument("names", nargs="*", help="notebook names (default: all)")
    args = parser.parse_args()
    for path in NOTEBOOKS:
        if args.names and path.name not in args.names and path.stem not in args.names:
            continue
        print(f"running {path.name} from {args.cwd}", flush=True)
        run_notebook(path, path if args.inplace else None, quick=not args.inplace,
                     cwd=WORKING_DIRECTORIES[args.cwd])
    sys.exit(0)


if __name__ == "__main__":
    main()
