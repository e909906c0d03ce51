"""Preemption as clusters deliver it: SIGTERM to the whole process group (Slurm, torchrun's killpg), twice,
during the final evaluation, with loader workers; a stop file; a Ray Train run asked to stop.

Every run is a real ``python -m pretrain`` process tree (DeepSpeed on CPU, DataLoader workers > 0). SIGTERM twice
to a single process's group, then a bit-exact rerun, is checked for every task in ``test_task_conformance.py``."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_pretrain_distributed import process_tree
from test_pretrain_train import read_scalars, run_cli, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
REQUEUE = 75


def start(args: list[str], **popen) -> subprocess.Popen:
    """``python -m pretrain ARGS`` as the leader of a new process group (as a batch step runs under Slurm)."""
    return subprocess.Popen([sys.executable, "-m", "pretrain", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)


def wait_for_log(process: subprocess.Popen, log: Path, text: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not (log.exists() and text in log.read_text()):
        assert process.poll() is None, process.stderr.read()[-4000:]
        assert time.time() < deadline, f"{text!r} never appeared in {log}"
        time.sleep(0.05)


def signal_group(process: subprocess.Popen, times: int = 2, interval: float = 0.3, sig=signal.SIGTERM) -> None:
    """Signal the whole process group ``times`` times (Slurm and torchrun repeat themselves)."""
    for attempt in range(times):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        time.sleep(interval)


def group_sigterm_then_resume(args: list[str], run_dir: Path, after_log: str, more_steps: int) -> int:
    """Start ARGS, SIGTERM its whole process group twice once ``after_log`` is logged, expect the requeue
    exit with a checkpoint, rerun for ``more_steps`` and expect it to resume; returns the stop step."""
    process = start(args)
    wait_for_log(process, run_dir / "train.log", after_log)
    signal_group(process)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == REQUEUE, stderr[-4000:]
    assert "killed by signal" not in stderr
    stopped_at = int((run_dir / "REQUEUE").read_text())
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"
    rerun = run_cli([*args, f"train.max_steps={stopped_at + more_steps}"], timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert f"at step {stopped_at}" in (run_dir / "train.log").read_text()
    return stopped_at


def final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    from pretrain.checkpoint import consolidated_state_dict

    return consolidated_state_dict(str(run_dir / "checkpoints" / f"step_{step:08d}"))


def assert_same_weights(a: dict, b: dict) -> None:
    """Every parameter and buffer equal bit for bit (BatchNorm running statistics among them)."""
    assert a.keys() == b.keys() and sum("running_var" in k for k in a) > 10
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def test_signals_during_the_final_evaluation_keep_the_final_checkpoint(pretrain_shards, tmp_path):
    """The last checkpoint is written before the final evaluation; signals during it cut it short
    (exit for requeue), and the rerun only evaluates."""
    from shards import write_demo

    val = tmp_path / "val"
    write_demo(str(val), "val", num_samples=2000, samples_per_shard=500, seed=1)  # a final evaluation of seconds
    run_dir = tmp_path / "run"
    args = ["--config", "demo", "--set", *tiny_overrides(pretrain_shards, run_dir, **{
        "loader.num_workers": 2, "data.val_urls": str(val), "train.max_steps": 4})]
    process = start(args)
    wait_for_log(process, run_dir / "train.log", "saved " + str(run_dir / "checkpoints" / "step_00000004"))
    signal_group(process, times=8, interval=0.05)  # a volley over the start of the evaluation's loader workers
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == REQUEUE, stderr[-4000:]
    assert "killed by signal" not in stderr
    log = (run_dir / "train.log").read_text()
    assert "during evaluation: evaluation skipped" in log and "eval at step 4" not in log
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"

    rerun = run_cli(args, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert "eval at step 4" in (run_dir / "train.log").read_text()
    scalars = read_scalars(run_dir)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert scalars["eval/samples"][-1] == (4, 2000.0)


def test_a_stop_file_checkpoints_and_exits_for_requeue(pretrain_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--config", "demo", "--set", *tiny_overrides(pretrain_shards, run_dir, **{
        "loader.num_workers": 1, "train.epochs": 20})]
    process = start(args)
    wait_for_log(process, run_dir / "train.log", "step 2/")
    (run_dir / "STOP").write_text("preStop hook\n")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == REQUEUE, stderr[-4000:]
    stopped_at = int((run_dir / "REQUEUE").read_text())
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"
    assert not (run_dir / "STOP").exists(), "a served stop request must not stop the rerun"
    assert f"stop requested ({run_dir / 'STOP'})" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_torchrun_launcher_survives_a_group_sigterm_with_loader_workers(pretrain_shards, tmp_path):
    run_dir = tmp_path / "run"
    changes = {"loader.num_workers": 1, "train.epochs": 40, "train.global_batch_size": 32, "train.micro_batch_size": 8,
               "launch.launcher": "torchrun", "launch.num_workers": 2}
    args = ["--config", "demo", "--set", *tiny_overrides(pretrain_shards, run_dir, **changes)]
    stopped_at = group_sigterm_then_resume(args, run_dir, "step 2/", more_steps=2)

    # the preemption save came off the checkpoint schedule (checkpoint.every is 1000), which the
    # uninterrupted run never has: BatchNorm statistics must still come out bit-identical
    uninterrupted = tmp_path / "uninterrupted"
    result = run_cli(["--config", "demo", "--set", *tiny_overrides(pretrain_shards, uninterrupted, **changes),
                      f"train.max_steps={stopped_at + 2}"], timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    assert_same_weights(final_weights(run_dir, stopped_at + 2), final_weights(uninterrupted, stopped_at + 2))


@pytest.mark.ray_cluster
@pytest.mark.slow
def test_a_ray_train_run_asked_to_stop_checkpoints_exits_for_requeue_and_resumes_exactly(pretrain_shards, tmp_path):
    """SIGTERM to the Ray driver (what Kubernetes sends a job's pod) becomes RUN_DIR/STOP; the Ray Train
    workers, whose loop runs off the main thread, checkpoint and stop; the rerun continues exactly."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    changes = {"loader.num_workers": 1, "train.epochs": 40, "train.global_batch_size": 32, "train.micro_batch_size": 8,
               "optim.clip_grad": 1.0, "data.crop_scale_min": 0.5}
    run_dir = tmp_path / "run"
    args = ["--config", "demo", "--set", *tiny_overrides(pretrain_shards, run_dir, **changes),
            "launch.launcher=ray", "launch.num_workers=2", "launch.device=cpu"]
    process = subprocess.Popen([sys.executable, "-m", "pretrain", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=env)
    wait_for_log(process, run_dir / "train.log", "step 3/", timeout=400)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=400)
    assert process.returncode == REQUEUE, stderr[-4000:]
    stopped_at = int((run_dir / "REQUEUE").read_text())
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"
    assert not (run_dir / "STOP").exists()

    rerun = subprocess.run([sys.executable, "-m", "pretrain", *args, f"train.max_steps={stopped_at + 2}"], cwd=REPO,
                           capture_output=True, text=True, env=env, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert f"at step {stopped_at}" in (run_dir / "train.log").read_text()

    uninterrupted = tmp_path / "uninterrupted"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "pretrain",
         "--config", "demo", "--set", *tiny_overrides(pretrain_shards, uninterrupted, **changes),
         f"train.max_steps={stopped_at + 2}", "launch.device=cpu"],  # no save where the preempted run saved
        cwd=REPO, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    assert_same_weights(final_weights(run_dir, stopped_at + 2), final_weights(uninterrupted, stopped_at + 2))


def test_a_loader_worker_killed_outright_fails_the_run_fast_instead_of_hanging(pretrain_shards, tmp_path):
    """The OOM killer's SIGKILL is no preemption: the run must fail (not wait forever on its workers)."""
    run_dir = tmp_path / "run"
    process = start(["--config", "demo", "--set", *tiny_overrides(pretrain_shards, run_dir, **{
        "loader.num_workers": 2, "train.epochs": 20})])
    wait_for_log(process, run_dir / "train.log", "step 2/")
    with open(f"/proc/{process.pid}/cmdline", "rb") as f:
        command = f.read()
    workers = [pid for pid in process_tree(process.pid)[1:] if Path(f"/proc/{pid}/cmdline").read_bytes() == command]
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode not in (0, REQUEUE), stderr[-3000:]
    assert "killed by signal" in stderr
