"""The UniRepLKNet backbones of the tasks that put their own heads on it: the dense tasks' features-only one,
initialized from an export or an official checkpoint (classifier dropped, everything else required), and the
classifier-less one whose last-stage map the point-cloud and time-series heads read."""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Callable, Sequence

import torch.nn as nn

from unireplknet import VARIANTS, UniRepLKNet

__all__ = ["build_dense_backbone", "build_headless_backbone", "init_backbone", "init_dense_model"]

_logger = logging.getLogger(__name__)


def build_dense_backbone(backbone_name: str, *, drop_path_rate: float, depths: Sequence[int] | None = None,
                         dims: Sequence[int] | None = None, kernel_sizes: Sequence[Sequence[int]] | None = None,
                         grad_checkpointing: bool = False) -> UniRepLKNet:
    """A features_only UniRepLKNet (stride-4/8/16/32 features through ``norm0..3``), unwrapped so parameter
    names are the official checkpoints' (``downsample_layers.0...``, ``stages.2.5...``).

    ``depths``, ``dims``, ``kernel_sizes`` override the variant's (a tiny test backbone); kernel sizes default
    to the variant's only when the depths are the variant's.
    """
    arch = backbone_name.split(".")[0]
    short = arch[len("unireplknet_"):] if arch.startswith("unireplknet_") else None
    if short not in VARIANTS:
        known = ", ".join(f"unireplknet_{k}" for k in VARIANTS)
        raise ValueError(f"unknown backbone {backbone_name!r}; choose one of {known}")
    variant_depths, variant_dims, variant_kernels = VARIANTS[short]
    depths = tuple(depths) if depths is not None else variant_depths
    dims = tuple(dims) if dims is not None else variant_dims
    if kernel_sizes is None:
        if depths != variant_depths:
            raise ValueError(
                f"depths {depths} differ from {arch}'s {variant_depths}: pass kernel_sizes (one tuple per stage)")
        kernel_sizes = variant_kernels
    # The same constructor timm.create_model(arch, features_only=True) calls: the model itself, unwrapped.
    backbone = UniRepLKNet(depths=depths, dims=dims, kernel_sizes=kernel_sizes, drop_path_rate=drop_path_rate,
                           num_classes=0, features_only=True)
    backbone.set_grad_checkpointing(grad_checkpointing)
    return backbone


def build_headless_backbone(model, in_chans: int) -> UniRepLKNet:
    """The UniRepLKNet ``model`` (a :class:`~pretrain.config.ModelConfig`) names, with its depth/width/kernel
    overrides and no classifier (``forward_features`` gives the last-stage map), started from ``model.init_from``
    when set (the classifier skipped), with ``model.grad_checkpointing``."""
    import unireplknet

    depths, dims, kernels = VARIANTS[model.name[len("unireplknet_"):]]
    kernels = model.kernel_sizes or (kernels if model.depths is None else None)  # None: the defaults for the depths
    backbone = UniRepLKNet(in_chans=in_chans, num_classes=0, depths=model.depths or depths,
                           dims=model.dims or dims, kernel_sizes=kernels, drop_path_rate=model.drop_path_rate)
    if model.init_from:
        unireplknet.load_official(backbone, unireplknet.read_state_dict(model.init_from), ignore_head=True)
        _logger.info("backbone initialized from %s", model.init_from)
    if model.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    return backbone


def init_dense_model(model: nn.Module, path: str, key_map: Callable[[dict], dict] | None = None) -> dict[str, list[str]]:
    """``model.init_from`` of a dense task: a whole model's file (``backbone.*`` and head keys: the authors'
    released ADE20K files, the export of a fine-tuned run) loads into every part, strictly; a backbone file (a
    ``pretrain export``, an official classifier) into ``model.backbone`` (:func:`init_backbone`). ``key_map``
    renames an authors' layout first (COCO: mmdet's). Returns and logs what loaded."""
    from pretrain.weights import load_model_weights, read_model_weights

    weights = read_model_weights(path)
    if key_map is not None:
        weights = dataclasses.replace(weights, state=key_map(weights.state))
    parts = sorted({key.split(".")[0] for key in weights.state if not key.startswith("ema_")})
    if "backbone" not in parts or parts == ["backbone"]:
        return init_backbone(model.backbone, path)
    if not any(key.endswith("origin_bn.running_var") or key.endswith("pwconv2.2.running_var") for key in weights.state):
        raise ValueError(f"{path} holds a model in the inference structure (re-parameterized): training starts from "
                         "the training structure (the authors' released fine-tuned files are in it)")
    load_model_weights(model, weights)
    counts = {part: sum(key.startswith(part + ".") for key in weights.state) for part in parts}
    _logger.info("whole model from %s: %s", path, ", ".join(f"{part} {n} tensors" for part, n in counts.items()))
    return {"loaded": [f"{part}.*" for part in parts], "dropped": [], "kept_initial": []}


def init_backbone(backbone: nn.Module, path: str) -> dict[str, list[str]]:
    """Load a ``python -m pretrain export`` file or an official checkpoint into a features-only backbone.

    The classifier (``head.*``) and final norm are dropped; the per-stage norms ``norm0..3`` keep their
    initial values when the file has none; any other backbone key missing from the file, or a shape
    that differs, is an error (``unireplknet.CheckpointMismatchError``). Returns and logs the report.
    """
    import unireplknet

    state = unireplknet.read_state_dict(path)
    unireplknet.load_official(backbone, state)
    names = set(backbone.state_dict())
    report = {"dropped": sorted(k for k in state if re.match(r"^(head|norm)\.", k)),
              "kept_initial": sorted(k for k in names if re.match(r"^norm\d\.", k) and k not in state)}
    _logger.info("backbone from %s: %d tensors loaded, %d dropped (classifier and final norm: %s), %d kept at "
                 "their initial values (%s)", path, len(names) - len(report["kept_initial"]), len(report["dropped"]),
                 ", ".join(report["dropped"]) or "none", len(report["kept_initial"]),
                 ", ".join(report["kept_initial"]) or "none")
    return report



