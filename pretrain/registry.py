"""The task registry: every task the trainer runs is registered here from outside the core.

A task (image classification, ADE20K segmentation, COCO detection, ...) is a :class:`TaskSpec`: its run
config (the core :class:`~pretrain.config.Config` subclassed with the task's own typed section), its
presets (functions returning a config), the builder of its :class:`~pretrain.task.Task`, and what the
front ends need (resume rules, path keys, headline metrics, demo data, preflight, predict). The core,
the command lines and ``cluster/`` read this table; none of them names a task.

Tasks are found through the Python entry points of the group ``unireplknet.tasks`` (the project's
``pyproject.toml`` declares the built-in ones; another installed package can declare its own) and
through the modules listed in ``UNIREPLKNET_TASKS`` (comma-separated dotted module paths, imported
on first use; each registers its tasks with :func:`register_task` when imported)::

    UNIREPLKNET_TASKS=my_project.tasks python -m finetune my_task --config my_task_demo

A module may also be named by the entry point itself: the entry point's value is a module (whose
import registers) or a ``module:attribute`` that is a :class:`TaskSpec`.
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    from .config import Config
    from .task import Task

__all__ = ["ENTRY_POINT_GROUP", "MODULES_VARIABLE", "TaskSpec", "UnknownTaskError", "find_preset", "get_task",
           "register_task", "registered_tasks"]

_logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "unireplknet.tasks"
MODULES_VARIABLE = "UNIREPLKNET_TASKS"


class UnknownTaskError(KeyError):
    """No registered task has this name (the message lists the registered ones)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """Everything the core, the command lines and the cluster stages need to know about one task."""

    name: str
    """``config.task``; ``python -m finetune NAME``; the cluster stage ``finetune_NAME``."""
    summary: str
    """One line for ``--help`` and ``presets``."""
    config_class: type
    """The run config: ``pretrain.config.Config`` subclassed with the task's own section(s)."""
    build: Callable[["Config"], "Task"]
    """The task object the trainer runs (``build(config)``)."""
    presets: Mapping[str, Callable[[], "Config"]]
    """Preset name -> function returning a fresh config of ``config_class``."""
    demo_preset: str
    """A preset that trains on CPU in minutes on generated data (the demo pipeline, the conformance tests)."""
    cluster_preset: str = ""
    """The preset of the cluster stage (the paper-scale recipe); empty: the task has no stage."""
    resume_may_change: tuple[str, ...] = ()
    """Keys (``section.key``) or prefixes (ending in ``.`` or ``_``) of the task's sections a resumed run may
    change; every other change is refused (see ``pretrain.checkpoint``)."""
    path_keys: tuple[str, ...] = ()
    """Dotted keys holding local paths: launchers make them absolute (workers may start elsewhere)."""
    metrics: tuple[str, ...] = ()
    """Headline metrics (``eval/...`` keys of ``metrics.json``) the pipeline summary reports."""
    data_key: str = ""
    """What ``--data ROOT`` sets (``python -m finetune NAME``, the cluster stage); empty: no ``--data``."""
    environment: Mapping[str, str] = field(default_factory=dict)
    """Environment variable -> dotted key the cluster stage sets from it (e.g. the dataset root)."""
    real_data_overrides: tuple[str, ...] = ()
    """Overrides applied with ``--data`` or an ``environment`` value (e.g. stop generating the demo set)."""
    downstream: bool = True
    """Fine-tuned from the pretrained backbone: offered by ``python -m finetune`` and the pipeline's stages."""
    pretrained_backbone: bool = True
    """The cluster stage starts from the exported pretrained backbone (``--init``, ``UNIREPLKNET_BACKBONE``, the
    export stage's file); False: from the preset's own ``model.init_from`` unless ``--init`` is given (a recipe
    that trains from scratch, e.g. on one-channel inputs)."""
    write_demo_data: Callable[..., None] | None = None
    """``write_demo_data(out, seed=..., train_images=..., val_images=...)``: ``make-demo-data NAME OUT``."""
    preflight: Callable[["Config"], None] | None = None
    """Checks the task's inputs before any worker starts; raises ``ConfigError`` naming the key."""
    predict: Callable[..., list[str]] | None = None
    """``predict(config, model, images, out_dir, **options)`` -> written files (``python -m finetune predict``)."""
    smoke_overrides: tuple[str, ...] = ()
    """Overrides that shrink ``demo_preset`` to seconds per step (the conformance tests)."""
    released_key_map: Callable[[dict], dict] | None = None
    """The authors' released files in the product's key names (COCO: mmdet's); None: they are the same names."""
    onnx_dynamic_size: bool = False
    """``export-onnx``: the model takes any height and width (dense prediction), and so does the exported graph."""
    onnx_unsupported: str = ""
    """Why ``export-onnx`` refuses the task's model; empty: it exports (one image tensor in, tensors out)."""
    legacy_keys: Mapping[str, str | None] = field(default_factory=dict)
    """Keys of configs saved by earlier versions -> their key now (None: dropped), applied when loading."""


_TASKS: dict[str, TaskSpec] = {}
_lock = threading.RLock()
_discovered = False


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add ``spec`` to the registry (re-registering the same spec object is a no-op); returns it."""
    with _lock:
        known = _TASKS.get(spec.name)
        if known is not None and known is not spec and known.config_class is not spec.config_class:
            raise ValueError(f"task {spec.name!r} is registered twice ({known.build} and {spec.build})")
        presets = {name: other.name for other in _TASKS.values() if other.name != spec.name for name in other.presets}
        clashes = sorted(set(spec.presets) & set(presets))
        if clashes:
            raise ValueError(f"task {spec.name!r}: preset {clashes[0]!r} is already task {presets[clashes[0]]!r}'s")
        if spec.demo_preset not in spec.presets or (spec.cluster_preset and spec.cluster_preset not in spec.presets):
            raise ValueError(f"task {spec.name!r}: its demo_preset/cluster_preset must be among its presets")
        _TASKS[spec.name] = spec
    return spec


def _load(target: str) -> None:
    module, _, attribute = target.partition(":")
    loaded = importlib.import_module(module)
    if attribute:
        spec = getattr(loaded, attribute)
        if not isinstance(spec, TaskSpec):
            raise TypeError(f"{target} is a {type(spec).__name__}, not a TaskSpec")
        register_task(spec)


def _discover() -> None:
    """Import every task the entry points and ``UNIREPLKNET_TASKS`` name (once per process)."""
    global _discovered
    with _lock:
        if _discovered:
            return
        _discovered = True
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            try:
                _load(entry.value)
            except Exception as error:  # one broken plugin must not take the others down
                _logger.warning("task entry point %s = %s failed to load: %s: %s", entry.name, entry.value,
                                type(error).__name__, error)
        for module in filter(None, (m.strip() for m in os.environ.get(MODULES_VARIABLE, "").split(","))):
            try:
                _load(module)
            except ImportError as error:
                raise ImportError(f"{MODULES_VARIABLE}: cannot import {module!r}: {error}") from error


def registered_tasks() -> dict[str, TaskSpec]:
    """Name -> spec of every task found, in name order."""
    _discover()
    return dict(sorted(_TASKS.items()))


def get_task(name: str) -> TaskSpec:
    """The spec of task ``name``; :class:`UnknownTaskError` lists the registered ones."""
    tasks = registered_tasks()
    if name not in tasks:
        raise UnknownTaskError(f"no task {name!r} is registered; registered: {', '.join(tasks) or 'none'} "
                               f"(tasks come from the {ENTRY_POINT_GROUP!r} entry points and ${MODULES_VARIABLE})")
    return tasks[name]


def find_preset(name: str) -> tuple[TaskSpec, Callable[[], Any]] | None:
    """(task, preset function) of the preset ``name``, or None."""
    for spec in registered_tasks().values():
        if name in spec.presets:
            return spec, spec.presets[name]
    return None
