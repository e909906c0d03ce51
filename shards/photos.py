"""Benchmark photographs: crops of scikit-image's sample photos as ImageNet-like JPEGs.

JPEG decoding and augmentation cost depends on image content and size, so the reader benchmark
(``python -m shards bench --compare``) needs real photographs, not the tiny generated digits.
Sample ``i`` is a random crop (area 25-100%, aspect 3:4 to 4:3) of one of scikit-image's colour
photographs, resized so its shorter side is 330-500 px (ImageNet's typical range), JPEG quality
90; the same ``(seed, i)`` always gives the same bytes. Needs ``scikit-image`` (``pip install
scikit-image``; it carries the photos, nothing is downloaded).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image

from .sources import Mapper, SourceItem

PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
DEFAULT_PHOTO_SAMPLES = 1500
SHORTER_SIDE = (330, 500)


@lru_cache(maxsize=None)
def _photo(name: str) -> Image.Image:
    try:
        import skimage.data
    except ImportError as exc:
        raise ImportError("the photos source needs scikit-image (pip install scikit-image)") from exc
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def photo_jpeg(index: int, seed: int) -> tuple[str, bytes]:
    """``(photo name, JPEG bytes)`` of benchmark sample ``index``."""
    rng = np.random.default_rng([seed, index])
    name = PHOTO_NAMES[index % len(PHOTO_NAMES)]
    photo = _photo(name)
    width, height = photo.size
    area = rng.uniform(0.25, 1.0) * width * height
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    crop_w = int(min(width, round(np.sqrt(area * aspect))))
    crop_h = int(min(height, round(np.sqrt(area / aspect))))
    left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    crop = photo.crop((left, top, left + crop_w, top + crop_h))
    shorter = int(rng.integers(SHORTER_SIDE[0], SHORTER_SIDE[1] + 1))
    scale = shorter / min(crop_w, crop_h)
    image = crop.resize((max(1, round(crop_w * scale)), max(1, round(crop_h * scale))), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return name, buffer.getvalue()


@dataclass
class PhotoSource:
    """The ``photos`` source of ``python -m shards write``: see the module docstring."""

    num_samples: int | None = None
    seed: int = 0
    description: str = "photos (crops of scikit-image's sample photographs)"
    archive_layout: bool = False
    unreadable: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.num_samples = self.num_samples or DEFAULT_PHOTO_SAMPLES

    def list_items(self, map_fn: Mapper, progress: bool) -> list[SourceItem]:
        return [SourceItem(f"photos/{PHOTO_NAMES[i % len(PHOTO_NAMES)]}_{i:06d}.jpg",
                           PHOTO_NAMES[i % len(PHOTO_NAMES)], 100_000, -1, i) for i in range(self.num_samples)]

    def read_many(self, items: Sequence[SourceItem]) -> list[bytes]:
        return [photo_jpeg(item.offset, self.seed)[1] for item in items]
