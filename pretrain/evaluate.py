"""``python -m pretrain evaluate --config PRESET --weights FILE`` and ``python -m finetune evaluate TASK ...``:
a model's weights scored by its task's evaluation set (and test set, where the task has one) without training.

The weights (``model.weights``: a run directory, a checkpoint folder, a ``pretrain export`` file or an authors'
released file; ``model.weights_ema`` for a run's EMA weights) are loaded strictly into the task's model, and the
trainer's own evaluation runs on every rank of any launcher (in this process, torchrun, Ray Train): the same
figures a training run logs, every sample scored once (an incomplete evaluation says so, as in training), written
to ``metrics.json`` and TensorBoard in the evaluation's own run directory (``run_dir``), which must not be the
weights' run directory: nothing is written there.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import torch.nn as nn

from .config import Config, ConfigError, save_config
from .launch import WorkerEntry
from .metrics import TensorBoard
from .preemption import STOP_FILE
from .task import Task
from .trainer import StopRequests, Trainer, TrainResult, seed_everything
from .weights import load_model_weights, read_model_weights

__all__ = ["EVALUATE_ENTRY", "WeightsEvaluation", "evaluation_config", "run_evaluation"]

_logger = logging.getLogger(__name__)


class _Inference(nn.Module):
    """The model where the trainer's evaluation expects its DeepSpeed engine: a forward and ``.module``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.module = model

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class WeightsEvaluation(Trainer):
    """The trainer's evaluation of given weights: no training loader, optimizer or engine is built."""

    def __init__(self, config: Config, task: Task | None = None):
        self._start(config, task, "evaluate.log")
        weights = read_model_weights(config.model.weights, ema=config.model.weights_ema)
        seed_everything(config.train.seed)
        model = self._build_model()
        from .registry import get_task

        structure = load_model_weights(model, weights, get_task(config.task).released_key_map)
        self.engine = _Inference(model)
        self.ema = None
        self.best = None
        self.step = weights.step
        self.last_checkpoint = None
        self.eval_loader = self.task.build_eval_loader(self.world)
        if self.eval_loader is None:
            raise ConfigError("task", f"task {config.task} builds no evaluation set from this config: nothing to score")
        self.stop_requests = StopRequests(os.path.join(config.run_dir, STOP_FILE))
        self.stopping: str | None = None
        self._eval_previews = None
        if self.world.is_main:
            save_config(config, os.path.join(config.run_dir, "config.json"))
        self.tensorboard = TensorBoard(os.path.join(config.run_dir, "tensorboard"), self.world.is_main)
        _logger.info("evaluating %s%s (%s structure, step %d) on %s x%d, precision %s", weights.source,
                     " (EMA)" if config.model.weights_ema else "", structure, self.step, self.device.type,
                     self.world.world_size, self.precision)

    def run(self) -> TrainResult:
        """The evaluation set, then the test set where the task has one; a stop request ends it (exit 75)."""
        with self.stop_requests:
            results = self.evaluate()
            if results and not self.stopping:
                results = {**results, **self.test()}
        if self.stopping:
            _logger.warning("stop requested (%s): evaluation not finished; rerun to evaluate again", self.stopping)
            return TrainResult("preempted", self.step, None, {})
        return TrainResult("completed", self.step, None, results)


def run_evaluation(config: Config) -> TrainResult:
    """What every launched worker of an evaluation runs."""
    evaluation = WeightsEvaluation(config)
    try:
        return evaluation.run()
    finally:
        evaluation.close()


EVALUATE_ENTRY = WorkerEntry(module_args=("-m", "pretrain", "evaluate"), function=run_evaluation)


def _run_dir_of(path: str) -> str:
    """The run directory a weights source belongs to ('' for a file outside any run)."""
    path = os.path.realpath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return path
    parent = os.path.dirname(path)
    if os.path.basename(parent) == "checkpoints":
        return os.path.dirname(parent)
    return ""


def evaluation_config(config: Config, weights: str | None, ema: bool = False, out: str | None = None) -> Config:
    """The config of an evaluation, checked before any worker starts: ``model.weights`` (and ``weights_ema``)
    from ``weights`` (a launched worker's config has them already), ``run_dir`` from ``out`` or beside the
    weights' run (:func:`default_run_dir`)."""
    if weights is not None:
        config.model = dataclasses.replace(config.model, weights=weights, weights_ema=ema or config.model.weights_ema)
        config.run_dir = out or default_run_dir(config, weights)
    else:
        if ema:
            config.model = dataclasses.replace(config.model, weights_ema=True)
        if out:
            config.run_dir = out
    _check_evaluation_config(config)
    return config


def _check_evaluation_config(config: Config) -> None:
    """Before any worker starts: weights named and present, and the evaluation writing outside their run."""
    weights = config.model.weights
    if not weights:
        raise ConfigError("model.weights", "expected the weights to evaluate (--weights FILE_OR_RUN_DIR)")
    if "://" not in weights and not os.path.exists(weights):
        raise ConfigError("model.weights", f"no such file or directory: {weights}")
    source_run = _run_dir_of(weights)
    if source_run and source_run == os.path.realpath(config.run_dir):
        raise ConfigError("run_dir", f"{config.run_dir} is the run directory of the weights: an evaluation writes "
                          "its own metrics.json and TensorBoard files elsewhere (--out DIR)")


def default_run_dir(config: Config, weights: str) -> str:
    """``<the config's run_dir>_evaluate_<weights name>``: beside the run, never inside it."""
    name = os.path.basename(os.path.normpath(weights))
    name = os.path.splitext(name)[0] if os.path.isfile(weights) else name
    return f"{os.path.normpath(config.run_dir)}_evaluate_{name}"
