"""COCO annotation files checked when a split is loaded: broken annotations left out of training, named and
counted per rule; their images left out of COCOeval's score and out of ``samples``; a file cut or flipped at
any offset named in the error, in both splits. Expected counts come from the damage the tests make; expected
APs from pycocotools on the file with the unscored images removed by hand."""
from __future__ import annotations

import copy
import json
import logging
import math
import re
import shutil
from collections import Counter

import numpy as np
import pytest

from finetune.coco.annotations import RULES, AnnotationFileError
from finetune.coco.data import TrainLoader, load_split
from finetune.coco.demo_data import write_demo
from finetune.coco.metrics import STAT_NAMES, CocoEvaluator
from finetune.coco.config import CocoConfig
from pretrain.distributed import WorldInfo
from test_coco_parts import _noisy_predictions

# pycocotools' decode (annToMask) under numpy 2; not this project's code
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> str:
    return write_demo(tmp_path_factory.mktemp("coco_annotations"), train_images=24, val_images=12, seed=0)["root"]


def _config() -> CocoConfig:
    return CocoConfig(num_classes=4, train_scales=(128,), max_size=200, crop_policy=False, hflip=0.0, size_divisor=32,
                      eval_scale=(200, 120))


def _ordinary(annotations: list[dict]) -> dict[int, list[dict]]:
    """Non-crowd annotations per image id."""
    by_image: dict[int, list[dict]] = {}
    for ann in annotations:
        if not ann["iscrowd"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
    return by_image


def test_broken_training_annotations_are_left_out_named_and_counted(demo, tmp_path, caplog):
    root = shutil.copytree(demo, tmp_path / "coco")
    path = root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    anns = data["annotations"]
    ordinary = _ordinary(anns)
    # an image with several objects loses one to a two-point polygon and keeps the others
    kept_image = next(i for i, a in ordinary.items() if len(a) >= 3)
    two_points = ordinary[kept_image][0]
    others = [a for a in anns if a["image_id"] != kept_image and not a["iscrowd"]]
    crowd = next(a for a in anns if a["iscrowd"])
    two_points["segmentation"] = [[10.0, 10.0, 30.0, 12.0]]
    damage = {  # rule -> the annotations that break it, in file order (ids; #position without one)
        "polygon": [two_points["id"]], "category": [others[0]["id"]], "bbox": [others[1]["id"]],
        "image": [others[2]["id"]], "rle": [others[3]["id"]], "empty box": [others[4]["id"]],
        "iscrowd": [others[5]["id"]], "unique id": [others[6]["id"]] * 2, "fields": [others[7]["id"], f"#{len(anns)}"],
    }
    others[0]["category_id"] = 42
    others[1]["bbox"][2] = -3.0
    others[2]["image_id"] = 999999
    others[3]["segmentation"]["size"] = [7, 9]
    others[4]["bbox"][3] = 0.0
    others[5]["iscrowd"] = 2
    crowd["id"] = others[6]["id"]
    del others[7]["bbox"]
    anns.append("not an annotation")
    path.write_text(json.dumps(data))

    with caplog.at_level(logging.INFO, logger="finetune.coco.data"):
        split = load_split(str(root), "train2017")
        loader = TrainLoader(split, _config(), batch_size=1, rank=0, world_size=1, num_workers=2, seed=0)
    counts = Counter(b.rule.name for b in split.broken)
    assert counts == {rule: len(ids) for rule, ids in damage.items()}
    assert sorted(b.label for b in split.broken) == sorted(str(i) for ids in damage.values() for i in ids)
    (warning,) = [r.getMessage() for r in caplog.records
                  if r.levelno == logging.WARNING and r.name == "finetune.coco.data"]
    assert f"{path}: 11 of {len(anns)} annotations break the COCO format" in warning
    expected = {rule.name: rule.expected for rule in RULES}
    for rule, ids in damage.items():
        assert f"{rule} ({expected[rule]}): {len(ids)}, id {', '.join(map(str, ids))}" in warning
    assert "an evaluation leaves their images unscored" in warning
    summary = next(r.getMessage() for r in caplog.records if "left out of training" in r.getMessage()
                   and r.levelno == logging.INFO)
    assert "11 annotations break the COCO format" in summary and "polygon 1" in summary

    broken_ids = {i for ids in damage.values() for i in ids}
    records = {r.image_id: r for r in split.images}
    assert not {a["id"] for r in split.images for a in r.annotations} & broken_ids
    assert [a["id"] for a in records[kept_image].annotations if not a["iscrowd"]] == \
        [a["id"] for a in ordinary[kept_image][1:]]
    targets = {t["image_id"]: t for _, batch in loader for t in batch}
    assert loader.bad_samples == 0  # the image with the broken polygon is trained on, with its other objects
    assert len(targets[kept_image]["labels"]) == len(ordinary[kept_image]) - 1


@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_a_cut_or_flipped_annotation_file_names_the_file(demo, tmp_path, split):
    root = shutil.copytree(demo, tmp_path / "coco")
    path = root / "annotations" / f"instances_{split}.json"
    original = path.read_bytes()
    rng = np.random.default_rng(0)

    def outcome() -> str:
        """'loaded' or 'refused' by the data side, and the evaluator (val) agreeing."""
        try:
            load_split(str(root), split)
        except AnnotationFileError as error:
            assert str(path) in str(error)
            if split == "val2017":
                with pytest.raises(AnnotationFileError, match=re.escape(str(path))):
                    CocoEvaluator(str(path))
            return "refused"
        if split == "val2017":
            CocoEvaluator(str(path))
        return "loaded"

    for cut in sorted({0, 1, len(original) - 1} | set(rng.integers(2, len(original) - 1, 20).tolist())):
        path.write_bytes(original[:cut])
        assert outcome() == "refused", cut
    outcomes = Counter()
    for offset, bit in zip(rng.integers(0, len(original), 120).tolist(), rng.integers(0, 8, 120).tolist()):
        flipped = bytearray(original)
        flipped[offset] ^= 1 << bit
        path.write_bytes(bytes(flipped))
        outcomes[outcome()] += 1
    assert outcomes["refused"] > 0 and outcomes["loaded"] > 0, outcomes


def test_broken_ground_truth_leaves_its_images_unscored_and_says_so(tmp_path, caplog):
    """Two images hold a broken annotation (an unknown category, a two-point polygon): COCOeval scores the other
    ten exactly as pycocotools scores the file without those two images; an empty box (w = 0) is scored as
    pycocotools scores it, an annotation of an unlisted image dropped as pycocotools never scores it."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    demo = write_demo(tmp_path / "demo", train_images=1, val_images=12, seed=1)
    original_file = demo["annotations"]["val"]
    data = json.loads(open(original_file).read())
    ordinary = _ordinary(data["annotations"])
    unknown_category, two_points, empty_box = (ordinary[i][0] for i in sorted(ordinary)[:3])
    unknown_category["category_id"] = 42
    two_points["segmentation"] = [[10.0, 10.0, 30.0, 12.0]]
    empty_box["bbox"][2] = 0.0
    data["annotations"].append({**copy.deepcopy(empty_box), "id": 10**6, "image_id": 999999})
    broken_file = tmp_path / "instances_val2017.json"
    broken_file.write_text(json.dumps(data))
    unscored = {unknown_category["image_id"], two_points["image_id"]}

    predictions = _noisy_predictions(original_file, seed=2)
    evaluator = CocoEvaluator(str(broken_file))
    evaluator.update(predictions)
    with caplog.at_level(logging.WARNING, logger="finetune.coco.metrics"):
        result = evaluator.compute(WorldInfo())
    assert evaluator.unscored_images == unscored and result["samples"] == 10
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "finetune.coco.metrics"]
    assert f"{broken_file}: 2 of 12 images are not scored" in warning
    expected = {rule.name: rule.expected for rule in RULES}
    assert f"category ({expected['category']}): 1, id {unknown_category['id']}" in warning
    assert f"polygon ({expected['polygon']}): 1, id {two_points['id']}" in warning

    reference = copy.deepcopy(data)  # by hand: the broken file without the two images
    reference["images"] = [i for i in reference["images"] if i["id"] not in unscored]
    reference["annotations"] = [a for a in reference["annotations"] if a["image_id"] not in unscored]
    reference_file = tmp_path / "reference.json"
    reference_file.write_text(json.dumps(reference))
    records = [r for r in evaluator.records if r["image_id"] not in unscored]
    for iou_type in ("bbox", "segm"):
        drop = "segmentation" if iou_type == "bbox" else "bbox"
        gt = COCO(str(reference_file))
        cocoeval = COCOeval(gt, gt.loadRes([{k: v for k, v in r.items() if k != drop} for r in records]), iou_type)
        cocoeval.evaluate()
        cocoeval.accumulate()
        cocoeval.summarize()
        assert 0.1 < cocoeval.stats[0] < 0.95
        for index, name in enumerate(STAT_NAMES):
            expected, value = cocoeval.stats[index], result[f"{iou_type}_{name}"]
            assert math.isnan(value) if expected == -1 else value == pytest.approx(100 * expected, abs=1e-9), name

    # an unscored image that is also unreadable is one image short, not two
    evaluator.reset()
    evaluator.update([p for p in predictions if p["image_id"] != two_points["image_id"]])
    evaluator.update_unreadable(two_points["image_id"])
    assert evaluator.compute(WorldInfo())["samples"] == 10
    evaluator.reset()
    evaluator.update([p for p in predictions if p["image_id"] != empty_box["image_id"]])
    evaluator.update_unreadable(empty_box["image_id"])
    assert evaluator.compute(WorldInfo())["samples"] == 9
