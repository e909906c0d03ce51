"""Loader throughput.

``bench``: decode + augment images/s of the train pipeline in one process and with workers (to
size ``num_workers``). ``compare``: this project's reader beside timm's WebDataset reader
(``timm.data.create_dataset('wds/...')`` + ``create_loader``) and a plain OpenCLIP-style
``webdataset`` pipeline with timm's transform, on the same shards and augmentation, in images
per CPU-second of loader work (the training process and its loader workers together). Each
trial runs in a fresh process; rounds interleave the readers; medians are reported.

    python -m shards bench URL --compare timm,webdataset --img-size 224 --workers 1 [--mixup]
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .image import AugmentConfig, MixupConfig, timm_mixup
from .loader import build_train_loader

__all__ = ["BenchResult", "READERS", "bench", "compare", "seeding_overhead_us", "trial"]

READERS = ("project", "timm", "webdataset")


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


# ----------------------------------------------------------------------------- side by side


def _loader_cpu_seconds() -> float:
    """User + system CPU seconds of this process and every live descendant (the loader workers)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def _project_batches(url: str, img_size: int, batch_size: int, num_workers: int, samples: int, mixup: bool) -> Iterator:
    loader = build_train_loader(url, batch_size=batch_size, img_size=img_size, num_workers=num_workers,
                                samples_per_epoch=samples, augment=AugmentConfig(),
                                mixup=MixupConfig() if mixup else None, num_classes=_num_classes(url) if mixup else None)
    return iter(loader)


def _num_classes(url: str) -> int:
    from .info import resolve_shard_set

    classes = resolve_shard_set(url, require_counts=True).classes
    if not classes:
        raise ValueError(f"--mixup needs the class list of {url} (info.json has none)")
    return len(classes)


def _mixed(batches: Iterator, url: str) -> Iterator:
    """timm's Mixup/CutMix (``MixupConfig()``'s settings) on a peer's batches, in the consuming process as timm's train loop does."""
    import torch

    mixup = timm_mixup(MixupConfig(), _num_classes(url))
    for images, targets in batches:
        yield mixup(images, torch.as_tensor(targets))


def _shard_list(url: str) -> tuple[list[str], int]:
    from .info import resolve_shard_set

    shard_set = resolve_shard_set(url, require_counts=True)
    return list(shard_set.urls), shard_set.total


def _timm_batches(url: str, img_size: int, batch_size: int, num_workers: int, samples: int, mixup: bool) -> Iterator:
    """timm's own WebDataset reader and loader, with timm's train transform for the same augmentation."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_dataset, create_loader

    from .image import fix_posterize

    urls, _ = _shard_list(url)
    root = os.path.dirname(urls[0])
    split = "::".join(os.path.basename(u) for u in urls) + f"|{samples}"
    dataset = create_dataset("wds/bench", root=root, split=split, is_training=True, batch_size=batch_size, seed=0)
    augment = AugmentConfig()
    loader = create_loader(
        dataset, input_size=(3, img_size, img_size), batch_size=batch_size, is_training=True, use_prefetcher=False,
        scale=augment.scale, ratio=augment.ratio, hflip=augment.hflip, color_jitter=augment.color_jitter,
        auto_augment=augment.auto_augment, interpolation=augment.interpolation, re_prob=augment.reprob,
        re_mode=augment.remode, re_count=augment.recount, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        num_workers=num_workers, persistent_workers=False)
    fix_posterize(dataset.transform)  # timm 1.0.31 + Pillow 13: posterize(bits=0) raises, about 5 in 3000 calls
    return _mixed(iter(loader), url) if mixup else iter(loader)


def _webdataset_batches(url: str, img_size: int, batch_size: int, num_workers: int, samples: int, mixup: bool) -> Iterator:
    """A plain OpenCLIP-style webdataset pipeline with timm's train transform."""
    import webdataset as wds

    from .image import timm_train_transform

    urls, _ = _shard_list(url)
    transform = timm_train_transform(img_size, AugmentConfig())
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=0),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(1000),
        wds.decode("pilrgb", handler=wds.warn_and_continue),
        wds.to_tuple("jpg", "cls"),
        wds.map_tuple(transform, int),
        wds.batched(batch_size, partial=False),
    )
    batches = iter(wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers))
    return _mixed(batches, url) if mixup else batches


_READER_BATCHES = {"project": _project_batches, "timm": _timm_batches, "webdataset": _webdataset_batches}


def trial(reader: str, url: str, *, img_size: int, batch_size: int, num_workers: int, batches: int,
          warmup: int, mixup: bool = False) -> dict:
    """One reader timed in this process: images per CPU-second (all loader processes) and per second."""
    if reader not in _READER_BATCHES:
        raise ValueError(f"reader must be one of {READERS}, got {reader!r}")
    samples = (batches + warmup + 2 * max(1, num_workers)) * batch_size * 2
    iterator = _READER_BATCHES[reader](url, img_size, batch_size, num_workers, samples, mixup)
    for _ in range(warmup):
        next(iterator)
    cpu_start, wall_start = _loader_cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        images = next(iterator)[0]
    cpu, wall = _loader_cpu_seconds() - cpu_start, time.perf_counter() - wall_start
    shape = tuple(images.shape)
    if shape[1:] != (3, img_size, img_size):
        raise RuntimeError(f"{reader} gave batches of shape {shape}")
    count = batches * batch_size
    return {"reader": reader, "images": count, "cpu_s": cpu, "wall_s": wall, "images_per_cpu_s": count / cpu,
            "images_per_s": count / wall}


def compare(url: str, *, readers: tuple[str, ...] = READERS, img_size: int = 224, batch_size: int = 64,
            num_workers: int = 1, batches: int = 20, warmup: int = 3, rounds: int = 3, mixup: bool = False) -> dict:
    """Every reader in ``rounds`` interleaved rounds, each trial a fresh process; medians and ratios to timm's.
    ``mixup``: timm's Mixup/CutMix on every reader's batches, in the consuming process."""
    unknown = [r for r in readers if r not in READERS]
    if unknown:
        raise ValueError(f"unknown reader {unknown[0]!r}; choose from {', '.join(READERS)}")
    settings = dict(img_size=img_size, batch_size=batch_size, num_workers=num_workers, batches=batches, warmup=warmup,
                    mixup=mixup)
    trials: dict[str, list[dict]] = {reader: [] for reader in readers}
    for _ in range(rounds):
        for reader in readers:
            command = [sys.executable, "-m", "shards.bench", json.dumps({"reader": reader, "url": url, **settings})]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{reader} trial failed:\n{result.stderr[-3000:]}")
            trials[reader].append(json.loads(result.stdout.strip().splitlines()[-1]))
    summary = {reader: {"images_per_cpu_s": statistics.median(t["images_per_cpu_s"] for t in runs),
                        "images_per_s": statistics.median(t["images_per_s"] for t in runs), "trials": runs}
               for reader, runs in trials.items()}
    if "timm" in summary:
        for reader, entry in summary.items():
            entry["vs_timm"] = entry["images_per_cpu_s"] / summary["timm"]["images_per_cpu_s"]
    return {"url": url, "rounds": rounds, **settings, "readers": summary,
            "seeding_us_per_sample": seeding_overhead_us()}


def seeding_overhead_us(calls: int = 2000) -> dict[str, float]:
    """Microseconds per sample to seed the transform RNGs: the loader's way, and with ``torch.manual_seed``."""
    import random

    import numpy as np
    import torch

    from .seeding import seed_global_rngs

    def per_call(seed_fn) -> float:
        start = time.perf_counter()
        for i in range(calls):
            seed_fn(i)
        return (time.perf_counter() - start) / calls * 1e6

    def full(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    return {"loader": per_call(seed_global_rngs), "torch.manual_seed": per_call(full)}


def format_comparison(report: dict) -> str:
    """The comparison as a small table."""
    lines = [f"{report['url']}: {report['img_size']} px, batch {report['batch_size']}, {report['num_workers']} "
             f"worker(s), {report['batches']} batches per trial, median of {report['rounds']} rounds"
             + (", mixup/cutmix on" if report.get("mixup") else ""),
             f"{'reader':12s} {'img/CPU-s':>10s} {'img/s':>8s} {'vs timm':>8s}"]
    for reader, entry in report["readers"].items():
        ratio = f"{entry['vs_timm']:.2f}x" if "vs_timm" in entry else "-"
        lines.append(f"{reader:12s} {entry['images_per_cpu_s']:10.1f} {entry['images_per_s']:8.1f} {ratio:>8s}")
    seeding = report["seeding_us_per_sample"]
    lines.append(f"seeding the transform RNGs per sample: {seeding['loader']:.1f} us "
                 f"(torch.manual_seed instead: {seeding['torch.manual_seed']:.1f} us)")
    return "\n".join(lines)


if __name__ == "__main__":  # one trial, as ``compare`` runs it: JSON settings in, a JSON line out
    options = json.loads(sys.argv[1])
    print(json.dumps(trial(options.pop("reader"), options.pop("url"), **options)))
