"""``python -m finetune ade20k|coco --config PRESET --data ROOT [--init CKPT] [--set key=value ...]``, ``make-demo-data``."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from pretrain.config import PRESETS, ConfigError, config_to_dict, load_config
from pretrain.metrics import init_logging

_EPILOG = """\
examples:
  python -m finetune make-demo-data ade20k data/ade20k_demo          # generated set, ADEChallengeData2016 layout
  python -m finetune make-demo-data coco data/coco_demo              # generated set, COCO 2017 layout
  python -m finetune ade20k --config ade20k_demo                     # tiny UperNet on it, CPU, minutes
  python -m finetune ade20k --config ade20k_demo --init runs/pipeline_demo/export/export/backbone.pth
  python -m finetune coco --config coco_demo                         # tiny Cascade Mask R-CNN, CPU, minutes
  python -m finetune predict runs/ade20k_demo photo.jpg --out predictions/
  python -m finetune bench --config coco_xl_cascade_3x               # s/iter and peak memory at 2 images/GPU
  python -m finetune coco --config coco_xl_cascade_3x --data /data/coco \\
      --init unireplknet_xl_in22k_pretrain.pth --set launch.launcher=torchrun launch.num_workers=8
  python -m finetune ade20k --config ade20k_xl_upernet_640_160k --data /data/ADEChallengeData2016 \\
      --init unireplknet_xl_in22k_pretrain.pth --set launch.launcher=torchrun launch.num_workers=8

Every `python -m pretrain` option works here (launchers, ZeRO 1/2, EMA, resume from RUN_DIR's latest
checkpoint when rerun); exit status 0 done, 75 preempted after saving (rerun to resume), 2 a bad config.
predict: stdout lists the PNGs written, stderr names each image it could not read (exit status 1), 2 a bad run.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m finetune", description=__doc__, epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{ade20k,coco,make-demo-data,predict,presets,bench}")
    for task in ("ade20k", "coco"):
        sub = commands.add_parser(task, help=f"fine-tune on {task.upper()}", epilog=_EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        presets = [n for n in PRESETS if n.startswith(task)]
        sub.add_argument("--config", default=f"{task}_demo",
                         help=f"a preset ({', '.join(presets) or 'none yet'}) or a JSON config file")
        sub.add_argument("--data", default=None, help="the dataset root (local path or fsspec URL)")
        sub.add_argument("--init", default=None, metavar="CKPT",
                         help="backbone weights: a `python -m pretrain export` file or an official checkpoint")
        sub.add_argument("--run-dir", default=None, help="where the run writes (default: the preset's)")
        sub.add_argument("--resume", default=None, metavar="latest|none|FOLDER", help="default latest")
        sub.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                         help="config overrides, e.g. train.steps=1000 ade20k.crop_size=512")
        sub.add_argument("--dry-run", action="store_true", help="validate, print the effective config, exit")
    demo = commands.add_parser("make-demo-data", help="write a generated dataset in the standard layout")
    demo.add_argument("task", choices=("ade20k", "coco"))
    demo.add_argument("out", help="output folder")
    demo.add_argument("--train-images", type=int, default=None, help="training images (default: the generator's)")
    demo.add_argument("--val-images", type=int, default=None, help="validation images")
    demo.add_argument("--seed", type=int, default=0)
    predict = commands.add_parser("predict", help="draw a fine-tuned run's predictions over images (PNG): segmentation colours, or "
                                  "detected boxes and masks")
    predict.add_argument("run_dir", help="the fine-tuning run directory (holds checkpoints/)")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--out", required=True, help="output folder for the PNGs")
    predict.add_argument("--checkpoint", default="latest", help="latest (default) or a checkpoint folder")
    predict.add_argument("--ema", action="store_true", help="use the EMA weights")
    predict.add_argument("--min-score", type=float, default=0.3, help="detection: draw boxes scoring at least this")
    commands.add_parser("presets", help="list the fine-tuning presets")
    commands.add_parser("bench", add_help=False, help="one training step of a dense preset at its per-GPU batch "
                        "on synthetic inputs: s/iter and peak memory (bench --help)")
    return parser


def task_overrides(task: str, data: str | None, init: str | None, run_dir: str | None,
                   resume: str | None) -> list[str]:
    """``--data/--init/--run-dir/--resume`` as config overrides (before the user's ``--set``)."""
    overrides = [f"task={task}"]
    if data:
        overrides += [f"{task}.data_root={data}", f"{task}.generate_demo=false"]
    if init:
        overrides.append(f"model.init_from={init}")
    if run_dir:
        overrides.append(f"run_dir={run_dir}")
    if resume:
        overrides.append(f"checkpoint.resume={resume}")
    return overrides


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from .bench import main as bench

        return bench(argv[1:])
    args = build_parser().parse_args(argv)
    init_logging(int(os.environ.get("RANK", "0")))
    if args.command == "presets":
        for name, make in PRESETS.items():
            if name.startswith(("ade20k", "coco")):
                print(f"{name:28s} {(make.__doc__ or '').strip().splitlines()[0]}")
        return 0
    if args.command == "predict":
        from .predict import predict_images

        try:
            with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints on import; stdout lists the PNGs only
                result = predict_images(args.run_dir, args.images, args.out, checkpoint=args.checkpoint,
                                        ema=args.ema, min_score=args.min_score)
        except (FileNotFoundError, ValueError) as error:
            print(f"predict error: {error}", file=sys.stderr)
            return 2
        for path, why in result.failed.items():
            print(f"predict: skipped {path}: {why}", file=sys.stderr)
        print("\n".join(result.written))
        return 1 if result.failed else 0
    if args.command == "make-demo-data":
        if args.task == "coco":
            from .coco.demo_data import write_demo
        else:
            from .ade20k.demo_data import write_demo

        sizes = {k: v for k, v in (("train_images", args.train_images), ("val_images", args.val_images)) if v}
        write_demo(args.out, seed=args.seed, **sizes)
        print(f"wrote the {'COCO' if args.task == 'coco' else 'ADE20K'}-layout demo set to {args.out}")
        return 0
    try:
        config = load_config(args.config, task_overrides(args.command, args.data, args.init, args.run_dir, args.resume)
                             + list(args.overrides))
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(config_to_dict(config), indent=2))
        return 0
    from pretrain.checkpoint import CheckpointError
    from pretrain.launch import launch

    try:
        return launch(config)
    except (ConfigError, CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
