"""Shared test fixtures. Append new fixtures; do not rewrite the ones other modules use."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[1]
# DeepSpeed compiles a CPU communication op on first use (~90 s) unless this cache exists.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


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
