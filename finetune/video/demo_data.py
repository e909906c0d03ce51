"""Generated clips in the Kinetics list layout whose class is the camera motion, learnable in CPU minutes.

Layout::

    ROOT/train.csv, ROOT/val.csv     "videos/<split>/<class>_<i>.mp4 <label>" per line (no header)
    ROOT/videos/<split>/*.mp4        H.264 (libx264, yuv420p; MPEG-4 Part 2 where libx264 is absent)
    ROOT/labels.txt                  class names, index = line (as the authors' label_map_k400.txt)

Each clip is a window moving over one of scikit-image's photographs (``shards.photos``): panned left, right,
up or down, or zoomed in or out, at a random speed, from a random place; the window is resampled to the
frame size. A single frame does not tell the class: the order of the frames does. Clip ``i`` of a split
depends only on ``(seed, split, i)``.
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["CLASSES", "encode_clip", "render_clip", "write_demo"]

_logger = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = ("pan_left", "pan_right", "pan_up", "pan_down", "zoom_in", "zoom_out")
"""Class names in label order."""


def render_clip(rng: np.random.Generator, motion: str, *, frames: int = 24, size: int = 64,
                window: tuple[float, float] = (0.3, 0.45), speed: tuple[float, float] = (0.025, 0.04),
                growth: tuple[float, float] = (0.04, 0.06), photo: str | None = None) -> np.ndarray:
    """``(frames, size, size, 3)`` uint8: a window of a photo moving as ``motion`` (one of :data:`CLASSES`).

    ``window``: the side of the middle frame's window as a fraction of the photo's shorter side (zooms pass
    through it at mid-clip, so every class sees the same window sizes); ``speed``: pan per frame as a fraction
    of the window; ``growth``: zoom, relative change of the window per frame (each drawn uniformly); ``photo``:
    which of ``shards.photos.PHOTO_NAMES`` (None: drawn)."""
    from shards.photos import PHOTO_NAMES, _photo

    photo = _photo(photo or PHOTO_NAMES[int(rng.integers(len(PHOTO_NAMES)))])
    width, height = photo.size
    side = rng.uniform(*window) * min(width, height)
    speed = rng.uniform(*speed) * side  # pan: source pixels per frame
    growth = rng.uniform(*growth)       # zoom: relative change of the window per frame
    middle = np.arange(frames) - (frames - 1) / 2
    if motion in ("zoom_in", "zoom_out"):
        side = min(side, 0.95 * min(width, height) / (1 + growth) ** ((frames - 1) / 2))  # the largest must fit
        sides = side * (1 + growth) ** (-middle if motion == "zoom_in" else middle)
    else:
        sides = np.full(frames, side)
    step = {"pan_left": (-speed, 0), "pan_right": (speed, 0), "pan_up": (0, -speed), "pan_down": (0, speed)}.get(
        motion, (0.0, 0.0))
    biggest = sides.max()
    room = min(1.0, 0.95 * (width - biggest) / (abs(step[0]) * (frames - 1) or 1),
               0.95 * (height - biggest) / (abs(step[1]) * (frames - 1) or 1))
    step = (step[0] * room, step[1] * room)  # the path must fit the photo
    travel_x, travel_y = abs(step[0]) * (frames - 1), abs(step[1]) * (frames - 1)
    cx = rng.uniform(biggest / 2 + travel_x * (step[0] < 0), width - biggest / 2 - travel_x * (step[0] > 0))
    cy = rng.uniform(biggest / 2 + travel_y * (step[1] < 0), height - biggest / 2 - travel_y * (step[1] > 0))
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        x, y, half = cx + step[0] * t, cy + step[1] * t, sides[t] / 2
        box = (x - half, y - half, x + half, y + half)
        out[t] = np.asarray(photo.transform((size, size), Image.Transform.EXTENT, box, Image.Resampling.BILINEAR))
    return out


def _codec() -> str:
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def encode_clip(frames: np.ndarray, fps: int = 25, codec: str | None = None) -> bytes:
    """``(T, H, W, 3)`` uint8 as an MP4 (PyAV; H.264 where available, else MPEG-4 Part 2)."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(codec or _codec(), rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if stream.codec_context.name == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        else:
            stream.bit_rate = 2_000_000
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def write_demo(root: str | os.PathLike, train_videos: int = 480, val_videos: int = 120, frames: int = 24,
               size: int = 64, seed: int = 0, scene_cue: bool = False) -> dict:
    """Write the demo set under ``root`` (see the module docstring): ``train_videos`` / ``val_videos`` clips, the
    classes in turn, ``frames`` frames of ``size`` x ``size``. ``scene_cue``: class ``k`` always moves over photo
    ``k`` (the scene tells the class, as Kinetics' scenes largely tell its actions; a tiny network learns that in
    CPU minutes, the motion alone it does not). Returns ``{"root", "classes", "train", "val"}``."""
    from shards.photos import PHOTO_NAMES

    root = Path(root)
    for split, count, split_id in (("train", train_videos, 0), ("val", val_videos, 1)):
        folder = root / "videos" / split
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for index in range(count):
            label = index % len(CLASSES)
            rng = np.random.default_rng([seed, split_id, index])
            name = f"videos/{split}/{CLASSES[label]}_{index:05d}.mp4"
            (root / name).write_bytes(encode_clip(render_clip(rng, CLASSES[label], frames=frames, size=size,
                                                                     photo=PHOTO_NAMES[label] if scene_cue else None)))
            lines.append(f"{name} {label}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    (root / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    _logger.info("wrote %d + %d demo clips (%s) to %s", train_videos, val_videos, _codec(), root)
    return {"root": str(root), "classes": CLASSES, "train": train_videos, "val": val_videos}
