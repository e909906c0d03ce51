"""Checkpoints: the layout on disk, atomic saves, choosing what to resume from, loading, consolidation.

Layout under ``RUN_DIR/checkpoints``::

    step_00001000/                 a complete checkpoint: only ever renamed into place whole
        manifest.json              step, world size, ZeRO stage, every file with its size
        config.json                the run's config when it was written
        mp_rank_00_model_states.pt DeepSpeed: model, optimizer (ZeRO: partitions), lr scheduler
        ...
        trainer_rank00000.pt       per rank: step, data-loader position, RNG states, EMA (plain
        ...                        tensors and Python values: loads with ``weights_only=True``)
    .incomplete-step_00001000/     a save in progress; never resumed from, cleared by the next save
    latest                         the tag of the newest complete checkpoint

A save writes into ``.incomplete-TAG``, flushes, and rank 0 renames it to ``TAG`` and then
replaces ``latest`` (temporary file, fsync, rename): a kill at any moment leaves ``latest``
pointing at a whole checkpoint and no ``step_N`` folder holds files of two saves.

Resuming is decided on rank 0 and broadcast, so every rank takes the same checkpoint or fails
with the same message: ``latest`` when it names a complete checkpoint, otherwise (with a warning)
the newest complete ``step_N``; a checkpoint written by another world size, or with settings
that exact resume cannot honour, is refused naming them. A damaged file is named.

DeepSpeed reads its own files with full pickle loading: resume or export only run directories
you trust. The trainer's own rank files load with ``weights_only=True``.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any

import torch

from .distributed import WorldInfo, all_reduce_sum, barrier, broadcast_object

__all__ = [
    "CHECKPOINT_PREFIX",
    "CheckpointError",
    "Manifest",
    "RESUME_MAY_CHANGE",
    "choose_checkpoint",
    "config_changes",
    "consolidated_state_dict",
    "find_checkpoint",
    "load_checkpoint",
    "read_manifest",
    "read_rank_states",
    "read_saved_config",
    "resume_rules",
    "save_checkpoint",
    "tag_of_step",
]

_logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
INCOMPLETE_PREFIX = ".incomplete-"
MANIFEST_NAME = "manifest.json"
CONFIG_NAME = "config.json"
MANIFEST_FORMAT = "unireplknet-trainer-checkpoint"
MANIFEST_VERSION = 1
_RANK_FILE = "trainer_rank{rank:05d}.pt"
_STAGE0_MODEL_FILE = "mp_rank_00_model_states.pt"

RESUME_MAY_CHANGE = (
    "run_dir", "launch.", "checkpoint.", "train.max_steps", "train.log_every", "train.eval_every",
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


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: incomplete, damaged, another world size, or incompatible settings."""


@dataclass(frozen=True, slots=True)
class Manifest:
    """What ``manifest.json`` records about one complete checkpoint."""

    step: int
    world_size: int
    zero_stage: int
    files: dict[str, int]


def tag_of_step(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def _step_of_tag(tag: str) -> int | None:
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", tag)
    return int(match.group(1)) if match else None


def checkpoint_steps(root: str) -> list[int]:
    """Steps of the ``step_N`` folders under ``root``, ascending."""
    if not os.path.isdir(root):
        return []
    return sorted(step for step in map(_step_of_tag, os.listdir(root)) if step is not None)


# ----------------------------------------------------------------------------- saving


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_own_files(folder: str, rank: int) -> None:
    """Flush this rank's files (rank 0 also flushes the shared ones) so ``latest`` never outruns the data."""
    own = re.compile(rf"(?:^|_)rank_?0*{rank}(?:_|\.)")
    for directory, _, files in os.walk(folder):
        for name in files:
            rank_named = re.search(r"rank_?\d+", name) and not name.startswith("mp_rank_")
            if own.search(name) or (rank == 0 and not rank_named):
                _fsync_path(os.path.join(directory, name))


def _write_json_atomic(path: str, value: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_latest(root: str, tag: str) -> None:
    tmp = os.path.join(root, f".latest.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, "latest"))
    _fsync_path(root)


def _file_sizes(folder: str) -> dict[str, int]:
    sizes = {}
    for directory, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(directory, name)
            sizes[os.path.relpath(path, folder)] = os.path.getsize(path)
    return sizes


def save_checkpoint(engine, root: str, step: int, rank_state: dict, world: WorldInfo, *, keep: int,
                    zero_stage: int, config: dict) -> str:
    """All ranks: write the DeepSpeed checkpoint and this rank's trainer state into a fresh
    ``.incomplete-TAG`` folder, flush; rank 0 adds the manifest and the config, renames the folder
    to ``TAG``, points ``latest`` at it and deletes all but the newest ``keep`` up to ``step``."""
    tag = tag_of_step(step)
    staging_tag = INCOMPLETE_PREFIX + tag
    staging, final = os.path.join(root, staging_tag), os.path.join(root, tag)
    if world.is_main:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):
            if name.startswith(INCOMPLETE_PREFIX):  # left by an interrupted save
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    barrier()
    engine.save_checkpoint(root, tag=staging_tag, client_state={"step": step}, save_latest=False)
    torch.save(rank_state, os.path.join(staging, _RANK_FILE.format(rank=world.rank)))
    _fsync_own_files(staging, world.rank)
    barrier()
    if world.is_main:
        with open(os.path.join(staging, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "step": step,
                    "world_size": world.world_size, "zero_stage": zero_stage, "files": _file_sizes(staging)}
        _write_json_atomic(os.path.join(staging, MANIFEST_NAME), manifest)
        _fsync_path(os.path.join(staging, CONFIG_NAME))
        _fsync_path(staging)
        if os.path.exists(final):  # this step was reached before, on a timeline resumed from earlier
            replaced = os.path.join(root, f"{INCOMPLETE_PREFIX}replaced-{tag}")
            os.rename(final, replaced)
            os.rename(staging, final)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.rename(staging, final)
        _fsync_path(root)
        _write_latest(root, tag)
        # Folders past this step are leftovers of an abandoned timeline: never counted among the
        # newest, so they cannot push a complete checkpoint out.
        for old in [s for s in checkpoint_steps(root) if s <= step][:-keep]:
            shutil.rmtree(os.path.join(root, tag_of_step(old)), ignore_errors=True)
    barrier()
    return final


# ----------------------------------------------------------------------------- choosing what to resume


def read_manifest(folder: str) -> Manifest:
    """The manifest of a complete checkpoint folder, every listed file checked for presence and size."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {MANIFEST_NAME}, so not a complete checkpoint (an interrupted save, "
                              "or written by an older version of this trainer)") from None
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is damaged: {error}") from None
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT or raw.get("version") != MANIFEST_VERSION:
        raise CheckpointError(f"{path}: expected a {MANIFEST_FORMAT} manifest version {MANIFEST_VERSION}")
    try:
        manifest = Manifest(int(raw["step"]), int(raw["world_size"]), int(raw["zero_stage"]),
                            {str(k): int(v) for k, v in raw["files"].items()})
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{path}: field {error} missing or malformed") from None
    for name, size in manifest.files.items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{folder} is damaged: {name} is missing")
        actual = os.path.getsize(file)
        if actual != size:
            raise CheckpointError(f"{folder} is damaged: {file} has {actual} bytes, the manifest says {size} "
                                  "(truncated or overwritten)")
    return manifest


def read_saved_config(folder: str) -> dict | None:
    """The config stored with a checkpoint (None when the folder has none)."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is damaged: {error}") from None


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


def _may_change(key: str, rules: tuple[str, ...]) -> bool:
    return any(key == rule or (rule.endswith(".") or rule.endswith("_")) and key.startswith(rule) for rule in rules)


def _latest_folder(root: str) -> tuple[str | None, str | None]:
    """(folder ``latest`` names, or None; why it cannot be used, or None)."""
    path = os.path.join(root, "latest")
    if not os.path.exists(path):
        return None, f"{path} is missing"
    try:
        with open(path) as f:
            tag = f.read().strip()
    except OSError as error:
        return None, f"{path} cannot be read: {error}"
    if _step_of_tag(tag) is None:
        return None, f"{path} holds {tag[:40]!r}, not a checkpoint tag"
    return os.path.join(root, tag), None


def _choose(root: str, resume: str, world_size: int | None, config: dict | None,
            may_change: tuple[str, ...] = RESUME_MAY_CHANGE) -> tuple[str | None, list[str]]:
    """Rank 0's decision: the folder to resume from (None: start at step 0) and warnings to log.
    ``world_size`` / ``config`` None: any world size and settings (export). The saved config is compared
    with ``config`` in today's layout (:func:`pretrain.config.upgrade_config_dict`)."""
    warnings: list[str] = []
    if resume == "none":
        return None, warnings
    if resume != "latest":
        folder = resume
        read_manifest(folder)
    else:
        folder, problem = _latest_folder(root)
        if folder is not None:
            try:
                read_manifest(folder)
            except CheckpointError as error:
                folder, problem = None, str(error)
        if folder is None:
            steps = checkpoint_steps(root)
            if not steps:
                if os.path.exists(os.path.join(root, "latest")):
                    raise CheckpointError(f"{problem}, and {root} holds no step_N checkpoint folder: refusing to "
                                          "start over silently; pass --resume none to start from step 0")
                return None, warnings  # a new run
            rejected = []
            for step in reversed(steps):
                candidate = os.path.join(root, tag_of_step(step))
                try:
                    read_manifest(candidate)
                except CheckpointError as error:
                    rejected.append(str(error))
                    continue
                folder = candidate
                break
            if folder is None:
                raise CheckpointError(f"{problem}, and no checkpoint folder under {root} is complete:\n  "
                                      + "\n  ".join(rejected) + "\npass --resume FOLDER to choose one, or "
                                      "--resume none to start from step 0")
            warnings.append(f"{problem}; resuming from {folder}, the newest complete checkpoint"
                            + (f" (skipped: {'; '.join(rejected)})" if rejected else ""))
    manifest = read_manifest(folder)
    if world_size is not None and manifest.world_size != world_size:
        raise CheckpointError(f"{folder} was written by {manifest.world_size} ranks; this run has {world_size}. "
                              "Exact resume needs the same world size (data positions and ZeRO partitions are "
                              "per rank): launch with the same number of workers, or export the weights "
                              "(python -m pretrain export) and start a new run with model.init_from")
    saved = read_saved_config(folder) if config is not None else None
    if saved is not None:
        from .config import ConfigError, upgrade_config_dict

        try:
            saved = upgrade_config_dict(saved)
        except ConfigError as error:
            raise CheckpointError(f"{os.path.join(folder, CONFIG_NAME)}: {error}") from None
        changes = config_changes(saved, config)
        refused = [change for change in changes if not _may_change(change[0], may_change)]
        if refused:
            lines = "\n".join(f"  {key}: checkpoint {old!r}, this run {new!r}" for key, old, new in refused)
            raise CheckpointError(f"{folder} was written with other settings that exact resume cannot honour "
                                  f"(they are restored from the checkpoint or fix its layout):\n{lines}\n"
                                  "run with the checkpoint's values (its config.json), or start a new run "
                                  "directory from the exported weights (model.init_from)")
        for key, old, new in changes:
            if key != "checkpoint.resume":
                warnings.append(f"resuming with a changed setting: {key} {old!r} -> {new!r}")
    return folder, warnings


def choose_checkpoint(root: str, resume: str, world: WorldInfo, config: dict,
                      may_change: tuple[str, ...] = RESUME_MAY_CHANGE) -> str | None:
    """Every rank: the checkpoint folder to resume from (None: start at step 0), decided on rank 0.

    ``resume`` is ``latest``, ``none`` or a folder; ``may_change`` the keys a resumed run may change
    (:func:`resume_rules`). Raises :class:`CheckpointError` on every rank together, with rank 0's
    message, when the checkpoint cannot be used.
    """
    decision: tuple[str | None, str | None] = (None, None)
    if world.is_main:
        try:
            folder, warnings = _choose(root, resume, world.world_size, config, may_change)
            for warning in warnings:
                _logger.warning("%s", warning)
            decision = (folder, None)
        except CheckpointError as error:
            decision = (None, str(error))
    folder, error = broadcast_object(decision)
    if error is not None:
        raise CheckpointError(error)
    return folder


def find_checkpoint(root: str, which: str = "latest") -> str | None:
    """One process (export, tools): the complete checkpoint ``which`` names (``latest`` or a folder),
    of any world size; with ``latest``, the newest complete one when ``latest`` itself is unusable."""
    folder, warnings = _choose(root, which, None, None)
    for warning in warnings:
        _logger.warning("%s", warning)
    return folder


# ----------------------------------------------------------------------------- loading


def _load_rank_file(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as error:  # torch raises RuntimeError / UnpicklingError / EOFError for damaged files
        raise CheckpointError(f"{path} does not load ({type(error).__name__}: {error}): the file is damaged; "
                              "pass --resume with an earlier checkpoint folder") from None


def _agree_or_raise(world: WorldInfo, error: str | None, device: torch.device) -> None:
    """Every rank raises when any rank failed (so none is left waiting in a collective)."""
    failed = all_reduce_sum(torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64, device=device))
    if failed.item() == 0:
        return
    messages = [None] * world.world_size if world.world_size > 1 else [error]
    if world.world_size > 1:
        import torch.distributed as dist

        dist.all_gather_object(messages, error)
    first = next(m for m in messages if m is not None)
    raise CheckpointError(first)


def load_checkpoint(engine, folder: str, world: WorldInfo, device: torch.device) -> dict:
    """Every rank: restore model, optimizer and scheduler into ``engine``; return this rank's trainer state.

    Each rank first reads its own file, then the ranks agree that all of them could, so a damaged
    file fails every rank with its name instead of leaving the others in DeepSpeed's collective
    load. Afterwards every rank must hold the same step.
    """
    rank_file = os.path.join(folder, _RANK_FILE.format(rank=world.rank))
    state, error = None, None
    try:
        state = _load_rank_file(rank_file)
        if state.get("world_size") != world.world_size:
            error = f"{rank_file} was written by a run of {state.get('world_size')} ranks; this run has {world.world_size}"
    except CheckpointError as failure:
        error = str(failure)
    _agree_or_raise(world, error, device)
    root, tag = os.path.split(os.path.normpath(folder))
    try:
        path, _ = engine.load_checkpoint(root, tag=tag, load_module_strict=True, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    except Exception as failure:
        raise CheckpointError(f"DeepSpeed could not load {folder}: {type(failure).__name__}: {failure}") from failure
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint in {folder}")
    steps = all_reduce_sum(torch.tensor([float(state["step"]), float(state["step"]) ** 2], dtype=torch.float64,
                                        device=device))
    n = world.world_size
    if steps[0].item() / n != state["step"] or steps[1].item() / n != float(state["step"]) ** 2:
        raise CheckpointError(f"ranks restored different steps from {folder} (this rank: {state['step']})")
    return state


def read_rank_states(folder: str) -> list[dict]:
    """Every rank's trainer state in a checkpoint folder, in rank order (weights-only loading)."""
    names = sorted(n for n in os.listdir(folder) if re.fullmatch(r"trainer_rank\d+\.pt", n))
    return [_load_rank_file(os.path.join(folder, n)) for n in names]


def consolidated_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict (parameters and buffers) from a checkpoint of any ZeRO stage, on CPU.

    Stage 0 (no ZeRO, as LAMB runs) keeps the whole model in DeepSpeed's model-states file; stages
    1-3 are put back together from the optimizer partitions by DeepSpeed's ``zero_to_fp32``.
    """
    manifest = read_manifest(folder)
    if manifest.zero_stage == 0:
        path = os.path.join(folder, _STAGE0_MODEL_FILE)
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)["module"]
        except Exception as error:
            raise CheckpointError(f"{path} does not load ({type(error).__name__}: {error})") from None
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        root, tag = os.path.split(os.path.normpath(folder))
        with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 prints its progress
            state_dict = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    return {name: tensor.detach().cpu().clone() for name, tensor in state_dict.items()}
