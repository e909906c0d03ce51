"""ADE20K semantic segmentation as a ``pretrain.task.Task``: UperNet on the UniRepLKNet backbone, trained by
the one trainer (every launcher, resume, EMA, TensorBoard), evaluated with mmseg's IoU definitions."""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import ConfigError
from pretrain.distributed import WorldInfo

from ..backbone import init_backbone, init_dense_model
from ..dense import DenseTask, palette
from .config import Ade20kRunConfig
from .data import IGNORE_INDEX, EvalLoader, TrainLoader, class_names, list_split

__all__ = ["Ade20kSegmentation", "build_segmentor", "init_backbone", "preflight", "segmentation_logits"]

_logger = logging.getLogger(__name__)

PREVIEWS = 4
"""Validation images (per evaluation, rank 0's first) drawn with their predictions in TensorBoard."""


def build_segmentor(config: Ade20kRunConfig) -> nn.Module:
    """UperNet (+ auxiliary FCN head) over the backbone ``config.model`` names, initialized from ``model.init_from``."""
    from .heads import build_upernet

    m, seg = config.model, config.ade20k
    model = build_upernet(m.name, num_classes=seg.num_classes, drop_path_rate=m.drop_path_rate, depths=m.depths,
                          dims=m.dims, kernel_sizes=m.kernel_sizes, channels=seg.channels,
                          aux_channels=seg.aux_channels if seg.aux_weight > 0 else None, dropout=seg.dropout,
                          grad_checkpointing=m.grad_checkpointing)
    if m.init_from:
        init_dense_model(model, m.init_from)
    model.backbone.set_fused_branches(m.fused_branches)
    return model


def _forward_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images)["logits"].float()


def _slide_logits(model: nn.Module, image: torch.Tensor, num_classes: int, crop: int, stride: int) -> torch.Tensor:
    """mmseg ``slide_inference``: windows of ``crop`` every ``stride``, overlapping logits averaged."""
    _, _, height, width = image.shape
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    logits = image.new_zeros((1, num_classes, height, width), dtype=torch.float32)
    counts = image.new_zeros((1, 1, height, width), dtype=torch.float32)
    for row in range(rows):
        for col in range(cols):
            bottom, right = min(row * stride + crop, height), min(col * stride + crop, width)
            top, left = max(bottom - crop, 0), max(right - crop, 0)
            logits[:, :, top:bottom, left:right] += _forward_logits(model, image[:, :, top:bottom, left:right])
            counts[:, :, top:bottom, left:right] += 1
    return logits / counts


def segmentation_logits(model: nn.Module, images: list[torch.Tensor], size: tuple[int, int], *, num_classes: int,
                        mode: str = "whole", crop: int = 512, stride: int = 341, flip: bool = False) -> torch.Tensor:
    """Class probabilities at ``size`` averaged over the given scales (and flips): mmseg's ``aug_test``."""
    total = None
    for image in images:
        for flipped in ((False, True) if flip else (False,)):
            view = image.flip(-1) if flipped else image
            if mode == "slide":
                logits = _slide_logits(model, view, num_classes, crop, stride)
            else:
                logits = _forward_logits(model, view)
            if flipped:
                logits = logits.flip(-1)
            probs = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).softmax(dim=1)
            total = probs if total is None else total + probs
    return total / (len(images) * (2 if flip else 1))


class Ade20kSegmentation(DenseTask):
    """UperNet fine-tuning on ADE20K (or the generated demo set in the same layout)."""

    demo_layout = "ADE20K-layout"
    config: Ade20kRunConfig

    def build_model(self) -> nn.Module:
        return build_segmentor(self.config)

    def write_demo(self, root: str, seed: int) -> None:
        from .demo_data import write_demo

        write_demo(root, seed=seed)

    def build_train_loader(self, world: WorldInfo) -> TrainLoader:
        files = list_split(self.data_root(world), "training")
        return TrainLoader(files, self.section, batch_size=self.config.train.micro_batch_size, rank=world.rank,
                           world_size=world.world_size, num_workers=self.config.loader.num_workers,
                           seed=self.config.train.seed)

    def build_eval_loader(self, world: WorldInfo) -> EvalLoader:
        files = list_split(self.data_root(world), "validation")  # the demo set written first if asked (evaluate)
        return EvalLoader(files, self.section, rank=world.rank, world_size=world.world_size,
                          num_workers=self.config.loader.num_workers)

    def prepare_batch(self, batch, device: torch.device):
        inputs, labels = batch
        memory_format = torch.channels_last if self.config.model.channels_last else torch.contiguous_format
        if isinstance(inputs, dict):  # evaluation: one image at several scales
            images = [image.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                      for image in inputs["images"]]
            return images, labels.to(device, non_blocking=True)
        return (inputs.to(device, non_blocking=True).contiguous(memory_format=memory_format),
                labels.to(device, non_blocking=True))

    def training_losses(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """mmseg's losses: cross-entropy (ignore 255) of the decode head, plus ``aux_weight`` x the auxiliary's."""
        from .heads import UperNet

        return UperNet.losses(model(images), labels, aux_weight=self.section.aux_weight, ignore_index=IGNORE_INDEX)

    def build_evaluator(self, device: torch.device):
        from .metrics import SegmentationEvaluator

        if not hasattr(self, "_class_names"):
            self._class_names = class_names(self.section.data_root, self.section.num_classes)
        evaluator = SegmentationEvaluator(self.section.num_classes, ignore_index=IGNORE_INDEX,
                                          class_names=self._class_names, device=device)
        evaluator.previews = []  # the trainer shows them in TensorBoard (eval/predictions)
        return evaluator

    def evaluation_step(self, model: nn.Module, images: list[torch.Tensor], labels: torch.Tensor, evaluator) -> None:
        seg = self.section
        probs = segmentation_logits(model, images, tuple(labels.shape[-2:]), num_classes=seg.num_classes,
                                    mode=seg.eval_mode, crop=seg.crop_size, stride=seg.eval_stride, flip=seg.eval_flip)
        predictions = probs.argmax(dim=1)
        evaluator.update(predictions, labels)
        if len(evaluator.previews) < PREVIEWS:
            evaluator.previews.append(self._preview_pair(images[0], predictions))

    def _preview_pair(self, image: torch.Tensor, predictions: torch.Tensor, size: int = 128) -> torch.Tensor:
        """The image and the predicted classes' colours blended over it, side by side, ``size`` pixels high."""
        picture = F.interpolate(self.preview(image), size=(size, size), mode="bilinear", align_corners=False)[0]
        labels = F.interpolate(predictions[:, None].float().cpu(), size=(size, size), mode="nearest")[0, 0].long()
        colours = torch.from_numpy(palette(self.section.num_classes)).float()[labels].permute(2, 0, 1) / 255
        return torch.cat([picture, 0.5 * picture + 0.5 * colours], dim=2)

    def input_shape(self) -> tuple[int, ...]:
        return (3, self.section.crop_size, self.section.crop_size)

    def synthetic_batch(self, device: torch.device, generator: torch.Generator):
        """Training crops of random pixels and random labels (every class present)."""
        batch, size = self.config.train.micro_batch_size, self.section.crop_size
        images = torch.randn(batch, 3, size, size, generator=generator)
        labels = torch.randint(0, self.section.num_classes, (batch, size, size), generator=generator)
        return images.to(device), labels.to(device)


def preflight(config: Ade20kRunConfig) -> None:
    """Before any worker starts: ``ade20k.data_root`` holds both splits (images with their labels), unless the
    demo set is to be generated there. Raises ``ConfigError`` naming the key and the path."""
    if config.ade20k.generate_demo:
        return
    for split in ("training", "validation"):
        try:
            list_split(config.ade20k.data_root, split)
        except (FileNotFoundError, ValueError, OSError) as error:
            raise ConfigError("ade20k.data_root", str(error)) from None
