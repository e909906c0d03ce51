"""The authors' point-to-pixel projection (P2P's ``ProjEnc``, ``Point/models/layers/encoder.py``), in plain torch:
where each point of a view lands on the ``size`` x ``size`` map, and the scatter-add of point features there
(``torch_scatter.scatter(reduce="sum")`` in the authors' code; ``index_add_`` here).

Per cloud (B, N, 3), on its x and y: the cell size ``g`` is the larger of the x and y extents over
``size - 3``; a point's cell is ``floor((xy - min) / g)``; it is written into that cell's 3 x 3 neighbourhood
(9 cells), shifted by 1 so none is negative; the object is centred: every cell moves by
``size / 2 - floor((max + min) / 2) - 1`` per axis, max and min over the cloud's 9N cells. The first coordinate
is the map's row. Empty cells stay 0."""
from __future__ import annotations

import torch

__all__ = ["NEIGHBOURHOOD", "project_features", "projection_indices"]

NEIGHBOURHOOD = torch.tensor([[-1, -1], [-1, 0], [-1, 1], [0, -1], [0, 0], [0, 1], [1, -1], [1, 0], [1, 1]])
"""The 3 x 3 cell offsets each point is written to, in the authors' order."""


def projection_indices(points: torch.Tensor, size: int) -> torch.Tensor:
    """Flat cell indices ``row * size + column`` (B, 9N) int64 of the points (B, N, >= 2) of each cloud; every
    index is inside the ``size`` x ``size`` map (``ValueError`` otherwise, which the authors assert too)."""
    xy = points[..., :2]
    low = xy.min(dim=1).values  # (B, 2)
    cell = (xy.max(dim=1).values - low).max(dim=-1).values / (size - 3)  # (B,)
    cells = torch.floor((xy - low[:, None]) / cell[:, None, None])  # (B, N, 2)
    dense = (cells[:, :, None] + NEIGHBOURHOOD.to(cells)[None, None]).reshape(len(points), -1, 2) + 1
    centre = torch.floor((dense.max(dim=1).values + dense.min(dim=1).values) / 2)  # (B, 2)
    placed = dense + (size / 2 - centre - 1)[:, None]
    if placed.min() < 0 or placed.max() > size - 1:
        raise ValueError(f"projected cells {int(placed.min())}..{int(placed.max())} fall outside the {size} x "
                         f"{size} map")
    placed = placed.long()
    return placed[..., 0] * size + placed[..., 1]


def project_features(points: torch.Tensor, features: torch.Tensor, size: int) -> torch.Tensor:
    """Point features (B, N, C) summed into the cells of :func:`projection_indices`: (B, C, size, size)."""
    batch, count, channels = features.shape
    index = projection_indices(points, size)  # (B, 9N)
    dense = features[:, :, None].expand(-1, -1, len(NEIGHBOURHOOD), -1).reshape(batch, 9 * count, channels)
    grid = features.new_zeros(batch, size * size, channels)
    grid.scatter_add_(1, index[..., None].expand(-1, -1, channels), dense)
    return grid.reshape(batch, size, size, channels).permute(0, 3, 1, 2)
