"""What the one training loop needs from a problem: model, data, loss, evaluation (the :class:`Task` protocol).

Tasks live outside the core and register themselves (:mod:`pretrain.registry`); :func:`build_task`
builds the one a config names. :class:`TaskBase` gives the defaults most tasks keep.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable, Protocol

import torch
import torch.nn as nn

from unireplknet.files import atomic_write_text

from .config import Config, OptimConfig
from .distributed import WorldInfo, all_reduce_sum, barrier

__all__ = ["Evaluator", "SumsEvaluator", "Task", "TaskBase", "build_task", "denormalize"]

_logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
"""The file a generated data folder holds once it is whole."""


class Evaluator(Protocol):
    """Accumulates one evaluation pass; :meth:`compute` does its own collectives (every rank calls it
    once, with whatever it saw) and returns the same metrics on every rank, among them ``samples``: how
    many samples of the evaluation set were scored (the trainer compares it with the set's size)."""

    def reset(self) -> None: ...

    def update(self, outputs: Any, targets: Any) -> None: ...

    def compute(self, world: WorldInfo) -> dict[str, float]: ...


class Task(Protocol):
    """The pluggable parts of training.

    Training loaders follow the ``shards`` contract: ``set_epoch``, ``len`` (micro-batches per epoch,
    equal on all ranks), ``state_dict``/``load_state_dict``, ``bad_samples``. Evaluation loaders may hold
    a different number of batches on each rank and tell ``num_samples`` (this rank's share of the set;
    the trainer sums them) and ``description`` (what the set is, for messages). A task with a held-out test
    set may add ``build_test_loader(world)`` (an evaluation loader, or None): the trainer scores it once when a
    run completes, under ``test/`` in ``metrics.json``.
    """

    throughput_unit: str
    """What one sample is, for throughput figures (``images``, ``clips``, ...): ``perf/{unit}_per_s_*``."""

    def build_model(self) -> nn.Module: ...

    def build_param_groups(self, model: nn.Module, config: OptimConfig) -> list[dict]:
        """Optimizer groups (``pretrain.optim.build_param_groups`` with the task's layer-decay rule)."""

    def build_train_loader(self, world: WorldInfo) -> Any: ...

    def build_eval_loader(self, world: WorldInfo) -> Iterable | None: ...

    def prepare_batch(self, batch: Any, device: torch.device) -> tuple[Any, Any]:
        """(inputs for the model, targets) on ``device``."""

    def training_losses(self, model: nn.Module, inputs: Any, targets: Any) -> dict[str, torch.Tensor]:
        """The task's training step up to backward: named loss terms whose sum is minimized (each is logged)."""

    def batch_size(self, inputs: Any) -> int:
        """Samples in ``inputs`` (for throughput)."""

    def build_evaluator(self, device: torch.device) -> Evaluator: ...

    def evaluation_step(self, model: nn.Module, inputs: Any, targets: Any, evaluator: Evaluator) -> None:
        """Predict (whole image, sliding windows, test-time augmentation: the task's choice) and update."""

    def input_shape(self) -> tuple[int, ...]:
        """One sample's model input at the task's training size, e.g. (3, 224, 224): export verifies the
        re-parameterized backbone on it."""

    def synthetic_batch(self, device: torch.device, generator: torch.Generator) -> Any:
        """A training micro-batch of random data in the train loader's output format (benchmarks)."""

    def dummy_input(self, device: torch.device) -> torch.Tensor | None:
        """A one-sample input for ranks that ran out of evaluation data while others still run (ZeRO-3
        forward passes are collective); None for tasks that refuse ZeRO-3."""

    def preview(self, inputs: Any) -> torch.Tensor | None:
        """Inputs as displayable images in [0, 1] (N, 3, H, W) for TensorBoard, or None (nothing to show)."""

    def data_bound_hint(self, samples_per_s_needed: float) -> str:
        """What to change when the loader sets the pace (logged once by the trainer)."""


class TaskBase:
    """Defaults for :class:`Task` implementations: the core's parameter groups, a zero dummy input of
    :meth:`input_shape`, no previews, a hint naming ``loader.num_workers``."""

    throughput_unit = "samples"

    def __init__(self, config: Config):
        self.config = config

    def build_param_groups(self, model: nn.Module, config: OptimConfig) -> list[dict]:
        from .optim import build_param_groups

        return build_param_groups(model, config)

    def batch_size(self, inputs: Any) -> int:
        return inputs.shape[0] if isinstance(inputs, torch.Tensor) else len(inputs)

    def dummy_input(self, device: torch.device) -> torch.Tensor | None:
        return torch.zeros(1, *self.input_shape(), device=device)

    def preview(self, inputs: Any) -> torch.Tensor | None:
        return None

    def data_bound_hint(self, samples_per_s_needed: float) -> str:
        return (f"raise loader.num_workers (now {self.config.loader.num_workers}) until the loader delivers "
                f"{samples_per_s_needed:.0f} {self.throughput_unit}/s per rank")

    def generate_once(self, folder: str, write: Callable[[], None], world: WorldInfo, what: str) -> None:
        """Generated data (a demo set) written once: rank 0 calls ``write()`` unless ``FOLDER/COMPLETE`` says it
        is there, then marks it; every rank waits for it."""
        done = os.path.join(folder, COMPLETE_MARKER)
        if world.is_main and not os.path.isfile(done):
            _logger.info("generating the %s in %s", what, folder)
            write()
            atomic_write_text(done, "ok\n")
        barrier()


def build_task(config: Config) -> Task:
    """The task ``config.task`` names, from the registry."""
    from .registry import get_task

    return get_task(config.task).build(config)


def denormalize(images: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """Normalized (N, 3, H, W) images back to [0, 1] (ImageNet's mean and std unless given)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    images = images.detach().float().cpu()[:, :3]
    mean = torch.tensor(mean or IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(std or IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


class SumsEvaluator:
    """Per-batch sums (from ``sums(outputs, targets)``), summed over batches and then over ranks in one
    all-reduce, turned into metrics by ``results(sums)``."""

    def __init__(self, names: tuple[str, ...], sums, results, device: torch.device):
        self.names, self._sums, self._results, self.device = names, sums, results, device
        self.reset()

    def reset(self) -> None:
        self.totals = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)

    def update(self, outputs: Any, targets: Any) -> None:
        batch = self._sums(outputs, targets)
        self.totals += torch.stack([batch[n].double() for n in self.names])

    def compute(self, world: WorldInfo) -> dict[str, float]:
        totals = all_reduce_sum(self.totals.clone())
        return self._results(dict(zip(self.names, totals.tolist())))
