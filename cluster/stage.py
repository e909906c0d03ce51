"""``python -m cluster.stage NAME [--run-dir DIR] [--config PRESET] [--set key=value ...]``: one stage.

Every scheduler runs the same command: Slurm (``slurm/*.sh``), the Ray cluster launcher and
KubeRay only start the Ray cluster and set the environment. A stage is a Ray driver on the
cluster ``RAY_ADDRESS`` names (or a new local one). Rerunning a stage resumes it from its
``latest`` checkpoint; a stage that completed (``RUN_DIR/COMPLETE``) is skipped.

Stages:
    pretrain_xl   Ray Train, one worker per GPU, DeepSpeed ZeRO, preset ``xl_in22k_384`` (``--config``
                  for another); exit 75 when preempted after checkpointing (requeue and rerun).
    export        the pretraining run's latest checkpoint in the authors' key layout, for fine-tuning
                  (``RUN_DIR/export/backbone.pth``; EMA weights when the run kept them).
    finetune_TASK every registered fine-tuning task (``python -m finetune presets``): Ray Train on the
                  exported backbone, the task's paper-scale preset unless ``--config`` says otherwise; data
                  from ``--data`` or the task's environment variable, backbone from ``--init`` /
                  UNIREPLKNET_BACKBONE (default: the export stage's file); exit 75 when preempted.

``--help`` lists the stages and environment variables of the tasks registered here.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from typing import Callable

from pretrain.config import ConfigError
from pretrain.driver_signals import catch_stop_signals
from pretrain.registry import TaskSpec, find_preset, get_task, registered_tasks

__all__ = ["CORE_ENVIRONMENT", "environment", "main", "run_stage", "stage_run_dir", "stages"]

_logger = logging.getLogger(__name__)

CORE_ENVIRONMENT = {
    "UNIREPLKNET_RUN_ROOT": "where stage run directories live (default: runs)",
    "UNIREPLKNET_NUM_WORKERS": "Ray Train workers (default: the cluster's GPUs)",
    "UNIREPLKNET_BACKBONE": "backbone weights for the fine-tunes (default: RUN_ROOT/export/export/backbone.pth)",
    "RAY_ADDRESS": "the Ray cluster to drive (default: a new local one)",
    "UNIREPLKNET_TASKS": "modules of tasks defined outside the project, comma-separated (pretrain.registry)",
}
COMPLETE_MARKER = "COMPLETE"
PRETRAIN_PRESET = "xl_in22k_384"
FINETUNE_PREFIX = "finetune_"


def finetune_stages() -> dict[str, TaskSpec]:
    """Stage name -> task for every registered fine-tuning task with a cluster preset."""
    return {f"{FINETUNE_PREFIX}{name}": spec for name, spec in registered_tasks().items()
            if spec.downstream and spec.cluster_preset}


def environment() -> dict[str, str]:
    """Every variable the stages read -> what it sets (the core's and each registered task's)."""
    described = dict(CORE_ENVIRONMENT)
    for spec in registered_tasks().values():
        for variable, key in spec.environment.items():
            described[variable] = f"{key} (task {spec.name})"
    return dict(sorted(described.items()))


def stage_run_dir(name: str, run_dir: str | None = None) -> str:
    """``run_dir``, else ``$UNIREPLKNET_RUN_ROOT/NAME`` (``runs/NAME``), absolute."""
    return os.path.abspath(run_dir or os.path.join(os.environ.get("UNIREPLKNET_RUN_ROOT", "runs"), name))


def default_backbone() -> str:
    """Where the export stage writes the backbone (``RUN_ROOT/export/export/backbone.pth``)."""
    return os.path.join(stage_run_dir("export"), "export", "backbone.pth")


def _stage_config(args: argparse.Namespace, run_dir: str, default_preset: str, *, finetune: bool):
    """The stage's config: ``--config`` (else ``default_preset``), the environment and ``--data`` applied through
    the task's keys, then ``--set``."""
    from pretrain.config import load_config

    name = args.config or default_preset
    found = find_preset(name)
    spec = found[0] if found is not None else get_task(load_config(name).task)
    overrides = [f"run_dir={run_dir}", "launch.launcher=ray"]
    real_data = False
    for variable, key in spec.environment.items():
        if os.environ.get(variable):
            overrides.append(f"{key}={os.environ[variable]}")
            real_data = True
    if getattr(args, "data", None):
        if not spec.data_key:
            raise ConfigError("--data", f"task {spec.name} takes its data from its config (--set), not --data")
        overrides.append(f"{spec.data_key}={args.data}")
        real_data = True
    if real_data:
        overrides += spec.real_data_overrides
    if finetune:
        overrides.append(f"model.init_from={args.init or os.environ.get('UNIREPLKNET_BACKBONE') or default_backbone()}")
    if os.environ.get("UNIREPLKNET_NUM_WORKERS"):
        overrides.append(f"launch.num_workers={int(os.environ['UNIREPLKNET_NUM_WORKERS'])}")
    return load_config(name, overrides + list(args.overrides))


def _cluster_gpus() -> int:
    """The GPUs of the cluster ``RAY_ADDRESS`` names, else this machine's (the launch then starts a local
    cluster of this machine)."""
    if not os.environ.get("RAY_ADDRESS"):
        import torch

        return torch.cuda.device_count()
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ["RAY_ADDRESS"])
    return int(ray.cluster_resources().get("GPU", 0))


def _train_on_ray(name: str, config, args: argparse.Namespace) -> int:
    """One worker per GPU of the cluster unless the worker count was given; ``--dry-run`` prints the config."""
    import dataclasses

    from pretrain.config import config_to_dict
    from pretrain.launch import check_batch_split, launch

    explicit = os.environ.get("UNIREPLKNET_NUM_WORKERS") or any(o.startswith("launch.num_workers=")
                                                                for o in args.overrides)
    if not explicit and not args.dry_run:
        gpus = _cluster_gpus()
        if gpus == 0:
            raise SystemExit(f"{name}: the Ray cluster has no GPU; set launch.num_workers (and launch.device=cpu "
                             "to train on CPUs) or UNIREPLKNET_NUM_WORKERS")
        workers = max(w for w in range(1, gpus + 1)
                      if config.train.global_batch_size % (config.train.micro_batch_size * w) == 0)
        if workers < gpus:
            _logger.warning("%s: %d of the cluster's %d GPUs used: the global batch of %d at %d per GPU splits over "
                            "at most that many", name, workers, gpus, config.train.global_batch_size,
                            config.train.micro_batch_size)
        config.launch = dataclasses.replace(config.launch, num_workers=workers)
    if args.dry_run:
        check_batch_split(config, config.launch.num_workers)
        print(json.dumps(config_to_dict(config), indent=2))
        return 0
    return launch(config)


def pretrain_xl(args: argparse.Namespace, run_dir: str) -> int:
    """Pretraining through Ray Train; resumes from ``latest``; 75 when preempted."""
    return _train_on_ray("pretrain_xl", _stage_config(args, run_dir, PRETRAIN_PRESET, finetune=False), args)


def finetune(name: str, args: argparse.Namespace, run_dir: str) -> int:
    """Fine-tuning task ``finetune_TASK`` through Ray Train on the exported backbone; resumes from ``latest``;
    75 when preempted."""
    spec = finetune_stages()[name]
    config = _stage_config(args, run_dir, spec.cluster_preset, finetune=spec.pretrained_backbone or bool(args.init))
    if (config.model.init_from and not args.dry_run and not os.path.isfile(config.model.init_from)
            and "://" not in config.model.init_from):
        raise SystemExit(f"{name}: no backbone at {config.model.init_from} (run the export stage first, "
                         "or pass --init / UNIREPLKNET_BACKBONE)")
    return _train_on_ray(name, config, args)


def export(args: argparse.Namespace, run_dir: str) -> int:
    """The pretraining run's weights in the official layout: ``RUN_DIR/export/backbone.pth``."""
    from pretrain import checkpoint as ckpt
    from pretrain.export import export_checkpoint

    pretrain_dir = args.source or stage_run_dir("pretrain_xl")
    folder = ckpt.find_checkpoint(os.path.join(pretrain_dir, "checkpoints"))
    if folder is None:
        raise SystemExit(f"export: {pretrain_dir} has no checkpoint yet (run pretrain_xl first)")
    saved = ckpt.read_saved_config(folder) or {}
    ema = saved.get("train", {}).get("ema_decay") is not None
    out = os.path.join(run_dir, "export", "backbone.pth")
    if args.dry_run:
        print(json.dumps({"checkpoint": folder, "out": out, "ema": ema}, indent=2))
        return 0
    os.makedirs(os.path.dirname(out), exist_ok=True)
    summary = export_checkpoint(pretrain_dir, out, checkpoint=folder, ema=ema, official=True)
    from unireplknet.files import atomic_write_json

    atomic_write_json(os.path.join(run_dir, "export", "summary.json"), summary)
    _logger.info("exported %s -> %s", folder, out)
    return 0


def stages() -> dict[str, Callable[[argparse.Namespace, str], int]]:
    """Stage name -> function(args, run_dir): pretraining, export, and one stage per fine-tuning task."""
    table: dict[str, Callable[[argparse.Namespace, str], int]] = {"pretrain_xl": pretrain_xl, "export": export}
    for name in finetune_stages():
        table[name] = functools.partial(finetune, name)
    return table


def _stage_identity(name: str, args: argparse.Namespace, run_dir: str) -> dict:
    """What a completed run of the stage is recognised by: its config (training stages) or arguments."""
    if name == "pretrain_xl" or name in finetune_stages():
        from pretrain.config import config_to_dict

        config = config_to_dict(_stage_config(args, run_dir, PRETRAIN_PRESET, finetune=False) if name == "pretrain_xl"
                                else _stage_config(args, run_dir, finetune_stages()[name].cluster_preset, finetune=True))
        config.pop("launch")  # how many workers ran it does not change what was computed
        return {"config": config}
    return {"config": args.config, "source": args.source, "overrides": list(args.overrides)}


def run_stage(name: str, args: argparse.Namespace) -> int:
    """Run stage ``name``: skipped when ``RUN_DIR/COMPLETE`` records a finished run with the same settings,
    else run (resuming from ``latest``) and marked COMPLETE when it finishes."""
    run_dir = stage_run_dir(name, args.run_dir)
    marker = os.path.join(run_dir, COMPLETE_MARKER)
    identity = _stage_identity(name, args, run_dir)
    if os.path.exists(marker) and not args.dry_run:
        with open(marker) as f:
            done = json.load(f)
        if done.get("identity") == identity:
            _logger.info("stage %s is complete (%s): skipped; delete the file to run it again", name, marker)
            return 0
        _logger.info("stage %s completed before with other settings: running (resuming from latest)", name)
        os.remove(marker)
    status = stages()[name](args, run_dir)
    if status == 0 and not args.dry_run:
        from unireplknet.files import atomic_write_json

        atomic_write_json(marker, {"stage": name, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                   "identity": identity}, indent=None)
    return status


def build_parser() -> argparse.ArgumentParser:
    described = "\n".join(f"  {name:26s}{text}" for name, text in environment().items())
    finetunes = finetune_stages()
    defaults = ", ".join(f"{spec.cluster_preset} for {name}" for name, spec in finetunes.items())
    parser = argparse.ArgumentParser(prog="python -m cluster.stage", description=__doc__.split("\n\n")[0],
                                     epilog=f"{__doc__.split(chr(10) * 2, 1)[1]}\nenvironment:\n{described}\n\n"
                                     "exit status: 0 done (or already complete), 75 preempted after a checkpoint "
                                     "(rerun to resume), 2 bad arguments or config",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=sorted(stages()), help="the stage to run")
    parser.add_argument("--run-dir", help="this stage's run directory (default: $UNIREPLKNET_RUN_ROOT/STAGE)")
    parser.add_argument("--config", help=f"preset or JSON config (default {PRETRAIN_PRESET} for pretrain_xl"
                        f"{', ' + defaults if defaults else ''})")
    parser.add_argument("--data", help="fine-tunes: the dataset root (default: the task's environment variable, "
                        "else the preset's)")
    parser.add_argument("--init", help="fine-tunes: backbone weights (default: $UNIREPLKNET_BACKBONE, else the export "
                        "stage's RUN_ROOT/export/export/backbone.pth)")
    parser.add_argument("--source", help="export: the pretraining run directory (default: RUN_ROOT/pretrain_xl)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides, as for python -m pretrain")
    parser.add_argument("--dry-run", action="store_true", help="validate and print what would run, then exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    catch_stop_signals()  # first, before the slow imports: a stop request while starting is kept, not fatal
    from pretrain.checkpoint import CheckpointError
    from pretrain.config import ConfigError
    from pretrain.metrics import init_logging

    args = build_parser().parse_args(argv)
    init_logging(0)
    try:
        return run_stage(args.stage, args)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    except CheckpointError as error:
        print(f"checkpoint error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
