"""The audio task's run config: the core :class:`~pretrain.config.Config` with the ``audio`` section."""
from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.config import Config, ConfigError, in_range, positive

__all__ = ["AudioConfig", "AudioRunConfig"]


@dataclass(kw_only=True, slots=True)
class AudioConfig:
    """``task=audio``: keyword recognition on the Speech Commands v0.02 layout with the authors' (AST's) features
    and augmentation."""

    data_root: str = ""
    """The dataset folder or fsspec URL: word folders of WAVs, ``validation_list.txt``, ``testing_list.txt``; or the
    shards ``python -m shards write speechcommands`` made of one (``training/``, ``validation/``, ``testing/``)."""
    generate_demo: bool = False
    """Write the spoken-word demo set (``python -m finetune make-demo-data audio``) into ``data_root`` first."""
    num_classes: int = 35
    """Word folders expected under ``data_root`` (classes in sorted folder order); must equal ``model.num_classes``."""
    num_mel_bins: int = 128
    """Kaldi fbank filters (the model's input height)."""
    target_length: int = 128
    """Frames per clip after padding with zero rows or cutting (the model's input width; 1 s gives 98)."""
    norm_mean: float = -6.845978
    """Normalization ``(fbank - norm_mean) / (2 norm_std)``: AST's Speech Commands statistics."""
    norm_std: float = 5.5654526
    """See ``norm_mean``."""
    mixup: float = 0.6
    """Probability that a training clip is mixed (on the waveform) with another random training clip."""
    mixup_alpha: float = 10.0
    """Mixing weight ~ Beta(alpha, alpha)."""
    freq_mask: int = 48
    """SpecAugment: one frequency mask of width U[0, freq_mask) (0: off)."""
    time_mask: int = 48
    """SpecAugment: one time mask of width U[0, time_mask) (0: off)."""
    noise: bool = True
    """Add U[0,1) x U[0,1)/10 per element and roll the frames by U{-roll, ..., roll-1} (AST's ``noise``)."""
    roll: int = 10
    """Largest time roll in frames with ``noise``."""
    features_on: str = "loader"
    """Where training clips become log-mel maps: ``loader`` (each worker computes fbank, masks, noise and roll per
    clip) or ``device`` (workers read, resample and mix; the batch's fbank, masks, noise and roll run on the
    training device in one pass: about 3x the clips per worker CPU-second). The same draws either way; the
    presets use ``device``. Evaluation clips are always featurized in the loader."""

    def validate(self) -> None:
        if not self.data_root:
            raise ConfigError("data_root", "expected the Speech Commands folder (or URL), or a folder for the "
                              "generated demo set with audio.generate_demo=true")
        positive("num_classes", self.num_classes)
        if self.num_classes < 2:
            raise ConfigError("num_classes", f"expected at least 2 word folders, got {self.num_classes}")
        positive("num_mel_bins", self.num_mel_bins)
        if self.num_mel_bins > 256:
            raise ConfigError("num_mel_bins", f"expected at most 256 (one per FFT bin of a 512-point frame), got "
                              f"{self.num_mel_bins}")
        if self.target_length < 32:
            raise ConfigError("target_length", f"expected >= 32 frames (the network's stride), got {self.target_length}")
        if self.norm_std <= 0:
            raise ConfigError("norm_std", f"expected > 0, got {self.norm_std}")
        in_range("mixup", self.mixup, 0.0, 1.0)
        if self.mixup_alpha <= 0:
            raise ConfigError("mixup_alpha", f"expected > 0, got {self.mixup_alpha}")
        in_range("freq_mask", self.freq_mask, 0, self.num_mel_bins, upper_open=True)
        in_range("time_mask", self.time_mask, 0, self.target_length, upper_open=True)
        if self.features_on not in ("loader", "device"):
            raise ConfigError("features_on", f"expected loader or device, got {self.features_on!r}")
        if not 0 <= self.roll < self.target_length:
            raise ConfigError("roll", f"expected 0 <= roll < audio.target_length ({self.target_length}), got {self.roll}")


@dataclass(kw_only=True, slots=True)
class AudioRunConfig(Config):
    """A keyword-recognition run: UniRepLKNet on 1 x mel x frames log-mel maps."""

    task: str = "audio"
    audio: AudioConfig = field(default_factory=AudioConfig)

    def validate(self) -> None:
        Config.validate(self)
        if self.model.in_chans != 1:
            raise ConfigError("model.in_chans", f"expected 1 (a log-mel map has one channel), got {self.model.in_chans}")
        if self.model.num_classes != self.audio.num_classes:
            raise ConfigError("model.num_classes", f"expected audio.num_classes ({self.audio.num_classes}): one "
                              f"output per word folder, got {self.model.num_classes}")
