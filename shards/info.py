"""Shard URLs and the ``info.json`` written beside the shards.

A dataset directory holds ``{prefix}-000000.tar ...``, ``info.json`` (per-shard sample counts,
total, classes, skipped sources, the command that made it) and ``classes.txt`` (one class name
per line; line ``i`` is label ``i``). Any fsspec URL works: local paths, ``file://``, ``s3://``,
``gs://``, ``memory://``.
"""
from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import braceexpand
import fsspec

INFO_NAME = "info.json"
MANIFEST_DIR = ".manifests"
"""Per-shard manifests (``.manifests/<shard>.json``): count, bytes, sha256, skipped sources, sample offsets."""
CLASSES_NAME = "classes.txt"
INFO_FORMAT = "unireplknet-shards"
INFO_VERSION = 1


class ShardReadError(RuntimeError):
    """A shard or metadata file could not be opened (missing, or the store is unreachable)."""


def join_url(base: str, name: str) -> str:
    """``base/name`` for any fsspec URL."""
    return base.rstrip("/") + "/" + name


def parent_url(url: str) -> str:
    """The directory part of a URL (``s3://b/d/x.tar`` -> ``s3://b/d``)."""
    protocol, sep, path = url.rpartition("://")
    head = posixpath.dirname(path) or "."
    return f"{protocol}{sep}{head}"


def expand_url_spec(spec: str | Sequence[str]) -> list[str]:
    """Brace-expand a URL pattern, a ``::``-separated list of patterns, or a list of them."""
    entries = spec.split("::") if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for entry in entries:
        urls.extend(braceexpand.braceexpand(entry.strip()))
    return urls


def _info_url(url_or_pattern: str | Sequence[str]) -> str:
    first = expand_url_spec(url_or_pattern)[0]
    if first.endswith(".json"):
        return first
    if first.endswith(".tar"):
        return join_url(parent_url(first), INFO_NAME)
    return join_url(first, INFO_NAME)


def read_info(url_or_pattern: str | Sequence[str]) -> dict[str, Any]:
    """Read the ``info.json`` of a dataset directory, of a shard pattern's directory, or at a ``.json`` URL.

    Raises ``FileNotFoundError`` naming the URL when there is none, ``ShardReadError`` when the
    store cannot be reached and ``ValueError`` naming the field when the file is malformed.
    """
    url = _info_url(url_or_pattern)
    try:
        with fsspec.open(url, "rt", encoding="utf-8") as f:
            info = json.load(f)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"no {INFO_NAME} at {url}; `python -m shards write` puts one next to the shards "
            "(or pass samples_per_epoch= to read shards without it)"
        ) from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{url} is not valid JSON: {exc}") from exc
    except Exception as exc:  # fsspec backends raise their own error types for unreachable stores
        raise ShardReadError(f"cannot read {url}: {type(exc).__name__}: {exc}") from exc
    _check_info(info, url)
    return info


def _check_info(info: Any, url: str) -> None:
    if not isinstance(info, dict):
        raise ValueError(f"{url}: expected a JSON object, got {type(info).__name__}")
    for field, kind in (("total", int), ("shards", list), ("classes", list)):
        if not isinstance(info.get(field), kind):
            raise ValueError(f"{url}: field {field!r} must be a {kind.__name__}, got {info.get(field)!r:.80}")
    for i, shard in enumerate(info["shards"]):
        if not (isinstance(shard, dict) and isinstance(shard.get("name"), str) and isinstance(shard.get("count"), int)):
            raise ValueError(f"{url}: shards[{i}] must be {{'name': str, 'count': int}}, got {shard!r:.120}")
        checksum = shard.get("sha256")
        if checksum is not None and not (isinstance(checksum, str) and re.fullmatch(r"[0-9a-f]{64}", checksum)):
            raise ValueError(f"{url}: shards[{i}].sha256 must be 64 hex digits, got {checksum!r:.80}")
    counted = sum(shard["count"] for shard in info["shards"])
    if counted != info["total"]:
        raise ValueError(f"{url}: field 'total' is {info['total']} but the shard counts sum to {counted}")


@dataclass(frozen=True, slots=True)
class ShardSet:
    """One source of shards: their URLs, their sample counts when known and the class names."""

    urls: tuple[str, ...]
    counts: tuple[int, ...] | None
    classes: tuple[str, ...] | None

    @property
    def total(self) -> int | None:
        """Samples in all shards, or ``None`` without ``info.json``."""
        return None if self.counts is None else sum(self.counts)


def resolve_shard_set(spec: str | Sequence[str], *, require_counts: bool) -> ShardSet:
    """Resolve a dataset directory, a brace pattern or a list of shard URLs into a ``ShardSet``.

    A directory means every shard its ``info.json`` lists. Counts and classes come from the
    ``info.json`` next to the shards; without one, ``require_counts=True`` raises.
    """
    urls = expand_url_spec(spec)
    if not urls:
        raise ValueError(f"no shard URLs in {spec!r}")
    if len(urls) == 1 and not urls[0].endswith(".tar"):
        info = read_info(urls[0])
        shard_urls = tuple(join_url(urls[0], shard["name"]) for shard in info["shards"])
        counts = tuple(shard["count"] for shard in info["shards"])
        return ShardSet(shard_urls, counts, tuple(info["classes"]))
    not_tar = [url for url in urls if not url.endswith(".tar")]
    if not_tar:
        raise ValueError(f"expected shard URLs ending in .tar or one dataset directory, got {not_tar[0]!r}")

    infos: dict[str, dict[str, Any] | None] = {}
    counts_list: list[int] = []
    classes: tuple[str, ...] | None = None
    for url in urls:
        directory = parent_url(url)
        if directory not in infos:
            try:
                infos[directory] = read_info(join_url(directory, INFO_NAME))
            except FileNotFoundError:
                if require_counts:
                    raise
                infos[directory] = None
        info = infos[directory]
        if info is None:
            continue
        if classes is None:
            classes = tuple(info["classes"])
        by_name = {shard["name"]: shard["count"] for shard in info["shards"]}
        name = posixpath.basename(url)
        if name not in by_name:
            if require_counts:
                raise ValueError(f"shard {url} is not listed in {join_url(directory, INFO_NAME)}")
            continue
        counts_list.append(by_name[name])
    counts = tuple(counts_list) if len(counts_list) == len(urls) else None
    return ShardSet(tuple(urls), counts, classes)


@dataclass(frozen=True, slots=True)
class ShardMember:
    """Where one sample's payload lies: ``offset`` and ``size`` bytes into the tar at ``shard``."""

    shard: str
    key: str
    source: str
    label: int
    offset: int
    size: int

    @property
    def where(self) -> str:
        """``shard:key``, for messages."""
        return f"{self.shard}:{self.key}"


def read_members(directory: str) -> tuple[dict[str, Any], list[ShardMember]]:
    """``info.json`` of a dataset directory and every sample's payload location, from the manifests the writer
    keeps under ``.manifests/`` (random access into shards: one ranged read per sample, :func:`read_member`).
    ``ValueError`` names a manifest that is missing, predates sample offsets or disagrees with ``info.json``."""
    info = read_info(join_url(directory, INFO_NAME))
    members: list[ShardMember] = []
    for shard in info["shards"]:
        url = join_url(join_url(directory, MANIFEST_DIR), shard["name"] + ".json")
        try:
            with fsspec.open(url, "rt", encoding="utf-8") as f:
                manifest = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError) as exc:
            raise ValueError(f"{url}: {type(exc).__name__}: {exc}; rewrite the shards with `python -m shards write` "
                             "(it keeps the manifests that sample offsets are read from)") from exc
        rows = manifest.get("members") if isinstance(manifest, dict) else None
        if not isinstance(rows, list) or len(rows) != shard["count"]:
            raise ValueError(f"{url}: expected 'members' with {shard['count']} samples (the shard's count in "
                             f"{INFO_NAME}), got {'none' if rows is None else len(rows)}: written by an older "
                             "`shards write`, or damaged; rewrite into an empty directory")
        shard_url = join_url(directory, shard["name"])
        members += [ShardMember(shard_url, str(key), str(source), int(label), int(offset), int(size))
                    for key, source, label, offset, size in rows]
    return info, members


def read_member(fs: Any, member: ShardMember) -> bytes:
    """The payload bytes of ``member`` (a ranged read of its shard through ``fs``); ``ValueError`` naming the shard
    and key when the shard is missing or ends before the member does (a cut or damaged file)."""
    try:
        with fs.open(member.shard, "rb") as f:
            f.seek(member.offset)
            data = f.read(member.size)
    except OSError as exc:
        raise ValueError(f"{member.where}: {type(exc).__name__}: {exc}") from exc
    if len(data) != member.size:
        raise ValueError(f"{member.where}: the shard ends {member.size - len(data)} bytes before this sample does "
                         f"(offset {member.offset}, {member.size} bytes): cut or damaged")
    return data
