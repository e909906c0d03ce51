"""``python -m pretrain evaluate`` and ``python -m finetune evaluate``: weights scored without training, through
the command lines users run, on 1 and 2 ranks, from a run directory (EMA selectable), an exported inference-
structure file and a file in the authors' mmseg container; nothing is written into the weights' run directory.
Every registered task's evaluation of a run directory is checked in ``test_task_conformance.py``."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_pretrain_train import read_scalars, tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def snapshot(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p), p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def ema_run(pretrain_shards, tmp_path_factory) -> tuple[Path, list[str], dict]:
    """A demo classification run of 6 steps with EMA on the session's shards: (run dir, its data overrides,
    its final metrics)."""
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    data = [o for o in tiny_overrides(pretrain_shards, run_dir) if not o.startswith("run_dir=")]
    data += ["train.global_batch_size=32", "train.micro_batch_size=16", "train.ema_decay=0.5"]
    trainer = Trainer(load_config("demo", [f"run_dir={run_dir}", *data, "train.max_steps=6"]))
    try:
        result = trainer.train()
    finally:
        trainer.close()
    assert result.status == "completed" and "eval_ema/top1" in result.eval
    return run_dir, data, result.eval


def test_a_run_directory_evaluates_as_the_run_did_on_one_and_two_ranks_its_ema_too(ema_run, tmp_path):
    run_dir, data, final = ema_run
    before = snapshot(run_dir)

    one = run("pretrain", "evaluate", "--config", "demo", "--weights", str(run_dir), "--out", str(tmp_path / "one"),
              "--set", *data)
    assert one.returncode == 0, one.stderr[-3000:]
    metrics = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert metrics == {"step": 6, **{k: v for k, v in final.items() if k.startswith("eval/")}}
    assert dict(read_scalars(tmp_path / "one")["eval/top1"]) == {6: pytest.approx(final["eval/top1"], rel=1e-6)}

    two = run("pretrain", "evaluate", "--config", "demo", "--weights", str(run_dir), "--ema", "--out",
              str(tmp_path / "two"), "--set", *data, "launch.launcher=torchrun", "launch.num_workers=2",
              "loader.num_workers=1")
    assert two.returncode == 0, two.stderr[-3000:]
    ema = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert ema["eval/samples"] == final["eval_ema/samples"] == 128  # every sample once, over 2 ranks
    assert ema["eval/top1"] == final["eval_ema/top1"] and ema["eval/top5"] == final["eval_ema/top5"]
    assert ema["eval/loss"] == pytest.approx(final["eval_ema/loss"], rel=1e-6)  # summed in another order
    assert "on cpu x2" in (tmp_path / "two" / "evaluate.log").read_text()

    inside = run("pretrain", "evaluate", "--config", "demo", "--weights", str(run_dir), "--out", str(run_dir),
                 "--set", *data)
    assert inside.returncode == 2 and "is the run directory of the weights" in inside.stderr, inside.stderr[-2000:]
    missing = run("pretrain", "evaluate", "--config", "demo", "--weights", str(tmp_path / "nothing.pth"))
    assert missing.returncode == 2 and "nothing.pth" in missing.stderr
    assert snapshot(run_dir) == before, "an evaluation wrote into the weights' run directory"


def test_an_exported_inference_structure_file_evaluates_as_its_run(ema_run, tmp_path):
    """``pretrain export --reparameterize --official`` (what the authors release as their deploy files) scores
    the run's figures: folding the branches changes each logit by float32 rounding (~1e-6 relative), so the loss
    agrees to 1e-5 and at most one of the 128 predictions (a near tie) may differ."""
    run_dir, data, final = ema_run
    exported = tmp_path / "deploy.pth"
    result = run("pretrain", "export", str(run_dir), str(exported), "--reparameterize", "--official")
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = run("pretrain", "evaluate", "--config", "demo", "--weights", str(exported), "--out",
                    str(tmp_path / "out"), "--set", *data)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "(inference structure, step 0)" in (tmp_path / "out" / "evaluate.log").read_text()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["eval/samples"] == final["eval/samples"] == 128
    assert abs(metrics["eval/top1"] - final["eval/top1"]) <= 100 / 128
    assert metrics["eval/loss"] == pytest.approx(final["eval/loss"], rel=1e-5)


def test_an_ade20k_file_in_the_authors_mmcv_container_evaluates_through_finetune_evaluate(tmp_path):
    """The authors' ADE20K layout is the product's: a run's weights in mmcv's container (``meta`` with numpy
    scalars, ``state_dict``, ``optimizer``) score what the run scored."""
    from pretrain.config import load_config
    from pretrain.registry import registered_tasks
    from pretrain.trainer import Trainer

    data = tmp_path / "ade20k"
    settings = [*registered_tasks()["ade20k"].smoke_overrides, f"ade20k.data_root={data}", "model.init_from=",
                "train.max_steps=2", "train.eval_every=0", "loader.num_workers=1"]
    trainer = Trainer(load_config("ade20k_demo", [f"run_dir={tmp_path / 'run'}", *settings]))
    try:
        final = trainer.train().eval
    finally:
        trainer.close()
    from pretrain.checkpoint import consolidated_state_dict, find_checkpoint

    state = consolidated_state_dict(find_checkpoint(str(tmp_path / "run" / "checkpoints")))
    released = tmp_path / "upernet_released.pth"
    torch.save({"meta": {"hook_msgs": {"best_score": np.float64(0.25)}, "iter": np.int64(2)}, "state_dict": state,
                "optimizer": {"state": {}, "param_groups": []}}, released)

    result = run("finetune", "evaluate", "ade20k", "--config", "ade20k_demo", "--weights", str(released),
                 "--data", str(data), "--out", str(tmp_path / "out"),
                 "--set", *[s for s in settings if not s.startswith("ade20k.data_root=")])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics == {"step": 0, **final}
    assert metrics["eval/samples"] > 0
