"""COCO instance segmentation: Cascade Mask R-CNN (or Mask R-CNN) on a UniRepLKNet backbone, the authors' mmdet
recipe, COCOeval metrics, demo data.

Registered as task ``coco`` (``pyproject.toml`` entry point ``unireplknet.tasks``).
"""
from __future__ import annotations

from pretrain.registry import TaskSpec, register_task

from .config import CocoConfig, CocoRunConfig
from .presets import PRESETS


def _build(config: CocoRunConfig):
    from .task import CocoInstanceSegmentation

    return CocoInstanceSegmentation(config)


def _preflight(config: CocoRunConfig) -> None:
    from .task import preflight

    preflight(config)


def _write_demo_data(out: str, **options) -> None:
    from .demo_data import write_demo

    write_demo(out, **options)


def _mmdet_to_product(state: dict) -> dict:
    from .released import mmdet_to_product

    return mmdet_to_product(state)


def _predict(config, model, image, **options):
    from .predict import draw_detections

    return draw_detections(config, model, image, **options)


TASK = register_task(TaskSpec(
    name="coco",
    summary="COCO instance segmentation: Cascade Mask R-CNN (mmdet's recipe, COCOeval bbox/segm)",
    config_class=CocoRunConfig,
    build=_build,
    presets=PRESETS,
    demo_preset="coco_demo",
    cluster_preset="coco_xl_cascade_3x",
    resume_may_change=("coco.eval_scale", "coco.score_threshold", "coco.nms_iou", "coco.max_detections"),
    path_keys=("coco.data_root",),
    metrics=("eval/bbox_AP", "eval/segm_AP"),
    data_key="coco.data_root",
    environment={"UNIREPLKNET_COCO_ROOT": "coco.data_root"},
    real_data_overrides=("coco.generate_demo=false",),
    write_demo_data=_write_demo_data,
    preflight=_preflight,
    predict=_predict,
    released_key_map=_mmdet_to_product,
    onnx_unsupported=("torch.export stops in the detector's test-time path at torchvision's batched_nms (ops/boxes.py "
                      "line 103 in torchvision 0.29: `if boxes.numel() == 0` on the data-dependent number of RPN "
                      "proposals); torchvision's nms and roi_align themselves export and run in onnxruntime, but the "
                      "per-image loops over a variable number of boxes and the mask pasting are Python control flow "
                      "on data: the Cascade Mask R-CNN does not export as one graph"),
    smoke_overrides=("coco.train_scales=96", "coco.max_size=160", "coco.crop_policy=false", "coco.eval_scale=160,96",
                     "coco.rpn_proposals_train=100", "coco.rpn_proposals_test=100", "coco.roi_batch=64",
                     "coco.box_channels=32", "coco.mask_channels=32"),
    legacy_keys={"data": None, "ade20k": None, "optim.layer_decay_layers": "coco.layer_decay_layers"},
))

__all__ = ["CocoConfig", "CocoRunConfig", "TASK"]
