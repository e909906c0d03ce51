"""Image sources the writer reads: an image-folder tree, the ImageNet-22K fall11 archive layout, the demo set.

Every source lists ``SourceItem`` records (where an image is, its class, its size in bytes)
and reads a batch of them back as raw bytes. The fall11 layout (a directory of per-synset
``nXXXXXXXX.tar`` files, or one outer tar of them) is read in place with byte-range reads:
nothing is unpacked to disk.
"""
from __future__ import annotations

import logging
import posixpath
import tarfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import fsspec
from fsspec import AbstractFileSystem

from .classes import is_wnid
from .demo import DEFAULT_DEMO_SAMPLES, DEMO_CLASSES, demo_label, demo_png

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})

Mapper = Callable[[Callable, Iterable], Iterable]


def in_this_process(fs: AbstractFileSystem) -> AbstractFileSystem:
    """The filesystem equal to ``fs`` that belongs to this process (``fs`` itself outside pool workers).

    Async filesystems (s3fs, gcsfs) refuse to run in a forked pool worker ("not fork-safe").
    fsspec caches instances per process, so re-instantiating from the same arguments returns the
    cached ``fs`` in its own process and builds one fresh instance in each forked worker.
    """
    return type(fs)(*fs.storage_args, **fs.storage_options)


class SourceItem(NamedTuple):
    """One source image: ``path`` as recorded in the sample's json, its class name and byte size.

    ``archive``/``offset`` locate a member inside ``source.archives[archive]`` (-1 for plain files;
    the demo source keeps the sample index in ``offset``).
    """

    path: str
    class_name: str
    size: int
    archive: int = -1
    offset: int = -1


class ImageSource(Protocol):
    """What the writer needs from a source."""

    description: str
    archive_layout: bool
    unreadable: list[dict[str, str]]
    """Filled by ``list_items``: ``{"source", "reason"}`` for containers that could not be listed."""

    def list_items(self, map_fn: Mapper, progress: bool) -> list[SourceItem]:
        """All images of the source; ``map_fn`` is a (possibly parallel) ``map``."""
        ...

    def read_many(self, items: Sequence[SourceItem]) -> list[bytes]:
        """The raw bytes of ``items``, in the order given. Store errors propagate."""
        ...


def _progress(iterable: Iterable, total: int, description: str, enabled: bool) -> Iterable:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=description, unit="archive")


@dataclass
class ImageTreeSource:
    """``root/<class>/<image>`` (ImageNet-1K/22K unpacked, or any folder tree); deeper folders belong to their top class."""

    fs: AbstractFileSystem
    root: str
    description: str = ""
    archive_layout: bool = False
    unreadable: list[dict[str, str]] = field(default_factory=list)

    def list_items(self, map_fn: Mapper, progress: bool) -> list[SourceItem]:
        root = self.root.rstrip("/")
        found = in_this_process(self.fs).find(root, detail=True)
        items, ignored = [], 0
        for path, entry in found.items():
            relative = path[len(root) + 1 :]
            parts = relative.split("/")
            extension = posixpath.splitext(relative)[1].lower()
            if len(parts) < 2 or extension not in IMAGE_EXTENSIONS or parts[-1].startswith("."):
                ignored += 1
                continue
            items.append(SourceItem(relative, parts[0], int(entry.get("size") or 0)))
        if ignored:
            _logger.info("%s: ignored %d files that are not images inside a class folder", self.description, ignored)
        return items

    def read_many(self, items: Sequence[SourceItem]) -> list[bytes]:
        paths = [self.root.rstrip("/") + "/" + item.path for item in items]
        contents = in_this_process(self.fs).cat(paths, on_error="raise")
        return [contents[path] for path in paths]


class _FileSlice:
    """A read-only, seekable window ``[start, start + length)`` of an open file."""

    def __init__(self, file, start: int, length: int):
        self._file, self._start, self._length, self._position = file, start, length, 0

    def read(self, size: int = -1) -> bytes:
        remaining = self._length - self._position
        size = remaining if size is None or size < 0 else min(size, remaining)
        self._file.seek(self._start + self._position)
        data = self._file.read(size)
        self._position += len(data)
        return data

    def seek(self, position: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._position, 2: self._length}[whence]
        self._position = max(0, min(self._length, base + position))
        return self._position

    def tell(self) -> int:
        return self._position


class _ArchiveRef(NamedTuple):
    path: str
    display: str
    wnid: str
    start: int
    length: int | None


def _list_archive(fs: AbstractFileSystem, ref: _ArchiveRef) -> tuple[list[tuple[str, int, int]], str | None]:
    """``(member name, absolute data offset, size)`` of every file in one synset tar, and an error if it is unreadable."""
    with fs.open(ref.path, "rb") as f:
        view = f if ref.length is None else _FileSlice(f, ref.start, ref.length)
        try:
            with tarfile.open(fileobj=view, mode="r:") as archive:
                return [(m.name, ref.start + m.offset_data, m.size) for m in archive if m.isreg()], None
        except (tarfile.TarError, EOFError) as exc:
            return [], f"not a readable tar: {type(exc).__name__}: {exc}"


@dataclass
class SynsetArchiveSource:
    """The fall11 layout: per-synset ``nXXXXXXXX.tar`` files in a directory or inside one outer tar."""

    fs: AbstractFileSystem
    refs: list[_ArchiveRef] = field(default_factory=list)
    description: str = ""
    archive_layout: bool = True
    unreadable: list[dict[str, str]] = field(default_factory=list)

    @property
    def archives(self) -> list[str]:
        return [ref.path for ref in self.refs]

    def list_items(self, map_fn: Mapper, progress: bool) -> list[SourceItem]:
        listings = map_fn(_ListArchive(self.fs), self.refs)
        items = []
        for index, (ref, (members, error)) in enumerate(
            zip(self.refs, _progress(listings, len(self.refs), "list synsets", progress))
        ):
            if error is not None:
                self.unreadable.append({"source": ref.display, "reason": error})
            for name, offset, size in members:
                items.append(SourceItem(f"{ref.display}/{name}", ref.wnid, size, index, offset))
        return items

    def read_many(self, items: Sequence[SourceItem]) -> list[bytes]:
        by_position = sorted(range(len(items)), key=lambda i: (items[i].archive, items[i].offset))
        contents = in_this_process(self.fs).cat_ranges(
            [self.refs[items[i].archive].path for i in by_position],
            [items[i].offset for i in by_position],
            [items[i].offset + items[i].size for i in by_position],
        )
        result: list[bytes] = [b""] * len(items)
        for i, data in zip(by_position, contents):
            if isinstance(data, Exception):
                raise data
            result[i] = data
        return result


@dataclass(frozen=True)
class _ListArchive:
    """Picklable ``ref -> members`` for process pools."""

    fs: AbstractFileSystem

    def __call__(self, ref: _ArchiveRef) -> tuple[list[tuple[str, int, int]], str | None]:
        return _list_archive(in_this_process(self.fs), ref)


@dataclass
class DemoSource:
    """The generated digits set (``demo`` / ``demo:val``), see ``shards.demo``."""

    split: str = "train"
    num_samples: int | None = None
    seed: int = 0
    image_size: int = 32
    description: str = ""
    archive_layout: bool = False
    unreadable: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_samples is None:
            self.num_samples = DEFAULT_DEMO_SAMPLES[self.split]
        self.description = self.description or f"demo:{self.split}"

    def list_items(self, map_fn: Mapper, progress: bool) -> list[SourceItem]:
        size = 3 * self.image_size**2
        return [
            SourceItem(f"demo:{self.split}/{self.split}_{i:06d}.png", DEMO_CLASSES[demo_label(self.split, i, self.seed)], size, -1, i)
            for i in range(self.num_samples)
        ]

    def read_many(self, items: Sequence[SourceItem]) -> list[bytes]:
        return [demo_png(self.split, item.offset, self.seed, self.image_size) for item in items]


def _synset_refs_in_directory(fs: AbstractFileSystem, entries: list[dict]) -> list[_ArchiveRef]:
    refs = []
    for entry in sorted(entries, key=lambda e: e["name"]):
        name = posixpath.basename(entry["name"])
        if entry["type"] == "file" and name.endswith(".tar") and is_wnid(name[:-4]):
            refs.append(_ArchiveRef(entry["name"], name, name[:-4], 0, None))
    return refs


def _synset_refs_in_outer_tar(fs: AbstractFileSystem, path: str) -> list[_ArchiveRef]:
    refs, outer_name = [], posixpath.basename(path)
    with fs.open(path, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as outer:
                for member in outer:
                    name = posixpath.basename(member.name)
                    if member.isreg() and name.endswith(".tar") and is_wnid(name[:-4]):
                        refs.append(_ArchiveRef(path, f"{outer_name}/{member.name}", name[:-4], member.offset_data, member.size))
        except tarfile.TarError as exc:
            raise ValueError(f"{path}: not a readable tar of per-synset tars: {exc}") from exc
    if not refs:
        raise ValueError(f"{path}: an outer tar must contain per-synset nXXXXXXXX.tar members; found none")
    return sorted(refs, key=lambda ref: ref.display)


def open_source(spec: str, *, num_samples: int | None = None, seed: int = 0, image_size: int = 32) -> ImageSource:
    """Detect and open a source: ``demo``/``demo:val``, ``photos``, a fall11 directory or outer tar, or an image tree."""
    if spec == "demo" or spec.startswith("demo:"):
        split = spec.partition(":")[2] or "train"
        return DemoSource(split, num_samples, seed, image_size)
    if spec == "photos":
        from .photos import PhotoSource

        return PhotoSource(num_samples, seed)
    if num_samples is not None:
        raise ValueError("num_samples applies to the demo and photos sources only")
    fs, path = fsspec.core.url_to_fs(spec)
    if not fs.exists(path):
        raise FileNotFoundError(f"source {spec} does not exist")
    if fs.isfile(path):
        if not path.endswith(".tar"):
            raise ValueError(f"source {spec} is a file; expected a directory or an outer .tar of synset tars")
        refs = _synset_refs_in_outer_tar(fs, path)
        return SynsetArchiveSource(fs, refs, f"{spec} (outer tar of {len(refs)} synset tars)")
    entries = fs.ls(path, detail=True)
    refs = _synset_refs_in_directory(fs, entries)
    has_folders = any(entry["type"] == "directory" for entry in entries)
    if refs and not has_folders:
        return SynsetArchiveSource(fs, refs, f"{spec} ({len(refs)} synset tars)")
    if has_folders:
        return ImageTreeSource(fs, path, f"{spec} (image tree)")
    raise ValueError(f"source {spec} holds neither class folders nor per-synset nXXXXXXXX.tar files")

