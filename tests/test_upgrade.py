"""An upgrade never strands a run: run directories written by the release before the task registry (every
task's section in ``config.json``, ``data.num_workers``, ``optim.layer_decay_layers``) resume exactly.

The previous release's code is taken from git (``git archive``) and run as it was, on this machine, so the
run directory is the real thing; the resumed run must end bit-identical to an uninterrupted run of today's
code. Its configs, upgraded, must equal today's presets.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import io
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PREVIOUS_RELEASE = "571d9e01602a25491cc684c1c39d24dea777a63e"
"""The last commit before tasks became plugins (its configs carry every section)."""


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory) -> Path:
    """The previous release's source tree (from this clone's history)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", PREVIOUS_RELEASE],
                             capture_output=True, timeout=120)
    if archive.returncode != 0:
        pytest.fail(f"git archive {PREVIOUS_RELEASE} failed ({archive.stderr.decode()[-300:]}): the upgrade tests need "
                    "the project's history (a clone without --depth)")
    tree = tmp_path_factory.mktemp("previous_release")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(tree, filter="data")
    return tree


def run_previous(tree: Path, preset: str, overrides: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("UNIREPLKNET_TASKS", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(tree)
    result = subprocess.run([sys.executable, "-m", "pretrain", "--config", preset, "--set", *overrides], cwd=tree,
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def train(preset: str, overrides: list[str]):
    """Today's trainer in this process: (its start step, its final weights)."""
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    trainer = Trainer(load_config(preset, overrides))
    try:
        start = trainer.step
        trainer.train()
        return start, {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
    finally:
        trainer.close()


def small_ade20k(root: Path) -> Path:
    """A small generated ADE20K-layout set (16 training, 4 validation images), written once per test."""
    from finetune.ade20k.demo_data import write_demo

    folder = root / "ade20k"
    if not folder.exists():
        write_demo(folder, train_images=16, val_images=4, seed=0)
    return folder


CASES = {
    "demo": lambda root, shards: (
        ["data.source=shards", f"data.train_urls={shards['train']}", f"data.val_urls={shards['val']}",
         "train.global_batch_size=16", "train.micro_batch_size=16", "train.epochs=1", "train.eval_every=0",
         "train.log_every=1", "checkpoint.every=2"],
        ["data.num_workers=0"], ["loader.num_workers=0"]),
    "ade20k_demo": lambda root, shards: (
        [f"ade20k.data_root={small_ade20k(root)}", "ade20k.generate_demo=false", "ade20k.crop_size=64",
         "ade20k.resize_scale=160,64",
         "ade20k.eval_scale=160,64", "train.global_batch_size=4", "train.micro_batch_size=4", "train.eval_every=0",
         "train.log_every=1", "checkpoint.every=2"],
        ["data.num_workers=0"], ["loader.num_workers=0"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(CASES))
def test_a_run_directory_of_the_previous_release_resumes_exactly(preset, previous_release, pretrain_shards, tmp_path):
    common, old_keys, new_keys = CASES[preset](tmp_path, pretrain_shards)
    old_dir, fresh_dir = tmp_path / "previous", tmp_path / "fresh"
    run_previous(previous_release, preset, [f"run_dir={old_dir}", *common, *old_keys, "train.max_steps=2"])
    saved = json.loads((old_dir / "config.json").read_text())
    assert "coco" in saved and "ade20k" in saved  # the previous format: every task's section

    start, resumed = train(preset, [f"run_dir={old_dir}", *common, *new_keys, "train.max_steps=4"])
    assert start == 2
    assert "resumed from" in (old_dir / "train.log").read_text()
    _, uninterrupted = train(preset, [f"run_dir={fresh_dir}", *common, *new_keys, "train.max_steps=4"])
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    rewritten = json.loads((old_dir / "config.json").read_text())
    assert "coco" not in rewritten and rewritten["loader"]["num_workers"] == 0  # saved again in today's layout


CHANGED_ON_PURPOSE = {
    **{f"ade20k_{name}_160k": [("model", "init_from"), ("model", "sync_batchnorm")]
       for name in ("t_upernet_512", "s_upernet_512", "s_upernet_640", "b_upernet_640", "l_upernet_640",
                    "xl_upernet_640")},
    **{f"coco_{variant}_cascade_3x": [("model", "sync_batchnorm")] for variant in ("t", "s", "b", "l", "xl")}}
"""Preset values corrected since the previous release: the ADE20K presets now start from the files the authors'
configs name (the 1K 224 files at 512, the 22K->1K 384 files at 640), not from names no release has; the dense
presets use SyncBN as the authors' configs do (``sync_batchnorm=auto``: on CUDA with more than one rank)."""


def test_the_previous_release_presets_upgrade_to_todays(previous_release):
    """Every preset of the previous release, saved as it saved it and read by today's code, is today's preset."""
    from pretrain.config import all_presets, config_to_dict
    from pretrain.upgrade import upgrade_config_dict

    env = {k: v for k, v in os.environ.items() if k != "UNIREPLKNET_TASKS"}
    env["PYTHONPATH"] = str(previous_release)
    dumped = subprocess.run([sys.executable, "-c", "import json; from pretrain.config import PRESETS, config_to_dict; "
                             "print(json.dumps({n: config_to_dict(f()) for n, f in PRESETS.items()}))"],
                            cwd=previous_release, capture_output=True, text=True, timeout=300, env=env)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    previous = json.loads(dumped.stdout)
    today = all_presets()
    assert set(previous) <= set(today)
    for name, saved in previous.items():
        upgraded, current = upgrade_config_dict(saved), config_to_dict(today[name]())
        for section, key in CHANGED_ON_PURPOSE.get(name, ()):  # recipe corrections since that release
            assert upgraded[section][key] != current[section][key], f"{name}: {section}.{key} is no longer changed"
            upgraded[section][key] = current[section][key]
        assert upgraded == current, name
