"""Training and evaluation loaders over WebDataset shards, for any modality's sample pipeline.

Train stream (one per rank and DataLoader worker, a "slot"), built from :mod:`shards.stream`'s stages:

1. shard URLs: an endless walk over per-epoch permutations of the shard list, slot ``s`` of
   ``S`` taking every ``S``-th shard (split by node and worker; no slot ever runs dry);
2. tar -> samples (every sample a damaged shard fails to deliver against its ``info.json``
   count is a bad sample and the walk goes on; a missing shard raises naming its URL);
3. weighted mix of several sources (optional);
4. shuffle buffer seeded by (seed, epoch, slot);
5. fast-forward past samples delivered before a checkpoint (no decode);
6. the pipeline's decode (bad samples are counted and dropped);
7. batches: the pipeline writes each sample into its slot of the batch tensor (in shared memory
   when built in a worker), its random draws seeded by (seed, epoch, slot, position); a worker
   stops after its quota, so every rank yields exactly ``len(loader)`` batches.

A batch-level transform (images: Mixup/CutMix) runs where batches are delivered, seeded by
(seed, epoch, rank, batch). Images: :func:`build_train_loader` / :func:`build_eval_loader`
(:mod:`shards.image`): ``(N, 3, H, W)`` train batches with NHWC strides (``channels_last``).

The sample stream is a pure function of (seed, epoch, rank, worker, position), so:

Resume guarantee: with the same shards, seed, world size, rank, num_workers, batch size,
samples per epoch and shuffle buffer, a loader restored from ``state_dict()`` yields exactly the
batches an uninterrupted loader yields after the batches counted in the state: the same sample
keys in the same order, and bit-identical tensors and targets (mixup included) given the same
torch/timm/Pillow versions. ``load_state_dict`` refuses a state saved under other settings with
a ``ValueError`` naming the setting (:mod:`shards.resume`). The pipeline (image size,
augmentation) may change across a resume (tensors then differ, the sample order does not).
Restoring re-reads, without decoding, the part of the epoch each worker had consumed. Shards are
assumed unchanged.

Coverage: an epoch draws ``len(loader) * batch_size`` samples per rank from the slots' shard
walks; with many more shards than slots that is close to one pass over the data. With fewer
shards than slots, slots share shards (in different orders), so some samples repeat within an
epoch; equal batch counts on every rank hold either way.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .image import AugmentConfig, MixupConfig, image_eval_pipeline, image_train_pipeline, timm_mixup
from .info import ShardSet, resolve_shard_set
from .resume import ResumableLoader
from .seeding import SeedPurpose, sample_seeds, seeded_global_rngs, stream_seed
from .stream import (DamageCounts, SamplePipeline, ShardSources, batched, chain, decoded, indexed_samples, mixed,
                     numbered, shard_samples, shuffled, slot_shard_urls, split_range)
from .workers import worker_iterator

__all__ = ["EvalLoader", "TrainLoader", "build_eval_loader", "build_train_loader"]

BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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

    def __init__(self, sources: ShardSources, pipeline: SamplePipeline, *, batch_size: int, batches_per_rank: int,
                 rank: int, world_size: int, workers: int, seed: int, shuffle_buffer: int):
        self.sources, self.pipeline = sources, pipeline
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
        counters = DamageCounts(decode_errors=start.decode_errors)  # shard damage is met again while fast-forwarding
        mix_rng = random.Random(stream_seed(SeedPurpose.SOURCE_MIX, self.seed, self.epoch, slot))
        shuffle_rng = random.Random(stream_seed(SeedPurpose.SHUFFLE, self.seed, self.epoch, slot))
        per_source = [
            shard_samples(
                slot_shard_urls(source.urls, seed=self.seed, epoch=self.epoch, source_index=i, slot=slot, num_slots=num_slots),
                counters,
                len(source.urls),
                dict(zip(source.urls, source.counts)) if source.counts else None,
            )
            for i, source in enumerate(self.sources.sets)
        ]
        stream = chain(
            mixed(per_source, self.sources.weights, mix_rng),
            partial(shuffled, buffer_size=self.shuffle_buffer, rng=shuffle_rng),
            partial(numbered, start=start.samples_read),
            partial(decoded, decode=self.pipeline.decode, counters=counters),
            partial(batched, pipeline=self.pipeline, batch_size=self.batch_size, partial_last=False,
                    seed_of=sample_seeds(SeedPurpose.AUGMENT, self.seed, self.epoch, slot)),
        )
        for index, (samples_read, keys, inputs, targets) in enumerate(
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
            yield inputs, targets, meta


class TrainLoader(ResumableLoader):
    """This rank's train batches over shards: ``len()`` is the same on every rank; resumable with ``state_dict``.

    Iterating yields ``(inputs, targets)`` (``(inputs, targets, keys)`` with ``return_keys``);
    ``set_epoch`` as :class:`~shards.resume.ResumableLoader`. ``pipeline`` turns samples into
    batch slots (:class:`~shards.stream.SamplePipeline`). ``samples_per_epoch`` defaults to the
    ``info.json`` total of ``sources``; every rank yields ``samples_per_epoch // (world_size *
    batch_size)`` full batches. ``batch_transform(inputs, targets)`` (Mixup/CutMix) runs on
    every batch where it is delivered, seeded by (seed, epoch, rank, batch). ``device``: batches
    are delivered there (``non_blocking`` with ``pin_memory``).
    """

    name = "shard train"
    resume_needs = "the same shards, seed, world size, rank, num_workers, batch size, samples per epoch and shuffle buffer"

    def __init__(
        self,
        sources: ShardSources,
        pipeline: SamplePipeline,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 2000,
        batch_transform: BatchTransform | None = None,
        pin_memory: bool = False,
        return_keys: bool = False,
        device: torch.device | str | None = None,
    ):
        _check_split(rank, world_size)
        if batch_size < 1 or num_workers < 0 or shuffle_buffer < 1:
            raise ValueError(f"need batch_size >= 1, num_workers >= 0, shuffle_buffer >= 1; got {batch_size}, {num_workers}, {shuffle_buffer}")
        if samples_per_epoch is None:
            samples_per_epoch = sources.total
            if samples_per_epoch is None:
                raise ValueError("samples_per_epoch is needed: a source has no info.json with per-shard counts")
        batches_per_rank = samples_per_epoch // (world_size * batch_size)
        if batches_per_rank < 1:
            raise ValueError(
                f"samples_per_epoch={samples_per_epoch} gives no full batch of {batch_size} on each of {world_size} ranks; "
                "lower batch_size or raise samples_per_epoch"
            )
        self._stream = _TrainStream(sources, pipeline, batch_size=batch_size, batches_per_rank=batches_per_rank,
                                    rank=rank, world_size=world_size, workers=max(1, num_workers), seed=seed,
                                    shuffle_buffer=shuffle_buffer)
        self._num_workers = num_workers
        self._samples_per_epoch = samples_per_epoch
        self._batch_transform = batch_transform
        self._pin_memory = pin_memory
        self._return_keys = return_keys
        self._device = torch.device(device) if device is not None else None
        self._bad_before_epoch = 0
        self._start()

    def __len__(self) -> int:
        return self._stream.batches_per_rank

    @property
    def bad_samples(self) -> int:
        """Bad samples skipped so far (undecodable, no target, corrupt shard tails), all workers, all epochs."""
        return self._bad_before_epoch + sum(p.shard_errors + p.decode_errors for p in self._stream.positions)

    def _start_epoch(self, epoch: int) -> None:
        self._bad_before_epoch = self.bad_samples
        super()._start_epoch(epoch)
        self._stream.positions = [WorkerPosition() for _ in self._stream.positions]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if not self._begin_iteration():
            return
        stream, workers = self._stream, len(self._stream.positions)
        stream.epoch = self._epoch
        stream.first_worker = self._batches_done % workers
        batches = worker_iterator(stream, num_workers=self._num_workers, batch_size=None, pin_memory=self._pin_memory)
        for inputs, targets, meta in batches:
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
                inputs = inputs.to(self._device, non_blocking=self._pin_memory)
                targets = targets.to(self._device, non_blocking=self._pin_memory)
            if self._batch_transform is not None:
                with seeded_global_rngs(stream_seed(SeedPurpose.MIXUP, stream.seed, self._epoch, stream.rank, index)):
                    inputs, targets = self._batch_transform(inputs, targets)
            yield (inputs, targets, meta["keys"]) if self._return_keys else (inputs, targets)
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
            "sources": stream.sources.signature,
        }

    def _position(self) -> dict[str, Any]:
        return {
            "bad_samples_before_epoch": self._bad_before_epoch,
            "workers": [[p.batches, p.samples_read, p.shard_errors, p.decode_errors] for p in self._stream.positions],
        }

    def _restore(self, state: Mapping[str, Any]) -> None:
        self._bad_before_epoch = int(state["bad_samples_before_epoch"])
        self._stream.positions = [WorkerPosition(*map(int, entry)) for entry in state["workers"]]


def _check_split(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")


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
    """Build this rank's image train loader over shards (see the module docstring for the stages).

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
    _check_split(rank, world_size)
    sources = ShardSources.resolve(urls, weights, require_counts=samples_per_epoch is None)
    if num_classes is None:
        num_classes = len(sources.classes) if sources.classes else None
    mixup_fn = None
    if mixup is not None:
        if num_classes is None:
            raise ValueError("mixup needs num_classes (no info.json with classes found next to the shards)")
        if batch_size % 2:
            raise ValueError(f"mixup needs an even batch_size, got {batch_size}")
        mixup_fn = timm_mixup(mixup, num_classes)
    return TrainLoader(
        sources, image_train_pipeline(img_size, augment or AugmentConfig(), num_classes), batch_size=batch_size,
        rank=rank, world_size=world_size, num_workers=num_workers, seed=seed, samples_per_epoch=samples_per_epoch,
        shuffle_buffer=shuffle_buffer, batch_transform=mixup_fn, pin_memory=pin_memory, return_keys=return_keys,
        device=device,
    )


# ----------------------------------------------------------------------------- eval


class _EvalStream(IterableDataset):
    """Yields this rank's eval batches; each worker reads a contiguous, batch-aligned range of samples."""

    def __init__(self, source: ShardSet, pipeline: SamplePipeline, *, batch_size: int, rank: int, world_size: int,
                 workers: int):
        self.source, self.pipeline = source, pipeline
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
        counters = DamageCounts()
        stream = chain(
            indexed_samples(self.source, self.worker_range(worker), counters),
            partial(decoded, decode=self.pipeline.decode, counters=counters),
            partial(batched, pipeline=self.pipeline, batch_size=self.batch_size, partial_last=True),
        )
        bad = 0
        for _, keys, inputs, targets in stream:
            bad = counters.total
            yield inputs, targets, {"keys": keys, "worker": worker, "bad": bad}
        if counters.total != bad:  # found after the last batch: report it
            yield torch.empty(0), torch.empty(0, dtype=torch.int64), {"keys": [], "worker": worker, "bad": counters.total}


class EvalLoader:
    """This rank's eval batches over shards: every sample of the dataset lands on exactly one rank, once.

    Ranks get contiguous ranges of ``total // world_size`` or one more samples (in shard order,
    counts from ``info.json``), so batch counts may differ by one between ranks: sum correct
    predictions and all-reduce once at the end. The last batch of a rank may be short.
    """

    def __init__(self, source: ShardSet, pipeline: SamplePipeline, *, batch_size: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 2, pin_memory: bool = False, return_keys: bool = False):
        _check_split(rank, world_size)
        if source.counts is None:
            raise ValueError(f"evaluation needs info.json sample counts next to the shards ({source.urls[0]})")
        self._stream = _EvalStream(source, pipeline, batch_size=batch_size, rank=rank, world_size=world_size,
                                   workers=max(1, num_workers))
        self._num_workers, self._pin_memory, self._return_keys = num_workers, pin_memory, return_keys
        self._bad: dict[int, int] = {}
        first, last = source.urls[0], source.urls[-1]
        self.description = first if first == last else f"the {len(source.urls)} shards {first} ... {last}"
        """What the set is, for messages (an incomplete evaluation names it; ``python -m shards verify`` checks it)."""

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
        batches = worker_iterator(self._stream, num_workers=self._num_workers, batch_size=None,
                                  pin_memory=self._pin_memory)
        for inputs, targets, meta in batches:
            self._bad[meta["worker"]] = meta["bad"]
            if not meta["keys"]:  # a worker's closing bad-sample count, no samples
                continue
            yield (inputs, targets, meta["keys"]) if self._return_keys else (inputs, targets)


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
    """Build this rank's image eval loader: resize + center crop, each sample exactly once across ranks.

    ``crop_mode="center"`` resizes the shorter side to ``img_size / crop_pct``; ``"squash"`` warps
    the image to a square of that side (with ``crop_pct=1``: the authors' evaluation at >= 384).
    Ranks and batches as :class:`EvalLoader`.
    """
    _check_split(rank, world_size)
    source = resolve_shard_set(urls, require_counts=True)
    if num_classes is None:
        num_classes = len(source.classes) if source.classes else None
    pipeline = image_eval_pipeline(img_size, crop_pct=crop_pct, crop_mode=crop_mode, interpolation=interpolation,
                                   num_classes=num_classes)
    return EvalLoader(source, pipeline, batch_size=batch_size, rank=rank, world_size=world_size,
                      num_workers=num_workers, pin_memory=pin_memory, return_keys=return_keys)
