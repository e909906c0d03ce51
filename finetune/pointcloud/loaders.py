"""The point-cloud task's loaders: resumable training batches (the sample's own generator per (seed, epoch,
index), so resume is exact with any number of loader workers) and the evaluation split scored once over ranks.

A training batch is ``((projected (B, P, 3), original (B, P, 3)), labels (B,))``: the authors' augmentation
(:func:`finetune.pointcloud.augment.sample_training_points`) of each normalized cloud. An evaluation batch is
``(EvalClouds(points (B, P, 3), voting), labels)``: each cloud farthest-point sampled to ``points`` and
normalized; the task rotates it (8 scored rotations, or 40 voted with ``voting``). A file that cannot be read,
or holds fewer than ``points`` points, is skipped, named in a warning and counted (``bad_samples``)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from shards.indexed import EvaluationShare, ShuffledBatches
from shards.seeding import sample_generator

from .augment import sample_training_points
from .data import PointClouds, PointSplit, normalize_cloud

__all__ = ["EvalClouds", "EvalLoader", "TrainLoader"]

_logger = logging.getLogger(__name__)

SEED_PURPOSE = 0x9C10D
"""The point-cloud task's part of every sample seed."""


def _usable(sample, split: PointSplit, index: int, points: int) -> np.ndarray | None:
    """The normalized xyz of a read sample, or None (named in a warning) when it has too few points."""
    if sample is None:
        return None
    cloud = sample[0]
    if len(cloud) < points:
        _logger.warning("skipping %s: %d points, fewer than pointcloud.points (%d)", split.items[index][0],
                        len(cloud), points)
        return None
    return normalize_cloud(cloud)[:, :3]


class _TrainSamples(Dataset):
    def __init__(self, clouds: PointClouds, section, seed: int):
        self.clouds, self.section, self.seed = clouds, section, seed

    def __len__(self) -> int:
        return len(self.clouds)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        epoch, index = item
        v = self.section
        for attempt in range(len(self)):  # an unreadable cloud is replaced by the next one, and counted
            position = (index + attempt) % len(self)
            xyz = _usable(self.clouds[position], self.clouds.split, position, v.points)
            if xyz is None:
                continue
            rng = sample_generator(self.seed, epoch, position, SEED_PURPOSE)
            xyz = np.ascontiguousarray(xyz)
            farthest = self.clouds.farthest(position, xyz, min(v.fps_points, len(xyz)))
            projected, original = sample_training_points(torch.from_numpy(xyz), v.points, v.fps_points, rng, farthest)
            return projected.float(), original.float(), self.clouds.split.items[position][1], attempt
        raise RuntimeError(f"{self.clouds.split.root}: no readable cloud in the {self.clouds.split.split} split")


def _collate_train(samples: list) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, int]:
    projected = torch.stack([s[0] for s in samples])
    original = torch.stack([s[1] for s in samples])
    return (projected, original), torch.tensor([s[2] for s in samples]), sum(s[3] for s in samples)


class TrainLoader(ShuffledBatches):
    """This rank's training batches (see the module docstring), every rank the same number per epoch,
    resumable mid-epoch."""

    name = "ModelNet"
    count_key = "clouds"

    def __init__(self, split: PointSplit, section, cache_dir: str, *, batch_size: int, rank: int, world_size: int,
                 num_workers: int, seed: int):
        self.split = split
        samples = _TrainSamples(PointClouds(split, section.mesh_points, cache_dir), section, seed)
        self._shuffled(samples, _collate_train, root=split.root, size=len(split),
                       described=f"{split.root}: {len(split)} training clouds", per_batch=batch_size,
                       batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers, seed=seed)


@dataclass(frozen=True)
class EvalClouds:
    """Evaluation inputs: ``points`` (B, P, 3) and whether the task votes over the 40 test rotations."""

    points: torch.Tensor
    voting: bool

    def __len__(self) -> int:
        return len(self.points)


class _EvalSamples(Dataset):
    def __init__(self, clouds: PointClouds, points: int, indices: Sequence[int]):
        self.clouds, self.points, self.indices = clouds, points, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int] | None:
        index = self.indices[item]
        xyz = _usable(self.clouds[index], self.clouds.split, index, self.points)
        if xyz is None:
            return None
        xyz = np.ascontiguousarray(xyz)
        cloud = torch.from_numpy(xyz)
        return cloud[self.clouds.farthest(index, xyz, self.points)].float(), self.clouds.split.items[index][1]


class EvalLoader(EvaluationShare):
    """This rank's share of a split (``rank::world``: every cloud scored once) in batches of ``(EvalClouds,
    labels)``; ``num_samples``, ``bad_samples`` and ``description`` as the trainer expects."""

    def __init__(self, split: PointSplit, section, cache_dir: str, *, voting: bool, batch_size: int, rank: int,
                 world_size: int, num_workers: int):
        self.voting = voting
        self.description = (f"{split.root.rstrip('/')} ({split.split}: "
                            f"{'40 rotations voted' if voting else '8 rotations'})")
        self._share(_EvalSamples(PointClouds(split, section.mesh_points, cache_dir), section.points,
                                 range(rank, len(split), world_size)), batch_size=batch_size, num_workers=num_workers)

    def _wrap(self, points: torch.Tensor) -> EvalClouds:
        return EvalClouds(points, self.voting)
