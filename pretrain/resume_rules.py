"""Which settings a resumed run may change: the core's keys, each task's own (``TaskSpec.resume_may_change``), and
the comparison of a checkpoint's saved config with the run's (:func:`pretrain.checkpoint.choose_checkpoint` refuses
the other changes)."""
from __future__ import annotations

from typing import Any

__all__ = ["RESUME_MAY_CHANGE", "config_changes", "may_change", "resume_rules"]

RESUME_MAY_CHANGE = (
    "run_dir", "launch.", "checkpoint.", "train.max_steps", "train.log_every", "train.eval_every", "train.best_",
    "train.eval_every_epochs", "train.patience",
    "train.deterministic", "train.label_smoothing", "optim.clip_grad", "model.grad_checkpointing",
    "model.channels_last", "model.fused_branches", "model.sync_batchnorm", "loader.eval_incomplete",
)
"""Core config keys (or prefixes) a resumed run may change: they take effect from the resumed step on.
Every other setting is restored from the checkpoint (optimizer hyper-parameters, the schedule) or
fixes its layout (model, batch split, ZeRO stage, data order), so a change to it is refused. Each task
adds the keys of its own sections (``TaskSpec.resume_may_change``): :func:`resume_rules`."""


def resume_rules(task: str) -> tuple[str, ...]:
    """The core's :data:`RESUME_MAY_CHANGE` and task ``task``'s own keys."""
    from .registry import get_task

    return RESUME_MAY_CHANGE + tuple(get_task(task).resume_may_change)


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def config_changes(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` for every setting that differs, in key order."""
    old, new = _flatten(saved), _flatten(current)
    return [(key, old.get(key), new.get(key)) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def may_change(key: str, rules: tuple[str, ...]) -> bool:
    """Whether ``key`` is one of ``rules``, or starts with a rule that is a prefix (ends in ``.`` or ``_``)."""
    return any(key == rule or (rule.endswith(".") or rule.endswith("_")) and key.startswith(rule) for rule in rules)
