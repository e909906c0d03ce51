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
    finetune_ade20k
                  UperNet on the exported backbone (Ray Train), preset ``ade20k_xl_upernet_640_160k``
                  unless told otherwise; data from ``--data`` / UNIREPLKNET_ADE20K_ROOT, backbone from
                  ``--init`` / UNIREPLKNET_BACKBONE (default: the export stage's file); exit 75 when preempted.
    finetune_coco Cascade Mask R-CNN on the exported backbone (Ray Train), preset ``coco_xl_cascade_3x``
                  unless told otherwise; data from ``--data`` / UNIREPLKNET_COCO_ROOT, backbone as above.

Environment (arguments win over it):
    UNIREPLKNET_RUN_ROOT      where stage run directories live (default ``runs``): RUN_ROOT/NAME
    UNIREPLKNET_TRAIN_SHARDS  training shards (``data.train_urls``), any fsspec URL
    UNIREPLKNET_VAL_SHARDS    validation shards (``data.val_urls``)
    UNIREPLKNET_NUM_WORKERS   Ray Train workers (default: the cluster's GPUs)
    UNIREPLKNET_ADE20K_ROOT   the ADEChallengeData2016 folder or URL (``ade20k.data_root``)
    UNIREPLKNET_COCO_ROOT     the COCO 2017 folder or URL (``coco.data_root``)
    UNIREPLKNET_BACKBONE      backbone weights for the fine-tunes (default RUN_ROOT/export/export/backbone.pth)
    RAY_ADDRESS               the Ray cluster to drive
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from pretrain.driver_signals import catch_stop_signals

__all__ = ["ENVIRONMENT", "STAGES", "main", "run_stage", "stage_run_dir"]

_logger = logging.getLogger(__name__)

ENVIRONMENT = {
    "UNIREPLKNET_RUN_ROOT": "where stage run directories live (default: runs)",
    "UNIREPLKNET_TRAIN_SHARDS": "training shards (data.train_urls)",
    "UNIREPLKNET_VAL_SHARDS": "validation shards (data.val_urls)",
    "UNIREPLKNET_NUM_WORKERS": "Ray Train workers (default: the cluster's GPUs)",
    "UNIREPLKNET_ADE20K_ROOT": "the ADEChallengeData2016 folder or URL (ade20k.data_root)",
    "UNIREPLKNET_COCO_ROOT": "the COCO 2017 folder or URL (coco.data_root)",
    "UNIREPLKNET_BACKBONE": "backbone weights for the fine-tunes (default: RUN_ROOT/export/export/backbone.pth)",
    "RAY_ADDRESS": "the Ray cluster to drive (default: a new local one)",
}
COMPLETE_MARKER = "COMPLETE"
PRETRAIN_PRESET = "xl_in22k_384"
ADE20K_PRESET = "ade20k_xl_upernet_640_160k"
COCO_PRESET = "coco_xl_cascade_3x"
FINETUNES = {"finetune_ade20k": ("ade20k", ADE20K_PRESET, "UNIREPLKNET_ADE20K_ROOT"),
             "finetune_coco": ("coco", COCO_PRESET, "UNIREPLKNET_COCO_ROOT")}
"""Fine-tune stage -> (task, default preset, data-root variable)."""


def stage_run_dir(name: str, run_dir: str | None = None) -> str:
    """``run_dir``, else ``$UNIREPLKNET_RUN_ROOT/NAME`` (``runs/NAME``), absolute."""
    return os.path.abspath(run_dir or os.path.join(os.environ.get("UNIREPLKNET_RUN_ROOT", "runs"), name))


def _pretrain_config(args: argparse.Namespace, run_dir: str):
    from pretrain.config import load_config

    overrides = [f"run_dir={run_dir}", "launch.launcher=ray"]
    for variable, key in (("UNIREPLKNET_TRAIN_SHARDS", "data.train_urls"), ("UNIREPLKNET_VAL_SHARDS", "data.val_urls")):
        if os.environ.get(variable):
            overrides += ["data.source=shards", f"{key}={os.environ[variable]}"]
    if os.environ.get("UNIREPLKNET_NUM_WORKERS"):
        overrides.append(f"launch.num_workers={int(os.environ['UNIREPLKNET_NUM_WORKERS'])}")
    return load_config(args.config or PRETRAIN_PRESET, overrides + list(args.overrides))


def default_backbone() -> str:
    """Where the export stage writes the backbone (``RUN_ROOT/export/export/backbone.pth``)."""
    return os.path.join(stage_run_dir("export"), "export", "backbone.pth")


def _finetune_config(name: str, args: argparse.Namespace, run_dir: str):
    from pretrain.config import load_config

    task, preset, variable = FINETUNES[name]
    overrides = [f"run_dir={run_dir}", "launch.launcher=ray", f"task={task}"]
    data = args.data or os.environ.get(variable)
    if data:
        overrides += [f"{task}.data_root={data}", f"{task}.generate_demo=false"]
    overrides.append(f"model.init_from={args.init or os.environ.get('UNIREPLKNET_BACKBONE') or default_backbone()}")
    if os.environ.get("UNIREPLKNET_NUM_WORKERS"):
        overrides.append(f"launch.num_workers={int(os.environ['UNIREPLKNET_NUM_WORKERS'])}")
    return load_config(args.config or preset, overrides + list(args.overrides))


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
    return _train_on_ray("pretrain_xl", _pretrain_config(args, run_dir), args)


def _finetune(name: str, args: argparse.Namespace, run_dir: str) -> int:
    config = _finetune_config(name, args, run_dir)
    if not args.dry_run and not os.path.isfile(config.model.init_from) and "://" not in config.model.init_from:
        raise SystemExit(f"{name}: no backbone at {config.model.init_from} (run the export stage first, "
                         "or pass --init / UNIREPLKNET_BACKBONE)")
    return _train_on_ray(name, config, args)


def finetune_ade20k(args: argparse.Namespace, run_dir: str) -> int:
    """UperNet fine-tuning through Ray Train on the exported backbone; resumes from ``latest``; 75 when preempted."""
    return _finetune("finetune_ade20k", args, run_dir)


def finetune_coco(args: argparse.Namespace, run_dir: str) -> int:
    """Cascade Mask R-CNN fine-tuning through Ray Train on the exported backbone; resumes from ``latest``; 75
    when preempted."""
    return _finetune("finetune_coco", args, run_dir)


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
    with open(os.path.join(run_dir, "export", "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    _logger.info("exported %s -> %s", folder, out)
    return 0


STAGES = {"pretrain_xl": pretrain_xl, "export": export, "finetune_coco": finetune_coco,
          "finetune_ade20k": finetune_ade20k}


def _stage_identity(name: str, args: argparse.Namespace, run_dir: str) -> dict:
    """What a completed run of the stage is recognised by: its config (pretraining) or arguments."""
    if name == "pretrain_xl" or name in FINETUNES:
        from pretrain.config import config_to_dict

        config = config_to_dict(_pretrain_config(args, run_dir) if name == "pretrain_xl"
                                else _finetune_config(name, args, run_dir))
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
    status = STAGES[name](args, run_dir)
    if status == 0 and not args.dry_run:
        os.makedirs(run_dir, exist_ok=True)
        with open(marker, "w") as f:
            json.dump({"stage": name, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "identity": identity}, f)
            f.write("\n")
    return status


def build_parser() -> argparse.ArgumentParser:
    environment = "\n".join(f"  {name:26s}{text}" for name, text in ENVIRONMENT.items())
    parser = argparse.ArgumentParser(prog="python -m cluster.stage", description=__doc__.split("\n\n")[0],
                                     epilog=f"environment:\n{environment}\n\nexit status: 0 done (or already "
                                     "complete), 75 preempted after a checkpoint (rerun to resume), 2 bad "
                                     "arguments or config", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=sorted(STAGES), help="the stage to run")
    parser.add_argument("--run-dir", help="this stage's run directory (default: $UNIREPLKNET_RUN_ROOT/STAGE)")
    parser.add_argument("--config", help=f"preset or JSON config (default {PRETRAIN_PRESET} for pretrain_xl, "
                        f"{ADE20K_PRESET} for finetune_ade20k, {COCO_PRESET} for finetune_coco)")
    parser.add_argument("--data", help="fine-tunes: the dataset root (default: $UNIREPLKNET_ADE20K_ROOT or "
                        "$UNIREPLKNET_COCO_ROOT, else the preset's)")
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
