"""Who am I in the job (torchrun, Slurm, Ray Train, or alone), and the collectives the trainer needs."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = [
    "WorldInfo",
    "all_reduce_batchnorm_buffers",
    "all_reduce_sum",
    "barrier",
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


@torch.no_grad()
def all_reduce_batchnorm_buffers(model: nn.Module) -> int:
    """Average BatchNorm running mean and variance over ranks, then copy rank 0's result everywhere.

    DeepSpeed synchronizes gradients, never buffers, so each rank's BatchNorm statistics drift
    apart on its own data. The trainer calls this before every evaluation and every checkpoint:
    all ranks, and every saved checkpoint, hold the same statistics. (Averaging per-rank variances
    ignores the spread of the per-rank means: the usual approximation, as in timm's
    ``distribute_bn(reduce=True)``.) Returns the number of buffers synchronized.
    """
    buffers = [
        buffer for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for buffer in (module.running_mean, module.running_var) if buffer is not None
    ]
    if not buffers or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return len(buffers)
    flat = torch.cat([b.reshape(-1).float() for b in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    dist.broadcast(flat, src=0)
    offset = 0
    for buffer in buffers:
        n = buffer.numel()
        buffer.copy_(flat[offset:offset + n].view_as(buffer))
        offset += n
    return len(buffers)
