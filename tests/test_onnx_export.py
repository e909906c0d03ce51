"""ONNX export: ``python -m unireplknet export-onnx`` (classifier) and ``python -m finetune export-onnx`` (the
UperNet segmentor from a file in the authors' mmseg layout), each file run in onnxruntime and compared with the
model in the training structure, in float64 torch (independent of the re-parameterization and of the exporter).

Every task's export from a run directory is checked in ``test_task_conformance.py``."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
"""The issue's bound: float32 ONNX vs float64 torch differ by float32 rounding (~1e-6 relative) here."""


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def onnx_outputs(path: Path, images: torch.Tensor) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return session.run(None, {name: images.float().numpy()})[0]


def relative_difference(actual: np.ndarray, expected: torch.Tensor) -> float:
    assert tuple(actual.shape) == tuple(expected.shape)
    return float((torch.from_numpy(actual).double() - expected).abs().max() / expected.abs().max())


def randomize_batchnorm(model: torch.nn.Module, seed: int) -> None:
    """Running statistics and affine parameters away from their initial values (a trained model's), so that
    folding BatchNorm into the convolutions is not an identity."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


def test_the_pooling_that_exports_equals_torchs_adaptive_average_pooling():
    from finetune.ade20k.heads import adaptive_avg_pool2d_by_matrices

    generator = torch.Generator().manual_seed(0)
    for height in range(1, 14):
        for width in (1, 2, 5, 7, 12, 13):
            x = torch.randn(2, 3, height, width, generator=generator, dtype=torch.float64)
            for size in (1, 2, 3, 6):
                torch.testing.assert_close(adaptive_avg_pool2d_by_matrices(x, size), F.adaptive_avg_pool2d(x, size),
                                           rtol=1e-12, atol=1e-12, msg=f"{height}x{width} -> {size}")


def test_classifier_exports_with_any_batch_and_matches_the_training_structure(tmp_path):
    import timm

    import unireplknet

    model = timm.create_model("unireplknet_a", num_classes=7).eval()
    randomize_batchnorm(model, seed=1)
    weights, out = tmp_path / "classifier.pth", tmp_path / "classifier.onnx"
    torch.save(unireplknet.export_official(model), weights)  # the training structure, as the authors release

    result = run("unireplknet", "export-onnx", str(weights), str(out), "--model", "unireplknet_a", "--img-size", "64")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "re-parameterized" in result.stdout and out.is_file()
    reference = model.double()
    generator = torch.Generator().manual_seed(2)
    for batch in (1, 5):  # 5: a batch size the export never saw
        images = torch.randn(batch, 3, 64, 64, generator=generator)
        with torch.no_grad():
            expected = reference(images.double())
        assert relative_difference(onnx_outputs(out, images), expected) <= TOLERANCE

    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    refused = run("unireplknet", "export-onnx", str(tmp_path / "other.pth"), str(tmp_path / "other.onnx"),
                  "--model", "unireplknet_a")
    assert refused.returncode == 2 and "other.pth is not a UniRepLKNet checkpoint" in refused.stderr
    assert not (tmp_path / "other.onnx").exists()


def test_an_ade20k_file_in_the_authors_layout_exports_for_any_size(tmp_path):
    """A released-format file (mmcv container: ``meta`` with a numpy scalar, ``state_dict`` with ``backbone.*``,
    ``decode_head.*``, ``auxiliary_head.*``, an ``optimizer``) -> ONNX with dynamic batch, height and width."""
    from pretrain.config import load_config
    from pretrain.registry import registered_tasks
    from pretrain.task import build_task

    smoke = list(registered_tasks()["ade20k"].smoke_overrides)
    model = build_task(load_config("ade20k_demo", ["model.init_from=", *smoke])).build_model().eval()
    randomize_batchnorm(model, seed=3)
    state = model.state_dict()
    assert {key.split(".")[0] for key in state} == {"backbone", "decode_head", "auxiliary_head"}
    released = tmp_path / "upernet_released.pth"
    torch.save({"meta": {"hook_msgs": {"best_score": np.float64(0.4321), "last_ckpt": "iter_160000.pth"},
                         "iter": np.int64(160000)},
                "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, released)
    out = tmp_path / "upernet.onnx"

    result = run("finetune", "export-onnx", str(released), str(out), "--config", "ade20k_demo", "--set", *smoke)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["task"] == "ade20k" and summary["outputs"] == ["logits"] and summary["dynamic_dims"] == [0, 2, 3]
    reference = model.double()
    generator = torch.Generator().manual_seed(4)
    for shape in ((3, 3, 64, 64), (1, 3, 77, 101), (2, 3, 160, 96)):  # sizes that are not multiples of 32 too
        images = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            expected = reference(images.double())["logits"]
        assert relative_difference(onnx_outputs(out, images), expected) <= TOLERANCE, shape

    missing_config = run("finetune", "export-onnx", str(released), str(tmp_path / "x.onnx"))
    assert missing_config.returncode == 2 and "--config" in missing_config.stderr
    wrong_model = run("finetune", "export-onnx", str(released), str(tmp_path / "x.onnx"), "--config", "ade20k_demo")
    assert wrong_model.returncode == 2 and "wrong shape" in wrong_model.stderr, wrong_model.stderr[-2000:]
    assert not (tmp_path / "x.onnx").exists()
