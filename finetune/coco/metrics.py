"""COCO detection and instance-segmentation metrics: ``COCOeval`` bbox / segm, run by faster-coco-eval.

The numbers are pycocotools' ``COCOeval.stats`` (AP over IoU 0.50:0.95, AP50, AP75, AP small /
medium / large, 100 detections per image): faster-coco-eval's ``COCOeval_faster`` computes the
same ``stats`` in C++, much faster (tests/test_coco_parts.py checks the two agree to 1e-12).

Conventions, as mmdet's ``CocoMetric`` where it has one:

- Reported in **percent** (``stats x 100``), like this project's mIoU; mmdet logs the 0-1
  fractions (``bbox_mAP: 0.564``) and prints the table in fractions too. Keys:
  ``bbox_AP bbox_AP50 bbox_AP75 bbox_APs bbox_APm bbox_APl`` and the same with ``segm_``, plus
  ``samples`` (images evaluated).
- A value COCO leaves undefined (``-1``: no ground truth in that area range, e.g. ``APl`` when the
  set has no large objects) is reported as NaN, not -100.
- Mask AP uses the *mask* area for the small / medium / large ranges: the segm results are
  loaded without their boxes (pycocotools would otherwise take the box area; mmdet drops the
  boxes for the same reason).
- An empty result list (nothing detected anywhere) gives AP 0 (``pycocotools.COCO.loadRes([])``
  raises; the empty result set is built directly here).
- Predicted masks are binarized with ``>= 0.5`` (mmdet's ``mask_thr_binary``) and stored as RLE.

Every val image counted exactly once: the results of all ranks are gathered to rank 0 in one
collective and rank 0 checks that the images passed to :meth:`CocoEvaluator.update` over all
ranks are exactly the annotation file's images, each once. A ``DistributedSampler`` that pads
the last batch by repeating images, or a loader that drops the last partial batch, makes
``compute`` raise ``ValueError`` (on every rank) instead of reporting a number for a different
image set. Images without annotations count as evaluated images (their detections are false
positives), as in COCO.

Images evaluated but not scored, so left out of ``samples`` (the trainer then reports the evaluation
incomplete): an image the loader could not read (:meth:`CocoEvaluator.update_unreadable`: scored as
an image with no detections), and an image whose ground truth breaks a rule of
``finetune.coco.annotations`` (left out of COCOeval's ``imgIds`` with its detections; named in a
warning; that module's docstring says why).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
from collections import Counter
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from pretrain.distributed import WorldInfo

from .annotations import read_instances

__all__ = ["CocoEvaluator", "IOU_TYPES", "STAT_NAMES"]

_logger = logging.getLogger(__name__)

IOU_TYPES: tuple[str, ...] = ("bbox", "segm")
STAT_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")
"""Names of ``COCOeval.stats[0:6]``, the entries reported per IoU type (``<iou type>_<name>``)."""

_MASK_THRESHOLD = 0.5


class CocoEvaluator:
    """Collects per-image detections as COCO result records and evaluates them once in :meth:`compute`.

    Args:
        annotation_file: the COCO ``instances_*.json`` to evaluate against (a local path or an
            fsspec URL); its images are the images that must be evaluated, each exactly once.
        iou_types: any of ``"bbox"``, ``"segm"`` (``"segm"`` needs ``masks`` in every prediction).
        device: the device the object collectives stage their bytes on: this rank's CUDA device
            under NCCL, CPU (default) under gloo. Predictions are moved to the CPU in any case.

    Attributes:
        contiguous_to_category: contiguous label ``0..K-1`` -> COCO category id (the annotation
            file's category ids in sorted order, as mmdet's ``cat_ids``).
        category_to_contiguous: the inverse map.
        unscored_images: the images whose ground truth breaks a rule of ``finetune.coco.annotations``:
            evaluated (they must be passed to :meth:`update`) but never scored.
    """

    def __init__(self, annotation_file: str | os.PathLike, iou_types: Sequence[str] = IOU_TYPES,
                 device: str | torch.device = "cpu"):
        iou_types = tuple(iou_types)
        if not iou_types or len(set(iou_types)) != len(iou_types) or not set(iou_types) <= set(IOU_TYPES):
            raise ValueError(f"iou_types must be distinct values from {IOU_TYPES}, got {iou_types}")
        self.annotation_file = str(annotation_file)
        self.iou_types = iou_types
        self.device = torch.device(device)
        self._checked = read_instances(self.annotation_file)
        category_ids = sorted(category["id"] for category in self._checked.categories)
        self.contiguous_to_category: dict[int, int] = dict(enumerate(category_ids))
        self.category_to_contiguous: dict[int, int] = {c: i for i, c in self.contiguous_to_category.items()}
        self._image_sizes: dict[int, tuple[int, int]] = {
            image["id"]: (image["height"], image["width"]) for image in self._checked.images}
        self.unscored_images: frozenset[int] = frozenset(b.image_id for b in self._checked.unscored())
        self._coco_gt = None  # faster_coco_eval.COCO, loaded on rank 0 by the first compute()
        self.reset()

    @property
    def num_classes(self) -> int:
        return len(self.contiguous_to_category)

    def reset(self) -> None:
        """Forget every prediction added."""
        self._records: list[dict] = []
        self._image_ids: list[int] = []
        self._unreadable: list[int] = []

    @property
    def records(self) -> list[dict]:
        """A copy of this rank's COCO result records (``image_id``, ``category_id``, ``bbox`` as
        ``[x, y, w, h]``, ``score`` and, with ``"segm"``, ``segmentation`` as compressed RLE with
        ``counts`` a str): what ``COCO.loadRes`` takes, and JSON-serializable."""
        return copy.deepcopy(self._records)

    @property
    def image_ids(self) -> list[int]:
        """The image ids passed to :meth:`update` on this rank, in order."""
        return list(self._image_ids)

    def update_unreadable(self, image_id: int) -> None:
        """An image the loader could not read: evaluated as an image with no detections (so every image is
        still evaluated once), and left out of ``samples``."""
        self.update([{"image_id": image_id, "boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                      "labels": torch.zeros(0, dtype=torch.int64)}])
        self._unreadable.append(int(image_id))

    @torch.no_grad()
    def update(self, predictions: Sequence[dict]) -> None:
        """Add the detections of some images, one dict per image:

        - ``image_id``: the image's id in the annotation file;
        - ``boxes``: (N, 4) ``x1, y1, x2, y2`` in the original image's pixels;
        - ``scores``: (N,); ``labels``: (N,) integers, contiguous ``0..K-1``;
        - ``masks``: (N, H, W) at the original image size, bool, or probabilities (kept where
          ``>= 0.5``); required with ``"segm"`` (may be left out when N is 0), ignored otherwise.

        An image with no detection (N = 0) still counts as evaluated.
        """
        for prediction in predictions:
            image_id = int(prediction["image_id"])
            if image_id not in self._image_sizes:
                raise ValueError(f"image_id {image_id} is not an image of {self.annotation_file}")
            records = self._records_for(image_id, prediction)
            self._image_ids.append(image_id)
            self._records.extend(records)

    def _records_for(self, image_id: int, prediction: dict) -> list[dict]:
        boxes = torch.as_tensor(prediction["boxes"]).detach().to("cpu", torch.float64)
        scores = torch.as_tensor(prediction["scores"]).detach().to("cpu", torch.float64)
        labels = torch.as_tensor(prediction["labels"]).detach().cpu()
        n = boxes.shape[0] if boxes.ndim == 2 else -1
        if boxes.ndim != 2 or boxes.shape[1] != 4 or tuple(scores.shape) != (n,) or tuple(labels.shape) != (n,):
            raise ValueError(f"image {image_id}: need boxes (N, 4), scores (N,), labels (N,); got "
                             f"{tuple(boxes.shape)}, {tuple(scores.shape)}, {tuple(labels.shape)}")
        if n == 0:
            return []
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError(f"image {image_id}: labels must be integers, got {labels.dtype}")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.num_classes:
            raise ValueError(f"image {image_id}: labels must be contiguous 0..{self.num_classes - 1}, "
                             f"got range {low}..{high}")
        xywh = boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]
        records = [
            {"image_id": image_id, "category_id": self.contiguous_to_category[label],
             "bbox": box, "score": score}
            for box, score, label in zip(xywh.tolist(), scores.tolist(), labels.tolist())]
        if "segm" in self.iou_types:
            for record, rle in zip(records, self._encode_masks(image_id, prediction.get("masks"), n)):
                record["segmentation"] = rle
        return records

    def _encode_masks(self, image_id: int, masks, n: int) -> list[dict]:
        from pycocotools import mask as mask_utils

        height, width = self._image_sizes[image_id]
        if masks is None:
            raise ValueError(f"image {image_id}: iou_types {self.iou_types} include 'segm': predictions need 'masks'")
        masks = torch.as_tensor(masks).detach()
        if tuple(masks.shape) != (n, height, width):
            raise ValueError(f"image {image_id}: masks must be (N, H, W) = {(n, height, width)} (the annotation "
                             f"file's image size), got {tuple(masks.shape)}")
        binary = masks >= _MASK_THRESHOLD if masks.dtype != torch.bool else masks
        array = np.asfortranarray(binary.to("cpu", torch.uint8).permute(1, 2, 0).numpy())
        return [{"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
                for rle in mask_utils.encode(array)]

    def compute(self, world: WorldInfo | None = None) -> dict[str, float]:
        """Gather all ranks' results to rank 0 (one ``gather_object``; every rank must call this),
        evaluate there and return the same dict on every rank (one ``broadcast_object_list``):
        ``<iou type>_<AP|AP50|AP75|APs|APm|APl>`` in percent (NaN where COCO has -1) and
        ``samples``, the number of images scored: those evaluated, less the unreadable ones and
        those whose ground truth is broken (module docstring). The local state is left as it was.

        Raises ``ValueError`` on every rank when the images evaluated over all ranks are not the
        annotation file's images each exactly once (naming how many are duplicated / missing and
        an example id). ``world`` is only checked against the process group.
        """
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if world is not None and world.world_size > 1 and not distributed:
            raise RuntimeError(f"compute() with world_size={world.world_size} needs an initialized process group")
        if world is not None and distributed and world.world_size != dist.get_world_size():
            raise ValueError(f"world.world_size={world.world_size} but the process group has "
                             f"{dist.get_world_size()} ranks")
        local = (self._image_ids, self._records, self._unreadable)
        if not distributed:
            return self._evaluate([local])

        rank = dist.get_rank()
        gathered = [None] * dist.get_world_size() if rank == 0 else None
        with self._collective_device():
            dist.gather_object(local, gathered, dst=0)
        payload: tuple[str, object] = ("ok", None)
        if rank == 0:
            try:
                payload = ("ok", self._evaluate(gathered))
            except Exception as error:  # noqa: BLE001 - re-raised below, after the other ranks hear of it
                payload = (type(error).__name__, str(error))
                failure = error
        holder = [payload]
        with self._collective_device():
            dist.broadcast_object_list(holder, src=0, device=self.device if self.device.type == "cuda" else None)
        kind, value = holder[0]
        if kind != "ok":
            if rank == 0:
                raise failure
            raise (ValueError if kind == "ValueError" else RuntimeError)(f"rank 0: {value}")
        return value

    def _collective_device(self):
        if self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()

    def _evaluate(self, shards: list[tuple[list[int], list[dict], list[int]]]) -> dict[str, float]:
        image_ids = [image_id for ids, _, _ in shards for image_id in ids]
        self._check_exactly_once(image_ids)
        unscored = self.unscored_images
        if unscored:
            _logger.warning("%s: %d of %d images are not scored, their ground truth breaks the COCO format: %s; "
                            "the AP is over the other images", self.annotation_file, len(unscored),
                            len(self._image_sizes), self._checked.summary(self._checked.unscored()))
        # per image, the records keep their order; images in id order whatever the sharding
        records = sorted((record for _, shard, _ in shards for record in shard if record["image_id"] not in unscored),
                         key=lambda r: r["image_id"])
        results: dict[str, float] = {}
        for iou_type in self.iou_types:
            stats = self._stats(iou_type, records)
            for name, value in zip(STAT_NAMES, stats):
                results[f"{iou_type}_{name}"] = 100.0 * float(value) if value > -1 else math.nan
        unreadable = {image_id for _, _, ids in shards for image_id in ids}
        results["samples"] = float(len(set(image_ids) - unscored - unreadable))
        return results

    def _check_exactly_once(self, image_ids: list[int]) -> None:
        counts = Counter(image_ids)
        duplicated = sorted(i for i, c in counts.items() if c > 1)
        missing = sorted(set(self._image_sizes) - set(counts))
        unknown = sorted(set(counts) - set(self._image_sizes))
        problems = []
        if duplicated:
            problems.append(f"{len(duplicated)} image ids evaluated more than once (e.g. {duplicated[0]}, "
                            f"{counts[duplicated[0]]} times)")
        if missing:
            problems.append(f"{len(missing)} image ids never evaluated (e.g. {missing[0]})")
        if unknown:
            problems.append(f"{len(unknown)} image ids not in the annotation file (e.g. {unknown[0]})")
        if problems:
            raise ValueError(
                f"COCO evaluation needs each of the {len(self._image_sizes)} images of {self.annotation_file} "
                f"exactly once over all ranks: " + "; ".join(problems) + ". Shard the val set without padding "
                "or dropping (DistributedSampler repeats images to even out the ranks; drop_last drops them), "
                "e.g. indices[rank::world_size].")

    def _ground_truth(self):
        if self._coco_gt is None:
            from faster_coco_eval import COCO

            self._coco_gt = COCO(self._checked.ground_truth(), use_deepcopy=True, print_function=_logger.debug)
        return self._coco_gt

    def _stats(self, iou_type: str, records: list[dict]) -> np.ndarray:
        """``COCOeval.stats[:6]`` for ``iou_type`` on ``records`` (fresh copies: loadRes edits them)."""
        from faster_coco_eval import COCO, COCOeval_faster

        coco_gt = self._ground_truth()
        drop = "segmentation" if iou_type == "bbox" else "bbox"
        results = [{k: (dict(v) if k == "segmentation" else v) for k, v in r.items() if k != drop} for r in records]
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:
            coco_dt = COCO(print_function=_logger.debug)
            coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                               "categories": copy.deepcopy(coco_gt.dataset["categories"])}
            coco_dt.createIndex()
        evaluator = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=_logger.debug)
        evaluator.params.imgIds = sorted(set(self._image_sizes) - self.unscored_images)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        return np.asarray(evaluator.stats[:len(STAT_NAMES)], dtype=np.float64)

