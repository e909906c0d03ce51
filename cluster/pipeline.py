"""``python -m cluster.pipeline --config demo|xl|universal_demo|universal [--run-root DIR] [--set STAGE:key=value ...]``.

pretrain -> export -> the fine-tunes (in parallel, on the same Ray cluster) -> one summary
(``RUN_ROOT/pipeline/summary.json`` and TensorBoard scalars under ``RUN_ROOT/pipeline/tensorboard``).
Each stage is ``python -m cluster.stage NAME`` with its run directory under RUN_ROOT, so rerunning the
pipeline skips complete stages and resumes interrupted ones from ``latest``. Without ``RAY_ADDRESS`` a
local Ray cluster is started for the run (outside the pipeline's process group, stopped at the end) and
every stage drives it. A stage's output goes to ``RUN_ROOT/NAME/stage.log`` as it comes.

Pipelines (the fine-tunes are every registered fine-tuning task: ``python -m finetune presets``):
    demo   the demo pretraining (generated digit shards) on CPU -> export -> each task's demo preset
           (generated sets in the standard layouts); minutes on a laptop.
    xl     XL ImageNet-22K pretraining at 384 -> export -> each task's paper-scale preset (ADE20K UperNet
           640 160k, COCO Cascade Mask R-CNN 3x, ...; data from the ``cluster.stage`` environment variables).
    universal_demo, universal
           the tasks the authors train from scratch (audio, video, ...: ``TaskSpec.pretrained_backbone=False``),
           in parallel, no pretraining: their demo presets on CPU, or their paper-scale presets.

Exit status: 0 done; 75 preempted (rerun to resume): SIGTERM / SIGUSR1 to the pipeline or its process group,
any number of times, reach every running stage, which checkpoints; no further stage starts, and the summary
says "preempted"; 1 a stage failed; 2 bad arguments.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pretrain.preemption import PREEMPTION_SIGNALS, REQUEUE_EXIT_CODE

__all__ = ["Pipeline", "headline_metrics", "main", "pipelines", "run_pipeline"]

_logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class Pipeline:
    """Each stage's ``cluster.stage`` arguments; ``finetunes`` run in parallel after the export."""

    pretrain: tuple[str, ...] | None
    """The pretraining stage's arguments; ``None``: no pretraining, the fine-tunes start from scratch."""
    finetunes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    unavailable: tuple[str, ...] = ()


DEMO_OVERRIDES = ("--set", "launch.device=cpu", "launch.num_workers=1", "launch.cpus_per_worker=1")
"""Every demo stage on CPU, one worker reserving one logical CPU: the fine-tunes run side by side even on a
2-core machine (Ray's default reservation, 1 + loader workers each, would queue one behind the other)."""


def pipelines() -> dict[str, Pipeline]:
    """``demo`` and ``xl``: pretraining, then every registered fine-tuning task that starts from the pretrained
    backbone (its demo or cluster preset). ``universal_demo`` and ``universal``: the tasks trained from scratch
    (``TaskSpec.pretrained_backbone=False``), which take nothing from the pretraining."""
    from .stage import PRETRAIN_PRESET, finetune_stages

    stages = {name: spec for name, spec in finetune_stages().items() if spec.pretrained_backbone}
    scratch = {name: spec for name, spec in finetune_stages().items() if not spec.pretrained_backbone}
    return {
        "universal_demo": Pipeline(pretrain=None, finetunes={name: ("--config", spec.demo_preset, *DEMO_OVERRIDES)
                                                             for name, spec in scratch.items()}),
        "universal": Pipeline(pretrain=None, finetunes={name: ("--config", spec.cluster_preset)
                                                        for name, spec in scratch.items()}),
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


class _Stop:
    """SIGTERM / SIGUSR1 to the pipeline (its PID, or its whole process group as Slurm and a pod stop send
    them; any number of times): forwarded to the running stages, which checkpoint and exit 75 (each stage
    driver catches them too, so a stage that also got the group's signal just sees it twice); no further
    stage starts. The pipeline itself keeps running until its stages are done."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.children: set[subprocess.Popen] = set()
        self._previous: dict[int, object] = {}

    def install(self) -> "_Stop":
        self._previous = {sig: signal.signal(sig, self._handle) for sig in PREEMPTION_SIGNALS}
        return self

    def uninstall(self) -> None:
        """The previous handlers back, unless a signal came: then the rest of its volley is ignored (the
        pipeline is exiting for requeue)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.signal else handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        running = [child for child in list(self.children) if child.poll() is None]
        _logger.warning("%s received: asking %d running stage(s) to checkpoint and stop; no further stage starts",
                        name, len(running))
        self.signal = self.signal or name
        for child in running:
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass


def _run(name: str, arguments: list[str], run_root: str, env: dict[str, str], stop: _Stop) -> dict:
    """Run one stage as a child process (its own Ray driver); its output goes to RUN_ROOT/NAME/stage.log as it
    comes."""
    if stop.signal:
        return {"status": None, "note": f"not started: the pipeline was asked to stop ({stop.signal})"}
    run_dir = os.path.join(run_root, name)
    os.makedirs(run_dir, exist_ok=True)
    command = [sys.executable, "-m", "cluster.stage", name, "--run-dir", run_dir, *arguments]
    started = time.monotonic()
    _logger.info("stage %s: %s", name, " ".join(command[1:]))
    with open(os.path.join(run_dir, "stage.log"), "a", buffering=1) as log:  # line-buffered: readable while it runs
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                 bufsize=1)
        stop.children.add(child)
        if stop.signal:  # it came between the check above and now: the handler did not see this child
            child.send_signal(getattr(signal, stop.signal))
        try:
            for line in child.stdout:  # everything to the stage's log; the trainer's own lines to the console too
                log.write(line)
                if "[rank0]" in line:
                    sys.stderr.write(f"[{name}] {line}")
            status = child.wait()
        finally:
            stop.children.discard(child)
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


def _pipeline_status(pipeline: Pipeline, stages: dict[str, dict], stop_signal: str | None) -> int:
    """0 when every stage completed; 75 when the rest is a rerun away (stages preempted, or, once the
    pipeline was asked to stop, not started or ended by the stop signal); else 1."""
    if all(stages.get(stage, {}).get("status") == 0 for stage in (*_pretraining(pipeline), *pipeline.finetunes)):
        return 0
    statuses = [result["status"] for result in stages.values() if result.get("status") is not None]
    stopped = {0, REQUEUE_EXIT_CODE} | ({-sig for sig in PREEMPTION_SIGNALS} if stop_signal else set())
    if (stop_signal or REQUEUE_EXIT_CODE in statuses) and all(s in stopped for s in statuses):
        return REQUEUE_EXIT_CODE
    return 1


def _pretraining(pipeline: Pipeline) -> tuple[str, ...]:
    """The stages before the fine-tunes: pretraining and export, or none."""
    return ("pretrain_xl", "export") if pipeline.pretrain is not None else ()


def run_pipeline(name: str, run_root: str, overrides: dict[str, list[str]] | None = None,
                 stop: _Stop | None = None) -> tuple[int, dict]:
    """Run the pipeline ``name`` under ``run_root``; returns (exit status, summary). Without ``RAY_ADDRESS`` the
    stages share a :class:`~pretrain.local_ray.LocalRayCluster` (outside this process group, so a signal to
    the group leaves the Ray Train workers alive to checkpoint), stopped at the end. ``stop``: the stop
    signal handlers, if the caller installed them already (``main`` does, first thing)."""
    from pretrain.local_ray import LocalRayCluster

    pipeline, overrides = pipelines()[name], overrides or {}
    run_root = os.path.abspath(run_root)
    env = {**os.environ, "UNIREPLKNET_RUN_ROOT": run_root, "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"}
    own_handlers = stop is None
    stop = stop or _Stop().install()
    summary: dict = {"pipeline": name, "run_root": run_root, "stages": {}}
    local_ray = None
    try:
        if not env.get("RAY_ADDRESS"):
            local_ray = LocalRayCluster(log_path=os.path.join(run_root, "pipeline", "ray_head.log")).start()
            env.update(local_ray.environment)
        stages = summary["stages"]
        init: list[str] = []
        if pipeline.pretrain is not None:
            stages["pretrain_xl"] = _run("pretrain_xl", _with_overrides(pipeline.pretrain,
                                                                        overrides.get("pretrain_xl", [])),
                                         run_root, env, stop)
            if stages["pretrain_xl"]["status"] == 0:
                stages["export"] = _run("export", ["--source", os.path.join(run_root, "pretrain_xl")], run_root, env,
                                        stop)
            init = ["--init", os.path.join(run_root, "export", "export", "backbone.pth")]
        if pipeline.pretrain is None or stages.get("export", {}).get("status") == 0:
            with ThreadPoolExecutor(max_workers=max(1, len(pipeline.finetunes))) as pool:
                futures = {stage: pool.submit(_run, stage, [*init, *_with_overrides(arguments,
                                              overrides.get(stage, []))], run_root, env, stop)
                           for stage, arguments in pipeline.finetunes.items()}
                for stage, future in futures.items():
                    stages[stage] = future.result()
        for stage in pipeline.unavailable:
            stages[stage] = {"status": None, "note": "not available yet"}
    finally:
        if local_ray is not None:
            local_ray.stop()
        if own_handlers:
            stop.uninstall()
    status = _pipeline_status(pipeline, summary["stages"], stop.signal)
    summary["status"] = {0: "complete", REQUEUE_EXIT_CODE: "preempted"}.get(status, "failed")
    if stop.signal:
        summary["stop_signal"] = stop.signal
    _write_summary(summary, os.path.join(run_root, "pipeline"))
    return status, summary


def _write_summary(summary: dict, folder: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from unireplknet.files import atomic_write_json

    atomic_write_json(os.path.join(folder, "summary.json"), summary)
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


def _parse_overrides(parser: argparse.ArgumentParser, pipeline: str, items: list[str]) -> dict[str, list[str]]:
    """``STAGE:key=value`` items by stage; a malformed item or a stage the pipeline does not configure is a usage
    error (exit 2) before anything starts."""
    chosen = pipelines()[pipeline]
    configurable = (*_pretraining(chosen)[:1], *chosen.finetunes)
    parsed: dict[str, list[str]] = {}
    for item in items:
        stage, sep, override = item.partition(":")
        if not sep or "=" not in override:
            parser.error(f"--set {item!r}: expected STAGE:key=value (e.g. pretrain_xl:train.max_steps=100)")
        if stage not in configurable:
            parser.error(f"--set {item!r}: the {pipeline} pipeline has no stage {stage!r} to configure; expected "
                         f"one of {', '.join(configurable)}")
        parsed.setdefault(stage, []).append(override)
    return parsed


def main(argv: list[str] | None = None) -> int:
    stop = _Stop().install()  # first: a signal while the pipeline starts is kept, not fatal
    parser = argparse.ArgumentParser(prog="python -m cluster.pipeline", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", choices=sorted(pipelines()), help="which pipeline (default demo)")
    parser.add_argument("--run-root", default=None,
                        help="where every stage's run directory goes (default: $UNIREPLKNET_RUN_ROOT, else runs/pipeline_CONFIG)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="STAGE:KEY=VALUE",
                        help="override a stage's config, e.g. pretrain_xl:train.max_steps=100 (stages: pretrain_xl and finetune_TASK)")
    args = parser.parse_args(argv)
    overrides = _parse_overrides(parser, args.config, args.overrides)
    from pretrain.metrics import init_logging

    init_logging(0)
    run_root = args.run_root or os.environ.get("UNIREPLKNET_RUN_ROOT") or os.path.join("runs", f"pipeline_{args.config}")
    status, summary = run_pipeline(args.config, run_root, overrides, stop=stop)
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
