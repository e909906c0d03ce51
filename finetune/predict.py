"""``python -m finetune predict RUN_DIR IMAGE... --out DIR``: a fine-tuned run's predictions drawn over images.

The run's task (from its saved config) draws each image (``TaskSpec.predict``); this module loads the run,
opens the images and writes the PNGs. An image that cannot be read is named and skipped; the others are drawn.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from PIL import Image

__all__ = ["Predictions", "load_run_model", "predict_images"]

_logger = logging.getLogger(__name__)


def load_run_model(run_dir: str, checkpoint: str = "latest", ema: bool = False):
    """(config, model in eval mode) of a run's checkpoint (any ZeRO stage, any world size)."""
    from pretrain import checkpoint as ckpt
    from pretrain.config import config_from_dict, validate
    from pretrain.task import build_task
    from pretrain.weights import checkpoint_weights

    folder = ckpt.find_checkpoint(os.path.join(run_dir, "checkpoints"), checkpoint)
    if folder is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint under {os.path.join(run_dir, 'checkpoints')}")
    saved = ckpt.read_saved_config(folder)
    if saved is None:
        raise ckpt.CheckpointError(f"{folder} holds no {ckpt.CONFIG_NAME}: cannot tell which model it is")
    config = validate(config_from_dict(saved))
    config.model.init_from = ""
    state = checkpoint_weights(folder, ema)
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
                   **options) -> Predictions:
    """Draw the run's predictions over each image into ``OUT/<name>.png`` (``options`` go to the task's
    drawing, e.g. ``alpha``, ``min_score``). Unreadable images are skipped and reported in the result."""
    from pretrain.registry import get_task
    from shards.samples import DECODE_ERRORS

    config, model = load_run_model(run_dir, checkpoint, ema)
    spec = get_task(config.task)
    if spec.predict is None:
        raise ValueError(f"{run_dir} is a {config.task} run; its task draws no predictions (predict covers "
                         f"{', '.join(n for n, s in _tasks().items() if s.predict) or 'no task'})")
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
        spec.predict(config, model, image, **options).save(out)
        result.written.append(out)
    return result


def _tasks():
    from pretrain.registry import registered_tasks

    return registered_tasks()
