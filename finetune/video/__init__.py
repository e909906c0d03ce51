"""Video classification: UniRepLKNet on clips laid out as one map (the authors' memory reshape), Kinetics-400's list
layout, VideoMAE v2's sampling and augmentation, top-1/top-5 with the authors' multi-view test, demo clips.

Registered as task ``video`` (``pyproject.toml`` entry point ``unireplknet.tasks``).
"""
from __future__ import annotations

from pretrain.registry import TaskSpec, register_task

from .config import VideoConfig, VideoRunConfig
from .presets import PRESETS


def _build(config: VideoRunConfig):
    from .task import VideoClassification

    return VideoClassification(config)


def _preflight(config: VideoRunConfig) -> None:
    from .task import preflight

    preflight(config)


def _write_demo_data(out: str, seed: int = 0, train_images: int | None = None, val_images: int | None = None) -> None:
    from .demo_data import write_demo

    sizes = {k: v for k, v in (("train_videos", train_images), ("val_videos", val_images)) if v}
    write_demo(out, seed=seed, **sizes)


TASK = register_task(TaskSpec(
    name="video",
    summary="video classification (Kinetics-400 list layout): clips laid out as one map, multi-view top-1/top-5",
    config_class=VideoRunConfig,
    build=_build,
    presets=PRESETS,
    demo_preset="video_demo",
    cluster_preset="video_b_kinetics400",
    resume_may_change=("video.eval_", "video.test_"),
    path_keys=("video.data_root",),
    metrics=("eval/top1", "eval/top5"),
    data_key="video.data_root",
    pretrained_backbone=False,  # the authors train Kinetics-400 from scratch (no ImageNet weights)
    environment={"UNIREPLKNET_KINETICS_ROOT": "video.data_root"},
    real_data_overrides=("video.generate_demo=false",),
    write_demo_data=_write_demo_data,
    preflight=_preflight,
    smoke_overrides=("train.global_batch_size=8", "train.micro_batch_size=8"),
))

__all__ = ["TASK", "VideoConfig", "VideoRunConfig"]
