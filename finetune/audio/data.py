"""Speech Commands data: the v0.02 folder layout (local or fsspec), clip reading, the authors' training and
evaluation samples, resumable loaders.

Layout::

    ROOT/<word>/<speaker>_nohash_<k>.wav    one folder per class; classes = the sorted word folders
    ROOT/_background_noise_/                  ignored (folders starting with "_" are not classes)
    ROOT/validation_list.txt                  relative paths (word/file.wav), one per line
    ROOT/testing_list.txt                     idem; training = every other clip

or the shards ``python -m shards write speechcommands ROOT OUT`` made of it (``OUT/{training,validation,
testing}/``, :mod:`finetune.audio.shards`): the same clips in the same order, each read with one ranged read
of its shard, so the batches are those of the folder.

A clip is read with soundfile (any format it knows, any sample rate and channel count), mixed down to mono,
resampled to 16 kHz (``scipy.signal.resample_poly``) and cut to 1 s; a shorter clip gives fewer frames, padded
with zero rows after the log as the authors do. Training sample ``(epoch, index)`` draws all of its randomness
(mixup partner and weight, masks, noise, roll) from its own generator seeded by (seed, epoch, index), so a
resumed run sees exactly the batches of an uninterrupted one with any number of loader workers. A damaged
file is skipped (replaced by the next clip in training), named in a warning and counted (``bad_samples``).

With ``audio.features_on=device`` the training workers stop after the mix: they return the (mixed, centred)
waveforms with the sample's draws (masks, noise, roll), a :class:`ClipBatch`, and the task computes fbank,
SpecAugment, normalization, noise and roll in one batched pass on the training device
(:meth:`ClipBatch.model_input`). The draws are the same, so the batches equal the loader's up to float
rounding (on CPU, bit for bit where the batched fbank is).
"""
from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from math import gcd
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pretrain.config import ConfigError
from shards.indexed import EvaluationShare, ShuffledBatches
from shards.info import INFO_NAME, ShardMember, read_info, read_member, read_members
from shards.seeding import sample_generator

from .features import (FRAME_LENGTH, FRAME_SHIFT, SAMPLE_RATE, apply_masks, apply_noise_and_roll, draw_masks,
                       draw_noise, fbank, noise_and_roll, normalize, pad_or_cut, spec_augment)

__all__ = ["SPLIT_LISTS", "AudioSample", "ClipBatch", "EvalLoader", "SplitFiles", "TrainLoader", "features_of",
           "list_classes", "list_split", "read_clip", "to_mono_16k"]

_logger = logging.getLogger(__name__)

SPLITS = ("training", "validation", "testing")
SPLIT_LISTS = {"validation": "validation_list.txt", "testing": "testing_list.txt"}
"""The list file of each held-out split; ``training`` is every clip in neither."""
SEED_PURPOSE = 0xA0D10
"""The audio task's part of every sample seed (:func:`shards.seeding.sample_generator`)."""


def _filesystem(root: str):
    import fsspec

    return fsspec.core.url_to_fs(root)


@dataclass(frozen=True)
class SplitFiles:
    """One split: the root URL, the class names (index = position) and the (relative path, class) clips, sorted;
    from shards, ``members`` locates each clip in them (else each is the file ``root/path``)."""

    root: str
    split: str
    classes: tuple[str, ...]
    clips: tuple[tuple[str, int], ...]
    members: tuple[ShardMember, ...] | None = None

    def __len__(self) -> int:
        return len(self.clips)


def list_classes(root: str, num_classes: int | None = None) -> tuple[str, ...]:
    """The sorted word folders of ``root`` (folders starting with ``_`` or ``.`` are not classes). With
    ``num_classes``, another count raises ``ConfigError`` on ``audio.num_classes`` naming the count found."""
    if _is_sharded(root):
        return _checked_classes(root, tuple(read_info(f"{root.rstrip('/')}/training/{INFO_NAME}")["classes"]),
                                num_classes)
    fs, base = _filesystem(root)
    if not fs.isdir(base):
        raise FileNotFoundError(f"{root}: no such folder; expected the Speech Commands layout (word folders of WAVs, "
                                "validation_list.txt, testing_list.txt)")
    classes = tuple(sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(base, detail=False) if fs.isdir(p)
                           and not os.path.basename(p.rstrip("/")).startswith(("_", "."))))
    if not classes:
        raise FileNotFoundError(f"{root}: no word folders (the Speech Commands layout has one folder of WAVs per word)")
    return _checked_classes(root, classes, num_classes)


def _checked_classes(root: str, classes: tuple[str, ...], num_classes: int | None) -> tuple[str, ...]:
    if num_classes is not None and len(classes) != num_classes:
        shown = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
        raise ConfigError("audio.num_classes", f"expected the number of classes of {root}: found {len(classes)} "
                          f"({shown}), got {num_classes}")
    return classes


def _read_list(fs, path: str) -> set[str]:
    if not fs.isfile(path):
        raise FileNotFoundError(f"{path}: missing; the Speech Commands layout lists its held-out clips there")
    with fs.open(path, "r") as f:
        return {line.strip().replace("\\", "/") for line in f if line.strip()}


@lru_cache(maxsize=16)
def _listing(root: str, num_classes: int | None) -> tuple[tuple[str, ...], dict[str, tuple[tuple[str, int], ...]]]:
    fs, base = _filesystem(root)
    base = base.rstrip("/")
    classes = list_classes(root, num_classes)
    if _is_sharded(root):
        return classes, {split: tuple((m.source, m.label) for m in members)
                         for split, members in _shard_members(root).items()}
    held_out = {split: _read_list(fs, f"{base}/{name}") for split, name in SPLIT_LISTS.items()}
    overlap = held_out["validation"] & held_out["testing"]
    if overlap:
        raise ValueError(f"{root}: {len(overlap)} clips are in both validation_list.txt and testing_list.txt, e.g. "
                         f"{sorted(overlap)[0]}")
    splits: dict[str, list[tuple[str, int]]] = {"training": [], "validation": [], "testing": []}
    for label, word in enumerate(classes):
        for path in sorted(fs.ls(f"{base}/{word}", detail=False)):
            if not path.lower().endswith(".wav"):
                continue
            relative = f"{word}/{os.path.basename(path)}"
            split = next((s for s, listed in held_out.items() if relative in listed), "training")
            splits[split].append((relative, label))
    return classes, {split: tuple(clips) for split, clips in splits.items()}


@lru_cache(maxsize=16)
def _shard_members(root: str) -> dict[str, tuple[ShardMember, ...]]:
    """Each split's clips in the shards under ``root``, in the folder listing's order (class, then path); a split
    with another class list than ``training`` raises ``ValueError`` naming it."""
    found = {}
    for split in SPLITS:
        info, members = read_members(f"{root.rstrip('/')}/{split}")
        if split != "training" and info["classes"] != found["training"][0]:
            raise ValueError(f"{root.rstrip('/')}/{split}/{INFO_NAME}: another class list than the training split's")
        found[split] = (info["classes"], tuple(sorted(members, key=lambda m: (m.label, m.source))))
    return {split: members for split, (_, members) in found.items()}


def list_split(root: str, split: str, num_classes: int | None = None) -> SplitFiles:
    """The clips of ``split`` (``training``, ``validation`` or ``testing``) with their classes; an empty split
    raises ``FileNotFoundError`` naming it. The folder is listed once per process (the three splits share it)."""
    if split not in ("training", *SPLIT_LISTS):
        raise ValueError(f"unknown split {split!r}: expected training, validation or testing")
    classes, splits = _listing(root, num_classes)
    if not splits[split]:
        raise FileNotFoundError(f"{root}: the {split} split has no clips"
                                + (f" (listed in {SPLIT_LISTS[split]})" if split in SPLIT_LISTS else ""))
    members = _shard_members(root)[split] if splits[split] and _is_sharded(root) else None
    return SplitFiles(root, split, classes, splits[split], members)


def _is_sharded(root: str) -> bool:
    """Whether ``root`` holds the shards of ``shards write speechcommands`` (``training/info.json``)."""
    fs, base = _filesystem(root)
    return fs.isfile(f"{base.rstrip('/')}/training/{INFO_NAME}")


def to_mono_16k(samples: np.ndarray, sample_rate: int, max_seconds: float = 1.0) -> np.ndarray:
    """``(frames,)`` or ``(frames, channels)`` float samples -> mono (channel mean) at 16 kHz (polyphase
    resampling), cut to ``max_seconds``; float32."""
    from scipy.signal import resample_poly

    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    if sample_rate != SAMPLE_RATE:
        common = gcd(SAMPLE_RATE, int(sample_rate))
        mono = resample_poly(mono, SAMPLE_RATE // common, int(sample_rate) // common)
    return np.ascontiguousarray(mono[:int(max_seconds * SAMPLE_RATE)], dtype=np.float32)


def read_clip(data: bytes, where: str) -> np.ndarray:
    """Decode audio bytes (soundfile) to a mono 16 kHz float32 clip of at most 1 s; ``ValueError`` naming
    ``where`` when they do not decode, hold no samples or are shorter than one 25 ms frame."""
    import soundfile

    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as error:  # noqa: BLE001 - libsndfile's errors vary by version (LibsndfileError, RuntimeError)
        raise ValueError(f"{where}: does not decode as audio: {type(error).__name__}: {error}") from error
    clip = to_mono_16k(samples, rate)
    if len(clip) < 400:
        raise ValueError(f"{where}: {len(clip)} samples at 16 kHz, shorter than one 25 ms frame")
    if not np.isfinite(clip).all():
        raise ValueError(f"{where}: non-finite samples")
    return clip


def features_of(clip: np.ndarray, config) -> torch.Tensor:
    """The unnormalized log-mel ``(target_length, num_mel_bins)`` of a clip: mean removed, fbank, padded or cut."""
    waveform = torch.from_numpy(clip - clip.mean())
    return pad_or_cut(fbank(waveform, config.num_mel_bins), config.target_length)


def model_input(features: torch.Tensor) -> torch.Tensor:
    """``(frames, mel)`` -> the model's ``(1, mel, frames)`` (AST's ``unsqueeze(1).transpose(2, 3)``)."""
    return features.T.unsqueeze(0).contiguous()


@dataclass(frozen=True)
class ClipBatch:
    """Training clips before their features (``audio.features_on=device``): ``waveforms`` (B, samples) mixed,
    centred and zero-padded to 1 s, ``frames`` (B,) the fbank frames each clip really has, and each clip's
    draws: ``bounds`` (B, 4) SpecAugment's masks, ``scale`` (B,), ``noise`` (B, T, F) and ``shift`` (B,) AST's
    noise and roll (``noise`` None with ``audio.noise=false``)."""

    waveforms: torch.Tensor
    frames: torch.Tensor
    bounds: torch.Tensor
    scale: torch.Tensor | None
    noise: torch.Tensor | None
    shift: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.waveforms)

    def model_input(self, config, device: torch.device) -> torch.Tensor:
        """The model input (B, 1, mel, frames) on ``device``: what :class:`TrainSamples` computes per clip in the
        loader, batched: fbank, rows past a clip's own frames zero (AST pads after the log), padded or cut to
        ``target_length``, masked, normalized, noise added and rolled."""
        features = fbank(self.waveforms.to(device, non_blocking=True), config.num_mel_bins)
        if features.shape[1] < config.target_length:
            features = torch.nn.functional.pad(features, (0, 0, 0, config.target_length - features.shape[1]))
        features = features[:, :config.target_length]
        rows = torch.arange(features.shape[1], device=features.device)
        features = features.masked_fill((rows[None] >= self.frames.to(features.device)[:, None])[:, :, None], 0.0)
        features = normalize(apply_masks(features, self.bounds), config.norm_mean, config.norm_std)
        if self.noise is not None:
            features = apply_noise_and_roll(features, self.scale, self.noise, self.shift)
        return features.transpose(1, 2).unsqueeze(1).contiguous()


@dataclass(frozen=True)
class AudioSample:
    """What a worker returns per index: the model input (1, mel, frames) or, with ``audio.features_on=device``,
    a one-clip :class:`ClipBatch`; the (soft) target; files skipped."""

    input: torch.Tensor | ClipBatch
    target: torch.Tensor
    skipped: int


class _Clips(Dataset):
    """Reads the clips of a split through fsspec (opened lazily in each worker)."""

    def __init__(self, files: SplitFiles):
        self.files = files
        self._fs = None

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> np.ndarray:
        if self._fs is None:
            self._fs, base = _filesystem(self.files.root)
            self._base = base.rstrip("/")
        if self.files.members is not None:
            member = self.files.members[index]
            return read_clip(read_member(self._fs, member), member.where)
        path = f"{self._base}/{self.files.clips[index][0]}"
        try:
            with self._fs.open(path, "rb") as f:
                data = f.read()
        except OSError as error:
            raise ValueError(f"{path}: {type(error).__name__}: {error}") from error
        return read_clip(data, path)


class TrainSamples(_Clips):
    """Training sample ``(epoch, index)``: AST's augmentation in its order (waveform mixup with probability
    ``mixup``, fbank, SpecAugment, normalization, noise and roll), every draw from the sample's own generator."""

    def __init__(self, files: SplitFiles, config, seed: int):
        super().__init__(files)
        self.config, self.seed = config, seed
        self.num_classes = len(files.classes)

    def _readable(self, index: int) -> tuple[int, np.ndarray, int]:
        """(position, clip, files skipped) of the first readable clip from ``index`` on."""
        for attempt in range(len(self)):
            position = (index + attempt) % len(self)
            try:
                return position, self.read(position), attempt
            except Exception as error:  # noqa: BLE001 - any damage: skip, count, name the file
                _logger.warning("skipping %s: %s", self.files.clips[position][0], error)
        raise RuntimeError(f"{self.files.root}: no readable clip in the {self.files.split} split")

    def __getitem__(self, item: tuple[int, int]) -> AudioSample:
        epoch, index = item
        cfg = self.config
        position, clip, skipped = self._readable(index)
        rng = sample_generator(self.seed, epoch, position, SEED_PURPOSE)
        target = torch.zeros(self.num_classes)
        label = self.files.clips[position][1]
        if rng.random() < cfg.mixup:
            partner, other, more = self._readable(int(rng.integers(len(self))))
            skipped += more
            weight = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
            first = clip - clip.mean()
            second = np.zeros_like(first)
            second[:min(len(other), len(first))] = (other - other.mean())[:len(first)]
            clip = weight * first + (1 - weight) * second
            target[label] += weight
            target[self.files.clips[partner][1]] += 1 - weight
        else:
            target[label] = 1.0
        if cfg.features_on == "device":
            return AudioSample(self._unprocessed(clip.astype(np.float32), rng), target, skipped)
        features = spec_augment(features_of(clip.astype(np.float32), cfg), rng, cfg.freq_mask, cfg.time_mask)
        features = normalize(features, cfg.norm_mean, cfg.norm_std)
        if cfg.noise:
            features = noise_and_roll(features, rng, cfg.roll)
        return AudioSample(model_input(features), target, skipped)

    def _unprocessed(self, clip: np.ndarray, rng: np.random.Generator) -> ClipBatch:
        """The clip centred and padded to 1 s with its draws, in :meth:`__getitem__`'s order (one clip)."""
        cfg = self.config
        waveform = np.zeros(SAMPLE_RATE, dtype=np.float32)
        waveform[:len(clip)] = clip - clip.mean()
        bounds = draw_masks(rng, cfg.target_length, cfg.num_mel_bins, cfg.freq_mask, cfg.time_mask)
        scale = noise = shift = None
        if cfg.noise:
            drawn, noise_array, rolled = draw_noise(rng, cfg.target_length, cfg.num_mel_bins, cfg.roll)
            scale, noise, shift = torch.tensor([drawn]), torch.from_numpy(noise_array)[None], torch.tensor([rolled])
        return ClipBatch(torch.from_numpy(waveform)[None], torch.tensor([1 + (len(clip) - FRAME_LENGTH) // FRAME_SHIFT]),
                         torch.tensor([bounds]), scale, noise, shift)


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if parts[0] is None else torch.cat(parts)


def _collate_train(samples: list[AudioSample]) -> tuple[torch.Tensor | ClipBatch, torch.Tensor, int]:
    if isinstance(samples[0].input, ClipBatch):
        clips = [s.input for s in samples]
        inputs = ClipBatch(*(_cat([getattr(c, name) for c in clips]) for name in
                             ("waveforms", "frames", "bounds", "scale", "noise", "shift")))
    else:
        inputs = torch.stack([s.input for s in samples])
    return inputs, torch.stack([s.target for s in samples]), sum(s.skipped for s in samples)


class TrainLoader(ShuffledBatches):
    """This rank's training batches ``(inputs (B, 1, mel, frames) or a ClipBatch, soft targets (B, classes))``:
    every rank the same number per epoch (the shuffled split cut to a multiple of world x batch), resumable mid-epoch."""

    name = "Speech Commands"

    count_key = "clips"

    def __init__(self, files: SplitFiles, config, *, batch_size: int, rank: int, world_size: int, num_workers: int,
                 seed: int):
        self.files = files
        self._shuffled(TrainSamples(files, config, seed), _collate_train, root=files.root, size=len(files),
                       described=f"{files.root}: {len(files)} training clips", per_batch=batch_size,
                       batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers, seed=seed)


class _EvalSamples(_Clips):
    def __init__(self, files: SplitFiles, config, indices: Sequence[int]):
        super().__init__(files)
        self.config, self.indices = config, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int] | None:
        index = self.indices[item]
        try:
            clip = self.read(index)
        except Exception as error:  # noqa: BLE001
            _logger.warning("evaluation skips %s: %s", self.files.clips[index][0], error)
            return None
        features = normalize(features_of(clip, self.config), self.config.norm_mean, self.config.norm_std)
        return model_input(features), self.files.clips[index][1]


class EvalLoader(EvaluationShare):
    """This rank's share of a held-out split (``rank::world``, so every clip is scored once) in batches of
    ``(inputs, labels)``, no augmentation. A damaged clip is skipped, named in a warning and counted in
    ``bad_samples``; ``num_samples`` (this rank's clips) against the evaluator's ``samples`` tells the trainer
    the evaluation is incomplete; ``description`` names the set."""

    def __init__(self, files: SplitFiles, config, *, batch_size: int, rank: int, world_size: int, num_workers: int):
        self.files = files
        self.description = f"{files.root.rstrip('/')} ({files.split}: {SPLIT_LISTS.get(files.split, 'training')})"
        self._share(_EvalSamples(files, config, range(rank, len(files), world_size)), batch_size=batch_size,
                    num_workers=num_workers)
