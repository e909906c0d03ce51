"""``python -m shards write speechcommands ROOT OUT``: the Speech Commands layout as WebDataset shards.

``OUT/training``, ``OUT/validation`` and ``OUT/testing`` are each a shard set of the image writer's kind
(:func:`shards.writer.write_dataset`: ``info.json`` with a sha256 per shard, resumable, one writer per
target, damaged clips skipped and listed), one ``KEY.wav`` (the source bytes, unchanged), ``KEY.cls`` and
``KEY.json`` (class, label, source path, sample rate, channels, frames) per clip; the class list is the sorted
word folders, the same in every split. The audio task reads ``OUT`` like the folder layout (``--data OUT``):
the writer's manifests locate every clip, so each is one ranged read and the batches equal the folder's.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Sequence

from shards.sources import SourceItem, in_this_process
from shards.writer import write_splits

from .data import SPLITS, _filesystem, _listing, read_clip

__all__ = ["AudioEncoder", "SpeechCommandsSource", "write_speechcommands"]

@dataclass(frozen=True, slots=True)
class AudioEncoder:
    """Keeps each clip's bytes as they are, after checking they decode as the task reads them
    (:func:`finetune.audio.data.read_clip`: soundfile, at least one 25 ms frame, finite)."""

    extension: str = "wav"
    errors: tuple[type[BaseException], ...] = (ValueError,)

    @property
    def options(self) -> dict[str, Any]:
        return {"audio": "source bytes"}

    def payload_extension(self, item: SourceItem) -> str:
        return self.extension  # the layout lists .wav files only

    def encode(self, data: bytes, item: SourceItem) -> tuple[bytes, dict[str, Any]]:
        import soundfile

        read_clip(data, item.path)
        described = soundfile.info(io.BytesIO(data))
        return data, {"sample_rate": described.samplerate, "channels": described.channels,
                      "frames": described.frames}


@dataclass
class SpeechCommandsSource:
    """The clips of one split of a Speech Commands folder (local or fsspec), as the shard writer lists them."""

    root: str
    split: str
    archive_layout: bool = False
    unreadable: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.fs, base = _filesystem(self.root)
        self.base = base.rstrip("/")
        self.description = f"{self.root.rstrip('/')} ({self.split})"

    def list_items(self, map_fn, progress: bool) -> list[SourceItem]:
        classes, splits = _listing(self.root, None)
        sizes = {path[len(self.base) + 1:]: int(entry.get("size") or 0)
                 for path, entry in in_this_process(self.fs).find(self.base, detail=True).items()}
        return [SourceItem(relative, classes[label], sizes.get(relative, 0)) for relative, label in splits[self.split]]

    def read_many(self, items: Sequence[SourceItem]) -> list[bytes]:
        paths = [f"{self.base}/{item.path}" for item in items]
        contents = in_this_process(self.fs).cat(paths, on_error="return")
        return [b"" if isinstance(contents[path], Exception) else contents[path] for path in paths]


def write_speechcommands(root: str, out_url: str, *, samples_per_shard: int = 1000, workers: int = 1, seed: int = 0,
                         progress: bool = True, command: str | None = None) -> dict[str, dict[str, Any]]:
    """Write the three splits of the Speech Commands folder ``root`` under ``out_url`` (see the module
    docstring); a rerun keeps complete shards. Returns each split's ``info.json`` contents."""
    classes, _ = _listing(root, None)
    return write_splits({split: SpeechCommandsSource(root, split) for split in SPLITS}, out_url,
                        encoder=AudioEncoder(), class_names=classes, samples_per_shard=samples_per_shard,
                        workers=workers, seed=seed, progress=progress, command=command)
