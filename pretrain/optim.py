"""Parameter groups (layer-wise lr decay, no decay for norms/biases/layer scale/GRN), optimizers, schedule."""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn as nn
from timm.models import group_parameters

from .config import OptimConfig

__all__ = ["build_optimizer", "build_param_groups", "build_scheduler", "cosine_with_warmup", "lr_factor",
           "optimizer_implementation"]

_logger = logging.getLogger(__name__)


def build_param_groups(model: nn.Module, config: OptimConfig,
                       layer_scale: Callable[[str], tuple[int, float]] | None = None) -> list[dict]:
    """Groups named ``layer{i}_decay`` / ``layer{i}_no_decay`` with ``lr = config.lr * layer_decay**(last - i)``.

    Layers come from ``model.group_matcher()`` (stem = 0, blocks in order, head last), or from
    ``layer_scale(name) -> (layer id, lr scale)`` (the dense tasks' rule). Weight decay is off for
    1-D parameters (norms, biases, layer scale) and ``model.no_weight_decay()`` (GRN).
    Without layer decay all parameters share one layer, so there are two groups.
    """
    no_decay_names = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if config.layer_decay < 1.0 and layer_scale is None:
        layer_of = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
        num_layers = max(layer_of.values()) + 1
        layer_scale = lambda name: (layer_of.get(name, num_layers - 1),  # noqa: E731
                                    config.layer_decay ** (num_layers - 1 - layer_of.get(name, num_layers - 1)))
    elif config.layer_decay >= 1.0:
        layer_scale = None
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer, scale = layer_scale(name) if layer_scale else (0, 1.0)
        decay = param.ndim > 1 and name not in no_decay_names
        group_name = f"layer{layer:02d}_{'decay' if decay else 'no_decay'}" if layer_scale else (
            "decay" if decay else "no_decay")
        if group_name not in groups:
            groups[group_name] = dict(name=group_name, params=[], param_names=[], lr_scale=scale,
                                      lr=config.lr * scale, weight_decay=config.weight_decay if decay else 0.0)
        groups[group_name]["params"].append(param)
        groups[group_name]["param_names"].append(name)
    return [groups[name] for name in sorted(groups)]


def _apex_optimizers():
    try:
        from apex.optimizers import FusedAdam, FusedLAMB
    except ImportError:
        return None
    return FusedAdam, FusedLAMB


def optimizer_implementation(config: OptimConfig, device: torch.device) -> str:
    """Which implementation :func:`build_optimizer` will use on ``device`` (for logs and bench)."""
    on_gpu = device.type == "cuda"
    apex = _apex_optimizers() if on_gpu else None
    if config.name == "adamw":
        if apex:
            return "apex.FusedAdam"
        return "torch.AdamW(fused)" if on_gpu else "torch.AdamW(foreach)"
    if config.name == "adam":
        return "torch.Adam(fused)" if on_gpu else "torch.Adam(foreach)"
    if apex:
        return "apex.FusedLAMB"
    return "deepspeed.FusedLamb" if on_gpu else "timm.Lamb"


def build_optimizer(param_groups: list[dict], config: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, Adam or LAMB over ``param_groups``; the fused GPU implementation when one is available."""
    implementation = optimizer_implementation(config, device)
    groups = [{k: v for k, v in g.items() if k != "param_names"} for g in param_groups]
    common = dict(lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
    if implementation == "apex.FusedAdam":
        optimizer = _apex_optimizers()[0](groups, adam_w_mode=True, **common)
    elif implementation.startswith(("torch.AdamW", "torch.Adam(")):
        fused = device.type == "cuda"
        kind = torch.optim.AdamW if implementation.startswith("torch.AdamW") else torch.optim.Adam
        optimizer = kind(groups, fused=fused, foreach=None if fused else True, **common)
    elif implementation == "apex.FusedLAMB":
        optimizer = _apex_optimizers()[1](groups, **common)
    elif implementation == "deepspeed.FusedLamb":
        from deepspeed.ops.lamb import FusedLamb

        optimizer = FusedLamb(groups, **common)
    else:
        from timm.optim import Lamb

        optimizer = Lamb(groups, max_grad_norm=None, **common)
    _logger.info("optimizer %s, %d parameter groups", implementation, len(groups))
    return optimizer


def cosine_with_warmup(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """lr multiplier for optimizer step ``t`` (0-based): linear (t+1)/warmup, then cosine down to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def lr_factor(config: OptimConfig, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The lr multiplier of optimizer step ``t`` (0-based) for ``config.schedule``.

    ``cosine`` keeps the pretraining ramp ``(t+1)/warmup``. ``multistep`` and ``poly`` follow mmcv's
    iteration-based hooks: ``regular(t) * (1 - (1 - t/W) * (1 - warmup_ratio))`` during the W warmup
    steps, ``gamma ** #(milestones passed)`` and ``(1 - min_ratio) * (1 - t/T) ** power + min_ratio``.
    """
    warmup_steps = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_epochs * steps_per_epoch)
    warmup_steps = min(total_steps, warmup_steps)
    min_ratio = config.min_lr / config.lr
    if config.schedule == "cosine" and config.warmup_ratio is None:
        return cosine_with_warmup(total_steps, warmup_steps, min_ratio)
    if config.schedule == "cosine":
        regular = cosine_with_warmup(total_steps, 0, min_ratio)
    elif config.schedule == "multistep":
        boundaries = [round(m * steps_per_epoch) for m in config.milestones]
        regular = lambda t: config.gamma ** sum(t >= b for b in boundaries)  # noqa: E731
    else:
        regular = lambda t: (1 - min_ratio) * (1 - min(t, total_steps) / total_steps) ** config.power + min_ratio  # noqa: E731
    ratio = config.warmup_ratio if config.warmup_ratio is not None else 1.0 / max(warmup_steps, 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return regular(step) * (1 - (1 - step / warmup_steps) * (1 - ratio))
        return regular(step)

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule (:func:`lr_factor`), scaling every group's own lr (layer decay is kept)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, total_steps, steps_per_epoch))
