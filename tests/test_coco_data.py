"""COCO data: targets aligned with the images, the two-policy augmentation, the layout checks, the aspect-grouped
resumable TrainLoader, damaged images and the exactly-once EvalLoader. Expected values come from the annotation
file (pycocotools ``annToMask``, the annotated boxes and sizes) and the demo's class colours, not from data.py."""
from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from collections import Counter

import fsspec
import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from finetune.coco.data import (MEAN, STD, EvalLoader, ImageSizeError, TrainLoader, _sample_rng, augment,
                                load_split, pad_batch)
from finetune.coco.demo_data import CATEGORIES, write_demo
from finetune.shapes import COLOURS
from finetune.coco.config import CocoConfig

# pycocotools' decode (annToMask) under numpy 2; not this project's code
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

_CATEGORY_IDS = [c["id"] for c in CATEGORIES]


def _config(**changes) -> CocoConfig:
    base = CocoConfig(num_classes=4, train_scales=(64, 96, 128), max_size=200, crop_resize_scales=(80, 100),
                      crop_size_range=(48, 80), size_divisor=32, eval_scale=(200, 120))
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> str:
    return write_demo(tmp_path_factory.mktemp("coco_data"), train_images=24, val_images=7, seed=0)["root"]


@pytest.fixture()
def demo_copy(tmp_path, demo) -> str:
    return shutil.copytree(demo, tmp_path / "coco")


def _pixels(image: torch.Tensor) -> np.ndarray:
    """Normalized (3, h, w) -> (h, w, 3) float RGB 0-255."""
    return image.permute(1, 2, 0).numpy() * np.array(STD) + np.array(MEAN)


def _nearest_class(colour: np.ndarray) -> int:
    """The category id whose demo colour (``finetune.shapes.COLOURS``) is nearest to ``colour``."""
    colours = {category["id"]: COLOURS[category["name"]] for category in CATEGORIES}
    return min(colours, key=lambda category: np.abs(np.array(colours[category]) - colour).sum())


def _all_samples(loader) -> list[tuple[torch.Tensor, dict]]:
    samples = []
    for images, targets in loader:
        for image, target in zip(images, targets):
            h, w = target["image_size"]
            assert not image[:, h:].any() and not image[:, :, w:].any()  # zero padding at the bottom / right
            samples.append((image[:, :h, :w], target))
    return samples


# ----------------------------------------------------------------------------------------------
# targets


def test_targets_match_the_annotations_without_augmentation(demo):
    split = load_split(demo, "train2017")
    coco = COCO(split.annotation_file)
    assert split.category_ids == tuple(_CATEGORY_IDS)
    loader = TrainLoader(split, _config(train_scales=(128,), crop_policy=False, hflip=0.0), batch_size=1, rank=0,
                         world_size=1, num_workers=0, seed=0)
    samples = _all_samples(loader)
    assert len(samples) == len(loader) == loader.num_images
    with_instances = {i["id"] for i in coco.dataset["images"]
                      if any(not a["iscrowd"] for a in coco.imgToAnns[i["id"]])}
    assert {t["image_id"] for _, t in samples} == with_instances  # images with only crowds / nothing: left out
    crowds_seen = 0
    for image, target in samples:
        info = coco.imgs[target["image_id"]]
        height, width = info["height"], info["width"]
        factor = min(200 / max(height, width), 128 / min(height, width))
        size = (int(height * factor + 0.5), int(width * factor + 0.5))
        assert target["image_size"] == size and tuple(image.shape[1:]) == size
        anns = coco.imgToAnns[target["image_id"]]
        crowds_seen += sum(a["iscrowd"] for a in anns)
        anns = [a for a in anns if not a["iscrowd"]]
        assert target["labels"].dtype == torch.int64 and target["masks"].dtype == torch.uint8
        assert [_CATEGORY_IDS[k] for k in target["labels"].tolist()] == [a["category_id"] for a in anns]
        sy, sx = size[0] / height, size[1] / width
        for box, mask, ann in zip(target["boxes"].numpy(), target["masks"].numpy(), anns):
            x, y, w, h = ann["bbox"]
            np.testing.assert_allclose(box, [x * sx, y * sy, (x + w) * sx, (y + h) * sy], atol=1e-3)
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            np.testing.assert_allclose([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], box, atol=1.5)
            reference = coco.annToMask(ann)
            assert mask.sum() == pytest.approx(reference.sum() * sx * sy, rel=0.15 if ann["area"] > 100 else 0.6)
            if mask.sum() >= 150:  # the image shows the object's class colour where the mask is
                assert _nearest_class(_pixels(image)[mask.astype(bool)].mean(0)) == ann["category_id"]
    assert crowds_seen > 0


def test_augmented_targets_stay_aligned_with_the_image(demo):
    split = load_split(demo, "train2017")
    loader = TrainLoader(split, _config(hflip=0.5), batch_size=2, rank=0, world_size=1, num_workers=0, seed=3)
    checked = 0
    for epoch in range(3):
        loader.set_epoch(epoch)
        for image, target in _all_samples(loader):
            boxes, masks = target["boxes"].numpy(), target["masks"].numpy().astype(bool)
            assert len(boxes) == len(masks) == len(target["labels"])
            h, w = target["image_size"]
            assert (boxes[:, 2] - boxes[:, 0] >= 1).all() and (boxes[:, 3] - boxes[:, 1] >= 1).all()
            assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()
            for box, mask, label in zip(boxes, masks, target["labels"].tolist()):
                if mask.sum() < 150:
                    continue
                rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
                assert cols[0] >= box[0] - 1.5 and cols[-1] + 1 <= box[2] + 1.5
                assert rows[0] >= box[1] - 1.5 and rows[-1] + 1 <= box[3] + 1.5
                assert _nearest_class(_pixels(image)[mask].mean(0)) == _CATEGORY_IDS[label]
                checked += 1
    assert checked > 20


# ----------------------------------------------------------------------------------------------
# augmentation


def _one_instance(height=150, width=180) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    masks = np.zeros((1, height, width), np.uint8)
    masks[0, 30:70, 20:60] = 1
    return image, np.array([[20, 30, 60, 70]], np.float32), masks


def test_flip_mirrors_image_masks_and_boxes():
    image, boxes, masks = _one_instance()
    plain = augment(image, boxes, masks, _config(crop_policy=False, hflip=0.0), _sample_rng(0, 0, 5))
    flipped = augment(image, boxes, masks, _config(crop_policy=False, hflip=1.0), _sample_rng(0, 0, 5))
    assert not plain[4]["flip"] and flipped[4]["flip"]
    w = plain[0].shape[1]
    np.testing.assert_array_equal(flipped[0], plain[0][:, ::-1])
    np.testing.assert_array_equal(flipped[2], plain[2][:, :, ::-1])
    (x1, y1, x2, y2), = plain[1]
    np.testing.assert_allclose(flipped[1], [[w - x2, y1, w - x1, y2]])
    rows, cols = np.flatnonzero(flipped[2][0].any(1)), np.flatnonzero(flipped[2][0].any(0))
    np.testing.assert_allclose([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], flipped[1][0], atol=1.5)


def test_augmentation_distribution():
    image, boxes, masks = _one_instance()
    config = _config(max_size=400, crop_resize_scales=(100, 120), hflip=0.5)
    short_a, crops, flips, policies = Counter(), [], 0, Counter()
    for draw in range(400):
        out, out_boxes, out_masks, kept, draws = augment(image, boxes, masks, config, _sample_rng(1, 0, draw))
        policies[draws["policy"]] += 1
        flips += draws["flip"]
        short = min(out.shape[:2])
        assert short in config.train_scales and out_masks.shape[1:] == out.shape[:2]
        assert len(out_boxes) == len(kept) == len(out_masks)
        if draws["policy"] == "a":
            short_a[short] += 1
            assert out.shape[:2] == (short, int(180 * short / 150 + 0.5))  # the aspect kept
        else:
            crops.append(draws["crop"])
    assert abs(policies["a"] - 200) < 40 and abs(flips - 200) < 40
    assert set(short_a) == set(config.train_scales)
    assert all(abs(n - policies["a"] / 3) < 0.35 * policies["a"] / 3 for n in short_a.values())
    crops = np.array(crops)
    for side in crops.T:  # height, width: the inclusive range, each end reached
        assert side.min() == 48 and side.max() == 80 and abs(side.mean() - 64) < 3.5
    # with a small max_size the longer side is limited instead
    for draw in range(20):
        out = augment(image, boxes, masks, _config(max_size=100), _sample_rng(1, 0, draw))[0]
        assert max(out.shape[:2]) <= 100
    # the same (seed, epoch, index) draws the same augmentation
    first = augment(image, boxes, masks, config, _sample_rng(2, 1, 7))
    again = augment(image, boxes, masks, config, _sample_rng(2, 1, 7))
    np.testing.assert_array_equal(first[0], again[0])
    assert first[4] == again[4]


def test_crop_drops_instances_outside_and_clips_the_rest():
    image, _, _ = _one_instance(100, 100)
    masks = np.zeros((2, 100, 100), np.uint8)
    masks[0, 0:100, 0:100] = 1  # everywhere: always kept, clipped to the crop
    masks[1, 0:5, 0:5] = 1  # a corner: dropped by most crops
    boxes = np.array([[0, 0, 100, 100], [0, 0, 5, 5]], np.float32)
    config = _config(crop_resize_scales=(100,), crop_size_range=(40, 60), train_scales=(100,), max_size=1000,
                     hflip=0.0)
    dropped = 0
    for draw in range(60):
        out, out_boxes, out_masks, kept, draws = augment(image, boxes, masks, config, _sample_rng(0, 0, draw))
        if draws["policy"] == "b":
            assert kept[0] == 0
            np.testing.assert_allclose(out_boxes[0], [0, 0, out.shape[1], out.shape[0]], atol=1e-3)
            dropped += kept.tolist() == [0]
    assert dropped > 5


# ----------------------------------------------------------------------------------------------
# layout


def test_missing_files_name_the_path(tmp_path, demo_copy):
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        load_split(str(tmp_path / "nothing"), "train2017")
    shutil.rmtree(demo_copy / "val2017")
    with pytest.raises(FileNotFoundError, match="val2017"):
        load_split(str(demo_copy), "val2017")
    (demo_copy / "annotations" / "instances_train2017.json").write_text('{"images": [], "categories": []}')
    with pytest.raises(ValueError, match="instances_train2017.json.*annotations"):
        load_split(str(demo_copy), "train2017")


def test_memory_filesystem_root(demo):
    fs = fsspec.filesystem("memory")
    fs.put(demo, "/coco_data_test", recursive=True)
    try:
        split = load_split("memory://coco_data_test", "val2017")
        assert len(split) == 7 and [r.image_id for r in split.images] == sorted(r.image_id for r in split.images)
        local = load_split(demo, "val2017")
        assert split.images == local.images
        evaluated = list(EvalLoader(split, _config(), rank=0, world_size=1, num_workers=0))
        assert all(image is not None for image, _ in evaluated) and len(evaluated) == 7
        reference = next(iter(EvalLoader(local, _config(), rank=0, world_size=1, num_workers=0)))[0]
        torch.testing.assert_close(evaluated[0][0], reference, rtol=0, atol=0)
    finally:
        fs.rm("/coco_data_test", recursive=True)


# ----------------------------------------------------------------------------------------------
# TrainLoader


def _is_wide(split) -> dict[int, bool]:
    return {r.image_id: r.width >= r.height for r in split.images}


def test_train_loader_groups_ranks_and_resumes(demo):
    split, config = load_split(demo, "train2017"), _config()
    loaders = [TrainLoader(split, config, batch_size=2, rank=r, world_size=2, num_workers=0, seed=4) for r in (0, 1)]
    wide = _is_wide(split)
    groups = Counter(wide[r.image_id] for r in split.images if any(not a["iscrowd"] for a in r.annotations))
    assert len(loaders[0]) == len(loaders[1]) == (groups[True] // 2 + groups[False] // 2) // 2
    epochs = []
    for loader in loaders:
        per_epoch = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader)
            for images, targets in batches:
                assert images.shape[0] == 2 and images.shape[2] % 32 == 0 and images.shape[3] % 32 == 0
                assert len({wide[t["image_id"]] for t in targets}) == 1  # one aspect group per batch
            per_epoch.append([t["image_id"] for _, targets in batches for t in targets])
        epochs.append(per_epoch)
    for epoch in range(2):
        assert not set(epochs[0][epoch]) & set(epochs[1][epoch])  # ranks see disjoint images
        assert len(set(epochs[0][epoch])) == len(epochs[0][epoch])
    assert epochs[0][0] != epochs[0][1]

    # exact mid-epoch resume, with another worker count
    reference = TrainLoader(split, config, batch_size=2, rank=1, world_size=2, num_workers=0, seed=4)
    expected = list(reference) + list(reference)  # epoch 0, then epoch 1
    interrupted = TrainLoader(split, config, batch_size=2, rank=1, world_size=2, num_workers=2, seed=4)
    seen = []
    for batch in interrupted:
        seen.append(batch)
        if len(seen) == 2:
            break
    state = interrupted.state_dict()
    assert state["batches_done"] == 2 and state["epoch"] == 0
    resumed = TrainLoader(split, config, batch_size=2, rank=1, world_size=2, num_workers=2, seed=4)
    resumed.load_state_dict(state)
    seen += list(resumed) + list(resumed)
    assert len(seen) == len(expected)
    for (images, targets), (images_ref, targets_ref) in zip(seen, expected):
        torch.testing.assert_close(images, images_ref, rtol=0, atol=0)
        for target, target_ref in zip(targets, targets_ref):
            assert target.keys() == target_ref.keys()
            for key in target:
                if isinstance(target[key], torch.Tensor):
                    torch.testing.assert_close(target[key], target_ref[key], rtol=0, atol=0)
                else:
                    assert target[key] == target_ref[key]
    with pytest.raises(ValueError, match="batch_size=2"):
        TrainLoader(split, config, batch_size=1, rank=1, world_size=2, num_workers=0, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="num_classes"):
        TrainLoader(split, _config(num_classes=80), batch_size=2, rank=0, world_size=1, num_workers=0, seed=4)


# ----------------------------------------------------------------------------------------------
# damaged images


def _truncate(path, fraction=1 / 3) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])


def test_damaged_images_are_skipped_and_counted(demo_copy, caplog):
    split = load_split(str(demo_copy), "train2017")
    trainable = [r for r in split.images if any(not a["iscrowd"] for a in r.annotations)]
    wide = [r for r in trainable if r.width >= r.height]
    tall = [r for r in trainable if r.width < r.height]
    truncated, garbage = wide[2], tall[1]  # one of each aspect group: each is replaced by a readable image
    _truncate(demo_copy / "train2017" / truncated.file_name)
    (demo_copy / "train2017" / garbage.file_name).write_bytes(b"not a jpeg at all" * 50)
    for workers in (2, 0):  # the counts come back from loader workers; their warnings stay in their process
        loader = TrainLoader(split, _config(), batch_size=1, rank=0, world_size=1, num_workers=workers, seed=0)
        with caplog.at_level(logging.WARNING, logger="finetune.coco.data"):
            ids = [t["image_id"] for _, targets in loader for t in targets]
        assert len(ids) == len(loader) == len(trainable)
        assert truncated.image_id not in ids and garbage.image_id not in ids
        assert loader.bad_samples == 2 and loader.state_dict()["bad_samples"] == 2

    val = load_split(str(demo_copy), "val2017")
    _truncate(demo_copy / "val2017" / val.images[3].file_name, 0.5)
    evaluated = list(EvalLoader(val, _config(), rank=0, world_size=1, num_workers=0))
    assert [meta[0]["image_id"] for _, meta in evaluated] == [r.image_id for r in val.images]
    assert [image is None for image, _ in evaluated] == [k == 3 for k in range(len(val))]
    assert evaluated[3][1][0]["orig_size"] == (val.images[3].height, val.images[3].width)
    messages = "\n".join(record.getMessage() for record in caplog.records)
    for record in (truncated, garbage, val.images[3]):
        assert record.file_name in messages


def test_image_of_another_size(demo_copy):
    split = load_split(str(demo_copy), "val2017")
    path = demo_copy / "val2017" / split.images[1].file_name
    Image.open(path).resize((50, 40)).save(path)
    with pytest.raises(ImageSizeError, match=split.images[1].file_name):
        list(EvalLoader(split, _config(), rank=0, world_size=1, num_workers=0))
    train = load_split(str(demo_copy), "train2017")
    record = next(r for r in train.images if any(not a["iscrowd"] for a in r.annotations))
    path = demo_copy / "train2017" / record.file_name
    Image.open(path).resize((50, 40)).save(path)
    loader = TrainLoader(train, _config(), batch_size=1, rank=0, world_size=1, num_workers=0, seed=0)
    assert record.image_id not in [t["image_id"] for _, targets in loader for t in targets]
    assert loader.bad_samples == 1


# ----------------------------------------------------------------------------------------------
# EvalLoader


@pytest.mark.parametrize("method", ["opencv", "pillow"])
def test_eval_loader_covers_every_image_once(demo, method):
    """Every image once over 2 ranks, resized as mmdet's ``Resize(keep_ratio=True)`` by ``coco.eval_resize``:
    ``cv2.resize`` INTER_LINEAR (mmcv's ``imresize``, the default) or Pillow's bilinear, compared with each
    library called directly."""
    split, config = load_split(demo, "val2017"), _config(eval_scale=(200, 120), eval_resize=method)
    coco = COCO(split.annotation_file)
    assert any(not coco.imgToAnns[i] for i in coco.getImgIds())  # images without annotations are there too
    loaders = [EvalLoader(split, config, rank=r, world_size=2, num_workers=2 - r) for r in (0, 1)]
    assert [len(loader) for loader in loaders] == [4, 3] and sum(l.num_samples for l in loaders) == len(split)
    ids = []
    for loader in loaders:
        for image, (meta,) in loader:
            info = coco.imgs[meta["image_id"]]
            ids.append(meta["image_id"])
            h0, w0 = info["height"], info["width"]
            assert meta["orig_size"] == (h0, w0) == Image.open(f"{demo}/val2017/{info['file_name']}").size[::-1]
            factor = min(200 / max(h0, w0), 120 / min(h0, w0))
            h, w = int(h0 * factor + 0.5), int(w0 * factor + 0.5)
            assert meta["image_size"] == (h, w) and max(h, w) <= 200 and min(h, w) <= 120
            assert meta["scale"] == pytest.approx((h / h0, w / w0))
            assert image.shape == (1, 3, math.ceil(h / 32) * 32, math.ceil(w / 32) * 32)
            assert not image[0, :, h:].any() and not image[0, :, :, w:].any()
            original = Image.open(f"{demo}/val2017/{info['file_name']}").convert("RGB")
            if method == "pillow":
                reference = np.asarray(original.resize((w, h), Image.BILINEAR), np.float32)
            else:
                reference = cv2.resize(np.asarray(original), (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
            np.testing.assert_allclose(_pixels(image[0, :, :h, :w]), reference, atol=1e-3)
        assert loader.bad_samples == 0
    assert sorted(ids) == sorted(coco.getImgIds()) and len(ids) == len(set(ids))


def test_pad_batch():
    images = [torch.ones(3, 33, 20), torch.full((3, 10, 70), 2.0)]
    batch = pad_batch(images, 32)
    assert batch.shape == (2, 3, 64, 96)
    assert batch[0, :, :33, :20].eq(1).all() and batch[0].sum() == 3 * 33 * 20
    assert batch[1, :, :10, :70].eq(2).all() and batch[1].sum() == 2 * 3 * 10 * 70
