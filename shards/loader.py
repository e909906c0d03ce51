"""Training and evaluation loaders over WebDataset shards.

Train stream (one per rank and DataLoader worker, a "slot"), built as a chain of stages:

1. shard URLs: an endless walk over per-epoch permutations of the shard list, slot ``s`` of
   ``S`` taking every ``S``-th shard (split by node and worker; no slot ever runs dry);
2. tar -> samples (every sample a damaged shard fails to deliver against its ``info.json``
   count is a bad sample and the walk goes on; a missing shard raises naming its URL);
3. weighted mix of several sources (optional);
4. shuffle buffer seeded by (seed, epoch, slot);
5. fast-forward past samples delivered before a checkpoint (no decode);
6. decode to uint8 pixels + validate (bad samples are counted and dropped);
7. batches: timm's train augmentation, its random draws seeded by (seed, epoch, slot, position),
   each image written straight into a float32 batch tensor in ``channels_last`` layout, in
   shared memory when built in a worker (:class:`TrainAugment`: timm's draws and distribution,
   the crop resampled in torch, without per-image tensors, transposes or a stacked copy); a
   worker stops after its quota, so every rank yields exactly ``len(loader)`` batches.

Train batches are ``(N, 3, H, W)`` tensors with NHWC strides (``channels_last``), what
channels-last training consumes as is; ``.contiguous()`` gives NCHW strides.

Mixup/CutMix runs on whole batches in the main process, seeded by (seed, epoch, rank, batch).

The sample stream is a pure function of (seed, epoch, rank, worker, position), so:

Resume guarantee: with the same shards, seed, world size, rank, num_workers, batch size,
samples per epoch and shuffle buffer, a loader restored from ``state_dict()`` yields exactly the
batches an uninterrupted loader yields after the batches counted in the state: the same sample
keys in the same order, and bit-identical images and targets (mixup included) given the same
torch/timm/Pillow versions. ``load_state_dict`` refuses a state saved under other settings with
a ``ValueError`` naming the setting. Image size and augmentation may change across a resume
(tensors then differ, the sample order does not). Restoring re-reads, without decoding, the
part of the epoch each worker had consumed. Shards are assumed unchanged.

Coverage: an epoch draws ``len(loader) * batch_size`` samples per rank from the slots' shard
walks; with many more shards than slots that is close to one pass over the data. With fewer
shards than slots, slots share shards (in different orders), so some samples repeat within an
epoch; equal batch counts on every rank hold either way.
"""
from __future__ import annotations

import io
import logging
import math
import os
import random
import signal
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial, reduce
from itertools import islice
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .info import ShardSet, resolve_shard_set
from .samples import (DECODE_ERRORS, BadSampleError, CorruptShardError, Sample, decode_image, decode_sample,
                      iter_shard_samples, sample_fields)

_logger = logging.getLogger(__name__)
# PIL hands NumPy its pixels read-only, and sample bytes are immutable; the train path only reads both.
warnings.filterwarnings("ignore", message="The given (NumPy array|buffer) is not writable", category=UserWarning,
                        module=__name__)
# libjpeg's recoverable-damage warnings ("Corrupt JPEG data: ..."), which Pillow decodes past silently too.
warnings.filterwarnings("ignore", message="Corrupt JPEG data", category=UserWarning, module=__name__)

STATE_VERSION = 1
MAX_BAD_IN_A_ROW = 1000
_WARN_FIRST = 10


@dataclass(kw_only=True, slots=True)
class AugmentConfig:
    """Train-time augmentation (timm ``create_transform``); ``AugmentConfig(auto_augment=None, reprob=0)`` for simple runs."""

    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    """timm auto-augment policy string; ``None`` disables it (colour jitter then applies)."""
    reprob: float = 0.25
    """Random-erasing probability."""
    remode: str = "pixel"
    """Random-erasing fill: ``pixel`` (per-pixel noise), ``rand`` or ``const``."""
    recount: int = 1
    """Random-erasing regions per image."""
    color_jitter: float | None = 0.4
    """Colour-jitter strength; timm applies it only when ``auto_augment`` is off."""
    scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect-ratio range."""
    hflip: float = 0.5
    """Horizontal-flip probability."""
    interpolation: str = "bicubic"
    """Resize interpolation."""

    def __post_init__(self) -> None:
        for name in ("reprob", "hflip"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"AugmentConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"AugmentConfig.scale must satisfy 0 < low <= high <= 1, got {self.scale}")


@dataclass(kw_only=True, slots=True)
class MixupConfig:
    """Batch-level Mixup/CutMix (timm ``Mixup``); targets become soft ``(N, num_classes)`` rows."""

    mixup_alpha: float = 0.8
    """Beta(alpha, alpha) for Mixup; 0 disables Mixup."""
    cutmix_alpha: float = 1.0
    """Beta(alpha, alpha) for CutMix; 0 disables CutMix."""
    prob: float = 1.0
    """Probability of mixing a batch."""
    switch_prob: float = 0.5
    """Probability of CutMix instead of Mixup when both are on."""
    label_smoothing: float = 0.1
    """Label smoothing folded into the soft targets."""

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(f"MixupConfig alphas must be >= 0, got mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}")
        for name in ("prob", "switch_prob", "label_smoothing"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"MixupConfig.{name} must be in [0, 1], got {getattr(self, name)}")


def timm_mixup(config: MixupConfig, num_classes: int) -> Mixup:
    """timm's batch-mode Mixup/CutMix with ``config``'s settings."""
    return Mixup(mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha, prob=config.prob,
                 switch_prob=config.switch_prob, mode="batch", label_smoothing=config.label_smoothing,
                 num_classes=num_classes)


# What a derived seed is for; the first part of every derived seed, so no two uses share one.
_SHARD_ORDER, _SOURCE_MIX, _SHUFFLE, _AUGMENT, _MIXUP = range(5)


def _derived_seed(purpose: int, *parts: int) -> int:
    """A 32-bit seed that depends on the purpose and every part (NumPy ``SeedSequence``)."""
    return int(np.random.SeedSequence([purpose, *map(int, parts)]).generate_state(1)[0])


_MASK64 = (1 << 64) - 1


def _sample_seed(base: int, position: int) -> int:
    """The 32-bit seed of sample ``position`` of a stream seeded ``base``: splitmix64's mixer on the
    pair (a few microseconds where ``SeedSequence`` takes a hundred; it runs once per image)."""
    z = (base * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 32


def _seed_transform_rngs(seed: int) -> None:
    """Seed what timm's transforms draw from: Python's and NumPy's global RNGs and torch's CPU generator.

    ``torch.default_generator.manual_seed``, not ``torch.manual_seed``: the latter also seeds every
    accelerator backend and, for one not yet initialised, queues the seed with a captured stack
    trace (a third of a millisecond per call).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)


@contextmanager
def _seeded_global_rngs(seed: int) -> Iterator[None]:
    """:func:`_seed_transform_rngs` inside, the previous RNG states restored afterwards (for the main
    process, whose RNG streams belong to the training loop)."""
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    _seed_transform_rngs(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.default_generator.set_state(torch_state)


def _new_batch(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
    """An uninitialised batch tensor (NHWC strides with ``channels_last``); in a DataLoader worker, in
    shared memory (as ``default_collate`` allocates), so handing it to the training process copies nothing."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype, memory_format=memory_format)
    strides = torch.empty(shape, dtype=dtype, device="meta", memory_format=memory_format).stride()
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape, strides)


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def leave_preemption_to_the_parent(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: loader workers leave SIGTERM and SIGUSR1 to the training process.

    Slurm (and torchrun's ``os.killpg``) signal the whole process group, loader workers included.
    torch's worker handler dies on a SIGTERM not sent by its parent, and the rank then fails
    ("DataLoader worker ... killed by signal") before it can checkpoint. Here the signals stay
    blocked in the worker (it was forked with them held, :func:`preemption_signals_held`, so
    none slips through before this runs) and one thread takes them: a SIGTERM from the parent
    (which is how it shuts its workers down) ends the worker as torch's handler would; any other
    is the training process's to handle, and it shuts its workers down itself.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    threading.Thread(target=_take_preemption_signals, args=(os.getppid(),), name="preemption-signals",
                     daemon=True).start()


def _take_preemption_signals(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(PREEMPTION_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)


@contextmanager
def preemption_signals_held() -> Iterator[None]:
    """Hold SIGTERM / SIGUSR1 while DataLoader workers are forked (they inherit the held mask, which
    :func:`leave_preemption_to_the_parent` keeps); signals held here reach this process afterwards."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _Counters:
    """Bad samples one worker met (sent to the main process with every batch) and their log lines.

    A damaged shard (samples lost against its ``info.json`` count, or a stream that breaks off) is
    logged at WARNING every time, naming the shard and the samples lost: it is the largest loss.
    Single bad samples are logged at WARNING for the first ``_WARN_FIRST`` of a worker, then at DEBUG.
    """

    def __init__(self, decode_errors: int = 0):
        self.shard_errors = 0
        self.decode_errors = decode_errors

    @property
    def total(self) -> int:
        return self.shard_errors + self.decode_errors

    def shard_short(self, url: str, delivered: int, expected: int, broken: str | None) -> None:
        """``url`` delivered ``delivered`` of the ``expected`` samples asked of it (``broken``: its read error)."""
        self.shard_errors += expected - delivered
        _logger.warning("skipping bad data (%d so far in this worker): shard %s gave %d of the %d samples expected "
                        "from it (info.json), %d lost: %s", self.total, url, delivered, expected, expected - delivered,
                        broken or "it ends early (truncated?)")

    def shard_broken(self, message: str) -> None:
        """A shard without a count broke off (one bad sample: the one being read)."""
        self.shard_errors += 1
        _logger.warning("skipping bad data (%d so far in this worker): %s", self.total, message)

    def bad_sample(self, message: str) -> None:
        """One sample that does not decode or lacks its label."""
        self.decode_errors += 1
        if self.decode_errors <= _WARN_FIRST:
            later = "; later bad samples of this worker are logged at DEBUG" if self.decode_errors == _WARN_FIRST else ""
            _logger.warning("skipping bad data (%d so far in this worker): %s%s", self.total, message, later)
        else:
            _logger.debug("skipping bad data (%d so far in this worker): %s", self.total, message)


# ----------------------------------------------------------------------------- stream stages


def slot_shard_urls(urls: Sequence[str], *, seed: int, epoch: int, source_index: int, slot: int, num_slots: int) -> Iterator[str]:
    """Endless shard URLs for one slot: every ``num_slots``-th entry of successive per-epoch permutations."""
    position, cached_pass, permutation = slot, -1, np.arange(0)
    while True:
        shard_pass, index = divmod(position, len(urls))
        if shard_pass != cached_pass:
            permutation = np.random.default_rng(_derived_seed(_SHARD_ORDER, seed, epoch, source_index, shard_pass)).permutation(len(urls))
            cached_pass = shard_pass
        yield urls[permutation[index]]
        position += num_slots


def shard_samples(urls: Iterator[str], counters: _Counters, num_shards: int,
                  expected: dict[str, int] | None = None) -> Iterator[Sample]:
    """Samples of each shard in turn; a missing shard raises, a damaged one is counted and skipped.

    ``expected`` (from ``info.json``) is each shard's sample count: a shard that yields fewer was
    cut short, even where the tar stream looks complete (a cut on a header boundary reads as a
    shorter, valid archive), and every missing sample counts as a bad one. Without counts, a
    stream that breaks off counts one.
    """
    empty: set[str] = set()
    for url in urls:
        produced, broken = 0, None
        try:
            for sample in iter_shard_samples(url):
                produced += 1
                yield sample
        except CorruptShardError as exc:
            broken = str(exc)
        wanted = expected.get(url) if expected else None
        if wanted is not None and produced < wanted:
            counters.shard_short(url, produced, wanted, broken)
        elif broken is not None:
            counters.shard_broken(broken)
        if produced:
            empty.clear()
            continue
        empty.add(url)
        if len(empty) >= num_shards:
            raise RuntimeError(f"no readable samples in any of the {num_shards} shards this worker reads (last: {url})")


def mixed(streams: Sequence[Iterator[Sample]], weights: Sequence[float], rng: random.Random) -> Iterator[Sample]:
    """Draw each next sample from stream ``i`` with probability ``weights[i] / sum(weights)``."""
    if len(streams) == 1:
        yield from streams[0]
        return
    choices = range(len(streams))
    while True:
        yield next(streams[rng.choices(choices, weights)[0]])


def shuffled(samples: Iterator[Sample], buffer_size: int, rng: random.Random) -> Iterator[Sample]:
    """A shuffle buffer whose draws depend on ``rng`` only (not on sample contents)."""
    buffer: list[Sample] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        index = rng.randrange(buffer_size)
        buffer[index], sample = sample, buffer[index]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def numbered(samples: Iterator[Sample], start: int) -> Iterator[tuple[int, Sample]]:
    """``(position, sample)`` with positions counted from 0, dropping the first ``start`` undecoded."""
    positioned = enumerate(samples)
    if start:
        next(islice(positioned, start - 1, start), None)
    return positioned


def decoded(
    samples: Iterator[tuple[int, Sample]],
    *,
    num_classes: int | None,
    counters: _Counters,
    decode: Callable[[Sample, int | None], tuple[Any, int]] = decode_sample,
) -> Iterator[tuple[int, str, Any, int]]:
    """Decode and validate with ``decode``; yields ``(position, key, image, label)`` (a PIL RGB image with
    :func:`decode_sample`, an ``(H, W, 3)`` uint8 tensor with :func:`decode_sample_pixels`).

    Bad samples are counted and dropped; ``MAX_BAD_IN_A_ROW`` of them in a row raise, so a
    stream of unusable data fails instead of searching forever.
    """
    bad_in_a_row = 0
    for position, sample in samples:
        try:
            image, label = decode(sample, num_classes)
        except BadSampleError as exc:
            counters.bad_sample(str(exc))
            bad_in_a_row += 1
            if bad_in_a_row >= MAX_BAD_IN_A_ROW:
                raise RuntimeError(f"{bad_in_a_row} bad samples in a row, the data looks unusable; last: {exc}") from exc
            continue
        bad_in_a_row = 0
        yield position, str(sample["__key__"]), image, label


def decode_sample_pixels(sample: Sample, num_classes: int | None) -> tuple[torch.Tensor, int]:
    """:func:`decode_sample` with the image as an ``(H, W, 3)`` uint8 tensor, the train augmentation's input.

    8-bit colour and greyscale JPEGs are decoded by torchvision's libjpeg-turbo, which gives Pillow's
    pixels (the same library and settings; tested) without Pillow's four-bytes-per-pixel image and
    its copy into NumPy. Other images (PNG, CMYK JPEGs, ...) and any JPEG torchvision refuses go
    through Pillow (:func:`~shards.samples.decode_image`, as :func:`decode_sample` does): Pillow
    decides what is bad, with the same error message.
    """
    where, extension, data, label = sample_fields(sample, num_classes)
    try:
        header = Image.open(io.BytesIO(data))  # reads the header only; refuses decompression bombs
        plain_jpeg = header.format == "JPEG" and header.mode in ("RGB", "L")
    except DECODE_ERRORS:
        plain_jpeg = False
    if plain_jpeg:
        try:
            return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB).permute(1, 2, 0), label
        except RuntimeError:
            pass
    return torch.from_numpy(np.asarray(decode_image(data, where, extension))), label


def transformed(items: Iterator[tuple[int, str, Image.Image, int]], transform: Callable[[Image.Image], torch.Tensor]
                ) -> Iterator[tuple[int, str, torch.Tensor, int]]:
    """A deterministic transform (evaluation) applied to each image."""
    for position, key, image, label in items:
        yield position, key, transform(image), label


def batched(items: Iterator[tuple[int, str, torch.Tensor, int]], batch_size: int, *, partial_last: bool) -> Iterator[tuple[int, list[str], torch.Tensor, torch.Tensor]]:
    """Stack ``batch_size`` items; yields ``(samples read so far, keys, images, labels)``."""
    while True:
        chunk = list(islice(items, batch_size))
        if not chunk or (len(chunk) < batch_size and not partial_last):
            return
        first = chunk[0][2]
        images = _new_batch((len(chunk), *first.shape), first.dtype)
        torch.stack([tensor for _, _, tensor, _ in chunk], out=images)
        labels = torch.tensor([label for _, _, _, label in chunk], dtype=torch.int64)
        yield chunk[-1][0] + 1, [key for _, key, _, _ in chunk], images, labels


def augmented_batches(
    items: Iterator[tuple[int, str, torch.Tensor, int]],
    *,
    augment: "TrainAugment",
    batch_size: int,
    seed_of: Callable[[int], int],
) -> Iterator[tuple[int, list[str], torch.Tensor, torch.Tensor]]:
    """Full batches of augmented images (``(H, W, 3)`` uint8 pixels in), each written straight into the
    (shared-memory) batch tensor, its random draws seeded by ``seed_of(position)``; yields
    ``(samples read so far, keys, images, labels)``."""
    in_worker = get_worker_info() is not None  # a worker's global RNGs serve nothing else: no restoring
    while True:
        chunk = list(islice(items, batch_size))
        if len(chunk) < batch_size:
            return
        images = _new_batch((batch_size, 3, augment.img_size, augment.img_size), torch.float32, channels_last=True)
        for slot, (position, _, pixels, _) in zip(images, chunk):
            if in_worker:
                _seed_transform_rngs(seed_of(position))
                augment.into(slot, pixels)
            else:
                with _seeded_global_rngs(seed_of(position)):
                    augment.into(slot, pixels)
        labels = torch.tensor([label for _, _, _, label in chunk], dtype=torch.int64)
        yield chunk[-1][0] + 1, [key for _, key, _, _ in chunk], images, labels


def chain(source: Iterator, *stages: Callable[[Iterator], Iterator]) -> Iterator:
    """Feed ``source`` through ``stages`` in order."""
    return reduce(lambda stream, stage: stage(stream), stages, source)


# ----------------------------------------------------------------------------- train


@dataclass(frozen=True, slots=True)
class WorkerPosition:
    """Where one worker's stream stands in the current epoch, as of the last batch the trainer received."""

    batches: int = 0
    samples_read: int = 0
    shard_errors: int = 0
    decode_errors: int = 0


class _TrainStream(IterableDataset):
    """Yields this rank's train batches for one epoch from inside each DataLoader worker."""

    def __init__(
        self,
        sources: Sequence[ShardSet],
        weights: Sequence[float],
        *,
        augment: TrainAugment,
        num_classes: int | None,
        batch_size: int,
        batches_per_rank: int,
        rank: int,
        world_size: int,
        workers: int,
        seed: int,
        shuffle_buffer: int,
    ):
        self.sources, self.weights = list(sources), list(weights)
        self.augment, self.num_classes = augment, num_classes
        self.batch_size, self.batches_per_rank = batch_size, batches_per_rank
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.epoch = 0
        self.first_worker = 0
        self.positions = [WorkerPosition() for _ in range(workers)]

    def worker_quota(self, worker: int) -> int:
        """Batches worker ``worker`` yields per epoch; batch ``i`` of the rank comes from worker ``i % workers``."""
        return len(range(worker, self.batches_per_rank, self.workers))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        # DataLoader worker 0 serves the next batch of the epoch (round-robin from there), so it
        # plays the stream worker that owns batch ``batches_done``: ``first_worker``.
        info = get_worker_info()
        return self.worker_batches(((info.id if info is not None else 0) + self.first_worker) % self.workers)

    def worker_batches(self, worker: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        """The remaining batches of ``worker`` in ``self.epoch``, after ``self.positions[worker]``."""
        start = self.positions[worker]
        slot, num_slots = self.rank * self.workers + worker, self.world_size * self.workers
        counters = _Counters(decode_errors=start.decode_errors)
        mix_rng = random.Random(_derived_seed(_SOURCE_MIX, self.seed, self.epoch, slot))
        shuffle_rng = random.Random(_derived_seed(_SHUFFLE, self.seed, self.epoch, slot))
        per_source = [
            shard_samples(
                slot_shard_urls(source.urls, seed=self.seed, epoch=self.epoch, source_index=i, slot=slot, num_slots=num_slots),
                counters,
                len(source.urls),
                dict(zip(source.urls, source.counts)) if source.counts else None,
            )
            for i, source in enumerate(self.sources)
        ]
        stream = chain(
            mixed(per_source, self.weights, mix_rng),
            partial(shuffled, buffer_size=self.shuffle_buffer, rng=shuffle_rng),
            partial(numbered, start=start.samples_read),
            partial(decoded, num_classes=self.num_classes, counters=counters, decode=decode_sample_pixels),
            partial(augmented_batches, augment=self.augment, batch_size=self.batch_size,
                    seed_of=partial(_sample_seed, _derived_seed(_AUGMENT, self.seed, self.epoch, slot))),
        )
        for index, (samples_read, keys, images, labels) in enumerate(
            islice(stream, self.worker_quota(worker) - start.batches), start=start.batches
        ):
            meta = {
                "worker": worker,
                "batch": index,
                "samples_read": samples_read,
                "shard_errors": counters.shard_errors,
                "decode_errors": counters.decode_errors,
                "keys": keys,
            }
            yield images, labels, meta


def _posterize_keeping_zero_bits(image: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, with 0 bits giving a black image as older Pillow did (recent Pillow rejects ``bits=0``)."""
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return image if bits_to_keep >= 8 else ImageOps.posterize(image, bits_to_keep)


def timm_train_transform(img_size: int, augment: AugmentConfig, *, separate: bool = False):
    """timm's ``create_transform`` train pipeline for ``augment`` (RandAugment's posterize fixed, see
    :func:`fix_posterize`); ``separate=True`` returns timm's (primary, secondary, final) parts."""
    transform = create_transform(
        img_size,
        is_training=True,
        scale=augment.scale,
        ratio=augment.ratio,
        hflip=augment.hflip,
        color_jitter=augment.color_jitter or None,
        auto_augment=augment.auto_augment,
        interpolation=augment.interpolation,
        re_prob=augment.reprob,
        re_mode=augment.remode,
        re_count=augment.recount,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        separate=separate,
    )
    for part in transform if separate else (transform,):
        fix_posterize(part)
    return transform


def fix_posterize(transform) -> None:
    """RandAugment's PosterizeIncreasing reaches 0 bits at high magnitude, which recent Pillow rejects
    (about 5 in 3000 calls of rand-m9-mstd0.5-inc1): 0 bits gives a black image, as older Pillow did."""
    for step in getattr(transform, "transforms", ()):
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize_keeping_zero_bits


_TORCH_RESIZE_MODES = {InterpolationMode.BILINEAR: "bilinear", InterpolationMode.BICUBIC: "bicubic"}


def _resizes_in_torch(crop: Any) -> bool:
    """Whether ``crop`` is timm's random resized crop with interpolations torch resamples as Pillow does."""
    if not isinstance(crop, RandomResizedCropAndInterpolation):
        return False
    modes = crop.interpolation if isinstance(crop.interpolation, (tuple, list)) else (crop.interpolation,)
    return all(mode in _TORCH_RESIZE_MODES for mode in modes)


class TrainAugment:
    """timm's train transform, from uint8 pixels straight into a batch slot.

    timm's pipeline is a random resized crop, a flip and RandAugment (or colour jitter) on PIL
    images, then ``ToTensor``, ``Normalize`` and random erasing. :meth:`into` makes the same random
    draws in the same order, and:

    - crops and resizes in torch: the crop is a view of the decoded pixels, resampled by torch's
      uint8 antialiased bilinear/bicubic kernel (a port of Pillow's resampling: the same filter and
      support; about 95% of values equal to Pillow's, the rest mostly 1 level apart; tested over
      many draws) at a third of Pillow's cost, without Pillow's crop copy;
    - runs the flip and RandAugment on the 224-pixel result as timm does (Pillow);
    - converts, normalizes and erases in place in the slot of the batch tensor (bit for bit timm's
      values for a given PIL result), without a per-image tensor, a normalized copy or a stacked
      copy. Slots of a ``channels_last`` batch take PIL's pixel order as it is.

    ``__call__`` is timm's composed transform on a PIL image (the reference the tests compare with).
    A crop torch cannot resample like Pillow (nearest, box, ...) runs timm's PIL crop instead.
    """

    def __init__(self, img_size: int, augment: AugmentConfig):
        primary, secondary, final = timm_train_transform(img_size, augment, separate=True)
        self.img_size = img_size
        self._composed = transforms.Compose([*primary.transforms, *secondary.transforms, *final.transforms])
        crop, *after_crop = primary.transforms
        self.crop = crop if _resizes_in_torch(crop) else None
        self.pil = transforms.Compose([*(after_crop if self.crop else primary.transforms), *secondary.transforms])
        normalize = next(t for t in final.transforms if isinstance(t, transforms.Normalize))
        mean = torch.as_tensor(normalize.mean, dtype=torch.float32)
        std = torch.as_tensor(normalize.std, dtype=torch.float32)
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)
        # the same per-channel values along one image row in pixel (H, W*C) order, for NHWC slots
        self.mean_row, self.std_row = mean.repeat(img_size), std.repeat(img_size)
        self.erasing = next((t for t in final.transforms if isinstance(t, RandomErasing)), None)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """The composed timm transform, one image (reference and tests)."""
        return self._composed(image)

    def cropped(self, pixels: torch.Tensor) -> Image.Image:
        """The random resized crop of ``(H, W, 3)`` uint8 ``pixels``, as timm's crop draws it."""
        if self.crop is None:
            return Image.fromarray(pixels.numpy())
        crop = self.crop
        top, left, height, width = crop.get_params(pixels.permute(2, 0, 1), crop.scale, crop.ratio)
        if height < 1 or width < 1:  # timm rounds a crop of a few-pixel image to nothing (Pillow then fails)
            height, width = max(height, 1), max(width, 1)
            top, left = min(top, pixels.shape[0] - height), min(left, pixels.shape[1] - width)
        mode = random.choice(crop.interpolation) if isinstance(crop.interpolation, (tuple, list)) else crop.interpolation
        region = pixels[top:top + height, left:left + width].permute(2, 0, 1).unsqueeze(0)
        # a contiguous channels-last region takes torch's vectorised uint8 path, and comes back channels-last
        resized = F.interpolate(region.contiguous(memory_format=torch.channels_last), size=crop.size,
                                mode=_TORCH_RESIZE_MODES[mode], antialias=True)
        return Image.fromarray(resized[0].permute(1, 2, 0).numpy())

    def into(self, slot: torch.Tensor, pixels: torch.Tensor) -> None:
        """Augment ``(H, W, 3)`` uint8 ``pixels`` into ``slot`` (float32, 3 x img_size x img_size, any strides)."""
        augmented = torch.from_numpy(np.asarray(self.pil(self.cropped(pixels))))  # H x W x C, read only
        rows = slot.permute(1, 2, 0)
        if rows.is_contiguous():  # an NHWC batch: work in pixel order, one image row at a time
            rows = rows.view(self.img_size, -1)
            rows.copy_(augmented.view(self.img_size, -1)).div_(255)  # ToTensor: float32(x) / 255
            rows.sub_(self.mean_row).div_(self.std_row)  # Normalize
        else:
            slot.copy_(augmented.permute(2, 0, 1)).div_(255)
            slot.sub_(self.mean).div_(self.std)
        if self.erasing is not None:
            self.erasing(slot)


class TrainLoader:
    """This rank's train batches: ``len()`` is the same on every rank; resumable with ``state_dict``.

    Iterating yields ``(images, targets)`` (``(images, targets, keys)`` with ``return_keys``).
    ``set_epoch(e)`` makes the next iteration cover epoch ``e``: from its start, or, when ``e``
    is the epoch of the current position (e.g. just restored from a checkpoint), from that
    position on, which yields nothing if ``e`` was already complete. Without ``set_epoch`` an
    iteration continues the current epoch, or starts the next one if it is complete.
    """

    def __init__(
        self,
        stream: _TrainStream,
        *,
        num_workers: int,
        mixup: Mixup | None,
        sources_signature: list[str],
        samples_per_epoch: int,
        pin_memory: bool,
        return_keys: bool,
        device: torch.device | None = None,
    ):
        self._stream = stream
        self._num_workers = num_workers
        self._mixup = mixup
        self._device = device
        self._sources_signature = sources_signature
        self._samples_per_epoch = samples_per_epoch
        self._pin_memory = pin_memory
        self._return_keys = return_keys
        self._epoch = 0
        self._batches_done = 0
        self._bad_before_epoch = 0
        self._epoch_chosen = False

    def __len__(self) -> int:
        return self._stream.batches_per_rank

    @property
    def epoch(self) -> int:
        """The epoch of the current position."""
        return self._epoch

    @property
    def bad_samples(self) -> int:
        """Bad samples skipped so far (undecodable, no ``cls``, corrupt shard tails), all workers, all epochs."""
        return self._bad_before_epoch + sum(p.shard_errors + p.decode_errors for p in self._stream.positions)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration cover ``epoch`` (keeping a restored position within it)."""
        if epoch != self._epoch:
            self._start_epoch(epoch)
        self._epoch_chosen = True

    def _start_epoch(self, epoch: int) -> None:
        self._bad_before_epoch = self.bad_samples
        self._epoch, self._batches_done = epoch, 0
        self._stream.positions = [WorkerPosition() for _ in self._stream.positions]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if self._batches_done >= len(self) and not self._epoch_chosen:
            self._start_epoch(self._epoch + 1)
        self._epoch_chosen = False
        if self._batches_done >= len(self):
            return
        stream, workers = self._stream, len(self._stream.positions)
        stream.epoch = self._epoch
        stream.first_worker = self._batches_done % workers
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=self._num_workers,
            pin_memory=self._pin_memory,
            persistent_workers=False,
            worker_init_fn=leave_preemption_to_the_parent,
        )
        with preemption_signals_held():
            batches = iter(loader)
        for images, targets, meta in batches:
            index = self._batches_done
            if (meta["worker"], meta["batch"]) != (index % workers, index // workers):
                raise RuntimeError(
                    f"batch {index} came from worker {meta['worker']} (its batch {meta['batch']}), "
                    f"expected worker {index % workers}: DataLoader order is not round-robin"
                )
            stream.positions[meta["worker"]] = WorkerPosition(
                meta["batch"] + 1, meta["samples_read"], meta["shard_errors"], meta["decode_errors"]
            )
            self._batches_done += 1
            if self._device is not None:
                images = images.to(self._device, non_blocking=self._pin_memory)
                targets = targets.to(self._device, non_blocking=self._pin_memory)
            if self._mixup is not None:
                with _seeded_global_rngs(_derived_seed(_MIXUP, stream.seed, self._epoch, stream.rank, index)):
                    images, targets = self._mixup(images, targets)
            yield (images, targets, meta["keys"]) if self._return_keys else (images, targets)
        if self._batches_done != len(self):
            raise RuntimeError(f"rank {stream.rank} got {self._batches_done} of {len(self)} batches in epoch {self._epoch}")

    def _identity(self) -> dict[str, Any]:
        stream = self._stream
        return {
            "seed": stream.seed,
            "rank": stream.rank,
            "world_size": stream.world_size,
            "num_workers": self._num_workers,
            "batch_size": stream.batch_size,
            "samples_per_epoch": self._samples_per_epoch,
            "shuffle_buffer": stream.shuffle_buffer,
            "sources": self._sources_signature,
        }

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch handed out: plain Python data (``torch.save`` with ``weights_only=True`` works)."""
        return {
            "version": STATE_VERSION,
            **self._identity(),
            "epoch": self._epoch,
            "batches_done": self._batches_done,
            "bad_samples_before_epoch": self._bad_before_epoch,
            "workers": [
                [p.batches, p.samples_read, p.shard_errors, p.decode_errors] for p in self._stream.positions
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by ``state_dict``; raises ``ValueError`` naming a setting that differs."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not supported (expected {STATE_VERSION})")
        for field, current in self._identity().items():
            if state.get(field) != current:
                raise ValueError(
                    f"loader state was saved with {field}={state.get(field)!r} but this loader has {field}={current!r}; "
                    "exact resume needs the same shards, seed, world size, rank, num_workers, batch size, "
                    "samples per epoch and shuffle buffer"
                )
        self._epoch = int(state["epoch"])
        self._batches_done = int(state["batches_done"])
        self._bad_before_epoch = int(state["bad_samples_before_epoch"])
        self._stream.positions = [WorkerPosition(*map(int, entry)) for entry in state["workers"]]


def _resolve_sources(urls: str | Sequence[str], weights: Sequence[float] | None, *, require_counts: bool) -> list[ShardSet]:
    if weights is None:
        return [resolve_shard_set(urls, require_counts=require_counts)]
    entries = urls.split("::") if isinstance(urls, str) else list(urls)
    if len(entries) != len(weights):
        raise ValueError(f"weights has {len(weights)} entries but urls names {len(entries)} sources")
    if any(w <= 0 for w in weights):
        raise ValueError(f"source weights must be > 0, got {list(weights)}")
    return [resolve_shard_set(entry, require_counts=require_counts) for entry in entries]


def build_train_loader(
    urls: str | Sequence[str],
    *,
    batch_size: int,
    img_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    seed: int = 0,
    samples_per_epoch: int | None = None,
    augment: AugmentConfig | None = None,
    mixup: MixupConfig | None = None,
    num_classes: int | None = None,
    weights: Sequence[float] | None = None,
    shuffle_buffer: int = 2000,
    pin_memory: bool = False,
    return_keys: bool = False,
    device: torch.device | str | None = None,
) -> TrainLoader:
    """Build this rank's train loader over shards (see the module docstring for the stages).

    ``urls``: a dataset directory (shards from its ``info.json``), a brace pattern
    (``s3://b/in22k/shard-{000000..013999}.tar``), a list of shard URLs, or, with ``weights``,
    several such sources separated by ``::`` (or as a list), mixed with those weights.
    ``samples_per_epoch`` defaults to the ``info.json`` total of all sources; every rank yields
    ``samples_per_epoch // (world_size * batch_size)`` full batches. ``augment=None`` uses
    ``AugmentConfig()``; ``mixup`` turns targets into soft ``(N, num_classes)`` rows.
    ``num_classes`` defaults to the class count in ``info.json``. ``device``: batches are delivered
    there (``non_blocking`` with ``pin_memory``) and mixup runs there: on a GPU it costs next to nothing,
    on the CPU it is about a third of a millisecond per 224-px image in the training process.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if batch_size < 1 or num_workers < 0 or shuffle_buffer < 1:
        raise ValueError(f"need batch_size >= 1, num_workers >= 0, shuffle_buffer >= 1; got {batch_size}, {num_workers}, {shuffle_buffer}")
    sources = _resolve_sources(urls, weights, require_counts=samples_per_epoch is None)
    if samples_per_epoch is None:
        samples_per_epoch = sum(source.total for source in sources)
    batches_per_rank = samples_per_epoch // (world_size * batch_size)
    if batches_per_rank < 1:
        raise ValueError(
            f"samples_per_epoch={samples_per_epoch} gives no full batch of {batch_size} on each of {world_size} ranks; "
            "lower batch_size or raise samples_per_epoch"
        )
    if num_classes is None:
        num_classes = next((len(source.classes) for source in sources if source.classes), None)
    mixup_fn = None
    if mixup is not None:
        if num_classes is None:
            raise ValueError("mixup needs num_classes (no info.json with classes found next to the shards)")
        if batch_size % 2:
            raise ValueError(f"mixup needs an even batch_size, got {batch_size}")
        mixup_fn = timm_mixup(mixup, num_classes)
    stream = _TrainStream(
        sources,
        weights or [1.0],
        augment=TrainAugment(img_size, augment or AugmentConfig()),
        num_classes=num_classes,
        batch_size=batch_size,
        batches_per_rank=batches_per_rank,
        rank=rank,
        world_size=world_size,
        workers=max(1, num_workers),
        seed=seed,
        shuffle_buffer=shuffle_buffer,
    )
    signature = [f"{weight}:{','.join(source.urls)}" for weight, source in zip(weights or [1.0], sources)]
    return TrainLoader(
        stream,
        num_workers=num_workers,
        mixup=mixup_fn,
        sources_signature=signature,
        samples_per_epoch=samples_per_epoch,
        pin_memory=pin_memory,
        return_keys=return_keys,
        device=torch.device(device) if device is not None else None,
    )


# ----------------------------------------------------------------------------- eval


def split_range(total: int, parts: int, index: int) -> range:
    """The ``index``-th of ``parts`` contiguous, near-equal pieces of ``range(total)``."""
    return range(total * index // parts, total * (index + 1) // parts)


class _EvalStream(IterableDataset):
    """Yields this rank's eval batches; each worker reads a contiguous, batch-aligned range of samples."""

    def __init__(self, source: ShardSet, *, transform, num_classes, batch_size: int, rank: int, world_size: int, workers: int):
        self.source, self.transform, self.num_classes = source, transform, num_classes
        self.batch_size, self.workers = batch_size, workers
        self.samples = split_range(source.total, world_size, rank)
        self.num_batches = math.ceil(len(self.samples) / batch_size)

    def worker_range(self, worker: int) -> range:
        """Global sample indices worker ``worker`` reads (a whole number of batches, except the last worker)."""
        batches = split_range(self.num_batches, self.workers, worker)
        first = self.samples.start + batches.start * self.batch_size
        return range(first, min(self.samples.stop, self.samples.start + batches.stop * self.batch_size))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        counters = _Counters()
        stream = chain(
            self._samples_in(self.worker_range(worker), counters),
            partial(decoded, num_classes=self.num_classes, counters=counters),
            partial(transformed, transform=self.transform),
            partial(batched, batch_size=self.batch_size, partial_last=True),
        )
        bad = 0
        for _, keys, images, labels in stream:
            bad = counters.shard_errors + counters.decode_errors
            yield images, labels, {"keys": keys, "worker": worker, "bad": bad}
        if counters.shard_errors + counters.decode_errors != bad:  # found after the last batch: report it
            yield (torch.empty(0), torch.empty(0, dtype=torch.int64),
                   {"keys": [], "worker": worker, "bad": counters.shard_errors + counters.decode_errors})

    def _samples_in(self, wanted: range, counters: _Counters) -> Iterator[tuple[int, Sample]]:
        """The samples with global indices in ``wanted``; those a damaged shard does not deliver are
        counted as bad (the ``info.json`` counts say how many there should be)."""
        shard_start = 0
        for url, count in zip(self.source.urls, self.source.counts):
            shard = range(shard_start, shard_start + count)
            shard_start += count
            mine = range(max(shard.start, wanted.start), min(shard.stop, wanted.stop))
            if not mine:
                continue
            delivered, broken = 0, None
            try:
                for index, sample in enumerate(iter_shard_samples(url), start=shard.start):
                    if index >= mine.stop:
                        break
                    if index >= mine.start:
                        delivered += 1
                        yield index, sample
            except CorruptShardError as exc:
                broken = str(exc)
            if delivered < len(mine):
                counters.shard_short(url, delivered, len(mine), broken)


class EvalLoader:
    """This rank's eval batches: every sample of the dataset lands on exactly one rank, once."""

    def __init__(self, stream: _EvalStream, *, num_workers: int, pin_memory: bool, return_keys: bool):
        self._stream, self._num_workers, self._pin_memory, self._return_keys = stream, num_workers, pin_memory, return_keys
        self._bad: dict[int, int] = {}

    def __len__(self) -> int:
        return self._stream.num_batches

    @property
    def num_samples(self) -> int:
        """Samples assigned to this rank (``info.json`` counts; bad samples are then skipped)."""
        return len(self._stream.samples)

    @property
    def bad_samples(self) -> int:
        """Bad samples skipped in the current or last pass (undecodable, or missing from a damaged shard)."""
        return sum(self._bad.values())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        self._bad = {}
        loader = DataLoader(self._stream, batch_size=None, num_workers=self._num_workers, pin_memory=self._pin_memory,
                            worker_init_fn=leave_preemption_to_the_parent)
        with preemption_signals_held():
            batches = iter(loader)
        for images, targets, meta in batches:
            self._bad[meta["worker"]] = meta["bad"]
            if not meta["keys"]:  # a worker's closing bad-sample count, no samples
                continue
            yield (images, targets, meta["keys"]) if self._return_keys else (images, targets)


def build_eval_loader(
    urls: str | Sequence[str],
    *,
    batch_size: int,
    img_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    crop_pct: float = 0.875,
    crop_mode: str = "center",
    interpolation: str = "bicubic",
    num_classes: int | None = None,
    pin_memory: bool = False,
    return_keys: bool = False,
) -> EvalLoader:
    """Build this rank's eval loader: resize + center crop, each sample exactly once across ranks.

    ``crop_mode="center"`` resizes the shorter side to ``img_size / crop_pct``; ``"squash"`` warps
    the image to a square of that side (with ``crop_pct=1``: the authors' evaluation at >= 384).

    Ranks get contiguous ranges of ``total // world_size`` or one more samples (in shard order,
    counts from ``info.json``), so batch counts may differ by one between ranks: sum correct
    predictions and all-reduce once at the end. The last batch of a rank may be short.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    source = resolve_shard_set(urls, require_counts=True)
    transform = create_transform(
        img_size, is_training=False, crop_pct=crop_pct, crop_mode=crop_mode, interpolation=interpolation,
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD
    )
    stream = _EvalStream(
        source,
        transform=transform,
        num_classes=num_classes if num_classes is not None else (len(source.classes) if source.classes else None),
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        workers=max(1, num_workers),
    )
    return EvalLoader(stream, num_workers=num_workers, pin_memory=pin_memory, return_keys=return_keys)
