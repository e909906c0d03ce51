"""COCO's run config: the core :class:`~pretrain.config.Config` with the ``coco`` section."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from pretrain.config import ConfigError, in_range, positive

from ..dense import DenseRunConfig, DenseSection

__all__ = ["CocoConfig", "CocoRunConfig"]


@dataclass(kw_only=True, slots=True)
class CocoConfig(DenseSection):
    """``task=coco``: Cascade Mask R-CNN (or Mask R-CNN) instance segmentation on the COCO 2017 layout, the
    authors' mmdet recipe: FPN P2-P6, RPN, cascade RoI heads with 4conv1fc box heads and GIoU loss."""

    detector: Literal["cascade_mask_rcnn", "mask_rcnn"] = "cascade_mask_rcnn"
    """Three cascade stages (IoU 0.5/0.6/0.7), or one stage (Mask R-CNN: the first cascade stage alone)."""
    num_classes: int = 80
    """Object categories (the annotation file's, in sorted id order; 80 for COCO)."""
    train_scales: tuple[int, ...] = tuple(range(480, 801, 32))
    """Policy (a) of the authors' AutoAugment: shorter side resized to one of these, longer side <= max_size."""
    max_size: int = 1333
    """Longest side after any resize."""
    crop_policy: bool = True
    """Also use policy (b), chosen with probability 0.5 per image: resize to ``crop_resize_scales``, random
    crop of an absolute size in ``crop_size_range``, then policy (a)'s resize."""
    crop_resize_scales: tuple[int, ...] = (400, 500, 600)
    """Policy (b): shorter side before the crop."""
    crop_size_range: tuple[int, int] = (384, 600)
    """Policy (b): crop height and width, each drawn from this inclusive range (clipped to the image)."""
    hflip: float = 0.5
    """Horizontal flip probability."""
    size_divisor: int = 32
    """Batches are zero-padded (after normalization) to a multiple of this."""
    eval_scale: tuple[int, int] = (1333, 800)
    """Test resize (long, short), keeping the aspect ratio."""
    eval_resize: Literal["opencv", "pillow"] = "opencv"
    """``opencv``: mmdet 2.28's test resize (``cv2.resize`` INTER_LINEAR, no antialiasing); ``pillow``: Pillow's
    bilinear (antialiased when downscaling: other pixels; the product's earlier pipeline)."""
    fpn_channels: int = 256
    """FPN output channels (P2-P6)."""
    anchor_scale: float = 8.0
    """RPN anchor size = scale x level stride (strides 4..64); one scale, ratios ``anchor_ratios``."""
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_batch: int = 256
    """Anchors sampled per image for the RPN loss (half positive at most)."""
    rpn_proposals_train: int = 2000
    """Proposals per image kept after NMS 0.7 in training (and taken per level before it)."""
    rpn_proposals_test: int = 1000
    """The same at test time."""
    roi_batch: int = 512
    """RoIs sampled per image per cascade stage (a quarter positive at most)."""
    stage_ious: tuple[float, ...] = (0.5, 0.6, 0.7)
    """Positive IoU of each cascade stage's assigner (one value per stage; the first for mask_rcnn)."""
    stage_weights: tuple[float, ...] = (1.0, 0.5, 0.25)
    """Loss weight of each cascade stage."""
    box_channels: int = 256
    """Box head: 4 shared 3x3 convs of this width (BN), then one fc of ``box_fc``."""
    box_fc: int = 1024
    mask_channels: int = 256
    """Mask head: 4 3x3 convs of this width, deconv x2, class-specific 1x1 (28x28 masks)."""
    giou_weight: float = 10.0
    """Weight of the GIoU loss on decoded boxes."""
    score_threshold: float = 0.05
    nms_iou: float = 0.5
    max_detections: int = 100

    def validate(self) -> None:
        DenseSection.validate(self)
        positive("num_classes", self.num_classes)
        for key in ("train_scales", "crop_resize_scales"):
            if not getattr(self, key) or min(getattr(self, key)) <= 0:
                raise ConfigError(key, f"expected positive sizes, got {list(getattr(self, key))}")
        positive("max_size", self.max_size)
        low, high = self.crop_size_range
        if not 0 < low <= high:
            raise ConfigError("crop_size_range", f"expected 0 < low <= high, got {list(self.crop_size_range)}")
        in_range("hflip", self.hflip, 0.0, 1.0)
        positive("size_divisor", self.size_divisor)
        if min(self.eval_scale) <= 0:
            raise ConfigError("eval_scale", f"expected two positive sizes, got {list(self.eval_scale)}")
        for key in ("fpn_channels", "rpn_batch", "rpn_proposals_train", "rpn_proposals_test", "roi_batch",
                    "box_channels", "box_fc", "mask_channels", "max_detections"):
            positive(key, getattr(self, key))
        if self.anchor_scale <= 0 or not self.anchor_ratios or min(self.anchor_ratios) <= 0:
            raise ConfigError("anchor_ratios", "expected a positive anchor_scale and positive ratios")
        stages = 3 if self.detector == "cascade_mask_rcnn" else 1
        for key in ("stage_ious", "stage_weights"):
            if len(getattr(self, key)) != stages:
                raise ConfigError(key, f"expected {stages} value(s) with detector={self.detector}, "
                                  f"got {list(getattr(self, key))}")
        for iou in self.stage_ious:
            in_range("stage_ious", iou, 0.0, 1.0, lower_open=True, upper_open=True)
        if min(self.stage_weights) < 0:
            raise ConfigError("stage_weights", f"expected >= 0, got {list(self.stage_weights)}")
        if self.giou_weight < 0:
            raise ConfigError("giou_weight", f"expected >= 0, got {self.giou_weight}")
        in_range("score_threshold", self.score_threshold, 0.0, 1.0)
        in_range("nms_iou", self.nms_iou, 0.0, 1.0, lower_open=True)


@dataclass(kw_only=True, slots=True)
class CocoRunConfig(DenseRunConfig):
    """A COCO (or COCO-layout) Cascade Mask R-CNN fine-tuning run."""

    section_name: ClassVar[str] = "coco"
    task: str = "coco"
    coco: CocoConfig = field(default_factory=CocoConfig)
