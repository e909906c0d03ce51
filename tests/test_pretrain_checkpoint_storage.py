"""Where checkpoints go: a read-only or full checkpoint directory, leftovers of interrupted saves, and
``--resume none`` in a run directory that already holds checkpoints.

Real file systems: a read-only mount (or, for a user other than root, a directory without write
permission) and a small tmpfs that runs out of space in the middle of DeepSpeed's save.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from test_pretrain_train import read_scalars, run_cli, tiny_overrides


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def _unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@contextlib.contextmanager
def read_only(directory: Path):
    """``directory`` made read-only for real: without write permission for an ordinary user; for root,
    whom permissions do not stop, a read-only bind mount of it onto itself."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield "Permission denied"
        finally:
            directory.chmod(0o755)
        return
    try:
        _mount("--bind", str(directory), str(directory))
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"running as root, whom chmod does not stop, and a read-only bind mount is not permitted "
                    f"here ({getattr(error, 'stderr', error)})")
    try:
        _mount("-o", "remount,bind,ro", str(directory))
        yield "Read-only file system"
    finally:
        _unmount(directory)


@contextlib.contextmanager
def small_tmpfs(directory: Path, size: int):
    """A tmpfs of ``size`` bytes mounted on ``directory`` (a disk that fills up)."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory))
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"mounting a small tmpfs needs root with CAP_SYS_ADMIN ({getattr(error, 'stderr', error)})")
    try:
        yield
    finally:
        _unmount(directory)


def cli(shards, run_dir, **changes) -> subprocess.CompletedProcess:
    return run_cli(["--config", "demo", "--set", *tiny_overrides(shards, run_dir, **{
        "checkpoint.every": 2, "checkpoint.keep": 2, **changes})], timeout=300)


def held(checkpoints: Path) -> list[str]:
    """What a checkpoint directory holds, less the recovery scripts DeepSpeed copies next to the folders."""
    return sorted(name for name in os.listdir(checkpoints) if not name.endswith(".py"))


def trained_steps(run_dir: Path) -> list[int]:
    if not (run_dir / "tensorboard").exists():
        return []
    return [step for step, _ in read_scalars(run_dir).get("train/loss", [])]


# ----------------------------------------------------------------------------- read-only, full


def test_a_read_only_checkpoint_directory_fails_before_training_naming_it(pretrain_shards, tmp_path):
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    with read_only(checkpoints) as os_error:
        result = cli(pretrain_shards, run_dir, **{"train.max_steps": 4})
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"checkpoints cannot be written to {checkpoints}" in result.stderr, result.stderr[-3000:]
    assert os_error in result.stderr and "Traceback" not in result.stderr
    assert trained_steps(run_dir) == [], "trained although no checkpoint could be written"


def test_a_disk_that_fills_up_fails_the_save_clearly_and_the_rerun_before_training(pretrain_shards, tmp_path):
    """A tmpfs with room for the run and one checkpoint (6.1 MiB here) but not two: the save at step 4
    runs out of space inside DeepSpeed's files. The error names the directory and the OS error, the
    incomplete save is removed, ``latest`` still names step 2 (which still verifies); the rerun stops
    before training, saying how much space the next save needs. A leftover of a save killed midway is
    removed when a run starts."""
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    with small_tmpfs(run_dir, 9 << 20):
        failed = cli(pretrain_shards, run_dir, **{"train.max_steps": 4})
        assert failed.returncode == 2, failed.stderr[-3000:]
        assert (f"checkpoint step_00000004 could not be written to {checkpoints}: writing {checkpoints}"
                f"/.incomplete-step_00000004/") in failed.stderr, failed.stderr[-3000:]
        assert "[Errno 28] No space left on device" in failed.stderr and "Traceback" not in failed.stderr
        assert f"{checkpoints / 'latest'} still names {checkpoints / 'step_00000002'}" in failed.stderr
        assert held(checkpoints) == ["latest", "step_00000002"]
        assert (checkpoints / "latest").read_text() == "step_00000002"
        from pretrain.checkpoint import verify_checkpoint

        verify_checkpoint(str(checkpoints / "step_00000002"))
        assert trained_steps(run_dir) == [1, 2, 3, 4]

        rerun = cli(pretrain_shards, run_dir, **{"train.max_steps": 6})
        assert rerun.returncode == 2, rerun.stderr[-3000:]
        assert f"{checkpoints} has " in rerun.stderr and "that the last checkpoint" in rerun.stderr
        assert "the next save would fail" in rerun.stderr
        assert trained_steps(run_dir) == [1, 2, 3, 4], "the rerun trained although its save could not fit"

        subprocess.run(["mount", "-o", "remount,size=32m", str(run_dir)], check=True)
        leftover = checkpoints / ".incomplete-step_00000004"
        leftover.mkdir()
        (leftover / "mp_rank_00_model_states.pt").write_bytes(os.urandom(1 << 20))
        resumed = cli(pretrain_shards, run_dir, **{"train.max_steps": 4})
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"removing {leftover}, left by an interrupted save" in (run_dir / "train.log").read_text()
        assert (checkpoints / "latest").read_text() == "step_00000004"
        assert held(checkpoints) == ["latest", "step_00000002", "step_00000004"]


@pytest.mark.slow
def test_two_ranks_agree_on_a_save_that_ran_out_of_space(pretrain_shards, tmp_path):
    """Under torchrun each rank writes its own ZeRO partition: whichever rank runs out of space, every
    rank stops with the same message (none is left waiting in a collective), and ``latest`` stays."""
    import time

    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    with small_tmpfs(run_dir, 9 << 20):
        started = time.time()
        failed = cli(pretrain_shards, run_dir, **{
            "train.max_steps": 4, "train.global_batch_size": 32, "train.micro_batch_size": 8,
            "launch.launcher": "torchrun", "launch.num_workers": 2})
        assert time.time() - started < 240, "some rank waited in a collective"
        assert failed.returncode != 0
        message = f"checkpoint step_00000004 could not be written to {checkpoints}: writing {checkpoints}/"
        assert failed.stderr.count(message) >= 2, failed.stderr[-4000:]  # both ranks report it
        assert "[Errno 28] No space left on device" in failed.stderr
        assert held(checkpoints) == ["latest", "step_00000002"]
        assert (checkpoints / "latest").read_text() == "step_00000002"


# ----------------------------------------------------------------------------- --resume none


def test_resume_none_moves_an_earlier_runs_checkpoints_out_of_the_fallbacks_reach(pretrain_shards, tmp_path):
    """Run A saves steps 2 and 4; run B starts over with ``--resume none`` and saves step 2; then B's
    ``latest`` goes missing. The fallback must resume B's step 2, never A's step 4 (which used to be
    taken, "completing" B at once with A's weights)."""
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"

    def train(**changes):
        config = load_config("demo", tiny_overrides(pretrain_shards, run_dir, **{
            "checkpoint.every": 2, "checkpoint.keep": 3, **changes}))
        trainer = Trainer(config)
        try:
            return trainer.train()
        finally:
            trainer.close()

    train(**{"train.max_steps": 4})
    run_a = held(checkpoints)
    assert run_a == ["latest", "step_00000002", "step_00000004"]

    train(**{"train.max_steps": 2, "checkpoint.resume": "none"})
    (set_aside,) = [p for p in run_dir.iterdir() if p.name.startswith("checkpoints.set-aside-")]
    assert held(set_aside) == run_a and (set_aside / "latest").read_text() == "step_00000004"
    log = (run_dir / "train.log").read_text()
    assert f"checkpoint.resume=none: moved what {checkpoints} held (step_00000002, step_00000004, latest) to " \
           f"{set_aside}" in log
    assert held(checkpoints) == ["latest", "step_00000002"]

    (checkpoints / "latest").unlink()
    logged_before = len(log)
    result = train(**{"train.max_steps": 3})
    log = (run_dir / "train.log").read_text()[logged_before:]
    assert f"resuming from {checkpoints / 'step_00000002'}, the newest complete checkpoint" in log
    assert f"resumed from {checkpoints / 'step_00000002'} at step 2" in log
    assert "step_00000004" not in log
    assert result.status == "completed" and result.step == 3
    assert held(checkpoints) == ["latest", "step_00000002", "step_00000003"]
