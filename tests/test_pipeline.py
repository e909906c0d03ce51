"""``python -m cluster.pipeline --config demo`` end to end on a local Ray cluster it starts itself: demo pretraining
-> export -> ADE20K demo fine-tune -> summary; a rerun skips what is complete and resumes what changed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_pretrain_train import read_scalars

REPO = Path(__file__).resolve().parents[1]


def pipeline(run_root: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "UNIREPLKNET_RUN_ROOT")}
    return subprocess.run([sys.executable, "-m", "cluster.pipeline", "--config", "demo", "--run-root", str(run_root),
                           "--set", *overrides], cwd=REPO, capture_output=True, text=True, timeout=900, env=env)


def test_demo_pipeline_runs_every_stage_then_skips_and_resumes_on_rerun(pretrain_shards, tmp_path):
    runs = tmp_path / "runs"
    overrides = [f"finetune_coco:coco.data_root={tmp_path / 'coco'}", "finetune_coco:train.max_steps=8",
                 f"pretrain_xl:data.demo_dir={tmp_path / 'digits'}", "pretrain_xl:data.demo_train_samples=512",
                 "pretrain_xl:data.demo_val_samples=128", "pretrain_xl:train.epochs=1",
                 f"finetune_ade20k:ade20k.data_root={tmp_path / 'ade20k'}", "finetune_ade20k:train.max_steps=16",
                 "finetune_ade20k:ade20k.crop_size=96"]
    first = pipeline(runs, *overrides)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.loads((runs / "pipeline" / "summary.json").read_text())
    stages = summary["stages"]
    assert summary["status"] == "complete"
    assert [stages[s]["status"] for s in ("pretrain_xl", "export", "finetune_ade20k", "finetune_coco")] == [0, 0, 0, 0]
    assert stages["finetune_coco"]["metrics"]["step"] == 8 and "eval/segm_AP" in stages["finetune_coco"]["metrics"]
    assert stages["pretrain_xl"]["metrics"]["eval/top1"] > 10.0  # 10 classes: chance is 10 %
    assert stages["finetune_ade20k"]["metrics"]["step"] == 16 and stages["finetune_ade20k"]["metrics"]["eval/mIoU"] > 0
    assert (runs / "export" / "export" / "backbone.pth").is_file()
    assert f"backbone from {runs / 'export' / 'export' / 'backbone.pth'}" in (runs / "finetune_ade20k" / "train.log").read_text()
    scalars = read_scalars(runs / "pipeline")
    assert "finetune_ade20k/mIoU" in scalars and "pretrain_xl/top1" in scalars and "finetune_coco/bbox_AP" in scalars
    assert f"tensorboard --logdir {runs}" in first.stdout and "mIoU" in first.stdout

    again = pipeline(runs, *overrides[:-2], "finetune_ade20k:train.max_steps=20", overrides[-1])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for stage in ("pretrain_xl", "export"):  # the first run's output has no such line
        assert f"stage {stage} is complete" in (runs / stage / "stage.log").read_text(), stage
    ade_log = (runs / "finetune_ade20k" / "train.log").read_text()
    assert "resumed from" in ade_log and "step_00000016" in ade_log
    assert json.loads((runs / "pipeline" / "summary.json").read_text())["stages"]["finetune_ade20k"]["metrics"]["step"] == 20
