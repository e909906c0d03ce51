"""The generated demo dataset: scikit-learn's 8x8 handwritten digits drawn as small colour images.

Each sample renders one digit at a random scale and position, a bright stroke in a random
colour on a darker random background, with pixel noise. The train and val splits draw from disjoint digit scans
(every fifth scan is val), so val accuracy measures generalization; a small network learns it
in a few hundred steps. Samples are PNG, so writing them exercises the JPEG re-encoding path.
"""
from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

DEMO_SPLITS = ("train", "val")
DEMO_CLASSES = tuple(f"digit_{d}" for d in range(10))
DEFAULT_DEMO_SAMPLES = {"train": 2000, "val": 500}
VAL_EVERY = 5


@lru_cache(maxsize=1)
def _digit_scans() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def demo_scan_indices(split: str) -> np.ndarray:
    """Indices of the digit scans a split draws from (disjoint between train and val)."""
    if split not in DEMO_SPLITS:
        raise ValueError(f"demo split must be one of {DEMO_SPLITS}, got {split!r}")
    indices = np.arange(len(_digit_scans()[1]))
    is_val = indices % VAL_EVERY == 0
    return indices[is_val] if split == "val" else indices[~is_val]


def demo_sample_scan(split: str, index: int, seed: int) -> int:
    """The scan that demo sample ``index`` of ``split`` renders: every scan once, then again."""
    scans = demo_scan_indices(split)
    order = np.random.default_rng([seed, DEMO_SPLITS.index(split)]).permutation(len(scans))
    return int(scans[order[index % len(scans)]])


def demo_label(split: str, index: int, seed: int) -> int:
    """The digit (class label) of demo sample ``index``."""
    return int(_digit_scans()[1][demo_sample_scan(split, index, seed)])


def render_demo_image(split: str, index: int, seed: int, image_size: int) -> Image.Image:
    """Draw demo sample ``index`` as an RGB image of ``image_size`` pixels square."""
    scan = _digit_scans()[0][demo_sample_scan(split, index, seed)]
    rng = np.random.default_rng([seed, DEMO_SPLITS.index(split), index, 1])
    glyph_size = max(8, int(image_size * rng.uniform(0.55, 0.9)))
    glyph = Image.fromarray((scan * 255).astype(np.uint8)).resize((glyph_size, glyph_size), Image.Resampling.BILINEAR)
    mask = np.zeros((image_size, image_size), np.float32)
    top, left = rng.integers(0, image_size - glyph_size + 1, size=2)
    mask[top : top + glyph_size, left : left + glyph_size] = np.asarray(glyph, np.float32) / 255.0
    background = rng.uniform(0, 100, size=3)
    foreground = background + rng.uniform(110, 155, size=3)
    pixels = background * (1 - mask[..., None]) + foreground * mask[..., None]
    pixels += rng.normal(0, 8, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def demo_png(split: str, index: int, seed: int, image_size: int) -> bytes:
    """Demo sample ``index`` encoded as PNG."""
    buffer = io.BytesIO()
    render_demo_image(split, index, seed, image_size).save(buffer, "PNG")
    return buffer.getvalue()
