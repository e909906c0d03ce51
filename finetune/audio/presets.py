"""Audio presets: the authors' Speech Commands V2-35 recipe and the CPU demo. Each is a function returning a fresh
:class:`AudioRunConfig`."""
from __future__ import annotations

from typing import Callable

from pretrain.config import CheckpointConfig, LoaderConfig, ModelConfig, OptimConfig, TrainConfig

from .config import AudioConfig, AudioRunConfig

__all__ = ["PRESETS", "audio_demo", "audio_s_speechcommands"]

SPEECH_COMMANDS_TRAIN_CLIPS = 84_843
"""Training clips of Speech Commands v0.02 (every clip in neither list)."""


def audio_s_speechcommands() -> AudioRunConfig:
    """The authors' recipe (``Audio/egs/speechcommands/run_sc.sh``, AST's data pipeline): UniRepLKNet-S from
    scratch, ``in_chans=1``, drop path 0.4, 128 x 128 log-mel maps; mixup 0.6 Beta(10, 10), SpecAugment 48/48,
    noise and roll; BCE; Adam lr 2.5e-4, betas (0.95, 0.999), weight decay 5e-7; batch 128 (16 per GPU x 8);
    100 epochs, lr x 0.85 after every epoch from epoch 5 (multistep at epochs 5..99), no warmup, fp32;
    validation every epoch; the epoch with the best validation accuracy is scored on the test list
    (``train.best_metric``). The features of the training batches are computed on the GPU
    (``audio.features_on=device``; the authors compute them per clip in the loader, with the same draws).
    Difference: norms and biases get no weight decay (the trainer's rule; the authors decay every parameter, at
    5e-7 a negligible difference)."""
    steps_per_epoch = SPEECH_COMMANDS_TRAIN_CLIPS // 128
    return AudioRunConfig(
        run_dir="runs/audio_s_speechcommands",
        model=ModelConfig(name="unireplknet_s", num_classes=35, in_chans=1, drop_path_rate=0.4),
        loader=LoaderConfig(num_workers=8),
        audio=AudioConfig(data_root="data/speech_commands_v0.02", num_classes=35, features_on="device"),
        optim=OptimConfig(name="adam", lr=2.5e-4, min_lr=0.0, betas=(0.95, 0.999), weight_decay=5e-7,
                          warmup_epochs=0.0, schedule="multistep", milestones=tuple(float(e) for e in range(5, 100)), gamma=0.85),
        train=TrainConfig(epochs=100, global_batch_size=128, micro_batch_size=16, zero_stage=1, precision="fp32",
                          label_smoothing=0.0, log_every=50, eval_every=steps_per_epoch, best_metric="eval/top1"),
        checkpoint=CheckpointConfig(every=steps_per_epoch, keep=3),
    )


def audio_demo() -> AudioRunConfig:
    """A tiny UniRepLKNet on 64-bin x 96-frame maps of the generated spoken-word set (``finetune make-demo-data
    audio``, 10 words, split by voice); CPU, minutes. The authors' augmentation is lighter here (no mixup, masks
    below 12 bins and 18 frames, noise and roll kept): with 720 clips of 12 voices and 264 steps, mixup 0.6 and
    48/128-wide masks keep the tiny network near chance for most of the run (35% after 264 steps, 58% without).
    Features in the loader worker (``audio.features_on=loader``): on a CPU it runs beside the training process."""
    return AudioRunConfig(
        run_dir="runs/audio_demo",
        model=ModelConfig(name="unireplknet_a", num_classes=10, in_chans=1, depths=(1, 1, 2, 1), dims=(16, 32, 64, 128),
                          kernel_sizes=((3,), (13,), (13, 3), (13,)), drop_path_rate=0.0),
        loader=LoaderConfig(num_workers=1),
        audio=AudioConfig(data_root="data/audio_demo", generate_demo=True, num_classes=10, num_mel_bins=64,
                          target_length=96, mixup=0.0, freq_mask=12, time_mask=18),
        optim=OptimConfig(lr=4e-3, min_lr=1e-5, betas=(0.95, 0.999), weight_decay=0.0, warmup_epochs=1.0),
        train=TrainConfig(epochs=12, global_batch_size=32, micro_batch_size=32, zero_stage=1, label_smoothing=0.0,
                          log_every=11, eval_every=66),
        checkpoint=CheckpointConfig(every=66, keep=2),
    )


PRESETS: dict[str, Callable[[], AudioRunConfig]] = {"audio_demo": audio_demo,
                                                     "audio_s_speechcommands": audio_s_speechcommands}
"""Preset name -> function returning a fresh config."""
