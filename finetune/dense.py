"""What the dense tasks (``task=coco|ade20k``) share as ``pretrain.task.Task`` implementations: the authors'
layer-wise lr decay over the backbone, the generated demo set written once, inputs and previews."""
from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn

from pretrain.config import Config, OptimConfig
from pretrain.distributed import WorldInfo, barrier
from pretrain.task import denormalize

from .ade20k.data import MEAN, STD

__all__ = ["DenseTask", "dense_param_groups"]

_logger = logging.getLogger(__name__)



def dense_param_groups(model: nn.Module, config: OptimConfig) -> list[dict]:
    """Optimizer groups with the authors' dense layer-wise decay over ``model.backbone``
    (``optim.layer_decay_layers``, ``optim.layer_decay``); necks and heads at full lr."""
    from pretrain.optim import build_param_groups

    from .ade20k.heads import layer_id_for_dense, lr_scale_for_dense

    layers = config.layer_decay_layers

    def layer_scale(name: str) -> tuple[int, float]:
        layer = layer_id_for_dense(name, layers)
        return layer, lr_scale_for_dense(layer, layers, config.layer_decay)

    return build_param_groups(model, config, layer_scale=layer_scale)


class DenseTask:
    """Base of the dense tasks: ``section`` is the config's task section (``data_root``, ``generate_demo``);
    subclasses name it in ``section_name`` and write their demo set in :meth:`write_demo`."""

    section_name = ""
    demo_layout = ""
    """Words for the log line when the demo set is generated ("COCO-layout")."""

    def __init__(self, config: Config):
        self.config = config
        self.section = getattr(config, self.section_name)

    def build_param_groups(self, model: nn.Module, config: OptimConfig) -> list[dict]:
        """The authors' dense layer-wise decay over the backbone (``optim.layer_decay_layers``); heads at full lr."""
        return dense_param_groups(model, config)

    def write_demo(self, root: str, seed: int) -> None:
        raise NotImplementedError

    def data_root(self, world: WorldInfo) -> str:
        """``section.data_root``; with ``generate_demo``, rank 0 first writes the demo set there unless
        ``ROOT/COMPLETE`` says it is there, and every rank waits for it."""
        root = self.section.data_root
        if not self.section.generate_demo:
            return root
        done = os.path.join(root, "COMPLETE")
        if world.is_main and not os.path.isfile(done):
            _logger.info("generating the %s demo set in %s", self.demo_layout, root)
            self.write_demo(root, seed=self.config.train.seed)
            with open(done, "w") as f:
                f.write("ok\n")
        barrier()
        return root

    def batch_size(self, inputs) -> int:
        return inputs.shape[0] if isinstance(inputs, torch.Tensor) else 1

    def dummy_input(self, device: torch.device) -> None:
        return None  # ZeRO-3 is refused for dense tasks at config time

    def preview(self, inputs: torch.Tensor) -> torch.Tensor:
        return denormalize(inputs, [m / 255 for m in MEAN], [s / 255 for s in STD])
