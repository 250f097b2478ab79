"""How one training run spreads over many processes and survives interruption: DDP / FSDP2,
gradient accumulation, per-step seeds, and atomic, gathered checkpoints.

train.py's loop calls these; nothing here knows about VQ-GAN, NÜWA, LIP or Infinity. Split out of
train.py (which kept growing with every stage) so that each file reads top to bottom: train.py is
*what* is optimised (stages) and the loop, this file is *where* it runs and how it is saved.

How one optimisation step is shared out. The global batch (the stage config's `batch_size`) is
fixed; it is cut into `micro_steps` equal micro-batches (default: one per process), and process r
of W runs micro-batches r·A … r·A + A − 1 with A = micro_steps / W gradient-accumulation steps.
Each micro-batch loss is a mean over its micro-batch, so backpropagating loss / A and letting DDP /
FSDP average over W processes gives exactly the gradient of the mean loss over the global batch —
for any W and A (tests/test_distributed.py checks this against one process on the full batch).

FSDP checkpoints are gathered, not written with torch.distributed.checkpoint (DCP): every rank
takes part in all-gathering the full tensors and rank 0 writes one ordinary ckpt.pt, identical to a
single-process one (see train.py's docstring for why).

Glossary: W processes (world size), r rank, A accumulation (micro-batches per process per step).
"""

from __future__ import annotations

import inspect
import os
import tempfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

import vqgan

# ---------------------------------------------------------------------------------------------
# 2. Processes: one per GPU (or CPU slot) under torchrun, each training on its share of the batch
# ---------------------------------------------------------------------------------------------


@dataclass
class Processes:
    """Where this process stands among the W that torchrun started (W = 1 without torchrun)."""

    rank: int = 0  # r: this process's number, 0 … W − 1
    world: int = 1  # W: number of processes
    device: torch.device = torch.device("cpu")
    started_group: bool = False  # whether this call created the process group (and must destroy it)

    @property
    def main(self) -> bool:
        """Rank 0 alone prints, draws, logs and writes checkpoints."""
        return self.rank == 0


def init_processes(run) -> Processes:
    """Join the process group that torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*.

    NCCL between GPUs, gloo between CPU processes (the tests run two CPU processes with gloo)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if run.fsdp:
            raise ValueError("--fsdp needs a process group: start the run with torchrun, e.g. "
                             "`torchrun --nproc_per_node=2 train.py ... --fsdp` (one process trains without it)")
        return Processes(device=torch.device(run.device))
    device = torch.device(run.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Processes(dist.get_rank(), dist.get_world_size(), device, started)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of one step on one process: a hash of (seed, rank, step). Reseeding every
    step makes a resumed run draw exactly the numbers the uninterrupted one drew, without saving
    generator states, and gives every rank its own numbers."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0])


def accumulation_steps(run, world: int) -> tuple[int, int]:
    """(parts, A): the global batch is cut into `parts` micro-batches, A = parts / W per process."""
    parts = run.micro_steps or world
    if parts % world:
        raise ValueError(f"--micro-steps {parts} cannot be shared by {world} processes; use a multiple of {world}")
    return parts, parts // world


def equal_part(total: int, part: int, parts: int, what: str) -> range:
    """Item indices of micro-batch `part` of `parts` equal micro-batches of a step's `total` items.

    Equal sizes are what make `loss / A` exact (a mean of equal-size means is the mean); unequal
    ones are refused rather than silently weighted wrong (the gradient-accumulation bug class)."""
    if total % parts:
        raise ValueError(f"a step's {total} {what} cannot be cut into {parts} equal micro-batches "
                         f"(micro-steps × processes); choose a batch size divisible by {parts}")
    size = total // parts
    return range(part * size, (part + 1) * size)


def gradient_sync(objectives: nn.Module, enabled: bool):
    """DDP and FSDP average gradients over processes during backward. On the non-final micro-steps
    of an accumulation there is nothing to average yet: DDP's no_sync() and FSDP's
    set_requires_gradient_sync(False) skip the communication, and the final micro-step's backward
    averages the summed gradients once."""
    if isinstance(objectives, DistributedDataParallel):
        return nullcontext() if enabled else objectives.no_sync()
    if isinstance(objectives, FSDPModule):
        objectives.set_requires_gradient_sync(enabled)  # recurses into every FSDP unit
    return nullcontext()


def mean_over_processes(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """One all-reduce for all metrics: every rank then logs, and checks for NaN, the same numbers."""
    names = sorted(values)
    stacked = torch.stack([values[name].float() for name in names])  # (M,)
    if dist.is_initialized():
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(names, stacked.tolist()))


def agreed(*flags: bool, device: torch.device) -> list[bool]:
    """Each flag True on every rank if it is True on any: a stop signal or the time budget must end
    every rank after the same step, or the others would wait forever in the next collective."""
    if not dist.is_initialized():
        return list(flags)
    values = torch.tensor([float(flag) for flag in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


@torch.no_grad()
def broadcast_in_place_state(tensors: list[torch.Tensor]) -> None:
    """Rank 0's copy of the state the forward pass updates in place (EMA codebook, BatchNorm
    statistics) replaces the others' after each step, so every rank computes with the same model."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for tensor in tensors:
        if tensor.dtype == torch.bool:  # gloo cannot send bool tensors: go through uint8
            payload = tensor.data.to(torch.uint8)
            dist.broadcast(payload, src=0)
            tensor.data.copy_(payload.bool())
        else:
            dist.broadcast(tensor.data, src=0)  # .data: a view of the same storage, outside autograd


def wrap_model(objectives: nn.Module, stage, model: nn.Module, procs: Processes, run) -> nn.Module:
    """Single process: as is. torchrun: DDP (a full replica per process, gradients all-reduced), or
    with --fsdp FSDP2: each of the stage's units (transformer blocks) and then the whole model are
    `fully_shard`ed — a process keeps 1/W of every parameter, gradient and Adam moment, and gathers a
    unit's parameters just before its forward and backward."""
    if not dist.is_initialized():
        return objectives
    in_place = [t for t in stage.in_place_state(model) if isinstance(t, nn.Parameter)]
    if not run.fsdp:
        # find_unused_parameters: a phase may leave parameters without gradient (D before
        # disc_start and in the tokenizer phase, sketch embeddings when no sketch task is trained).
        # Buffers are synced after each step by broadcast_in_place_state, not at every forward.
        no_forward_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                           inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
        return DistributedDataParallel(objectives, device_ids=[procs.device] if procs.device.type == "cuda" else None,
                                       find_unused_parameters=True, **no_forward_sync)
    trained_in_place = [name for name, p in model.named_parameters() if p.requires_grad and
                        any(p is q for q in in_place)]
    if trained_in_place:
        raise ValueError(f"--fsdp cannot shard {trained_in_place}: they are trained by gradient and also written "
                         f"in place by the forward pass (vqgan --no-ema: dead-code restarts). Use DDP (drop "
                         f"--fsdp) or the EMA codebook (--ema)")
    # The in-place state stays whole on every rank (FSDP would drop writes to its gathered copy).
    mesh = dist.device_mesh.init_device_mesh(procs.device.type, (procs.world,))
    for unit in stage.fsdp_units(model):
        fully_shard(unit, mesh=mesh, ignored_params=set(in_place))
    fully_shard(objectives, mesh=mesh, ignored_params=set(in_place))
    return objectives


# ---------------------------------------------------------------------------------------------
# 3. Checkpoints
# ---------------------------------------------------------------------------------------------


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    """Atomic write: a temporary file in the same folder, flushed and fsync'ed, then os.replace.
    A crash at any moment leaves either the old checkpoint or the new one, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
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


def load_checkpoint(path: Path, *, stage: str, config: Any, legacy: dict | None = None) -> dict:
    """Load with weights_only=True (plain tensors and containers, no pickled code) and reject a
    checkpoint of another stage or configuration, naming every mismatching field. `legacy`: the
    values of fields added after a checkpoint was written (what it was trained with)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}. Start the run without --resume, or "
                                f"set --out to the folder of the run to continue (it holds {stage}/ckpt.pt)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint.get("stage") != stage:
        raise ValueError(f"{path} is a checkpoint of stage {checkpoint.get('stage')!r}, not {stage!r}")
    stored = {**config_to_dict_values(legacy or {}), **checkpoint["config"]}
    differences = vqgan.config_mismatch(config_to_dict(config), stored)
    if differences:
        raise ValueError(f"{path} was written with another configuration; mismatching fields: "
                         + "; ".join(differences))
    return checkpoint


def config_to_dict(config: Any) -> dict:
    """A dataclass as the plain dict a checkpoint stores (tuples as lists, as torch.load returns them)."""
    return config_to_dict_values(asdict(config))


def config_to_dict_values(values: dict) -> dict:
    """Config values as a checkpoint stores them: tuples as lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def gathered(state: Any) -> Any:
    """A (nested) state dict with every FSDP shard (DTensor) all-gathered into a full CPU tensor.
    Collective under FSDP: every rank must call it, even though only rank 0 writes the result."""
    if isinstance(state, dict):
        return {k: gathered(v) for k, v in state.items()}
    if isinstance(state, list):
        return [gathered(v) for v in state]
    if isinstance(state, DTensor):
        return state.full_tensor().cpu()
    return state.detach().cpu() if isinstance(state, torch.Tensor) else state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full (gathered) optimizer state; under FSDP each process keeps its shard of every
    moment, cut exactly like the parameter it belongs to. The fused / foreach choice of the new run
    (e.g. fused on a GPU) is kept, whatever the run that wrote the checkpoint used."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {"param_groups": state["param_groups"], "state": {
        index: {k: distribute_tensor(v.to(params[index].device), params[index].device_mesh, params[index].placements,
                                     src_data_rank=None)  # every rank holds the full tensor: take its shard
                if isinstance(params[index], DTensor) and isinstance(v, torch.Tensor) and v.dim() > 0 else v
                for k, v in moments.items()}
        for index, moments in state["state"].items()}}
    kept = [{k: group[k] for k in ("fused", "foreach", "capturable") if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keep in zip(optimizer.param_groups, kept):
        group.update(keep)


def remove_stale_temporaries(folder: Path) -> None:
    """A process killed (SIGKILL) inside save_checkpoint leaves its temporary file; ckpt.pt is intact."""
    for stale in folder.glob(".ckpt.pt.*.tmp"):
        stale.unlink(missing_ok=True)
