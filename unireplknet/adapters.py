"""Modality adapters: turn audio, video, time series and point clouds into N x C x H x W maps.

The "universal perception" half of UniRepLKNet runs the same backbone on every modality; only the
input is reshaped into an image-like map first:

- audio: a B x T x F spectrogram -> B x 1 x T x F (build the model with ``in_chans=1``);
- video: B x N_F x 3 x h x w -> B x 3 x (rows*h) x (cols*w), frames tiled row-major;
- time series: B x L x D -> (B*n) x L x D' by a learned embedding -> (B*n) x 1 x H x W, H*W = L*D';
- point cloud: B x P x 3 -> B x 3 x S x S, one depth image per axis-aligned view.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["spectrogram_to_map", "tile_frames", "TimeSeriesEmbedding", "project_points"]


def spectrogram_to_map(spectrogram: torch.Tensor) -> torch.Tensor:
    """B x T x F -> B x 1 x T x F."""
    if spectrogram.dim() != 3:
        raise ValueError(f"expected a B x T x F spectrogram, got shape {tuple(spectrogram.shape)}")
    return spectrogram.unsqueeze(1)


def tile_frames(video: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """B x N_F x C x h x w -> B x C x (rows*h) x (cols*w), frame ``i`` at row ``i // cols``, column ``i % cols``.

    ``rows`` defaults to the largest divisor of N_F not above sqrt(N_F) (a square grid when N_F is square).
    """
    if video.dim() != 5:
        raise ValueError(f"expected B x N_F x C x h x w video, got shape {tuple(video.shape)}")
    b, frames, c, h, w = video.shape
    if rows is None:
        rows = max(d for d in range(1, math.isqrt(frames) + 1) if frames % d == 0)
    if frames % rows:
        raise ValueError(f"{frames} frames cannot be tiled into {rows} rows")
    cols = frames // rows
    grid = video.reshape(b, rows, cols, c, h, w).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(b, c, rows * h, cols * w)


class TimeSeriesEmbedding(nn.Module):
    """B x L x D -> (B*n) x 1 x H x W: a linear embedding per time step into n groups of D' features.

    Args:
        in_features: D, variables per time step.
        groups: n, maps per series (the paper's nodes).
        embed_dim: D' per group; each map is L x D' reshaped to ``height`` x (L*D' / height).
        height: map height H (default L).
    """

    def __init__(self, in_features: int, groups: int, embed_dim: int, height: int | None = None):
        super().__init__()
        self.groups, self.embed_dim, self.height = groups, embed_dim, height
        self.embed = nn.Linear(in_features, groups * embed_dim)

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        if series.dim() != 3:
            raise ValueError(f"expected a B x L x D series, got shape {tuple(series.shape)}")
        b, length, _ = series.shape
        height = self.height or length
        if (length * self.embed_dim) % height:
            raise ValueError(f"L*D' = {length * self.embed_dim} is not divisible by height {height}")
        x = self.embed(series).reshape(b, length, self.groups, self.embed_dim).permute(0, 2, 1, 3)
        return x.reshape(b * self.groups, 1, height, length * self.embed_dim // height)


def project_points(points: torch.Tensor, size: int = 224) -> torch.Tensor:
    """B x P x 3 -> B x 3 x size x size: per view (drop x, y or z) the nearest depth in [0, 1] per pixel.

    Points are centred and scaled into the unit cube per cloud; empty pixels are 0, an occupied
    pixel holds 1 - depth of its nearest point, so nearer surfaces are brighter.
    """
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"expected B x P x 3 points, got shape {tuple(points.shape)}")
    b, p, _ = points.shape
    centred = points - points.mean(dim=1, keepdim=True)
    scale = centred.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    unit = (centred / scale + 1) / 2  # [0, 1]
    pixels = (unit * (size - 1)).round().long()
    views = []
    for depth_axis in range(3):
        u_axis, v_axis = [a for a in range(3) if a != depth_axis]
        index = pixels[..., v_axis] * size + pixels[..., u_axis]
        nearness = 1 - unit[..., depth_axis] + 1e-6
        image = torch.zeros(b, size * size, dtype=points.dtype, device=points.device)
        image.scatter_reduce_(1, index, nearness.to(points.dtype), reduce="amax")
        views.append(image.reshape(b, size, size))
    return torch.stack(views, dim=1)
