"""Saved configs of earlier versions, read by today's code.

Earlier versions wrote every task's section on every run and a few keys elsewhere (``data.num_workers``); a
saved config that names no task is image classification's. The core's and each task's ``legacy_keys`` say
where such keys live now (or that they are dropped); keys added since take their defaults when the config is
built (the promise a new key keeps: its default is the earlier behaviour)."""
from __future__ import annotations

import json

__all__ = ["LEGACY_KEYS", "LEGACY_TASK", "moved_to_today", "upgrade_config_dict"]

LEGACY_TASK = "classification"
"""The task of a saved config written before configs named their task (the trainer's first task)."""
LEGACY_KEYS: dict[str, str | None] = {"data.num_workers": "loader.num_workers",
                                      "data.eval_incomplete": "loader.eval_incomplete"}
"""Core keys of earlier versions -> their key now: applied to saved configs and to ``--set`` (with a warning)."""


def _move_key(values: dict, old: str, new: str | None) -> None:
    """Move (or drop, ``new`` None) the dotted key ``old`` of nested ``values``, in place."""
    *path, last = old.split(".")
    holder = values
    for part in path:
        holder = holder.get(part)
        if not isinstance(holder, dict):
            return
    if last not in holder:
        return
    value = holder.pop(last)
    if new is None:
        return
    *path, last = new.split(".")
    holder = values
    for part in path:
        holder = holder.setdefault(part, {})
    holder.setdefault(last, value)


def moved_to_today(values: dict) -> dict:
    """A copy of saved ``values`` with its task named and the keys of earlier versions moved or dropped by the
    core's and the task's ``legacy_keys``. Today's configs pass through unchanged."""
    from .config import ConfigError
    from .registry import UnknownTaskError, get_task

    values = json.loads(json.dumps(values))
    values.setdefault("task", LEGACY_TASK)
    try:
        spec = get_task(values["task"])
    except UnknownTaskError as error:
        raise ConfigError("task", str(error)) from None
    for old, new in {**LEGACY_KEYS, **spec.legacy_keys}.items():
        _move_key(values, old, new)
    for section in list(values):  # a section emptied by the moves above (e.g. ``data`` of a dense run)
        if values[section] == {}:
            del values[section]
    return values


def upgrade_config_dict(values: dict) -> dict:
    """A saved config in today's layout, every key present: moved by :func:`moved_to_today`, keys added since
    at their defaults. Returns a new dict."""
    from .config import config_from_dict, config_to_dict

    return config_to_dict(config_from_dict(values))
