"""A tiny synthetic instance-segmentation dataset in the exact COCO 2017 layout, learnable in CPU minutes.

Layout (as the official release)::

    ROOT/annotations/instances_train2017.json
    ROOT/annotations/instances_val2017.json
    ROOT/train2017/000000000001.jpg      RGB JPEG, file name = image id, 12 digits
    ROOT/val2017/000000000002.jpg

Each scene is a textured background (stripes or a checkerboard in a random colour, a brightness
gradient) with 0-5 objects of the four :data:`CATEGORIES` (disk, square, triangle, ring), each of
its class-typical colour (+- jitter) with a stripe texture and shading, of sizes from a few
pixels to most of the image (COCO's small, medium and large ranges all occur), drawn over each
other: a later object occludes earlier ones, and every annotation describes the *visible* part.
About one image in six has no object at all (no annotation). About one in five also holds a
cluster of small disks of one class annotated as a single ``iscrowd: 1`` region, as COCO marks
crowds.

Annotations (``instances_*.json``): ``info``, ``licenses``, ``images`` (``id``, ``file_name``,
``height``, ``width``), ``annotations`` and ``categories`` (``id``, ``name``, ``supercategory``).
Category ids are 1, 3, 7, 9: not contiguous, like COCO's 1..90 with gaps. Image ids are odd in
train2017 and even in val2017 (``2 * i - 1`` / ``2 * i`` for the ``i``-th image): not contiguous
either. Annotation ids count from 1 in each file. Per annotation:

- ``segmentation``: the exact visible mask as RLE. ``iscrowd: 0`` annotations use compressed RLE
  (``{"size": [h, w], "counts": str}``, as ``pycocotools.mask.encode`` gives it); crowd
  annotations use uncompressed RLE (``counts`` a list of ints), as COCO's own crowd annotations do.
  COCO's ordinary annotations are polygons instead; RLE is equally valid COCO
  (``pycocotools.coco.COCO.annToMask`` reads all three forms) and, unlike polygons traced from
  pixels, reproduces the mask exactly, ring holes included.
- ``area``: the visible mask's pixel count; ``bbox``: ``[x, y, w, h]`` of its pixels (pixel ``i``
  covering ``[i, i + 1)``, as ``pycocotools.mask.toBbox``); ``iscrowd`` 0 or 1.
- Objects whose visible part is smaller than 4 pixels are not annotated.

Image ``i`` of a split depends only on ``(seed, split, i)``: the same seed gives the same files,
whatever the counts.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ..shapes import COLOURS, shape_mask

__all__ = ["CATEGORIES", "write_demo"]

CATEGORIES: tuple[dict, ...] = (
    {"id": 1, "name": "disk", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
    {"id": 9, "name": "ring", "supercategory": "shape"},
)
"""COCO ``categories`` entries, sorted by id (ids deliberately not contiguous)."""

_NAMES = {category["id"]: category["name"] for category in CATEGORIES}
_SPLITS = (("train2017", 1), ("val2017", 2))  # folder, split id (image id = 2 * i - 2 + split id)
_MIN_AREA = 4
_MAX_OBJECTS = 5
_CROWD_PROBABILITY = 0.2


def _background(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    height, width = xx.shape
    base = np.array([150, 140, 125]) + rng.integers(-40, 41, 3)
    period = rng.uniform(6, 16)
    if rng.random() < 0.5:  # stripes at a random angle
        angle = rng.uniform(0, np.pi)
        texture = 20.0 * np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period)
    else:  # checkerboard
        texture = 16.0 * ((np.floor(xx / period) + np.floor(yy / period)) % 2 * 2 - 1)
    gradient = rng.uniform(-40, 40) * (xx / width - 0.5) + rng.uniform(-40, 40) * (yy / height - 0.5)
    return base + (texture + gradient)[..., None]


def _paint(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, kind: int,
           xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> None:
    colour = np.array(COLOURS[_NAMES[kind]]) + rng.integers(-25, 26, 3)
    gx, gy = rng.uniform(-1, 1, 2) * 30.0 / max(r, 1.0)
    stripe_angle, stripe_period = rng.uniform(0, np.pi), rng.uniform(4, 9)
    texture = 12.0 * np.sin(2 * np.pi * (np.cos(stripe_angle) * xx + np.sin(stripe_angle) * yy) / stripe_period)
    shade = gx * (xx - cx) + gy * (yy - cy) + texture
    image[mask] = colour + shade[mask][:, None]


def _render(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, list[tuple[int, int, np.ndarray]]]:
    """The image and its instances ``(category id, iscrowd, visible mask)`` in drawing order."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = _background(rng, xx, yy)
    owner = np.full((height, width), -1, dtype=np.int64)  # which instance each pixel shows
    instances: list[tuple[int, int]] = []
    side = min(height, width)

    if rng.random() < _CROWD_PROBABILITY:  # a cluster of small disks of one class, one crowd region
        kind = int(rng.choice([c["id"] for c in CATEGORIES]))
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        spread = rng.uniform(0.08, 0.15) * side
        crowd = np.zeros((height, width), dtype=bool)
        for _ in range(int(rng.integers(6, 13))):
            px, py = cx + rng.normal(0, spread), cy + rng.normal(0, spread)
            crowd |= shape_mask("disk", xx, yy, px, py, rng.uniform(1.5, 3.5), 0.0)
        if crowd.any():
            _paint(rng, image, crowd, kind, xx, yy, cx, cy, spread)
            owner[crowd] = len(instances)
            instances.append((kind, 1))

    for _ in range(int(rng.integers(0, _MAX_OBJECTS + 1))):
        kind = int(rng.choice([c["id"] for c in CATEGORIES]))
        r = float(np.exp(rng.uniform(np.log(0.05), np.log(0.6)))) * side  # log-uniform: small to large
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        mask = shape_mask(_NAMES[kind], xx, yy, cx, cy, r, rng.uniform(0, 2 * np.pi))
        if not mask.any():
            continue
        _paint(rng, image, mask, kind, xx, yy, cx, cy, r)
        owner[mask] = len(instances)
        instances.append((kind, 0))

    image = image + rng.normal(0.0, 6.0, image.shape)
    visible = [(kind, crowd, owner == index) for index, (kind, crowd) in enumerate(instances)]
    return np.clip(image, 0, 255).astype(np.uint8), visible


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a 0-run."""
    flat = mask.reshape(-1, order="F").astype(np.uint8)
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": runs}


def _annotation(kind: int, crowd: int, mask: np.ndarray) -> dict | None:
    area = int(mask.sum())
    if area < _MIN_AREA:
        return None
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    x, y = int(cols[0]), int(rows[0])
    bbox = [float(x), float(y), float(cols[-1] + 1 - x), float(rows[-1] + 1 - y)]
    if crowd:
        segmentation = _uncompressed_rle(mask)
    else:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        segmentation = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return {"category_id": kind, "segmentation": segmentation, "area": float(area), "bbox": bbox, "iscrowd": crowd}


def write_demo(
        root: str | os.PathLike,
        train_images: int = 120,
        val_images: int = 30,
        min_size: tuple[int, int] = (96, 128),
        max_size: tuple[int, int] = (160, 192),
        seed: int = 0,
        jpeg_quality: int = 90,
) -> dict:
    """Write the demo dataset under ``root`` (COCO 2017 layout, see the module docstring).

    Args:
        root: dataset root (created; existing files of the same names are overwritten).
        train_images, val_images: images per split.
        min_size, max_size: inclusive (height, width) range of the image sizes; equal for a fixed size.
        seed: everything is a function of the seed (and the split and image index).
        jpeg_quality: JPEG quality of the images.

    Returns ``{"root", "categories", "train", "val", "annotations": {"train": path, "val": path}}``
    (image counts under ``train`` / ``val``).
    """
    root = Path(root)
    (min_h, min_w), (max_h, max_w) = min_size, max_size
    if not (0 < min_h <= max_h and 0 < min_w <= max_w):
        raise ValueError(f"need 0 < min_size <= max_size, got min_size={min_size} max_size={max_size}")
    counts = {"train2017": train_images, "val2017": val_images}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    annotation_files = {}
    for split, split_id in _SPLITS:
        image_dir = root / split
        image_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for index in range(1, counts[split] + 1):
            rng = np.random.default_rng([seed, split_id, index])
            height, width = int(rng.integers(min_h, max_h + 1)), int(rng.integers(min_w, max_w + 1))
            image, instances = _render(rng, height, width)
            image_id = 2 * index - 2 + split_id
            file_name = f"{image_id:012d}.jpg"
            Image.fromarray(image, mode="RGB").save(image_dir / file_name, quality=jpeg_quality)
            images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
            for kind, crowd, mask in instances:
                annotation = _annotation(kind, crowd, mask)
                if annotation is not None:
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id, **annotation})
        dataset = {
            "info": {"description": f"Synthetic demo data in the COCO 2017 layout (finetune.coco.demo_data), "
                                    f"seed={seed}, {split}", "version": "1.0", "year": 2017},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": [dict(category) for category in CATEGORIES],
        }
        path = root / "annotations" / f"instances_{split}.json"
        path.write_text(json.dumps(dataset))
        annotation_files[split[:-4]] = str(path)
    return {"root": str(root), "categories": CATEGORIES, "train": train_images, "val": val_images,
            "annotations": annotation_files}
