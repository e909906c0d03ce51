"""Keyword recognition on Speech Commands v0.02: UniRepLKNet on log-mel maps with the authors' (AST's) features,
augmentation and recipe; spoken-word demo data from espeak-ng.

Registered as task ``audio`` (``pyproject.toml`` entry point ``unireplknet.tasks``).
"""
from __future__ import annotations

from pretrain.registry import TaskSpec, register_task

from .config import AudioConfig, AudioRunConfig
from .presets import PRESETS


def _build(config: AudioRunConfig):
    from .task import AudioClassification

    return AudioClassification(config)


def _preflight(config: AudioRunConfig) -> None:
    from .task import preflight

    preflight(config)


def _write_demo_data(out: str, **options) -> None:
    from .demo_data import write_demo

    write_demo(out, **options)


TASK = register_task(TaskSpec(
    name="audio",
    summary="keyword recognition on Speech Commands v0.02 (log-mel maps, the authors' AST-style recipe)",
    config_class=AudioRunConfig,
    build=_build,
    presets=PRESETS,
    demo_preset="audio_demo",
    cluster_preset="audio_s_speechcommands",
    path_keys=("audio.data_root",),
    metrics=("eval/top1", "test/top1"),
    data_key="audio.data_root",
    environment={"UNIREPLKNET_AUDIO_ROOT": "audio.data_root"},
    real_data_overrides=("audio.generate_demo=false",),
    pretrained_backbone=False,  # the authors train from scratch on one-channel log-mel maps
    write_demo_data=_write_demo_data,
    preflight=_preflight,
    resume_may_change=("audio.features_on",),  # where the same features are computed
    smoke_overrides=("audio.num_mel_bins=32", "audio.target_length=48", "audio.freq_mask=12", "audio.time_mask=18",
                     "train.global_batch_size=8", "train.micro_batch_size=8"),
))

__all__ = ["AudioConfig", "AudioRunConfig", "TASK"]
