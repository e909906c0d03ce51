"""``python -m cluster.stage``: the environment it reads, dry runs, missing inputs refused before any worker starts,
a stage on its own local Ray cluster preempted by a group SIGTERM (skipping complete stages and resuming changed
ones: ``test_pipeline.py``); ``python -m cluster.ray_nodes`` naming nodes that never joined."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def stage(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.stage", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_pretrain_dry_run_reads_the_documented_environment(tmp_path):
    env = {"UNIREPLKNET_RUN_ROOT": str(tmp_path / "runs"), "UNIREPLKNET_TRAIN_SHARDS": "s3://bucket/in22k/train",
           "UNIREPLKNET_VAL_SHARDS": "s3://bucket/in22k/val", "UNIREPLKNET_NUM_WORKERS": "32"}
    result = stage("pretrain_xl", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["run_dir"] == str(tmp_path / "runs" / "pretrain_xl")
    assert (config["data"]["train_urls"], config["data"]["val_urls"]) == ("s3://bucket/in22k/train", "s3://bucket/in22k/val")
    assert (config["launch"]["launcher"], config["launch"]["num_workers"]) == ("ray", 32)
    assert (config["model"]["name"], config["data"]["img_size"]) == ("unireplknet_xl", 384)  # xl_in22k_384
    assert not (tmp_path / "runs").exists()


def test_a_bad_setting_or_batch_split_fails_before_anything_runs(tmp_path):
    env = {"UNIREPLKNET_RUN_ROOT": str(tmp_path), "UNIREPLKNET_NUM_WORKERS": "3"}
    result = stage("pretrain_xl", "--dry-run", env=env)
    assert result.returncode == 2 and "train.global_batch_size: 4096 is not a multiple" in result.stderr
    result = stage("pretrain_xl", "--dry-run", "--set", "optim.lr=fast", env=env)
    assert result.returncode == 2 and "optim.lr: expected a number" in result.stderr


def test_coco_dry_run_reads_the_documented_environment(tmp_path):
    env = {"UNIREPLKNET_RUN_ROOT": str(tmp_path / "runs"), "UNIREPLKNET_COCO_ROOT": "s3://bucket/coco",
           "UNIREPLKNET_NUM_WORKERS": "8"}
    result = stage("finetune_coco", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert (config["task"], config["coco"]["data_root"], config["launch"]["num_workers"]) == ("coco", "s3://bucket/coco", 8)
    assert config["model"]["name"] == "unireplknet_xl" and config["train"]["epochs"] == 36
    assert config["model"]["init_from"] == str(tmp_path / "runs" / "export" / "export" / "backbone.pth")
    assert config["run_dir"] == str(tmp_path / "runs" / "finetune_coco")
    result = stage("finetune_coco", "--run-dir", str(tmp_path / "coco"), env=env)
    assert result.returncode != 0 and "no backbone at" in result.stderr


def test_ade20k_dry_run_reads_the_documented_environment(tmp_path):
    env = {"UNIREPLKNET_RUN_ROOT": str(tmp_path / "runs"), "UNIREPLKNET_ADE20K_ROOT": "s3://bucket/ADEChallengeData2016",
           "UNIREPLKNET_NUM_WORKERS": "8"}
    result = stage("finetune_ade20k", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["task"] == "ade20k" and config["run_dir"] == str(tmp_path / "runs" / "finetune_ade20k")
    assert config["ade20k"]["data_root"] == "s3://bucket/ADEChallengeData2016"
    assert config["model"]["init_from"] == str(tmp_path / "runs" / "export" / "export" / "backbone.pth")
    assert (config["model"]["name"], config["ade20k"]["crop_size"]) == ("unireplknet_xl", 640)
    assert (config["launch"]["launcher"], config["launch"]["num_workers"]) == ("ray", 8)
    result = stage("finetune_ade20k", "--dry-run", "--init", "/weights/b.pth", "--set", "train.zero_stage=3", env=env)
    assert result.returncode == 2 and "train.zero_stage: expected 0, 1 or 2 with task=ade20k" in result.stderr


def test_ade20k_without_a_backbone_names_the_missing_file(tmp_path):
    env = {"UNIREPLKNET_RUN_ROOT": str(tmp_path), "UNIREPLKNET_NUM_WORKERS": "1"}
    result = stage("finetune_ade20k", "--config", "ade20k_demo", env=env)
    assert result.returncode != 0
    assert f"no backbone at {tmp_path / 'export' / 'export' / 'backbone.pth'}" in result.stderr


def test_ray_nodes_names_the_nodes_that_never_joined():
    result = subprocess.run([sys.executable, "-m", "cluster.ray_nodes", "--address", "127.0.0.9:1", "--ips",
                             "127.0.0.8,127.0.0.9", "--names", "gpu07,gpu08", "--timeout", "3"], cwd=REPO,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert result.returncode == 1
    assert "gpu07 (127.0.0.8), gpu08 (127.0.0.9)" in result.stderr


def test_a_fine_tune_whose_data_is_missing_fails_in_one_line_before_any_worker_starts(tmp_path):
    """The task's preflight runs in the driver: exit 2 naming the missing folder or file, no Ray, no worker."""
    backbone = tmp_path / "backbone.pth"
    backbone.write_bytes(b"")  # only its existence matters before the workers
    env = {"UNIREPLKNET_RUN_ROOT": str(tmp_path / "runs")}
    finetune = subprocess.run([sys.executable, "-m", "finetune", "ade20k", "--data", "/nonexistent/ade", "--init",
                               str(backbone), "--run-dir", str(tmp_path / "runs" / "finetune")], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    ade = stage("finetune_ade20k", "--data", "/nonexistent/ade", "--init", str(backbone), "--set",
                "launch.num_workers=1", "launch.device=cpu", env=env)
    coco = stage("finetune_coco", "--data", str(tmp_path / "coco"), "--init", str(backbone), "--set",
                 "launch.num_workers=1", "launch.device=cpu", env=env)
    missing = {"ade20k": "/nonexistent/ade/images/training", "coco": f"{tmp_path / 'coco'}/annotations/instances_train2017.json"}
    for result, task in ((finetune, "ade20k"), (ade, "ade20k"), (coco, "coco")):
        assert result.returncode == 2, result.stderr[-3000:]
        (line,) = result.stderr.strip().splitlines()
        assert f"{task}.data_root: " in line and missing[task] in line, line
    for name in ("finetune", "finetune_ade20k", "finetune_coco"):  # no Ray cluster, no worker, no training log
        assert not (tmp_path / "runs" / name / "ray").exists() and not (tmp_path / "runs" / name / "train.log").exists()


def test_a_driver_keeps_a_stop_signal_from_its_start_up_and_removes_a_stale_stop_file(tmp_path):
    """What a stage driver does with SIGTERM / SIGUSR1 (its process group's, twice) before and during its run."""
    stop_file = tmp_path / "run" / "STOP"
    stop_file.parent.mkdir()
    stop_file.write_text("SIGTERM\n")  # left by an earlier run
    script = f"""
import os, signal
from pretrain.driver_signals import catch_stop_signals, stop_file_requests
catch_stop_signals()
os.killpg(0, signal.SIGTERM)  # while starting: kept, not fatal
os.killpg(0, signal.SIGTERM)
with stop_file_requests({str(stop_file)!r}):
    print("started:", open({str(stop_file)!r}).read().split())
    os.kill(os.getpid(), signal.SIGUSR1)
print("ran:", open({str(stop_file)!r}).read().split())
os.killpg(0, signal.SIGTERM)  # after the run: the rest of the volley must not kill it either
print("done")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                            start_new_session=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["started: ['SIGTERM', 'SIGTERM']", "ran: ['SIGTERM', 'SIGTERM', 'SIGUSR1']",
                                          "done"]
    assert f"removed {stop_file} (SIGTERM), left by an earlier run" in result.stderr


def session_members(session: int) -> list[str]:
    """``ps``'s view of the live processes of a session."""
    rows = subprocess.run(["ps", "-e", "-o", "sid=,stat=,pid=,args="], capture_output=True, text=True).stdout
    return [row.strip() for row in rows.splitlines()
            if int(row.split()[0]) == session and not row.split()[1].startswith("Z")]


@pytest.mark.ray_cluster
@pytest.mark.slow
def test_a_stage_on_its_own_ray_cluster_checkpoints_on_a_group_sigterm_and_leaves_nothing(tmp_path):
    """Without RAY_ADDRESS the stage starts its own Ray cluster, outside its process group: SIGTERM to the group,
    twice, reaches the driver only, the Ray Train worker checkpoints, the stage exits 75 and stops that cluster."""
    import torch

    import unireplknet

    backbone = unireplknet.UniRepLKNet(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128),
                                       kernel_sizes=((3,), (13,), (13, 3), (13,)), num_classes=10)
    torch.save(unireplknet.export_official(backbone), tmp_path / "backbone.pth")
    run_dir, output = tmp_path / "ade", tmp_path / "stage.out"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "UNIREPLKNET_RUN_ROOT")}
    with open(output, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cluster.stage", "finetune_ade20k", "--run-dir", str(run_dir), "--config",
             "ade20k_demo", "--init", str(tmp_path / "backbone.pth"), "--set", "ade20k.data_root=data",
             "ade20k.crop_size=64", "launch.device=cpu", "launch.num_workers=1", "train.log_every=1",
             "train.max_steps=100000"], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)  # from another directory, the data root relative to it: made absolute
    deadline = time.time() + 400
    while not ((run_dir / "train.log").exists() and "step 1/" in (run_dir / "train.log").read_text()):
        assert process.poll() is None and time.time() < deadline, output.read_text()[-4000:]
        time.sleep(0.2)
    for _ in range(2):
        os.killpg(process.pid, signal.SIGTERM)
        time.sleep(0.3)
    assert process.wait(timeout=300) == 75, output.read_text()[-4000:]
    step = int((run_dir / "REQUEUE").read_text())
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    assert f"stop requested ({run_dir / 'STOP'})" in (run_dir / "train.log").read_text()
    assert (tmp_path / "data" / "COMPLETE").is_file()  # the Ray Train worker wrote the demo set where it was asked
    assert json.loads((run_dir / "config.json").read_text())["ade20k"]["data_root"] == str(tmp_path / "data")
    (ray_session,) = re.findall(r"started a local Ray cluster at \S+ \(session (\d+)", output.read_text())
    deadline = time.time() + 15
    while (left := session_members(process.pid) + session_members(int(ray_session))) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of the stage outlived it: {left}"
