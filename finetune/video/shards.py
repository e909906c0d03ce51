"""``python -m shards write kinetics ROOT OUT``: the Kinetics list layout as WebDataset shards.

``OUT/train`` and ``OUT/val`` are each a shard set of the image writer's kind (:func:`shards.writer.write_dataset`:
``info.json`` with a sha256 per shard, resumable, one writer per target, videos that do not decode skipped and
listed), one ``KEY.mp4`` / ``.webm`` / ``.avi`` / ``.mkv`` / ``.mov`` (the source bytes, unchanged, named by the
source file's extension; ``.mp4`` for any other name), ``KEY.cls`` and ``KEY.json`` (label, listed path, frame
count, size, ``container`` as FFmpeg names it) per video; class
``i`` is label ``i`` of the lists. The video task reads ``OUT`` like the list layout (``--data OUT``): each video
is one ranged read of its shard (the writer's manifests give its offset).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Sequence

from shards.sources import SourceItem
from shards.writer import source_extension, write_splits

from .data import SPLITS, _frame_count, decode_frames, read_bytes, read_list

__all__ = ["KineticsSource", "VIDEO_EXTENSIONS", "VideoEncoder", "write_kinetics"]

VIDEO_EXTENSIONS = ("mp4", "webm", "avi", "mkv", "mov")
"""Source extensions a shard payload keeps as its name (Kinetics ships mp4, webm and avi)."""

@dataclass(frozen=True, slots=True)
class VideoEncoder:
    """Keeps each video's bytes as they are, after checking that PyAV finds frames and decodes the first."""

    extension: str = "mp4"
    errors: tuple[type[BaseException], ...] = (ValueError,)

    @property
    def options(self) -> dict[str, Any]:
        return {"video": "source bytes"}

    def payload_extension(self, item: SourceItem) -> str:
        return source_extension(item.path, VIDEO_EXTENSIONS, self.extension)

    def encode(self, data: bytes, item: SourceItem) -> tuple[bytes, dict[str, Any]]:
        import av

        first = decode_frames(data, item.path, lambda count: [0])
        try:
            with av.open(io.BytesIO(data)) as container:
                name = container.format.name
        except Exception as error:  # noqa: BLE001 - decoded above; any later failure is damage too
            raise ValueError(f"{item.path}: {type(error).__name__}: {error}") from error
        return data, {"frames": _frame_count(data), "height": int(first.shape[1]), "width": int(first.shape[2]),
                      "container": name}


@dataclass
class KineticsSource:
    """The videos of one split list (``ROOT/SPLIT.csv``), as the shard writer lists them: class = the label."""

    root: str
    split: str
    archive_layout: bool = False
    unreadable: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.listed = read_list(self.root, self.split)
        self.description = self.listed.source

    def list_items(self, map_fn, progress: bool) -> list[SourceItem]:
        return [SourceItem(url, str(label), 0) for url, label in self.listed.videos]

    def read_many(self, items: Sequence[SourceItem]) -> list[bytes]:
        contents = []
        for item in items:
            try:
                contents.append(read_bytes(item.path))
            except OSError:  # a missing or unreadable file: skipped and listed as one that does not decode
                contents.append(b"")
        return contents


def write_kinetics(root: str, out_url: str, *, samples_per_shard: int = 1000, workers: int = 1, seed: int = 0,
                   progress: bool = True, command: str | None = None) -> dict[str, dict[str, Any]]:
    """Write ``ROOT/train.csv`` and ``ROOT/val.csv``'s videos under ``out_url`` (see the module docstring); a rerun
    keeps complete shards. Returns each split's ``info.json`` contents."""
    sources = {split: KineticsSource(root, split) for split in SPLITS}
    classes = [str(label) for label in range(1 + max(label for source in sources.values()
                                                     for _, label in source.listed.videos))]
    return write_splits(sources, out_url, encoder=VideoEncoder(), class_names=classes,
                        samples_per_shard=samples_per_shard, workers=workers, seed=seed, progress=progress,
                        command=command)
