"""UniRepLKNet on clips: the clip is laid out as one image-like map, the network is unchanged.

The authors (``Video/engine_for_finetuning.py``) call ``samples.reshape(B, C, H*4, W*4)`` on a contiguous
``(B, 3, 16, H, W)`` clip: a memory reshape, not a mosaic. Output row ``r`` holds the ``cols`` source rows
``cols * (r mod H/cols) ...`` of frame ``r // (H/cols)`` side by side, so frame ``t`` fills rows
``t*H/cols .. (t+1)*H/cols - 1`` (with 16 frames of 224: frame ``r // 56``, source row ``4 (r mod 56) + c // 224``,
column ``c mod 224``). :func:`clip_to_map` offers it (``reshape``) and the mosaic of whole frames (``tile``).
"""
from __future__ import annotations

import torch

import unireplknet
from unireplknet.adapters import tile_frames

__all__ = ["LAYOUTS", "VideoUniRepLKNet", "clip_to_map", "map_shape"]

LAYOUTS = ("reshape", "tile")


def map_shape(frames: int, height: int, width: int, rows: int) -> tuple[int, int]:
    """(height, width) of the map of ``frames`` frames of ``height x width`` laid out in ``rows`` rows."""
    if frames % rows:
        raise ValueError(f"{frames} frames cannot be laid out in {rows} rows")
    return rows * height, (frames // rows) * width


def clip_to_map(clip: torch.Tensor, layout: str = "reshape", rows: int = 4) -> torch.Tensor:
    """``(B, C, T, H, W)`` -> ``(B, C, rows*H, (T/rows)*W)``.

    ``reshape``: the authors' memory reshape of the contiguous clip; ``tile``: frame ``t`` as the whole tile at
    row ``t // cols``, column ``t % cols``.
    """
    if clip.dim() != 5:
        raise ValueError(f"expected a (B, C, T, H, W) clip, got shape {tuple(clip.shape)}")
    b, c, t, h, w = clip.shape
    height, width = map_shape(t, h, w, rows)
    if layout == "reshape":
        return clip.contiguous().reshape(b, c, height, width)
    if layout == "tile":
        return tile_frames(clip.transpose(1, 2), rows=rows)
    raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


class VideoUniRepLKNet(unireplknet.UniRepLKNet):
    """A :class:`~unireplknet.UniRepLKNet` whose input may be a clip: ``(B, 3, T, H, W)`` is laid out by
    :func:`clip_to_map` first, a ``(B, 3, H', W')`` map goes in as it is. Parameters and state-dict keys are the
    image network's (the authors' layout), so exports load into their code and into ``UniRepLKNet``.

    Args:
        layout: ``reshape`` (the authors') or ``tile``.
        rows: rows of the map in frame heights.
        **kwargs: :class:`~unireplknet.UniRepLKNet`'s.
    """

    def __init__(self, *, layout: str = "reshape", rows: int = 4, **kwargs):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
        super().__init__(**kwargs)
        self.layout, self.rows = layout, rows

    def forward(self, x: torch.Tensor):
        if x.dim() == 5:
            x = clip_to_map(x, self.layout, self.rows)
        return super().forward(x)
