"""The UniRepLKNet backbone of the dense tasks: built features-only, initialized from an export or an
official checkpoint (classifier dropped, everything else required)."""
from __future__ import annotations

import logging
import os
import re
from typing import Sequence

import torch.nn as nn

from unireplknet import VARIANTS, UniRepLKNet

__all__ = ["build_dense_backbone", "dense_param_groups", "init_backbone", "write_demo_once"]

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




def dense_param_groups(model: nn.Module, config) -> list[dict]:
    """Optimizer groups with the authors' dense layer-wise decay over ``model.backbone``
    (``optim.layer_decay_layers``, ``optim.layer_decay``); necks and heads at full lr."""
    from pretrain.optim import build_param_groups

    from .ade20k.heads import layer_id_for_dense, lr_scale_for_dense

    layers = config.layer_decay_layers

    def layer_scale(name: str) -> tuple[int, float]:
        layer = layer_id_for_dense(name, layers)
        return layer, lr_scale_for_dense(layer, layers, config.layer_decay)

    return build_param_groups(model, config, layer_scale=layer_scale)


def write_demo_once(root: str, write_demo, *, is_main: bool, seed: int, what: str) -> str:
    """Rank 0 writes a generated demo set into ``root`` unless ``root/COMPLETE`` says it is there; every rank
    waits for it. Returns ``root``."""
    from pretrain.distributed import barrier

    done = os.path.join(root, "COMPLETE")
    if is_main and not os.path.isfile(done):
        _logger.info("generating the %s demo set in %s", what, root)
        write_demo(root, seed=seed)
        with open(done, "w") as f:
            f.write("ok\n")
    barrier()
    return root
