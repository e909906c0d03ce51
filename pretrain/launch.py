"""Start the training loop: in this process, under a child torchrun, or as Ray Train workers.

All three run :func:`pretrain.train.run_worker` on every worker; only who starts the workers
differs. Exit status of ``python -m pretrain``: 0 done, :data:`REQUEUE_EXIT_CODE` (75) preempted
after saving (rerun the same command to resume), anything else a failure.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys

from .config import Config, ConfigError, config_from_dict, config_to_dict, save_config, validate
from .distributed import inside_launched_worker, world_info_from_env
from .train import REQUEUE_EXIT_CODE, REQUEUE_MARKER, run_worker

__all__ = ["check_batch_split", "launch", "launch_ray", "launch_torchrun", "launch_world_size", "preflight", "run_local"]

_logger = logging.getLogger(__name__)

_FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _absolute(config: Config) -> Config:
    """Workers may start in another directory (Ray): make local paths absolute."""
    config = dataclasses.replace(config, run_dir=os.path.abspath(config.run_dir))
    data = config.data
    updates = {"demo_dir": os.path.abspath(data.demo_dir)}
    for key in ("train_urls", "val_urls"):
        value = getattr(data, key)
        if value and "://" not in value and not value.startswith("/"):
            updates[key] = os.path.abspath(value)
    if config.model.init_from and "://" not in config.model.init_from:
        config.model = dataclasses.replace(config.model, init_from=os.path.abspath(config.model.init_from))
    config.data = dataclasses.replace(data, **updates)
    return config


def _requeue_requested(config: Config) -> bool:
    return os.path.exists(os.path.join(config.run_dir, REQUEUE_MARKER))


def run_local(config: Config) -> int:
    """This process is a worker (alone, or one rank under torchrun/srun): train and return the exit status."""
    result = run_worker(config)
    if result.status == "preempted" and not inside_launched_worker():
        return REQUEUE_EXIT_CODE
    return 0


def launch_torchrun(config: Config) -> int:
    """Run ``launch.num_workers`` ranks on this node under torchrun; forward preemption signals to them."""
    config = _absolute(config)
    config_path = os.path.join(config.run_dir, "launch_config.json")
    save_config(config, config_path)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={config.launch.num_workers}",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=900",
        "-m", "pretrain", "train", "--config", config_path,
    ]
    _logger.info("starting: %s", " ".join(command))
    child = subprocess.Popen(command)
    previous = {sig: signal.signal(sig, lambda signum, frame: child.send_signal(signum)) for sig in _FORWARDED_SIGNALS}
    try:
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if _requeue_requested(config):
        return REQUEUE_EXIT_CODE
    return status


def _ray_train_loop(config_dict: dict) -> None:
    """The function every Ray Train worker runs (Ray has created the process group already)."""
    import ray.train

    result = run_worker(validate(config_from_dict(config_dict)))
    ray.train.report({"step": result.step,
                      "preempted": result.status == "preempted", **result.eval})


def launch_ray(config: Config):
    """Run ``launch.num_workers`` Ray Train workers (GPUs when ``launch.device`` allows) on a Ray cluster:
    ``launch.ray_address``, the one this process is already connected to, or a new local one."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    config = _absolute(config)
    if not ray.is_initialized():
        ray.init(address=config.launch.ray_address or None)
    use_gpu = config.launch.device == "cuda" or (
        config.launch.device == "auto" and ray.cluster_resources().get("GPU", 0) >= config.launch.num_workers)
    if not use_gpu:
        config.launch = dataclasses.replace(config.launch, device="cpu")
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config=config_to_dict(config),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.launch.num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name="ray_train", storage_path=os.path.join(config.run_dir, "ray"),
                             failure_config=FailureConfig(max_failures=0)),
    )
    return trainer.fit()


def launch_world_size(config: Config) -> int:
    """The number of ranks this launch will run: ``launch.num_workers`` for torchrun and Ray, the
    environment's world size (torchrun, srun, or 1) for a process that is itself a worker."""
    if inside_launched_worker() or config.launch.launcher == "local":
        return world_info_from_env().world_size
    return config.launch.num_workers


def check_batch_split(config: Config, world_size: int) -> None:
    """The global batch must split into micro-batches over ``world_size`` ranks (ConfigError otherwise)."""
    train = config.train
    if train.global_batch_size % (train.micro_batch_size * world_size):
        raise ConfigError("train.global_batch_size", f"{train.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size x world size ({train.micro_batch_size} x {world_size}): "
                          "change the global batch, the micro-batch or the number of workers")


def preflight(config: Config) -> None:
    """Check what can be checked before any worker starts or any model is built: the batch splits over
    the launch's world size, the shards exist and have ``info.json`` counts, their classes fit the
    classifier, ``model.init_from`` exists. Raises ``ConfigError`` naming the key."""
    check_batch_split(config, launch_world_size(config))
    data = config.data
    if data.source == "shards":
        from shards.info import ShardReadError, resolve_shard_set

        for key in ("train_urls", "val_urls"):
            spec = getattr(data, key)
            if not spec:
                continue
            try:
                shard_set = resolve_shard_set(spec, require_counts=key == "val_urls" or data.samples_per_epoch is None)
            except (FileNotFoundError, ValueError, ShardReadError) as error:
                raise ConfigError(f"data.{key}", str(error)) from error
            if shard_set.classes and len(shard_set.classes) > config.model.num_classes:
                raise ConfigError("model.num_classes", f"expected at least the {len(shard_set.classes)} classes of "
                                  f"data.{key} ({spec}), got {config.model.num_classes}")
    init_from = config.model.init_from
    if init_from and "://" not in init_from and not os.path.isfile(init_from):
        raise ConfigError("model.init_from", f"no such file: {init_from}")


def launch(config: Config) -> int:
    """Dispatch on ``launch.launcher``; a process started by torchrun always runs as a worker."""
    preflight(config)
    if inside_launched_worker() or config.launch.launcher == "local":
        return run_local(config)
    if config.launch.launcher == "torchrun":
        return launch_torchrun(config)
    launch_ray(config)
    return REQUEUE_EXIT_CODE if _requeue_requested(_absolute(config)) else 0
