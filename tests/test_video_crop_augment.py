"""RandAugment computed only where the crop looks (issue 21 point 13's loader speed) gives the frames RandAugment
on the whole frame then the crop gives, value for value: photographs, every op of VideoMAE v2's policy, crops of
every scale the recipe draws, boxes on the frame's edges."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from finetune.video.crop_augment import augment_crop, recorded_ops
from finetune.video.data import _rand_augment, rand_augment_frames, resized_crop_box

POLICY = "rand-m7-n4-mstd0.5-inc1"


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    from skimage import data

    return [np.asarray(Image.fromarray(image).convert("RGB").resize((340, 256))) for image in
            (data.astronaut(), data.coffee(), data.chelsea(), data.rocket())]


def test_the_crop_of_the_augmented_frame_is_computed_exactly(photos):
    transform = _rand_augment(POLICY, 224)
    rng = np.random.default_rng(0)
    seen: set[str] = set()
    for trial in range(240):
        frame = photos[trial % len(photos)]
        seed = int(rng.integers(2 ** 31))
        top, left, h, w = resized_crop_box(256, 340, (0.08, 1.0), (0.75, 4 / 3), rng)
        if trial % 40 == 0:  # boxes on the frame's edges and the whole frame
            top, left, h, w = [(0, 0, 256, 340), (256 - h, 340 - w, h, w), (0, 340 - w, h, w)][trial // 40 % 3]
        expected = rand_augment_frames(frame[None], transform, seed)[0, top:top + h, left:left + w]
        ops = recorded_ops(transform, seed)
        assert ops is not None
        seen.update(op.name for op in ops)
        np.testing.assert_array_equal(augment_crop(frame[None], ops, (left, top, left + w, top + h))[0], expected,
                                      err_msg=f"trial {trial}: {[op.name for op in ops]}")
    assert len(seen) == 15, seen  # every op of the policy was exercised


def test_the_recorded_ops_leave_the_global_rngs_as_they_were():
    import random

    transform = _rand_augment(POLICY, 224)
    random.seed(5)
    np.random.seed(5)
    before = random.random(), np.random.random()
    random.seed(5)
    np.random.seed(5)
    recorded_ops(transform, 123)
    assert (random.random(), np.random.random()) == before


def test_ops_it_does_not_know_fall_back_to_whole_frames():
    """A random choice of resampling filter (timm's default hparams for geometric ops) is drawn inside the op,
    so such a clip is not replayed: ``None``, and the caller augments whole frames."""
    from timm.data.auto_augment import rand_augment_transform

    from finetune.video.crop_augment import GEOMETRIC

    transform = rand_augment_transform(POLICY, {"translate_const": 100})  # resample: bilinear or bicubic at random
    results = [recorded_ops(transform, seed) for seed in range(20)]
    assert any(ops is None for ops in results)
    assert all(op.name not in GEOMETRIC for ops in results if ops is not None for op in ops)
