"""Resume decisions: changed settings, damaged or missing checkpoints, another world size, ZeRO-0 export.

Real runs (DeepSpeed on CPU, generated shards); the damage is done to real checkpoint files.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_pretrain_train import read_scalars, run_cli, tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def train(shards, run_dir, **changes):
    """Run the tiny config in this process; returns (result, live state dict)."""
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    config = load_config("demo", tiny_overrides(shards, run_dir, **{"checkpoint.every": 2, "checkpoint.keep": 3,
                                                                     **changes}))
    trainer = Trainer(config)
    try:
        result = trainer.train()
        live = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
    finally:
        trainer.close()
    return result, live


@pytest.fixture(scope="module")
def four_steps(pretrain_shards, tmp_path_factory):
    """A finished 4-step run (checkpoints at 2 and 4) to copy and damage."""
    run_dir = tmp_path_factory.mktemp("four_steps") / "run"
    result, live = train(pretrain_shards, run_dir, **{"train.max_steps": 4})
    assert result.step == 4
    return run_dir, live


@pytest.fixture
def run_copy(four_steps, tmp_path):
    import shutil

    source, _ = four_steps
    target = tmp_path / "run"
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config["run_dir"] = str(target)
    (target / "config.json").write_text(json.dumps(config))
    return target


def resume_log(run_dir) -> str:
    return (run_dir / "train.log").read_text()


# ----------------------------------------------------------------------------- settings


def test_a_changed_lr_is_refused_naming_it_and_config_json_is_left_alone(pretrain_shards, run_copy):
    before = (run_copy / "config.json").read_text()
    result = run_cli(["--config", "demo", "--set", *tiny_overrides(pretrain_shards, run_copy, **{
        "checkpoint.every": 2, "checkpoint.keep": 3, "train.max_steps": 6, "optim.lr": 1e-3})], timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "exact resume cannot honour" in result.stderr
    assert "optim.lr: checkpoint 0.004, this run 0.001" in result.stderr
    assert (run_copy / "config.json").read_text() == before
    assert (run_copy / "checkpoints" / "latest").read_text() == "step_00000004"


def test_settings_that_apply_from_now_on_may_change_and_are_logged(pretrain_shards, run_copy):
    result, _ = train(pretrain_shards, run_copy, **{"train.max_steps": 6, "train.log_every": 2})
    assert result.step == 6
    log = resume_log(run_copy)
    assert "resumed from" in log and "at step 4" in log
    assert "resuming with a changed setting: train.max_steps 4 -> 6" in log
    assert json.loads((run_copy / "config.json").read_text())["train"]["max_steps"] == 6
    saved = json.loads((run_copy / "checkpoints" / "step_00000006" / "config.json").read_text())
    assert saved["train"]["max_steps"] == 6 and saved["train"]["log_every"] == 2


def test_export_reads_the_config_stored_with_the_checkpoint(run_copy, four_steps, tmp_path):
    """RUN_DIR/config.json may already describe a different run (a refused resume with other dims, an
    edit): export follows the checkpoint's own config."""
    config = json.loads((run_copy / "config.json").read_text())
    config["model"]["dims"] = [8, 16, 32, 64]
    (run_copy / "config.json").write_text(json.dumps(config))
    out = tmp_path / "weights.pth"
    result = run_cli(["export", str(run_copy), str(out)], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(out, weights_only=True)
    _, live = four_steps
    assert state.keys() == live.keys() and all(torch.equal(state[k], v) for k, v in live.items())


def test_export_of_a_run_without_checkpoints_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli(["export", str(tmp_path / "empty"), str(tmp_path / "out.pth")], timeout=120)
    assert result.returncode == 2
    assert "has no checkpoint yet" in result.stderr and "--config" not in result.stderr
    result = run_cli(["export", str(tmp_path / "nowhere"), str(tmp_path / "out.pth")], timeout=120)
    assert result.returncode == 2 and "no such run directory" in result.stderr


# ----------------------------------------------------------------------------- damage


def test_a_truncated_file_in_the_latest_checkpoint_falls_back_to_the_previous_one(pretrain_shards, run_copy):
    damaged = run_copy / "checkpoints" / "step_00000004" / "trainer_rank00000.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    result, _ = train(pretrain_shards, run_copy, **{"train.max_steps": 6})
    log = resume_log(run_copy)
    assert f"{damaged} has 1000 bytes" in log
    assert f"resuming from {run_copy / 'checkpoints' / 'step_00000002'}, the newest complete checkpoint" in log
    assert f"resumed from {run_copy / 'checkpoints' / 'step_00000002'} at step 2" in log
    assert result.step == 6
    assert [s for s, _ in read_scalars(run_copy)["train/loss"]][-4:] == [3, 4, 5, 6]


@pytest.mark.parametrize("latest", ["deleted", "empty", "garbage"])
def test_a_missing_or_unusable_latest_resumes_from_the_newest_complete_checkpoint(latest, pretrain_shards, run_copy):
    path = run_copy / "checkpoints" / "latest"
    if latest == "deleted":
        path.unlink()
    else:
        path.write_text("" if latest == "empty" else "step_00000004\x00\x17junk")
    result, _ = train(pretrain_shards, run_copy, **{"train.max_steps": 5})
    log = resume_log(run_copy)
    assert "the newest complete checkpoint" in log
    assert f"resumed from {run_copy / 'checkpoints' / 'step_00000004'} at step 4" in log
    assert result.step == 5


CHECKPOINT_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "trainer_rank00000.pt",
                    "config.json", "manifest.json")
"""Every kind of file a one-rank ZeRO-1 checkpoint holds: DeepSpeed's model and optimizer states, the
trainer's rank file, the config, the manifest."""


def flip_one_bit(path: Path, seed: int) -> tuple[int, int]:
    """Flip one bit at a random (seeded) offset of ``path``, in place; returns (offset, bit)."""
    import random

    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    offset, bit = rng.randrange(len(data)), rng.randrange(8)
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))
    return offset, bit


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_flipped_bit_in_any_file_of_the_latest_checkpoint_falls_back_naming_the_file(name, run_copy, caplog):
    """Sizes cannot see a flipped bit; the sha256 each file has in the manifest does. The decision every
    run starts with (rank 0's, ``choose_checkpoint``) takes the previous complete checkpoint and names
    the damaged file."""
    import zlib

    from pretrain.checkpoint import choose_checkpoint
    from pretrain.distributed import WorldInfo

    checkpoints = run_copy / "checkpoints"
    damaged = checkpoints / "step_00000004" / name
    offset, bit = flip_one_bit(damaged, seed=zlib.crc32(name.encode()))
    config = json.loads((checkpoints / "step_00000002" / "config.json").read_text())  # the run's settings
    with caplog.at_level("WARNING", logger="pretrain.checkpoint"):
        chosen = choose_checkpoint(str(checkpoints), "latest", WorldInfo(), config)
    assert chosen == str(checkpoints / "step_00000002"), f"bit {bit} of byte {offset} flipped in {damaged}"
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert str(damaged) in warning and "the newest complete checkpoint" in warning, warning


def test_a_flipped_bit_is_caught_and_the_run_resumes_from_the_previous_checkpoint(pretrain_shards, run_copy):
    damaged = run_copy / "checkpoints" / "step_00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    flip_one_bit(damaged, seed=19)
    result, _ = train(pretrain_shards, run_copy, **{"train.max_steps": 6})
    log = resume_log(run_copy)
    assert f"{damaged} does not match its sha256 in the manifest" in log
    assert f"resumed from {run_copy / 'checkpoints' / 'step_00000002'} at step 2" in log
    assert result.step == 6


def write_version_1_manifest(folder: Path) -> None:
    """The manifest as the trainer wrote it before checksums (version 1: every file with its size)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("manifest_sha256")
    manifest["version"] = 1
    manifest["files"] = {name: entry["size"] for name, entry in manifest["files"].items()}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def test_a_checkpoint_with_a_version_1_manifest_still_resumes(pretrain_shards, run_copy):
    """Upgrading the trainer never strands a run: checkpoints written before checksums resume."""
    write_version_1_manifest(run_copy / "checkpoints" / "step_00000004")
    result, _ = train(pretrain_shards, run_copy, **{"train.max_steps": 5})
    log = resume_log(run_copy)
    assert "has a version-1 manifest (sizes only)" in log
    assert f"resumed from {run_copy / 'checkpoints' / 'step_00000004'} at step 4" in log
    assert result.step == 5


def test_a_damaged_file_of_the_same_size_under_a_version_1_manifest_is_named(pretrain_shards, run_copy):
    """Without checksums the damage shows only when the file is loaded: the run stops naming it."""
    write_version_1_manifest(run_copy / "checkpoints" / "step_00000004")
    damaged = run_copy / "checkpoints" / "step_00000004" / "trainer_rank00000.pt"
    damaged.write_bytes(b"\x00" * damaged.stat().st_size)
    result = run_cli(["--config", "demo", "--set", *tiny_overrides(pretrain_shards, run_copy, **{
        "checkpoint.every": 2, "checkpoint.keep": 3, "train.max_steps": 6})], timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{damaged} does not load" in result.stderr and "Traceback" not in result.stderr


def test_no_complete_checkpoint_at_all_refuses_to_start_over(pretrain_shards, run_copy):
    for step in (2, 4):
        (run_copy / "checkpoints" / f"step_{step:08d}" / "manifest.json").unlink()
    result = run_cli(["--config", "demo", "--set", *tiny_overrides(pretrain_shards, run_copy, **{
        "checkpoint.every": 2, "checkpoint.keep": 3, "train.max_steps": 6})], timeout=300)
    assert result.returncode == 2
    assert "no checkpoint folder under" in result.stderr and "--resume none" in result.stderr


# ----------------------------------------------------------------------------- world size, ZeRO-0


@pytest.mark.slow
def test_resuming_with_another_world_size_fails_every_rank_fast(pretrain_shards, run_copy):
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "pretrain",
         "--config", "demo", "--set", *tiny_overrides(pretrain_shards, run_copy, **{
             "checkpoint.every": 2, "checkpoint.keep": 3, "train.max_steps": 6, "train.global_batch_size": 32})],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    elapsed = time.time() - started
    assert result.returncode != 0
    message = "step_00000004 was written by 1 ranks; this run has 2"
    assert result.stderr.count(message) >= 2, result.stderr[-4000:]  # both ranks report it
    assert elapsed < 240, f"took {elapsed:.0f} s: some rank waited in a collective"


def test_lamb_under_zero_0_exports(pretrain_shards, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["--config", "demo", "--set", *tiny_overrides(pretrain_shards, run_dir, **{
        "optim.name": "lamb", "train.zero_stage": 0, "train.max_steps": 12, "checkpoint.every": 5})], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "lamb.pth"
    exported = run_cli(["export", str(run_dir), str(out)], timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert json.loads(exported.stdout)["checkpoint"].endswith("step_00000012")
    state = torch.load(out, weights_only=True)
    model_states = torch.load(run_dir / "checkpoints" / "step_00000012" / "mp_rank_00_model_states.pt",
                              weights_only=True)["module"]
    assert state.keys() == model_states.keys()
    assert all(torch.equal(state[k], model_states[k]) for k in state)
    before = torch.load(run_dir / "checkpoints" / "step_00000010" / "mp_rank_00_model_states.pt",
                        weights_only=True)["module"]
    assert not torch.equal(state["head.weight"], before["head.weight"])
