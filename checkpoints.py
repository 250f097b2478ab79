"""Checkpoints: how every trained model is written to disk and read back, one way for all of them.

Every stage (vqgan, seg, nuwa, dfvqgan, lip, infinity) and the digit classifier store one file,
a plain dict that `torch.load(weights_only=True)` can read without running pickled code:

    {"stage": "nuwa",                 # which model this is; a loader refuses any other
     "config": {...},                 # the model's dataclass config as plain values (tuples → lists)
     "model": state_dict,             # the weights
     ...}                             # what the stage adds: optimizer state, step, run settings, info

Writing is atomic (`save`): a crash at any moment leaves the old file or the new one, never a torn
one. Reading goes through `read` (the file exists, is a checkpoint, is of the expected stage: each
failure is an error that says how to fix it), `config_from` (the dataclass back, refusing fields it
does not know, filling fields added after the file was written from `defaults`), and `load_weights`
(a mismatch names the config fields that decide the model's shape). Each model file's `load_*`
function is these three calls plus its own checks, and returns a ready model in eval mode.

Nothing here knows a particular model; every model file imports this one.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

# ---------------------------------------------------------------------------------------------
# 1. Writing
# ---------------------------------------------------------------------------------------------


def save(checkpoint: dict, path) -> Path:
    """Atomic write: a temporary file in the same folder, flushed and fsync'ed, then os.replace.
    A crash at any moment leaves either the old checkpoint or the new one, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                         delete=False)
    try:
        with handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    finally:
        if os.path.exists(handle.name):
            os.unlink(handle.name)
    try:  # make the rename itself durable (POSIX: the new directory entry survives a power cut)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:  # e.g. Windows cannot open a folder; the rename is still atomic
        pass
    return path


def remove_stale_temporaries(folder: Path) -> None:
    """A process killed (SIGKILL) inside `save` leaves its temporary file; ckpt.pt is intact."""
    for stale in Path(folder).glob(".ckpt.pt.*.tmp"):
        stale.unlink(missing_ok=True)


def config_to_dict(config: Any) -> dict:
    """A dataclass as the plain dict a checkpoint stores (tuples as lists, as torch.load returns them)."""
    return config_values(asdict(config))


def config_values(values: dict) -> dict:
    """Config values as a checkpoint stores them: tuples as lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


# ---------------------------------------------------------------------------------------------
# 2. Reading
# ---------------------------------------------------------------------------------------------


def read(path, *, stage: str | tuple[str, ...], fix: str = "", map_location="cpu") -> dict:
    """The checkpoint dict at `path`, loaded with weights_only=True (plain tensors and containers, no
    pickled code). A missing file, a file torch cannot read, or a checkpoint of another stage is an
    error naming the path and, when given, `fix` (e.g. the command that trains the right one)."""
    stages = (stage,) if isinstance(stage, str) else tuple(stage)
    hint = f" Fix: {fix}." if fix else ""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {' or '.join(stages)} checkpoint at {path}.{hint}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, garbage bytes, pickled code: all unusable the same way
        raise ValueError(f"{path} is corrupt or not a checkpoint "
                         f"({type(error).__name__}: {error}).{hint}") from error
    found = checkpoint.get("stage") if isinstance(checkpoint, dict) else None
    if found not in stages:
        expected = " or ".join(map(repr, stages))
        raise ValueError(f"{path} is a checkpoint of stage {found!r}, not {expected}.{hint}")
    return checkpoint


def config_from(cls: type, values: dict, path, *, defaults: dict | None = None) -> Any:
    """The dataclass `cls` from the values a checkpoint stores (lists back to tuples). A field `cls`
    does not know is an error; `defaults` fills fields added after the file was written (with what
    such files were trained with)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path} has config fields {cls.__name__} does not know: {unknown}")
    values = {**(defaults or {}), **values}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def config_mismatch(expected: dict, found: dict) -> list[str]:
    """Names and values of every field that differs, e.g. ["codebook_size: expected 512, found 256"]."""
    names = sorted(set(expected) | set(found))
    return [f"{n}: expected {expected.get(n)!r}, found {found.get(n)!r}" for n in names
            if expected.get(n) != found.get(n)]


def check_config(path, checkpoint: dict, config: Any, *, defaults: dict | None = None) -> None:
    """Refuse a checkpoint written with another configuration than `config`, naming every field that
    differs (a resumed run, or a tokenizer a model was trained on). `defaults` as in `config_from`."""
    stored = {**config_values(defaults or {}), **checkpoint["config"]}
    differences = config_mismatch(config_to_dict(config), stored)
    if differences:
        raise ValueError(f"{path} was written with another configuration; mismatching fields: "
                         + "; ".join(differences))


def load_weights(model: nn.Module, state: dict, path, *, shape_fields: tuple[str, ...] = ()) -> nn.Module:
    """`model.load_state_dict(state)`; a mismatch is an error naming the config fields in
    `shape_fields` (those that decide which weights the model has) with their values."""
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        config = getattr(model, "config", None)
        described = ", ".join(f"{name}={getattr(config, name)!r}" for name in shape_fields)
        raise ValueError(f"{path} does not match the {type(model).__name__} its config describes"
                         + (f" ({described})" if described else "") + f": {error}") from error
    return model
