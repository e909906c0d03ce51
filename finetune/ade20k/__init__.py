"""ADE20K semantic segmentation: UperNet on a UniRepLKNet backbone, mmseg's pipeline and IoU metrics, demo data.

Registered as task ``ade20k`` (``pyproject.toml`` entry point ``unireplknet.tasks``).
"""
from __future__ import annotations

from pretrain.registry import TaskSpec, register_task

from .config import Ade20kConfig, Ade20kRunConfig
from .presets import PRESETS


def _build(config: Ade20kRunConfig):
    from .task import Ade20kSegmentation

    return Ade20kSegmentation(config)


def _preflight(config: Ade20kRunConfig) -> None:
    from .task import preflight

    preflight(config)


def _write_demo_data(out: str, **options) -> None:
    from .demo_data import write_demo

    write_demo(out, **options)


def _predict(config, model, image, **options):
    from .predict import draw_segmentation

    return draw_segmentation(config, model, image, **options)


TASK = register_task(TaskSpec(
    name="ade20k",
    summary="ADE20K semantic segmentation: UperNet + auxiliary FCN (mmseg's pipeline and metrics)",
    config_class=Ade20kRunConfig,
    build=_build,
    presets=PRESETS,
    demo_preset="ade20k_demo",
    cluster_preset="ade20k_xl_upernet_640_160k",
    resume_may_change=("ade20k.eval_",),
    path_keys=("ade20k.data_root",),
    metrics=("eval/mIoU", "eval/mAcc", "eval/aAcc"),
    data_key="ade20k.data_root",
    environment={"UNIREPLKNET_ADE20K_ROOT": "ade20k.data_root"},
    real_data_overrides=("ade20k.generate_demo=false",),
    write_demo_data=_write_demo_data,
    preflight=_preflight,
    predict=_predict,
    onnx_dynamic_size=True,
    smoke_overrides=("ade20k.crop_size=64", "ade20k.resize_scale=160,64", "ade20k.eval_scale=160,64",
                     "ade20k.channels=16", "ade20k.aux_channels=8"),
    legacy_keys={"data": None, "coco": None, "optim.layer_decay_layers": "ade20k.layer_decay_layers"},
))

__all__ = ["Ade20kConfig", "Ade20kRunConfig", "TASK"]
