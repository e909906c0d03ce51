"""Image classification, the pretraining task: ImageNet-22K pretraining, the 22K -> 1K fine-tune, the digit demo.

Registered as task ``classification`` (``pyproject.toml`` entry point ``unireplknet.tasks``).
"""
from __future__ import annotations

from ..registry import TaskSpec, register_task
from .config import ClassificationConfig, DataConfig
from .presets import PRESETS


def _build(config: ClassificationConfig):
    from .task import ImageClassification

    return ImageClassification(config)


def _preflight(config: ClassificationConfig) -> None:
    from .task import preflight

    preflight(config)


TASK = register_task(TaskSpec(
    name="classification",
    summary="image classification from WebDataset shards (ImageNet-22K pretraining, 22K -> 1K fine-tune)",
    config_class=ClassificationConfig,
    build=_build,
    presets=PRESETS,
    demo_preset="demo",
    cluster_preset="xl_in22k_384",
    resume_may_change=("data.val_urls", "data.img_size", "data.eval_", "data.auto_augment", "data.random_erasing",
                       "data.crop_scale_min", "data.hflip", "data.color_jitter", "data.mixup_alpha",
                       "data.cutmix_alpha", "data.demo_dir"),
    path_keys=("data.demo_dir", "data.train_urls", "data.val_urls"),
    metrics=("eval/top1", "eval/top5", "eval_ema/top1"),
    environment={"UNIREPLKNET_TRAIN_SHARDS": "data.train_urls", "UNIREPLKNET_VAL_SHARDS": "data.val_urls"},
    real_data_overrides=("data.source=shards",),
    downstream=False,
    preflight=_preflight,
    smoke_overrides=("data.demo_train_samples=256", "data.demo_val_samples=64", "train.global_batch_size=32",
                     "train.micro_batch_size=32"),
    legacy_keys={"ade20k": None, "coco": None, "optim.layer_decay_layers": None},
))

__all__ = ["ClassificationConfig", "DataConfig", "TASK"]
