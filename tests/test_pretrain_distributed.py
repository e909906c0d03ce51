"""Two ranks on CPU: ZeRO 1/2/3 under torchrun and under Ray Train against an independent single-process
computation (in float64, within a bound derived from the computation), exact resume after SIGKILL
(ZeRO-2 and ZeRO-3), BatchNorm statistics averaged into checkpoints while each rank keeps its own, and
the torchrun launcher forwarding SIGUSR1 into a requeue exit."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from test_pretrain_train import read_scalars, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
STEPS = 6

pytestmark = pytest.mark.slow


def distributed_overrides(shards, run_dir, **changes) -> list[str]:
    """2 ranks x micro-batch 8 x accumulation 2 = global batch 32; clipping on; drop path off."""
    values = {"train.global_batch_size": 32, "train.micro_batch_size": 8, "optim.clip_grad": 1.0,
              "train.max_steps": STEPS, "data.crop_scale_min": 0.5}
    values.update(changes)
    return tiny_overrides(shards, run_dir, **values)


def torchrun(args: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def run_torchrun(args: list[str], timeout: float = 300) -> None:
    process = torchrun(args)
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-4000:]


FP64 = {"train.precision": "fp64"}
"""The runs compared with the reference compute in float64: reduction order (ZeRO buckets, ranks,
threads) then costs about 1e-16 instead of float32's 1e-7, which Adam's first steps amplify into
differences that depend on the machine."""


def _float32_ulp(values: torch.Tensor) -> torch.Tensor:
    """The spacing of float32 numbers at ``values`` (float64 result)."""
    magnitude = values.float().abs()
    return (torch.nextafter(magnitude, torch.full_like(magnitude, math.inf)) - magnitude).double()


def reference_losses(overrides: list[str], steps: int) -> tuple[list[float], list[float]]:
    """The same optimization without DeepSpeed, ranks or engines: one process computes both ranks'
    micro-batches in float64, averages their losses, clips the global gradient norm and takes a torch
    AdamW step on float32 master weights, as DeepSpeed's ZeRO optimizers keep them whatever the
    model's dtype (DeepSpeed 0.19: ``_configure_master_weights`` returns float32).

    Returns the losses and, per step, the bound a correct distributed run stays within, derived from
    the computation: the two runs round each new float32 master weight on their own, so after k steps
    a weight may differ by k float32 ulps, plus 2^-21 of each update (an update follows the rounded
    float32 gradient, which may differ in its last bit, at most doubled through Adam's moments); to
    first order the loss then differs by at most sum |dL/dw| x that drift. Added to it: the float32
    that TensorBoard stores a scalar in (half an ulp, 2^-24 relative) and float64 reduction order over
    about 1e6 terms (1e-10 relative).
    """
    from pretrain.config import load_config
    from pretrain.distributed import WorldInfo
    from pretrain.optim import build_param_groups, build_scheduler
    from pretrain.classification.task import ImageClassification
    from pretrain.trainer import seed_everything

    config = load_config("demo", overrides)
    task = ImageClassification(config)
    seed_everything(config.train.seed)
    model = task.build_model().double()
    world_size, accumulation = 2, config.train.global_batch_size // (2 * config.train.micro_batch_size)
    loaders = [iter(task.build_train_loader(WorldInfo(rank, rank, world_size))) for rank in range(world_size)]
    steps_per_epoch = len(task.build_train_loader(WorldInfo(0, 0, world_size))) // accumulation
    groups = build_param_groups(model, config.optim)
    params = [p for g in groups for p in g["params"]]
    masters = {id(p): p.detach().float().clone() for p in params}
    optimizer = torch.optim.AdamW(
        [{**{k: v for k, v in g.items() if k not in ("param_names", "params")},
          "params": [masters[id(p)] for p in g["params"]]} for g in groups],
        lr=config.optim.lr, betas=config.optim.betas, eps=config.optim.eps, foreach=True)
    scheduler = build_scheduler(optimizer, config.optim, config.train.epochs * steps_per_epoch, steps_per_epoch)
    drift = {id(p): torch.zeros_like(p) for p in params}  # bound on |w_distributed - w_reference| per weight
    losses, bounds = [], []
    for _ in range(steps):
        step_losses = []
        for _ in range(accumulation):
            for loader in loaders:
                images, targets = next(loader)
                targets = targets.double() if targets.is_floating_point() else targets
                step_losses.append(task.loss(model(images.double()), targets))
        loss = torch.stack(step_losses).mean()
        loss.backward()
        losses.append(loss.item())
        first_order = sum(float((p.grad.abs() * drift[id(p)]).sum()) for p in params)
        bounds.append(first_order + (2.0 ** -24 + 1e-10) * abs(loss.item()))
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_grad)
        before = {}
        for p in params:
            masters[id(p)].grad = p.grad.float()
            before[id(p)] = masters[id(p)].double()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        model.zero_grad()
        with torch.no_grad():
            for p in params:
                after = masters[id(p)].double()
                drift[id(p)] += _float32_ulp(after) + 2.0 ** -21 * (after - before[id(p)]).abs()
                p.copy_(after)
    return losses, bounds


def assert_matches_reference(losses: list[float], reference: tuple[list[float], list[float]]) -> None:
    """Every step within the bound :func:`reference_losses` derives (the first step: TensorBoard's float32)."""
    expected, bounds = reference
    assert len(losses) == len(expected)
    for step, (loss, value, bound) in enumerate(zip(losses, expected, bounds), start=1):
        assert abs(loss - value) <= bound, (
            f"step {step}: loss {loss!r}, reference {value!r}, differ by {abs(loss - value):.3g} > bound {bound:.3g}; "
            f"all: {losses} vs {expected}")


@pytest.fixture(scope="module")
def reference(pretrain_shards, tmp_path_factory) -> tuple[list[float], list[float]]:
    return reference_losses(distributed_overrides(pretrain_shards, tmp_path_factory.mktemp("reference")), STEPS)


# ----------------------------------------------------------------------------- torchrun


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_torchrun_zero_stages_match_the_single_process_computation(stage, pretrain_shards, reference, tmp_path):
    run_dir = tmp_path / "run"
    run_torchrun(["-m", "pretrain", "--config", "demo", "--set",
                  *distributed_overrides(pretrain_shards, run_dir, **{"train.zero_stage": stage, **FP64})])
    losses = [v for _, v in read_scalars(run_dir)["train/loss"]]
    assert len(losses) == STEPS
    # the same numbers as the independent computation; learning itself is asserted by the demo test
    # (6 warm-up steps of batch 32 move the loss by less than batch-to-batch noise)
    assert_matches_reference(losses, reference)


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def kill_after_checkpoint_then_resume(args: list[str], run_dir: Path, final_step: int) -> int:
    """Start 2 ranks, SIGKILL torchrun and every worker once a checkpoint is complete, rerun the same command.

    torchrun puts its workers in their own process groups, so the whole tree is killed, not one group."""
    process = torchrun(args)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists():
        assert process.poll() is None, process.stderr.read()[-4000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    tree = process_tree(process.pid)
    assert len(tree) >= 3, f"expected torchrun and 2 workers, found processes {tree}"
    for pid in tree:
        os.kill(pid, signal.SIGKILL)
    process.wait(timeout=60)
    for pid in tree[1:]:
        while os.path.exists(f"/proc/{pid}") and "State:\tZ" not in open(f"/proc/{pid}/status").read():
            time.sleep(0.05)
    killed_at = int(latest.read_text().split("_")[1])
    assert killed_at < final_step, "the run finished before it could be killed"
    run_torchrun(args)
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{killed_at:08d}'}" in (run_dir / "train.log").read_text()
    return killed_at


@pytest.mark.parametrize("stage", [3])  # ZeRO-2 (the XL recipe's): the Ray Train test below
def test_sigkill_then_resume_reaches_the_same_weights_as_an_uninterrupted_run(stage, pretrain_shards, tmp_path):
    from pretrain.checkpoint import consolidated_state_dict, read_rank_states
    from pretrain.ema import consolidate_ema

    final_step = 16  # one epoch; the kill comes after the checkpoint of step 4
    changes = {"train.zero_stage": stage, "train.epochs": 2, "train.max_steps": final_step, "checkpoint.every": 4,
               "train.ema_decay": 0.9, "loader.num_workers": 1, "model.drop_path_rate": 0.1}
    runs = {name: tmp_path / name for name in ("uninterrupted", "killed")}
    args = {name: ["-m", "pretrain", "--config", "demo", "--set",
                   *distributed_overrides(pretrain_shards, run_dir, **changes)] for name, run_dir in runs.items()}
    run_torchrun(args["uninterrupted"])
    killed_at = kill_after_checkpoint_then_resume(args["killed"], runs["killed"], final_step)

    final = {name: run_dir / "checkpoints" / f"step_{final_step:08d}" for name, run_dir in runs.items()}
    # bit-identical, as README states: weights, BatchNorm buffers, EMA and every logged loss
    expected, actual = (consolidated_state_dict(str(final[name])) for name in ("uninterrupted", "killed"))
    assert expected.keys() == actual.keys() and sum("running_var" in k for k in expected) > 10
    differ = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not differ, f"killed at step {killed_at}: {len(differ)} tensors differ, e.g. {differ[:3]}"
    ema_expected, ema_actual = (consolidate_ema([s["ema"] for s in read_rank_states(str(final[name]))])
                                for name in ("uninterrupted", "killed"))
    assert all(torch.equal(ema_expected[k], ema_actual[k]) for k in ema_expected)
    losses = {name: read_scalars(run_dir)["train/loss"] for name, run_dir in runs.items()}
    resumed = dict(losses["killed"])
    for step, value in losses["uninterrupted"]:
        assert resumed[step] == value, step


BN_SYNC_WORKER = textwrap.dedent('''
    """Train 3 steps on 2 ranks (different data per rank), then save: what the checkpoint and the ranks hold."""
    import json, sys
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    from pretrain.config import load_config
    from pretrain.checkpoint import consolidated_state_dict, read_rank_states
    from pretrain.trainer import Trainer

    def batchnorm_buffers(model):
        return {f"{name}.{kind}": getattr(module, kind).detach().clone()
                for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)
                for kind in ("running_mean", "running_var")}

    class RecordingTrainer(Trainer):
        def save(self):
            before = batchnorm_buffers(self.engine.module)
            folder = super().save()
            after = batchnorm_buffers(self.engine.module)
            gathered = [None, None]
            dist.all_gather_object(gathered, (before, after))
            if self.world.is_main:
                saved = consolidated_state_dict(folder)
                rank_files = [state["batchnorm"] for state in read_rank_states(folder)]
                (before0, after0), (before1, after1) = gathered
                # the average over the ranks, correctly rounded to float32 once
                mean = {k: ((before0[k].double() + before1[k].double()) / 2).float() for k in before0}
                report = {
                    "buffers": len(before0),
                    "ranks_differ": max((before0[k] - before1[k]).abs().max().item() for k in before0),
                    "live_changed_by_the_save": max((a[k] - b[k]).abs().max().item() for b, a in gathered for k in b),
                    "checkpoint_vs_average": max((saved[k] - mean[k]).abs().max().item() for k in mean),
                    "rank_files_vs_own": max((own[k] - b[k]).abs().max().item()
                                             for own, (b, _) in zip(rank_files, gathered) for k in b),
                }
                with open(sys.argv[2], "w") as f:
                    json.dump(report, f)
            return folder

    trainer = RecordingTrainer(load_config("demo", json.loads(sys.argv[1])))
    try:
        trainer.train()
    finally:
        trainer.close()
''')


@pytest.mark.parametrize("stage", [3])
def test_a_checkpoint_holds_the_rank_average_of_batchnorm_statistics_and_ranks_keep_their_own(stage, pretrain_shards,
                                                                                            tmp_path):
    """The model files hold the average over ranks (correctly rounded: exact here); each rank's rank
    file holds its own statistics, which it keeps training with, untouched by the save."""
    script, report = tmp_path / "bn_sync_worker.py", tmp_path / "report.json"
    script.write_text(BN_SYNC_WORKER)
    overrides = distributed_overrides(pretrain_shards, tmp_path / "run", **{
        "train.zero_stage": stage, "train.max_steps": 3, "data.val_urls": ""})
    run_torchrun([str(script), json.dumps(overrides), str(report)])
    result = json.loads(report.read_text())
    import unireplknet

    tiny = unireplknet.UniRepLKNet(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), num_classes=10,
                                   kernel_sizes=((3,), (13,), (13, 3), (13,)))
    batchnorms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in tiny.modules())
    assert result["buffers"] == 2 * batchnorms  # running mean and var of every block and branch norm
    assert result["ranks_differ"] > 1e-4
    assert result["live_changed_by_the_save"] == 0.0
    assert result["checkpoint_vs_average"] == 0.0
    assert result["rank_files_vs_own"] == 0.0


def test_torchrun_launcher_forwards_sigusr1_and_exits_for_requeue(pretrain_shards, tmp_path):
    from pretrain.train import REQUEUE_EXIT_CODE

    run_dir = tmp_path / "run"
    args = ["--config", "demo", "--set", *distributed_overrides(pretrain_shards, run_dir, **{
        "train.max_steps": 10_000, "train.epochs": 400, "launch.launcher": "torchrun", "launch.num_workers": 2})]
    process = subprocess.Popen([sys.executable, "-m", "pretrain", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    log, deadline = run_dir / "train.log", time.time() + 300
    while not (log.exists() and "step 2/" in log.read_text()):
        assert process.poll() is None, process.stderr.read()[-4000:]
        assert time.time() < deadline
        time.sleep(0.1)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == REQUEUE_EXIT_CODE, stderr[-4000:]
    stopped_at = int((run_dir / "REQUEUE").read_text())
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"


# ----------------------------------------------------------------------------- Ray Train


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster on loopback for this module (4 logical CPUs: 2 workers x (1 + a loader process)),
    stopped afterwards."""
    previous_auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # Ray 2.60 turns token auth on by default
    import ray

    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1",
                                       "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]}})
    try:
        yield ray
    finally:
        ray.shutdown()
        if previous_auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous_auth


def ray_train_worker_pids() -> list[int]:
    """PIDs of this test process's Ray Train workers (its ``ray.init`` cluster's, never another test worker's;
    not their DataLoader children, which inherit the title)."""
    def title(pid) -> str:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""

    def parent(pid) -> int:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])

    workers = [pid for pid in process_tree(os.getpid())[1:] if title(pid).startswith("ray::RayTrainWorker")]
    return [pid for pid in workers if not title(parent(pid)).startswith("ray::RayTrainWorker")]


@pytest.mark.ray_cluster
def test_ray_train_matches_the_single_process_computation_and_a_killed_worker_changes_nothing(
        ray_cluster, pretrain_shards, reference, tmp_path):
    """Ray Train at the XL recipe's ZeRO-2 starts the same DeepSpeed engine as torchrun (each stage is checked
    above; the launcher is what this checks): its losses match the single-process computation. Then the same run
    again, with one Ray Train worker killed (kill -9) after a checkpoint: the worker group restarts
    (FailureConfig), resumes from ``latest`` and ends with the first run's weights and losses, bit for bit."""
    import threading

    from pretrain.checkpoint import consolidated_state_dict
    from pretrain.config import load_config
    from pretrain.launch import launch

    changes = {"train.zero_stage": 2, "launch.launcher": "ray", "launch.num_workers": 2, "launch.device": "cpu",
               "launch.max_failures": 2, "checkpoint.every": 2, **FP64}
    uninterrupted = tmp_path / "uninterrupted"
    assert launch(load_config("demo", distributed_overrides(pretrain_shards, uninterrupted, **changes))) == 0
    losses = [v for _, v in read_scalars(uninterrupted)["train/loss"]]
    assert_matches_reference(losses, reference)
    assert (uninterrupted / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"

    run_dir = tmp_path / "run"
    killed: list[tuple[int, str]] = []
    seen: list[str] = []  # what the killer saw last, for the message when it found nothing to kill
    launched = threading.Event()

    def kill_one_worker_after_a_checkpoint() -> None:
        """Once a checkpoint is complete and both workers are up (however long Ray takes to start them on a
        loaded machine), kill one; give up only when the run has ended."""
        latest = run_dir / "checkpoints" / "latest"
        while not launched.is_set():
            pids = ray_train_worker_pids() if latest.exists() else []
            seen[:] = [f"latest={latest.read_text() if latest.exists() else None}", f"workers={pids}"]
            if len(pids) == 2:
                os.kill(pids[1], signal.SIGKILL)
                killed.append((pids[1], latest.read_text()))
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker_after_a_checkpoint, daemon=True)
    killer.start()
    try:
        assert launch(load_config("demo", distributed_overrides(pretrain_shards, run_dir, **changes))) == 0
    finally:
        launched.set()
        killer.join(timeout=10)
    assert killed, f"no Ray Train worker was found to kill (last seen: {seen})"
    assert killed[0][1] < f"step_{STEPS:08d}", "the run finished before the kill"
    assert "Ray Train restarted the workers" in (run_dir / "train.log").read_text()
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"
    expected, actual = (consolidated_state_dict(str(d / "checkpoints" / f"step_{STEPS:08d}"))
                        for d in (uninterrupted, run_dir))
    assert expected.keys() == actual.keys() and sum("running_var" in k for k in expected) > 10
    assert all(torch.equal(expected[k], actual[k]) for k in expected), killed
    assert dict(read_scalars(run_dir)["train/loss"]) == dict(read_scalars(uninterrupted)["train/loss"])

    # ``pretrain evaluate``'s worker through the same launcher: the run's weights scored by 2 Ray Train workers
    # give the run's own final evaluation (every validation image once), written beside it, not into it
    from pretrain.evaluate import EVALUATE_ENTRY, evaluation_config

    final = json.loads((uninterrupted / "metrics.json").read_text())
    evaluated = tmp_path / "evaluated"
    config = evaluation_config(load_config("demo", distributed_overrides(pretrain_shards, evaluated, **changes)),
                               str(uninterrupted), out=str(evaluated))
    assert launch(config, EVALUATE_ENTRY) == 0
    scored = json.loads((evaluated / "metrics.json").read_text())
    assert scored["step"] == STEPS and scored["eval/samples"] == final["eval/samples"] > 0
    assert scored["eval/top1"] == final["eval/top1"] and scored["eval/loss"] == pytest.approx(final["eval/loss"])
    assert not (uninterrupted / "evaluate.log").exists()


def test_torchrun_on_two_nodes_through_a_c10d_rendezvous(pretrain_shards, reference, tmp_path):
    """``launch.nodes=2``: the same command started twice (here both "nodes" are this machine)."""
    from test_pretrain_train import free_port

    run_dir = tmp_path / "run"
    args = ["--config", "demo", "--set", *distributed_overrides(pretrain_shards, run_dir, **{
        "launch.launcher": "torchrun", "launch.num_workers": 2, "launch.nodes": 2,
        "launch.rdzv_endpoint": f"127.0.0.1:{free_port()}", "launch.rdzv_id": "two-nodes", **FP64})]
    nodes = [subprocess.Popen([sys.executable, "-m", "pretrain", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for node in nodes:
        _, stderr = node.communicate(timeout=400)
        assert node.returncode == 0, stderr[-4000:]
    losses = [v for _, v in read_scalars(run_dir)["train/loss"]]
    assert_matches_reference(losses, reference)


def test_zero3_ema_evaluation_equals_a_single_process_evaluation_of_the_exported_ema(pretrain_shards, tmp_path):
    """ZeRO-3 keeps parameters under its persistence threshold (all of this tiny net's) whole on every
    rank: the EMA written into the partitions must reach them, or ``eval_ema`` scores the live weights."""
    from pretrain.config import load_config
    from pretrain.distributed import WorldInfo
    from pretrain.export import export_checkpoint
    from pretrain.classification.task import ImageClassification, build_model

    run_dir = tmp_path / "run"
    overrides = distributed_overrides(pretrain_shards, run_dir, **{"train.zero_stage": 3, "train.ema_decay": 0.5})
    run_torchrun(["-m", "pretrain", "--config", "demo", "--set", *overrides])
    scalars = read_scalars(run_dir)
    ema_top1, ema_loss = scalars["eval_ema/top1"][-1][1], scalars["eval_ema/loss"][-1][1]
    assert abs(scalars["eval/loss"][-1][1] - ema_loss) > 1e-3, "EMA and live weights score alike: no test"

    exported = tmp_path / "ema.pth"
    export_checkpoint(str(run_dir), str(exported), ema=True)
    config = load_config("demo", overrides)
    task = ImageClassification(config)
    model = build_model(config)
    model.load_state_dict(torch.load(exported, weights_only=True), strict=True)
    model.eval()
    sums = dict.fromkeys(task.eval_sum_names, 0.0)
    with torch.no_grad():
        for batch in task.build_eval_loader(WorldInfo()):
            inputs, targets = task.prepare_batch(batch, torch.device("cpu"))
            for name, value in task.eval_sums(model(inputs), targets).items():
                sums[name] += float(value)
    single = task.eval_results(sums)
    assert single["samples"] == 128
    assert single["loss"] == pytest.approx(ema_loss, rel=1e-5)
    assert single["top1"] == pytest.approx(ema_top1, abs=1e-9)


@pytest.mark.ray_cluster
def test_ray_launch_with_device_auto_on_a_cluster_without_gpus_is_refused(ray_cluster, pretrain_shards, tmp_path):
    from pretrain.config import ConfigError, load_config
    from pretrain.launch import launch

    config = load_config("demo", distributed_overrides(pretrain_shards, tmp_path / "run", **{
        "launch.launcher": "ray", "launch.num_workers": 2, "launch.device": "auto"}))
    with pytest.raises(ConfigError, match="launch.device: auto found no GPU in the Ray cluster"):
        launch(config)
    assert not (tmp_path / "run" / "checkpoints").exists()


WORKER_ENTRY = textwrap.dedent('''
    """A task's own worker entry: reads the launch config torchrun hands it, reports rank and world size."""
    import json, os, sys
    from pretrain.config import load_config

    config = load_config(sys.argv[sys.argv.index("--config") + 1])
    with open(os.path.join(config.run_dir, f"entry_rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"world_size": int(os.environ["WORLD_SIZE"]), "run_dir": config.run_dir}, f)
''')


def test_the_torchrun_launcher_runs_any_worker_entry(pretrain_shards, tmp_path):
    """Fine-tune stages pass their own entry; the launcher only starts it on every rank."""
    from pretrain.config import load_config
    from pretrain.launch import WorkerEntry, launch

    script = tmp_path / "entry.py"
    script.write_text(WORKER_ENTRY)
    run_dir = tmp_path / "run"
    config = load_config("demo", distributed_overrides(pretrain_shards, "run_relative", **{
        "launch.launcher": "torchrun", "launch.num_workers": 2, "checkpoint.resume": "old/step_00000004"}))
    config.run_dir = str(run_dir)
    assert launch(config, WorkerEntry(module_args=(str(script),))) == 0
    reports = [json.loads((run_dir / f"entry_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(r == {"world_size": 2, "run_dir": str(run_dir)} for r in reports)
    handed = json.loads((run_dir / "launch_config.json").read_text())
    assert handed["checkpoint"]["resume"] == os.path.join(os.getcwd(), "old", "step_00000004")  # made absolute
