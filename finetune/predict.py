"""``python -m finetune predict RUN_DIR IMAGE... --out DIR``: a fine-tuned run's predictions drawn over images."""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from PIL import Image

__all__ = ["load_run_model", "palette", "predict_images"]

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
        raise ValueError(f"{run_dir} is a classification run; predict draws segmentation runs (task=ade20k)")
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


@torch.no_grad()
def predict_images(run_dir: str, images: list[str], out_dir: str, *, checkpoint: str = "latest", ema: bool = False,
                   alpha: float = 0.5) -> list[str]:
    """Segment each image as the run evaluates (its eval scales, flip and mode) and write
    ``OUT/<name>.png``: the class colours blended over the image; returns the written paths."""
    from .ade20k.data import _normalized, eval_resize_shape
    from .ade20k.task import segmentation_logits

    config, model = load_run_model(run_dir, checkpoint, ema)
    seg = config.ade20k
    colours = palette(seg.num_classes)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for path in images:
        image = Image.open(path).convert("RGB")
        views = []
        for ratio in seg.eval_ratios:
            height, width = eval_resize_shape(image.height, image.width, seg.eval_scale, ratio)
            views.append(_normalized(np.asarray(image.resize((width, height), Image.BILINEAR)))[None])
        probs = segmentation_logits(model, views, (image.height, image.width), num_classes=seg.num_classes,
                                    mode=seg.eval_mode, crop=seg.crop_size, stride=seg.eval_stride, flip=seg.eval_flip)
        labels = probs.argmax(dim=1)[0].numpy()
        blended = (1 - alpha) * np.asarray(image, np.float32) + alpha * colours[labels].astype(np.float32)
        out = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
        Image.fromarray(blended.round().astype(np.uint8)).save(out)
        written.append(out)
    return written
