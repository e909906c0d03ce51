"""ModelNet point-cloud classification: the authors' P2P projection (4 views) into UniRepLKNet, their
augmentation, label smoothing, 8-rotation validation and 40-rotation voted test, OA and mAcc; both ModelNet
layouts; a demo set of trimesh primitives.

Registered as task ``pointcloud`` (``pyproject.toml`` entry point ``unireplknet.tasks``).
"""
from __future__ import annotations

from pretrain.registry import TaskSpec, register_task

from .config import PointCloudConfig, PointCloudRunConfig
from .presets import PRESETS


def _build(config: PointCloudRunConfig):
    from .task import PointCloudClassification

    return PointCloudClassification(config)


def _preflight(config: PointCloudRunConfig) -> None:
    from .task import preflight

    preflight(config)


def _write_demo_data(out: str, seed: int = 0, train_images: int | None = None, val_images: int | None = None) -> None:
    """``make-demo-data pointcloud OUT``: ``--train-images`` / ``--val-images`` count shapes per class."""
    from .demo_data import write_demo

    sizes = {k: v for k, v in (("train_per_class", train_images), ("test_per_class", val_images)) if v}
    write_demo(out, seed=seed, **sizes)


TASK = register_task(TaskSpec(
    name="pointcloud",
    summary="point-cloud classification (ModelNet40, both layouts): P2P projection into UniRepLKNet, OA / mAcc",
    config_class=PointCloudRunConfig,
    build=_build,
    presets=PRESETS,
    demo_preset="pointcloud_demo",
    cluster_preset="pointcloud_s_modelnet40",
    path_keys=("pointcloud.data_root", "pointcloud.cache_dir"),
    metrics=("eval/oa", "eval/macc"),
    data_key="pointcloud.data_root",
    pretrained_backbone=False,  # the authors train the P2P UniRepLKNet-S on ModelNet40 from scratch
    environment={"UNIREPLKNET_MODELNET_ROOT": "pointcloud.data_root"},
    real_data_overrides=("pointcloud.generate_demo=false",),
    write_demo_data=_write_demo_data,
    preflight=_preflight,
    onnx_unsupported="the point-cloud model takes point clouds (kNN, scatter into the views), not an image tensor: "
                     "export the backbone (python -m pretrain export) and run the projection in torch",
    smoke_overrides=("pointcloud.points=64", "pointcloud.fps_points=80", "pointcloud.neighbours=4",
                     "pointcloud.feature_dim=8", "train.global_batch_size=4", "train.micro_batch_size=4"),
))

__all__ = ["PointCloudConfig", "PointCloudRunConfig", "TASK"]
