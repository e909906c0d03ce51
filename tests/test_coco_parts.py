"""COCO parts: the evaluator (faster-coco-eval vs pycocotools, hand-computed APs, the exactly-once
check, 2-rank gathering) and the generated demo data."""
from __future__ import annotations

import json
import math
import os
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.coco.demo_data import CATEGORIES, write_demo
from finetune.coco.metrics import STAT_NAMES, CocoEvaluator
from pretrain.distributed import WorldInfo

# pycocotools' decode (annToMask) under numpy 2; not this project's code
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

_KEYS = [f"{t}_{n}" for t in ("bbox", "segm") for n in STAT_NAMES]


@pytest.fixture(scope="module")
def coco_demo(tmp_path_factory) -> dict:
    return write_demo(tmp_path_factory.mktemp("coco_demo"), train_images=8, val_images=30, seed=0)


def _val_file(demo: dict) -> str:
    return demo["annotations"]["val"]


def _ground_truth_predictions(annotation_file: str) -> list[dict]:
    """The non-crowd ground truth of every image as detections of score 1 (exact boxes and masks)."""
    from pycocotools.coco import COCO

    coco = COCO(annotation_file)
    to_label = {c: i for i, c in enumerate(sorted(coco.getCatIds()))}
    predictions = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                             dtype=torch.float64).reshape(-1, 4)
        masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])).bool() if anns else \
            torch.zeros(0, info["height"], info["width"], dtype=torch.bool)
        predictions.append({"image_id": image_id, "boxes": boxes, "scores": torch.ones(len(anns)),
                            "labels": torch.tensor([to_label[a["category_id"]] for a in anns], dtype=torch.int64),
                            "masks": masks})
    return predictions


def _noisy_predictions(annotation_file: str, seed: int = 0) -> list[dict]:
    """Ground truth jittered (boxes +-3 px, masks shifted by up to 2 px, random scores) plus 0-3
    false positives per image (random boxes, random labels, rectangular masks, low-ish scores)."""
    rng = np.random.default_rng(seed)
    predictions = []
    for truth in _ground_truth_predictions(annotation_file):
        n = truth["boxes"].shape[0]
        height, width = truth["masks"].shape[1:]
        boxes = truth["boxes"] + torch.from_numpy(rng.uniform(-3, 3, (n, 4)))
        masks = [torch.roll(m, shifts=tuple(int(s) for s in rng.integers(-2, 3, 2)), dims=(0, 1))
                 for m in truth["masks"]]
        scores = list(rng.uniform(0.3, 1.0, n))
        labels = truth["labels"].tolist()
        for _ in range(int(rng.integers(0, 4))):
            x1, y1 = rng.uniform(0, width - 10), rng.uniform(0, height - 10)
            x2, y2 = rng.uniform(x1 + 4, width), rng.uniform(y1 + 4, height)
            boxes = torch.cat([boxes, torch.tensor([[x1, y1, x2, y2]], dtype=torch.float64)])
            mask = torch.zeros(height, width, dtype=torch.float32)
            mask[int(y1):int(y2), int(x1):int(x2)] = 0.9  # probabilities: kept (>= 0.5)
            masks.append(mask)
            scores.append(rng.uniform(0.05, 0.8))
            labels.append(int(rng.integers(0, len(CATEGORIES))))
        predictions.append({
            "image_id": truth["image_id"], "boxes": boxes, "scores": torch.tensor(scores),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.stack([m.float() for m in masks]) if masks else truth["masks"]})
    return predictions


def _same(a: dict, b: dict) -> bool:
    """Dicts equal, NaN equal to NaN."""
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) if isinstance(a[k], float) and math.isnan(a[k]) else a[k] == b[k]
        for k in a)


def _evaluate(annotation_file: str, predictions: list[dict], **kwargs) -> dict:
    evaluator = CocoEvaluator(annotation_file, **kwargs)
    evaluator.update(predictions)
    return evaluator.compute(WorldInfo())


# ----------------------------------------------------------------------------------------------
# evaluator


def test_faster_coco_eval_matches_pycocotools(coco_demo):
    from faster_coco_eval import COCO as FastCOCO
    from faster_coco_eval import COCOeval_faster
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    annotation_file = _val_file(coco_demo)
    evaluator = CocoEvaluator(annotation_file)
    evaluator.update(_noisy_predictions(annotation_file))
    records = evaluator.records
    assert len(records) > 100 and all(isinstance(r["segmentation"]["counts"], str) for r in records)
    json.dumps(records)  # JSON-serializable as is
    result = evaluator.compute(WorldInfo())
    for iou_type in ("bbox", "segm"):
        drop = "segmentation" if iou_type == "bbox" else "bbox"  # segm: mask areas for the area ranges
        stats = {}
        for name, coco_cls, eval_cls in (("pycocotools", COCO, COCOeval), ("faster", FastCOCO, COCOeval_faster)):
            gt = coco_cls(annotation_file)
            dt = gt.loadRes([{k: v for k, v in r.items() if k != drop} for r in evaluator.records])
            ev = eval_cls(gt, dt, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            stats[name] = np.asarray(ev.stats[:12], dtype=np.float64)
        np.testing.assert_allclose(stats["faster"], stats["pycocotools"], rtol=0, atol=1e-12)
        assert 0.2 < stats["pycocotools"][0] < 0.95  # a non-trivial case
        for index, name in enumerate(STAT_NAMES):
            expected = stats["pycocotools"][index]
            value = result[f"{iou_type}_{name}"]
            assert math.isnan(value) if expected == -1 else value == pytest.approx(100 * expected, abs=1e-9)
    assert result["samples"] == 30


def test_perfect_predictions_give_100(coco_demo):
    annotation_file = _val_file(coco_demo)
    result = _evaluate(annotation_file, _ground_truth_predictions(annotation_file))
    assert result["bbox_AP"] == 100.0 and result["segm_AP"] == 100.0
    for key in _KEYS:
        assert math.isnan(result[key]) or result[key] == 100.0, key
    assert not math.isnan(result["bbox_APs"]) and not math.isnan(result["bbox_APm"])
    assert result["samples"] == 30


def _write_one_image_file(path: Path) -> str:
    box = lambda x, y: {"bbox": [x, y, 40.0, 40.0], "area": 1600.0, "iscrowd": 0, "category_id": 5,  # noqa: E731
                        "segmentation": [[x, y, x + 40, y, x + 40, y + 40, x, y + 40]]}
    path.write_text(json.dumps({
        "images": [{"id": 7, "file_name": "000000000007.jpg", "height": 200, "width": 200}],
        "annotations": [{"id": 1, "image_id": 7, **box(10.0, 10.0)}, {"id": 2, "image_id": 7, **box(100.0, 100.0)}],
        "categories": [{"id": 5, "name": "thing", "supercategory": "thing"}]}))
    return str(path)


def test_hand_computed_partial_case(tmp_path):
    # One image, two ground-truth boxes of one class, both 40x40 (area 1600: COCO "medium").
    # COCO's AP at one IoU threshold = mean over the 101 recall thresholds r = 0, 0.01, ..., 1 of
    # the interpolated precision p(r) = max precision at recall >= r (0 where recall r is never
    # reached).
    # (1) One perfect detection, nothing else: recall 0.5 at precision 1, so p(r) = 1 for the
    #     51 thresholds r <= 0.5 and 0 for the 50 above: AP = 51/101 = 0.50495... at every IoU
    #     threshold (IoU = 1), hence AP = AP50 = AP75 = APm = 100 * 51/101 = 50.495049...%;
    #     no small or large ground truth: APs, APl undefined (COCO -1, reported NaN).
    # (2) The same plus a false positive (elsewhere) scored higher than it: ranked FP, TP the
    #     precision is 0, 1/2 at recall 0, 1/2; interpolated p(r) = 1/2 for r <= 0.5:
    #     AP = 0.5 * 51/101 = 25.247524...%.
    # (3) The false positive scored lower instead: ranked TP, FP the precision is 1, 1/2 at
    #     recall 1/2, 1/2; p(r) = max = 1 for r <= 0.5: AP = 51/101 again (an FP below the last
    #     TP costs nothing).
    annotation_file = _write_one_image_file(tmp_path / "one.json")
    tp, fp = [10.0, 10.0, 50.0, 50.0], [150.0, 20.0, 190.0, 60.0]

    def run(boxes, scores):
        return _evaluate(annotation_file, [{"image_id": 7, "boxes": torch.tensor(boxes), "scores": torch.tensor(scores),
                                            "labels": torch.zeros(len(boxes), dtype=torch.int64)}],
                         iou_types=("bbox",))

    one = run([tp], [1.0])
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_APm"):
        assert one[key] == pytest.approx(100 * 51 / 101, abs=1e-9), key
    assert math.isnan(one["bbox_APs"]) and math.isnan(one["bbox_APl"])
    assert set(one) == {f"bbox_{n}" for n in STAT_NAMES} | {"samples"} and one["samples"] == 1
    fp_first = run([fp, tp], [0.9, 0.8])
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_APm"):
        assert fp_first[key] == pytest.approx(100 * 0.5 * 51 / 101, abs=1e-9), key
    fp_last = run([tp, fp], [0.9, 0.8])
    assert fp_last["bbox_AP"] == pytest.approx(100 * 51 / 101, abs=1e-9)


def test_empty_results_give_zero(coco_demo):
    annotation_file = _val_file(coco_demo)
    empty = [{"image_id": p["image_id"], "boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
              "labels": torch.zeros(0, dtype=torch.int64)} for p in _ground_truth_predictions(annotation_file)]
    result = _evaluate(annotation_file, empty)
    perfect = _evaluate(annotation_file, _ground_truth_predictions(annotation_file))
    for key in _KEYS:  # 0 wherever AP is defined; undefined (no ground truth in range) as for perfect ones
        assert (math.isnan(result[key]) and math.isnan(perfect[key])) or result[key] == 0.0, key
    assert result["bbox_AP"] == 0.0 and result["segm_AP"] == 0.0 and result["samples"] == 30


def test_two_updates_equal_one_and_exactly_once_check(coco_demo):
    annotation_file = _val_file(coco_demo)
    predictions = _noisy_predictions(annotation_file, seed=1)
    whole = _evaluate(annotation_file, predictions)
    evaluator = CocoEvaluator(annotation_file)
    evaluator.update(predictions[:13])
    evaluator.update(predictions[13:])
    assert _same(evaluator.compute(WorldInfo()), whole)
    assert _same(evaluator.compute(WorldInfo()), whole)  # the cached ground truth is reusable
    assert evaluator.category_to_contiguous == {1: 0, 3: 1, 7: 2, 9: 3}
    assert evaluator.contiguous_to_category == {0: 1, 1: 3, 2: 7, 3: 9}

    first, last = predictions[0]["image_id"], predictions[-1]["image_id"]
    evaluator.update([predictions[0]])
    with pytest.raises(ValueError, match=rf"1 image ids evaluated more than once \(e.g. {first}, 2 times\)"):
        evaluator.compute(WorldInfo())
    evaluator.reset()
    evaluator.update(predictions[:-1])
    with pytest.raises(ValueError, match=rf"1 image ids never evaluated \(e.g. {last}\)"):
        evaluator.compute(WorldInfo())
    with pytest.raises(ValueError, match="is not an image of"):
        evaluator.update([{**predictions[0], "image_id": 999_999}])
    with pytest.raises(ValueError, match="labels must be contiguous"):
        evaluator.update([{**predictions[0], "labels": torch.full_like(predictions[0]["labels"], 4)}])
    with pytest.raises(ValueError, match="need 'masks'"):
        evaluator.update([{k: v for k, v in predictions[0].items() if k != "masks"}])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank: int, port: int, annotation_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        world = WorldInfo(rank, rank, 2)
        predictions = _noisy_predictions(annotation_file)
        evaluator = CocoEvaluator(annotation_file)
        evaluator.update(predictions[rank::2] + ([predictions[0]] if rank == 1 else []))  # image 0 twice
        try:
            evaluator.compute(world)
            duplicate_error = None
        except ValueError as error:
            duplicate_error = str(error)
        evaluator.reset()
        evaluator.update(predictions[rank::2])
        result = evaluator.compute(world)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"result": result, "error": duplicate_error}))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one(coco_demo, tmp_path):
    annotation_file = _val_file(coco_demo)
    single = _evaluate(annotation_file, _noisy_predictions(annotation_file))
    torch.multiprocessing.spawn(_two_rank_worker, args=(_free_port(), annotation_file, str(tmp_path)), nprocs=2)
    first_id = _noisy_predictions(annotation_file)[0]["image_id"]
    for rank in range(2):
        out = json.loads(Path(tmp_path, f"rank{rank}.json").read_text())
        assert _same(out["result"], single), (rank, out["result"], single)
        assert out["error"] is not None and f"more than once (e.g. {first_id}" in out["error"]


# ----------------------------------------------------------------------------------------------
# demo data


def test_demo_data_layout_and_annotations(coco_demo):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    root = Path(coco_demo["root"])
    assert sorted(p.name for p in (root / "annotations").iterdir()) == ["instances_train2017.json",
                                                                       "instances_val2017.json"]
    category_ids = {c["id"] for c in CATEGORIES}
    assert category_ids == {1, 3, 7, 9}
    without, crowd = 0, 0
    for split, count in (("train2017", 8), ("val2017", 30)):
        coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
        images = coco.dataset["images"]
        assert len(images) == count and coco.dataset["categories"] == [dict(c) for c in CATEGORIES]
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(f"{i['id']:012d}.jpg" for i in images)
        assert [i["file_name"] for i in images] == [f"{i['id']:012d}.jpg" for i in images]
        for info in images[:3]:
            with Image.open(root / split / info["file_name"]) as image:
                assert image.mode == "RGB" and image.size == (info["width"], info["height"])
        for ann in coco.dataset["annotations"]:
            info = coco.imgs[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= info["width"] and y + h <= info["height"]
            assert ann["area"] > 0 and ann["category_id"] in category_ids and ann["iscrowd"] in (0, 1)
            mask = coco.annToMask(ann)
            assert mask.sum() == ann["area"]
            assert list(mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask)))) == ann["bbox"]
            assert isinstance(ann["segmentation"]["counts"], list if ann["iscrowd"] else str)
        ids = {a["id"] for a in coco.dataset["annotations"]}
        assert len(ids) == len(coco.dataset["annotations"])
        without += sum(1 for i in images if not coco.imgToAnns[i["id"]])
        crowd += sum(a["iscrowd"] for a in coco.dataset["annotations"])
    assert without > 0 and crowd > 0


def test_demo_data_deterministic_per_seed(tmp_path):
    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}

    a = files(write_demo(tmp_path / "a", train_images=2, val_images=4, seed=3)["root"])
    b = files(write_demo(tmp_path / "b", train_images=2, val_images=4, seed=3)["root"])
    c = files(write_demo(tmp_path / "c", train_images=2, val_images=4, seed=4)["root"])
    assert a == b
    assert a.keys() == c.keys() and a["val2017/000000000002.jpg"] != c["val2017/000000000002.jpg"]
