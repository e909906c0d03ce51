"""Video data: the Kinetics list layout (local or fsspec), PyAV decoding, VideoMAE v2's sampling and augmentation,
resumable loaders.

Layout: ``ROOT/train.csv`` and ``ROOT/val.csv``, one ``path label`` per line, space separated, no header;
paths relative to ROOT or absolute (a local path or a URL); mp4, webm, avi, anything FFmpeg reads. Or the shards
``python -m shards write kinetics ROOT OUT`` made of them (``OUT/train``, ``OUT/val``; :mod:`finetune.video.shards`):
each video one ranged read of its shard, the videos in the order of their listed paths.

Train (per video, all randomness from ``(seed, epoch, index)``, so a resumed run sees exactly the batches of
an uninterrupted one with any number of loader workers): ``num_frames`` frames at stride ``sampling_rate``
from a window of ``num_frames * sampling_rate`` frames ending at a random frame (short videos: every
stride-th frame, then the last frame repeated) -> ``repeated_aug`` augmented clips, each: RandAugment with
one draw of ops and magnitudes for all frames -> random resized crop (one box for the clip) -> flip (the
whole clip) -> ImageNet normalization -> random erasing (per frame). Mixup/CutMix run on the batch (timm's,
seeded by (seed, epoch, rank, batch) as the image loaders').
Eval: ``single``: the centred window, short side resized to ``input_size``, centre crop; ``test``: the
authors' protocol, every stride-th frame of the video cut into ``test_segments`` evenly spaced clips, each
at ``test_crops`` crops along the longer side; each video's views go in one batch row.

A video that fails to decode is skipped, named in a warning and counted (``bad_samples``): in training it is
replaced by the next readable one, in evaluation it is left out, and the evaluator's ``samples`` against the
loader's ``num_samples`` tells the trainer the evaluation is incomplete.
"""
from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from shards.indexed import ShuffledBatches, worker_iterator
from shards.info import INFO_NAME, ShardMember, read_member, read_members
from shards.seeding import SeedPurpose, sample_generator, seed_global_rngs, seeded_global_rngs, stream_seed

from .crop_augment import augment_crop, recorded_ops

__all__ = ["MEAN", "STD", "SEED_PURPOSE", "EvalLoader", "TrainLoader", "VideoList", "augment_clip", "check_labels",
           "decode_frames", "eval_views", "frame_indices", "read_list", "resized_crop_box", "segment_starts",
           "protocol_frame_indices"]

_logger = logging.getLogger(__name__)

MEAN = (0.485, 0.456, 0.406)
"""ImageNet mean and std of RGB in [0, 1] (VideoMAE v2's normalization)."""
STD = (0.229, 0.224, 0.225)

SEED_PURPOSE = 0x71DE0
"""The video task's part of every sample seed (:func:`shards.seeding.sample_generator`)."""

SPLITS = ("train", "val")


@dataclass(frozen=True)
class VideoList:
    """One split: the list file, and each video's URL (absolute, or joined to the root) with its label; from
    shards, ``members`` locates each video in them (its "URL" is then ``shard:key``, for messages)."""

    root: str
    split: str
    source: str
    videos: tuple[tuple[str, int], ...]
    members: tuple[ShardMember, ...] | None = None

    def __len__(self) -> int:
        return len(self.videos)

    def read(self, index: int) -> bytes:
        """The bytes of video ``index`` (its file, or one ranged read of its shard)."""
        if self.members is None:
            return read_bytes(self.videos[index][0])
        import fsspec

        member = self.members[index]
        return read_member(fsspec.core.url_to_fs(member.shard)[0], member)

    @property
    def labels(self) -> np.ndarray:
        return np.array([label for _, label in self.videos], dtype=np.int64)


def _is_absolute(path: str) -> bool:
    return path.startswith("/") or "://" in path


def read_list(root: str, split: str) -> VideoList:
    """``ROOT/SPLIT.csv`` parsed; ``FileNotFoundError`` naming the file when it is missing or empty, ``ValueError``
    naming the file and line when a line is not ``path label`` with an integer label >= 0."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(root)
    if fs.isfile(f"{base.rstrip('/')}/{split}/{INFO_NAME}"):
        return _sharded_list(root, split)
    source = f"{root.rstrip('/')}/{split}.csv"
    path = f"{base.rstrip('/')}/{split}.csv"
    if not fs.isfile(path):
        raise FileNotFoundError(f"{source}: no such list; expected the Kinetics layout ROOT/train.csv and ROOT/val.csv "
                                "with one 'path label' per line")
    with fs.open(path, "r") as f:
        lines = f.read().splitlines()
    videos = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        name, _, label = line.strip().rpartition(" ")
        if not name or not label.lstrip("-").isdigit() or int(label) < 0:
            raise ValueError(f"{source}:{number}: expected 'path label' (space separated, label an integer >= 0), "
                             f"got {line.strip()[:120]!r}")
        url = name if _is_absolute(name) else f"{root.rstrip('/')}/{name}"
        videos.append((url, int(label)))
    if not videos:
        raise FileNotFoundError(f"{source}: no videos listed")
    return VideoList(root, split, source, tuple(videos))


def _sharded_list(root: str, split: str) -> VideoList:
    """The videos of ``ROOT/SPLIT``'s shards, ordered by their listed paths."""
    source = f"{root.rstrip('/')}/{split}"
    _, members = read_members(source)
    if not members:
        raise FileNotFoundError(f"{source}: no videos in the shards")
    members = sorted(members, key=lambda m: m.source)
    return VideoList(root, split, source, tuple((m.where, m.label) for m in members), tuple(members))


def check_labels(videos: VideoList, num_classes: int) -> None:
    """The labels of ``videos`` are classes of a ``num_classes``-way head: ``ValueError`` naming the list, the
    count found and ``video.num_classes`` otherwise. The training list must hold every class."""
    labels = videos.labels
    found = len(np.unique(labels))
    if labels.max() >= num_classes:
        raise ValueError(f"video.num_classes: {videos.source} has labels up to {labels.max()} ({found} classes "
                         f"found), more than video.num_classes={num_classes}")
    if videos.split == "train" and found != num_classes:
        raise ValueError(f"video.num_classes: {videos.source} holds {found} classes, expected video.num_classes="
                         f"{num_classes}")


def read_bytes(url: str) -> bytes:
    import fsspec

    with fsspec.open(url, "rb") as f:
        return f.read()


def _frame_count(data: bytes) -> int:
    """The stream's frame count from the header, else its packets counted (demuxed, not decoded)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        if stream.frames > 0:
            return stream.frames
        return sum(1 for packet in container.demux(stream) if packet.size)


def decode_frames(data: bytes, where: str, choose: Callable[[int], Sequence[int]]) -> np.ndarray:
    """Frames ``choose(frame_count)`` of the video ``data`` as ``(len, H, W, 3)`` uint8 RGB (PyAV). Decoding stops
    after the last chosen frame; indices past a stream that ends early take its last frame. ``ValueError``
    naming ``where`` when nothing can be decoded."""
    import av
    from av.video.reformatter import VideoReformatter

    try:
        frames: dict[int, np.ndarray] = {}
        last, seen = None, -1
        rgb = VideoReformatter()  # one colour converter for the video (a frame's own is rebuilt per frame)
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            count = stream.frames if stream.frames > 0 else _frame_count(data)  # the header's, else counted
            if count <= 0:
                raise ValueError("no video frames")
            indices = [int(i) for i in choose(count)]
            wanted, last_needed = set(indices), max(indices)
            for seen, frame in enumerate(container.decode(stream)):
                if seen in wanted:
                    frames[seen] = rgb.reformat(frame, format="rgb24").to_ndarray()
                last = frame
                if seen >= last_needed:
                    break
        if last is None:
            raise ValueError("no decodable video frame")
        if seen < last_needed:
            _logger.debug("%s: %d frames decoded of the %d the header gives", where, seen + 1, count)
            frames.setdefault(seen, rgb.reformat(last, format="rgb24").to_ndarray())
        return np.stack([frames[min(i, seen)] for i in indices])
    except Exception as error:  # noqa: BLE001 - PyAV's errors, damaged containers: one message naming the file
        raise ValueError(f"{where}: {type(error).__name__}: {error}") from error


# ----------------------------------------------------------------------------------------------- sampling


def frame_indices(count: int, num_frames: int, stride: int, rng: np.random.Generator | None = None) -> list[int]:
    """VideoMAE v2's clip of a ``count``-frame video (``Video/dataset/datasets.py``, one segment): a window of
    ``window = num_frames * stride`` frames ending at ``end``, random in ``[window, count)`` with ``rng``, else
    centred (``(window + count) // 2``), sampled at ``num_frames`` points of ``linspace(end - window, end)``
    clipped to ``end - 1`` and truncated (stride 4.27 for 16 of 64: not every 4th frame). A video no longer than
    the window: ``linspace(0, count, count // stride)`` then ``count`` repeated, clipped to ``count - 1``."""
    window = num_frames * stride
    if count <= window:
        points = np.linspace(0, count, num=count // stride)
        points = np.concatenate([points, np.full(num_frames - len(points), float(count))])
        return np.clip(points, 0, count - 1).astype(np.int64).tolist()
    end = int(rng.integers(window, count)) if rng is not None else (window + count) // 2
    start = end - window
    return np.clip(np.linspace(start, end, num=num_frames), start, end - 1).astype(np.int64).tolist()


def protocol_frame_indices(count: int, num_frames: int, stride: int) -> list[int]:
    """The authors' test pass: every ``stride``-th frame of the video, the last one repeated up to ``num_frames``."""
    picked = list(range(0, count, stride))
    return picked + [picked[-1]] * (num_frames - len(picked))


def segment_starts(length: int, num_frames: int, segments: int) -> list[int]:
    """Starts of ``segments`` clips of ``num_frames`` in a list of ``length`` frames: ``int(k * step)`` with
    ``step = max((length - num_frames) / (segments - 1), 0)`` (one segment: the centred clip)."""
    if segments == 1:
        return [max(length - num_frames, 0) // 2]
    step = max((length - num_frames) / (segments - 1), 0.0)
    return [int(k * step) for k in range(segments)]


def resized_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                     rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` drawn from ``rng``: ``(top, left, h, w)``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# ------------------------------------------------------------------------------------------- augmentation


def _normalize(frames: torch.Tensor, in_place: bool = False, channel_dim: int = 1) -> torch.Tensor:
    """Float frames normalized with ImageNet's mean and std, the 3 colours along ``channel_dim`` of the 4
    dimensions (``(T, 3, H, W)``: 1; a ``(3, T, H, W)`` clip: 0). ``in_place``: for frames nothing else holds,
    e.g. a crop just resized; evaluation views share their frames."""
    shape = [1, 1, 1, 1]
    shape[channel_dim] = 3
    mean = torch.tensor(MEAN).view(shape)
    std = torch.tensor(STD).view(shape)
    if in_place:
        return frames.sub_(mean).div_(std)
    return (frames - mean) / std


def _as_float(frames: np.ndarray) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 -> ``(T, 3, H, W)`` float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255)


_RAND_AUGMENT: dict[tuple[str, int], Any] = {}


def _rand_augment(policy: str, size: int):
    """timm's RandAugment for ``policy`` with VideoMAE v2's parameters (``create_random_augment``): bicubic
    resampling in the geometric ops (``train_interpolation``'s default; timm alone picks bilinear or bicubic at
    random), fill (128, 128, 128) (no ``img_mean`` given), ``translate_const`` 45 % of the crop ``size``;
    posterize fixed as for images (:func:`shards.image.fix_posterize`)."""
    if (policy, size) not in _RAND_AUGMENT:
        from PIL import Image
        from timm.data.auto_augment import rand_augment_transform
        from torchvision.transforms import Compose

        from shards.image import fix_posterize

        hparams = {"translate_const": int(size * 0.45), "img_mean": (128, 128, 128),
                   "interpolation": Image.Resampling.BICUBIC}
        transform = rand_augment_transform(policy, hparams)
        fix_posterize(Compose([transform]))
        _RAND_AUGMENT[policy, size] = transform
    return _RAND_AUGMENT[policy, size]


def rand_augment_frames(frames: np.ndarray, transform, seed: int) -> np.ndarray:
    """``transform`` (RandAugment) on every whole frame with the global RNGs seeded by ``seed`` for each: the same
    ops and magnitudes for the clip (the caller's RNG states come back afterwards)."""
    from PIL import Image

    augmented = []
    with seeded_global_rngs(seed):
        for frame in frames:
            seed_global_rngs(seed)
            augmented.append(np.asarray(transform(Image.fromarray(frame))))
    return np.stack(augmented)


def augment_clip(frames: np.ndarray, rng: np.random.Generator, *, size: int, auto_augment: str = "",
                 scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (0.75, 4 / 3),
                 hflip: float = 0.5, random_erasing: float = 0.0) -> torch.Tensor:
    """One training clip ``(3, T, size, size)`` (contiguous) from ``(T, H, W, 3)`` uint8 frames, every draw from
    ``rng``."""
    seed = int(rng.integers(2 ** 31)) if auto_augment else None
    top, left, h, w = resized_crop_box(frames.shape[1], frames.shape[2], scale, ratio, rng)  # RandAugment keeps sizes
    if auto_augment:  # the same ops and magnitudes on every frame, computed only where the crop looks
        transform = _rand_augment(auto_augment, size)
        ops = recorded_ops(transform, seed)
        if ops is not None:
            frames = augment_crop(frames, ops, (left, top, left + w, top + h))
        else:
            frames = rand_augment_frames(frames, transform, seed)[:, top:top + h, left:left + w]
    else:
        frames = frames[:, top:top + h, left:left + w]
    # only the crop becomes float, channel-major (3, T, h, w) from the start: the clip's own layout, so no strided
    # copy at the end; each frame's plane is resized as one channel of the one image
    clip = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).contiguous().float().div_(255)
    channels, length = clip.shape[:2]
    clip = F.interpolate(clip.view(1, channels * length, h, w), size=(size, size), mode="bilinear",
                         align_corners=False).view(channels, length, size, size)
    if rng.random() < hflip:
        clip = clip.flip(-1)
    clip = _normalize(clip, in_place=True, channel_dim=0)  # the resized (or flipped) crop is this function's own
    if random_erasing > 0:
        from timm.data.random_erasing import RandomErasing

        with seeded_global_rngs(int(rng.integers(2 ** 31))):  # per frame, as on (T, 3, H, W) frames
            RandomErasing(random_erasing, mode="pixel", max_count=1, num_splits=1, device="cpu")(clip.transpose(0, 1))
    return clip


def _short_side(clip: torch.Tensor, size: int) -> torch.Tensor:
    """``(T, 3, H, W)`` resized so the shorter side is ``size`` (keeping the aspect ratio)."""
    height, width = clip.shape[-2:]
    if min(height, width) == size:
        return clip
    factor = size / min(height, width)
    shape = (max(size, round(height * factor)), max(size, round(width * factor)))
    return F.interpolate(clip, size=shape, mode="bilinear", align_corners=False, antialias=True)


def _crop_starts(length: int, size: int, crops: int) -> list[int]:
    """The authors' test crops along a side of ``length``: ``int(k * (length - size) / (crops - 1))``; one: centred."""
    if crops == 1:
        return [(length - size) // 2]
    step = (length - size) / (crops - 1)
    return [int(k * step) for k in range(crops)]


def eval_views(data: bytes, where: str, *, num_frames: int, stride: int, size: int, mode: str = "single",
               segments: int = 5, crops: int = 3) -> torch.Tensor:
    """The evaluation views of one video, ``(V, 3, T, size, size)`` (V = 1, or ``segments * crops``)."""
    if mode == "single":
        frames = _short_side(_as_float(decode_frames(data, where, lambda n: frame_indices(n, num_frames, stride))), size)
        height, width = frames.shape[-2:]
        top, left = (height - size) // 2, (width - size) // 2
        views = [frames[:, :, top:top + size, left:left + size]]
    else:
        frames = _short_side(_as_float(decode_frames(data, where, lambda n: protocol_frame_indices(n, num_frames, stride))),
                             size)
        height, width = frames.shape[-2:]
        views = []
        for start in segment_starts(len(frames), num_frames, segments):
            clip = frames[start:start + num_frames]
            for offset in _crop_starts(max(height, width), size, crops):
                if height >= width:
                    views.append(clip[:, :, offset:offset + size, :size])
                else:
                    views.append(clip[:, :, :size, offset:offset + size])
    return torch.stack([_normalize(view).permute(1, 0, 2, 3) for view in views]).contiguous()


# ------------------------------------------------------------------------------------------------ loaders


class _TrainSamples(Dataset):
    """Sample ``(epoch, index)``: ``repeated_aug`` augmented clips of video ``index`` (or of the next readable one)."""

    def __init__(self, videos: VideoList, section, seed: int):
        self.videos, self.section, self.seed = videos, section, seed

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        epoch, index = item
        v = self.section
        skipped = 0
        for attempt in range(len(self)):  # an unreadable video is replaced by the next one, and counted
            position = (index + attempt) % len(self)
            url, label = self.videos.videos[position]
            rng = sample_generator(self.seed, epoch, position, SEED_PURPOSE)
            try:
                frames = decode_frames(self.videos.read(position), url,
                                       lambda n: frame_indices(n, v.num_frames, v.sampling_rate, rng))
            except Exception as error:  # noqa: BLE001 - any damage: skip, count, name the file
                skipped += 1
                _logger.warning("skipping %s", error if isinstance(error, ValueError) else f"{url}: {error!r}")
                continue
            clips = torch.stack([
                augment_clip(frames, rng, size=v.input_size, auto_augment=v.auto_augment, scale=v.crop_scale,
                             ratio=v.crop_ratio, hflip=v.hflip, random_erasing=v.random_erasing)
                for _ in range(v.repeated_aug)])
            return clips, label, skipped
        raise RuntimeError(f"{self.videos.source}: no readable video")


def _collate_train(samples: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    clips = torch.cat([s[0] for s in samples])
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64).repeat_interleave(samples[0][0].shape[0])
    return clips, labels, sum(s[2] for s in samples)


class TrainLoader(ShuffledBatches):
    """This rank's training batches ``(clips (B, 3, T, S, S), targets)``: ``batch_size`` clips, i.e.
    ``batch_size / repeated_aug`` videos, every rank the same number per epoch (the shuffled list cut to a
    multiple of world x videos per batch); targets are class indices, or soft rows under mixup/cutmix.
    Resumable mid-epoch with ``state_dict``; ``set_epoch`` / iteration as ``shards.TrainLoader``."""

    name = "video"
    count_key = "videos"

    def __init__(self, videos: VideoList, section, *, batch_size: int, rank: int, world_size: int, num_workers: int,
                 seed: int, label_smoothing: float = 0.0):
        self.videos = videos
        self._mixup = None
        if section.uses_mixup:
            from shards.image import MixupConfig, timm_mixup

            self._mixup = timm_mixup(MixupConfig(mixup_alpha=section.mixup_alpha, cutmix_alpha=section.cutmix_alpha,
                                                 switch_prob=section.mixup_switch_prob,
                                                 label_smoothing=label_smoothing), section.num_classes)
        self._shuffled(_TrainSamples(videos, section, seed), _collate_train, root=videos.root, size=len(videos),
                       described=f"{videos.source}: {len(videos)} videos", per_batch=batch_size // section.repeated_aug,
                       batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers, seed=seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for clips, labels in super().__iter__():
            if self._mixup is not None:  # on (B, 3*T, H, W): one CutMix box for every frame
                with seeded_global_rngs(stream_seed(SeedPurpose.MIXUP, self.seed, self._epoch, self.rank,
                                                    self._batches_done - 1)):
                    flat, labels = self._mixup(clips.flatten(1, 2), labels)
                clips = flat.view(clips.shape)
            yield clips, labels



class _EvalSamples(Dataset):
    def __init__(self, videos: VideoList, section, indices: Sequence[int]):
        self.videos, self.section, self.indices = videos, section, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int] | None:
        url, label = self.videos.videos[self.indices[item]]
        v = self.section
        try:
            views = eval_views(self.videos.read(self.indices[item]), url, num_frames=v.num_frames, stride=v.sampling_rate,
                               size=v.input_size, mode=v.eval_views, segments=v.test_segments, crops=v.test_crops)
        except Exception as error:  # noqa: BLE001
            _logger.warning("evaluation skips %s", error if isinstance(error, ValueError) else f"{url}: {error!r}")
            return None
        return views, label


def _collate_eval(samples: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    good = [s for s in samples if s is not None]
    bad = len(samples) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), bad
    return torch.stack([s[0] for s in good]), torch.tensor([s[1] for s in good], dtype=torch.int64), bad


class EvalLoader:
    """This rank's share of the validation videos (``rank::world``, so every video is scored once), ``batch_size``
    videos per batch: ``(views (B, V, 3, T, S, S), labels)``. An unreadable video is skipped, named in a
    warning and counted in ``bad_samples``; ``num_samples`` (this rank's videos) against the evaluator's
    ``samples`` tells the trainer the evaluation is incomplete. ``description`` names the set."""

    def __init__(self, videos: VideoList, section, *, batch_size: int, rank: int, world_size: int, num_workers: int):
        self.videos, self.batch_size, self.num_workers = videos, batch_size, num_workers
        self.description = videos.source
        self._samples = _EvalSamples(videos, section, range(rank, len(videos), world_size))
        self.bad_samples = 0

    def __len__(self) -> int:
        return math.ceil(len(self._samples) / self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self._samples)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.bad_samples = 0
        if not len(self._samples):
            return
        for views, labels, bad in worker_iterator(self._samples, num_workers=self.num_workers,
                                                  batch_size=self.batch_size, collate_fn=_collate_eval):
            self.bad_samples += bad
            if len(labels):
                yield views, labels
