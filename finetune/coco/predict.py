"""COCO detections drawn over an image (``python -m finetune predict``): masks blended, boxes and classes drawn."""
from __future__ import annotations

import functools
import logging

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from ..dense import normalized, palette
from .config import CocoRunConfig

__all__ = ["draw_detections"]

_logger = logging.getLogger(__name__)


@torch.no_grad()
def draw_detections(config: CocoRunConfig, model: nn.Module, image: Image.Image, *, alpha: float = 0.5,
                    min_score: float = 0.3, **_: object) -> Image.Image:
    """Detect in ``image`` at the run's test scale; draw masks and boxes scoring at least ``min_score``."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    from .data import pad_batch, rescale_shape

    section = config.coco
    names = _class_names(config.coco.data_root, config.coco.num_classes)
    colours = palette(section.num_classes)
    height, width = rescale_shape(image.height, image.width, max(section.eval_scale), min(section.eval_scale))
    pixels = np.asarray(image.resize((width, height), Image.BILINEAR))
    meta = {"image_size": (height, width), "orig_size": (image.height, image.width),
            "scale": (height / image.height, width / image.width)}
    (detection,) = model(pad_batch([normalized(pixels)], section.size_divisor), [meta])
    keep = detection["scores"] >= min_score
    labels = [int(label) for label in detection["labels"][keep]]
    colour = [tuple(int(c) for c in colours[label]) for label in labels]
    canvas = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    if labels:
        canvas = draw_segmentation_masks(canvas, detection["masks"][keep] >= 0.5, alpha=alpha, colors=colour)
        captions = [f"{names[label]} {score:.2f}" for label, score in zip(labels, detection["scores"][keep].tolist())]
        canvas = draw_bounding_boxes(canvas, detection["boxes"][keep], labels=captions, colors=colour, width=2)
    return Image.fromarray(canvas.permute(1, 2, 0).numpy())


@functools.lru_cache(maxsize=4)
def _class_names(data_root: str, num_classes: int) -> list[str]:
    """The categories' names in contiguous order, from the val annotation file (numbers when unreadable)."""
    from .data import load_split

    try:
        return list(load_split(data_root, "val2017").category_names)
    except (OSError, ValueError, KeyError) as error:
        _logger.warning("class names unavailable (%s): drawing class numbers", error)
        return [str(i) for i in range(num_classes)]
