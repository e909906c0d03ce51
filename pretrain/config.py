"""The core run configuration: typed sections, validation, ``--set`` overrides, JSON round trips.

A run is one :class:`Config`: the core sections every task shares (``model``, ``optim``, ``train``,
``checkpoint``, ``launch``, ``loader``) plus the sections of its task, added by the task's own
``Config`` subclass (image classification's ``data``, ADE20K's ``ade20k``, ...; see
:mod:`pretrain.registry`). Presets are plain functions returning a config, registered with their
task. ``--set section.key=value`` overrides are parsed against the field's annotation, and
:func:`validate` checks every value before anything is built. Every error is a :class:`ConfigError`
whose message starts with the dotted key and says what was expected.

A saved config (``config.json``) holds only the run's own sections. Configs saved by earlier
versions (which carried every task's section) are upgraded when read: :mod:`pretrain.upgrade`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

from .upgrade import LEGACY_KEYS, moved_to_today

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "LaunchConfig",
    "LoaderConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "all_presets",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "in_range",
    "load_config",
    "off_words_to_empty",
    "positive",
    "save_config",
    "validate",
]

_logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration value is wrong; the message starts with the dotted key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Which network to train and how it is built."""

    name: str = "unireplknet_a"
    """timm model name (``unireplknet_a`` ... ``unireplknet_xl``)."""
    num_classes: int = 1000
    """Classifier outputs (21841 for ImageNet-22K, 1000 for ImageNet-1K)."""
    in_chans: int = 3
    """Input channels."""
    drop_path_rate: float = 0.0
    """Stochastic depth, linearly increasing over blocks up to this value."""
    head_init_scale: float = 1.0
    """Multiplies the initial classifier weights (0.001 for the 22K -> 1K fine-tune)."""
    depths: tuple[int, ...] | None = None
    """Override the variant's blocks per stage (small test networks)."""
    dims: tuple[int, ...] | None = None
    """Override the variant's channels per stage."""
    kernel_sizes: tuple[tuple[int, ...], ...] | None = None
    """Override the variant's depthwise kernel size per block, per stage."""
    init_from: str = ""
    """Weights to start from: an exported or official ``.pth`` (classifier skipped when its shape differs)."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in backward (saves memory at XL/384)."""
    channels_last: bool = False
    """Feed inputs in NHWC memory format (convolutions then run and return NHWC; parameters stay contiguous)."""
    sync_batchnorm: bool | Literal["auto"] = False
    """Convert BatchNorm to SyncBatchNorm (GPU only); buffers are averaged across ranks regardless. ``auto``: on
    CUDA with more than one rank (the authors' dense recipes: 2 images per GPU), plain BatchNorm otherwise."""
    fused_branches: bool = False
    """Run each Dilated Reparam Block's branches as one grouped conv + one batch norm (same function)."""
    weights: str = ""
    """The whole model's weights that ``evaluate`` scores: a run directory (its latest checkpoint) or checkpoint
    folder, a ``pretrain export`` file, an authors' released file (either structure). Empty when training."""
    weights_ema: bool = False
    """``evaluate`` a run directory's EMA weights instead of its model weights."""

    def validate(self) -> None:
        off_words_to_empty(self, "init_from")
        off_words_to_empty(self, "weights")
        if self.weights_ema and not self.weights:
            raise ConfigError("weights_ema", "expected model.weights (a run directory) with model.weights_ema=true")
        if self.fused_branches and self.sync_batchnorm is not False:
            raise ConfigError("fused_branches", "expected false with model.sync_batchnorm=true (the fused "
                              "branches use one plain batch norm, which would drop the cross-rank statistics)")
        if not self.name.startswith("unireplknet_"):
            raise ConfigError("name", f"expected a unireplknet_* model name, got {self.name!r}")
        positive("num_classes", self.num_classes)
        positive("in_chans", self.in_chans)
        in_range("drop_path_rate", self.drop_path_rate, 0.0, 1.0, upper_open=True)
        if self.head_init_scale <= 0:
            raise ConfigError("head_init_scale", f"expected > 0, got {self.head_init_scale}")
        for key in ("depths", "dims"):
            value = getattr(self, key)
            if value is not None and (len(value) != 4 or min(value) <= 0):
                raise ConfigError(key, f"expected 4 positive integers, got {value}")
        if self.kernel_sizes is not None:
            if len(self.kernel_sizes) != 4:
                raise ConfigError("kernel_sizes", f"expected 4 stages, got {len(self.kernel_sizes)}")
            if self.depths is not None and tuple(len(k) for k in self.kernel_sizes) != tuple(self.depths):
                raise ConfigError("kernel_sizes", f"expected one kernel size per block (depths {self.depths})")


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """Optimizer and learning-rate schedule (per optimizer step)."""

    name: Literal["adamw", "adam", "lamb"] = "adamw"
    """``adamw`` (fused on GPU, NVIDIA apex FusedAdam when installed), ``adam`` (``torch.optim.Adam``: weight decay
    added to the gradient as L2, as the authors' audio recipe) or ``lamb`` (apex, DeepSpeed or timm)."""
    lr: float = 4e-3
    """Peak learning rate (for the whole global batch)."""
    min_lr: float = 1e-6
    """Learning rate at the end of the cosine."""
    warmup_epochs: float = 5.0
    """Linear warmup length in epochs (converted to steps)."""
    weight_decay: float = 0.05
    """Decoupled weight decay; never applied to norms, biases, layer scale or GRN."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    layer_decay: float = 1.0
    """Layer-wise lr decay from the model's group_matcher (1.0 = off; 0.8 for the 22K -> 1K fine-tune)."""
    clip_grad: float | None = None
    """Clip the global gradient norm to this value (None: no clipping)."""
    schedule: Literal["cosine", "multistep", "poly"] = "cosine"
    """``cosine`` to ``min_lr``; ``multistep``: x ``gamma`` at each of ``milestones`` (mmdet's step policy);
    ``poly``: ``(lr - min_lr) * (1 - t/T) ** power + min_lr`` (mmseg's poly policy)."""
    warmup_steps: int | None = None
    """Linear warmup in optimizer steps (iterations); overrides ``warmup_epochs`` when set."""
    warmup_ratio: float | None = None
    """Warmup starts at ``lr * warmup_ratio`` and rises linearly (mmcv's linear warmup; None: the cosine
    schedule's ``(t+1)/warmup`` ramp). COCO 3x: 0.001; ADE20K: 1e-6."""
    milestones: tuple[float, ...] = ()
    """``multistep``: the epochs at which the lr drops (COCO 3x: 27, 33 of 36)."""
    gamma: float = 0.1
    """``multistep``: the factor at each milestone."""
    power: float = 1.0
    """``poly``: the exponent."""

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError("lr", f"expected > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError("min_lr", f"expected between 0 and optim.lr ({self.lr}), got {self.min_lr}")
        if self.warmup_epochs < 0:
            raise ConfigError("warmup_epochs", f"expected >= 0, got {self.warmup_epochs}")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", f"expected >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"expected two values in [0, 1), got {self.betas}")
        if self.eps <= 0:
            raise ConfigError("eps", f"expected > 0, got {self.eps}")
        in_range("layer_decay", self.layer_decay, 0.0, 1.0, lower_open=True)
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError("clip_grad", f"expected > 0 or none, got {self.clip_grad}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError("warmup_steps", f"expected >= 0 or none, got {self.warmup_steps}")
        if self.warmup_ratio is not None:
            in_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0, lower_open=True)
        if self.schedule == "multistep":
            if not self.milestones or list(self.milestones) != sorted(self.milestones) or min(self.milestones) <= 0:
                raise ConfigError("milestones", f"expected increasing positive epochs with optim.schedule=multistep, "
                                  f"got {list(self.milestones)}")
        in_range("gamma", self.gamma, 0.0, 1.0, lower_open=True)
        if self.power <= 0:
            raise ConfigError("power", f"expected > 0, got {self.power}")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """The training loop: length, batch, precision, ZeRO stage, loss, EMA, logging and eval cadence."""

    epochs: int = 90
    """Schedule length in epochs."""
    steps: int | None = None
    """Schedule length in optimizer steps (iterations, as the dense recipes count: 160k); overrides ``epochs``."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (the schedule still spans ``epochs`` / ``steps``)."""
    global_batch_size: int = 4096
    """Images per optimizer step over all ranks; accumulation = global / (micro x world size)."""
    micro_batch_size: int = 32
    """Images per rank per forward pass."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage: 1 (optimizer states), 2 (+ gradients), 3 (+ parameters); 0 for none (LAMB)."""
    precision: Literal["auto", "bf16", "fp32", "fp64"] = "auto"
    """``auto``: bf16 autocast on GPU, fp32 on CPU. BatchNorm weights and buffers stay fp32. ``fp64``:
    model, inputs and losses in float64 (numerical checks; DeepSpeed keeps fp32 master weights)."""
    label_smoothing: float = 0.1
    """Label smoothing (folded into the soft targets when mixup is on)."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights with this decay (None: off)."""
    seed: int = 0
    """Seed for model init, loader shuffling and per-rank drop path."""
    deterministic: bool = False
    """Ask torch for deterministic kernels (slower on GPU; exact resume on CPU holds without it)."""
    log_every: int = 50
    """Steps between log lines and TensorBoard scalars."""
    eval_every: int = 0
    """Steps between evaluations (0: only at the end, or as ``eval_every_epochs`` says)."""
    eval_every_epochs: int = 0
    """Epochs between evaluations, when ``eval_every`` is 0 (the authors' time-series recipe: each epoch)."""
    best_metric: str = ""
    """An evaluation metric (e.g. ``eval/top1``) that picks the run's best weights: the checkpoint of the best
    evaluation is kept (``checkpoints/best.json`` names it; never pruned) and scores the task's test set when the
    run completes, as the authors' Speech Commands protocol does. Empty: the test set is scored with the last
    weights."""
    best_mode: Literal["max", "min"] = "max"
    """Whether a higher (``max``: accuracy) or a lower (``min``: an error) ``best_metric`` is better."""
    patience: int = 0
    """Early stopping: end the run (completed: the test set is scored with the best weights) once this many
    evaluations in a row have not improved ``best_metric`` (the authors' time-series recipe: 3); 0: never."""

    def validate(self) -> None:
        positive("epochs", self.epochs)
        if self.steps is not None:
            positive("steps", self.steps)
        if self.max_steps is not None:
            positive("max_steps", self.max_steps)
        positive("global_batch_size", self.global_batch_size)
        positive("micro_batch_size", self.micro_batch_size)
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError("global_batch_size", f"expected a multiple of train.micro_batch_size "
                              f"({self.micro_batch_size}), got {self.global_batch_size}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("zero_stage", f"expected one of 0, 1, 2, 3, got {self.zero_stage}")
        in_range("label_smoothing", self.label_smoothing, 0.0, 1.0, upper_open=True)
        if self.ema_decay is not None:
            in_range("ema_decay", self.ema_decay, 0.0, 1.0, lower_open=True, upper_open=True)
        positive("log_every", self.log_every)
        if self.eval_every < 0:
            raise ConfigError("eval_every", f"expected >= 0, got {self.eval_every}")
        if self.eval_every_epochs < 0:
            raise ConfigError("eval_every_epochs", f"expected >= 0, got {self.eval_every_epochs}")
        if self.patience < 0:
            raise ConfigError("patience", f"expected >= 0, got {self.patience}")
        if self.patience and not (self.best_metric and (self.eval_every or self.eval_every_epochs)):
            raise ConfigError("patience", "expected train.best_metric and train.eval_every (or eval_every_epochs) > 0 "
                              f"with early stopping (train.patience={self.patience}): it counts evaluations without "
                              "a better best_metric")
        if self.best_metric and self.zero_stage == 3:
            raise ConfigError("best_metric", "needs train.zero_stage 0-2: the best checkpoint's weights are loaded "
                              "whole on every rank to score the test set")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """When to save and what to resume from."""

    every: int = 1000
    """Steps between checkpoints (one is always written at the end and on preemption)."""
    keep: int = 3
    """Keep the newest ``keep`` checkpoints."""
    resume: str = "latest"
    """``latest``: continue from the run directory's latest checkpoint if any; ``none``; or a checkpoint folder."""

    def validate(self) -> None:
        positive("every", self.every)
        positive("keep", self.keep)
        if not self.resume:
            raise ConfigError("resume", "expected 'latest', 'none' or a checkpoint folder")


@dataclass(kw_only=True, slots=True)
class LaunchConfig:
    """How many workers run the loop, and started by whom."""

    launcher: Literal["local", "torchrun", "ray"] = "local"
    """``local``: this process; ``torchrun``: a child torchrun on this node; ``ray``: Ray Train TorchTrainer."""
    num_workers: int = 1
    """Workers (ranks) in all, for ``torchrun`` (over ``launch.nodes`` nodes) and ``ray``."""
    nodes: int = 1
    """torchrun: nodes taking part; start the same command on each (``num_workers / nodes`` ranks per node)."""
    rdzv_endpoint: str = ""
    """torchrun with ``nodes > 1``: ``host:port`` of the c10d rendezvous (a port on the first node)."""
    rdzv_id: str = ""
    """torchrun with ``nodes > 1``: the job's rendezvous id (default: ``SLURM_JOB_ID``, else the run directory)."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """``auto``: CUDA when available (Ray: when the cluster has GPUs; a cluster without any is refused)."""
    ray_address: str = ""
    """Ray cluster to join (empty: the one this process is connected to, or a new local one)."""
    max_failures: int = 3
    """Ray Train: restarts of the worker group after a worker or node dies (each resumes from ``latest``)."""
    cpus_per_worker: int | None = None
    """Ray Train: CPUs reserved per worker (default: 1 + ``loader.num_workers``, the loader processes)."""

    def validate(self) -> None:
        positive("num_workers", self.num_workers)
        positive("nodes", self.nodes)
        if self.launcher == "local" and self.num_workers != 1:
            raise ConfigError("num_workers", "expected 1 with launch.launcher=local (use torchrun or ray)")
        if self.nodes > 1:
            if self.launcher != "torchrun":
                raise ConfigError("nodes", f"expected 1 with launch.launcher={self.launcher} (multi-node runs use "
                                  "torchrun; Ray places its workers itself)")
            if self.num_workers % self.nodes:
                raise ConfigError("num_workers", f"expected a multiple of launch.nodes ({self.nodes}), got "
                                  f"{self.num_workers}")
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError("rdzv_endpoint", f"expected host:port of the rendezvous with launch.nodes > 1, "
                                  f"got {self.rdzv_endpoint!r}")
        if self.max_failures < 0:
            raise ConfigError("max_failures", f"expected >= 0, got {self.max_failures}")
        if self.cpus_per_worker is not None:
            positive("cpus_per_worker", self.cpus_per_worker)


@dataclass(kw_only=True, slots=True)
class LoaderConfig:
    """Data loading settings every task shares."""

    num_workers: int = 8
    """Loader worker processes per rank."""
    eval_incomplete: Literal["error", "warn"] = "error"
    """When an evaluation scored fewer samples than the evaluation set holds (damaged shards, images or
    annotations): ``error`` stops the run naming the shortfall, ``warn`` logs it loudly and goes on."""

    def validate(self) -> None:
        if self.num_workers < 0:
            raise ConfigError("num_workers", f"expected >= 0, got {self.num_workers}")



@dataclass(kw_only=True, slots=True)
class Config:
    """One training run: the core sections. A task subclasses it to add its own section(s)."""

    run_dir: str = "runs/demo"
    """Everything the run writes: config.json, checkpoints/, tensorboard/, log."""
    task: str = ""
    """The registered task this config is for (``python -m finetune presets`` lists them); fixed by the preset
    or config file."""
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)

    def validate(self) -> None:
        """Rules across sections (a task's subclass adds its own and calls this)."""
        if not self.run_dir:
            raise ConfigError("run_dir", "expected a directory")
        if self.optim.name == "lamb" and self.train.zero_stage != 0:
            raise ConfigError("train.zero_stage", "expected 0 with optim.name=lamb: ZeRO flattens parameters, "
                              "so LAMB's per-parameter trust ratio would be computed over whole partitions")


def off_words_to_empty(section, *names: str) -> None:
    """String fields where empty means "off": the words none/off/false also mean off."""
    for name in names:
        if getattr(section, name).strip().lower() in ("", "none", "off", "false"):
            setattr(section, name, "")


def _non_finite_floats(value: Any, key: str) -> Iterator[str]:
    """Dotted keys of every NaN or infinite float in a config (sections walked recursively)."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _non_finite_floats(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _non_finite_floats(item, f"{key}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        yield key


def positive(key: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(key, f"expected > 0, got {value}")


def in_range(key: str, value: float, low: float, high: float, lower_open: bool = False, upper_open: bool = False):
    too_low = value <= low if lower_open else value < low
    too_high = value >= high if upper_open else value > high
    if too_low or too_high:
        interval = f"{'(' if lower_open else '['}{low}, {high}{')' if upper_open else ']'}"
        raise ConfigError(key, f"expected a value in {interval}, got {value}")


def validate(config: Config) -> Config:
    """Check every section, then the cross-section rules; errors name the dotted key."""
    _check_task(config)
    for key in _non_finite_floats(config, ""):
        raise ConfigError(key, f"expected a finite number, got {_get(config, key)}")
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if dataclasses.is_dataclass(value):
            try:
                value.validate()
            except ConfigError as error:
                raise ConfigError(f"{section.name}.{error.key}", str(error).split(": ", 1)[1]) from None
    config.validate()
    return config


def _check_task(config: Config) -> None:
    """``config.task`` is registered and ``config`` is of its config class."""
    from .registry import UnknownTaskError, get_task

    try:
        spec = get_task(config.task)
    except UnknownTaskError as error:
        raise ConfigError("task", str(error)) from None
    if type(config) is not spec.config_class:
        raise ConfigError("task", f"{config.task!r} runs with a {spec.config_class.__name__}, this config is a "
                          f"{type(config).__name__}")


def _get(config: Config, key: str) -> Any:
    value: Any = config
    for part in key.replace("[", ".").replace("]", "").split("."):
        value = value[int(part)] if part.isdigit() else getattr(value, part)
    return value


# ----------------------------------------------------------------------------- parsing


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    if annotation is type(None):
        return "none"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert ``value`` (from JSON or a parsed ``--set``) to ``annotation`` or raise a ConfigError."""
    origin = typing.get_origin(annotation)
    expected = _type_name(annotation)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _coerce(key, value, option)
            except ConfigError as error:
                errors.append(error)
        raise ConfigError(key, f"expected {expected}, got {value!r}")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(key, f"expected none, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(annotation):
            return value
        raise ConfigError(key, f"expected {expected}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected {expected}, got {value!r}")
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(key, f"expected {expected}, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping of {annotation.__name__} fields, got {value!r}")
        return _dataclass_from_dict(annotation, value, prefix=f"{key}.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(key, f"expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r}")
    raise TypeError(f"{key}: unsupported annotation {annotation!r}")


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _dataclass_from_dict(cls, values: dict, prefix: str = ""):
    known = _fields(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(prefix + unknown[0], f"unknown key; expected one of {', '.join(sorted(known))}")
    return cls(**{name: _coerce(prefix + name, value, known[name]) for name, value in values.items()})


def config_from_dict(values: dict) -> Config:
    """Build the task's Config from nested plain values (as written by :func:`config_to_dict`, by this version
    or an earlier one: :mod:`pretrain.upgrade`; keys added since take their defaults); not yet validated."""
    from .registry import get_task

    values = moved_to_today(values)
    return _dataclass_from_dict(get_task(values["task"]).config_class, values)


def config_to_dict(config: Config) -> dict:
    """Nested plain values (tuples as lists), JSON-serializable."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


_TRUE_WORDS, _FALSE_WORDS, _NONE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0"), ("none", "null")


def _parse_text(key: str, text: str, annotation: Any) -> Any:
    """Turn the text of ``--set key=TEXT`` into a value of the field's type ``annotation``.

    The field's type decides what the text means: a string field takes the text as it is
    (``checkpoint.resume=none`` is the word "none", ``data.auto_augment=off`` the word "off");
    ``none``/``null`` mean None only where the field accepts None; ``true/yes/on/1`` and
    ``false/no/off/0`` only for booleans; lists are JSON or comma-separated.
    """
    origin = typing.get_origin(annotation)
    expected = _type_name(annotation)
    stripped = text.strip()
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if type(None) in options and stripped.lower() in _NONE_WORDS:
            return None
        for option in (o for o in options if o is not type(None)):
            try:
                return _parse_text(key, text, option)
            except ConfigError:
                continue
        raise ConfigError(key, f"expected {expected}, got {text!r}")
    if origin is Literal:
        if stripped in typing.get_args(annotation):
            return stripped
        raise ConfigError(key, f"expected {expected}, got {text!r}")
    if origin is tuple:
        if stripped.startswith("["):
            try:
                return json.loads(stripped)
            except json.JSONDecodeError as error:
                raise ConfigError(key, f"expected {expected} (JSON or comma-separated), got {text!r}: {error}") from None
        args = typing.get_args(annotation)
        element_types = [args[0]] * (stripped.count(",") + 1) if len(args) == 2 and args[1] is Ellipsis else list(args)
        parts = stripped.split(",") if stripped else []
        if len(parts) != len(element_types):
            raise ConfigError(key, f"expected {expected}, got {text!r}")
        return [_parse_text(f"{key}[{i}]", part, element) for i, (part, element) in enumerate(zip(parts, element_types))]
    if annotation is bool:
        if stripped.lower() in _TRUE_WORDS:
            return True
        if stripped.lower() in _FALSE_WORDS:
            return False
        raise ConfigError(key, f"expected true or false, got {text!r}")
    if annotation is int:
        try:
            return int(stripped)
        except ValueError:
            raise ConfigError(key, f"expected an integer, got {text!r}") from None
    if annotation is float:
        try:
            return float(stripped)
        except ValueError:
            raise ConfigError(key, f"expected a number, got {text!r}") from None
    if annotation is str:
        return text
    raise ConfigError(key, f"cannot be set from text (type {expected})")


def _current_key(config: Config, key: str) -> str:
    """``key``, or its new name when it is a renamed key of an earlier version (with a warning)."""
    from .registry import get_task

    renames = {**LEGACY_KEYS, **get_task(config.task).legacy_keys}
    new = renames.get(key)
    if key in renames and new is not None:
        try:
            _get(config, key)
        except AttributeError:
            _logger.warning("--set %s: this key is now %s", key, new)
            return new
    return key


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings in order; unknown keys and bad values raise ConfigError."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "expected key=value")
        key, text = item.split("=", 1)
        key = _current_key(config, key.strip())
        if key == "task":
            if text.strip() == config.task:
                continue
            raise ConfigError("task", f"fixed by the preset or config file (this one is {config.task!r}); choose a "
                              f"preset of task {text.strip()!r} instead (python -m finetune presets lists them)")
        parts = key.split(".")
        target, annotation_owner = config, type(config)
        for depth, part in enumerate(parts):
            known = _fields(annotation_owner)
            if part not in known:
                where = ".".join(parts[:depth]) or "the config"
                raise ConfigError(key, f"unknown key; {where} has {', '.join(sorted(known))}")
            annotation = known[part]
            if depth < len(parts) - 1:
                if not dataclasses.is_dataclass(annotation):
                    raise ConfigError(key, f"{'.'.join(parts[:depth + 1])} is a value, not a section")
                target, annotation_owner = getattr(target, part), annotation
            else:
                if dataclasses.is_dataclass(annotation):
                    raise ConfigError(key, f"is a section; set one of its keys: "
                                      f"{', '.join(sorted(_fields(annotation)))}")
                setattr(target, part, _coerce(key, _parse_text(key, text, annotation), annotation))
    return config


def save_config(config: Config, path: str) -> None:
    """Write the effective config as JSON (atomically): the core sections and the task's, nothing else."""
    from unireplknet.files import atomic_write_json

    atomic_write_json(path, config_to_dict(config), indent=2)


def all_presets() -> dict[str, Callable[[], Config]]:
    """Preset name -> function returning a fresh config, over every registered task."""
    from .registry import registered_tasks

    return {name: make for spec in registered_tasks().values() for name, make in spec.presets.items()}


def load_config(name_or_path: str, overrides: list[str] = ()) -> Config:
    """A preset name (of any registered task) or a JSON file, then ``--set`` overrides, then validation."""
    from .registry import find_preset

    found = find_preset(name_or_path)
    if found is not None:
        config = found[1]()
    elif os.path.isfile(name_or_path):
        try:
            with open(name_or_path) as f:
                values = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError("--config", f"{name_or_path} is not a readable JSON config: {error}") from None
        config = config_from_dict(values)
    else:
        raise ConfigError("--config", f"expected a preset ({', '.join(all_presets())}) or a JSON file, "
                          f"got {name_or_path!r}")
    return validate(apply_overrides(config, list(overrides)))
