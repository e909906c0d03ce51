"""A tiny synthetic dataset in the exact ADEChallengeData2016 layout, learnable in CPU minutes.

Layout (as the official release)::

    ROOT/images/training/ADE_train_00000001.jpg      RGB JPEG
    ROOT/images/validation/ADE_val_00000001.jpg
    ROOT/annotations/training/ADE_train_00000001.png  uint8, mode "L"
    ROOT/annotations/validation/ADE_val_00000001.png
    ROOT/objectInfo150.txt                               Idx Ratio Train Val Name (ADE's class table)
    ROOT/README.txt

Label values: 0 = "other" (becomes 255, ignored, after ``reduce_zero_label``), ``k`` in 1..6 the
class ``CLASSES[k - 1]``. Each scene is a wall (upper part, vertical-stripe texture) above a floor
(diagonal-stripe texture), the boundary at a random, slightly tilted height, with 2-6 objects
(disk, square, triangle, ring) of class-typical colour (+- jitter), random size, rotation and
shading, drawn over each other. A 1-pixel band inside every object's edge is labelled 0, like
ADE's unlabelled object boundaries. Image sizes vary (heights 96-160, widths 128-192 by default)
so the resize and crop paths are exercised. Image ``i`` of a split depends only on
``(seed, split, i)``: the same seed gives the same files, whatever the counts.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..shapes import COLOURS, shape_mask

__all__ = ["CLASSES", "write_demo"]

CLASSES: tuple[str, ...] = ("wall", "floor", "disk", "square", "triangle", "ring")
"""Class names in index order after ``reduce_zero_label`` (PNG value ``k`` is ``CLASSES[k - 1]``)."""

_WALL, _FLOOR, _DISK, _SQUARE, _TRIANGLE, _RING = range(1, 7)
_SPLITS = (("training", "train", 0), ("validation", "val", 1))


def _inner_boundary(label: np.ndarray) -> np.ndarray:
    """Object pixels with a 4-neighbour of another label (a 1-px band inside each object's edge)."""
    objects = label >= _DISK
    differs = np.zeros_like(objects)
    differs[1:, :] |= label[1:, :] != label[:-1, :]
    differs[:-1, :] |= label[:-1, :] != label[1:, :]
    differs[:, 1:] |= label[:, 1:] != label[:, :-1]
    differs[:, :-1] |= label[:, :-1] != label[:, 1:]
    return objects & differs


def _render(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    horizon = rng.uniform(0.35, 0.65) * height + rng.uniform(-0.15, 0.15) * (xx - width / 2)
    floor = yy >= horizon
    label = np.where(floor, _FLOOR, _WALL).astype(np.uint8)

    wall_period, floor_period = rng.uniform(6, 12), rng.uniform(8, 14)
    wall_tex = 18.0 * np.sign(np.sin(2 * np.pi * xx / wall_period + rng.uniform(0, 2 * np.pi)))
    floor_tex = 22.0 * np.sin(2 * np.pi * (xx + yy) / floor_period + rng.uniform(0, 2 * np.pi))
    wall_rgb = np.array([200, 190, 170]) + rng.integers(-20, 21, 3)
    floor_rgb = np.array([115, 78, 45]) + rng.integers(-20, 21, 3)
    image = np.where(floor[..., None], floor_rgb + floor_tex[..., None], wall_rgb + wall_tex[..., None])

    side = min(height, width)
    for _ in range(int(rng.integers(2, 7))):
        kind = int(rng.integers(_DISK, _RING + 1))
        r = rng.uniform(0.08, 0.25) * side
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        mask = shape_mask(CLASSES[kind - 1], xx, yy, cx, cy, r, rng.uniform(0, 2 * np.pi))
        if not mask.any():
            continue
        colour = np.array(COLOURS[CLASSES[kind - 1]]) + rng.integers(-25, 26, 3)
        gx, gy = rng.uniform(-1, 1, 2) * 30.0 / max(r, 1.0)
        shade = gx * (xx - cx) + gy * (yy - cy)
        image[mask] = colour + shade[mask][:, None]
        label[mask] = kind
    label[_inner_boundary(label)] = 0
    image = image + rng.normal(0.0, 6.0, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_demo(
        root: str | os.PathLike,
        train_images: int = 200,
        val_images: int = 50,
        min_size: tuple[int, int] = (96, 128),
        max_size: tuple[int, int] = (160, 192),
        seed: int = 0,
        jpeg_quality: int = 90,
) -> dict:
    """Write the demo dataset under ``root`` (ADEChallengeData2016 layout, see the module docstring).

    Args:
        root: dataset root (created; existing files of the same names are overwritten).
        train_images, val_images: images per split.
        min_size, max_size: inclusive (height, width) range of the image sizes; equal for a fixed size.
        seed: everything is a function of the seed (and the split and image index).
        jpeg_quality: JPEG quality of the images.

    Returns ``{"root", "classes", "train", "val"}``.
    """
    root = Path(root)
    (min_h, min_w), (max_h, max_w) = min_size, max_size
    if not (0 < min_h <= max_h and 0 < min_w <= max_w):
        raise ValueError(f"need 0 < min_size <= max_size, got min_size={min_size} max_size={max_size}")
    counts = {"training": train_images, "validation": val_images}
    images_with = {split: np.zeros(len(CLASSES), dtype=np.int64) for split in counts}
    pixels = np.zeros(len(CLASSES) + 1, dtype=np.int64)
    for split, prefix, split_id in _SPLITS:
        image_dir, label_dir = root / "images" / split, root / "annotations" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        for index in range(1, counts[split] + 1):
            rng = np.random.default_rng([seed, split_id, index])
            height, width = int(rng.integers(min_h, max_h + 1)), int(rng.integers(min_w, max_w + 1))
            image, label = _render(rng, height, width)
            stem = f"ADE_{prefix}_{index:08d}"
            Image.fromarray(image, mode="RGB").save(image_dir / f"{stem}.jpg", quality=jpeg_quality)
            Image.fromarray(label, mode="L").save(label_dir / f"{stem}.png")
            present = np.bincount(label.reshape(-1), minlength=len(CLASSES) + 1)
            images_with[split] += present[1:] > 0
            if split == "training":
                pixels += present
    ratio = pixels[1:] / max(int(pixels.sum()), 1)
    lines = ["Idx\tRatio\tTrain\tVal\tName"] + [
        f"{k + 1}\t{ratio[k]:.4f}\t{images_with['training'][k]}\t{images_with['validation'][k]}\t{name}"
        for k, name in enumerate(CLASSES)]
    (root / "objectInfo150.txt").write_text("\n".join(lines) + "\n")
    (root / "README.txt").write_text(
        "Synthetic demo data in the ADEChallengeData2016 layout (finetune.ade20k.demo_data).\n"
        f"seed={seed}, {train_images} training / {val_images} validation images, "
        f"sizes {min_size}..{max_size} (height, width).\n"
        "Annotations: 0 = other (ignored after reduce_zero_label), 1..6 = "
        + ", ".join(CLASSES) + ".\n")
    return {"root": str(root), "classes": CLASSES, "train": train_images, "val": val_images}
