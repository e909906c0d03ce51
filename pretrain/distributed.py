"""Who am I in the job (torchrun, Slurm, Ray Train, or alone), and the collectives the trainer needs."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = [
    "WorldInfo",
    "all_gather_object",
    "all_reduce_sum",
    "averaged_batchnorm_buffers",
    "barrier",
    "batchnorm_buffers",
    "broadcast_object",
    "inside_launched_worker",
    "pick_device",
    "world_info_from_env",
]


@dataclass(frozen=True, slots=True)
class WorldInfo:
    """Global rank, local rank (GPU index on the node) and world size."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_info_from_env() -> WorldInfo:
    """Rank and size from torchrun / Ray Train (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), else Slurm
    (``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``), else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorldInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return WorldInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]))
    return WorldInfo()


def pick_device(choice: str, world: WorldInfo) -> torch.device:
    """The device of ``launch.device`` (``auto``, ``cuda``, ``cpu``) for this rank: its local GPU, or the CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("launch.device=cuda but no CUDA device is visible")
        index = world.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def inside_launched_worker() -> bool:
    """True in a worker started by torchrun (it sets ``TORCHELASTIC_RUN_ID``)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(value, src: int = 0):
    """Rank ``src``'s ``value`` on every rank (picklable Python data; returned as is when alone)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        holder = [value]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]
    return value


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over ranks in place (no-op for a single process) and return it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_object(value) -> list:
    """Every rank's ``value`` (picklable Python data), in rank order, on every rank."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = [None] * dist.get_world_size()
        dist.all_gather_object(values, value)
        return values
    return [value]


def batchnorm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The running mean and variance of every BatchNorm layer, by state-dict name (the live tensors)."""
    return {f"{name}.{kind}": getattr(module, kind) for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            for kind in ("running_mean", "running_var") if getattr(module, kind) is not None}


@contextlib.contextmanager
def averaged_batchnorm_buffers(model: nn.Module) -> Iterator[int]:
    """Inside: every rank holds the average over ranks of the BatchNorm running statistics (rank 0's
    result everywhere); afterwards each rank holds its own statistics again, bit for bit.

    DeepSpeed synchronizes gradients, never buffers, so each rank's statistics follow its own data.
    Evaluation and checkpoints use the average (the model a single process would have, up to
    rounding; averaging per-rank variances ignores the spread of the per-rank means, the usual
    approximation, as in timm's ``distribute_bn(reduce=True)``). Training keeps each rank's own
    statistics: the update is linear, so averaging what is evaluated or saved equals averaging the
    live buffers, and when saves and evaluations happen never changes the trajectory (a run resumed
    after a preemption save stays bit-identical to one that was never interrupted). Yields the number
    of buffers averaged.
    """
    buffers = list(batchnorm_buffers(model).values())
    if not buffers or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield len(buffers)
        return
    own = [buffer.detach().clone() for buffer in buffers]
    flat = torch.cat([b.detach().reshape(-1).double() for b in buffers])  # one rounding, to the buffer's dtype
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    dist.broadcast(flat, src=0)
    _copy_into(buffers, flat.split([b.numel() for b in buffers]))
    try:
        yield len(buffers)
    finally:
        _copy_into(buffers, own)


@torch.no_grad()
def _copy_into(targets: list[torch.Tensor], values) -> None:
    for target, value in zip(targets, values):
        target.copy_(value.view_as(target))
