"""Image classification presets: the authors' ImageNet-22K pretraining and 22K -> 1K fine-tune recipes, and
the CPU demo. Each is a function returning a fresh :class:`ClassificationConfig`."""
from __future__ import annotations

from typing import Callable

from ..config import CheckpointConfig, LoaderConfig, ModelConfig, OptimConfig, TrainConfig
from .config import ClassificationConfig, DataConfig

__all__ = ["PRESETS", "demo", "in1k_finetune_384", "in22k_pretrain"]


def demo() -> ClassificationConfig:
    """A tiny UniRepLKNet on generated 32x32 digit shards, CPU, a few minutes; learns well above chance."""
    return ClassificationConfig(
        run_dir="runs/demo",
        model=ModelConfig(
            name="unireplknet_a", num_classes=10, depths=(1, 1, 2, 1), dims=(16, 32, 64, 128),
            kernel_sizes=((3,), (13,), (13, 3), (13,)), drop_path_rate=0.0),
        data=DataConfig(
            source="demo", demo_dir="data/demo", demo_train_samples=4096, demo_val_samples=1000, img_size=32,
            auto_augment="", random_erasing=0.0, crop_scale_min=0.8, hflip=0.0, color_jitter=0.0,
            mixup_alpha=0.0, cutmix_alpha=0.0),
        optim=OptimConfig(lr=4e-3, min_lr=1e-5, warmup_epochs=0.5, weight_decay=0.05, clip_grad=5.0),
        train=TrainConfig(epochs=5, global_batch_size=64, micro_batch_size=64, zero_stage=1,
                          label_smoothing=0.0, log_every=25, eval_every=128),
        checkpoint=CheckpointConfig(every=128, keep=2),
        loader=LoaderConfig(num_workers=1),
    )


# Per variant: (input size of the authors' 22K pretraining, drop path in 22K pretraining).
_IN22K_VARIANTS = {"s": (224, 0.1), "b": (224, 0.1), "l": (192, 0.1), "xl": (192, 0.2)}


def in22k_pretrain(variant: str, img_size: int | None = None) -> ClassificationConfig:
    """The authors' ImageNet-22K pretraining recipe (paper Table 16, README), optionally at another size.

    90 epochs (5 warmup), AdamW, cosine, weight decay 0.05, global batch 4096, mixup 0.8, cutmix
    1.0, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, label smoothing 0.1. lr 4e-3 for
    S/B (paper), 1e-3 for L/XL (README). XL: 32 images per GPU; accumulation follows from the
    world size (4 nodes x 8 GPUs -> 4 steps).
    """
    default_size, drop_path = _IN22K_VARIANTS[variant]
    img_size = img_size or default_size
    return ClassificationConfig(
        run_dir=f"runs/{variant}_in22k_{img_size}",
        model=ModelConfig(name=f"unireplknet_{variant}", num_classes=21841, drop_path_rate=drop_path,
                          grad_checkpointing=variant in ("l", "xl") and img_size > 224,
                          channels_last=True),
        data=DataConfig(train_urls="data/imagenet22k/train", val_urls="data/imagenet22k/val",
                        img_size=img_size),
        optim=OptimConfig(lr=1e-3 if variant in ("l", "xl") else 4e-3, min_lr=1e-6, warmup_epochs=5,
                          weight_decay=0.05),
        train=TrainConfig(epochs=90, global_batch_size=4096, micro_batch_size=32 if variant == "xl" else 64,
                          zero_stage=2 if variant in ("l", "xl") else 1, label_smoothing=0.1,
                          eval_every=5000),
        checkpoint=CheckpointConfig(every=1000, keep=3),
    )


def in1k_finetune_384(variant: str) -> ClassificationConfig:
    """22K -> 1K fine-tune at 384: batch 512, AdamW lr 5e-5, cosine without warmup, weight decay 1e-8,
    no mixup/cutmix, head init 0.001, layer decay 0.8; 20 epochs, drop path 0.3, label smoothing 0.3
    and EMA (the spec's L/XL recipe; S and B reuse it, drop path 0.2 for them).

    Starts from ``model.init_from`` (the 22K checkpoint in the official key layout or an export).
    """
    return ClassificationConfig(
        run_dir=f"runs/{variant}_in1k_ft_384",
        model=ModelConfig(name=f"unireplknet_{variant}", num_classes=1000,
                          drop_path_rate=0.3 if variant in ("l", "xl") else 0.2, head_init_scale=0.001,
                          init_from=f"unireplknet_{variant}_in22k_pretrain.pth",
                          grad_checkpointing=variant in ("l", "xl"), channels_last=True),
        data=DataConfig(train_urls="data/imagenet1k/train", val_urls="data/imagenet1k/val", img_size=384,
                        mixup_alpha=0.0, cutmix_alpha=0.0),
        optim=OptimConfig(lr=5e-5, min_lr=1e-6, warmup_epochs=0, weight_decay=1e-8, layer_decay=0.8),
        train=TrainConfig(epochs=20, global_batch_size=512, micro_batch_size=16,
                          zero_stage=2 if variant in ("l", "xl") else 1, label_smoothing=0.3,
                          ema_decay=0.9999, eval_every=1000),
        checkpoint=CheckpointConfig(every=500, keep=3),
    )


def _preset(make: Callable[[], ClassificationConfig], summary: str) -> Callable[[], ClassificationConfig]:
    make.__doc__ = summary
    return make


def _preset_table() -> dict[str, Callable[[], ClassificationConfig]]:
    table: dict[str, Callable[[], ClassificationConfig]] = {"demo": demo}
    for variant, (size, _) in _IN22K_VARIANTS.items():
        name = variant.upper()
        table[f"{variant}_in22k_{size}"] = _preset(
            lambda v=variant: in22k_pretrain(v), f"{name} ImageNet-22K pretraining at {size}, the authors' recipe.")
        if size != 384:
            table[f"{variant}_in22k_384"] = _preset(
                lambda v=variant: in22k_pretrain(v, 384), f"{name} ImageNet-22K pretraining at 384 (the recipe at 384x384).")
        table[f"{variant}_in1k_ft_384"] = _preset(
            lambda v=variant: in1k_finetune_384(v),
            f"{name} 22K -> 1K fine-tune at 384: layer decay 0.8, EMA, label smoothing 0.3, head init 0.001.")
    return table


PRESETS: dict[str, Callable[[], ClassificationConfig]] = _preset_table()
"""Preset name -> function returning a fresh config (``demo``, ``xl_in22k_192``, ``xl_in22k_384``, ...)."""
