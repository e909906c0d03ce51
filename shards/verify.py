"""Verifying written shards against their ``info.json``: every shard opens, counts and checksums match,
samples decode."""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import posixpath
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .info import ShardReadError, join_url, read_info
from .samples import BadSampleError, CorruptShardError, decode_sample, iter_shard_samples

_logger = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    """Outcome of ``verify_dataset``: ``problems`` lists ``{"shard", "key", "problem"}`` entries."""

    url: str
    shards: int = 0
    samples: int = 0
    decoded: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no shard is missing or corrupt, every count matches and every checked sample is good."""
        return not self.problems


@dataclass(frozen=True)
class _ShardCheck:
    url: str
    expected: int
    sha256: str | None
    num_classes: int
    sample_fraction: float
    seed: int


def _selected(key: str, fraction: float, seed: int) -> bool:
    return fraction >= 1.0 or zlib.crc32(f"{seed}:{key}".encode()) < fraction * 2**32


def _check_shard(check: _ShardCheck) -> tuple[int, int, list[dict[str, Any]]]:
    """``(samples, decoded, problems)`` for one shard."""
    name = posixpath.basename(check.url)
    problems: list[dict[str, Any]] = []
    samples = decoded = 0

    def problem(key: str | None, text: str) -> None:
        problems.append({"shard": name, "key": key, "problem": text})

    digest = hashlib.sha256()
    try:
        for sample in iter_shard_samples(check.url, digest=digest):
            samples += 1
            key = str(sample["__key__"])
            if "json" in sample:
                try:
                    json.loads(sample["json"])
                except ValueError as exc:
                    problem(key, f"json does not parse: {exc}")
            try:
                if _selected(key, check.sample_fraction, check.seed):
                    decode_sample(sample, check.num_classes)
                    decoded += 1
            except BadSampleError as exc:
                problem(key, str(exc).split(": ", 1)[-1])
    except ShardReadError as exc:
        problem(None, str(exc))
        return samples, decoded, problems
    except CorruptShardError as exc:
        problem(None, str(exc))
    if samples != check.expected:
        problem(None, f"has {samples} samples, info.json says {check.expected}")
    elif check.sha256 is not None and digest.hexdigest() != check.sha256:
        problem(None, f"sha256 {digest.hexdigest()} differs from info.json's {check.sha256}: "
                      "the file changed after it was written (rewrite it: rerun the same `shards write`)")
    return samples, decoded, problems


def verify_dataset(
    url: str, *, sample_fraction: float = 1.0, workers: int = 1, seed: int = 0, progress: bool = True
) -> VerifyReport:
    """Open every shard listed in ``url``'s ``info.json``, decode every image (or a ``sample_fraction`` of them, chosen by key) and compare counts."""
    if not 0.0 < sample_fraction <= 1.0:
        raise ValueError(f"sample_fraction must be in (0, 1], got {sample_fraction}")
    info = read_info(url)
    directory = url if not url.endswith(".json") else url.rsplit("/", 1)[0]
    checks = [
        _ShardCheck(join_url(directory, shard["name"]), shard["count"], shard.get("sha256"), len(info["classes"]),
                    sample_fraction, seed)
        for shard in info["shards"]
    ]
    report = VerifyReport(url, shards=len(checks))
    from tqdm import tqdm

    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 and not url.startswith("memory://") else None
    results: Iterator = pool.imap_unordered(_check_shard, checks) if pool else map(_check_shard, checks)
    try:
        for samples, decoded, problems in tqdm(results, total=len(checks), unit="shard", desc="verify", disable=not progress):
            report.samples += samples
            report.decoded += decoded
            report.problems.extend(problems)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    report.problems.sort(key=lambda entry: (entry["shard"], entry["key"] or ""))
    _logger.info("%s: %d shards, %d samples, %d decoded, %d problems", url, report.shards, report.samples, report.decoded, len(report.problems))
    return report
