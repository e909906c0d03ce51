"""``python -m cluster.pipeline --config demo|xl [--run-root DIR] [--set STAGE:key=value ...]``: the whole chain.

pretrain -> export -> the fine-tunes (in parallel, on the same Ray cluster) -> one summary
(``RUN_ROOT/pipeline/summary.json`` and TensorBoard scalars under ``RUN_ROOT/pipeline/tensorboard``).
Each stage is ``python -m cluster.stage NAME`` with its run directory under RUN_ROOT, so rerunning the
pipeline skips complete stages and resumes interrupted ones from ``latest``. Without ``RAY_ADDRESS`` a
local Ray cluster is started for the run and every stage drives it.

Pipelines (the fine-tunes are every registered fine-tuning task: ``python -m finetune presets``):
    demo   the demo pretraining (generated digit shards) on CPU -> export -> each task's demo preset
           (generated sets in the standard layouts); minutes on a laptop.
    xl     XL ImageNet-22K pretraining at 384 -> export -> each task's paper-scale preset (ADE20K UperNet
           640 160k, COCO Cascade Mask R-CNN 3x, ...; data from the ``cluster.stage`` environment variables).

Exit status: 0 done, 75 a stage was preempted after checkpointing (rerun to resume), 1 a stage failed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

__all__ = ["Pipeline", "headline_metrics", "main", "pipelines", "run_pipeline"]

_logger = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75


@dataclass(frozen=True)
class Pipeline:
    """Each stage's ``cluster.stage`` arguments; ``finetunes`` run in parallel after the export."""

    pretrain: tuple[str, ...]
    finetunes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    unavailable: tuple[str, ...] = ()


DEMO_OVERRIDES = ("--set", "launch.device=cpu", "launch.num_workers=1")


def pipelines() -> dict[str, Pipeline]:
    """``demo`` and ``xl``: pretraining, then every registered fine-tuning task (its demo or cluster preset)."""
    from .stage import PRETRAIN_PRESET, finetune_stages

    stages = finetune_stages()
    return {
        "demo": Pipeline(pretrain=("--config", "demo", *DEMO_OVERRIDES),
                         finetunes={name: ("--config", spec.demo_preset, *DEMO_OVERRIDES) for name, spec in stages.items()}),
        "xl": Pipeline(pretrain=("--config", PRETRAIN_PRESET),
                       finetunes={name: ("--config", spec.cluster_preset) for name, spec in stages.items()}),
    }


def headline_metrics(run_dir: str) -> tuple[str, ...]:
    """The metrics the summary shows for a training stage's run: its task's ``TaskSpec.metrics``."""
    from pretrain.registry import UnknownTaskError, get_task

    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            return tuple(get_task(json.load(f).get("task", "")).metrics)
    except (OSError, ValueError, UnknownTaskError):
        return ()


def _run(name: str, arguments: list[str], run_root: str, env: dict[str, str]) -> dict:
    """Run one stage as a child process (its own Ray driver); its output goes to RUN_ROOT/NAME/stage.log."""
    run_dir = os.path.join(run_root, name)
    os.makedirs(run_dir, exist_ok=True)
    command = [sys.executable, "-m", "cluster.stage", name, "--run-dir", run_dir, *arguments]
    started = time.monotonic()
    _logger.info("stage %s: %s", name, " ".join(command[1:]))
    with open(os.path.join(run_dir, "stage.log"), "a") as log:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                 bufsize=1)
        for line in child.stdout:  # everything to the stage's log; the trainer's own lines to the console too
            log.write(line)
            if "[rank0]" in line:
                sys.stderr.write(f"[{name}] {line}")
        status = child.wait()
    seconds = time.monotonic() - started
    _logger.info("stage %s: exit %d after %.0f s (log: %s)", name, status, seconds, os.path.join(run_dir, "stage.log"))
    metrics_file = os.path.join(run_dir, "metrics.json")
    metrics = {}
    if os.path.isfile(metrics_file):
        with open(metrics_file) as f:
            metrics = json.load(f)
    return {"status": status, "seconds": round(seconds, 1), "run_dir": run_dir, "metrics": metrics,
            "headline": list(headline_metrics(run_dir))}


def _with_overrides(arguments: tuple[str, ...], extra: list[str]) -> list[str]:
    arguments = list(arguments)
    if not extra:
        return arguments
    return arguments + (extra if "--set" in arguments else ["--set", *extra])


def run_pipeline(name: str, run_root: str, overrides: dict[str, list[str]] | None = None) -> tuple[int, dict]:
    """Run the pipeline ``name`` under ``run_root``; returns (exit status, summary)."""
    pipeline, overrides = pipelines()[name], overrides or {}
    run_root = os.path.abspath(run_root)
    env = {**os.environ, "UNIREPLKNET_RUN_ROOT": run_root, "RAY_DEDUP_LOGS": "0"}
    local_ray = None
    if not env.get("RAY_ADDRESS"):
        import ray

        local_ray = ray.init(log_to_driver=False)  # with its dashboard: Ray Train asks the state API
        env["RAY_ADDRESS"] = local_ray.address_info["gcs_address"]
        # a new local cluster has token auth on unless RAY_AUTH_MODE says otherwise; the stages must then
        # present the token (~/.ray/auth_token), which they only do when told the mode
        env.setdefault("RAY_AUTH_MODE", "token")
        _logger.info("started a local Ray cluster at %s for the pipeline", env["RAY_ADDRESS"])
    summary: dict = {"pipeline": name, "run_root": run_root, "stages": {}}
    try:
        stages = summary["stages"]
        stages["pretrain_xl"] = _run("pretrain_xl", _with_overrides(pipeline.pretrain, overrides.get("pretrain_xl", [])),
                                     run_root, env)
        if stages["pretrain_xl"]["status"] == 0:
            stages["export"] = _run("export", ["--source", os.path.join(run_root, "pretrain_xl")], run_root, env)
        if stages.get("export", {}).get("status") == 0:
            backbone = os.path.join(run_root, "export", "export", "backbone.pth")
            with ThreadPoolExecutor(max_workers=max(1, len(pipeline.finetunes))) as pool:
                futures = {stage: pool.submit(_run, stage, ["--init", backbone, *_with_overrides(arguments,
                                              overrides.get(stage, []))], run_root, env)
                           for stage, arguments in pipeline.finetunes.items()}
                for stage, future in futures.items():
                    stages[stage] = future.result()
        for stage in pipeline.unavailable:
            stages[stage] = {"status": None, "note": "not available yet"}
    finally:
        if local_ray is not None:
            import ray

            ray.shutdown()
    statuses = [s["status"] for s in summary["stages"].values() if s.get("status") is not None]
    status = 0 if all(s == 0 for s in statuses) and "export" in summary["stages"] else (
        REQUEUE_EXIT_CODE if REQUEUE_EXIT_CODE in statuses and all(s in (0, REQUEUE_EXIT_CODE) for s in statuses)
        else 1)
    summary["status"] = {0: "complete", REQUEUE_EXIT_CODE: "preempted"}.get(status, "failed")
    _write_summary(summary, os.path.join(run_root, "pipeline"))
    return status, summary


def _write_summary(summary: dict, folder: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"summary.json.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(folder, "summary.json"))
    writer = SummaryWriter(os.path.join(folder, "tensorboard"))
    try:
        for stage, result in summary["stages"].items():
            metrics = result.get("metrics") or {}
            for key in result.get("headline", ()):
                if key in metrics:
                    writer.add_scalar(f"{stage}/{key.split('/', 1)[1]}", metrics[key], metrics.get("step", 0))
            if result.get("seconds") is not None:
                writer.add_scalar(f"{stage}/hours", result["seconds"] / 3600, 0)
    finally:
        writer.close()


def _parse_overrides(items: list[str]) -> dict[str, list[str]]:
    parsed: dict[str, list[str]] = {}
    for item in items:
        stage, sep, override = item.partition(":")
        if not sep or "=" not in override:
            raise SystemExit(f"--set {item!r}: expected STAGE:key=value (e.g. finetune_ade20k:train.steps=100)")
        parsed.setdefault(stage, []).append(override)
    return parsed


def main(argv: list[str] | None = None) -> int:
    from pretrain.metrics import init_logging

    parser = argparse.ArgumentParser(prog="python -m cluster.pipeline", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", choices=sorted(pipelines()), help="which pipeline (default demo)")
    parser.add_argument("--run-root", default=None,
                        help="where every stage's run directory goes (default: $UNIREPLKNET_RUN_ROOT, else runs/pipeline_CONFIG)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="STAGE:KEY=VALUE",
                        help="override a stage's config, e.g. finetune_ade20k:train.steps=100")
    args = parser.parse_args(argv)
    init_logging(0)
    run_root = args.run_root or os.environ.get("UNIREPLKNET_RUN_ROOT") or os.path.join("runs", f"pipeline_{args.config}")
    status, summary = run_pipeline(args.config, run_root, _parse_overrides(args.overrides))
    print(f"\npipeline {args.config}: {summary['status']}")
    for stage, result in summary["stages"].items():
        if result.get("status") is None:
            print(f"  {stage:16s} {result['note']}")
            continue
        metrics = result.get("metrics") or {}
        shown = ", ".join(f"{k.split('/', 1)[1]} {metrics[k]:.2f}" for k in result.get("headline", ()) if k in metrics)
        print(f"  {stage:16s} exit {result['status']}, {result['seconds']:.0f} s{', ' + shown if shown else ''}")
    print(f"summary: {os.path.join(summary['run_root'], 'pipeline', 'summary.json')}")
    print(f"watch it: tensorboard --logdir {summary['run_root']}")
    return status


if __name__ == "__main__":
    sys.exit(main())
