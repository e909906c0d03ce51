"""Command line: ``python -m pretrain [train] --config NAME|FILE [--set key=value ...]``, ``evaluate``, ``export``,
``bench``."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from .config import ConfigError, all_presets, config_to_dict, load_config
from .metrics import init_logging

_COMMANDS = ("train", "evaluate", "export", "bench", "presets")

_EPILOG = """\
examples:
  python -m pretrain --config demo                                   # tiny net, generated shards, CPU
  python -m pretrain --config xl_in22k_384 --set data.train_urls=/data/in22k/train \\
      launch.launcher=torchrun launch.num_workers=8
  torchrun --nproc-per-node 8 -m pretrain --config xl_in22k_384      # the same, torchrun started by you
  python -m pretrain --config demo --set launch.launcher=ray launch.num_workers=2 launch.device=cpu
  python -m pretrain --config xl_in22k_384 --dry-run                 # print the effective config, exit
  python -m pretrain evaluate --config xl_in22k_384 --weights runs/xl_in22k_384 --ema   # score, no training
  python -m pretrain evaluate --config xl_in1k_ft_384 --weights unireplknet_xl_in22k_to_in1k_384_acc87.96.pth \
      --set data.source=shards data.val_urls=/data/in1k/val
  python -m pretrain export runs/xl_in22k_384 xl_in22k.pth --official
  python -m pretrain bench --config xl_in22k_384 --steps 20

exit status: 0 finished; 75 preempted (SIGTERM/SIGUSR1, or RUN_DIR/STOP) after saving a checkpoint:
run the same command again to resume from RUN_DIR/checkpoints/latest; 2 a bad config or a checkpoint
that cannot be resumed (the message says why); 1 another failure (non-finite loss, ...).
"""


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="demo",
                        help="a preset of any task (`python -m pretrain presets` lists them) or a JSON file such as "
                             "RUN_DIR/config.json (default: demo)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config values, e.g. train.zero_stage=3 optim.lr=1e-3 model.dims=16,32,64,128")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__, epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="{train,evaluate,export,bench,presets}")

    train = commands.add_parser("train", help="train (the default command)", epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_arguments(train)
    train.add_argument("--resume", default=None, metavar="latest|none|FOLDER",
                       help="latest (default: continue the run directory's latest checkpoint if there is one), "
                            "none (start over), or a checkpoint folder")
    train.add_argument("--dry-run", action="store_true", help="validate, print the effective config as JSON, exit")

    evaluate = commands.add_parser(
        "evaluate", help="score a model's weights on its task's evaluation (and test) set, without training",
        description="Load the weights strictly into the config's model and run the trainer's evaluation on every "
                    "rank of the config's launcher (every sample once); metrics.json, evaluate.log and TensorBoard "
                    "go to --out, never into the weights' run directory. Exit status 0 done, 1 an incomplete "
                    "evaluation (loader.eval_incomplete=error), 2 a bad config or weights, 75 stopped by a signal.")
    _add_config_arguments(evaluate)
    evaluate.add_argument("--weights", default=None, metavar="RUN_DIR|CHECKPOINT|FILE",
                          help="a run directory (its latest checkpoint), a checkpoint folder, a `pretrain export` "
                               "file, or an authors' released file (training or inference structure)")
    evaluate.add_argument("--ema", action="store_true", help="a run directory's EMA weights")
    evaluate.add_argument("--out", default=None, help="the evaluation's run directory (default: the config's "
                          "run_dir + _evaluate_ + the weights' name)")

    export = commands.add_parser("export", help="write a consolidated fp32 state dict from a run's checkpoint")
    export.add_argument("run_dir", help="the run directory (holds config.json and checkpoints/)")
    export.add_argument("out", help="output .pth file")
    export.add_argument("--checkpoint", default="latest", help="latest (default) or a checkpoint folder")
    export.add_argument("--ema", action="store_true", help="export the EMA weights")
    export.add_argument("--reparameterize", action="store_true", help="convert to the inference structure")
    export.add_argument("--official", action="store_true", help="the authors' key layout (unireplknet.export_official)")

    bench = commands.add_parser("bench", help="time training steps of any task's preset on its synthetic batch on "
                                "this device (samples/s, s/iter, peak memory, TFLOP/s)")
    _add_config_arguments(bench)
    bench.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")

    commands.add_parser("presets", help="list the presets")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in _COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "train")
    args = build_parser().parse_args(argv)
    init_logging(int(os.environ.get("RANK", "0")))

    if args.command == "presets":
        for name, make in all_presets().items():
            print(f"{name:30s} {(make.__doc__ or '').strip().splitlines()[0] if make.__doc__ else ''}")
        return 0
    if args.command == "export":
        from .export import export_checkpoint

        from .checkpoint import CheckpointError

        try:
            with contextlib.redirect_stdout(sys.stderr):
                summary = export_checkpoint(args.run_dir, args.out, checkpoint=args.checkpoint, ema=args.ema,
                                            reparameterize=args.reparameterize, official=args.official)
        except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as error:
            print(f"export error: {error}", file=sys.stderr)
            return 2
        print(json.dumps(summary, indent=2))
        return 0

    overrides = list(args.overrides)
    if args.command == "train" and args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        config = load_config(args.config, overrides)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    if args.command == "bench":
        from .bench import bench

        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs and prints to stdout; keep it JSON only
            results = bench(config, steps=args.steps, warmup=args.warmup)
        print(json.dumps(results, indent=2))
        return 0
    if getattr(args, "dry_run", False):
        from .launch import check_batch_split, launch_world_size

        try:
            check_batch_split(config, launch_world_size(config))
        except ConfigError as error:
            print(f"config error: {error}", file=sys.stderr)
            return 2
        print(json.dumps(config_to_dict(config), indent=2))
        return 0

    from .checkpoint import CheckpointError
    from .launch import launch
    from .trainer import EvaluationIncompleteError, NonFiniteLossError

    try:
        if args.command == "evaluate":
            from .evaluate import EVALUATE_ENTRY, evaluation_config

            return launch(evaluation_config(config, args.weights, args.ema, args.out), EVALUATE_ENTRY)
        return launch(config)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    except (CheckpointError, FileNotFoundError) as error:
        print(f"checkpoint error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # weights that do not fit the model
        if args.command != "evaluate":
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, EvaluationIncompleteError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
