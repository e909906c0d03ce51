"""The shapes the generated demo sets draw (``finetune.{coco,ade20k}.demo_data``): masks and class colours."""
from __future__ import annotations

import numpy as np

__all__ = ["COLOURS", "shape_mask"]

COLOURS: dict[str, tuple[int, int, int]] = {
    "disk": (210, 50, 50), "square": (50, 80, 210), "triangle": (225, 195, 50), "ring": (50, 170, 80)}
"""Each shape's class-typical RGB colour (the generators jitter it per object)."""


def shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """The boolean mask of ``shape`` (one of :data:`COLOURS`) of radius ``r`` centred at ``(cx, cy)``, rotated by
    ``angle``, over the pixel-coordinate grids ``xx``, ``yy``."""
    dx, dy = xx - cx, yy - cy
    if shape == "disk":
        return dx * dx + dy * dy <= r * r
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    if shape == "square":
        half = 0.8 * r
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if shape != "triangle":
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(COLOURS)}")
    # equilateral triangle of circumradius r: inside all three edges (distance r/2 from the centre)
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):
        t = 2 * np.pi * k / 3
        inside &= np.cos(t) * u + np.sin(t) * v <= 0.5 * r
    return inside
