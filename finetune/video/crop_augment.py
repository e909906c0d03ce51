"""RandAugment computed only where a clip's random resized crop will look: the same frames, value for value, as
RandAugment on the whole frame followed by the crop (VideoMAE v2's order), for less work.

A clip's RandAugment ops are drawn once (timm's transform run on a tiny probe image under the clip's seed, each
op's function and arguments recorded), then applied to each frame backwards from the crop box: a point-wise op
needs the same region of its input, a sharpening op that region and 2 pixels around it, a geometric op (shear,
translate, rotate: one affine map, resampled bicubically) the bounding box of the region's preimage and 3 pixels
around it (the bicubic support), an op that reads whole-image statistics (autocontrast, equalize, contrast) the
whole frame. Each op then runs on its region only: point-wise and local ops on the sub-image, geometric ops as
Pillow's affine transform of the sub-image with the map shifted to the regions' origins, which samples the
same points (to the last bits of a double) with the same edge rules, because every region is either inside the
frame by the margin or clipped at the frame's own edge. A clip whose ops are not all of these kinds is
augmented on whole frames as before.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from shards.seeding import seed_global_rngs, seeded_global_rngs

__all__ = ["Op", "augment_crop", "recorded_ops"]

Box = tuple[int, int, int, int]
"""(left, top, right, bottom), right and bottom exclusive."""

POINTWISE = frozenset({"invert", "solarize", "solarize_add", "posterize", "_posterize_keeping_zero_bits", "color",
                       "brightness"})
WHOLE_IMAGE = frozenset({"auto_contrast", "equalize", "contrast"})
LOCAL_MARGIN = {"sharpness": 2}
"""Ops that read a pixel's neighbours: the margin they need (sharpness: a 3 x 3 smoothing)."""
GEOMETRIC = frozenset({"shear_x", "shear_y", "translate_x_rel", "translate_y_rel", "translate_x_abs",
                       "translate_y_abs", "rotate"})
BICUBIC_MARGIN = 3
"""Pixels around a geometric op's preimage: the bicubic kernel reads 2 on each side of a sample point."""


@dataclass(frozen=True)
class Op:
    """One applied RandAugment op: timm's function, its level arguments and keyword arguments."""

    fn: Callable
    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.fn.__name__


_RECORDERS: dict[int, tuple] = {}


def recorded_ops(transform, seed: int) -> list[Op] | None:
    """The ops ``transform`` (timm's RandAugment) applies to every frame of a clip seeded with ``seed`` (the
    global RNGs seeded as for each frame, and restored afterwards); None when one of them is of a kind
    :func:`augment_crop` does not know (or draws a resampling filter at random)."""
    from PIL import Image

    if id(transform) not in _RECORDERS:
        recorder, log = copy.deepcopy(transform), []
        for op in recorder.ops:
            op.aug_fn = _recording(op.aug_fn, log)
        _RECORDERS[id(transform)] = (transform, recorder, log)  # the transform kept alive with its id
    _, recorder, log = _RECORDERS[id(transform)]
    log.clear()
    with seeded_global_rngs(seed):
        seed_global_rngs(seed)
        recorder(Image.new("RGB", (8, 8)))
    ops = list(log)
    for op in ops:
        known = op.name in POINTWISE | WHOLE_IMAGE | GEOMETRIC or op.name in LOCAL_MARGIN
        if not known or isinstance(op.kwargs.get("resample"), (list, tuple)):
            return None
    return ops


def _recording(fn: Callable, log: list) -> Callable:
    def record(img, *args, **kwargs):
        log.append(Op(fn, args, dict(kwargs)))
        return fn(img, *args, **kwargs)

    return record


def _affine(op: Op, width: int, height: int) -> list[float] | None:
    """The map from output to input pixel coordinates Pillow uses for ``op`` on a ``width`` x ``height`` frame;
    None where Pillow takes another path (rotations by multiples of 90 degrees)."""
    name, value = op.name, op.args[0]
    if name == "shear_x":
        return [1, value, 0, 0, 1, 0]
    if name == "shear_y":
        return [1, 0, 0, value, 1, 0]
    if name == "translate_x_rel":
        return [1, 0, value * width, 0, 1, 0]
    if name == "translate_y_rel":
        return [1, 0, 0, 0, 1, value * height]
    if name == "translate_x_abs":
        return [1, 0, value, 0, 1, 0]
    if name == "translate_y_abs":
        return [1, 0, 0, 0, 1, value]
    angle = value % 360.0  # rotate: Image.rotate's matrix about the centre
    if angle % 90.0 == 0:
        return None
    angle = -math.radians(angle)
    cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
    matrix = [cos, sin, 0.0, round(-math.sin(angle), 15), cos, 0.0]
    cx, cy = width / 2, height / 2
    matrix[2] = matrix[0] * -cx + matrix[1] * -cy + matrix[2] + cx
    matrix[5] = matrix[3] * -cx + matrix[4] * -cy + matrix[5] + cy
    return matrix


def _clip(box: tuple[float, float, float, float], full: Box) -> Box:
    return (max(full[0], math.floor(box[0])), max(full[1], math.floor(box[1])),
            min(full[2], math.ceil(box[2])), min(full[3], math.ceil(box[3])))


def _needed_input(op: Op, out: Box, full: Box) -> Box:
    """The region of ``op``'s input that its output region ``out`` depends on."""
    if op.name in POINTWISE:
        return out
    if op.name in LOCAL_MARGIN:
        m = LOCAL_MARGIN[op.name]
        return _clip((out[0] - m, out[1] - m, out[2] + m, out[3] + m), full)
    matrix = _affine(op, full[2], full[3]) if op.name in GEOMETRIC else None
    if matrix is None or out == full:
        return full
    a, b, c, d, e, f = matrix
    corners = [(x + 0.5, y + 0.5) for x in (out[0], out[2] - 1) for y in (out[1], out[3] - 1)]
    xs = [a * x + b * y + c for x, y in corners]
    ys = [d * x + e * y + f for x, y in corners]
    m = BICUBIC_MARGIN
    need = _clip((min(xs) - m, min(ys) - m, max(xs) + m, max(ys) + m), full)
    return need if need[2] > need[0] and need[3] > need[1] else full


def _apply(op: Op, image, region: Box, want: Box, full: Box):
    """``op`` on ``image`` (the ``region`` of its input), returning the ``want`` region of its output."""
    from PIL import Image

    matrix = _affine(op, full[2], full[3]) if op.name in GEOMETRIC else None
    if matrix is not None:
        a, b, c, d, e, f = matrix
        shifted = (a, b, a * want[0] + b * want[1] + c - region[0], d, e, d * want[0] + e * want[1] + f - region[1])
        size = (want[2] - want[0], want[3] - want[1])
        return image.transform(size, Image.Transform.AFFINE, shifted, resample=op.kwargs["resample"],
                               fillcolor=op.kwargs.get("fillcolor"))
    out = op.fn(image, *op.args, **op.kwargs)
    if want == region:
        return out
    return out.crop((want[0] - region[0], want[1] - region[1], want[2] - region[0], want[3] - region[1]))


def augment_crop(frames: np.ndarray, ops: list[Op], box: Box) -> np.ndarray:
    """``box`` of each of ``frames`` (T, H, W, 3 uint8) after ``ops``: equal to applying ``ops`` to the whole
    frames and cropping. The regions each op needs are worked out once for the clip."""
    from PIL import Image

    full = (0, 0, frames.shape[2], frames.shape[1])
    needs = [box]  # needs[k + 1]: the region of op k's output that is needed; needs[0]: of the frame
    for op in reversed(ops):
        needs.append(_needed_input(op, needs[-1], full))
    needs.reverse()
    out = []
    for frame in frames:
        image = Image.fromarray(frame)
        region = needs[0]
        current = image if region == full else image.crop(region)
        for op, want in zip(ops, needs[1:]):
            current = _apply(op, current, region, want, full)
            region = want
        out.append(np.asarray(current))  # region == box: needs[-1]
    return np.stack(out)
