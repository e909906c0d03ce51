"""What the dense tasks (segmentation, detection) share, importing neither: their config base (dataset root,
generated demo set, the authors' layer-wise decay depth), the authors' dense layer-wise lr decay over the
backbone, mmseg/mmdet's input normalization, class colours, and :class:`DenseTask`, the base of their
``pretrain.task.Task`` implementations."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn

from pretrain.config import Config, ConfigError, OptimConfig, positive
from pretrain.distributed import WorldInfo
from pretrain.task import TaskBase, denormalize

__all__ = ["MEAN", "STD", "DenseRunConfig", "DenseSection", "DenseTask", "dense_param_groups", "layer_id_for_dense",
           "lr_scale_for_dense", "normalized", "palette", "resized"]

_logger = logging.getLogger(__name__)

MEAN = (123.675, 116.28, 103.53)
"""mmseg's and mmdet's normalization, RGB on the 0-255 scale (the ImageNet statistics)."""
STD = (58.395, 57.12, 57.375)


def normalized(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32, normalized with :data:`MEAN` / :data:`STD`."""
    values = (image.astype(np.float32) - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1)))


def resized(image: np.ndarray, height: int, width: int, method: str = "opencv") -> np.ndarray:
    """(H, W, 3) uint8 resized to (height, width): ``opencv``, mmcv's ``imresize`` (``cv2.resize`` INTER_LINEAR,
    no antialiasing; per channel, so an RGB image gives what mmseg/mmdet's BGR one gives), or ``pillow``
    (bilinear, antialiased when downscaling)."""
    if (height, width) == image.shape[:2]:
        return image
    if method == "pillow":
        from PIL import Image

        return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    import cv2

    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def palette(num_classes: int) -> np.ndarray:
    """A fixed colour per class (uint8, (num_classes, 3)); neighbouring indices get distant hues."""
    rng = np.random.default_rng(20240101)
    return rng.integers(32, 256, size=(num_classes, 3), dtype=np.uint8)


@dataclass(kw_only=True, slots=True)
class DenseSection:
    """The settings every dense task's section starts with."""

    data_root: str = ""
    """``ROOT`` of the dataset in its standard layout; a local path or an fsspec URL."""
    generate_demo: bool = False
    """Write the task's generated demo set (``python -m finetune make-demo-data TASK``) into ``data_root`` first
    when it is not there yet."""
    layer_decay_layers: int = 12
    """The authors' ``num_layers`` of their dense layer-wise lr decay (12; 9 for T), with ``optim.layer_decay``."""

    def validate(self) -> None:
        positive("layer_decay_layers", self.layer_decay_layers)


@dataclass(kw_only=True, slots=True)
class DenseRunConfig(Config):
    """Base of the dense tasks' run configs: ``section_name`` names the task's section (a ``DenseSection``)."""

    section_name: ClassVar[str] = ""

    def validate(self) -> None:
        Config.validate(self)
        section = getattr(self, self.section_name)
        if not section.data_root:
            raise ConfigError(f"{self.section_name}.data_root", f"expected the dataset folder (or URL) with "
                              f"task={self.task}")
        if self.train.zero_stage == 3:
            raise ConfigError("train.zero_stage", f"expected 0, 1 or 2 with task={self.task}: ranks run different "
                              "numbers of forward passes in evaluation (image sizes, sliding windows), which "
                              "ZeRO-3's collective parameter gathering cannot follow")


def layer_id_for_dense(name: str, num_layers: int) -> int:
    """The authors' ``layer_wise`` lr-decay id of an UperNet parameter name (ConvNeXt's rule).

    ``num_layers`` is the config's ``num_layers`` N (12 for S/B/L, 9 for T). The authors'
    constructor calls its id function with ``max_layer_id = N`` (and uses ``N + 2`` only inside
    the scale formula, see :func:`lr_scale_for_dense`):

    - ``backbone.downsample_layers.0`` (stem): 0; ``backbone.stages.0.*``: 1;
    - ``backbone.downsample_layers.1`` and ``backbone.stages.1.*``: 2;
    - ``backbone.downsample_layers.2``: 3; ``backbone.stages.2.<b>.*``: ``3 + b // 3``;
    - ``backbone.downsample_layers.3`` and ``backbone.stages.3.*``: N;
    - every other name: N + 1 (full lr). The authors' function has no rule for the backbone's
      per-stage output norms ``backbone.norm0..norm3``, so their final ``else`` gives them N + 1,
      like the heads; we keep that (they are new layers on a classification checkpoint anyway).

    Raises ``ValueError`` when a stage-2 block would reach N (``num_layers`` too small for the depth).
    """
    max_layer_id = num_layers
    parts = name.split(".")
    if name.startswith("backbone.downsample_layers."):
        return (0, 2, 3, max_layer_id)[int(parts[2])]
    if name.startswith("backbone.stages."):
        stage, block = int(parts[2]), int(parts[3])
        if stage == 2:
            layer_id = 3 + block // 3
            if layer_id >= max_layer_id:
                raise ValueError(
                    f"{name}: stage-2 block {block} gets layer id {layer_id} >= num_layers={num_layers}; "
                    f"raise num_layers to at least {layer_id + 1}")
            return layer_id
        return (1, 2, None, max_layer_id)[stage]
    return max_layer_id + 1


def lr_scale_for_dense(layer_id: int, num_layers: int, decay_rate: float) -> float:
    """``decay_rate ** (num_layers + 2 - layer_id - 1)``: 1.0 for the heads (id N + 1), ``decay_rate``
    for stage 3 (id N), ``decay_rate ** (N + 1)`` for the stem (id 0)."""
    return decay_rate ** (num_layers + 2 - layer_id - 1)


def dense_param_groups(model: nn.Module, config: OptimConfig, num_layers: int) -> list[dict]:
    """Optimizer groups with the authors' dense layer-wise decay over ``model.backbone`` (``num_layers`` deep,
    rate ``optim.layer_decay``); necks and heads at full lr."""
    from pretrain.optim import build_param_groups

    def layer_scale(name: str) -> tuple[int, float]:
        layer = layer_id_for_dense(name, num_layers)
        return layer, lr_scale_for_dense(layer, num_layers, config.layer_decay)

    return build_param_groups(model, config, layer_scale=layer_scale)


class DenseTask(TaskBase):
    """Base of the dense tasks: ``section`` is the config's task section (a :class:`DenseSection`); subclasses
    write their demo set in :meth:`write_demo` (``demo_layout`` names it in the log)."""

    throughput_unit = "images"
    demo_layout = ""
    """Words for the log line when the demo set is generated ("COCO-layout")."""

    def __init__(self, config: DenseRunConfig):
        super().__init__(config)
        self.section = getattr(config, config.section_name)

    def build_param_groups(self, model: nn.Module, config: OptimConfig) -> list[dict]:
        """The authors' dense layer-wise decay over the backbone (``SECTION.layer_decay_layers``); heads at full lr."""
        return dense_param_groups(model, config, self.section.layer_decay_layers)

    def write_demo(self, root: str, seed: int) -> None:
        raise NotImplementedError

    def data_root(self, world: WorldInfo) -> str:
        """``section.data_root``; with ``generate_demo``, the demo set is written there first (once)."""
        root = self.section.data_root
        if self.section.generate_demo:
            self.generate_once(root, lambda: self.write_demo(root, seed=self.config.train.seed), world,
                               f"{self.demo_layout} demo set")
        return root

    def batch_size(self, inputs) -> int:
        return inputs.shape[0] if isinstance(inputs, torch.Tensor) else 1

    def dummy_input(self, device: torch.device) -> None:
        return None  # ZeRO-3 is refused for dense tasks at config time

    def preview(self, inputs: torch.Tensor) -> torch.Tensor:
        return denormalize(inputs, [m / 255 for m in MEAN], [s / 255 for s in STD])
