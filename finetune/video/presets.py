"""Video presets: the authors' Kinetics-400 recipe (UniRepLKNet-B from scratch) and the CPU demo. Each is a function
returning a fresh :class:`VideoRunConfig`."""
from __future__ import annotations

from typing import Callable

from pretrain.config import CheckpointConfig, LoaderConfig, ModelConfig, OptimConfig, TrainConfig

from .config import VideoConfig, VideoRunConfig

__all__ = ["B_VIDEO_KERNELS", "PRESETS", "video_b_kinetics400", "video_demo"]

B_VIDEO_KERNELS: tuple[tuple[int, ...], ...] = ((3, 3, 3), (13, 13, 13), (13, 3, 3) * 9, (11, 11, 11))
"""UniRepLKNet-B's kernels for video (the spec's table: as for time series, stage 4 at 11 instead of 13)."""

KINETICS_TRAIN_VIDEOS = 240_436
"""Videos of the authors' train.csv (the spec), for the step arithmetic below."""


def video_b_kinetics400() -> VideoRunConfig:
    """UniRepLKNet-B on Kinetics-400 from scratch, the authors' recipe (``Video/run_unireplknet.sh``).

    16 frames at stride 4, 224 crops laid out by the memory reshape as one 896 x 896 map; drop path 0.4;
    RandAugment rand-m7-n4-mstd0.5-inc1, random resized crop, flip, erasing 0.25, every video twice per epoch,
    mixup 0.8 / cutmix 1.0 with label smoothing 0.1. AdamW (0.9, 0.999), weight decay 0.05, 64 videos per
    step (4 per GPU x accumulation 2 x 8 GPUs; 128 clips with the repeats), lr 4e-3 x 64 / 256 = 1e-3, cosine
    to 1e-6 x 64 / 256 after 5 warmup epochs, 90 epochs, layer decay 0.75 over the authors' 12 groups.
    Evaluated with the test protocol (5 segments x 3 crops).
    """
    videos_per_step = 64
    steps_per_epoch = KINETICS_TRAIN_VIDEOS // videos_per_step
    return VideoRunConfig(
        run_dir="runs/video_b_kinetics400",
        model=ModelConfig(name="unireplknet_b", num_classes=400, drop_path_rate=0.4, kernel_sizes=B_VIDEO_KERNELS,
                          channels_last=False),
        video=VideoConfig(data_root="data/kinetics400", num_classes=400, num_frames=16, sampling_rate=4,
                          input_size=224, layout="reshape", auto_augment="rand-m7-n4-mstd0.5-inc1",
                          crop_scale=(0.08, 1.0), crop_ratio=(0.75, 4 / 3), hflip=0.5, random_erasing=0.25,
                          repeated_aug=2, mixup_alpha=0.8, cutmix_alpha=1.0, mixup_switch_prob=0.5,
                          eval_views="test", test_segments=5, test_crops=3, layer_decay_layers=12),
        optim=OptimConfig(lr=4e-3 * videos_per_step / 256, min_lr=1e-6 * videos_per_step / 256, warmup_epochs=5,
                          weight_decay=0.05, betas=(0.9, 0.999), layer_decay=0.75, schedule="cosine"),
        train=TrainConfig(epochs=90, global_batch_size=2 * videos_per_step, micro_batch_size=8, zero_stage=1,
                          label_smoothing=0.1, log_every=50, eval_every=10 * steps_per_epoch),
        checkpoint=CheckpointConfig(every=1000, keep=3),
        loader=LoaderConfig(num_workers=10),
    )


def video_demo() -> VideoRunConfig:
    """A tiny UniRepLKNet on the generated camera-motion clips (6 classes), CPU, a few minutes: 4 frames at
    stride 4 of 32 x 32, laid out by the memory reshape as 64 x 64 maps."""
    return VideoRunConfig(
        run_dir="runs/video_demo",
        model=ModelConfig(name="unireplknet_a", num_classes=6, depths=(1, 1, 2, 1), dims=(16, 32, 64, 128),
                          kernel_sizes=((3,), (13,), (13, 3), (11,)), drop_path_rate=0.0),
        video=VideoConfig(data_root="data/video_demo", generate_demo=True, num_classes=6, num_frames=4,
                          sampling_rate=4, input_size=32, layout="reshape", auto_augment="", crop_scale=(0.5, 1.0),
                          hflip=0.0, random_erasing=0.0, repeated_aug=2, mixup_alpha=0.0, cutmix_alpha=0.0,
                          eval_views="single", layer_decay_layers=12),
        optim=OptimConfig(lr=4e-3, min_lr=1e-5, warmup_steps=20, weight_decay=0.05, layer_decay=1.0, clip_grad=5.0),
        train=TrainConfig(steps=300, global_batch_size=16, micro_batch_size=16, zero_stage=1, label_smoothing=0.0,
                          log_every=20, eval_every=150),
        checkpoint=CheckpointConfig(every=150, keep=2),
        loader=LoaderConfig(num_workers=1),
    )


PRESETS: dict[str, Callable[[], VideoRunConfig]] = {
    "video_b_kinetics400": video_b_kinetics400,
    "video_demo": video_demo,
}
"""Preset name -> function returning a fresh config."""
