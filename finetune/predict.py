"""``python -m finetune predict RUN_DIR IMAGE... --out DIR``: a fine-tuned run's predictions drawn over images;
an image that cannot be read is named and skipped, the others are drawn."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

__all__ = ["Predictions", "load_run_model", "palette", "predict_images"]

_logger = logging.getLogger(__name__)


def palette(num_classes: int) -> np.ndarray:
    """A fixed colour per class (uint8, (num_classes, 3)); neighbouring indices get distant hues."""
    rng = np.random.default_rng(20240101)
    return rng.integers(32, 256, size=(num_classes, 3), dtype=np.uint8)


def load_run_model(run_dir: str, checkpoint: str = "latest", ema: bool = False):
    """(config, model in eval mode) of a fine-tuning run's checkpoint (any ZeRO stage, any world size)."""
    from pretrain import checkpoint as ckpt
    from pretrain.config import config_from_dict, validate
    from pretrain.ema import consolidate_ema
    from pretrain.task import build_task

    folder = ckpt.find_checkpoint(os.path.join(run_dir, "checkpoints"), checkpoint)
    if folder is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint under {os.path.join(run_dir, 'checkpoints')}")
    saved = ckpt.read_saved_config(folder)
    if saved is None:
        raise ckpt.CheckpointError(f"{folder} holds no {ckpt.CONFIG_NAME}: cannot tell which model it is")
    config = validate(config_from_dict(saved))
    if config.task == "classification":
        raise ValueError(f"{run_dir} is a classification run; predict draws fine-tuned runs (task=ade20k|coco)")
    config.model.init_from = ""
    state = ckpt.consolidated_state_dict(folder)
    if ema:
        ranks = ckpt.read_rank_states(folder)
        if ranks[0].get("ema") is None:
            raise ValueError(f"{folder} has no EMA weights")
        state.update(consolidate_ema([r["ema"] for r in ranks]))
    model = build_task(config).build_model()
    model.load_state_dict(state, strict=True)
    _logger.info("loaded %s", folder)
    return config, model.eval()


@dataclass
class Predictions:
    """What :func:`predict_images` did: the PNGs ``written`` (in the order of the images) and the images that
    ``failed`` (path -> why: not an image, damaged, missing)."""

    written: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


@torch.no_grad()
def predict_images(run_dir: str, images: list[str], out_dir: str, *, checkpoint: str = "latest", ema: bool = False,
                   alpha: float = 0.5, min_score: float = 0.3) -> Predictions:
    """Predict each image as the run evaluates and write ``OUT/<name>.png``: for segmentation the class colours
    blended over the image, for detection the masks blended and the boxes drawn (score >= ``min_score``,
    labelled with the class and score). An image that cannot be read is named in ``failed`` and the others
    are still drawn."""
    from shards.samples import DECODE_ERRORS

    config, model = load_run_model(run_dir, checkpoint, ema)
    if config.task == "coco":
        draw = _detections(config, model, min_score, alpha)
    else:
        draw = _segmentation(config, model, alpha)
    os.makedirs(out_dir, exist_ok=True)
    result = Predictions()
    for path in images:
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")  # decodes the whole file: a damaged one fails here
        except DECODE_ERRORS as error:
            result.failed[path] = f"{type(error).__name__}: {error}"
            continue
        out = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
        Image.fromarray(draw(image)).save(out)
        result.written.append(out)
    return result


def _segmentation(config, model, alpha: float):
    """``draw(image) -> (H, W, 3) uint8``: the predicted classes' colours blended over the image."""
    from .ade20k.data import _normalized, eval_resize_shape
    from .ade20k.task import segmentation_logits

    seg = config.ade20k
    colours = palette(seg.num_classes)

    def draw(image: Image.Image) -> np.ndarray:
        views = []
        for ratio in seg.eval_ratios:
            height, width = eval_resize_shape(image.height, image.width, seg.eval_scale, ratio)
            views.append(_normalized(np.asarray(image.resize((width, height), Image.BILINEAR)))[None])
        probs = segmentation_logits(model, views, (image.height, image.width), num_classes=seg.num_classes,
                                    mode=seg.eval_mode, crop=seg.crop_size, stride=seg.eval_stride, flip=seg.eval_flip)
        labels = probs.argmax(dim=1)[0].numpy()
        blended = (1 - alpha) * np.asarray(image, np.float32) + alpha * colours[labels].astype(np.float32)
        return blended.round().astype(np.uint8)

    return draw


def _detections(config, model, min_score: float, alpha: float):
    """``draw(image) -> (H, W, 3) uint8``: the detections' masks blended and boxes drawn with class and score."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    from .coco.data import _normalized, pad_batch, rescale_shape

    section = config.coco
    names = _class_names(config)
    colours = palette(section.num_classes)

    def draw(image: Image.Image) -> np.ndarray:
        height, width = rescale_shape(image.height, image.width, max(section.eval_scale), min(section.eval_scale))
        pixels = np.asarray(image.resize((width, height), Image.BILINEAR))
        meta = {"image_size": (height, width), "orig_size": (image.height, image.width),
                "scale": (height / image.height, width / image.width)}
        (detection,) = model(pad_batch([_normalized(pixels)], section.size_divisor), [meta])
        keep = detection["scores"] >= min_score
        labels = [int(label) for label in detection["labels"][keep]]
        colour = [tuple(int(c) for c in colours[label]) for label in labels]
        canvas = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        if labels:
            canvas = draw_segmentation_masks(canvas, detection["masks"][keep] >= 0.5, alpha=alpha, colors=colour)
            captions = [f"{names[label]} {score:.2f}" for label, score in zip(labels, detection["scores"][keep].tolist())]
            canvas = draw_bounding_boxes(canvas, detection["boxes"][keep], labels=captions, colors=colour, width=2)
        return canvas.permute(1, 2, 0).numpy()

    return draw


def _class_names(config) -> list[str]:
    """The categories' names in contiguous order, from the run's val annotation file (numbers when unreadable)."""
    from .coco.data import load_split

    try:
        return list(load_split(config.coco.data_root, "val2017").category_names)
    except (OSError, ValueError, KeyError) as error:
        _logger.warning("class names unavailable (%s): drawing class numbers", error)
        return [str(i) for i in range(config.coco.num_classes)]
