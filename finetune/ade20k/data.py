"""ADE20K data: the ADEChallengeData2016 layout (local or fsspec), mmseg's pipelines, resumable loaders.

Train: load -> ``reduce_zero_label`` (0 -> 255, k -> k-1) -> random resize (ratio of ``resize_scale``,
keeping the aspect) -> random crop with ``cat_max_ratio`` -> flip -> photometric distortion ->
normalize -> pad to the crop (label 255). Every sample's randomness comes from (seed, epoch,
index), so a resumed run sees exactly the batches an uninterrupted one sees, with any worker count.
An unreadable pair (a damaged image or label, a label of another size than its image or with values
that are not classes) is replaced by the next one and counted in ``bad_samples``, named in a warning.
Eval: mmseg 0.27's test resize (``ade20k.eval_resize=opencv``): keeping the aspect to ``eval_scale`` x ratio, then
to a multiple of 32, two OpenCV bilinear resizes without antialiasing; the label stays at the original size
(predictions are resized to it).
"""
from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from shards.samples import DECODE_ERRORS
from shards.indexed import ShuffledBatches, worker_iterator
from shards.seeding import sample_generator

from ..dense import MEAN, STD, normalized, resized


__all__ = ["IGNORE_INDEX", "MEAN", "STD", "EvalLoader", "SegmentationSample", "SplitFiles", "TrainLoader",
           "check_label_values", "class_names", "eval_resize_shape", "eval_resized", "list_split", "photometric_distortion",
           "random_crop", "random_resize_shape", "reduce_zero_label"]

_logger = logging.getLogger(__name__)

IGNORE_INDEX = 255


@dataclass(frozen=True)
class SplitFiles:
    """One split: the root URL and the (image, annotation) paths relative to it, sorted by name."""

    root: str
    split: str
    pairs: tuple[tuple[str, str], ...]

    def __len__(self) -> int:
        return len(self.pairs)


def _filesystem(root: str):
    import fsspec

    return fsspec.core.url_to_fs(root)


def list_split(root: str, split: str) -> SplitFiles:
    """The images of ``ROOT/images/SPLIT`` with their ``ROOT/annotations/SPLIT`` labels; a missing folder, an
    empty one or an image without its label raises ``FileNotFoundError`` naming the path."""
    fs, base = _filesystem(root)
    folders = {kind: f"{base.rstrip('/')}/{kind}/{split}" for kind in ("images", "annotations")}
    for kind, folder in folders.items():
        if not fs.isdir(folder):
            raise FileNotFoundError(f"{root}: no {kind}/{split} folder ({folder}); expected the ADEChallengeData2016 "
                                    "layout images/{training,validation}/*.jpg, annotations/{training,validation}/*.png")
    images = sorted(os.path.basename(p) for p in fs.ls(folders["images"], detail=False)
                    if p.lower().endswith((".jpg", ".jpeg", ".png")))
    labels = {os.path.splitext(os.path.basename(p))[0] for p in fs.ls(folders["annotations"], detail=False)
              if p.lower().endswith(".png")}
    if not images:
        raise FileNotFoundError(f"{folders['images']}: no images")
    unlabelled = [name for name in images if os.path.splitext(name)[0] not in labels]
    if unlabelled:
        raise FileNotFoundError(f"{folders['annotations']}: no label PNG for {len(unlabelled)} image(s), e.g. "
                                f"{os.path.splitext(unlabelled[0])[0]}.png")
    pairs = tuple((f"images/{split}/{name}", f"annotations/{split}/{os.path.splitext(name)[0]}.png") for name in images)
    return SplitFiles(root, split, pairs)


def class_names(root: str, num_classes: int) -> list[str] | None:
    """Class names from ``ROOT/objectInfo150.txt`` (ADE's table: Idx, Ratio, Train, Val, Name; the first name of
    each row, in index order), or None when the file is absent or has another number of classes."""
    fs, base = _filesystem(root)
    path = f"{base.rstrip('/')}/objectInfo150.txt"
    if not fs.isfile(path):
        return None
    with fs.open(path, "r") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()][1:]
    names = [row[-1].split(",")[0].strip() for row in rows]
    return names if len(names) == num_classes else None


def check_label_values(label: np.ndarray, num_classes: int, path: str) -> None:
    """``ValueError`` naming ``path`` unless every value of the label file is 0..``num_classes`` or 255: after
    ``reduce_zero_label``, a class 0..num_classes-1 or 255 (ignored)."""
    bad = (label > num_classes) & (label != 255) | (label < 0)
    if bad.any():
        values = np.unique(label[bad])
        shown = ", ".join(str(int(v)) for v in values[:5]) + (", ..." if len(values) > 5 else "")
        raise ValueError(f"{path}: {int(bad.sum())} pixels of label values {shown}, not classes of "
                         f"ade20k.num_classes={num_classes}: expected 0..{num_classes} or 255 in the file "
                         f"(0..{num_classes - 1} and 255 ignored after reduce_zero_label)")


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg ``reduce_zero_label``: 0 ("other") -> 255, k -> k-1 (uint8)."""
    out = label.astype(np.int16) - 1
    out[label == 0] = IGNORE_INDEX
    out[out == IGNORE_INDEX - 1] = IGNORE_INDEX
    return out.astype(np.uint8)


def _rescale_shape(height: int, width: int, scale: tuple[float, float]) -> tuple[int, int]:
    """mmcv ``rescale_size`` keeping the ratio: fit the long side to max(scale) and the short one to min(scale)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def random_resize_shape(height: int, width: int, scale: tuple[int, int], ratio_range: tuple[float, float],
                        rng: np.random.Generator) -> tuple[int, int]:
    """mmseg ``Resize(img_scale, ratio_range, keep_ratio=True)``: a random ratio of the target scale."""
    ratio = rng.uniform(*ratio_range)
    return _rescale_shape(height, width, (int(scale[0] * ratio), int(scale[1] * ratio)))


def eval_resize_shape(height: int, width: int, scale: tuple[int, int], ratio: float = 1.0,
                      divisor: int = 32) -> tuple[int, int]:
    """Test-time size: the ratio-keeping rescale of ``scale * ratio``, each side rounded up to ``divisor``."""
    h, w = _rescale_shape(height, width, (int(scale[0] * ratio), int(scale[1] * ratio)))
    return max(divisor, math.ceil(h / divisor) * divisor), max(divisor, math.ceil(w / divisor) * divisor)


def eval_resized(image: Image.Image, scale: tuple[int, int], ratio: float = 1.0, method: str = "opencv",
                 divisor: int = 32) -> np.ndarray:
    """The test-time image (H x W x 3 uint8 RGB). ``opencv``: mmseg 0.27's ``Resize(keep_ratio=True)`` then
    ``ResizeToMultiple(divisor)``, each ``cv2.resize`` INTER_LINEAR (mmcv's ``imrescale`` / ``imresize``, no
    antialiasing); ``pillow``: one Pillow bilinear resize to :func:`eval_resize_shape`."""
    pixels = np.asarray(image)
    if method == "pillow":
        return resized(pixels, *eval_resize_shape(image.height, image.width, scale, ratio, divisor), method)
    height, width = _rescale_shape(image.height, image.width, (int(scale[0] * ratio), int(scale[1] * ratio)))
    pixels = resized(pixels, height, width, method)
    return resized(pixels, math.ceil(height / divisor) * divisor, math.ceil(width / divisor) * divisor, method)


def random_crop(image: np.ndarray, label: np.ndarray, crop: int, cat_max_ratio: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """mmseg ``RandomCrop``: up to 10 draws while one class covers ``cat_max_ratio`` or more of the crop."""
    height, width = label.shape

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, max(height - crop, 0) + 1)), int(rng.integers(0, max(width - crop, 0) + 1))

    top, left = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            window = label[top:top + crop, left:left + crop]
            classes, counts = np.unique(window, return_counts=True)
            counts = counts[classes != IGNORE_INDEX]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = draw()
    return image[top:top + crop, left:left + crop], label[top:top + crop, left:left + crop]


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion``: brightness +-32, contrast 0.5-1.5 (before or after the colour steps),
    saturation 0.5-1.5, hue +-18 (OpenCV's 0-180 hue scale), each with probability 0.5, clipped to 0-255."""
    out = image.astype(np.float32)

    def contrast(values: np.ndarray) -> np.ndarray:
        return np.clip(values * rng.uniform(0.5, 1.5), 0, 255) if rng.integers(2) else values

    if rng.integers(2):
        out = np.clip(out + rng.uniform(-32, 32), 0, 255)
    contrast_first = rng.integers(2) == 1
    if contrast_first:
        out = contrast(out)
    saturate, saturation = rng.integers(2), rng.uniform(0.5, 1.5)
    shift_hue, hue = rng.integers(2), int(rng.integers(-18, 18))
    if saturate or shift_hue:
        hsv = np.asarray(Image.fromarray(out.astype(np.uint8), "RGB").convert("HSV")).astype(np.float32)
        if saturate:
            hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
        if shift_hue:  # PIL's hue spans 0-255 for 360 degrees, OpenCV's 0-180
            hsv[..., 0] = np.mod(hsv[..., 0] + hue * 255.0 / 180.0, 256.0)
        out = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)
    if not contrast_first:
        out = contrast(out)
    return out



@dataclass(frozen=True)
class SegmentationSample:
    """What a training worker returns per index: the crop, its label, and how many files it had to skip."""

    image: torch.Tensor
    label: torch.Tensor
    skipped: int


class _Files(Dataset):
    """Reads (image, label) pairs of a split through fsspec (opened lazily in each worker); a missing or damaged
    file, a label of another size than its image or with values that are not classes raises ``ValueError``
    naming the file."""

    def __init__(self, files: SplitFiles, num_classes: int):
        self.files, self.num_classes = files, num_classes
        self._fs = None

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> tuple[Image.Image, np.ndarray]:
        if self._fs is None:
            self._fs, self._base = _filesystem(self.files.root)
        image_path, label_path = (f"{self._base.rstrip('/')}/{p}" for p in self.files.pairs[index])
        image = self._decode(image_path, lambda opened: opened.convert("RGB"))
        label = self._decode(label_path, np.array)
        if label.ndim != 2 or label.shape != (image.height, image.width):
            raise ValueError(f"{label_path}: label of shape {label.shape}, expected one channel of the image's "
                             f"size {(image.height, image.width)}")
        check_label_values(label, self.num_classes, label_path)
        return image, reduce_zero_label(label)

    def _decode(self, path: str, convert: Callable[[Image.Image], Any]) -> Any:
        """``convert(Image.open(path))``; ``ValueError`` naming the file when it is missing or damaged."""
        try:
            with self._fs.open(path, "rb") as f:
                return convert(Image.open(io.BytesIO(f.read())))
        except DECODE_ERRORS as error:
            raise ValueError(f"{path}: {type(error).__name__}: {error}") from error


SEED_PURPOSE = 0xADE
"""ADE20K's part of every sample seed (:func:`shards.seeding.sample_generator`)."""


def _sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return sample_generator(seed, epoch, index, SEED_PURPOSE)


class _TrainSamples(_Files):
    def __init__(self, files: SplitFiles, config, seed: int):
        super().__init__(files, config.num_classes)
        self.config, self.seed = config, seed

    def __getitem__(self, item: tuple[int, int]) -> SegmentationSample:
        epoch, index = item
        skipped = 0
        for attempt in range(len(self)):  # an unreadable pair is replaced by the next one, and counted
            position = (index + attempt) % len(self)
            try:
                image, label = self.read(position)
            except Exception as error:  # noqa: BLE001 - any damage: skip, count, name the file
                skipped += 1
                _logger.warning("skipping %s: %s: %s", self.files.pairs[position][0], type(error).__name__, error)
                continue
            return self._augment(image, label, _sample_rng(self.seed, epoch, position), skipped)
        raise RuntimeError(f"{self.files.root}: no readable image in {self.files.split}")

    def _augment(self, image: Image.Image, label: np.ndarray, rng: np.random.Generator, skipped: int) -> SegmentationSample:
        cfg = self.config
        height, width = random_resize_shape(image.height, image.width, cfg.resize_scale, cfg.ratio_range, rng)
        pixels = np.asarray(image.resize((width, height), Image.BILINEAR))
        label = np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))
        pixels, label = random_crop(pixels, label, cfg.crop_size, cfg.cat_max_ratio, rng)
        if rng.random() < cfg.hflip:
            pixels, label = pixels[:, ::-1], label[:, ::-1]
        values = photometric_distortion(pixels, rng) if cfg.photometric else pixels.astype(np.float32)
        tensor = torch.zeros(3, cfg.crop_size, cfg.crop_size)  # padding: 0 after normalization, label 255
        target = torch.full((cfg.crop_size, cfg.crop_size), IGNORE_INDEX, dtype=torch.int64)
        h, w = label.shape
        tensor[:, :h, :w] = normalized(values)
        target[:h, :w] = torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))
        return SegmentationSample(tensor, target, skipped)


def _collate_train(samples: list[SegmentationSample]) -> tuple[torch.Tensor, torch.Tensor, int]:
    return (torch.stack([s.image for s in samples]), torch.stack([s.label for s in samples]),
            sum(s.skipped for s in samples))


class TrainLoader(ShuffledBatches):
    """This rank's training batches ``(images, labels)``: every rank the same number per epoch (the
    shuffled split is cut to a multiple of world x batch); resumable mid-epoch with ``state_dict``.
    ``set_epoch`` / iteration semantics as ``shards.TrainLoader``."""

    name = "ADE20K"

    count_key = "images"

    def __init__(self, files: SplitFiles, config, *, batch_size: int, rank: int, world_size: int, num_workers: int,
                 seed: int):
        self.files = files
        self._shuffled(_TrainSamples(files, config, seed), _collate_train, root=files.root, size=len(files),
                       described=f"{files.root}: {len(files)} {files.split} images", per_batch=batch_size,
                       batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers, seed=seed)


class _EvalSamples(_Files):
    def __init__(self, files: SplitFiles, config, indices: Sequence[int]):
        super().__init__(files, config.num_classes)
        self.config, self.indices = config, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> dict[str, Any] | None:
        index = self.indices[item]
        try:
            image, label = self.read(index)
        except Exception as error:  # noqa: BLE001
            _logger.warning("evaluation skips %s: %s: %s", self.files.pairs[index][0], type(error).__name__, error)
            return None
        scales = [normalized(eval_resized(image, self.config.eval_scale, ratio, self.config.eval_resize))
                  for ratio in self.config.eval_ratios]
        return {"images": scales, "label": torch.from_numpy(label.astype(np.int64)), "index": index}


class EvalLoader:
    """This rank's share of the validation images (``rank::world``, so every image is scored once), one image
    per batch: ``({"images": [one tensor per eval ratio]}, label at the original size)``. Ranks may hold one
    image more than others. An unreadable pair (damaged image or label, a label of another size or with values
    that are not classes) is skipped, named in a warning and counted in ``bad_samples``; ``num_samples`` (this
    rank's images) against the evaluator's ``samples`` tells the trainer the evaluation is incomplete.
    ``description`` names the set in the trainer's messages."""

    def __init__(self, files: SplitFiles, config, *, rank: int, world_size: int, num_workers: int):
        self.files = files
        self.description = f"{files.root.rstrip('/')}/images/{files.split}"
        self._samples = _EvalSamples(files, config, range(rank, len(files), world_size))
        self.num_workers = num_workers
        self.bad_samples = 0

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def num_samples(self) -> int:
        return len(self._samples)

    def __iter__(self) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        for sample in worker_iterator(self._samples, num_workers=self.num_workers, batch_size=None):
            if sample is None:
                self.bad_samples += 1
                continue
            yield {"images": [image[None] for image in sample["images"]], "index": sample["index"]}, sample["label"][None]
