"""COCO instance segmentation as a ``pretrain.task.Task``: Cascade Mask R-CNN (or Mask R-CNN) on the UniRepLKNet
backbone, trained by the one trainer (every launcher, resume, EMA, TensorBoard), evaluated by COCOeval."""
from __future__ import annotations

import logging
import math
import os
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import ConfigError
from unireplknet.files import atomic_open
from pretrain.distributed import WorldInfo, barrier

from ..backbone import init_dense_model
from .released import mmdet_to_product
from ..dense import DenseTask, palette
from .config import CocoRunConfig
from .data import EvalLoader, TrainLoader, check_layout, load_split
from .metrics import CocoEvaluator

__all__ = ["CocoInstanceSegmentation", "build_detector_from_config", "preflight"]

_logger = logging.getLogger(__name__)

PREVIEWS = 4
"""Validation images (per evaluation, rank 0's first) drawn with their detections in TensorBoard."""
PREVIEW_SCORE = 0.3
"""Detections drawn in previews score at least this."""


def preflight(config: CocoRunConfig) -> None:
    """Before any worker starts: ``coco.data_root`` holds both splits' annotation files and image folders (unless
    ``coco.generate_demo`` writes them); ``ConfigError`` naming the missing path."""
    if config.coco.generate_demo:
        return
    for split in ("train2017", "val2017"):
        try:
            check_layout(config.coco.data_root, split)
        except FileNotFoundError as error:
            raise ConfigError("coco.data_root", str(error)) from error


def build_detector_from_config(config: CocoRunConfig) -> nn.Module:
    """The detector ``config.coco`` describes over the backbone ``config.model`` names, initialized from
    ``model.init_from``."""
    from .model import build_detector

    m, c = config.model, config.coco
    model = build_detector(
        m.name, c.num_classes, drop_path_rate=m.drop_path_rate, depths=m.depths, dims=m.dims,
        kernel_sizes=m.kernel_sizes, grad_checkpointing=m.grad_checkpointing, fpn_channels=c.fpn_channels,
        anchor_scale=c.anchor_scale, anchor_ratios=c.anchor_ratios, rpn_batch=c.rpn_batch,
        rpn_proposals_train=c.rpn_proposals_train, rpn_proposals_test=c.rpn_proposals_test, roi_batch=c.roi_batch,
        stage_ious=c.stage_ious, stage_weights=c.stage_weights, box_channels=c.box_channels, box_fc=c.box_fc,
        mask_channels=c.mask_channels, giou_weight=c.giou_weight, score_threshold=c.score_threshold,
        nms_iou=c.nms_iou, max_detections=c.max_detections)
    if m.init_from:
        init_dense_model(model, m.init_from, key_map=mmdet_to_product)
    model.backbone.set_fused_branches(m.fused_branches)
    return model


class CocoInstanceSegmentation(DenseTask):
    """Cascade Mask R-CNN fine-tuning on COCO 2017 (or the generated demo set in the same layout)."""

    demo_layout = "COCO-layout"
    config: CocoRunConfig

    def build_model(self) -> nn.Module:
        return build_detector_from_config(self.config)

    def write_demo(self, root: str, seed: int) -> None:
        from .demo_data import write_demo

        write_demo(root, seed=seed)

    def build_train_loader(self, world: WorldInfo) -> TrainLoader:
        split = load_split(self.data_root(world), "train2017")
        return TrainLoader(split, self.section, batch_size=self.config.train.micro_batch_size, rank=world.rank,
                           world_size=world.world_size, num_workers=self.config.loader.num_workers,
                           seed=self.config.train.seed)

    def build_eval_loader(self, world: WorldInfo) -> EvalLoader:
        split = load_split(self.data_root(world), "val2017")  # the demo set written first if asked (evaluate)
        self._annotation_file = self._local_annotations(split.annotation_file, world)
        return EvalLoader(split, self.section, rank=world.rank, world_size=world.world_size,
                          num_workers=self.config.loader.num_workers)

    def _local_annotations(self, url: str, world: WorldInfo) -> str:
        """COCOeval reads a local file: an fsspec annotation file is copied once into the run directory."""
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            return path
        local = os.path.join(self.config.run_dir, "cache", os.path.basename(path))
        if world.is_main and not os.path.isfile(local):
            with fs.open(path, "rb") as source, atomic_open(local, "wb") as target:
                shutil.copyfileobj(source, target)
        barrier()
        return local

    def prepare_batch(self, batch, device: torch.device):
        images, targets = batch
        memory_format = torch.channels_last if self.config.model.channels_last else torch.contiguous_format
        moved = [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
                 for t in targets]
        if images is not None:
            images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        return images, moved

    def training_losses(self, model: nn.Module, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """RPN objectness and box losses, then per cascade stage classification, GIoU box and mask losses."""
        return model(images, targets)

    def build_evaluator(self, device: torch.device) -> CocoEvaluator:
        evaluator = CocoEvaluator(self._annotation_file, device=device if device.type == "cuda" else "cpu")
        evaluator.previews = []  # the trainer shows them in TensorBoard (eval/predictions)
        return evaluator

    def evaluation_step(self, model: nn.Module, images: torch.Tensor | None, metas: list[dict],
                        evaluator: CocoEvaluator) -> None:
        if images is None:  # unreadable: counted, and evaluated as an image with no detections
            for meta in metas:
                evaluator.update_unreadable(meta["image_id"])
            return
        detections = model(images, metas)
        evaluator.update([{"image_id": meta["image_id"], **d} for meta, d in zip(metas, detections)])
        if len(evaluator.previews) < PREVIEWS:
            evaluator.previews.append(self._preview(images[0], metas[0], detections[0]))

    def _preview(self, image: torch.Tensor, meta: dict, detection: dict, size: int = 160) -> torch.Tensor:
        """The image with its confident detections (masks blended, boxes drawn) at ``size`` x ``size``."""
        from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

        height, width = (int(v) for v in meta["orig_size"])
        h, w = (int(v) for v in meta["image_size"])
        picture = F.interpolate(self.preview(image[None, :, :h, :w]), size=(height, width), mode="bilinear",
                                align_corners=False)[0]
        keep = detection["scores"] >= PREVIEW_SCORE
        canvas = (picture * 255).round().to(torch.uint8)
        colours = [tuple(int(c) for c in palette(self.section.num_classes)[int(label)])
                   for label in detection["labels"][keep]]
        if keep.any():
            masks = detection.get("masks")
            if masks is not None:
                canvas = draw_segmentation_masks(canvas, masks[keep].cpu() >= 0.5, alpha=0.45, colors=colours)
            canvas = draw_bounding_boxes(canvas, detection["boxes"][keep].cpu(), colors=colours, width=1)
        return F.interpolate(canvas[None].float() / 255, size=(size, size), mode="bilinear", align_corners=False)[0]

    def input_shape(self) -> tuple[int, ...]:
        height, width = self._train_size()
        return (3, height, width)

    def _train_size(self) -> tuple[int, int]:
        """The largest padded training image: the largest scale's short side, 4:3, within ``max_size``."""
        coco = self.section
        short = max(coco.train_scales)
        long = min(coco.max_size, round(short * 4 / 3))
        return tuple(math.ceil(v / coco.size_divisor) * coco.size_divisor for v in (short, long))

    def synthetic_batch(self, device: torch.device, generator: torch.Generator, objects: int = 8):
        """Images of the largest training size with ``objects`` random box-shaped instances each."""
        coco, batch = self.section, self.config.train.micro_batch_size
        height, width = self._train_size()
        images = torch.randn(batch, 3, height, width, generator=generator)
        targets = []
        for _ in range(batch):
            corners = torch.rand(objects, 2, generator=generator) * torch.tensor([width * 0.7, height * 0.7])
            extent = (torch.rand(objects, 2, generator=generator) * 0.25 + 0.05) * torch.tensor([width, height])
            boxes = torch.cat([corners, corners + extent], dim=1).round()
            masks = torch.zeros(objects, height, width, dtype=torch.uint8)
            for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
                masks[k, y1:y2, x1:x2] = 1
            targets.append({"boxes": boxes.to(device),
                            "labels": torch.randint(0, coco.num_classes, (objects,), generator=generator).to(device),
                            "masks": masks.to(device), "image_size": (height, width)})
        return images.to(device), targets
