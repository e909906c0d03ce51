"""The time-series task's loaders over the authors' windows (:func:`~.data.window`): resumable shuffled training
batches (no randomness per window, so resume is exact with any number of loader workers) and an evaluation split
scored once over ranks.

A batch is ``(Windows(x (B, inputs, D), x_marks (B, inputs, 4), y_marks (B, label + horizon, 4)), y (B, horizon,
D))``: the input hours, their time features, the decoder's hours' time features, and the hours to forecast. A
window holding a non-finite value (a gap in a station's record) is skipped and counted (``bad_samples``), named
in a warning, never trained on or scored."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from shards.indexed import EvaluationShare, ShuffledBatches

from .data import SeriesSplit, time_features, window, window_count

__all__ = ["EvalLoader", "TrainLoader", "Windows", "WindowSet"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Windows:
    """A batch of model inputs: the windows, their time features and the decoder's time features."""

    x: torch.Tensor
    x_marks: torch.Tensor
    y_marks: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index) -> "Windows":
        return Windows(self.x[index], self.x_marks[index], self.y_marks[index])

    def to(self, device: torch.device) -> "Windows":
        return Windows(*(t.to(device, non_blocking=True) for t in (self.x, self.x_marks, self.y_marks)))


class WindowSet(Dataset):
    """Window ``i`` of a split: ``((x, x_marks, y_marks), y)`` as float32 tensors, or None when it holds a
    non-finite value. ``finite[i]`` says which windows are whole."""

    def __init__(self, split: SeriesSplit, inputs: int, label: int, horizon: int, where: str):
        self.split, self.inputs, self.label, self.horizon, self.where = split, inputs, label, horizon, where
        self.marks = time_features(split.times)
        span = inputs + horizon  # rows i .. i + span - 1 hold the window's input and its forecast hours
        count = window_count(len(split), inputs, horizon)
        bad_rows = np.concatenate([[0], np.cumsum(~np.isfinite(split.values).all(axis=1))])
        self.finite = (bad_rows[span:span + count] - bad_rows[:count]) == 0
        if count and not self.finite.all():
            _logger.warning("%s: %d of %d windows hold non-finite values and are skipped", where,
                            int((~self.finite).sum()), count)

    def __len__(self) -> int:
        return len(self.finite)

    def __getitem__(self, index: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor] | None:
        if not self.finite[index]:
            return None
        x, y = window(self.split.values, index, self.inputs, self.label, self.horizon)
        x_marks, y_marks = window(self.marks, index, self.inputs, self.label, self.horizon)
        tensors = (torch.from_numpy(np.ascontiguousarray(a)) for a in (x, x_marks, y_marks))
        return tuple(tensors), torch.from_numpy(np.ascontiguousarray(y[self.label:]))


class _TrainSamples(Dataset):
    def __init__(self, windows: WindowSet):
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, item: tuple[int, int]):
        _, index = item
        for attempt in range(len(self)):  # a window with a gap is replaced by the next whole one, and counted
            sample = self.windows[(index + attempt) % len(self)]
            if sample is not None:
                return sample[0], sample[1], attempt
        raise RuntimeError(f"{self.windows.where}: no window without non-finite values")


def _collate_train(samples: list) -> tuple[Windows, torch.Tensor, int]:
    inputs = Windows(*(torch.stack([s[0][i] for s in samples]) for i in range(3)))
    return inputs, torch.stack([s[1] for s in samples]), sum(s[2] for s in samples)


class TrainLoader(ShuffledBatches):
    """This rank's training batches of windows, every rank the same number per epoch, resumable mid-epoch."""

    name = "Global Temp / Wind"
    count_key = "windows"

    def __init__(self, windows: WindowSet, root: str, *, batch_size: int, rank: int, world_size: int,
                 num_workers: int, seed: int):
        self._shuffled(_TrainSamples(windows), _collate_train, root=root, size=len(windows),
                       described=f"{windows.where}: {len(windows)} training windows", per_batch=batch_size,
                       batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers, seed=seed)


class _EvalSamples(Dataset):
    def __init__(self, windows: WindowSet, indices: range):
        self.windows, self.indices = windows, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int):
        return self.windows[self.indices[item]]


class EvalLoader(EvaluationShare):
    """This rank's share of a split's windows (``rank::world``: every window scored once) in batches of
    ``(Windows, y)``; ``num_samples``, ``bad_samples`` and ``description`` as the trainer expects."""

    def __init__(self, windows: WindowSet, *, batch_size: int, rank: int, world_size: int, num_workers: int):
        self.description = f"{windows.where} ({len(windows)} windows)"
        self._share(_EvalSamples(windows, range(rank, len(windows), world_size)), batch_size=batch_size,
                    num_workers=num_workers)

    def _wrap(self, inputs) -> Windows:
        return Windows(*inputs)
