"""Loader cost of the video task: training videos per CPU-second (16 frames at stride 4, RandAugment, random
resized crop, flip, erasing, two augmented clips per video: ``video_b_kinetics400``'s recipe) of this task's
sample pipeline and of a VideoMAE v2-style reference on the same files, one process each.

    python -m finetune.video.bench [VIDEO ...] [--videos 20] [--seconds 10] [--fps 30]

Without files it generates one Kinetics-like clip (340 x 256, H.264 through PyAV). The reference does per video
what the authors' loader (VideoMAE v2's ``Video/dataset/datasets.py``) does: ``decord.VideoReader(num_threads=1)``,
``get_batch`` of the clip's frames, then per augmented clip every frame to PIL, the same RandAugment ops on
each, every frame to a tensor, normalization of the whole frames, the random resized crop, flip and erasing.
It needs decord (``pip install decord==0.6.0``, the ``bench`` extra) and is skipped without it. Figures, not a
test: they depend on the machine.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from shards.seeding import seeded_global_rngs

from .config import VideoConfig
from .data import MEAN, STD, _rand_augment, augment_clip, decode_frames, frame_indices, resized_crop_box

__all__ = ["main", "ours", "videomae_style", "videos_per_cpu_second"]

_logger = logging.getLogger(__name__)


def ours(path: str, rng: np.random.Generator, section: VideoConfig) -> torch.Tensor:
    """One training sample of this task: the file read, the clip's frames decoded (PyAV, up to the last one
    needed), ``repeated_aug`` augmented clips (3, T, size, size)."""
    data = Path(path).read_bytes()
    frames = decode_frames(data, path, lambda n: frame_indices(n, section.num_frames, section.sampling_rate, rng))
    return torch.stack([augment_clip(frames, rng, size=section.input_size, auto_augment=section.auto_augment,
                                     scale=section.crop_scale, ratio=section.crop_ratio, hflip=section.hflip,
                                     random_erasing=section.random_erasing) for _ in range(section.repeated_aug)])


def videomae_style(path: str, rng: np.random.Generator, section: VideoConfig) -> torch.Tensor:
    """One training sample the VideoMAE v2 way (its global RNG draws replaced by ``rng``)."""
    import decord
    from PIL import Image
    from timm.data.random_erasing import RandomErasing
    from torchvision.transforms.functional import to_tensor

    reader = decord.VideoReader(path, num_threads=1, ctx=decord.cpu(0))
    length, window = len(reader), section.num_frames * section.sampling_rate
    if length <= window:
        index = np.clip(np.linspace(0, length, num=length // section.sampling_rate), 0, length - 1)
        index = np.concatenate([index, np.full(section.num_frames - len(index), length - 1)]).astype(np.int64)
    else:
        end = int(rng.integers(window, length))
        index = np.clip(np.linspace(end - window, end, num=section.num_frames), end - window, end - 1).astype(np.int64)
    reader.seek(0)
    buffer = reader.get_batch(list(index)).asnumpy()
    transform = _rand_augment(section.auto_augment, section.input_size)
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    clips = []
    for _ in range(section.repeated_aug):
        images = [Image.fromarray(frame) for frame in buffer]
        seed, augmented = int(rng.integers(2 ** 31)), []
        for image in images:  # the same ops and magnitudes on every frame
            with seeded_global_rngs(seed):
                augmented.append(transform(image))
        frames = torch.stack([to_tensor(image) for image in augmented]).permute(0, 2, 3, 1)  # T H W C
        frames = ((frames - mean) / std).permute(3, 0, 1, 2)  # C T H W, the whole frames normalized
        top, left, h, w = resized_crop_box(frames.shape[-2], frames.shape[-1], section.crop_scale, section.crop_ratio,
                                           rng)
        frames = F.interpolate(frames[:, :, top:top + h, left:left + w], size=(section.input_size,) * 2,
                               mode="bilinear", align_corners=False)
        if rng.random() < section.hflip:
            frames = frames.flip(-1)
        with seeded_global_rngs(int(rng.integers(2 ** 31))):
            frames = RandomErasing(section.random_erasing, mode="pixel", max_count=1, num_splits=1,
                                   device="cpu")(frames.permute(1, 0, 2, 3)).permute(1, 0, 2, 3)
        clips.append(frames)
    return torch.stack(clips)


def videos_per_cpu_second(make: Callable[[int], object], videos: int, warmup: int = 2) -> float:
    """``videos / CPU seconds`` of ``make(i)`` for ``i`` in range(videos), after ``warmup`` calls."""
    for i in range(warmup):
        make(i)
    start = time.process_time()
    for i in range(videos):
        make(i)
    return videos / (time.process_time() - start)


def kinetics_like_clip(path: Path, seconds: float, fps: int) -> None:
    """A 340 x 256 H.264 clip of ``seconds`` at ``fps``: a window panning over a photograph."""
    from .demo_data import encode_clip, render_clip

    frames = render_clip(np.random.default_rng(0), "pan_right", frames=int(seconds * fps), size=340,
                         window=(0.6, 0.7), speed=(0.002, 0.003))[:, 42:298]
    path.write_bytes(encode_clip(np.ascontiguousarray(frames), fps=fps))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.video.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("videos", nargs="*", help="video files (default: one generated Kinetics-like clip)")
    parser.add_argument("--videos", dest="count", type=int, default=20, help="samples timed per loader")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the generated clip")
    parser.add_argument("--fps", type=int, default=30, help="frame rate of the generated clip")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    section = VideoConfig(data_root="unused")
    with tempfile.TemporaryDirectory() as scratch:
        paths = args.videos
        if not paths:
            paths = [str(Path(scratch, "clip.mp4"))]
            kinetics_like_clip(Path(paths[0]), args.seconds, args.fps)
            print(f"generated a {args.seconds:g} s, {args.fps} fps, 340 x 256 H.264 clip")
        # video i draws from its own generator, in the same order in both loaders: the same window, RandAugment
        # ops, crops, flips and erasing, so the two do the same work
        mine = videos_per_cpu_second(lambda i: ours(paths[i % len(paths)], np.random.default_rng(i), section),
                                     args.count)
        print(f"this task's loader: {mine:.2f} videos per CPU-second ({section.repeated_aug} clips of "
              f"{section.num_frames} x {section.input_size} x {section.input_size} each, {section.auto_augment})")
        try:
            import decord  # noqa: F401
        except ImportError:
            print("VideoMAE v2-style reference skipped: decord is not installed (pip install decord==0.6.0)")
            return 0
        reference = videos_per_cpu_second(
            lambda i: videomae_style(paths[i % len(paths)], np.random.default_rng(i), section), args.count)
        print(f"VideoMAE v2-style reference (decord): {reference:.2f} videos per CPU-second; ratio "
              f"{mine / reference:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
