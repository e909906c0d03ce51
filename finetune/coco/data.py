"""COCO 2017 instance segmentation data: the official layout (local or fsspec), mmdet's pipelines, resumable loaders.

Train (images with at least one usable non-crowd annotation, mmdet ``filter_empty_gt``): load ->
the authors' two-policy "AutoAugment", chosen with probability 0.5 per image: (a) resize keeping the
aspect, shorter side one of ``train_scales``, longer side <= ``max_size``; (b) resize as (a) to
``crop_resize_scales``, random crop of an absolute size drawn from ``crop_size_range`` (mmdet
``RandomCrop(crop_type='absolute_range', allow_negative_crop=True)``), then (a) -> flip -> normalize.
Batches hold images of one aspect group (mmdet ``GroupSampler``), zero-padded to ``size_divisor``.
Every sample's randomness comes from (seed, epoch, index), so a resumed run sees exactly the batches an
uninterrupted one sees, with any worker count. Crowd annotations are not training targets.
Eval: every image, resized keeping the aspect to ``eval_scale`` (long, short) with OpenCV as mmdet's test
pipeline does (``coco.eval_resize``), one per batch.
"""
from __future__ import annotations

import io
import logging
import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from shards.indexed import ResumableBatches, worker_iterator
from shards.seeding import epoch_generator, sample_generator

from ..dense import MEAN, STD, normalized, resized

from .annotations import AnnotationFileError, BrokenAnnotation, read_instances

__all__ = ["MEAN", "STD", "AnnotationFileError", "CocoSplit", "EvalLoader", "ImageRecord", "ImageSizeError",
           "TrainLoader", "augment", "check_layout", "decode_masks", "instance_annotations", "load_split", "pad_batch",
           "rescale_shape"]

_logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class ImageRecord:
    """One image of the annotation file and its COCO annotation dicts (those that follow every rule)."""

    image_id: int
    file_name: str
    height: int
    width: int
    annotations: tuple[dict, ...]


@dataclass(frozen=True)
class CocoSplit:
    """One split: the root URL, the annotation file, the images sorted by id with their valid annotations and
    the sorted category ids (contiguous label ``k`` <-> ``category_ids[k]``, named ``category_names[k]``)."""

    root: str
    split: str
    annotation_file: str
    images: tuple[ImageRecord, ...]
    category_ids: tuple[int, ...]
    category_names: tuple[str, ...]
    broken: tuple[BrokenAnnotation, ...] = ()
    """The file's annotations that break a rule (left out of ``images``)."""

    def __len__(self) -> int:
        return len(self.images)


def _filesystem(root: str):
    import fsspec

    return fsspec.core.url_to_fs(root)


def check_layout(root: str, split: str):
    """(filesystem, annotation path, image folder) of ``ROOT/annotations/instances_SPLIT.json`` and ``ROOT/SPLIT/``;
    a missing file or folder raises ``FileNotFoundError`` naming the path."""
    fs, base = _filesystem(root)
    base = base.rstrip("/")
    annotation_path, image_dir = f"{base}/annotations/instances_{split}.json", f"{base}/{split}"
    if not fs.isfile(annotation_path):
        raise FileNotFoundError(f"{root.rstrip('/')}/annotations/instances_{split}.json: no annotation file; expected "
                                "the COCO 2017 layout annotations/instances_{train,val}2017.json, {train,val}2017/*.jpg")
    if not fs.isdir(image_dir):
        raise FileNotFoundError(f"{root.rstrip('/')}/{split}: no image folder ({image_dir})")
    return fs, annotation_path, image_dir


def load_split(root: str, split: str) -> CocoSplit:
    """``ROOT/annotations/instances_SPLIT.json`` with the images of ``ROOT/SPLIT/``; a missing file or folder
    raises ``FileNotFoundError`` naming the path, a damaged file or one without images / annotations /
    categories ``AnnotationFileError``. Annotations that break a rule of ``finetune.coco.annotations.RULES``
    are left out of the images' annotations (counted in ``broken``, one warning)."""
    check_layout(root, split)
    annotation_file = f"{root.rstrip('/')}/annotations/instances_{split}.json"
    checked = read_instances(annotation_file)
    if checked.broken:
        _logger.warning("%s: %d of %d annotations break the COCO format: %s", annotation_file, len(checked.broken),
                        checked.total, checked.summary(consequence=True))
    by_image: dict[int, list[dict]] = {}
    for annotation in checked.annotations:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    images = tuple(ImageRecord(i["id"], i["file_name"], i["height"], i["width"], tuple(by_image.get(i["id"], ())))
                   for i in sorted(checked.images, key=lambda i: i["id"]))
    categories = sorted(checked.categories, key=lambda c: c["id"])
    return CocoSplit(root, split, annotation_file, images, tuple(c["id"] for c in categories),
                     tuple(str(c.get("name", c["id"])) for c in categories), checked.broken)


def instance_annotations(record: ImageRecord, category_ids: tuple[int, ...]) -> list[dict]:
    """The training targets among an image's annotations, as mmdet's ``CocoDataset._parse_ann_info``: not
    crowd, not ``ignore``, a known category, area > 0, box w and h >= 1 and overlapping the image."""
    known, kept = set(category_ids), []
    for ann in record.annotations:
        x, y, w, h = ann["bbox"]
        inside_w = max(0.0, min(x + w, record.width) - max(x, 0.0))
        inside_h = max(0.0, min(y + h, record.height) - max(y, 0.0))
        if (ann.get("iscrowd", 0) or ann.get("ignore", False) or ann["category_id"] not in known
                or ann.get("area", 1) <= 0 or w < 1 or h < 1 or inside_w * inside_h == 0):
            continue
        kept.append(ann)
    return kept


def decode_masks(annotations: list[dict], height: int, width: int) -> np.ndarray:
    """``(N, height, width)`` uint8 masks of polygon, compressed or uncompressed RLE segmentations (pycocotools)."""
    rles = []
    for ann in annotations:
        segmentation = ann["segmentation"]
        if isinstance(segmentation, list):  # polygons: one RLE per part, merged
            rles.append(mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width)))
        elif isinstance(segmentation["counts"], list):  # uncompressed RLE
            rles.append(mask_utils.frPyObjects(segmentation, height, width))
        else:
            rles.append(segmentation)
    if not rles:
        return np.zeros((0, height, width), np.uint8)
    with warnings.catch_warnings():  # pycocotools' decode under numpy 2
        warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy keyword")
        masks = mask_utils.decode(rles)
    if masks.shape[:2] != (height, width):
        raise ValueError(f"segmentation of size {masks.shape[:2]}, the image is {(height, width)}")
    return np.ascontiguousarray(masks.transpose(2, 0, 1))


def rescale_shape(height: int, width: int, long: int, short: int) -> tuple[int, int]:
    """mmcv ``rescale_size`` keeping the ratio: the largest size with long side <= ``long``, short <= ``short``."""
    factor = min(long / max(height, width), short / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def _resize(image: np.ndarray, boxes: np.ndarray, masks: np.ndarray, size: tuple[int, int]):
    """Image bilinear, masks nearest (pixel centres), boxes scaled by the actual ratios and clipped (mmdet Resize)."""
    (height, width), (new_h, new_w) = image.shape[:2], size
    image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    rows = np.minimum(((np.arange(new_h) + 0.5) * height / new_h).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(new_w) + 0.5) * width / new_w).astype(np.int64), width - 1)
    masks = masks[:, rows][:, :, cols]
    boxes = boxes * np.array([new_w / width, new_h / height] * 2, np.float32)
    return image, _clip(boxes, new_h, new_w), masks


def _clip(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.clip(boxes, 0, np.array([width, height, width, height], np.float32)).astype(np.float32)


def augment(image: np.ndarray, boxes: np.ndarray, masks: np.ndarray, config,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """The training augmentation (module docstring) of an ``(H, W, 3)`` uint8 image, its ``(N, 4)`` x1y1x2y2
    boxes and ``(N, H, W)`` masks. Returns ``(image, boxes, masks, kept, draws)``: ``kept`` the indices of the
    input instances still there, ``draws`` the choices ``{"policy": "a"|"b", "crop": (h, w) | None, "flip"}``."""
    kept = np.arange(len(boxes))

    def resize_to(scales, image, boxes, masks):
        short = int(scales[int(rng.integers(len(scales)))])
        return _resize(image, boxes, masks, rescale_shape(*image.shape[:2], config.max_size, short))

    crop = None
    if config.crop_policy and rng.random() < 0.5:
        image, boxes, masks = resize_to(config.crop_resize_scales, image, boxes, masks)
        height, width = image.shape[:2]
        low, high = config.crop_size_range
        crop = (int(rng.integers(min(height, low), min(height, high) + 1)),
                int(rng.integers(min(width, low), min(width, high) + 1)))
        top, left = int(rng.integers(0, height - crop[0] + 1)), int(rng.integers(0, width - crop[1] + 1))
        image = image[top:top + crop[0], left:left + crop[1]]
        boxes = _clip(boxes - np.array([left, top, left, top], np.float32), *crop)
        valid = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        boxes, kept = boxes[valid], kept[valid]
        masks = masks[valid][:, top:top + crop[0], left:left + crop[1]]
    image, boxes, masks = resize_to(config.train_scales, image, boxes, masks)
    flip = bool(rng.random() < config.hflip)
    if flip:
        width = image.shape[1]
        image, masks = image[:, ::-1], masks[:, :, ::-1]
        boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
    draws = {"policy": "b" if crop else "a", "crop": crop, "flip": flip}
    return np.ascontiguousarray(image), boxes.astype(np.float32), np.ascontiguousarray(masks), kept, draws



def pad_batch(images: list[torch.Tensor], size_divisor: int) -> torch.Tensor:
    """``(B, 3, H, W)``: the images zero-padded at the bottom / right to the largest size, rounded up to
    a multiple of ``size_divisor`` (0 is the mean colour after normalization, as mmdet's ``Pad``)."""
    height = math.ceil(max(i.shape[1] for i in images) / size_divisor) * size_divisor
    width = math.ceil(max(i.shape[2] for i in images) / size_divisor) * size_divisor
    batch = images[0].new_zeros(len(images), images[0].shape[0], height, width)
    for k, image in enumerate(images):
        batch[k, :, :image.shape[1], :image.shape[2]] = image
    return batch


class ImageSizeError(ValueError):
    """A decoded image whose size is not the annotation file's."""


class _Images(Dataset):
    """Reads a split's images through fsspec (opened lazily in each worker), checking the annotated size."""

    def __init__(self, split: CocoSplit, records: list[ImageRecord]):
        self.split, self.records = split, records
        self._fs = None

    def __len__(self) -> int:
        return len(self.records)

    def path(self, record: ImageRecord) -> str:
        return f"{self.split.root.rstrip('/')}/{self.split.split}/{record.file_name}"

    def read(self, record: ImageRecord) -> np.ndarray:
        if self._fs is None:
            self._fs, base = _filesystem(self.split.root)
            self._base = f"{base.rstrip('/')}/{self.split.split}"
        with self._fs.open(f"{self._base}/{record.file_name}", "rb") as f:
            image = Image.open(io.BytesIO(f.read()))
            image = np.asarray(image.convert("RGB"))
        if image.shape[:2] != (record.height, record.width):
            raise ImageSizeError(f"{self.path(record)}: image of size {image.shape[:2]}, the annotation file says "
                             f"{(record.height, record.width)} (height, width)")
        return image


def _check_classes(split: CocoSplit, config) -> None:
    if len(split.category_ids) != config.num_classes:
        raise ValueError(f"{split.annotation_file}: {len(split.category_ids)} categories, but "
                         f"coco.num_classes={config.num_classes}")


SEED_PURPOSE = 0xC0C0
"""COCO's part of every sample seed (:func:`shards.seeding.sample_generator`)."""


def _sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return sample_generator(seed, epoch, index, SEED_PURPOSE)


class _TrainSamples(_Images):
    def __init__(self, split: CocoSplit, records: list[ImageRecord], groups: list[int], config, seed: int):
        super().__init__(split, records)
        self.groups, self.config, self.seed = groups, config, seed
        self.labels = {category: k for k, category in enumerate(split.category_ids)}

    def _candidates(self, index: int) -> Iterator[int]:
        """``index``, then the next images of its aspect group, then the others (lazily)."""
        ring = range(index + 1, index + len(self))
        yield index
        yield from (k % len(self) for k in ring if self.groups[k % len(self)] == self.groups[index])
        yield from (k % len(self) for k in ring if self.groups[k % len(self)] != self.groups[index])

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any], int]:
        epoch, index = item
        skipped = 0
        for position in self._candidates(index):  # an unreadable image is replaced by another, and counted
            record = self.records[position]
            try:
                image = self.read(record)
                annotations = instance_annotations(record, self.split.category_ids)
                masks = decode_masks(annotations, record.height, record.width)
            except Exception as error:  # noqa: BLE001 - any damage: skip, count, name the file
                skipped += 1
                _logger.warning("skipping %s: %s: %s", self.path(record), type(error).__name__, error)
                continue
            boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)],
                             np.float32).reshape(-1, 4)
            labels = np.array([self.labels[a["category_id"]] for a in annotations], np.int64)
            image, boxes, masks, kept, _ = augment(image, _clip(boxes, record.height, record.width), masks,
                                                   self.config, _sample_rng(self.seed, epoch, index))
            target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels[kept]),
                      "masks": torch.from_numpy(masks), "image_id": record.image_id,
                      "image_size": (int(image.shape[0]), int(image.shape[1]))}
            return normalized(image), target, skipped
        raise RuntimeError(f"{self.split.root}: no readable image in {self.split.split}")


class TrainLoader(ResumableBatches):
    """This rank's training batches ``(images (B, 3, H, W) padded, [target per image])``: aspect-grouped
    batches, every rank the same number per epoch; resumable mid-epoch with ``state_dict``.
    ``set_epoch`` / iteration semantics as ``shards.TrainLoader``."""

    name = "COCO"

    def __init__(self, split: CocoSplit, config, *, batch_size: int, rank: int, world_size: int, num_workers: int,
                 seed: int):
        _check_classes(split, config)
        records = [r for r in split.images if instance_annotations(r, split.category_ids)]
        broken = Counter(b.rule.name for b in split.broken)
        _logger.info("%s: %d of %d %s images have no usable non-crowd annotation and are left out of training; "
                     "%d annotations break the COCO format and are left out%s", split.annotation_file,
                     len(split) - len(records), len(split), split.split, len(split.broken),
                     f" ({', '.join(f'{rule} {n}' for rule, n in broken.items())})" if broken else "")
        self._groups = [int(r.width >= r.height) for r in records]
        self._samples = _TrainSamples(split, records, self._groups, config, seed)
        self.split, self.config, self.batch_size = split, config, batch_size
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.seed = num_workers, seed
        group_batches = sum(self._groups.count(g) // batch_size for g in (0, 1))
        self._per_rank = group_batches // world_size
        if self._per_rank < 1:
            raise ValueError(f"{split.annotation_file}: {len(records)} training images give {group_batches} "
                             f"one-aspect batch(es) of {batch_size}, fewer than one per rank on {world_size} rank(s)")
        self._collate = _Collate(config.size_divisor)
        self._start()

    def __len__(self) -> int:
        return self._per_rank

    @property
    def num_images(self) -> int:
        """Training images (those with a usable annotation)."""
        return len(self._samples)

    def _all_batches(self) -> list[list[int]]:
        generator = epoch_generator(self.seed, self._epoch)
        batches = []
        for group in (0, 1):  # mmdet GroupSampler: shuffle within a group, cut into one-group batches
            members = torch.tensor([k for k, g in enumerate(self._groups) if g == group], dtype=torch.int64)
            members = members[torch.randperm(len(members), generator=generator)].tolist()
            batches += [members[b:b + self.batch_size] for b in range(0, len(members) - self.batch_size + 1,
                                                                       self.batch_size)]
        batches = [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]
        return batches[self.rank::self.world_size]

    def _identity(self) -> dict[str, Any]:
        return {"root": self.split.root, "images": len(self._samples), "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.batch_size}


class _Collate:
    """Training collate (picklable): padded images, the target dicts, the skipped count."""

    def __init__(self, size_divisor: int):
        self.size_divisor = size_divisor

    def __call__(self, samples: list[tuple[torch.Tensor, dict, int]]) -> tuple[torch.Tensor, list[dict], int]:
        return (pad_batch([s[0] for s in samples], self.size_divisor), [s[1] for s in samples],
                sum(s[2] for s in samples))


def _as_is(sample: Any) -> Any:
    return sample


class _EvalSamples(_Images):
    def __init__(self, split: CocoSplit, records: list[ImageRecord], config):
        super().__init__(split, records)
        self.config = config

    def __getitem__(self, item: int) -> tuple[torch.Tensor | None, dict[str, Any]]:
        record = self.records[item]
        height, width = rescale_shape(record.height, record.width, max(self.config.eval_scale),
                                      min(self.config.eval_scale))
        meta = {"image_id": record.image_id, "orig_size": (record.height, record.width), "image_size": (height, width),
                "scale": (height / record.height, width / record.width)}
        try:
            image = self.read(record)
        except ImageSizeError:  # the image is not the annotated one: evaluating it would score the wrong thing
            raise
        except Exception as error:  # noqa: BLE001
            _logger.warning("evaluation skips %s: %s: %s", self.path(record), type(error).__name__, error)
            return None, meta
        pixels = resized(image, height, width, self.config.eval_resize)  # mmdet: one OpenCV resize
        return pad_batch([normalized(pixels)], self.config.size_divisor), meta


class EvalLoader:
    """This rank's share of the split's images (``rank::world``, all of them, so every image is scored once),
    one per batch: ``(image (1, 3, H, W) padded, [meta])`` with ``meta`` = ``image_id``, ``orig_size`` (H0, W0),
    ``image_size`` (h, w) resized and unpadded, ``scale`` (h / H0, w / W0). An unreadable image yields
    ``(None, [meta])`` (counted in ``bad_samples``); an image not of its annotated size raises ``ValueError``.
    ``description`` names the set (the annotation file) in the trainer's messages."""

    def __init__(self, split: CocoSplit, config, *, rank: int, world_size: int, num_workers: int):
        _check_classes(split, config)
        self.split = split
        self.description = split.annotation_file
        self._samples = _EvalSamples(split, list(split.images[rank::world_size]), config)
        self.num_workers = num_workers
        self.bad_samples = 0

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def num_samples(self) -> int:
        return len(self._samples)

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, list[dict[str, Any]]]]:
        for image, meta in worker_iterator(self._samples, num_workers=self.num_workers, batch_size=None,
                                           collate_fn=_as_is):
            if image is None:
                self.bad_samples += 1
            yield image, [meta]
