"""The point-cloud task's run config: the core :class:`~pretrain.config.Config` with the ``pointcloud`` section."""
from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.config import Config, ConfigError, in_range, positive

__all__ = ["PointCloudConfig", "PointCloudRunConfig"]


@dataclass(kw_only=True, slots=True)
class PointCloudConfig:
    """``task=pointcloud``: ModelNet classification with the authors' P2P projection (4 views) into UniRepLKNet."""

    data_root: str = ""
    """ModelNet: the raw OFF tree (``<class>/{train,test}/*.off``) or ``modelnet40_normal_resampled`` (with
    ``modelnet40_shape_names.txt``; ModelNet10's ``modelnet10_*`` too); a local path or an fsspec URL."""
    generate_demo: bool = False
    """Write the demo set (trimesh primitives, both layouts) under ``data_root`` first; the run reads its
    resampled layout (``data_root/resampled``)."""
    num_classes: int = 40
    """Classes expected in ``data_root``; must equal ``model.num_classes``."""
    points: int = 4096
    """Points per cloud the model sees (the authors' ``npoints``)."""
    fps_points: int = 4800
    """Training: farthest-point sample this many first, then keep a random ``points`` of them (4800 for 4096)."""
    mesh_points: int = 8192
    """Surface points sampled once from each OFF mesh (the resampled layout's files hold theirs)."""
    cache_dir: str = ""
    """Where sampled meshes are cached (``.npy`` per file and content); empty: ``~/.cache/unireplknet/pointcloud``."""
    image_size: int = 224
    """The projected views' size (a multiple of 7: the fusion's patches)."""
    views: int = 4
    """Projected views (the authors' first ``views`` Euler angles)."""
    neighbours: int = 32
    """kNN neighbours of the point encoder."""
    feature_dim: int = 64
    """Channels of the point features and the view maps before the colour head (the authors' 64; the fusion
    works at twice this)."""

    def validate(self) -> None:
        if not self.data_root:
            raise ConfigError("data_root", "expected the ModelNet folder (or URL), or a folder for the generated demo "
                              "set with pointcloud.generate_demo=true")
        if self.num_classes < 2:
            raise ConfigError("num_classes", f"expected at least 2 classes, got {self.num_classes}")
        positive("points", self.points)
        if self.fps_points < self.points:
            raise ConfigError("fps_points", f"expected >= pointcloud.points ({self.points}), got {self.fps_points}")
        positive("mesh_points", self.mesh_points)
        if self.image_size % 7 or self.image_size < 28:
            raise ConfigError("image_size", f"expected a multiple of 7 (the fusion's patches) of at least 28, got "
                              f"{self.image_size}")
        in_range("views", self.views, 1, 4)
        positive("neighbours", self.neighbours)
        if self.feature_dim < 4 or self.feature_dim % 4:
            raise ConfigError("feature_dim", f"expected a multiple of 4 (GroupNorm(4)), got {self.feature_dim}")


@dataclass(kw_only=True, slots=True)
class PointCloudRunConfig(Config):
    """A point-cloud run: P2P projection of each cloud into ``views`` images for UniRepLKNet."""

    task: str = "pointcloud"
    pointcloud: PointCloudConfig = field(default_factory=PointCloudConfig)

    def validate(self) -> None:
        Config.validate(self)
        if self.model.num_classes != self.pointcloud.num_classes:
            raise ConfigError("model.num_classes", f"expected pointcloud.num_classes ({self.pointcloud.num_classes}), "
                              f"got {self.model.num_classes}")
        if self.model.in_chans != 3:
            raise ConfigError("model.in_chans", f"expected 3 (the projected views are RGB-like), got "
                              f"{self.model.in_chans}")
        if self.train.zero_stage == 3:
            raise ConfigError("train.zero_stage", "expected 0, 1 or 2: the point-cloud task does not run ZeRO-3 (its "
                              "kNN and scatter layers are not partitioned)")
