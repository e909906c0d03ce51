"""Start the training loop: in this process, under a child torchrun (one node or several), or as Ray
Train workers.

Every launcher runs one :class:`WorkerEntry` on every worker (by default this package's
:func:`pretrain.train.run_worker`; the fine-tune stages pass their own); only who starts the
workers differs. Exit status of ``python -m pretrain``: 0 done, :data:`REQUEUE_EXIT_CODE` (75)
preempted after saving (rerun the same command to resume), anything else a failure.

Preemption reaches every worker however it was launched: a signal to this process is forwarded
(torchrun) or turned into ``RUN_DIR/STOP`` (Ray Train, whose workers run the loop off the main
thread), which every rank checks each step.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from typing import Callable

from .config import Config, ConfigError, config_from_dict, config_to_dict, save_config, validate
from .distributed import inside_launched_worker, world_info_from_env
from .driver_signals import reclaim_stop_signals, stop_file_requests
from .local_ray import LocalRayCluster
from .metrics import init_logging
from .preemption import PREEMPTION_SIGNALS, REQUEUE_EXIT_CODE, REQUEUE_MARKER, STOP_FILE
from .train import run_worker
from .trainer import TrainResult

__all__ = ["WorkerEntry", "check_batch_split", "launch", "launch_ray", "launch_torchrun", "launch_world_size",
           "preflight", "run_local"]

_logger = logging.getLogger(__name__)

_FORWARDED_SIGNALS = (*PREEMPTION_SIGNALS, signal.SIGINT)


@dataclass(frozen=True, slots=True)
class WorkerEntry:
    """What a launched worker runs: ``python MODULE_ARGS --config CONFIG.json`` under torchrun, and
    ``function(config)`` in a Ray Train worker (a module-level function, so Ray can ship it)."""

    module_args: tuple[str, ...] = ("-m", "pretrain", "train")
    function: Callable[[Config], TrainResult] = run_worker


def _absolute(config: Config) -> Config:
    """Workers may start in another directory (Ray, other nodes): make local paths absolute (the core's and
    the task's ``path_keys``). Returns a copy."""
    from .registry import get_task

    config = config_from_dict(config_to_dict(config))
    keys = ("run_dir", "model.init_from", "model.weights", *get_task(config.task).path_keys)
    if config.checkpoint.resume not in ("latest", "none"):
        keys += ("checkpoint.resume",)
    for key in keys:
        *sections, name = key.split(".")
        holder = config
        for section in sections:
            holder = getattr(holder, section)
        path = getattr(holder, name)
        if path and "://" not in path and not os.path.isabs(path):
            setattr(holder, name, os.path.abspath(path))
    return config


def _requeue_requested(config: Config) -> bool:
    return os.path.exists(os.path.join(config.run_dir, REQUEUE_MARKER))


def run_local(config: Config, entry: WorkerEntry = WorkerEntry()) -> int:
    """This process is a worker (alone, or one rank under torchrun/srun): train and return the exit status."""
    result = entry.function(config)
    if result.status == "preempted" and not inside_launched_worker():
        return REQUEUE_EXIT_CODE
    return 0


def torchrun_command(config: Config, config_path: str, entry: WorkerEntry = WorkerEntry()) -> list[str]:
    """The torchrun command line for this node: ``--standalone`` on one node, a c10d rendezvous on several."""
    launch = config.launch
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launch.num_workers // launch.nodes}"]
    if launch.nodes == 1:
        command.append("--standalone")
    else:
        rdzv_id = launch.rdzv_id or os.environ.get("SLURM_JOB_ID") or uuid.uuid5(uuid.NAMESPACE_URL, config.run_dir).hex
        command += [f"--nnodes={launch.nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={launch.rdzv_endpoint}",
                    f"--rdzv-id={rdzv_id}"]
    return command + ["--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=900",
                      *entry.module_args, "--config", config_path]


def launch_torchrun(config: Config, entry: WorkerEntry = WorkerEntry()) -> int:
    """Run this node's ranks under torchrun (``launch.nodes`` nodes, each started with the same command);
    forward preemption signals to it."""
    config = _absolute(config)
    config_path = os.path.join(config.run_dir, "launch_config.json")
    save_config(config, config_path)
    command = torchrun_command(config, config_path, entry)
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


def _ray_train_loop(loop_config: dict) -> None:
    """What every Ray Train worker runs (Ray has created the process group already).

    A worker group restarted after a failure must continue from the newest checkpoint, not from a
    ``checkpoint.resume`` folder given for the first attempt: rank 0 (whose choice every rank takes,
    see :func:`pretrain.checkpoint.choose_checkpoint`) switches to ``latest`` when this fit's attempt
    marker already exists.
    """
    import ray.train

    config = validate(config_from_dict(loop_config["config"]))
    marker = loop_config["attempt_marker"]
    rank = ray.train.get_context().get_world_rank()
    init_logging(rank, os.path.join(config.run_dir, "train.log"))
    if rank == 0:
        if os.path.exists(marker):
            _logger.warning("Ray Train restarted the workers: resuming from the newest checkpoint")
            config.checkpoint = dataclasses.replace(config.checkpoint, resume="latest")
        else:
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            with open(marker, "w") as f:
                f.write("started\n")
    result = loop_config["function"](config)
    ray.train.report({"step": result.step, "preempted": result.status == "preempted", **result.eval})


def _ray_use_gpu(config: Config, cluster_gpus: float) -> bool:
    device = config.launch.device
    if device == "cuda":
        return True
    if device == "cpu":
        return False
    if cluster_gpus > 0:
        return True
    raise ConfigError("launch.device", "auto found no GPU in the Ray cluster: pass launch.device=cuda to wait "
                      "for GPU workers (an autoscaling cluster adds them) or launch.device=cpu to train on CPUs")


def launch_ray(config: Config, entry: WorkerEntry = WorkerEntry()):
    """Run ``launch.num_workers`` Ray Train workers on a Ray cluster: ``launch.ray_address``, the one this
    process is connected to, ``RAY_ADDRESS``, or a :class:`~pretrain.local_ray.LocalRayCluster` started for
    this launch (outside this process group, stopped when the launch ends). Each worker reserves
    ``1 + loader.num_workers`` CPUs (its loader processes) and a GPU unless ``launch.device=cpu``; a dead
    worker or node restarts the group, which resumes from ``latest``, up to ``launch.max_failures`` times.
    SIGTERM / SIGUSR1 to this process write ``RUN_DIR/STOP`` (:mod:`pretrain.driver_signals`; a stop file
    an earlier run left is removed first): the workers checkpoint and the launch returns for requeue."""
    config = _absolute(config)
    with stop_file_requests(os.path.join(config.run_dir, STOP_FILE)):
        import ray

        launch = config.launch
        cpus = launch.cpus_per_worker or 1 + config.loader.num_workers
        local_cluster = None
        try:
            if not ray.is_initialized():
                address = launch.ray_address or os.environ.get("RAY_ADDRESS")
                if address:
                    ray.init(address=address)
                else:  # enough logical CPUs for every worker's reservation
                    local_cluster = LocalRayCluster(num_cpus=max(os.cpu_count() or 1, cpus * launch.num_workers),
                                                    log_path=os.path.join(config.run_dir, "ray", "local_cluster.log"))
                    local_cluster.start()
                    local_cluster.connect()
            reclaim_stop_signals()  # ray.init put Ray's abort-on-SIGTERM handler in their place
            return _fit_on_ray(config, entry, cpus)
        finally:
            if local_cluster is not None:
                ray.shutdown()
                local_cluster.stop()


def _fit_on_ray(config: Config, entry: WorkerEntry, cpus: int):
    """The Ray Train fit on the cluster this process is connected to."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    launch = config.launch
    resources = ray.cluster_resources()
    use_gpu = _ray_use_gpu(config, resources.get("GPU", 0))
    config.launch = dataclasses.replace(launch, device="cuda" if use_gpu else "cpu")
    per_worker = {"CPU": cpus, **({"GPU": 1} if use_gpu else {})}
    for name, amount in per_worker.items():
        if resources.get(name, 0) < amount * launch.num_workers:
            _logger.warning("the Ray cluster has %g %s now; %d workers need %g: waiting for the cluster to grow",
                            resources.get(name, 0), name, launch.num_workers, amount * launch.num_workers)
    fit_id = uuid.uuid4().hex
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={"config": config_to_dict(config), "function": entry.function,
                           "attempt_marker": os.path.join(config.run_dir, "ray", f"attempt-{fit_id}")},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=launch.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name=f"ray_train-{fit_id[:8]}", storage_path=os.path.join(config.run_dir, "ray"),
                             failure_config=FailureConfig(max_failures=launch.max_failures)),
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
    the launch's world size, ``model.init_from`` exists, and the task's own inputs (``TaskSpec.preflight``:
    shards, dataset folders). Raises ``ConfigError`` naming the key."""
    from .registry import get_task

    check_batch_split(config, launch_world_size(config))
    init_from = config.model.init_from
    if init_from and "://" not in init_from and not os.path.isfile(init_from):
        raise ConfigError("model.init_from", f"no such file: {init_from}")
    spec = get_task(config.task)
    if spec.preflight is not None:
        spec.preflight(config)


def launch(config: Config, entry: WorkerEntry = WorkerEntry()) -> int:
    """Dispatch on ``launch.launcher``; a process started by torchrun always runs as a worker."""
    preflight(config)
    if inside_launched_worker() or config.launch.launcher == "local":
        return run_local(config, entry)
    if config.launch.launcher == "torchrun":
        return launch_torchrun(config, entry)
    launch_ray(config, entry)
    return REQUEUE_EXIT_CODE if _requeue_requested(_absolute(config)) else 0
