"""Files written and read with their size and sha256: checkpoints record both in their manifest (written while
the bytes go to disk, fsynced, no partial file left by a failed write) and verify them on resume."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any, Callable

__all__ = ["HASH_CHUNK", "HashingFile", "hash_file", "os_error_text", "size_text", "write_hashed",
           "write_json_hashed"]

HASH_CHUNK = 8 << 20
"""Bytes read at a time when hashing a file."""


def size_text(size: float) -> str:
    """A byte count as bytes, KiB, MiB or GiB (one decimal)."""
    if size < 1024:
        return f"{size:.0f} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"


def os_error_text(error: OSError) -> str:
    """``[Errno 28] No space left on device`` (without the file name, which the caller names)."""
    if error.errno is not None and error.strerror:
        return f"[Errno {error.errno}] {error.strerror}"
    return str(error)


class HashingFile:
    """A write-only file object over an unbuffered file that hashes what it writes (what torch.save and
    json.dump call). The first OS error is kept: torch's zip writer reports it as its own RuntimeError."""

    def __init__(self, file):
        self._file, self.sha256, self.size = file, hashlib.sha256(), 0
        self.os_error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            done = 0
            while done < len(view):  # a short write (the disk filling up) is followed by the OS error
                done += self._file.write(view[done:])
        except OSError as error:
            self.os_error = self.os_error or error
            raise
        self.sha256.update(view)
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        pass


def write_hashed(path: str, write: Callable[[HashingFile], None]) -> tuple[int, str]:
    """Write ``path`` through ``write``, then fsync it; (size, sha256) of what was written. A failed
    write raises the OS error (with its errno) and leaves no partial file."""
    hashed = None
    try:
        with open(path, "wb", buffering=0) as raw:
            hashed = HashingFile(raw)
            write(hashed)
            os.fsync(raw.fileno())
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(path)
        if hashed is not None and hashed.os_error is not None and not isinstance(error, OSError):
            raise hashed.os_error from error
        raise
    return hashed.size, hashed.sha256.hexdigest()


def write_json_hashed(path: str, value: Any) -> tuple[int, str]:
    return write_hashed(path, lambda f: f.write((json.dumps(value, indent=1) + "\n").encode()))


def hash_file(path: str) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()
