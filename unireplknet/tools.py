"""Model utilities behind the command line: equivalence checks, model statistics, throughput."""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .model import UniRepLKNet

__all__ = ["randomize_statistics", "max_relative_difference", "ModelStats", "model_stats", "measure_throughput", "atomic_save"]


@torch.no_grad()
def randomize_statistics(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give BN statistics/affines, GRN and layer scale non-trivial random values (for equivalence checks).

    Freshly initialized models have BN mean 0 / var 1, GRN gamma = beta = 0 and layer scale 1e-6,
    which would hide most re-parameterization mistakes.
    """
    def uniform(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return torch.rand(t.shape, generator=generator, dtype=torch.float64).to(t) * (high - low) + low

    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(uniform(module.running_mean, -0.5, 0.5))
            module.running_var.copy_(uniform(module.running_var, 0.5, 2.0))
            module.weight.copy_(uniform(module.weight, 0.5, 1.5))
            module.bias.copy_(uniform(module.bias, -0.3, 0.3))
    for name, param in model.named_parameters():
        if name.endswith("act.1.gamma") or name.endswith("act.1.beta"):
            param.copy_(uniform(param, -0.5, 0.5))
        elif name.endswith(".gamma"):
            param.copy_(uniform(param, 0.3, 1.0))
    return model


def max_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a|."""
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


@dataclass
class ModelStats:
    """Size and cost of one model at one input size (batch 1)."""

    params: int
    inference_params: int
    gflops: float
    activation_mib: float
    param_mib: float


def _forward_cost(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Forward GFLOPs, and MiB of activations saved for backward (weights, and views of them, excluded:
    they are saved by every conv and linear but cost no memory per image)."""
    saved: dict[int, torch.Tensor] = {}
    parameters = {id(p) for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in parameters:
            saved[id(t)] = t  # the same tensor saved by several ops is counted once
        return t

    counter = FlopCounterMode(display=False)
    with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    saved_bytes = sum(t.numel() * t.element_size() for t in saved.values())
    return counter.get_total_flops() / 1e9, saved_bytes / 2**20


def model_stats(build, img_size: int, in_chans: int = 3) -> ModelStats:
    """Parameters, forward GFLOPs and activation memory kept for backward, measured on the meta device.

    ``build(deploy: bool)`` returns a fresh model. Nothing is allocated: every tensor is on ``meta``.
    """
    with torch.device("meta"):
        train_model = build(False).train()
        infer_model = build(True).eval()
        x = torch.empty(1, in_chans, img_size, img_size, requires_grad=False)
        gflops, _ = _forward_cost(infer_model, x)
        _, activation_mib = _forward_cost(train_model, x)
    params = sum(p.numel() for p in train_model.parameters())
    inference_params = sum(p.numel() for p in infer_model.parameters())
    return ModelStats(params, inference_params, gflops, activation_mib, params * 4 / 2**20)


@torch.no_grad()
def measure_throughput(model: nn.Module, batch: torch.Tensor, warmup: int = 2, repeats: int = 5) -> float:
    """Images per second of ``model(batch)`` (median over repeats)."""
    for _ in range(warmup):
        model(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(batch)
        times.append(time.perf_counter() - start)
    times.sort()
    return batch.shape[0] / times[len(times) // 2]


def verify_reparameterization(model: UniRepLKNet, img_size: int | tuple[int, ...], batch_size: int = 2,
                              dtype=torch.float64, seed: int = 0) -> tuple[UniRepLKNet, float]:
    """Re-parameterize a copy of ``model`` in ``dtype`` and compare outputs on a random batch of ``img_size``
    (square images of ``model.in_chans`` channels) or of one sample's input shape ``(C, H, W)``.

    Returns the re-parameterized copy (in ``dtype``) and max|output diff| / max|output|.
    """
    reference = copy.deepcopy(model).to(dtype).eval()
    deployed = copy.deepcopy(reference).reparameterize()
    generator = torch.Generator().manual_seed(seed)
    shape = (model.in_chans, img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    x = torch.randn(batch_size, *shape, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        expected = reference(x.to(dtype))
        actual = deployed(x.to(dtype))
    if model.features_only:
        error = max(max_relative_difference(e, a) for e, a in zip(expected, actual))
    else:
        error = max_relative_difference(expected, actual)
    return deployed, error


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: never a half-written file."""
    from .files import atomic_open

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)