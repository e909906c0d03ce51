"""Images in the shard loaders: decoding to uint8 pixels, timm's train augmentation written straight into
batch slots, timm's eval transform, Mixup/CutMix, and the sample pipelines that plug them into
:class:`~shards.loader.TrainLoader` and :class:`~shards.loader.EvalLoader`."""
from __future__ import annotations

import io
import random
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

from .samples import DECODE_ERRORS, Sample, decode_image, decode_sample, sample_fields
from .stream import SamplePipeline

__all__ = ["AugmentConfig", "MixupConfig", "TrainAugment", "decode_sample_pixels", "fix_posterize", "image_eval_pipeline",
           "image_train_pipeline", "timm_mixup", "timm_train_transform"]

# PIL hands NumPy its pixels read-only, and sample bytes are immutable; the train path only reads both.
warnings.filterwarnings("ignore", message="The given (NumPy array|buffer) is not writable", category=UserWarning,
                        module=__name__)
# libjpeg's recoverable-damage warnings ("Corrupt JPEG data: ..."), which Pillow decodes past silently too.
warnings.filterwarnings("ignore", message="Corrupt JPEG data", category=UserWarning, module=__name__)


@dataclass(kw_only=True, slots=True)
class AugmentConfig:
    """Train-time augmentation (timm ``create_transform``); ``AugmentConfig(auto_augment=None, reprob=0)`` for simple runs."""

    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    """timm auto-augment policy string; ``None`` disables it (colour jitter then applies)."""
    reprob: float = 0.25
    """Random-erasing probability."""
    remode: str = "pixel"
    """Random-erasing fill: ``pixel`` (per-pixel noise), ``rand`` or ``const``."""
    recount: int = 1
    """Random-erasing regions per image."""
    color_jitter: float | None = 0.4
    """Colour-jitter strength; timm applies it only when ``auto_augment`` is off."""
    scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect-ratio range."""
    hflip: float = 0.5
    """Horizontal-flip probability."""
    interpolation: str = "bicubic"
    """Resize interpolation."""

    def __post_init__(self) -> None:
        for name in ("reprob", "hflip"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"AugmentConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"AugmentConfig.scale must satisfy 0 < low <= high <= 1, got {self.scale}")


@dataclass(kw_only=True, slots=True)
class MixupConfig:
    """Batch-level Mixup/CutMix (timm ``Mixup``); targets become soft ``(N, num_classes)`` rows."""

    mixup_alpha: float = 0.8
    """Beta(alpha, alpha) for Mixup; 0 disables Mixup."""
    cutmix_alpha: float = 1.0
    """Beta(alpha, alpha) for CutMix; 0 disables CutMix."""
    prob: float = 1.0
    """Probability of mixing a batch."""
    switch_prob: float = 0.5
    """Probability of CutMix instead of Mixup when both are on."""
    label_smoothing: float = 0.1
    """Label smoothing folded into the soft targets."""

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(f"MixupConfig alphas must be >= 0, got mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}")
        for name in ("prob", "switch_prob", "label_smoothing"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"MixupConfig.{name} must be in [0, 1], got {getattr(self, name)}")


def timm_mixup(config: MixupConfig, num_classes: int) -> Mixup:
    """timm's batch-mode Mixup/CutMix with ``config``'s settings."""
    return Mixup(mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha, prob=config.prob,
                 switch_prob=config.switch_prob, mode="batch", label_smoothing=config.label_smoothing,
                 num_classes=num_classes)


def decode_sample_pixels(sample: Sample, num_classes: int | None) -> tuple[torch.Tensor, int]:
    """:func:`decode_sample` with the image as an ``(H, W, 3)`` uint8 tensor, the train augmentation's input.

    8-bit colour and greyscale JPEGs are decoded by torchvision's libjpeg-turbo, which gives Pillow's
    pixels (the same library and settings; tested) without Pillow's four-bytes-per-pixel image and
    its copy into NumPy. Other images (PNG, CMYK JPEGs, ...) and any JPEG torchvision refuses go
    through Pillow (:func:`~shards.samples.decode_image`, as :func:`decode_sample` does): Pillow
    decides what is bad, with the same error message.
    """
    where, extension, data, label = sample_fields(sample, num_classes)
    try:
        header = Image.open(io.BytesIO(data))  # reads the header only; refuses decompression bombs
        plain_jpeg = header.format == "JPEG" and header.mode in ("RGB", "L")
    except DECODE_ERRORS:
        plain_jpeg = False
    if plain_jpeg:
        try:
            return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB).permute(1, 2, 0), label
        except RuntimeError:
            pass
    return torch.from_numpy(np.asarray(decode_image(data, where, extension))), label


def _posterize_keeping_zero_bits(image: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, with 0 bits giving a black image as older Pillow did (recent Pillow rejects ``bits=0``)."""
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return image if bits_to_keep >= 8 else ImageOps.posterize(image, bits_to_keep)


def timm_train_transform(img_size: int, augment: AugmentConfig, *, separate: bool = False):
    """timm's ``create_transform`` train pipeline for ``augment`` (RandAugment's posterize fixed, see
    :func:`fix_posterize`); ``separate=True`` returns timm's (primary, secondary, final) parts."""
    transform = create_transform(
        img_size,
        is_training=True,
        scale=augment.scale,
        ratio=augment.ratio,
        hflip=augment.hflip,
        color_jitter=augment.color_jitter or None,
        auto_augment=augment.auto_augment,
        interpolation=augment.interpolation,
        re_prob=augment.reprob,
        re_mode=augment.remode,
        re_count=augment.recount,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        separate=separate,
    )
    for part in transform if separate else (transform,):
        fix_posterize(part)
    return transform


def fix_posterize(transform) -> None:
    """RandAugment's PosterizeIncreasing reaches 0 bits at high magnitude, which recent Pillow rejects
    (about 5 in 3000 calls of rand-m9-mstd0.5-inc1): 0 bits gives a black image, as older Pillow did."""
    for step in getattr(transform, "transforms", ()):
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize_keeping_zero_bits


_TORCH_RESIZE_MODES = {InterpolationMode.BILINEAR: "bilinear", InterpolationMode.BICUBIC: "bicubic"}


def _resizes_in_torch(crop: Any) -> bool:
    """Whether ``crop`` is timm's random resized crop with interpolations torch resamples as Pillow does."""
    if not isinstance(crop, RandomResizedCropAndInterpolation):
        return False
    modes = crop.interpolation if isinstance(crop.interpolation, (tuple, list)) else (crop.interpolation,)
    return all(mode in _TORCH_RESIZE_MODES for mode in modes)


class TrainAugment:
    """timm's train transform, from uint8 pixels straight into a batch slot.

    timm's pipeline is a random resized crop, a flip and RandAugment (or colour jitter) on PIL
    images, then ``ToTensor``, ``Normalize`` and random erasing. :meth:`into` makes the same random
    draws in the same order, and:

    - crops and resizes in torch: the crop is a view of the decoded pixels, resampled by torch's
      uint8 antialiased bilinear/bicubic kernel (a port of Pillow's resampling: the same filter and
      support; about 95% of values equal to Pillow's, the rest mostly 1 level apart; tested over
      many draws) at a third of Pillow's cost, without Pillow's crop copy;
    - runs the flip and RandAugment on the 224-pixel result as timm does (Pillow);
    - converts, normalizes and erases in place in the slot of the batch tensor (bit for bit timm's
      values for a given PIL result), without a per-image tensor, a normalized copy or a stacked
      copy. Slots of a ``channels_last`` batch take PIL's pixel order as it is.

    ``__call__`` is timm's composed transform on a PIL image (the reference the tests compare with).
    A crop torch cannot resample like Pillow (nearest, box, ...) runs timm's PIL crop instead.
    """

    def __init__(self, img_size: int, augment: AugmentConfig):
        primary, secondary, final = timm_train_transform(img_size, augment, separate=True)
        self.img_size = img_size
        self._composed = transforms.Compose([*primary.transforms, *secondary.transforms, *final.transforms])
        crop, *after_crop = primary.transforms
        self.crop = crop if _resizes_in_torch(crop) else None
        self.pil = transforms.Compose([*(after_crop if self.crop else primary.transforms), *secondary.transforms])
        normalize = next(t for t in final.transforms if isinstance(t, transforms.Normalize))
        mean = torch.as_tensor(normalize.mean, dtype=torch.float32)
        std = torch.as_tensor(normalize.std, dtype=torch.float32)
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)
        # the same per-channel values along one image row in pixel (H, W*C) order, for NHWC slots
        self.mean_row, self.std_row = mean.repeat(img_size), std.repeat(img_size)
        self.erasing = next((t for t in final.transforms if isinstance(t, RandomErasing)), None)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """The composed timm transform, one image (reference and tests)."""
        return self._composed(image)

    def cropped(self, pixels: torch.Tensor) -> Image.Image:
        """The random resized crop of ``(H, W, 3)`` uint8 ``pixels``, as timm's crop draws it."""
        if self.crop is None:
            return Image.fromarray(pixels.numpy())
        crop = self.crop
        top, left, height, width = crop.get_params(pixels.permute(2, 0, 1), crop.scale, crop.ratio)
        if height < 1 or width < 1:  # timm rounds a crop of a few-pixel image to nothing (Pillow then fails)
            height, width = max(height, 1), max(width, 1)
            top, left = min(top, pixels.shape[0] - height), min(left, pixels.shape[1] - width)
        mode = random.choice(crop.interpolation) if isinstance(crop.interpolation, (tuple, list)) else crop.interpolation
        region = pixels[top:top + height, left:left + width].permute(2, 0, 1).unsqueeze(0)
        # a contiguous channels-last region takes torch's vectorised uint8 path, and comes back channels-last
        resized = F.interpolate(region.contiguous(memory_format=torch.channels_last), size=crop.size,
                                mode=_TORCH_RESIZE_MODES[mode], antialias=True)
        return Image.fromarray(resized[0].permute(1, 2, 0).numpy())

    def into(self, slot: torch.Tensor, pixels: torch.Tensor) -> None:
        """Augment ``(H, W, 3)`` uint8 ``pixels`` into ``slot`` (float32, 3 x img_size x img_size, any strides)."""
        augmented = torch.from_numpy(np.asarray(self.pil(self.cropped(pixels))))  # H x W x C, read only
        rows = slot.permute(1, 2, 0)
        if rows.is_contiguous():  # an NHWC batch: work in pixel order, one image row at a time
            rows = rows.view(self.img_size, -1)
            rows.copy_(augmented.view(self.img_size, -1)).div_(255)  # ToTensor: float32(x) / 255
            rows.sub_(self.mean_row).div_(self.std_row)  # Normalize
        else:
            slot.copy_(augmented.permute(2, 0, 1)).div_(255)
            slot.sub_(self.mean).div_(self.std)
        if self.erasing is not None:
            self.erasing(slot)


def image_train_pipeline(img_size: int, augment: AugmentConfig, num_classes: int | None) -> SamplePipeline:
    """Train samples: JPEG/PNG bytes and ``cls`` -> :class:`TrainAugment` into ``(3, img_size, img_size)`` float32
    slots of a ``channels_last`` batch; labels outside ``[0, num_classes)`` are bad samples."""
    return SamplePipeline(decode=partial(decode_sample_pixels, num_classes=num_classes),
                          into=TrainAugment(img_size, augment).into, sample_shape=(3, img_size, img_size),
                          channels_last=True)


class _TransformedInto:
    """``into`` for a transform that returns the sample's tensor (timm's eval transform): copied into the slot."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, slot: torch.Tensor, image: Image.Image) -> None:
        tensor = self.transform(image)
        if tensor.shape != slot.shape:
            raise RuntimeError(f"the eval transform gave a {tuple(tensor.shape)} tensor, the batch holds {tuple(slot.shape)}")
        slot.copy_(tensor)


def image_eval_pipeline(img_size: int, *, crop_pct: float, crop_mode: str, interpolation: str,
                        num_classes: int | None) -> SamplePipeline:
    """Eval samples: decoded by Pillow, timm's eval transform (resize, center crop or squash, normalize)."""
    transform = create_transform(img_size, is_training=False, crop_pct=crop_pct, crop_mode=crop_mode,
                                 interpolation=interpolation, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    return SamplePipeline(decode=partial(decode_sample, num_classes=num_classes), into=_TransformedInto(transform),
                          sample_shape=(3, img_size, img_size))
