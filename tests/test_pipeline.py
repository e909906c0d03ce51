"""``python -m cluster.pipeline --config demo`` end to end on a local Ray cluster it starts itself: demo pretraining
-> export -> the ADE20K and COCO demo fine-tunes -> summary; preempted by SIGTERM (to its process group, twice, as
Slurm and a pod stop send it; to its PID alone), every running stage checkpoints and the pipeline exits 75 with
nothing of it left running; a rerun resumes every stage, skips what is complete and resumes what changed."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_pretrain_train import read_scalars

REPO = Path(__file__).resolve().parents[1]
REQUEUE = 75
FINETUNES = ("finetune_ade20k", "finetune_coco")


def pipeline_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "UNIREPLKNET_RUN_ROOT")}


def pipeline(run_root: Path, *overrides: str, config: str = "demo") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.pipeline", "--config", config, "--run-root", str(run_root),
                           "--set", *overrides], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=pipeline_env())


def start_pipeline(run_root: Path, output: Path, *overrides: str) -> subprocess.Popen:
    """The pipeline as the leader of a new session and process group (``setsid``, as a batch step or a pod's
    command runs), its output to ``output``."""
    with open(output, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "cluster.pipeline", "--config", "demo", "--run-root",
                                 str(run_root), "--set", *overrides], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env=pipeline_env(), start_new_session=True)


def wait_for_text(process: subprocess.Popen, path: Path, text: str, since: int = 0, timeout: float = 400) -> None:
    """Until ``text`` appears in ``path`` after its first ``since`` characters (the process must keep running)."""
    deadline = time.time() + timeout
    while not (path.exists() and text in path.read_text()[since:]):
        assert process.poll() is None, f"exited {process.returncode} before {text!r} appeared in {path}"
        assert time.time() < deadline, f"{text!r} never appeared in {path}"
        time.sleep(0.2)


def session_members(session: int) -> list[str]:
    """``ps``'s view of the live processes of a session."""
    rows = subprocess.run(["ps", "-e", "-o", "sid=,stat=,pid=,args="], capture_output=True, text=True).stdout
    return [row.strip() for row in rows.splitlines()
            if int(row.split()[0]) == session and not row.split()[1].startswith("Z")]


def assert_nothing_left(process: subprocess.Popen, output: Path) -> None:
    """No process of the pipeline's session, nor of the local Ray cluster's (named in its log), is alive."""
    (ray_session,) = re.findall(r"started a local Ray cluster at \S+ \(session (\d+)", output.read_text())
    deadline = time.time() + 15
    while (left := session_members(process.pid) + session_members(int(ray_session))) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of the run outlived it: {left}"


def stopped_step(run_dir: Path) -> int:
    """The step a preempted run checkpointed at, which ``latest`` must name."""
    step = int((run_dir / "REQUEUE").read_text())
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    return step


@pytest.fixture
def started():
    """Pipelines a test started; any still running at its end (a failed test) is SIGKILLed with its process group
    (its Ray head then gets SIGTERM as its parent dies, and stops its node)."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.ray_cluster
def test_demo_pipeline_preempted_by_signals_resumes_every_stage_then_skips_complete_ones(started, tmp_path):
    runs = tmp_path / "runs"
    # the demo pipeline reserves 1 CPU per Ray Train worker (DEMO_OVERRIDES), so both fine-tunes run at once
    common = [f"pretrain_xl:data.demo_dir={tmp_path / 'digits'}", "pretrain_xl:data.demo_train_samples=512",
              "pretrain_xl:data.demo_val_samples=128", "pretrain_xl:train.epochs=1",
              f"finetune_ade20k:ade20k.data_root={tmp_path / 'ade20k'}", "finetune_ade20k:ade20k.crop_size=96",
              "finetune_ade20k:train.steps=100000", f"finetune_coco:coco.data_root={tmp_path / 'coco'}",
              *(f"finetune_coco:coco.{key}" for key in ("train_scales=96,112", "max_size=192", "eval_scale=192,112",
                                                         "rpn_proposals_train=100", "rpn_proposals_test=100",
                                                         "roi_batch=64", "box_channels=32", "mask_channels=32")),
              *(f"{stage}:{key}" for stage in FINETUNES for key in ("train.log_every=1",))]
    train_logs = {stage: runs / stage / "train.log" for stage in FINETUNES}

    # 1. SIGTERM to the whole process group, twice, once both fine-tunes train
    output = tmp_path / "first.out"
    first = start_pipeline(runs, output, *common, *(f"{stage}:train.max_steps=100000" for stage in FINETUNES))
    started.append(first)
    for stage in FINETUNES:
        wait_for_text(first, train_logs[stage], "step 1/")
    os.killpg(first.pid, signal.SIGTERM)
    time.sleep(0.3)
    os.killpg(first.pid, signal.SIGTERM)
    assert first.wait(timeout=400) == REQUEUE, output.read_text()[-4000:]
    assert_nothing_left(first, output)
    summary = json.loads((runs / "pipeline" / "summary.json").read_text())
    assert (summary["status"], summary["stop_signal"]) == ("preempted", "SIGTERM")
    assert [summary["stages"][s]["status"] for s in ("pretrain_xl", "export", *FINETUNES)] == [0, 0, REQUEUE, REQUEUE]
    stopped = {stage: stopped_step(runs / stage) for stage in FINETUNES}
    for stage in FINETUNES:
        assert "SIGTERM received: asking the workers to checkpoint and stop" in (runs / stage / "stage.log").read_text()
        assert f"stop requested ({runs / stage / 'STOP'})" in train_logs[stage].read_text()

    # 2. the rerun skips what is complete and resumes both fine-tunes; a stop file left behind (by a signal after
    # the checkpoint, or by a run whose workers died before serving it) is removed, not obeyed
    for stage in FINETUNES:
        (runs / stage / "STOP").write_text("SIGTERM\n")
    targets = {stage: stopped[stage] + 2 for stage in FINETUNES}
    second = pipeline(runs, *common, *(f"{stage}:train.max_steps={targets[stage]}" for stage in FINETUNES))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for stage in FINETUNES:
        assert f"removed {runs / stage / 'STOP'} (SIGTERM), left by an earlier run" in \
            (runs / stage / "stage.log").read_text()
    for stage in ("pretrain_xl", "export"):  # the first run's output has no such line
        assert f"stage {stage} is complete" in (runs / stage / "stage.log").read_text(), stage
    for stage in FINETUNES:
        assert f"resumed from {runs / stage / 'checkpoints' / f'step_{stopped[stage]:08d}'}" in \
            train_logs[stage].read_text(), stage
    summary = json.loads((runs / "pipeline" / "summary.json").read_text())
    stages = summary["stages"]
    assert summary["status"] == "complete"
    assert [stages[s]["status"] for s in ("pretrain_xl", "export", *FINETUNES)] == [0, 0, 0, 0]
    assert stages["pretrain_xl"]["metrics"]["eval/top1"] > 10.0  # 10 classes: chance is 10 %
    assert stages["finetune_coco"]["metrics"]["step"] == targets["finetune_coco"]
    assert "eval/segm_AP" in stages["finetune_coco"]["metrics"]
    assert stages["finetune_ade20k"]["metrics"]["step"] == targets["finetune_ade20k"]
    assert stages["finetune_ade20k"]["metrics"]["eval/mIoU"] > 0
    backbone = runs / "export" / "export" / "backbone.pth"
    assert backbone.is_file() and f"backbone from {backbone}" in train_logs["finetune_ade20k"].read_text()
    scalars = read_scalars(runs / "pipeline")
    assert "finetune_ade20k/mIoU" in scalars and "pretrain_xl/top1" in scalars and "finetune_coco/bbox_AP" in scalars
    assert f"tensorboard --logdir {runs}" in second.stdout and "mIoU" in second.stdout

    # 3. a changed stage resumes from its last checkpoint; SIGTERM to the pipeline's PID alone reaches it too
    output = tmp_path / "third.out"
    ade_log = train_logs["finetune_ade20k"]
    since = len(ade_log.read_text())
    third = start_pipeline(runs, output, *common, "finetune_ade20k:train.max_steps=100000",
                           f"finetune_coco:train.max_steps={targets['finetune_coco']}")
    started.append(third)
    wait_for_text(third, ade_log, f"step {targets['finetune_ade20k'] + 1}/", since=since)
    third.send_signal(signal.SIGTERM)
    assert third.wait(timeout=400) == REQUEUE, output.read_text()[-4000:]
    assert_nothing_left(third, output)
    assert f"step_{targets['finetune_ade20k']:08d}" in ade_log.read_text()[since:].split("resumed from", 1)[1][:200]
    assert stopped_step(runs / "finetune_ade20k") > targets["finetune_ade20k"]
    summary = json.loads((runs / "pipeline" / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["stages"]["finetune_ade20k"]["status"] == REQUEUE
    assert summary["stages"]["finetune_coco"]["status"] == 0
    assert (runs / "finetune_coco" / "stage.log").read_text().count("stage finetune_coco is complete") == 1


def test_a_misspelt_stage_in_set_is_refused_before_anything_starts(tmp_path):
    result = pipeline(tmp_path / "runs", "finetune_ade:train.max_steps=2")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "'finetune_ade'" in result.stderr
    assert "expected one of pretrain_xl, finetune_ade20k, finetune_coco" in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.ray_cluster
def test_the_universal_demo_pipeline_trains_the_tasks_the_authors_train_from_scratch(tmp_path):
    """``--config universal_demo``: the audio, video, point-cloud and time-series demo stages side by side on one
    local Ray cluster (Ray Train), no pretraining or export, no ``--init``, here with ZeRO-2 and EMA; the summary
    holds each stage's headline metrics, ``metrics.json`` the EMA weights' too."""
    from finetune.audio.demo_data import write_demo as write_audio
    from finetune.pointcloud.demo_data import write_demo as write_pointcloud
    from finetune.timeseries.demo_data import write_demo as write_timeseries
    from finetune.video.demo_data import write_demo as write_video

    write_audio(str(tmp_path / "audio"), seed=0, train_images=8, val_images=2)  # 80 / 20 / 20 spoken words
    write_video(tmp_path / "video", train_videos=48, val_videos=24, frames=24, seed=3)
    write_pointcloud(tmp_path / "pointcloud", train_per_class=4, test_per_class=2, points=256)  # 24 / 12 shapes
    write_timeseries(tmp_path / "timeseries", days=40)  # 44 stations: 601 / 25 / 121 windows
    runs = tmp_path / "runs"
    stages = {"finetune_audio": ("audio", "test/top1", "eval_ema/top1"),
              "finetune_video": ("video", "eval/top5", "eval_ema/top1"),
              "finetune_pointcloud": ("pointcloud", "test/oa", "eval_ema/oa"),
              "finetune_timeseries": ("timeseries", "test/mse", "eval_ema/mse")}
    data = {"finetune_audio": tmp_path / "audio", "finetune_video": tmp_path / "video",
            "finetune_pointcloud": tmp_path / "pointcloud" / "resampled",
            "finetune_timeseries": tmp_path / "timeseries"}
    upper = {"finetune_timeseries": math.inf}  # an error in the data's units; the others are percentages
    result = pipeline(runs, *(f"{stage}:{key}" for stage, (section, _, _) in stages.items() for key in (
        f"{section}.data_root={data[stage]}", f"{section}.generate_demo=false", "train.steps=4", "train.eval_every=0",
        "train.zero_stage=2", "train.ema_decay=0.9")), config="universal_demo")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    summary = json.loads((runs / "pipeline" / "summary.json").read_text())
    assert summary["status"] == "complete" and set(summary["stages"]) == set(stages)
    for stage, (_, metric, ema) in stages.items():
        assert summary["stages"][stage]["status"] == 0
        assert 0 <= summary["stages"][stage]["metrics"][metric] <= upper.get(stage, 100)
        config = json.loads((runs / stage / "config.json").read_text())
        assert config["model"]["init_from"] in (None, "") and config["train"]["zero_stage"] == 2
        metrics = json.loads((runs / stage / "metrics.json").read_text())
        assert metrics["step"] == 4 and 0 <= metrics[ema] < upper.get(stage, 101)
        assert f"{stage:<16s} exit 0" in result.stdout, result.stdout[-2000:]
    assert not (runs / "pretrain_xl").exists() and not (runs / "export").exists()
