"""ADE20K predictions drawn over an image (``python -m finetune predict``): class colours blended over it."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from ..dense import normalized, palette
from .config import Ade20kRunConfig

__all__ = ["draw_segmentation"]


@torch.no_grad()
def draw_segmentation(config: Ade20kRunConfig, model: nn.Module, image: Image.Image, *, alpha: float = 0.5,
                      **_: object) -> Image.Image:
    """Segment ``image`` as the run evaluates (its eval scales, mode and flip) and blend the class colours over it."""
    from .data import eval_resize_shape
    from .task import segmentation_logits

    seg = config.ade20k
    views = []
    for ratio in seg.eval_ratios:
        height, width = eval_resize_shape(image.height, image.width, seg.eval_scale, ratio)
        views.append(normalized(np.asarray(image.resize((width, height), Image.BILINEAR)))[None])
    probs = segmentation_logits(model, views, (image.height, image.width), num_classes=seg.num_classes,
                                mode=seg.eval_mode, crop=seg.crop_size, stride=seg.eval_stride, flip=seg.eval_flip)
    labels = probs.argmax(dim=1)[0].numpy()
    blended = (1 - alpha) * np.asarray(image, np.float32) + alpha * palette(seg.num_classes)[labels].astype(np.float32)
    return Image.fromarray(blended.round().astype(np.uint8))
