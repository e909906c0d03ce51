"""Reading and decoding the samples of WebDataset tar shards from any fsspec URL.

A sample is the run of consecutive tar members that share a key (the member name up to the
first dot of its basename): ``n01440764_10026.jpg``, ``n01440764_10026.cls`` and
``n01440764_10026.json`` form the sample ``{"__key__": "n01440764_10026", "jpg": ..., ...}``.
"""
from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterator

import fsspec
import numpy as np
from PIL import Image

from .info import ShardReadError

_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")

Sample = dict[str, bytes | str]
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class CorruptShardError(RuntimeError):
    """A shard opened but its tar stream broke off (truncated or garbled); earlier samples were fine."""


def split_member_name(name: str) -> tuple[str, str] | None:
    """``"a/b.seg.png"`` -> ``("a/b", "seg.png")``; ``None`` for names without an extension."""
    match = _NAME.match(name)
    return (match.group(1), match.group(2)) if match else None


def open_shard(url: str):
    """Open a shard for reading; a missing file or unreachable store raises ``ShardReadError`` naming ``url``."""
    try:
        return fsspec.open(url, "rb").open()
    except FileNotFoundError as exc:
        raise ShardReadError(f"shard not found: {url}") from exc
    except Exception as exc:  # fsspec backends raise their own error types for unreachable stores
        raise ShardReadError(f"cannot open shard {url}: {type(exc).__name__}: {exc}") from exc


class _HashingReader:
    """A read-only file wrapper feeding every byte read into ``digest``."""

    def __init__(self, raw, digest):
        self.raw, self.digest = raw, digest

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        """Read (and hash) whatever the tar reader left unread: end-of-archive blocks, padding."""
        while self.read(1 << 20):
            pass


def iter_shard_samples(url: str, digest=None) -> Iterator[Sample]:
    """Yield the samples of one shard in order, each with ``__key__`` and ``__url__``.

    Raises ``ShardReadError`` if the shard cannot be opened and ``CorruptShardError`` where the
    tar stream breaks off; the sample being read at that point is dropped. A shard cut exactly
    between members reads as a shorter valid archive: compare the count with ``info.json``.
    ``digest`` (a ``hashlib`` object) is fed the whole file, to the last byte.
    """
    with open_shard(url) as raw:
        stream = _HashingReader(raw, digest) if digest is not None else raw
        current: Sample | None = None
        try:
            archive = tarfile.open(fileobj=stream, mode="r|")
            for member in archive:
                if not member.isreg():
                    continue
                parts = split_member_name(member.name)
                if parts is None:
                    continue
                key, extension = parts
                payload = archive.extractfile(member).read()
                if len(payload) != member.size:
                    raise tarfile.ReadError(f"member {member.name} is cut short")
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[extension] = payload
                archive.members = []
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise CorruptShardError(f"shard {url} breaks off after key {_last_key(current)}: {exc}") from exc
        if current is not None:
            yield current
        if digest is not None:
            stream.drain()


def _last_key(sample: Sample | None) -> str:
    return repr(sample["__key__"]) if sample else "<start>"


_HIGH_BIT_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB (itself when it already is): alpha composited on white, 16-bit and
    32-bit greyscale scaled to 8 bits.

    Pillow's own ``convert("RGB")`` clips 16-bit values (0..65535) at 255, which turns a 16-bit
    greyscale PNG almost white; here 65535 maps to 255. Integer images whose values all fit in
    8 bits are taken as 8-bit; float images as [0, 1] (or [0, 255] when any value exceeds 1).
    """
    if image.mode in _HIGH_BIT_DEPTH:
        values = np.asarray(image).astype(np.float64)
        top = values.max(initial=0.0)
        if image.mode == "F":
            scale = 255.0 if top <= 1.0 else 1.0
        else:
            scale = 1.0 if (image.mode == "I" and top <= 255) else 255.0 / 65535.0
        image = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


class BadSampleError(ValueError):
    """A sample that cannot be used: no image, undecodable image, no or invalid ``cls``."""


def sample_fields(sample: Sample, num_classes: int | None) -> tuple[str, str, bytes, int]:
    """``(where, image extension, image bytes, label)`` of a sample; raises ``BadSampleError`` naming shard and key."""
    where = f"{sample['__url__']} key {sample['__key__']!r}"
    extension = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if extension is None:
        raise BadSampleError(f"{where}: no image (expected one of {', '.join(IMAGE_EXTENSIONS)})")
    if "cls" not in sample:
        raise BadSampleError(f"{where}: no cls")
    try:
        label = int(sample["cls"])
    except ValueError as exc:
        raise BadSampleError(f"{where}: cls {sample['cls'][:20]!r} is not an integer") from exc
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise BadSampleError(f"{where}: cls {label} outside [0, {num_classes})")
    return where, extension, sample[extension], label


DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
"""What Pillow raises for bytes it cannot decode."""


def decode_image(data: bytes, where: str, extension: str) -> Image.Image:
    """Decode image bytes to RGB (:func:`to_rgb`); raises ``BadSampleError`` naming ``where``."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return to_rgb(image)
    except DECODE_ERRORS as exc:
        raise BadSampleError(f"{where}: {extension} does not decode: {type(exc).__name__}: {exc}") from exc


def decode_sample(sample: Sample, num_classes: int | None) -> tuple[Image.Image, int]:
    """Decode a sample's image to RGB and parse its ``cls`` label; raises ``BadSampleError`` naming shard and key."""
    where, extension, data, label = sample_fields(sample, num_classes)
    return decode_image(data, where, extension), label
