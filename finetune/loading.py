"""What the dense tasks' training loaders share: seeded batches per epoch, iteration through a DataLoader with
the preemption signals left to the trainer, and the exact-resume state (``shards.TrainLoader``'s contract)."""
from __future__ import annotations

from typing import Any, Callable, Iterator

from torch.utils.data import DataLoader, Dataset

from shards.loader import leave_preemption_to_the_parent, preemption_signals_held

__all__ = ["ResumableBatches", "worker_iterator"]

STATE_VERSION = 1


def worker_iterator(dataset: Dataset, *, num_workers: int, **loader_options) -> Iterator:
    """An iterator over ``DataLoader(dataset, ...)`` whose workers leave SIGTERM/SIGUSR1 to the trainer (they are
    started with the signals held, and ignore them)."""
    loader = DataLoader(dataset, num_workers=num_workers, persistent_workers=False,
                        worker_init_fn=leave_preemption_to_the_parent if num_workers else None, **loader_options)
    with preemption_signals_held():
        return iter(loader)


class ResumableBatches:
    """Base of a training loader whose epoch is a seeded list of index batches. Subclasses set ``name`` (for
    messages), ``_samples`` (a dataset indexed by ``(epoch, index)``, returning what ``_collate`` takes, whose
    last output is the count of skipped samples), ``batch_size``, ``rank``, ``world_size``, ``num_workers``,
    ``seed``, and implement ``__len__``, ``_all_batches()`` (this rank's batches of this epoch) and
    ``_identity()`` (the settings a saved position is only valid for; ``root`` is not compared)."""

    name = "loader"
    _samples: Dataset
    _collate: Callable

    def _start(self) -> None:
        self._epoch, self._batches_done, self._bad, self._epoch_chosen = 0, 0, 0, False

    @property
    def bad_samples(self) -> int:
        """Unreadable images skipped so far (each replaced by another readable one)."""
        return self._bad

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch, self._batches_done = epoch, 0
        self._epoch_chosen = True

    def _all_batches(self) -> list[list[int]]:
        raise NotImplementedError

    def _identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        if self._batches_done >= len(self) and not self._epoch_chosen:
            self._epoch, self._batches_done = self._epoch + 1, 0
        self._epoch_chosen = False
        batches = [[(self._epoch, i) for i in batch] for batch in self._all_batches()[self._batches_done:len(self)]]
        if not batches:
            return
        for *batch, skipped in worker_iterator(self._samples, num_workers=self.num_workers, batch_sampler=batches,
                                               collate_fn=self._collate):
            self._batches_done += 1
            self._bad += skipped
            yield tuple(batch)

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **self._identity(), "epoch": self._epoch,
                "batches_done": self._batches_done, "bad_samples": self._bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved position; ``ValueError`` naming a setting that differs (exact resume needs them equal)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{self.name} loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        for key, value in self._identity().items():
            if key != "root" and state.get(key) != value:
                raise ValueError(f"{self.name} loader state was saved with {key}={state.get(key)!r}, this loader has "
                                 f"{key}={value!r}: exact resume needs the same data, seed, world size and batch")
        self._epoch, self._batches_done = int(state["epoch"]), int(state["batches_done"])
        self._bad = int(state["bad_samples"])
