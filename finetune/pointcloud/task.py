"""Point-cloud classification as a ``pretrain.task.Task``: the authors' P2P model (4 projected views into
UniRepLKNet), their label-smoothed cross-entropy, OA and mAcc over 8 validation rotations and 40 voted test
rotations."""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import ConfigError
from pretrain.distributed import WorldInfo
from pretrain.task import SumsEvaluator, TaskBase

from .augment import rotate, theta_phi_matrix, validation_angles, voting_angles
from .config import PointCloudRunConfig
from .data import list_split
from .loaders import EvalClouds, EvalLoader, TrainLoader
from .metrics import class_sums, oa_macc
from .model import VIEW_ANGLES, P2PClassifier, rotate_views
from .projection import projection_indices

__all__ = ["PointCloudClassification", "preflight", "smoothed_cross_entropy"]


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """The authors' label smoothing (``get_loss_acc``): the true class ``1 - smoothing``, every other class
    ``smoothing / (classes - 1)`` (torch's ``label_smoothing`` spreads over all classes instead)."""
    classes = logits.shape[-1]
    target = torch.full_like(logits, smoothing / (classes - 1)).scatter_(1, labels[:, None], 1.0 - smoothing)
    return -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


class PointCloudClassification(TaskBase):
    """ModelNet (or the generated primitives in its layout) on the one trainer."""

    throughput_unit = "clouds"
    config: PointCloudRunConfig

    @property
    def section(self):
        return self.config.pointcloud

    def _cache_dir(self) -> str:
        return self.section.cache_dir or os.path.expanduser("~/.cache/unireplknet/pointcloud")

    def _root(self, world: WorldInfo) -> str:
        section = self.section
        if section.generate_demo:
            from .demo_data import write_demo

            points = max(1024, section.fps_points)
            self.generate_once(section.data_root, lambda: write_demo(section.data_root, points=points,
                                                                     seed=self.config.train.seed),
                               world, "point-cloud demo set")
            return os.path.join(section.data_root, "resampled")
        return section.data_root

    def build_model(self) -> nn.Module:
        from finetune.backbone import build_headless_backbone

        return P2PClassifier(build_headless_backbone(self.config.model, in_chans=3), self.config.model.num_classes,
                             self.section.image_size, self.section.views, self.section.neighbours,
                             self.section.feature_dim)

    def build_train_loader(self, world: WorldInfo) -> TrainLoader:
        split = list_split(self._root(world), "train", self.section.num_classes)
        return TrainLoader(split, self.section, self._cache_dir(), batch_size=self.config.train.micro_batch_size,
                           rank=world.rank, world_size=world.world_size, num_workers=self.config.loader.num_workers,
                           seed=self.config.train.seed)

    def _eval_loader(self, world: WorldInfo, voting: bool) -> EvalLoader:
        split = list_split(self._root(world), "test", self.section.num_classes)
        return EvalLoader(split, self.section, self._cache_dir(), voting=voting,
                          batch_size=self.config.train.micro_batch_size, rank=world.rank,
                          world_size=world.world_size, num_workers=self.config.loader.num_workers)

    def build_eval_loader(self, world: WorldInfo) -> EvalLoader:
        """The test split on 8 rotations, each scored (the authors' validation; ModelNet has no other split)."""
        return self._eval_loader(world, voting=False)

    def build_test_loader(self, world: WorldInfo) -> EvalLoader:
        """The test split voted over 40 rotations (the authors' test protocol), once the run completes."""
        return self._eval_loader(world, voting=True)

    def prepare_batch(self, batch, device: torch.device):
        inputs, labels = batch[0], batch[1].to(device, non_blocking=True)
        if isinstance(inputs, EvalClouds):
            return EvalClouds(inputs.points.to(device, non_blocking=True), inputs.voting), labels
        projected, original = inputs
        return (projected.to(device, non_blocking=True), original.to(device, non_blocking=True)), labels

    def batch_size(self, inputs) -> int:
        return len(inputs) if isinstance(inputs, EvalClouds) else len(inputs[0])

    def training_losses(self, model: nn.Module, inputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        projected, original = inputs
        logits = model(projected, original).float()
        return {"loss": smoothed_cross_entropy(logits, labels, self.config.train.label_smoothing)}

    def build_evaluator(self, device: torch.device) -> SumsEvaluator:
        classes = self.section.num_classes
        names = (*(f"correct{i}" for i in range(classes)), *(f"count{i}" for i in range(classes)), "clouds")

        def sums(outputs, labels):
            logits, voting = outputs  # (R, B, C)
            if voting:
                counted = class_sums(logits.mean(dim=0), labels, classes)
            else:
                counted = class_sums(logits.reshape(-1, classes), labels.repeat(len(logits)), classes)
            out = {f"correct{i}": counted["correct"][i] for i in range(classes)}
            out.update({f"count{i}": counted["count"][i] for i in range(classes)})
            out["clouds"] = torch.tensor(float(len(labels)), device=labels.device)
            return out

        def results(totals: dict[str, float]) -> dict[str, float]:
            correct = torch.tensor([totals[f"correct{i}"] for i in range(classes)], dtype=torch.float64)
            count = torch.tensor([totals[f"count{i}"] for i in range(classes)], dtype=torch.float64)
            return {**oa_macc({"correct": correct, "count": count}), "samples": totals["clouds"]}

        return SumsEvaluator(names, sums, results, device)

    def evaluation_step(self, model: nn.Module, inputs: EvalClouds, labels: torch.Tensor, evaluator) -> None:
        """Every rotation of the batch scored: the 40 voting ones averaged, or the 8 validation ones each."""
        angles = voting_angles() if inputs.voting else validation_angles()
        rotations = theta_phi_matrix(angles)
        points = inputs.points
        logits = torch.stack([model(rotate(points, rotation).to(points.dtype), points).float()
                              for rotation in rotations])
        evaluator.update((logits, inputs.voting), labels)

    def input_shape(self) -> tuple[int, ...]:
        """The backbone's input: one projected view."""
        return (3, self.section.image_size, self.section.image_size)

    def dummy_input(self, device: torch.device):
        return None  # ZeRO-3 is refused for this task (config validation)

    def synthetic_batch(self, device: torch.device, generator: torch.Generator):
        """Random clouds in the unit cube (projected and original the same) with random labels."""
        batch, points = self.config.train.micro_batch_size, self.section.points
        clouds = (torch.rand(batch, points, 3, generator=generator) * 2 - 1).to(device)
        labels = torch.randint(0, self.section.num_classes, (batch,), generator=generator).to(device)
        return (clouds, clouds), labels

    def preview(self, inputs) -> torch.Tensor | None:
        """The projected views' occupancy (points per cell, scaled to [0, 1]) of up to 8 training clouds: one grey
        image per view, the views of a cloud side by side in the grid."""
        projected = inputs[0] if isinstance(inputs, tuple) else inputs.points
        views = rotate_views(projected[:8].detach().float().cpu(), VIEW_ANGLES[:self.section.views])
        size = self.section.image_size
        index = projection_indices(views, size)
        counts = torch.zeros(len(views), size * size)
        counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
        images = (counts / counts.amax(dim=1, keepdim=True).clamp_min(1)).reshape(-1, 1, size, size)
        return images.expand(-1, 3, -1, -1)


def preflight(config: PointCloudRunConfig) -> None:
    """Before any worker starts: ``pointcloud.data_root`` holds both splits with ``pointcloud.num_classes``
    classes, unless the demo set is to be generated there. Raises ``ConfigError`` naming the key."""
    if config.pointcloud.generate_demo:
        return
    for split in ("train", "test"):
        try:
            list_split(config.pointcloud.data_root, split, config.pointcloud.num_classes)
        except (FileNotFoundError, ValueError, OSError) as error:
            if isinstance(error, ConfigError):
                raise
            raise ConfigError("pointcloud.data_root", str(error)) from None
