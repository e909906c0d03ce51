"""`python -m unireplknet bench` smoke test on CPU (speed targets are checked on a GPU, not here)."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from unireplknet.bench import BenchConfig, build_bench_model
from unireplknet.model import DilatedReparamBlock


def test_bench_runs_models_side_by_side_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "unireplknet", "bench", "--models", "unireplknet_a:reference,convnext_atto",
         "--mode", "train", "--img-size", "32", "--batch-size", "2", "--dtype", "fp32", "--warmup", "1",
         "--steps", "1", "--repeats", "2", "--device", "cpu", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| unireplknet_a:reference |" in result.stdout and "| convnext_atto |" in result.stdout
    data = json.loads(out.read_text())
    assert [r["model"] for r in data["results"]] == ["unireplknet_a:reference", "convnext_atto"]
    assert data["results"][0]["ratio_to_first"] == 1.0
    assert all(r["images_per_second"] > 0 for r in data["results"])
    assert data["config"]["mode"] == "train" and data["environment"]["torch"] == torch.__version__


def test_reference_model_uses_plain_torch_convs_and_deploy_reparameterizes():
    config = BenchConfig(mode="infer", device="cpu", deploy=True)
    model = build_bench_model("unireplknet_a:reference", config)
    dwconvs = [m.lk_origin for m in model.modules() if isinstance(m, DilatedReparamBlock)]
    assert dwconvs and all(type(conv) is torch.nn.Conv2d for conv in dwconvs)
    assert model.deployed and not model.training


def test_fused_suffix_builds_fused_training_blocks_and_unknown_suffix_fails():
    import pytest

    model = build_bench_model("unireplknet_a:fused", BenchConfig(mode="train", device="cpu"))
    blocks = [m for m in model.modules() if isinstance(m, DilatedReparamBlock)]
    assert blocks and all(block.fused_branches for block in blocks)
    with pytest.raises(ValueError, match="suffix"):
        build_bench_model("unireplknet_a:turbo", BenchConfig(device="cpu"))


def test_bench_config_rejects_an_unknown_compile_mode():
    import pytest

    with pytest.raises(ValueError, match="compile_mode"):
        BenchConfig(device="cpu", compile=True, compile_mode="fastest")
