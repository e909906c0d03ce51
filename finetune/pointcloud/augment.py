"""The authors' point-cloud training augmentation and test-time rotations (``Point/util/rotate.py``,
``Point/tool/train_adaptor_lkv.py``, ``Point/tool/test.py``, ``Point/dataset/data_transforms.py``), every draw from
a given NumPy generator (the sample's own, so resume is exact with any number of loader workers).

Training: farthest-point sample ``fps_points`` (4800 for 4096), keep a random ``points`` of them; rotate by
``theta ~ U(0.04, 1.94) pi`` about the vertical axis and ``phi ~ U(-0.4, -0.2) pi`` of elevation; then scale each
axis by U(2/3, 3/2) and shift it by U(-0.2, 0.2). The rotated, scaled cloud is projected; the sampled, unrotated
one gives the point features. Validation: 8 rotations ``theta = linspace(0.1, 2, 9)[:8] pi`` at ``phi = -0.35 pi``,
each scored (not voted); test: 40 rotations ``theta in {0, 0.2, ..., 1.8} pi`` x ``phi = linspace(-0.4, -0.2, 4)
pi`` (phi-major), logits averaged."""
from __future__ import annotations

import math

import numpy as np
import torch

from .data import farthest_point_sample

__all__ = ["axis_angle_matrix", "rotate", "sample_training_points", "scale_and_translate", "theta_phi_matrix",
           "training_angles", "validation_angles", "voting_angles"]


def axis_angle_matrix(angle: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """Rodrigues' rotation by ``angle`` (B,) about the unit ``axis`` (B, 3): (B, 3, 3)."""
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    x, y, z = axis[:, 0:1], axis[:, 1:2], axis[:, 2:3]
    one = 1 - cos
    rows = [torch.cat([cos + one * x * x, one * x * y - sin * z, one * x * z + sin * y], -1),
            torch.cat([one * y * x + sin * z, cos + one * y * y, one * y * z - sin * x], -1),
            torch.cat([one * z * x - sin * y, one * z * y + sin * x, cos + one * z * z], -1)]
    return torch.stack(rows, dim=1)


def theta_phi_matrix(angles: torch.Tensor) -> torch.Tensor:
    """The authors' ``rotate_theta_phi``: (B, 2) radians -> ``Rz(-theta) @ R_v(-phi)``, ``v = (sin theta,
    -cos theta, 0)`` (B, 3, 3); a cloud rotates as ``p -> R p``."""
    theta, phi = angles[:, 0], angles[:, 1]
    vertical = torch.zeros(len(angles), 3, dtype=angles.dtype, device=angles.device)
    vertical[:, 2] = 1
    horizontal = torch.stack([theta.sin(), -theta.cos(), torch.zeros_like(theta)], dim=-1)
    return axis_angle_matrix(-theta, vertical) @ axis_angle_matrix(-phi, horizontal)


def rotate(points: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """(..., N, 3+) points (normals too, when present) rotated by ``rotation`` (3, 3): ``p -> R p``."""
    xyz = points[..., :3] @ rotation.to(points.dtype).T
    if points.shape[-1] >= 6:
        return torch.cat([xyz, points[..., 3:6] @ rotation.to(points.dtype).T, points[..., 6:]], dim=-1)
    return torch.cat([xyz, points[..., 3:]], dim=-1)


def training_angles(rng: np.random.Generator) -> tuple[float, float]:
    """``(theta, phi)``: ``U(0.04, 1.94) pi`` and ``U(-0.4, -0.2) pi``."""
    theta = (rng.random() * 1.9 + 0.04) * math.pi
    return theta, (rng.random() * 0.2 - 0.4) * math.pi


def scale_and_translate(points: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """xyz scaled per axis by U(2/3, 3/2), then shifted per axis by U(-0.2, 0.2) (``PointcloudScaleAndTranslate``)."""
    scale = torch.from_numpy(rng.uniform(2 / 3, 3 / 2, size=3)).to(points.dtype)
    shift = torch.from_numpy(rng.uniform(-0.2, 0.2, size=3)).to(points.dtype)
    return torch.cat([points[..., :3] * scale + shift, points[..., 3:]], dim=-1)


def sample_training_points(cloud: torch.Tensor, points: int, fps_points: int, rng: np.random.Generator,
                           farthest: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One training sample from a (N, C) cloud: ``(projected, original)``, both (points, C): farthest-point
    sampled to ``fps_points`` (at most N; ``farthest``: those indices, computed before), a random ``points`` of
    those kept (the original), then rotated, scaled and shifted (the projected)."""
    fps_points = min(fps_points, len(cloud))
    chosen = farthest_point_sample(cloud, fps_points) if farthest is None else farthest[:fps_points]
    original = cloud[chosen[torch.from_numpy(rng.choice(fps_points, points, replace=False))]]
    theta, phi = training_angles(rng)
    rotation = theta_phi_matrix(torch.tensor([[theta, phi]], dtype=torch.float64))[0]
    return scale_and_translate(rotate(original, rotation), rng), original


def validation_angles() -> torch.Tensor:
    """The 8 validation rotations (theta, phi) in radians, float64."""
    theta = np.linspace(0.1, 2, 9)[:8]
    return torch.from_numpy(np.stack([theta, np.full(8, -0.35)], axis=-1)) * math.pi


def voting_angles() -> torch.Tensor:
    """The 40 test rotations (theta, phi) in radians, phi-major (``np.meshgrid(theta, phi)``), float64."""
    theta, phi = np.meshgrid(np.linspace(0, 2, 11)[:10], np.linspace(-0.4, -0.2, 4))
    return torch.from_numpy(np.stack([theta, phi], axis=-1).reshape(-1, 2)) * math.pi
