"""``sbatch slurm/pretrain_xl.sh`` on a real Slurm (munged, slurmctld, slurmd n1 + n2 on this machine):
a Ray cluster over both nodes, Ray Train on 2 workers, resume on resubmission, USR1 before the time
limit -> checkpoint -> requeue -> resume to completion, and nothing left running afterwards.

``.ci/run`` installs the Debian packages (``make system-deps``) and sets UNIREPLKNET_REQUIRE_SLURM=1, so
in CI a missing Slurm fails instead of skipping."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from slurm_cluster import CRED_EXPIRE, NODES, WORKSTATION, SlurmCluster, missing_binaries

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.ray_cluster]


def started_slurm(root: Path, nodes: dict[str, str], workers: int):
    """A Slurm of ``nodes`` for a test, with the environment the stage scripts read (CPU, ``workers`` Ray Train
    workers); skipped (failed in CI) where Slurm is not installed."""
    missing = missing_binaries()
    if missing:
        message = f"Slurm/munge not installed ({', '.join(missing)}): `make system-deps` installs them"
        if os.environ.get("UNIREPLKNET_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    cluster = SlurmCluster(root / "daemons", nodes)
    cluster.start()
    cluster.env.update(RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1", RAY_GPUS_PER_NODE="0",
                       UNIREPLKNET_NUM_WORKERS=str(workers), UNIREPLKNET_RUN_ROOT=str(root / "runs"),
                       UNIREPLKNET_HOME=str(REPO), TORCH_EXTENSIONS_DIR=os.environ["TORCH_EXTENSIONS_DIR"])
    return cluster


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = started_slurm(tmp_path_factory.mktemp("slurm"), NODES, workers=2)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def workstation_slurm(tmp_path):
    """One node, ``NodeAddr=127.0.0.1``: a Slurm installed on a workstation."""
    cluster = started_slurm(tmp_path / "slurm", WORKSTATION, workers=1)
    try:
        yield cluster
    finally:
        cluster.stop()


def sbatch(slurm: SlurmCluster, out: Path, *stage_args: str, wait: bool, script: str = "slurm/pretrain_xl.sh") -> str:
    """Submit a stage script with CPU overrides (every node of ``slurm``, 2 CPUs each, no GPU); returns the job id."""
    command = ["sbatch", "--parsable", f"--nodes={len(slurm.nodes)}", "--cpus-per-task=2", "--gpus-per-node=0", "--time=30",
               "--exclusive", f"--output={out}", *(["--wait"] if wait else []), script, *stage_args]
    result = subprocess.run(command, cwd=REPO, env=slurm.env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{result.stderr}\n{out.read_text() if out.exists() else ''}"
    return result.stdout.strip().split(";")[0]


def demo_args(shards: dict, **changes) -> list[str]:
    values = {"data.source": "shards", "data.train_urls": shards["train"], "data.val_urls": shards["val"],
              "launch.device": "cpu", "loader.num_workers": 1, "train.global_batch_size": 32,
              "train.micro_batch_size": 8, "train.log_every": 1, "train.epochs": 20, **changes}
    return ["--config", "demo", "--set", *(f"{k}={v}" for k, v in values.items())]


def wait_for(condition, timeout: float, what: str, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command and "pytest" not in command:
            found.append(f"{pid} {command[:160]}")
    return found


def test_a_workstation_slurm_with_nodeaddr_127_0_0_1_runs_a_stage(workstation_slurm, pretrain_shards, tmp_path):
    """Ray registers a node started on 127.0.0.1 under the machine's own address: the bootstrap takes the head's
    address from Ray instead of waiting for 127.0.0.1 until it gives up."""
    out = tmp_path / "job.out"
    workstation_slurm.env["RAY_NODE_TIMEOUT"] = "60"  # the default 300 s is a long time for a test to fail in
    job = sbatch(workstation_slurm, out, *demo_args(pretrain_shards, **{"train.max_steps": 2}), wait=True)
    output = out.read_text()
    assert "Ray registered the head n1 as " in output and "(Slurm's address: 127.0.0.1)" in output, output[-3000:]
    assert "all 1 nodes joined" in output and "stage pretrain_xl finished with status 0" in output, output[-3000:]
    run_dir = Path(workstation_slurm.env["UNIREPLKNET_RUN_ROOT"]) / "pretrain_xl"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    temp_dir = f"/tmp/ray-j{job}"
    wait_for(lambda: not processes_mentioning(f"{temp_dir}/") + processes_mentioning(f"{temp_dir} "), 60,
             "the job's Ray processes to end")


def test_pretrain_xl_runs_on_two_nodes_resumes_and_requeues_on_usr1(slurm, pretrain_shards, tmp_path):
    run_dir = Path(slurm.env["UNIREPLKNET_RUN_ROOT"]) / "pretrain_xl"
    log = run_dir / "train.log"

    first = tmp_path / "first.out"
    job = sbatch(slurm, first, *demo_args(pretrain_shards, **{"train.max_steps": 4}), wait=True)
    output = first.read_text()
    assert f"all {len(NODES)} nodes joined" in output, output[-3000:]
    assert "stage pretrain_xl finished with status 0" in output
    assert "on cpu x2" in log.read_text()
    workers = {line.split("(ip=")[1].split(",")[0] for line in output.splitlines() if "world_rank=" in line}
    assert workers == set(NODES.values()), f"Ray Train workers on {workers}"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "COMPLETE").exists()
    node_logs = Path(slurm.env["UNIREPLKNET_RUN_ROOT"]) / "slurm-logs" / job
    assert {p.name for p in node_logs.iterdir()} == {"n1.log", "n2.log"}

    # the next submission resumes from the first one's checkpoint; USR1 (Slurm's warning before the time limit)
    # checkpoints it and requeues the job, which resumes again and finishes
    third = tmp_path / "third.out"
    final_step = 24
    job = sbatch(slurm, third, *demo_args(pretrain_shards, **{"train.max_steps": final_step}), wait=False)
    wait_for(lambda: log.exists() and "step 8/" in log.read_text(), 300, "the third job to train")
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    wait_for(lambda: "requeueing job" in third.read_text() if third.exists() else False, 300, "the requeue")
    wait_for(lambda: slurm.job_state(job).get("JobState") in ("PENDING", "REQUEUED", "RUNNING", "CONFIGURING"),
             60, "the requeued job")
    time.sleep(CRED_EXPIRE + 1)  # the old run's revoked credential has expired: the job may start again (earlier,
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)  # its nodes would refuse it)
    state = wait_for(lambda: (s := slurm.job_state(job)).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED")
                     and s, 600, "the requeued job to finish", every=2.0)
    output = third.read_text()
    assert state["JobState"] == "COMPLETED", output[-4000:]
    assert state.get("Restarts") == "1", state
    assert "USR1: asking stage pretrain_xl (pid " in output
    assert f"requeueing job {job}" in output
    text = log.read_text()
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000004'} at step 4" in text
    assert f"stop requested ({run_dir / 'STOP'})" in text
    resumed = [line for line in text.splitlines() if "resumed from" in line]
    assert len(resumed) >= 2 and f"step_{final_step:08d}" not in resumed[-1]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{final_step:08d}"
    assert not (run_dir / "STOP").exists()

    wait_for(lambda: not processes_mentioning("/tmp/ray-j"), 60, "this test's Ray processes to end")
    assert not processes_mentioning("slurmstepd"), processes_mentioning("slurmstepd")


def test_finetune_ade20k_script_trains_on_two_nodes(slurm, tmp_path):
    """``sbatch slurm/finetune_ade20k.sh`` (same bootstrap): the demo fine-tune on 2 Ray Train workers, one per node."""
    import torch

    import unireplknet
    from finetune.ade20k.demo_data import write_demo

    write_demo(tmp_path / "ade20k", train_images=16, val_images=4, seed=0)
    backbone = unireplknet.UniRepLKNet(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128),
                                       kernel_sizes=((3,), (13,), (13, 3), (13,)), num_classes=10)
    torch.save(unireplknet.export_official(backbone), tmp_path / "backbone.pth")
    out = tmp_path / "ade20k.out"
    run_dir = Path(slurm.env["UNIREPLKNET_RUN_ROOT"]) / "finetune_ade20k"
    sbatch(slurm, out, "--config", "ade20k_demo", "--data", str(tmp_path / "ade20k"), "--init",
           str(tmp_path / "backbone.pth"), "--set", "launch.device=cpu", "loader.num_workers=1", "train.max_steps=2",
           "ade20k.crop_size=64", "train.micro_batch_size=4", "train.global_batch_size=8", wait=True,
           script="slurm/finetune_ade20k.sh")
    wait_for(lambda: (run_dir / "COMPLETE").exists(), 60, "the stage's COMPLETE marker")
    log = out.read_text()
    assert "2 nodes" in log and "stage finetune_ade20k finished with status 0" in log, log[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == 2
    assert "on cpu x2" in (run_dir / "train.log").read_text()  # two ranks
