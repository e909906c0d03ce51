"""Atomic file writes: a file is either its old content or its whole new content, never half written.

Every local file the project writes for others to read (configs, metrics, manifests, ``latest``,
summaries, weights) goes through :func:`atomic_open`: the data goes to a temporary file in the same
folder, is flushed to disk, and is renamed over the target (``os.replace`` is atomic on POSIX), after
which the folder entry itself is flushed.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from typing import IO, Any, Iterator

__all__ = ["atomic_open", "atomic_write_json", "atomic_write_text", "fsync_path"]


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file or a folder entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, durable: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it replaces ``path``; on an error it
    is removed and ``path`` is left as it was. ``durable``: fsync the data and the folder (survives a crash of
    the machine, not only of the process)."""
    if "r" in mode or "a" in mode:
        raise ValueError(f"atomic_open writes whole files; mode {mode!r} is not a write mode")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, mode.replace("w", "x")) as f:  # the umask's permissions, as a plain open() gives
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    if durable:
        fsync_path(folder)


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> None:
    """Replace ``path`` with ``text`` atomically."""
    with atomic_open(path, "w", durable=durable) as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 2, durable: bool = True) -> None:
    """Replace ``path`` with ``value`` as JSON (and a final newline) atomically."""
    atomic_write_text(path, json.dumps(value, indent=indent) + "\n", durable=durable)
