"""Everything that touches DeepSpeed: process group, engine, checkpoints, ZeRO consolidation.

Checkpoint layout under ``RUN_DIR/checkpoints``::

    step_00001000/               one DeepSpeed tag: model, ZeRO optimizer partitions, lr scheduler
        trainer_rank00000.pt     per rank: step, data-loader position, RNG states, EMA (partition)
        ...
    latest                       the tag of the newest *complete* checkpoint

``latest`` is replaced atomically (temporary file, fsync, rename) only after every rank has
written and flushed its files, so a kill at any moment leaves it pointing at a whole checkpoint.
"""
from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import re
import shutil
import socket

import torch
import torch.nn as nn

from .config import OptimConfig, TrainConfig
from .distributed import WorldInfo, barrier, world_info_from_env

__all__ = [
    "CHECKPOINT_PREFIX",
    "build_deepspeed_config",
    "consolidated_state_dict",
    "ema_targets",
    "find_checkpoint",
    "global_grad_norm",
    "initialize",
    "init_distributed",
    "load_checkpoint",
    "read_rank_states",
    "save_checkpoint",
    "shutdown_distributed",
]

_logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
_RANK_FILE = "trainer_rank{rank:05d}.pt"
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


def _tag(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_own_files(folder: str, rank: int) -> None:
    """Flush this rank's files (rank 0 also flushes the shared ones) so ``latest`` never outruns the data."""
    own = re.compile(rf"(?:^|_)rank_?0*{rank}(?:_|\.)")
    for root, _, files in os.walk(folder):
        for name in files:
            rank_named = re.search(r"rank_?\d+", name) and not name.startswith("mp_rank_")
            if own.search(name) or (rank == 0 and not rank_named):
                _fsync_path(os.path.join(root, name))


def _write_latest(root: str, tag: str) -> None:
    tmp = os.path.join(root, f".latest.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, "latest"))
    _fsync_path(root)


def _checkpoint_steps(root: str) -> list[int]:
    if not os.path.isdir(root):
        return []
    pattern = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
    return sorted(int(m.group(1)) for m in map(pattern.match, os.listdir(root)) if m)


def save_checkpoint(engine, root: str, step: int, rank_state: dict, world: WorldInfo, keep: int) -> str:
    """All ranks: write the DeepSpeed checkpoint and this rank's trainer state, flush, then (rank 0)
    point ``latest`` at it and delete all but the newest ``keep`` up to ``step``. Returns the folder."""
    tag = _tag(step)
    folder = os.path.join(root, tag)
    engine.save_checkpoint(root, tag=tag, client_state={"step": step}, save_latest=False)
    torch.save(rank_state, os.path.join(folder, _RANK_FILE.format(rank=world.rank)))
    _fsync_own_files(folder, world.rank)
    barrier()
    if world.is_main:
        _write_latest(root, tag)
        # Folders past this step are leftovers of an interrupted (or abandoned) timeline: never
        # counted among the newest, so they cannot push a complete checkpoint out.
        for old in [s for s in _checkpoint_steps(root) if s <= step][:-keep]:
            shutil.rmtree(os.path.join(root, _tag(old)), ignore_errors=True)
    barrier()
    return folder


def find_checkpoint(root: str, resume: str) -> str | None:
    """The checkpoint folder to resume from: ``latest`` (None if the run has none yet), ``none``, or a path."""
    if resume == "none":
        return None
    if resume == "latest":
        latest = os.path.join(root, "latest")
        if not os.path.isfile(latest):
            return None
        with open(latest) as f:
            return os.path.join(root, f.read().strip())
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"checkpoint.resume: no checkpoint folder at {resume!r}")
    return resume


def load_checkpoint(engine, folder: str, world: WorldInfo) -> dict:
    """Restore model, optimizer and scheduler into ``engine``; return this rank's trainer state."""
    rank_file = os.path.join(folder, _RANK_FILE.format(rank=world.rank))
    if not os.path.isfile(rank_file):
        saved = len([n for n in os.listdir(folder) if n.startswith("trainer_rank")])
        raise RuntimeError(f"{folder} was written by {saved} ranks; this run has {world.world_size}. "
                           "Exact resume needs the same world size (data position and ZeRO partitions are per rank)")
    root, tag = os.path.split(os.path.normpath(folder))
    path, _ = engine.load_checkpoint(root, tag=tag, load_module_strict=True, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder}")
    state = torch.load(rank_file, map_location="cpu", weights_only=False)
    if state["world_size"] != world.world_size:
        raise RuntimeError(f"{folder} was written by {state['world_size']} ranks; this run has {world.world_size}")
    return state


def read_rank_states(folder: str) -> list[dict]:
    """Every rank's trainer state in a checkpoint folder, in rank order."""
    names = sorted(n for n in os.listdir(folder) if n.startswith("trainer_rank"))
    return [torch.load(os.path.join(folder, n), map_location="cpu", weights_only=False) for n in names]


def consolidated_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict (parameters and buffers) from a checkpoint of any ZeRO stage, on CPU."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, tag = os.path.split(os.path.normpath(folder))
    with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 prints its progress
        state_dict = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    return {name: tensor.detach().cpu().clone() for name, tensor in state_dict.items()}

