"""Image classification's run config: the core :class:`~pretrain.config.Config` with the ``data`` section."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config import Config, ConfigError, in_range, off_words_to_empty, positive

__all__ = ["ClassificationConfig", "DataConfig", "check_auto_augment"]


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the images come from and how they are augmented."""

    source: Literal["shards", "demo"] = "shards"
    """``shards``: read ``train_urls``/``val_urls``; ``demo``: generate small shards under ``demo_dir`` first."""
    train_urls: str = ""
    """Training shards (brace pattern, directory or list file understood by ``shards``)."""
    val_urls: str = ""
    """Validation shards; empty disables evaluation."""
    demo_dir: str = "data/demo"
    """With ``source=demo``: where the generated shards live (created once, then reused)."""
    demo_train_samples: int = 4096
    """With ``source=demo``: training images to generate."""
    demo_val_samples: int = 1000
    """With ``source=demo``: validation images to generate."""
    img_size: int = 224
    """Training and evaluation resolution."""
    eval_crop_pct: float | None = None
    """Evaluation: resize to ``img_size / eval_crop_pct``, then crop ``img_size``. None: the authors'
    protocol (their ``datasets.py``): at ``img_size >= 384`` warp the image to img_size x img_size
    (crop 1.0, squash), below that resize the shorter side to img_size / 0.875 and center-crop."""
    eval_crop_mode: Literal["center", "squash"] | None = None
    """Evaluation resize: ``center`` keeps the aspect ratio (shorter side), ``squash`` warps to a square.
    None: follows ``eval_crop_pct`` / the authors' protocol (squash at >= 384)."""
    samples_per_epoch: int | None = None
    """Nominal epoch length (all ranks together); default: the shards' sample count."""
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    """timm RandAugment policy; empty for none."""
    random_erasing: float = 0.25
    """Random erasing probability."""
    crop_scale_min: float = 0.08
    """Smallest area fraction of the random resized crop."""
    hflip: float = 0.5
    """Horizontal flip probability."""
    color_jitter: float = 0.4
    """Colour jitter strength, used only without ``auto_augment`` (0 disables)."""
    mixup_alpha: float = 0.8
    """Mixup alpha (0 disables)."""
    cutmix_alpha: float = 1.0
    """CutMix alpha (0 disables)."""

    def validate(self) -> None:
        off_words_to_empty(self, "auto_augment", "val_urls")
        if self.auto_augment:
            check_auto_augment(self.auto_augment)
        if self.source == "demo" and not self.demo_dir:
            raise ConfigError("demo_dir", "expected a directory for the generated demo shards")
        positive("demo_train_samples", self.demo_train_samples)
        positive("demo_val_samples", self.demo_val_samples)
        if self.img_size < 32 or self.img_size % 32:
            raise ConfigError("img_size", f"expected a multiple of 32 (the network's stride), got {self.img_size}")
        if self.eval_crop_pct is not None:
            in_range("eval_crop_pct", self.eval_crop_pct, 0.0, 1.0, lower_open=True)
        if self.samples_per_epoch is not None:
            positive("samples_per_epoch", self.samples_per_epoch)
        in_range("random_erasing", self.random_erasing, 0.0, 1.0)
        in_range("crop_scale_min", self.crop_scale_min, 0.0, 1.0, lower_open=True)
        in_range("hflip", self.hflip, 0.0, 1.0)
        if self.color_jitter < 0:
            raise ConfigError("color_jitter", f"expected >= 0, got {self.color_jitter}")
        for key in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"expected >= 0, got {getattr(self, key)}")

    @property
    def eval_crop(self) -> tuple[float, str]:
        """``(crop_pct, crop_mode)`` of the evaluation transform (see ``eval_crop_pct``)."""
        warp = self.img_size >= 384
        crop_pct = self.eval_crop_pct if self.eval_crop_pct is not None else (1.0 if warp else 0.875)
        crop_mode = self.eval_crop_mode or ("squash" if warp and self.eval_crop_pct is None else "center")
        return crop_pct, crop_mode

    @property
    def uses_mixup(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


@dataclass(kw_only=True, slots=True)
class ClassificationConfig(Config):
    """A classification run (pretraining on ImageNet-22K, the 22K -> 1K fine-tune, the digit demo)."""

    task: str = "classification"
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        Config.validate(self)
        if self.data.source == "shards" and not self.data.train_urls:
            raise ConfigError("data.train_urls", "expected the training shards (or data.source=demo)")


def check_auto_augment(policy: str) -> None:
    """A timm auto-augment policy string (``rand-m9-mstd0.5-inc1``, ``augmix-m5``, ``original``, ...)."""
    from timm.data.auto_augment import auto_augment_transform, augment_and_mix_transform, rand_augment_transform

    try:
        if policy.startswith("rand"):
            rand_augment_transform(policy, {})
        elif policy.startswith("augmix"):
            augment_and_mix_transform(policy, {})
        else:
            auto_augment_transform(policy, {})
    except (AssertionError, ValueError, KeyError, IndexError) as error:
        raise ConfigError("auto_augment", f"expected a timm policy such as 'rand-m9-mstd0.5-inc1' or '' for none, "
                          f"got {policy!r} ({type(error).__name__}: {error})") from None
