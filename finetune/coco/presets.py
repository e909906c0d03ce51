"""COCO presets: the authors' Cascade Mask R-CNN 3x recipes (T/S/B/L/XL) and the CPU demo. Each is a function returning a fresh :class:`CocoRunConfig`."""
from __future__ import annotations

from typing import Callable

from pretrain.config import CheckpointConfig, LoaderConfig, ModelConfig, OptimConfig, TrainConfig

from .config import CocoConfig, CocoRunConfig

__all__ = ["PRESETS", "coco_demo", "coco_cascade_3x"]


def coco_demo() -> CocoRunConfig:
    """Cascade Mask R-CNN on a tiny backbone over the generated COCO-layout demo set (``finetune make-demo-data
    coco``), CPU, minutes: the recipe's structure scaled to 96-192 px images (anchors 8-128 px, narrow heads)."""
    return CocoRunConfig(
        run_dir="runs/coco_demo",
        model=ModelConfig(name="unireplknet_a", depths=(1, 1, 2, 1), dims=(16, 32, 64, 128),
                          kernel_sizes=((3,), (13,), (13, 3), (13,)), drop_path_rate=0.0),
        loader=LoaderConfig(num_workers=1),
        coco=CocoConfig(data_root="data/coco_demo", generate_demo=True, num_classes=4,
                        train_scales=(112, 128, 144, 160), max_size=256, crop_resize_scales=(100, 125, 150),
                        crop_size_range=(80, 150), eval_scale=(256, 144), fpn_channels=64, anchor_scale=2.0,
                        rpn_batch=128, rpn_proposals_train=300, rpn_proposals_test=300, roi_batch=128,
                        box_channels=64, box_fc=256, mask_channels=64, layer_decay_layers=6),
        optim=OptimConfig(lr=2e-3, min_lr=0.0, weight_decay=0.05, schedule="multistep", milestones=(27.0, 33.0),
                          warmup_steps=20, warmup_ratio=0.001, layer_decay=0.9),
        train=TrainConfig(epochs=36, steps=200, global_batch_size=4, micro_batch_size=4, zero_stage=1,
                          log_every=20, eval_every=100),
        checkpoint=CheckpointConfig(every=100, keep=2),
    )


# Per variant: (drop path, layer-decay rate) of the authors' Cascade Mask R-CNN 3x configs (num_layers 12).
_COCO_VARIANTS = {"t": (0.3, 0.8), "s": (0.5, 0.8), "b": (0.6, 0.8), "l": (0.7, 0.7), "xl": (0.7, 0.7)}


def coco_cascade_3x(variant: str) -> CocoRunConfig:
    """The authors' Cascade Mask R-CNN 3x recipe: AdamW lr 1e-4, weight decay 0.05, layer-wise decay over 12
    layers, 16 images per step (2 per GPU x 8), 36 epochs with x0.1 at 27 and 33, 500 warmup iterations from
    0.001, EMA, activation checkpointing, DETR-style multi-scale training, test at (1333, 800)."""
    drop_path, decay = _COCO_VARIANTS[variant]
    return CocoRunConfig(
        run_dir=f"runs/coco_{variant}_cascade_3x",
        model=ModelConfig(name=f"unireplknet_{variant}", drop_path_rate=drop_path,
                          init_from=f"unireplknet_{variant}_{'in1k' if variant == 't' else 'in22k'}_pretrain.pth",
                          grad_checkpointing=True, sync_batchnorm="auto"),
        loader=LoaderConfig(num_workers=4),
        coco=CocoConfig(data_root="data/coco", layer_decay_layers=12),
        optim=OptimConfig(lr=1e-4, min_lr=0.0, weight_decay=0.05, schedule="multistep", milestones=(27.0, 33.0),
                          gamma=0.1, warmup_steps=500, warmup_ratio=0.001, layer_decay=decay),
        train=TrainConfig(epochs=36, global_batch_size=16, micro_batch_size=2, zero_stage=1 if variant != "xl" else 2,
                          ema_decay=0.9999, log_every=50, eval_every=7330),
        checkpoint=CheckpointConfig(every=2000, keep=3),
    )


_COCO_NOTES = {
    "t": "(the authors' T config, 1K-pretrained, drop path 0.3, decay 0.8).",
    "s": "(the authors' S 22K config; their S 1K config is the same but for the checkpoint).",
    "b": "(the authors' B 22K config, drop path 0.6).",
    "l": "(the authors' L 22K config, drop path 0.7, decay 0.7).",
    "xl": "(the authors' XL 22K config, drop path 0.7, decay 0.7; ZeRO-2 and activation checkpointing so it "
          "fits an 80 GB GPU at 2 images; paper: 56.4 box AP / 49.0 mask AP).",
}


def _preset(make, summary: str):
    make.__doc__ = summary
    return make


def _preset_table() -> dict[str, Callable[[], CocoRunConfig]]:
    table: dict[str, Callable[[], CocoRunConfig]] = {"coco_demo": coco_demo}
    for variant in _COCO_VARIANTS:
        table[f"coco_{variant}_cascade_3x"] = _preset(
            lambda v=variant: coco_cascade_3x(v),
            f"{variant.upper()} Cascade Mask R-CNN 3x on COCO {_COCO_NOTES[variant]}")
    return table


PRESETS: dict[str, Callable[[], CocoRunConfig]] = _preset_table()
"""Preset name -> function returning a fresh config (``coco_demo``, ``coco_xl_cascade_3x``, ...)."""
