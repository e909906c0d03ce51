"""Decode + augment throughput of the train pipeline, to size ``num_workers``."""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .loader import AugmentConfig, build_train_loader


@dataclass(frozen=True)
class BenchResult:
    """Images per second of one worker process and of ``num_workers`` workers together."""

    per_worker: float
    total: float
    num_workers: int
    img_size: int
    batch_size: int

    def workers_for(self, images_per_second: float) -> int:
        """Workers needed (per rank) to feed ``images_per_second``, from the single-worker rate."""
        return max(1, math.ceil(images_per_second / self.per_worker))


def _images_per_second(batches: Iterator, warmup: int, count: int, batch_size: int) -> float:
    for _ in range(warmup):  # start-up: worker processes, shuffle buffer fill, first batch of each worker
        next(batches)
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    return count * batch_size / (time.perf_counter() - start)


def bench(
    url: str,
    *,
    img_size: int = 224,
    batch_size: int = 32,
    num_workers: int = 2,
    batches: int = 30,
    augment: AugmentConfig | None = None,
    shuffle_buffer: int = 500,
) -> BenchResult:
    """Time the train pipeline (read, decode, augment, batch; no mixup) on ``url``, in-process and with ``num_workers`` workers."""
    if num_workers < 1 or batches < 1:
        raise ValueError(f"need num_workers >= 1 and batches >= 1, got {num_workers} and {batches}")

    def loader(workers: int) -> Iterator:
        samples = (batches + 2 * workers + 2) * batch_size
        return iter(
            build_train_loader(
                url, batch_size=batch_size, img_size=img_size, num_workers=workers, samples_per_epoch=samples,
                augment=augment, shuffle_buffer=shuffle_buffer,
            )
        )

    per_worker = _images_per_second(loader(0), 1, max(1, batches // num_workers), batch_size)
    total = _images_per_second(loader(num_workers), 2 * num_workers, batches, batch_size)
    return BenchResult(per_worker, total, num_workers, img_size, batch_size)
