"""Resumable training batches over a map-style dataset (files in a folder layout, an annotation file): a seeded
list of index batches per epoch, loaded through a DataLoader whose workers leave the preemption signals to the
trainer (:mod:`shards.workers`), with the exact-resume state and epoch rules of every training loader
(:mod:`shards.resume`). The dense tasks' loaders are built on it, and so can any task whose data is not in
shards. :class:`EvaluationShare` is the evaluation side: a rank's share of a split, each sample once."""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import torch
from torch.utils.data import Dataset, default_collate

from .resume import ResumableLoader
from .seeding import epoch_order
from .workers import worker_iterator

__all__ = ["EvaluationShare", "ResumableBatches", "ShuffledBatches", "worker_iterator"]


class ResumableBatches(ResumableLoader):
    """Base of a training loader whose epoch is a seeded list of index batches. Subclasses set ``name`` (for
    messages), ``_samples`` (a dataset indexed by ``(epoch, index)``, returning what ``_collate`` takes, whose
    last output is the count of skipped samples), ``batch_size``, ``rank``, ``world_size``, ``num_workers``,
    ``seed``, and implement ``__len__``, ``_all_batches()`` (this rank's batches of this epoch) and
    ``_identity()`` (the settings a saved position is only valid for; ``root`` is not compared)."""

    name = "loader"
    resume_needs = "the same data, seed, world size and batch"
    unchecked_settings = ("root",)
    _samples: Dataset
    _collate: Callable

    def _start(self) -> None:
        super()._start()
        self._bad = 0

    @property
    def bad_samples(self) -> int:
        """Unreadable images skipped so far (each replaced by another readable one)."""
        return self._bad

    def _all_batches(self) -> list[list[int]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        if not self._begin_iteration():
            return
        batches = [[(self._epoch, i) for i in batch] for batch in self._all_batches()[self._batches_done:len(self)]]
        if not batches:
            return
        for *batch, skipped in worker_iterator(self._samples, num_workers=self.num_workers, batch_sampler=batches,
                                               collate_fn=self._collate):
            self._batches_done += 1
            self._bad += skipped
            yield tuple(batch)

    def _position(self) -> dict[str, Any]:
        return {"bad_samples": self._bad}

    def _restore(self, state: Mapping[str, Any]) -> None:
        self._bad = int(state["bad_samples"])


class ShuffledBatches(ResumableBatches):
    """A training loader whose epoch is a seeded shuffle of the dataset's indices (:func:`shards.seeding.epoch_order`)
    dealt to the ranks (``rank::world_size``) and cut into batches of ``per_batch`` indices: every rank the same
    number of batches. Subclasses call :meth:`_shuffled` from ``__init__``; ``count_key`` names the dataset's size
    in the saved identity ("images", "clips": a saved position keeps its key across versions)."""

    count_key = "samples"

    def _shuffled(self, samples: Dataset, collate: Callable, *, root: str, size: int, described: str, per_batch: int,
                  batch_size: int, rank: int, world_size: int, num_workers: int, seed: int) -> None:
        """Set up and start; ``ValueError`` naming ``described`` ("ROOT: 20 training clips") when a rank's share
        holds no batch."""
        self._samples, self._collate, self.root, self._size, self.per_batch = samples, collate, root, size, per_batch
        self.batch_size, self.rank, self.world_size, self.num_workers, self.seed = (batch_size, rank, world_size,
                                                                                    num_workers, seed)
        self._per_rank = size // world_size
        if self._per_rank < per_batch:
            raise ValueError(f"{described} give {self._per_rank} per rank, fewer than one batch of {per_batch} on "
                             f"{world_size} rank(s)")
        self._start()

    def __len__(self) -> int:
        return self._per_rank // self.per_batch

    def _all_batches(self) -> list[list[int]]:
        order = epoch_order(self._size, self.seed, self._epoch)
        mine = order[self.rank::self.world_size][:len(self) * self.per_batch].tolist()
        return [mine[b * self.per_batch:(b + 1) * self.per_batch] for b in range(len(self))]

    def _identity(self) -> dict[str, Any]:
        return {"root": self.root, self.count_key: self._size, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.batch_size}


class EvaluationShare:
    """A rank's share of an evaluation split in batches ``(inputs, labels)``: ``samples`` (a dataset of this
    rank's ``(input, label)`` samples, e.g. ``rank::world`` of the split, so every sample is scored once over the
    ranks; either part a tensor, a tuple of tensors or a number) read in order by ``num_workers`` workers; a sample
    that is None (unreadable) is left out and counted in ``bad_samples``; ``num_samples`` against the evaluator's
    count tells the trainer whether the evaluation was complete. Subclasses call :meth:`_share`, set
    ``description`` (the set, for messages) and may wrap the stacked inputs (:meth:`_wrap`)."""

    description = ""

    def _share(self, samples: Dataset, *, batch_size: int, num_workers: int) -> None:
        self._samples, self.batch_size, self.num_workers = samples, batch_size, num_workers
        self.bad_samples = 0

    @property
    def num_samples(self) -> int:
        return len(self._samples)

    def _wrap(self, inputs: torch.Tensor) -> Any:
        return inputs

    def _batch(self, samples: list[tuple[Any, Any]]) -> tuple[Any, Any]:
        """Inputs and labels stacked by ``default_collate`` (tensors stacked, tuples of tensors per position,
        integer labels as one tensor)."""
        return self._wrap(default_collate([s[0] for s in samples])), default_collate([s[1] for s in samples])

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        samples: list[tuple[Any, Any]] = []
        for sample in worker_iterator(self._samples, num_workers=self.num_workers, batch_size=None):
            if sample is None:
                self.bad_samples += 1
                continue
            samples.append(sample)
            if len(samples) == self.batch_size:
                yield self._batch(samples)
                samples = []
        if samples:
            yield self._batch(samples)
