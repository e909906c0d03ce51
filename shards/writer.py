"""Writing a source into WebDataset shards: plan, write in parallel, resume, record ``info.json``.

The plan is a pure function of the source listing, the class map, the seed and the size limits:
items are sorted by path, given unique keys, shuffled with ``seed`` and cut into shards. So a
re-run of the same command finds the same shards; a shard whose tar and manifest (under
``.manifests/``) match the plan is kept, anything else is rewritten. Each tar is written under a
temporary name and renamed when complete, so a final name never holds half a shard.

Process pools use the ``fork`` start method; ``memory://`` targets are written in-process,
because forked workers do not share a memory filesystem.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import io
import os
import json
import logging
import multiprocessing
import posixpath
import re
import shlex
import socket
import tarfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, Protocol

import fsspec
import numpy as np
from fsspec import AbstractFileSystem
from PIL import Image

from .classes import is_wnid, resolve_classes
from .info import CLASSES_NAME, INFO_FORMAT, INFO_NAME, INFO_VERSION, MANIFEST_DIR
from .samples import DECODE_ERRORS, to_rgb
from .sources import DemoSource, ImageSource, SourceItem, in_this_process, open_source

_logger = logging.getLogger(__name__)

SAMPLE_MTIME = 0


@dataclass(frozen=True, slots=True)
class EncodeOptions:
    """How source images become shard JPEGs."""

    max_side: int | None = None
    """Downscale so the longer side is at most this many pixels (aspect kept); ``None`` keeps the size."""
    jpeg_quality: int = 95
    """Quality for re-encoded images (non-JPEG sources, resized or CMYK/alpha images)."""


class SampleEncoder(Protocol):
    """How a source file becomes a shard sample: ``encode(data, item)`` returns the payload stored as
    ``KEY.<payload_extension(item)>`` and the fields it adds to the sample's json, or raises one of ``errors``
    for a file that does not decode (skipped and listed). ``extension`` is the usual payload extension (an
    encoder that keeps source bytes names each payload by its source's format). ``options`` enters each shard's
    fingerprint and ``info.json``."""

    extension: str
    errors: tuple[type[BaseException], ...]

    @property
    def options(self) -> dict[str, Any]: ...

    def encode(self, data: bytes, item: SourceItem) -> tuple[bytes, dict[str, Any]]: ...

    def payload_extension(self, item: SourceItem) -> str: ...


def source_extension(path: str, known: tuple[str, ...], default: str) -> str:
    """The extension of ``path`` (lower case) when it is one of ``known``, else ``default``: the payload name of
    an encoder that stores the source's bytes unchanged."""
    _, dot, suffix = path.rsplit("/", 1)[-1].rpartition(".")
    return suffix.lower() if dot and suffix.lower() in known else default


@dataclass(frozen=True, slots=True)
class ImageEncoder:
    """Images as shard JPEGs (:func:`encode_image`); the json gets the original ``width`` and ``height``."""

    encode_options: EncodeOptions = EncodeOptions()
    extension: str = "jpg"
    errors: tuple[type[BaseException], ...] = DECODE_ERRORS

    @property
    def options(self) -> dict[str, Any]:
        return asdict(self.encode_options)

    def encode(self, data: bytes, item: SourceItem) -> tuple[bytes, dict[str, Any]]:
        jpeg, (width, height) = encode_image(data, self.encode_options)
        return jpeg, {"width": width, "height": height}

    def payload_extension(self, item: SourceItem) -> str:
        return self.extension  # always a JPEG


class _ShardTask(NamedTuple):
    index: int
    name: str
    items: list[SourceItem]
    keys: list[str]
    labels: list[int]
    fingerprint: str


def encode_image(data: bytes, options: EncodeOptions) -> tuple[bytes, tuple[int, int]]:
    """Fully decode ``data``; return shard JPEG bytes and the original ``(width, height)``.

    RGB or greyscale JPEGs that need no resize are kept byte for byte; everything else is
    converted to 8-bit RGB (alpha composited on white, 16-bit greyscale scaled, see
    :func:`shards.samples.to_rgb`), resized if asked, and encoded as JPEG.
    Undecodable data raises ``OSError``/``ValueError``/``SyntaxError``.
    """
    image = Image.open(io.BytesIO(data))
    image.load()
    size = image.size
    resize = options.max_side is not None and max(size) > options.max_side
    if image.format == "JPEG" and image.mode in ("RGB", "L") and not resize:
        return data, size
    rgb = to_rgb(image)
    if resize:
        scale = options.max_side / max(size)
        target = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        rgb = rgb.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG", quality=options.jpeg_quality)
    return buffer.getvalue(), size


def sample_keys(items: Sequence[SourceItem]) -> list[str]:
    """Unique WebDataset keys: the file stem (prefixed by its class unless it starts with it), made dot-free."""
    keys, seen = [], set()
    for item in items:
        stem = posixpath.splitext(posixpath.basename(item.path))[0]
        base = stem if stem.startswith(item.class_name) else f"{item.class_name}_{stem}"
        base = re.sub(r"[^A-Za-z0-9_-]", "_", base)
        key, duplicate = base, 1
        while key in seen:
            key, duplicate = f"{base}_dup{duplicate}", duplicate + 1
        seen.add(key)
        keys.append(key)
    return keys


def plan_shards(
    sizes: Sequence[int], *, seed: int, samples_per_shard: int, shard_bytes: int | None
) -> list[list[int]]:
    """Shuffle item indices with ``seed`` and cut them into shards by count and (source) byte size."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    shards: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for index in np.random.default_rng(seed).permutation(len(sizes)).tolist():
        full = len(current) >= samples_per_shard or (shard_bytes is not None and current_bytes + sizes[index] > shard_bytes)
        if current and full:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(index)
        current_bytes += sizes[index]
    if current:
        shards.append(current)
    return shards


def _fingerprint(encoder: SampleEncoder, keys: Sequence[str], items: Sequence[SourceItem], labels: Sequence[int]) -> str:
    digest = hashlib.sha256(json.dumps(encoder.options, sort_keys=True).encode())
    if encoder.extension != "jpg":
        digest.update(f"extension={encoder.extension}\n".encode())
    for key, item, label in zip(keys, items, labels):
        digest.update(f"{key}\t{item.path}\t{label}\n".encode())
    return digest.hexdigest()


def _join(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name


class _ShardWriter:
    """Writes one planned shard (runs in pool workers; holds the source and target)."""

    def __init__(self, source: ImageSource, fs: AbstractFileSystem, out_path: str, encoder: SampleEncoder):
        self.source, self._fs, self.out_path, self.encoder = source, fs, out_path, encoder

    @property
    def fs(self) -> AbstractFileSystem:
        return in_this_process(self._fs)

    def __call__(self, task: _ShardTask) -> dict[str, Any]:
        final = _join(self.out_path, task.name)
        manifest_path = _join(_join(self.out_path, MANIFEST_DIR), task.name + ".json")
        kept = self._completed(final, manifest_path, task.fingerprint)
        if kept is not None:
            return {**kept, "reused": True}
        contents = self.source.read_many(task.items)
        temporary = f"{final}.tmp-{uuid.uuid4().hex}"
        try:
            count, skipped, sha256, members = self._write_tar(temporary, task, contents)
            self.fs.mv(temporary, final)
        except BaseException:
            if self.fs.exists(temporary):
                self.fs.rm(temporary)
            raise
        manifest = {"name": task.name, "count": count, "bytes": self.fs.size(final), "sha256": sha256,
                    "skipped": skipped, "fingerprint": task.fingerprint, "members": members}
        _write_atomic(self.fs, manifest_path, json.dumps(manifest).encode())
        return {**manifest, "reused": False}

    def _write_tar(self, path: str, task: _ShardTask, contents: Sequence[bytes]
                   ) -> tuple[int, list[dict[str, str]], str, list[list]]:
        """Write the shard's tar; returns (samples written, skipped sources, sha256 of the file, members).

        ``members``: ``[key, source path, label, offset, size]`` of each sample's payload in the tar, so a
        reader can fetch one sample with a ranged read (:func:`read_shard_index`)."""
        skipped, count, members = [], 0, []
        encoder = self.encoder
        with self.fs.open(path, "wb") as raw:
            stream = _HashingWriter(raw)
            archive = tarfile.open(fileobj=stream, mode="w|")
            for item, key, label, data in zip(task.items, task.keys, task.labels, contents):
                try:
                    payload, fields = encoder.encode(data, item)
                except encoder.errors as exc:
                    skipped.append({"source": item.path, "shard": task.name, "reason": f"{type(exc).__name__}: {exc}"})
                    continue
                meta = {"class": item.class_name, "label": label, "source": item.path, **fields}
                if is_wnid(item.class_name):
                    meta["wnid"] = item.class_name
                payload_extension = encoder.payload_extension(item)
                for extension, content in ((payload_extension, payload), ("cls", str(label).encode()),
                                           ("json", json.dumps(meta).encode())):
                    member = tarfile.TarInfo(f"{key}.{extension}")
                    member.size, member.mtime, member.mode = len(content), SAMPLE_MTIME, 0o444
                    archive.addfile(member, io.BytesIO(content))
                    if extension == payload_extension:  # the data ends the member's padded blocks
                        padded = -(-len(content) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                        members.append([key, item.path, label, archive.offset - padded, len(content)])
                count += 1
            archive.close()
        return count, skipped, stream.digest.hexdigest(), members

    def _completed(self, final: str, manifest_path: str, fingerprint: str) -> dict[str, Any] | None:
        """The manifest of a shard an earlier run completed, if the file is still byte for byte what it wrote."""
        try:
            manifest = json.loads(self.fs.cat_file(manifest_path))
            if manifest.get("fingerprint") != fingerprint or self.fs.size(final) != manifest.get("bytes"):
                return None
            return manifest if file_sha256(self.fs, final) == manifest.get("sha256") else None
        except (FileNotFoundError, json.JSONDecodeError):
            return None


class _HashingWriter:
    """A write-only file wrapper feeding every byte written into a sha256."""

    def __init__(self, raw):
        self.raw, self.digest = raw, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.raw.write(data)


def file_sha256(fs: AbstractFileSystem, path: str) -> str:
    """The sha256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomic(fs: AbstractFileSystem, path: str, payload: bytes) -> None:
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(temporary, "wb") as f:
        f.write(payload)
    fs.mv(temporary, path)


def _remove_temporaries(fs: AbstractFileSystem, out_path: str, prefix: str) -> None:
    pattern = _join(out_path, f"{prefix}-*.tar.tmp-*")
    stale = fs.glob(pattern) + fs.glob(_join(_join(out_path, MANIFEST_DIR), "*.tmp-*"))
    for path in stale:
        _logger.info("removing %s left by an interrupted run", path)
        fs.rm(path)


_worker_writer: _ShardWriter | None = None


def _install_writer(writer: _ShardWriter) -> None:
    global _worker_writer
    _worker_writer = writer


def _write_in_worker(task: _ShardTask) -> dict[str, Any]:
    return _worker_writer(task)


class _Executor:
    """``map`` in-process, or over a forked process pool (ordered and unordered)."""

    def __init__(self, workers: int, initializer: Callable | None = None, initargs: tuple = ()):
        context = multiprocessing.get_context("fork")
        self._pool = context.Pool(workers, initializer, initargs) if workers > 1 else None
        self.parallel = self._pool is not None

    def ordered(self, fn: Callable, items: Iterable) -> Iterator:
        return self._pool.imap(fn, items) if self._pool else map(fn, items)

    def unordered(self, fn: Callable, items: Iterable) -> Iterator:
        return self._pool.imap_unordered(fn, items) if self._pool else map(fn, items)

    def close(self, *, abort: bool) -> None:
        if self._pool is None:
            return
        if abort:
            self._pool.terminate()
        else:
            self._pool.close()
        self._pool.join()


@contextmanager
def _executor(workers: int, initializer: Callable | None = None, initargs: tuple = ()) -> Iterator[_Executor]:
    executor = _Executor(workers, initializer, initargs)
    try:
        yield executor
    except BaseException:
        executor.close(abort=True)
        raise
    executor.close(abort=False)


def _equivalent_command(source: str, out_url: str, **options: Any) -> str:
    words = ["python", "-m", "shards", "write", source, out_url]
    for name, value in options.items():
        if value is not None:
            words += [f"--{name.replace('_', '-')}", str(value)]
    return shlex.join(words)


LOCK_NAME = ".write.lock"


class TargetLockedError(RuntimeError):
    """Another ``shards write`` is writing into the same target."""


@contextmanager
def _target_lock(fs: AbstractFileSystem, out_path: str, out_url: str) -> Iterator[None]:
    """One writer per target, so a second run never deletes the first one's temporary shards.

    On a local disk: an exclusive ``flock`` on ``.write.lock`` (released by the kernel if the writer
    dies). In object storage: a ``.write.lock`` object, removed at the end; one left by a writer that
    crashed must be deleted by hand (the error says so).
    """
    path = _join(out_path, LOCK_NAME)
    holder = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    if "file" in fs.protocol or "local" in fs.protocol:
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise TargetLockedError(f"another `shards write` is writing into {out_url} ({f.read().strip() or 'lock held'}; "
                                        f"lock {path}): wait for it, or write elsewhere") from None
            f.seek(0)
            f.truncate()
            f.write(holder)
            f.flush()
            yield
        return
    if fs.exists(path):
        raise TargetLockedError(f"another `shards write` is writing into {out_url} ({fs.cat_file(path).decode(errors='replace')}); "
                                f"if no writer is running any more (it crashed), delete {path} and run again")
    with fs.open(path, "wb") as f:
        f.write(holder.encode())
    try:
        yield
    finally:
        fs.rm(path)


def _holding_the_target_lock(write: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Run ``write(source, out_url, ...)`` holding ``out_url``'s lock (:class:`TargetLockedError` if taken)."""
    @functools.wraps(write)
    def locked(source: str | ImageSource, out_url: str, **options: Any) -> dict[str, Any]:
        fs, out_path = fsspec.core.url_to_fs(out_url)
        fs.makedirs(out_path, exist_ok=True)
        with _target_lock(fs, out_path, out_url):
            return write(source, out_url, **options)

    return locked


@_holding_the_target_lock
def write_dataset(
    source: str | ImageSource,
    out_url: str,
    *,
    samples_per_shard: int = 1000,
    shard_bytes: int | None = None,
    max_side: int | None = None,
    workers: int = 1,
    seed: int = 0,
    prefix: str = "shard",
    classes: str = "auto",
    jpeg_quality: int = 95,
    command: str | None = None,
    progress: bool = True,
    encoder: SampleEncoder | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write ``source`` (a URL, ``demo``/``demo:val``, or an ``ImageSource``) as shards under ``out_url``.

    Shards are ``{prefix}-000000.tar ...`` with ``jpg``/``cls``/``json`` per sample, cut at
    ``samples_per_shard`` samples or ``shard_bytes`` source bytes, whichever comes first; the
    sample order is shuffled with ``seed`` across all shards. Undecodable source files are skipped
    and listed in ``info.json``. Re-running the same call keeps completed shards (verified against
    their sha256). One write at a time per target: a second one fails with :class:`TargetLockedError`.
    ``encoder`` stores another modality (default: images as JPEGs, ``max_side`` and ``jpeg_quality``);
    ``class_names`` fixes the class list (labels = positions), e.g. to share it across splits.
    Returns the info dict.
    """
    image_source = open_source(source) if isinstance(source, str) else source
    encoder = encoder or ImageEncoder(EncodeOptions(max_side=max_side, jpeg_quality=jpeg_quality))
    fs, out_path = fsspec.core.url_to_fs(out_url)
    if "memory" in fs.protocol and workers > 1:
        _logger.info("memory:// target: writing in-process (forked workers do not share a memory filesystem)")
        workers = 1
    fs.makedirs(out_path, exist_ok=True)
    command = command or _equivalent_command(
        source if isinstance(source, str) else image_source.description, out_url, samples_per_shard=samples_per_shard, shard_bytes=shard_bytes,
        max_side=max_side, seed=seed, prefix=prefix, classes=classes,
    )

    with _executor(workers) as executor:
        items = sorted(image_source.list_items(executor.ordered, progress), key=lambda item: item.path)
    if not items:
        raise ValueError(f"source {image_source.description} contains no samples")
    if class_names is None:
        class_names, class_map = resolve_classes(classes, {item.class_name for item in items},
                                                 archive_layout=image_source.archive_layout)
    else:
        class_names, class_map = list(class_names), "given"
        unknown = sorted({item.class_name for item in items} - set(class_names))
        if unknown:
            raise ValueError(f"source {image_source.description}: classes {unknown[:5]} are not in the class list")
    label_of = {name: label for label, name in enumerate(class_names)}
    keys = sample_keys(items)
    plan = plan_shards([item.size for item in items], seed=seed, samples_per_shard=samples_per_shard, shard_bytes=shard_bytes)
    tasks = []
    for index, members in enumerate(plan):
        shard_items = [items[i] for i in members]
        shard_keys = [keys[i] for i in members]
        labels = [label_of[item.class_name] for item in shard_items]
        fingerprint = _fingerprint(encoder, shard_keys, shard_items, labels)
        tasks.append(_ShardTask(index, f"{prefix}-{index:06d}.tar", shard_items, shard_keys, labels, fingerprint))
    _remove_temporaries(fs, out_path, prefix)
    _logger.info("%s: %d samples, %d classes -> %d shards in %s", image_source.description, len(items), len(class_names), len(tasks), out_url)

    from tqdm import tqdm

    writer = _ShardWriter(image_source, fs, out_path, encoder)
    manifests: dict[int, dict[str, Any]] = {}
    index_of = {task.name: task.index for task in tasks}
    with _executor(workers, _install_writer, (writer,)) as executor, tqdm(
        total=len(items), unit="sample", desc="write", disable=not progress
    ) as bar:
        for manifest in executor.unordered(_write_in_worker if executor.parallel else writer, tasks):
            index = index_of[manifest["name"]]
            manifests[index] = manifest
            bar.update(len(tasks[index].items))

    reused = sum(manifest["reused"] for manifest in manifests.values())
    if reused:
        _logger.info("kept %d complete shards from an earlier run, wrote %d", reused, len(tasks) - reused)
    shards = [{"name": manifests[i]["name"], "count": manifests[i]["count"], "bytes": manifests[i]["bytes"],
               "sha256": manifests[i]["sha256"]} for i in range(len(tasks))]
    skipped = [{**entry, "shard": None} for entry in image_source.unreadable]
    skipped += [entry for i in range(len(tasks)) for entry in manifests[i]["skipped"]]
    info = {
        "format": INFO_FORMAT,
        "version": INFO_VERSION,
        "total": sum(shard["count"] for shard in shards),
        "num_shards": len(shards),
        "shards": shards,
        "num_classes": len(class_names),
        "class_map": class_map,
        "classes": class_names,
        "skipped": skipped,
        "source": image_source.description,
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "shard_bytes": shard_bytes,
        "max_side": max_side,
        "jpeg_quality": jpeg_quality,
        "extension": encoder.extension,
        "encoder": encoder.options,
        "command": command,
    }
    _write_atomic(fs, _join(out_path, INFO_NAME), json.dumps(info, indent=1).encode())
    _write_atomic(fs, _join(out_path, CLASSES_NAME), ("\n".join(class_names) + "\n").encode())
    if skipped:
        _logger.warning(
            "skipped %d source files that could not be decoded (listed under 'skipped' in %s), first: %s (%s)",
            len(skipped), _join(out_url, INFO_NAME), skipped[0]["source"], skipped[0]["reason"],
        )
    return info


def write_splits(sources: dict[str, ImageSource], out_url: str, *, encoder: SampleEncoder, class_names: Sequence[str],
                 **options: Any) -> dict[str, dict[str, Any]]:
    """Each split's source as a shard set under ``out_url/<split>`` (:func:`write_dataset` with ``options``), with
    one encoder and one class list for all of them (a dataset layout's writer); returns each split's info."""
    infos = {}
    for split, source in sources.items():
        infos[split] = write_dataset(source, f"{out_url.rstrip('/')}/{split}", encoder=encoder,
                                     class_names=class_names, **options)
        _logger.info("%s: %d samples in %d shards", split, infos[split]["total"], infos[split]["num_shards"])
    return infos


def write_demo(
    out_url: str,
    split: str = "train",
    *,
    num_samples: int | None = None,
    samples_per_shard: int = 250,
    seed: int = 0,
    image_size: int = 32,
    workers: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the generated digits set (10 classes, ``image_size`` RGB; 2000 train / 500 val by default)."""
    source = DemoSource(split, num_samples, seed, image_size)
    command = _equivalent_command(f"demo:{split}", out_url, samples_per_shard=samples_per_shard, seed=seed, num_samples=source.num_samples)
    return write_dataset(
        source, out_url, samples_per_shard=samples_per_shard, seed=seed, workers=workers, classes="folders",
        command=command, progress=progress,
    )
