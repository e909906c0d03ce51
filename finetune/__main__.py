"""``python -m finetune TASK --config PRESET --data ROOT [--init CKPT] [--set key=value ...]``, and ``presets``,
``evaluate TASK --config PRESET --weights W``, ``make-demo-data TASK OUT``, ``predict RUN_DIR IMAGE...``,
``export-onnx RUN_OR_FILE OUT.onnx``, ``bench --config PRESET``.

Every fine-tuning task registered with the trainer (``pretrain.registry``) is a command here.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from pretrain.config import ConfigError, config_to_dict, load_config
from pretrain.metrics import init_logging
from pretrain.registry import TaskSpec, find_preset, registered_tasks

_EPILOG = """\
examples:
  python -m finetune presets                                         # every task's presets
  python -m finetune make-demo-data ade20k data/ade20k_demo          # generated set, ADEChallengeData2016 layout
  python -m finetune ade20k --config ade20k_demo                     # tiny UperNet on it, CPU, minutes
  python -m finetune ade20k --config ade20k_demo --init runs/pipeline_demo/export/export/backbone.pth
  python -m finetune coco --config coco_demo                         # tiny Cascade Mask R-CNN, CPU, minutes
  python -m finetune evaluate ade20k --config ade20k_t_upernet_512_160k --data /data/ADEChallengeData2016 \
      --weights upernet_unireplknet_t_512_160k_ade20k_miou48.56.pth        # score a file, no training
  python -m finetune evaluate ade20k --config ade20k_demo --weights runs/ade20k_demo --ema
  python -m finetune predict runs/ade20k_demo photo.jpg --out predictions/
  python -m finetune export-onnx runs/ade20k_demo upernet.onnx       # any batch, height and width
  python -m finetune export-onnx upernet_unireplknet_t_512_160k_ade20k_miou48.56.pth upernet_t.onnx \\
      --config ade20k_t_upernet_512_160k
  python -m finetune bench --config coco_xl_cascade_3x               # one training step: s/iter, peak memory
  python -m finetune coco --config coco_xl_cascade_3x --data /data/coco \\
      --init unireplknet_xl_in22k_pretrain.pth --set launch.launcher=torchrun launch.num_workers=8

Every `python -m pretrain` option works here (launchers, ZeRO 1/2, EMA, resume from RUN_DIR's latest
checkpoint when rerun); exit status 0 done, 75 preempted after saving (rerun to resume), 2 a bad config.
Tasks defined outside this project: list their modules in UNIREPLKNET_TASKS (or declare the entry point
group "unireplknet.tasks" in their package).
predict: stdout lists the PNGs written, stderr names each image it could not read (exit status 1), 2 a bad run.
export-onnx: prints a JSON summary (onnxruntime vs torch difference included); exit status 1 when they differ by
more than --tolerance (nothing kept), 2 a bad run, file or config.
"""


def finetune_tasks() -> dict[str, TaskSpec]:
    """The registered tasks fine-tuned from the backbone (every task with ``downstream`` set)."""
    return {name: spec for name, spec in registered_tasks().items() if spec.downstream}


def build_parser() -> argparse.ArgumentParser:
    tasks = finetune_tasks()
    parser = argparse.ArgumentParser(prog="python -m finetune", description=__doc__, epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{" + ",".join([*tasks, "evaluate", "make-demo-data", "predict", "export-onnx", "presets", "bench"]) + "}")
    for name, spec in tasks.items():
        sub = commands.add_parser(name, help=spec.summary, epilog=_EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("--config", default=spec.demo_preset,
                         help=f"a preset ({', '.join(spec.presets)}) or a JSON config file (default {spec.demo_preset})")
        sub.add_argument("--data", default=None,
                         help=f"the dataset root, local path or fsspec URL (sets {spec.data_key})" if spec.data_key
                         else argparse.SUPPRESS)
        sub.add_argument("--init", default=None, metavar="CKPT",
                         help="backbone weights: a `python -m pretrain export` file or an official checkpoint")
        sub.add_argument("--run-dir", default=None, help="where the run writes (default: the preset's)")
        sub.add_argument("--resume", default=None, metavar="latest|none|FOLDER", help="default latest")
        sub.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                         help="config overrides, e.g. train.steps=1000 loader.num_workers=8")
        sub.add_argument("--dry-run", action="store_true", help="validate, print the effective config, exit")
    evaluate = commands.add_parser(
        "evaluate", help="score a model's weights on a task's evaluation (and test) set, without training",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The trainer's evaluation of given weights on every rank of the config's launcher (every "
                    "sample once); metrics.json, evaluate.log and TensorBoard go to --out, never into the "
                    "weights' run directory. Exit status 0 done, 1 an incomplete evaluation "
                    "(loader.eval_incomplete=error), 2 a bad config or weights, 75 stopped by a signal.")
    evaluate.add_argument("task", choices=list(tasks))
    evaluate.add_argument("--config", default=None, help="a preset of the task or a JSON config (default: the "
                          "task's demo preset)")
    evaluate.add_argument("--weights", required=True, metavar="RUN_DIR|CHECKPOINT|FILE",
                          help="a run directory (its latest checkpoint), a checkpoint folder, a `pretrain export` "
                               "file, or an authors' released file (their mmseg ADE20K layout is the product's)")
    evaluate.add_argument("--data", default=None, help="the dataset root (the task's --data)")
    evaluate.add_argument("--ema", action="store_true", help="a run directory's EMA weights")
    evaluate.add_argument("--out", default=None, help="the evaluation's run directory (default: the config's "
                          "run_dir + _evaluate_ + the weights' name)")
    evaluate.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                          help="config overrides, e.g. ade20k.eval_mode=slide loader.num_workers=8")
    with_demo = [name for name, spec in tasks.items() if spec.write_demo_data is not None]
    demo = commands.add_parser("make-demo-data", help="write a generated dataset in the task's standard layout")
    demo.add_argument("task", choices=with_demo)
    demo.add_argument("out", help="output folder")
    demo.add_argument("--train-images", type=int, default=None, help="training samples (default: the generator's)")
    demo.add_argument("--val-images", type=int, default=None, help="validation samples")
    demo.add_argument("--seed", type=int, default=0)
    predict = commands.add_parser("predict", help="draw a fine-tuned run's predictions over images (PNG)")
    predict.add_argument("run_dir", help="the fine-tuning run directory (holds checkpoints/)")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--out", required=True, help="output folder for the PNGs")
    predict.add_argument("--checkpoint", default="latest", help="latest (default) or a checkpoint folder")
    predict.add_argument("--ema", action="store_true", help="use the EMA weights")
    predict.add_argument("--min-score", type=float, default=0.3, help="detection: draw boxes scoring at least this")
    onnx = commands.add_parser(
        "export-onnx", help="a fine-tuned model as ONNX (inference structure), checked with onnxruntime",
        description="Re-parameterize the backbone, export the model with a dynamic batch (and, for dense tasks, "
                    "dynamic height and width), run the file in onnxruntime on CPU against torch and keep it only "
                    "when they agree. TensorRT: `trtexec --onnx=OUT.onnx --saveEngine=OUT.plan` (README).")
    onnx.add_argument("source", metavar="RUN_OR_FILE",
                      help="a run directory, or a whole model's weights file (the authors' mmseg layout) with --config")
    onnx.add_argument("out", help="the .onnx file to write")
    onnx.add_argument("--config", default=None, help="preset or JSON config of a weights file's model")
    onnx.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                      help="overrides of --config (e.g. ade20k.crop_size=640: the export's example size)")
    onnx.add_argument("--checkpoint", default="latest", help="of a run directory: latest (default) or a folder")
    onnx.add_argument("--ema", action="store_true", help="of a run directory: the EMA weights")
    onnx.add_argument("--fixed-size", action="store_true", help="height and width fixed at the task's input size")
    onnx.add_argument("--tolerance", type=float, default=None,
                      help="largest accepted max|onnx - torch| / max|torch| (default 1e-4)")
    commands.add_parser("presets", help="list every task's presets")
    commands.add_parser("bench", add_help=False, help="time training steps of a preset on synthetic data "
                        "(`python -m pretrain bench`; bench --help)")
    return parser


def task_overrides(spec: TaskSpec, data: str | None, init: str | None, run_dir: str | None,
                   resume: str | None) -> list[str]:
    """``--data/--init/--run-dir/--resume`` as config overrides (before the user's ``--set``)."""
    overrides = []
    if data:
        overrides += [f"{spec.data_key}={data}", *spec.real_data_overrides]
    if init:
        overrides.append(f"model.init_from={init}")
    if run_dir:
        overrides.append(f"run_dir={run_dir}")
    if resume:
        overrides.append(f"checkpoint.resume={resume}")
    return overrides


def print_presets() -> None:
    for name, spec in registered_tasks().items():
        print(f"{name}: {spec.summary}")
        for preset, make in spec.presets.items():
            print(f"  {preset:30s} {(make.__doc__ or '').strip().splitlines()[0] if make.__doc__ else ''}")


def make_demo_data(spec: TaskSpec, out: str, train_images: int | None, val_images: int | None, seed: int) -> None:
    sizes = {k: v for k, v in (("train_images", train_images), ("val_images", val_images)) if v}
    spec.write_demo_data(out, seed=seed, **sizes)


def export_onnx_command(args: argparse.Namespace) -> int:
    from pretrain.checkpoint import CheckpointError
    from unireplknet.checkpoint import CheckpointMismatchError

    from .export_onnx import ONNX_TOLERANCE, export_task_onnx

    try:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints on import; stdout is the summary
            summary = export_task_onnx(args.source, args.out, config_name=args.config, overrides=args.overrides,
                                       checkpoint=args.checkpoint, ema=args.ema,
                                       dynamic_size=False if args.fixed_size else None,
                                       tolerance=ONNX_TOLERANCE if args.tolerance is None else args.tolerance)
    except (ConfigError, CheckpointError, CheckpointMismatchError, FileNotFoundError, ValueError, ImportError) as error:
        print(f"export-onnx error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        print(f"export-onnx: {error}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from pretrain.__main__ import main as pretrain_main

        return pretrain_main(["bench", *argv[1:]])
    args = build_parser().parse_args(argv)
    init_logging(int(os.environ.get("RANK", "0")))
    if args.command == "presets":
        print_presets()
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
    if args.command == "export-onnx":
        return export_onnx_command(args)
    if args.command == "make-demo-data":
        spec = registered_tasks()[args.task]
        make_demo_data(spec, args.out, args.train_images, args.val_images, args.seed)
        print(f"wrote the {args.task} demo set to {args.out}")
        return 0
    task_name = args.task if args.command == "evaluate" else args.command
    spec = registered_tasks()[task_name]
    if args.command == "evaluate":
        args.config = args.config or spec.demo_preset
        args.init = args.run_dir = args.resume = None
        args.dry_run = False
    try:
        found = find_preset(args.config)
        if found is not None and found[0].name != spec.name:
            raise ConfigError("--config", f"{args.config} is a preset of task {found[0].name}; `python -m finetune "
                              f"{spec.name}` takes one of {', '.join(spec.presets)} (or a JSON config)")
        if args.data and not spec.data_key:
            raise ConfigError("--data", f"task {spec.name} takes its data from its config (--set), not --data")
        config = load_config(args.config, task_overrides(spec, args.data, args.init, args.run_dir, args.resume)
                             + list(args.overrides))
        if config.task != spec.name:
            raise ConfigError("--config", f"{args.config} is a {config.task} config; `python -m finetune "
                              f"{spec.name}` takes a preset of task {spec.name} ({', '.join(spec.presets)})")
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(config_to_dict(config), indent=2))
        return 0
    from pretrain.checkpoint import CheckpointError
    from pretrain.launch import launch
    from pretrain.trainer import EvaluationIncompleteError

    try:
        if args.command == "evaluate":
            from pretrain.evaluate import EVALUATE_ENTRY, evaluation_config

            return launch(evaluation_config(config, args.weights, args.ema, args.out), EVALUATE_ENTRY)
        return launch(config)
    except (ConfigError, CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # weights that do not fit the model
        if args.command != "evaluate":
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except EvaluationIncompleteError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
