"""``python -m cluster.stage``: the environment it reads, dry runs, the stage not built yet (skipping complete
stages and resuming changed ones: ``test_pipeline.py``); ``python -m cluster.ray_nodes`` naming nodes that never joined."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
