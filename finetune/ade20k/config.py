"""ADE20K's run config: the core :class:`~pretrain.config.Config` with the ``ade20k`` section."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from pretrain.config import ConfigError, in_range, positive

from ..dense import DenseRunConfig, DenseSection

__all__ = ["Ade20kConfig", "Ade20kRunConfig"]


@dataclass(kw_only=True, slots=True)
class Ade20kConfig(DenseSection):
    """``task=ade20k``: UperNet semantic segmentation on the ADEChallengeData2016 layout (mmseg's pipeline)."""

    num_classes: int = 150
    """Classes after ``reduce_zero_label`` (label 0 is ignored, k becomes k-1)."""
    crop_size: int = 512
    """Training crop (square), padded with label 255 where the image is smaller."""
    resize_scale: tuple[int, int] = (2048, 512)
    """Training resize target (long, short) before the random ratio; (2560, 640) for the 640 crop."""
    ratio_range: tuple[float, float] = (0.5, 2.0)
    """Random ratio applied to ``resize_scale``."""
    cat_max_ratio: float = 0.75
    """Random crop: retry (up to 10 times) while one class covers more than this fraction of the crop."""
    hflip: float = 0.5
    """Horizontal flip probability."""
    photometric: bool = True
    """mmseg's PhotoMetricDistortion (brightness, contrast, saturation, hue)."""
    eval_scale: tuple[int, int] = (2048, 512)
    """Evaluation resize (long, short), keeping the ratio, then to a multiple of 32."""
    eval_resize: Literal["opencv", "pillow"] = "opencv"
    """``opencv``: mmseg 0.27's test pipeline exactly, two OpenCV INTER_LINEAR resizes without antialiasing
    (keep-ratio to ``eval_scale``, then to a multiple of 32); ``pillow``: one Pillow bilinear resize straight to
    the multiple of 32 (the product's earlier pipeline: it antialiases when downscaling, other pixels)."""
    eval_mode: Literal["whole", "slide"] = "whole"
    """Inference on the whole resized image, or sliding windows of ``crop_size`` at ``eval_stride``."""
    eval_stride: int = 341
    """``slide``: window stride (mmseg: 341 for 512 crops, 426 for 640)."""
    eval_ratios: tuple[float, ...] = (1.0,)
    """Scales of ``eval_scale`` evaluated and averaged (multi-scale: 0.5, 0.75, 1.0, 1.25, 1.5, 1.75)."""
    eval_flip: bool = False
    """Also average the horizontally flipped predictions."""
    channels: int = 512
    """UperNet decode-head channels."""
    aux_channels: int = 256
    """Auxiliary FCN head channels (on the stride-16 feature)."""
    aux_weight: float = 0.4
    """Auxiliary loss weight (0 removes the auxiliary head)."""
    dropout: float = 0.1
    """Dropout2d before each classifier."""

    def validate(self) -> None:
        DenseSection.validate(self)
        positive("num_classes", self.num_classes)
        if self.crop_size < 32 or self.crop_size % 32:
            raise ConfigError("crop_size", f"expected a multiple of 32, got {self.crop_size}")
        for key in ("resize_scale", "eval_scale"):
            if min(getattr(self, key)) <= 0:
                raise ConfigError(key, f"expected two positive sizes, got {list(getattr(self, key))}")
        low, high = self.ratio_range
        if not 0 < low <= high:
            raise ConfigError("ratio_range", f"expected 0 < low <= high, got {list(self.ratio_range)}")
        in_range("cat_max_ratio", self.cat_max_ratio, 0.0, 1.0, lower_open=True)
        in_range("hflip", self.hflip, 0.0, 1.0)
        positive("eval_stride", self.eval_stride)
        if not self.eval_ratios or min(self.eval_ratios) <= 0:
            raise ConfigError("eval_ratios", f"expected positive scales, got {list(self.eval_ratios)}")
        positive("channels", self.channels)
        positive("aux_channels", self.aux_channels)
        if self.aux_weight < 0:
            raise ConfigError("aux_weight", f"expected >= 0, got {self.aux_weight}")
        in_range("dropout", self.dropout, 0.0, 1.0, upper_open=True)


@dataclass(kw_only=True, slots=True)
class Ade20kRunConfig(DenseRunConfig):
    """An ADE20K (or ADE20K-layout) UperNet fine-tuning run."""

    section_name: ClassVar[str] = "ade20k"
    task: str = "ade20k"
    ade20k: Ade20kConfig = field(default_factory=Ade20kConfig)
