"""The train path's decoding and augmentation against their references: Pillow's decoder and timm's
composed transform (``timm.data.create_transform``), over many seeded draws on real photographs.

The train path makes timm's random draws in timm's order, so the crops, flips, RandAugment ops
and erasing regions are timm's own; only the resampling of the crop runs in torch (its uint8
antialiased kernels are a port of Pillow's), so pixels may differ by rounding. These tests hold
both to that: identical draws, identical crop parameters, and pixel values and statistics that
agree with timm's to within rounding.
"""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation

from shards import AugmentConfig
from shards.image import TrainAugment, decode_sample_pixels
from shards.samples import BadSampleError
from shards.seeding import seed_global_rngs

pytest.importorskip("skimage")
from shards.photos import photo_jpeg  # noqa: E402

LEVEL = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255  # one 8-bit level, in normalized units


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [photo_jpeg(index, seed=0)[1] for index in range(24)]


def _sample(data: bytes, extension: str = "jpg") -> dict:
    return {"__url__": "mem://shard.tar", "__key__": "k", extension: data, "cls": b"3"}


def _pil_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _rng_states() -> tuple:
    return random.getstate(), np.random.get_state()[1].tobytes(), torch.get_rng_state().numpy().tobytes()


def _encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def test_decoded_pixels_are_pillows(photos):
    """Colour, progressive and greyscale JPEGs (torchvision's libjpeg-turbo), CMYK JPEGs and PNGs with
    alpha (Pillow): the same uint8 RGB pixels as the PIL path gives, label parsed the same way."""
    photo = Image.open(io.BytesIO(photos[0]))
    cases = {
        "baseline": photos[0],
        "progressive": _encode(photo, "JPEG", quality=85, progressive=True),
        "greyscale": _encode(photo.convert("L"), "JPEG", quality=90),
        "cmyk": _encode(photo.convert("CMYK"), "JPEG", quality=90),
        "subsampling 4:4:4": _encode(photo, "JPEG", quality=95, subsampling=0),
    }
    for name, data in cases.items():
        pixels, label = decode_sample_pixels(_sample(data), num_classes=10)
        assert label == 3 and pixels.dtype == torch.uint8 and pixels.shape[2] == 3, name
        assert np.array_equal(pixels.numpy(), _pil_pixels(data)), name
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    pixels, _ = decode_sample_pixels(_sample(_encode(rgba, "PNG"), "png"), num_classes=None)
    composited = Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba).convert("RGB")
    assert np.array_equal(pixels.numpy(), np.asarray(composited))


def test_damaged_jpegs_are_judged_as_pillow_judges_them(photos):
    """Cut at arbitrary offsets: a bad sample naming shard and key (Pillow's verdict and message); a
    flipped bit Pillow decodes past gives Pillow's pixels."""
    rng = random.Random(0)
    for data in photos[:8]:
        cut = data[:rng.randrange(2, len(data) - 2)]
        with pytest.raises(BadSampleError, match=r"mem://shard.tar key 'k': jpg does not decode"):
            decode_sample_pixels(_sample(cut), num_classes=None)
        flipped = bytearray(data)
        flipped[rng.randrange(len(data) // 4, len(data) - 2)] ^= 1 << rng.randrange(8)
        try:
            expected = _pil_pixels(bytes(flipped))
        except OSError:
            with pytest.raises(BadSampleError):
                decode_sample_pixels(_sample(bytes(flipped)), num_classes=None)
            continue
        pixels, _ = decode_sample_pixels(_sample(bytes(flipped)), num_classes=None)
        assert np.array_equal(pixels.numpy(), expected)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("img_size", [224, 384])  # mostly downscaling at 224, mostly upscaling at 384
def test_torch_crop_resamples_as_pillow_does(photos, img_size, interpolation):
    """The crop, resampled in torch, against timm's PIL crop of the same draw: over 150 draws most
    values equal, nearly all within one level, none far off."""
    augment = TrainAugment(img_size, AugmentConfig(interpolation=interpolation))
    reference = RandomResizedCropAndInterpolation(img_size, interpolation=interpolation)
    differences = []
    for seed in range(150):
        data = photos[seed % len(photos)]
        pixels, _ = decode_sample_pixels(_sample(data), num_classes=None)
        seed_global_rngs(seed)
        expected = np.asarray(reference(Image.open(io.BytesIO(data)).convert("RGB")), dtype=np.int16)
        after_reference = _rng_states()
        seed_global_rngs(seed)
        cropped = np.asarray(augment.cropped(pixels), dtype=np.int16)
        assert _rng_states() == after_reference, seed
        differences.append(np.abs(cropped - expected).ravel())
    difference = np.concatenate(differences)
    assert (difference == 0).mean() > 0.9
    assert (difference <= 1).mean() > 0.999
    assert difference.max() <= 16


def test_train_augment_keeps_timms_draws_and_distribution(photos, monkeypatch):
    """The whole train augmentation (crop, flip, rand-m9-mstd0.5-inc1, normalize, erasing 0.25) against
    timm's composed transform over 300 seeded draws: the same random draws (RNG states after each
    image), the same crop parameters, per-image values within rounding of timm's, and the same
    per-channel pixel statistics."""
    crops: list[tuple] = []
    get_params = RandomResizedCropAndInterpolation.get_params

    def recorded(img, scale, ratio):
        crops.append(get_params(img, scale, ratio))
        return crops[-1]

    monkeypatch.setattr(RandomResizedCropAndInterpolation, "get_params", staticmethod(recorded))
    augment = TrainAugment(224, AugmentConfig())
    slot = torch.empty(3, 224, 224)
    ours, theirs, mean_differences, erased = [], [], [], 0
    for seed in range(300):
        data = photos[seed % len(photos)]
        pixels, _ = decode_sample_pixels(_sample(data), num_classes=None)
        seed_global_rngs(seed)
        expected = augment(Image.open(io.BytesIO(data)).convert("RGB"))
        after_reference = _rng_states()
        seed_global_rngs(seed)
        augment.into(slot, pixels)
        assert _rng_states() == after_reference, seed
        assert crops[-1] == crops[-2], seed
        mean_differences.append(((slot - expected) / LEVEL).abs().mean().item())
        ours.append(slot.clone())
        theirs.append(expected)
        erased += bool((expected.abs() > 3).any())
    assert erased > 30  # erasing (N(0, 1) noise) drew regions in some of the 300 images
    scales = [h * w for _, _, h, w in crops[::2]]
    assert len(set(scales)) > 250  # the crops are random draws, not one fixed crop
    assert np.median(mean_differences) < 0.05 and np.mean(mean_differences) < 0.5
    ours_stack, theirs_stack = torch.stack(ours), torch.stack(theirs)
    for statistic in (torch.mean, torch.std):
        assert torch.allclose(statistic(ours_stack, dim=(0, 2, 3)), statistic(theirs_stack, dim=(0, 2, 3)), atol=2e-3)


def test_tensor_side_is_timms_bit_for_bit(photos):
    """With a crop torch does not resample (nearest: timm's PIL crop runs), the batch path is timm's
    composed transform exactly: ToTensor, Normalize and random erasing in place in an NHWC slot."""
    augment = TrainAugment(96, AugmentConfig(interpolation="nearest"))
    assert augment.crop is None
    batch = torch.empty(2, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    for seed in range(60):
        data = photos[seed % len(photos)]
        pixels, _ = decode_sample_pixels(_sample(data), num_classes=None)
        seed_global_rngs(seed)
        expected = augment(Image.open(io.BytesIO(data)).convert("RGB"))
        for slot in batch[0], torch.empty(3, 96, 96):  # NHWC and NCHW strides
            seed_global_rngs(seed)
            augment.into(slot, pixels)
            assert torch.equal(slot, expected), seed


def test_few_pixel_images_are_augmented_not_fatal():
    """timm's crop of a 1- or 2-pixel image can round to zero rows or columns; one bad image in
    millions must not end a run: the crop keeps at least one pixel."""
    augment = TrainAugment(32, AugmentConfig())
    slot = torch.empty(3, 32, 32)
    for height, width in ((1, 1), (1, 3), (2, 1), (2, 2)):
        pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8)
        for seed in range(40):
            seed_global_rngs(seed)
            augment.into(slot, pixels)
            assert torch.isfinite(slot).all()
