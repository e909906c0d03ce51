"""Keyword recognition as a ``pretrain.task.Task``: UniRepLKNet (``in_chans=1``) on ``1 x mel x frames`` log-mel
maps, its head (pooled feature, LayerNorm, Linear), BCE on the soft (mixup) targets, top-1 accuracy."""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import ConfigError
from pretrain.distributed import WorldInfo
from pretrain.task import SumsEvaluator, TaskBase

from .config import AudioRunConfig
from .data import ClipBatch, EvalLoader, TrainLoader, list_split

__all__ = ["AudioClassification", "accuracy_sums", "accuracy_results", "preflight"]

_logger = logging.getLogger(__name__)


def accuracy_sums(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-batch sums of the authors' metric: clips whose arg-max class is their label, and clips."""
    return {"correct": (logits.argmax(dim=-1) == labels).sum().float(),
            "count": torch.tensor(float(labels.numel()), device=labels.device)}


def accuracy_results(sums: dict[str, float]) -> dict[str, float]:
    """``top1``: percent of the scored clips classified right (not class-averaged); ``samples``: clips scored."""
    return {"top1": 100.0 * sums["correct"] / max(sums["count"], 1.0), "samples": sums["count"]}


class AudioClassification(TaskBase):
    """Speech Commands (or the spoken-word demo set in its layout) on the one trainer."""

    throughput_unit = "clips"
    config: AudioRunConfig

    @property
    def section(self):
        return self.config.audio

    def _root(self, world: WorldInfo) -> str:
        section = self.section
        if section.generate_demo:
            from .demo_data import write_demo

            self.generate_once(section.data_root, lambda: write_demo(section.data_root, seed=self.config.train.seed),
                               world, "spoken-word demo set")
        return section.data_root

    def build_model(self) -> nn.Module:
        from pretrain.classification.task import build_model

        return build_model(self.config)

    def build_train_loader(self, world: WorldInfo) -> TrainLoader:
        files = list_split(self._root(world), "training", self.section.num_classes)
        return TrainLoader(files, self.section, batch_size=self.config.train.micro_batch_size, rank=world.rank,
                           world_size=world.world_size, num_workers=self.config.loader.num_workers,
                           seed=self.config.train.seed)

    def _eval_loader(self, world: WorldInfo, split: str) -> EvalLoader:
        files = list_split(self._root(world), split, self.section.num_classes)
        return EvalLoader(files, self.section, batch_size=self.config.train.micro_batch_size, rank=world.rank,
                          world_size=world.world_size, num_workers=self.config.loader.num_workers)

    def build_eval_loader(self, world: WorldInfo) -> EvalLoader:
        """The validation list (what the trainer evaluates during training)."""
        return self._eval_loader(world, "validation")

    def build_test_loader(self, world: WorldInfo) -> EvalLoader:
        """The testing list, evaluated once when the run completes (``test/`` in ``metrics.json``)."""
        return self._eval_loader(world, "testing")

    def prepare_batch(self, batch, device: torch.device):
        """Inputs and targets on ``device``; training clips of ``audio.features_on=device`` become their log-mel
        maps there, in one batched pass (:meth:`ClipBatch.model_input`)."""
        inputs, targets = batch[0], batch[1]
        if isinstance(inputs, ClipBatch):
            return inputs.model_input(self.section, device), targets.to(device, non_blocking=True)
        return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)

    def training_losses(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """The authors' loss: ``BCEWithLogits`` on the (soft, mixup) one-hot targets, averaged over clips and classes."""
        return {"loss": F.binary_cross_entropy_with_logits(model(inputs).float(), targets.float())}

    def build_evaluator(self, device: torch.device) -> SumsEvaluator:
        return SumsEvaluator(("correct", "count"), accuracy_sums, accuracy_results, device)

    def evaluation_step(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, evaluator) -> None:
        evaluator.update(model(inputs).float(), labels)

    def input_shape(self) -> tuple[int, ...]:
        return (1, self.section.num_mel_bins, self.section.target_length)

    def synthetic_batch(self, device: torch.device, generator: torch.Generator):
        """Random normalized log-mel maps with random one-hot targets."""
        batch = self.config.train.micro_batch_size
        inputs = torch.randn(batch, *self.input_shape(), generator=generator)
        labels = torch.randint(0, self.section.num_classes, (batch,), generator=generator)
        return inputs.to(device), F.one_hot(labels, self.section.num_classes).float().to(device)

    def preview(self, inputs: torch.Tensor) -> torch.Tensor:
        """Log-mel maps as grey images, low frequencies at the bottom, each scaled to [0, 1]."""
        maps = inputs.detach().float().cpu()[:, :1].flip(-2)
        low = maps.amin(dim=(-2, -1), keepdim=True)
        high = maps.amax(dim=(-2, -1), keepdim=True)
        return ((maps - low) / (high - low).clamp_min(1e-6)).expand(-1, 3, -1, -1)

    def data_bound_hint(self, samples_per_s_needed: float) -> str:
        where = ("" if self.section.features_on == "device" else
                 "; or set audio.features_on=device: fbank, masks and noise then run on the training device")
        return (f"raise loader.num_workers (now {self.config.loader.num_workers}; a mixed clip reads two files) until "
                f"the loader delivers {samples_per_s_needed:.0f} clips/s per rank{where}")


def preflight(config: AudioRunConfig) -> None:
    """Before any worker starts: ``audio.data_root`` holds the three splits and ``audio.num_classes`` word folders,
    unless the demo set is to be generated there. Raises ``ConfigError`` naming the key."""
    if config.audio.generate_demo:
        return
    for split in ("training", "validation", "testing"):
        try:
            list_split(config.audio.data_root, split, config.audio.num_classes)
        except (FileNotFoundError, ValueError, OSError) as error:
            if isinstance(error, ConfigError):
                raise
            raise ConfigError("audio.data_root", str(error)) from None
