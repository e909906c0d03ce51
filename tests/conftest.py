"""Shared test fixtures. Append new fixtures; do not rewrite the ones other modules use."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[1]
# DeepSpeed compiles a CPU communication op on first use (~90 s) unless this cache exists.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

LONGEST_FIRST = ("test_slurm.py", "test_pipeline.py", "test_pretrain_distributed.py", "test_pretrain_preemption.py",
                 "test_ray_launcher.py", "test_cluster_stage.py", "test_task_conformance.py", "test_finetune_coco.py",
                 "test_finetune_audio.py", "test_pretrain_train.py", "test_finetune_ade20k.py", "test_task_registry.py",
                 "test_cluster_manifests.py", "test_finetune_video.py", "test_kernels.py")
"""The modules that take minutes on 2 cores (``make test`` prints the slowest tests), the ones that start Ray
clusters first (their tests form one long unit of work, below), then the others longest first. pytest-xdist keeps
this order (``--no-loadscope-reorder``), so the long units start first and the short modules fill in behind them;
a module missing here runs after them, in its usual order."""

RAY_GROUP = "ray-and-slurm"


def pytest_itemcollected(item):
    """Each test's pytest-xdist group (``--dist loadgroup``), given as it is collected, before pytest-xdist reads
    the groups: the tests marked ``ray_cluster`` (they start a Ray cluster or a Slurm) all run on one worker, one
    after another; every other module runs whole on one worker, so its module fixtures are built once."""
    group = RAY_GROUP if item.get_closest_marker("ray_cluster") else item.path.name
    item.add_marker(pytest.mark.xdist_group(group))


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: test order within a module kept


def pytest_collection_finish(session):
    """On a pytest-xdist worker under ``--dist loadgroup``, stop if the groups did not reach the node ids the
    scheduler reads (pytest-xdist renames them; a pytest that ignores the rename would run Ray beside Ray)."""
    config = session.config
    if getattr(config, "workerinput", None) is not None and config.getvalue("loadgroup") and session.items:
        if "@" not in session.items[0].nodeid:
            raise pytest.UsageError(f"pytest-xdist's --dist loadgroup has no effect with pytest {pytest.__version__} "
                                    "(node ids lack their @group): install the pytest pyproject.toml names")


@pytest.fixture(scope="session")
def pretrain_shards(tmp_path_factory) -> dict[str, str]:
    """Generated digit shards for the pretrain tests (512 train / 128 val, 32x32): {"train": dir, "val": dir}."""
    from shards import write_demo

    root = tmp_path_factory.mktemp("pretrain_shards")
    write_demo(str(root / "train"), "train", num_samples=512, samples_per_shard=128, seed=0)
    write_demo(str(root / "val"), "val", num_samples=128, samples_per_shard=64, seed=0)
    return {"train": str(root / "train"), "val": str(root / "val")}


@pytest.fixture(scope="session")
def demo_backbone(pretrain_shards, tmp_path_factory) -> str:
    """The demo backbone after a short pretraining on the digit shards, exported in the authors' layout."""
    from test_pretrain_train import tiny_overrides

    from pretrain.config import load_config
    from pretrain.export import export_checkpoint
    from pretrain.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("demo_pretrain") / "run"
    trainer = Trainer(load_config("demo", tiny_overrides(pretrain_shards, run_dir, **{"train.max_steps": 8})))
    try:
        trainer.train()
    finally:
        trainer.close()
    out = str(run_dir / "backbone.pth")
    export_checkpoint(str(run_dir), out, official=True)
    return out
