"""Everything that touches DeepSpeed's engine: process group, DeepSpeed config, engine, ZeRO tensors.

Checkpoints (layout, atomic saves, resume decisions, consolidation) live in :mod:`pretrain.checkpoint`.
"""
from __future__ import annotations

import atexit
import logging
import os
import socket

import torch
import torch.nn as nn

from .config import OptimConfig, TrainConfig
from .distributed import WorldInfo, world_info_from_env

__all__ = [
    "build_deepspeed_config",
    "ema_targets",
    "global_grad_norm",
    "initialize",
    "init_distributed",
    "refresh_gathered_parameters",
    "shutdown_distributed",
]

_logger = logging.getLogger(__name__)

_ENV_BEFORE_INIT: dict[str, str | None] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: torch.device) -> WorldInfo:
    """Join the job's process group (creating a one-process group when run alone) through DeepSpeed.

    Under torchrun and Slurm the usual ``MASTER_ADDR``/``MASTER_PORT`` env is read; Ray Train has
    already created the group. A lone process gets a loopback rendezvous on a free port.

    A group created here lives until interpreter exit: DeepSpeed caches its groups at module level,
    so a second Trainer in the same process (a notebook, the test suite) must find it again.
    """
    import deepspeed
    import torch.distributed as dist

    world = world_info_from_env()
    env = {key: value for key, value in
           dict(RANK=str(world.rank), LOCAL_RANK=str(world.local_rank), WORLD_SIZE=str(world.world_size)).items()
           if key not in os.environ}  # DeepSpeed reads these again in deepspeed.initialize
    if not dist.is_initialized() and world.world_size == 1 and "MASTER_PORT" not in os.environ:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    _ENV_BEFORE_INIT.update({key: os.environ.get(key) for key in env if key not in _ENV_BEFORE_INIT})
    os.environ.update(env)
    if dist.is_initialized():
        deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False)
    else:
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
        atexit.register(_destroy_process_group)
    return WorldInfo(dist.get_rank(), world.local_rank, dist.get_world_size())


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def shutdown_distributed() -> None:
    """Put back the environment variables :func:`init_distributed` set, so child processes do not
    inherit them. The process group itself stays (see :func:`init_distributed`)."""
    for key, value in _ENV_BEFORE_INIT.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _ENV_BEFORE_INIT.clear()


def build_deepspeed_config(train: TrainConfig, optim: OptimConfig, world_size: int, device: torch.device) -> dict:
    """The DeepSpeed JSON config: batch split, ZeRO stage, clipping. Mixed precision is torch autocast,
    not DeepSpeed's bf16 mode (which casts BatchNorm and breaks it)."""
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise ValueError(f"train.global_batch_size ({train.global_batch_size}) is not a multiple of "
                         f"train.micro_batch_size x world size ({train.micro_batch_size} x {world_size})")
    on_gpu = device.type == "cuda"
    zero = {"stage": train.zero_stage}
    if train.zero_stage > 0:
        zero.update(contiguous_gradients=True, overlap_comm=on_gpu,
                    reduce_bucket_size=int(5e8), allgather_bucket_size=int(5e8))
    if train.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=int(1e5))
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.global_batch_size // per_step,
        "gradient_clipping": optim.clip_grad or 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, ds_config: dict):
    """Wrap model, client optimizer and per-step scheduler in a DeepSpeed engine (ZeRO per config)."""
    import deepspeed

    if ds_config["zero_optimization"]["stage"] == 3 and next(model.parameters()).dtype == torch.float64:
        # ``train.precision=fp64`` at ZeRO-3: DeepSpeed partitions the model through ``zero.Init(dtype=<the
        # parameters' dtype>)``, which asserts fp16/bf16/fp32 wherever the CPU accelerator reports fp16 support
        # (elsewhere it ignores the dtype). Partitioning first, with fp32 declared, keeps the float64 values:
        # converting existing parameters does not cast them.
        deepspeed.zero.Init(module=model, config_dict_or_path=ds_config, dtype=torch.float32)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return engine


def global_grad_norm(engine) -> float | None:
    """The gradient norm of the last optimizer step (before clipping), when DeepSpeed computed one."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


def ema_targets(engine) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    """The tensors this rank holds for every parameter (ZeRO-3: its partition) and every float buffer,
    with their full shapes."""
    targets, shapes = {}, {}
    for name, param in engine.module.named_parameters():
        if hasattr(param, "ds_tensor"):
            targets[name], shapes[name] = param.ds_tensor, tuple(param.ds_shape)
        else:
            targets[name], shapes[name] = param.data, tuple(param.shape)
    for name, buffer in engine.module.named_buffers():
        if buffer.is_floating_point():
            targets[name], shapes[name] = buffer, tuple(buffer.shape)
    return targets, shapes


def refresh_gathered_parameters(engine) -> None:
    """ZeRO-3: after values were written into the parameter partitions (``ds_tensor``, as EMA
    evaluation does), make the gathered copies follow, the way DeepSpeed does after an optimizer
    step: release every gathered parameter, then re-gather those kept whole on every rank (below
    ``stage3_param_persistence_threshold``), which forward passes would otherwise use stale.
    Collective; a no-op below stage 3."""
    optimizer = engine.optimizer
    if not hasattr(optimizer, "persistent_parameters"):
        return
    optimizer._partition_all_parameters()
    persistent = optimizer.persistent_parameters
    if persistent:
        persistent[0].all_gather(persistent)
