"""How one training run spreads over many processes: DDP / FSDP2, gradient accumulation, and the
gathering of sharded state for checkpoints.

Papers: none; NÜWA (arXiv 2111.12417 §4) trains on 64 A100s, and this is how the same script runs
on one CPU or many GPUs. train.py's loop calls these; nothing here knows about VQ-GAN, NÜWA, LIP or
Infinity: stages.py is *what* is optimised, train.py the loop, this file *where* it runs.

How one optimisation step is shared out. The global batch (the stage config's `batch_size`) is
fixed; it is cut into `micro_steps` equal micro-batches (default: one per process), and process r
of W runs micro-batches r·A … r·A + A − 1 with A = micro_steps / W gradient-accumulation steps.
Each micro-batch loss is a mean over its micro-batch, so backpropagating loss / A and letting DDP /
FSDP average over W processes gives exactly the gradient of the mean loss over the global batch —
for any W and A (tests/test_distributed.py checks this against one process on the full batch).
The number of processes changes the speed of a run, not its mathematics.

FSDP checkpoints are gathered, not written with torch.distributed.checkpoint (DCP): every rank
takes part in all-gathering the full tensors and rank 0 writes one ordinary ckpt.pt, identical to a
single-process one (`gathered`; train.py's docstring says why); a resumed run cuts each process's
shard out of it again (`load_optimizer_state`).

Sections: 1. processes, accumulation and synchronisation · 2. whole states for checkpoints.

Glossary: W processes (world size), r rank, A accumulation (micro-batches per process per step).

Deviations from the papers: state that the forward pass writes in place (EMA codebook, BatchNorm
statistics) is rank 0's, broadcast after every step (`broadcast_in_place_state`; the stage's
`in_place_state` in stages.py lists it).
"""

from __future__ import annotations

import inspect
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

# ---------------------------------------------------------------------------------------------
# 1. Processes: one per GPU (or CPU slot) under torchrun, each training on its share of the batch
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
                             "`torchrun --nproc_per_node=2 train.py ... --fsdp` "
                             "(one process trains without it)")
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


def accumulation_steps(run, world: int) -> tuple[int, int]:
    """(parts, A): the global batch is cut into `parts` micro-batches, A = parts / W per process."""
    parts = run.micro_steps or world
    if parts % world:
        raise ValueError(f"--micro-steps {parts} cannot be shared by {world} processes; "
                         f"use a multiple of {world}")
    return parts, parts // world


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
        ddp_options = inspect.signature(DistributedDataParallel).parameters
        no_forward_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in ddp_options
                           else {"broadcast_buffers": False})
        device_ids = [procs.device] if procs.device.type == "cuda" else None
        return DistributedDataParallel(objectives, device_ids=device_ids, find_unused_parameters=True,
                                       **no_forward_sync)
    trained_in_place = [name for name, p in model.named_parameters() if p.requires_grad and
                        any(p is q for q in in_place)]
    if trained_in_place:
        raise ValueError(f"--fsdp cannot shard {trained_in_place}: they are trained by gradient and also "
                         f"written in place by the forward pass (vqgan --no-ema: dead-code restarts). "
                         f"Use DDP (drop --fsdp) or the EMA codebook (--ema)")
    # The in-place state stays whole on every rank (FSDP would drop writes to its gathered copy).
    mesh = dist.device_mesh.init_device_mesh(procs.device.type, (procs.world,))
    for unit in stage.fsdp_units(model):
        fully_shard(unit, mesh=mesh, ignored_params=set(in_place))
    fully_shard(objectives, mesh=mesh, ignored_params=set(in_place))
    return objectives


# ---------------------------------------------------------------------------------------------
# 2. Whole states for checkpoints: FSDP shards gathered on save, cut again on resume
# ---------------------------------------------------------------------------------------------


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

    def shard(moment: Any, param: torch.Tensor) -> Any:
        """Every rank holds the full tensor: take its shard, cut like the parameter."""
        if isinstance(param, DTensor) and isinstance(moment, torch.Tensor) and moment.dim() > 0:
            return distribute_tensor(moment.to(param.device), param.device_mesh, param.placements,
                                     src_data_rank=None)
        return moment

    state = {"param_groups": state["param_groups"],
             "state": {index: {k: shard(v, params[index]) for k, v in moments.items()}
                       for index, moments in state["state"].items()}}
    kept = [{k: group[k] for k in ("fused", "foreach", "capturable") if k in group}
            for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keep in zip(optimizer.param_groups, kept):
        group.update(keep)
