"""Running a trained model outside its training loop: the few rules every generator, sampler,
benchmark and measurement shares, written once.

- `one_cpu_thread(device)`: token-by-token generation is thousands of tiny kernels; on a CPU,
  intra-op threads only add synchronisation, so every cached sampling loop runs on one thread and
  gives the others back after (`cpu_threads(n)`: the same for any n, as the `--threads` flags).
- `evaluating(model)`: eval mode (dropout off, no tokenizer updates) for a block, then the mode the
  model had before — for pictures drawn in the middle of training.
- `add_sampling_flags` / `sampling_options`: the sampling flags of `sample.py` and `evaluate.py`,
  with one set of defaults (top-k 16: what every reported figure used).
- `sampling_report(args)`, `in_batches(items, size)`: what a measurement records of how it sampled,
  and a dataset's items in consecutive batches.
- `progress(...)`: a tqdm bar on a terminal, nothing when the output goes to a file or a pipe (a log
  of carriage-return updates is megabytes that nobody can read; long loops print a line every so
  often instead).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
from tqdm import tqdm

# Sample among the 16 likeliest codes: cuts the tail of rare codes that a small model draws as
# specks. Every figure in RESULTS.md was measured with it (NÜWA-LIP samples top-128 of 8,192 codes).
TOP_K = 16
DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@contextmanager
def cpu_threads(threads: int) -> Iterator[None]:
    """Run the block on `threads` intra-op CPU threads (0: leave torch's setting); restore after."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_cpu_thread(device: torch.device | str, enabled: bool = True):
    """Run the block on one intra-op thread when `device` is a CPU (and `enabled`): a cached sampling
    step is thousands of tiny kernels (measured: over 10× slower with 2 threads on a busy 2-core CPU)."""
    return cpu_threads(1 if enabled and torch.device(device).type == "cpu" else 0)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def add_sampling_flags(parser: argparse.ArgumentParser, *, guidance: bool = True,
                       top_p: bool = False) -> None:
    """--temperature, --top-k, [--top-p], [--guidance], --seed: the same meaning and defaults everywhere."""
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="0 = greedy; 1 = the model's own distribution (default)")
    parser.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=TOP_K,
                        help=f"sample among the k likeliest codes, 0 = all (default {TOP_K}, as every "
                             "reported figure: cuts the tail of rare codes that a small model draws as "
                             "specks)")
    if top_p:
        parser.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=None,
                            help="nucleus sampling: the smallest set of codes whose probability reaches p")
    if guidance:
        parser.add_argument("--guidance", type=float, default=None,
                            help="classifier-free guidance scale s (a model trained with --cond-drop-prob); "
                                 "default: none")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")


def sampling_options(args: argparse.Namespace, device: torch.device | str) -> dict:
    """The generators' sampling arguments from the flags, with one seeded generator for the run."""
    options = dict(temperature=args.temperature, top_k=args.top_k or None,
                   generator=torch.Generator(device=device).manual_seed(args.seed))
    if getattr(args, "top_p", None) is not None:
        options["top_p"] = args.top_p
    return options


def on_terminal() -> bool:
    """Whether progress bars are shown: standard error is an interactive terminal."""
    return sys.stderr.isatty()


def progress(iterable=None, *, enabled: bool = True, **tqdm_options) -> tqdm:
    """tqdm(iterable, **tqdm_options), silent unless `enabled` and standard error is a terminal."""
    return tqdm(iterable, disable=not (enabled and on_terminal()), **tqdm_options)


def sampling_report(args: argparse.Namespace) -> dict:
    """What a report says of how its samples were drawn (the flags of `add_sampling_flags`)."""
    return {"temperature": args.temperature, "top_k": args.top_k or None, "seed": args.seed,
            "ckpt": str(args.ckpt)}


def in_batches(items, size: int) -> list[tuple[int, list]]:
    """The items of a dataset in consecutive batches: [(index of the batch's first item, its items)]."""
    return [(first, [items[i] for i in range(first, min(first + size, len(items)))])
            for first in range(0, len(items), size)]
