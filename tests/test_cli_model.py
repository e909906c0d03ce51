"""`python -m unireplknet` commands, run as a user would (a subprocess)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch

import unireplknet
from unireplknet import export_official
from unireplknet.tools import max_relative_difference, randomize_statistics


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unireplknet", *args], capture_output=True, text=True, timeout=300)


def test_reparam_command_writes_verified_inference_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("unireplknet_a", num_classes=10).eval()
    randomize_statistics(model)
    source, target = tmp_path / "train.pth", tmp_path / "deploy.pth"
    torch.save({"model": export_official(model)}, source)
    result = run_cli("reparam", str(source), str(target), "--model", "unireplknet_a")
    assert result.returncode == 0, result.stderr
    assert "max|logit diff|" in result.stdout
    deployed = timm.create_model("unireplknet_a", num_classes=10, deploy=True).eval()
    unireplknet.load_official(deployed, target)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_relative_difference(model(x), deployed(x)) < 1e-5
    assert not list(tmp_path.glob(".tmp-*"))


def test_reparam_command_rejects_wrong_architecture(tmp_path):
    source = tmp_path / "train.pth"
    torch.save(export_official(timm.create_model("unireplknet_a", num_classes=10)), source)
    result = run_cli("reparam", str(source), str(tmp_path / "out.pth"), "--model", "unireplknet_f")
    assert result.returncode == 2
    assert "does not fit unireplknet_f" in result.stderr and "shape mismatches" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("content, message", [
    (b"", "is not a PyTorch checkpoint"),
    (b"not a checkpoint at all", "is not a PyTorch checkpoint"),
    ("resnet", "is not a UniRepLKNet checkpoint: no stem convolution"),
])
def test_reparam_command_explains_files_that_are_not_unireplknet_checkpoints(content, message, tmp_path):
    source = tmp_path / "input.pth"
    if content == "resnet":
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}, source)
    else:
        source.write_bytes(content)
    result = run_cli("reparam", str(source), str(tmp_path / "out.pth"), "--model", "unireplknet_a")
    assert result.returncode == 2
    assert message in result.stderr and str(source) in result.stderr
    assert "Traceback" not in result.stderr


def test_info_command_reports_spec_parameter_counts():
    result = run_cli("info", "--model", "unireplknet_xl", "--img-size", "384")
    assert result.returncode == 0, result.stderr
    assert "388,690,984" in result.stdout and "386,529,064" in result.stdout
    gmacs = float(next(line for line in result.stdout.splitlines() if "GMACs" in line).split()[4])
    assert 180 < gmacs < 195  # the paper's 187G "FLOPs" (multiply-adds) for XL at 384


def test_unknown_model_is_a_clear_error():
    result = run_cli("info", "--model", "unireplknet_q")
    assert result.returncode == 2
    assert "unknown model 'unireplknet_q'" in result.stderr
