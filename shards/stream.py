"""Modality-free stages of the shard streams: what a sample holds is the sample pipeline's business.

Train stream of one slot (a rank's DataLoader worker): :func:`slot_shard_urls` -> :func:`shard_samples`
(one per source) -> :func:`mixed` -> :func:`shuffled` -> :func:`numbered` -> :func:`decoded` -> :func:`batched`.
Eval stream: :func:`indexed_samples` -> :func:`decoded` -> :func:`batched`. Bad samples (undecodable,
unlabelled, lost from a damaged shard) are counted in :class:`DamageCounts` and skipped.
"""
from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import reduce
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from .info import ShardSet, resolve_shard_set
from .samples import BadSampleError, CorruptShardError, Sample, iter_shard_samples
from .seeding import SeedPurpose, seeded_global_rngs, stream_seed

__all__ = ["DamageCounts", "SamplePipeline", "ShardSources", "batched", "chain", "decoded", "indexed_samples", "mixed",
           "new_batch", "numbered", "shard_samples", "shuffled", "slot_shard_urls", "split_range"]

_logger = logging.getLogger(__name__)

MAX_BAD_IN_A_ROW = 1000
WARN_FIRST = 10
"""Bad samples of a worker logged at WARNING; later ones at DEBUG (damaged shards: always WARNING)."""


@dataclass(frozen=True, slots=True)
class SamplePipeline:
    """How one modality's shard samples become batches.

    ``decode(sample)`` returns ``(data, target)`` with an integer target, or raises
    :class:`~shards.samples.BadSampleError` naming the shard and key (the sample is counted and
    skipped). ``into(slot, data)`` writes the (augmented) data into its slot of a batch tensor of
    ``(N, *sample_shape)`` ``dtype`` (NHWC strides with ``channels_last``), allocated once per
    batch, in shared memory inside a loader worker. In training, ``into``'s random draws come from
    Python's, NumPy's and torch's global RNGs, seeded per sample: resume is exact.
    """

    decode: Callable[[Sample], tuple[Any, int]]
    into: Callable[[torch.Tensor, Any], None]
    sample_shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.channels_last and len(self.sample_shape) != 3:
            raise ValueError(f"channels_last needs a (C, H, W) sample_shape, got {self.sample_shape}")


@dataclass(frozen=True, slots=True)
class ShardSources:
    """What a train stream reads: one or several shard sets, mixed with ``weights``."""

    sets: tuple[ShardSet, ...]
    weights: tuple[float, ...]

    @classmethod
    def resolve(cls, urls: str | Sequence[str], weights: Sequence[float] | None = None, *,
                require_counts: bool = True) -> ShardSources:
        """``urls``: a dataset directory, a brace pattern or a list of shard URLs; with ``weights``, several such
        sources separated by ``::`` (or as a list). ``require_counts``: fail without ``info.json`` counts."""
        if weights is None:
            return cls((resolve_shard_set(urls, require_counts=require_counts),), (1.0,))
        entries = urls.split("::") if isinstance(urls, str) else list(urls)
        if len(entries) != len(weights):
            raise ValueError(f"weights has {len(weights)} entries but urls names {len(entries)} sources")
        if any(w <= 0 for w in weights):
            raise ValueError(f"source weights must be > 0, got {list(weights)}")
        return cls(tuple(resolve_shard_set(entry, require_counts=require_counts) for entry in entries), tuple(weights))

    @property
    def total(self) -> int | None:
        """Samples in all sources (``info.json`` counts), ``None`` where a source has none."""
        totals = [source.total for source in self.sets]
        return None if None in totals else sum(totals)

    @property
    def classes(self) -> tuple[str, ...] | None:
        """The class names of the first source that has them."""
        return next((source.classes for source in self.sets if source.classes), None)

    @property
    def signature(self) -> list[str]:
        """``weight:url,url,...`` per source: what a saved stream position is only valid for."""
        return [f"{weight}:{','.join(source.urls)}" for weight, source in zip(self.weights, self.sets)]


class DamageCounts:
    """Bad samples one worker met (sent to the main process with every batch) and their log lines.

    A damaged shard (samples lost against its ``info.json`` count, or a stream that breaks off) is
    logged at WARNING every time, naming the shard and the samples lost: it is the largest loss.
    Single bad samples are logged at WARNING for the first ``WARN_FIRST`` of a worker, then at DEBUG.
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
        """One sample that does not decode or lacks its target."""
        self.decode_errors += 1
        if self.decode_errors <= WARN_FIRST:
            later = "; later bad samples of this worker are logged at DEBUG" if self.decode_errors == WARN_FIRST else ""
            _logger.warning("skipping bad data (%d so far in this worker): %s%s", self.total, message, later)
        else:
            _logger.debug("skipping bad data (%d so far in this worker): %s", self.total, message)


def split_range(total: int, parts: int, index: int) -> range:
    """The ``index``-th of ``parts`` contiguous, near-equal pieces of ``range(total)``."""
    return range(total * index // parts, total * (index + 1) // parts)


def slot_shard_urls(urls: Sequence[str], *, seed: int, epoch: int, source_index: int, slot: int, num_slots: int) -> Iterator[str]:
    """Endless shard URLs for one slot: every ``num_slots``-th entry of successive per-epoch permutations."""
    position, cached_pass, permutation = slot, -1, np.arange(0)
    while True:
        shard_pass, index = divmod(position, len(urls))
        if shard_pass != cached_pass:
            order_seed = stream_seed(SeedPurpose.SHARD_ORDER, seed, epoch, source_index, shard_pass)
            permutation = np.random.default_rng(order_seed).permutation(len(urls))
            cached_pass = shard_pass
        yield urls[permutation[index]]
        position += num_slots


def shard_samples(urls: Iterator[str], counters: DamageCounts, num_shards: int,
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


def indexed_samples(source: ShardSet, wanted: range, counters: DamageCounts) -> Iterator[tuple[int, Sample]]:
    """``(index, sample)`` for the samples of ``source`` with global indices (shard order, ``info.json``
    counts) in ``wanted``; those a damaged shard does not deliver are counted as bad."""
    shard_start = 0
    for url, count in zip(source.urls, source.counts):
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


def decoded(samples: Iterator[tuple[int, Sample]], *, decode: Callable[[Sample], tuple[Any, int]],
            counters: DamageCounts) -> Iterator[tuple[int, str, Any, int]]:
    """``(position, key, data, target)`` from ``decode``; bad samples are counted and dropped.

    ``MAX_BAD_IN_A_ROW`` of them in a row raise, so a stream of unusable data fails instead of
    searching forever.
    """
    bad_in_a_row = 0
    for position, sample in samples:
        try:
            data, target = decode(sample)
        except BadSampleError as exc:
            counters.bad_sample(str(exc))
            bad_in_a_row += 1
            if bad_in_a_row >= MAX_BAD_IN_A_ROW:
                raise RuntimeError(f"{bad_in_a_row} bad samples in a row, the data looks unusable; last: {exc}") from exc
            continue
        bad_in_a_row = 0
        yield position, str(sample["__key__"]), data, target


def new_batch(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
    """An uninitialised batch tensor (NHWC strides with ``channels_last``); in a DataLoader worker, in
    shared memory (as ``default_collate`` allocates), so handing it to the training process copies nothing."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype, memory_format=memory_format)
    strides = torch.empty(shape, dtype=dtype, device="meta", memory_format=memory_format).stride()
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape, strides)


def batched(items: Iterator[tuple[int, str, Any, int]], *, pipeline: SamplePipeline, batch_size: int,
            partial_last: bool, seed_of: Callable[[int], int] | None = None
            ) -> Iterator[tuple[int, list[str], torch.Tensor, torch.Tensor]]:
    """Batches of ``batch_size`` items, each written by ``pipeline.into`` straight into its slot of the
    batch tensor; yields ``(samples read so far, keys, inputs, targets)``.

    ``seed_of(position)`` seeds the global RNGs for each sample's ``into`` (restored afterwards in the
    training process); ``partial_last`` keeps a short last batch.
    """
    restore = get_worker_info() is None  # a worker's global RNGs serve nothing else
    while True:
        chunk = list(islice(items, batch_size))
        if not chunk or (len(chunk) < batch_size and not partial_last):
            return
        inputs = new_batch((len(chunk), *pipeline.sample_shape), pipeline.dtype, pipeline.channels_last)
        for slot, (position, _, data, _) in zip(inputs, chunk):
            if seed_of is None:
                pipeline.into(slot, data)
            else:
                with seeded_global_rngs(seed_of(position), restore=restore):
                    pipeline.into(slot, data)
        targets = torch.tensor([target for _, _, _, target in chunk], dtype=torch.int64)
        yield chunk[-1][0] + 1, [key for _, key, _, _ in chunk], inputs, targets


def chain(source: Iterator, *stages: Callable[[Iterator], Iterator]) -> Iterator:
    """Feed ``source`` through ``stages`` in order."""
    return reduce(lambda stream, stage: stage(stream), stages, source)
