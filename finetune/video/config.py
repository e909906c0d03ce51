"""Video classification's run config: the core :class:`~pretrain.config.Config` with the ``video`` section."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pretrain.classification.config import check_auto_augment
from pretrain.config import Config, ConfigError, in_range, off_words_to_empty, positive

__all__ = ["VideoConfig", "VideoRunConfig"]


@dataclass(kw_only=True, slots=True)
class VideoConfig:
    """``task=video``: clip classification on the Kinetics list layout (VideoMAE v2's sampling and augmentation)."""

    data_root: str = ""
    """``ROOT`` holding ``train.csv`` and ``val.csv`` (``path label`` per line); a local path or an fsspec URL."""
    generate_demo: bool = False
    """Write the generated demo clips (``python -m finetune make-demo-data video``) into ``data_root`` first."""
    num_classes: int = 400
    """Classes; the labels of ``train.csv`` must be exactly ``0 .. num_classes - 1``."""
    num_frames: int = 16
    """Frames per clip."""
    sampling_rate: int = 4
    """Stride between the sampled frames: a clip covers ``num_frames * sampling_rate`` frames."""
    input_size: int = 224
    """Side of each (square) frame after cropping."""
    layout: Literal["reshape", "tile"] = "reshape"
    """Clip -> map: ``reshape`` is the authors' memory reshape ``(B, 3, T, H, W) -> (B, 3, rows*H, cols*W)``;
    ``tile`` is a mosaic of whole frames (``unireplknet.adapters.tile_frames``)."""
    layout_rows: int | None = None
    """Rows of the map in frame heights (``rows * cols = num_frames``); None: the largest divisor of
    ``num_frames`` not above its square root (4 for 16 frames, as the authors)."""
    auto_augment: str = "rand-m7-n4-mstd0.5-inc1"
    """timm RandAugment policy, the same ops and magnitudes for every frame of a clip; empty for none."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Random resized crop: area fraction range."""
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    """Random resized crop: aspect-ratio range."""
    hflip: float = 0.5
    """Horizontal flip probability (the whole clip)."""
    random_erasing: float = 0.25
    """Random erasing probability (per frame, timm's pixel mode, as VideoMAE v2)."""
    repeated_aug: int = 2
    """Augmented clips per video and epoch (repeated augmentation); ``train.micro_batch_size`` counts clips."""
    mixup_alpha: float = 0.8
    """Mixup alpha (0 disables)."""
    cutmix_alpha: float = 1.0
    """CutMix alpha (0 disables); the box cuts every frame at the same place."""
    mixup_switch_prob: float = 0.5
    """Probability of CutMix instead of Mixup when both are on."""
    eval_views: Literal["single", "test"] = "single"
    """``single``: the centred window, short side resized to ``input_size``, centre crop (fast validation);
    ``test``: the authors' protocol, ``test_segments`` x ``test_crops`` views, softmax averaged per video."""
    test_segments: int = 5
    """``eval_views=test``: clips evenly spread over the video."""
    test_crops: int = 3
    """``eval_views=test``: crops along the longer side (short side resized to ``input_size``)."""
    layer_decay_layers: int = 12
    """Layer-wise lr decay groups (the authors': 12; stem 0 ... stage 3 12, head 13) with ``optim.layer_decay``."""

    def validate(self) -> None:
        off_words_to_empty(self, "auto_augment")
        if self.auto_augment:
            check_auto_augment(self.auto_augment)
        positive("num_classes", self.num_classes)
        positive("num_frames", self.num_frames)
        positive("sampling_rate", self.sampling_rate)
        if self.input_size < 32 or self.input_size % 32:
            raise ConfigError("input_size", f"expected a multiple of 32, got {self.input_size}")
        if self.layout_rows is not None:
            positive("layout_rows", self.layout_rows)
            if self.num_frames % self.layout_rows:
                raise ConfigError("layout_rows", f"expected a divisor of video.num_frames ({self.num_frames}), "
                                  f"got {self.layout_rows}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ConfigError("crop_scale", f"expected 0 < low <= high <= 1, got {list(self.crop_scale)}")
        low, high = self.crop_ratio
        if not 0 < low <= high:
            raise ConfigError("crop_ratio", f"expected 0 < low <= high, got {list(self.crop_ratio)}")
        in_range("hflip", self.hflip, 0.0, 1.0)
        in_range("random_erasing", self.random_erasing, 0.0, 1.0)
        positive("repeated_aug", self.repeated_aug)
        for key in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"expected >= 0, got {getattr(self, key)}")
        in_range("mixup_switch_prob", self.mixup_switch_prob, 0.0, 1.0)
        positive("test_segments", self.test_segments)
        positive("test_crops", self.test_crops)
        positive("layer_decay_layers", self.layer_decay_layers)

    @property
    def rows(self) -> int:
        """Rows of the map (``layout_rows`` or its default)."""
        if self.layout_rows is not None:
            return self.layout_rows
        return max(d for d in range(1, int(self.num_frames ** 0.5) + 1) if self.num_frames % d == 0)

    @property
    def uses_mixup(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


@dataclass(kw_only=True, slots=True)
class VideoRunConfig(Config):
    """A video classification run (Kinetics-400 from scratch, the generated demo clips)."""

    task: str = "video"
    video: VideoConfig = field(default_factory=VideoConfig)

    def validate(self) -> None:
        Config.validate(self)
        video = self.video
        if not video.data_root:
            raise ConfigError("video.data_root", "expected the dataset folder (or URL) holding train.csv and val.csv")
        if self.model.num_classes != video.num_classes:
            raise ConfigError("model.num_classes", f"expected video.num_classes ({video.num_classes}), got "
                              f"{self.model.num_classes}: set both")
        if self.model.in_chans != 3:
            raise ConfigError("model.in_chans", f"expected 3 (RGB frames), got {self.model.in_chans}")
        clips_per_video = video.repeated_aug
        if self.train.micro_batch_size % clips_per_video:
            raise ConfigError("train.micro_batch_size", f"expected a multiple of video.repeated_aug ({clips_per_video}):"
                              f" a micro-batch holds whole videos, each as {clips_per_video} clips, got "
                              f"{self.train.micro_batch_size}")
        if video.uses_mixup and self.train.micro_batch_size % 2:
            raise ConfigError("train.micro_batch_size", f"expected an even size with mixup/cutmix (pairs are the batch "
                              f"and its reverse), got {self.train.micro_batch_size}")
        if self.train.zero_stage == 3:
            raise ConfigError("train.zero_stage", "expected 0, 1 or 2 with task=video: ranks run different numbers of "
                              "forward passes in evaluation, which ZeRO-3's collective parameter gathering cannot follow")
