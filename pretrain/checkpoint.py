"""Checkpoints: the layout on disk, atomic saves, choosing what to resume from, loading, consolidation.

Layout under ``RUN_DIR/checkpoints``::

    step_00001000/                 a complete checkpoint: only ever renamed into place whole
        manifest.json              step, world size, ZeRO stage, every file with its size and sha256
        config.json                the run's config when it was written
        mp_rank_00_model_states.pt DeepSpeed: model, optimizer (ZeRO: partitions), lr scheduler
        ...
        trainer_rank00000.pt       per rank: step, data-loader position, RNG states, EMA (plain
        ...                        tensors and Python values: loads with ``weights_only=True``)
    .incomplete-step_00001000/     a save in progress; never resumed from, removed when a run starts
    latest                         the tag of the newest complete checkpoint

A save writes into ``.incomplete-TAG`` (every file hashed while it is written, then flushed), and
rank 0 renames it to ``TAG`` and then replaces ``latest`` (temporary file, fsync, rename): a kill
at any moment leaves ``latest`` pointing at a whole checkpoint and no ``step_N`` folder holds files
of two saves. A save that fails (no space left, a read-only file system) removes its folder and
raises :class:`CheckpointWriteError` on every rank, naming the directory and the OS error;
``latest`` still names the previous checkpoint.

When a run starts (:func:`choose_checkpoint`, on rank 0, broadcast so every rank takes the same
checkpoint or fails with the same message): leftovers of interrupted saves are removed; the
directory must take a file, and as many bytes as the checkpoint resumed from holds; with
``checkpoint.resume=none`` an earlier run's checkpoints are moved aside, so that no fallback ever
resumes from them. Then ``latest`` is taken when it names a complete checkpoint whose files match
their manifest (size and sha256), otherwise (with a warning naming the damaged file) the newest
complete ``step_N``; a checkpoint written by another world size, or with settings that exact
resume cannot honour, is refused naming them. Manifests of version 1 (sizes only) still resume.

DeepSpeed reads its own files with full pickle loading: resume or export only run directories
you trust. The trainer's own rank files load with ``weights_only=True``.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Callable

import torch

from unireplknet.files import fsync_path

from .distributed import WorldInfo, all_gather_object, all_reduce_sum, barrier, broadcast_object
from .hashed_files import hash_file, os_error_text, size_text, write_hashed, write_json_hashed
from .resume_rules import RESUME_MAY_CHANGE, config_changes, may_change

__all__ = [
    "CHECKPOINT_PREFIX",
    "CheckpointError",
    "CheckpointWriteError",
    "Manifest",
    "choose_checkpoint",
    "consolidated_state_dict",
    "find_checkpoint",
    "load_checkpoint",
    "read_manifest",
    "read_rank_state",
    "read_rank_states",
    "read_saved_config",
    "save_checkpoint",
    "tag_of_step",
    "verify_checkpoint",
]

_logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
INCOMPLETE_PREFIX = ".incomplete-"
SET_ASIDE_INFIX = ".set-aside-"
MANIFEST_NAME = "manifest.json"
CONFIG_NAME = "config.json"
MANIFEST_FORMAT = "unireplknet-trainer-checkpoint"
MANIFEST_VERSION = 2
"""Version 2: every file's size and sha256, and the manifest's own sha256. Version 1 (sizes only) is still read."""
_READABLE_MANIFEST_VERSIONS = (1, 2)
_RANK_FILE = "trainer_rank{rank:05d}.pt"
_STAGE0_MODEL_FILE = "mp_rank_00_model_states.pt"
_SLOW_HASH_S = 5.0
"""Hashing or verifying that takes longer than this is logged as a warning (it delays every save or resume)."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: incomplete, damaged, another world size, or incompatible settings."""


class CheckpointWriteError(CheckpointError):
    """Checkpoints cannot be written where the run keeps them (read-only, full, missing): names the
    directory and the OS error."""


@dataclass(frozen=True, slots=True)
class Manifest:
    """What ``manifest.json`` records about one complete checkpoint."""

    step: int
    world_size: int
    zero_stage: int
    files: dict[str, int]
    """Every file of the checkpoint (path relative to its folder) with its size in bytes."""
    sha256: dict[str, str]
    """Every file's sha256 (hex); empty in a version-1 manifest, which recorded sizes only."""
    version: int = MANIFEST_VERSION


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


# ----------------------------------------------------------------------------- writing files


class _RecordingCheckpointEngine:
    """Stands in for DeepSpeed's checkpoint engine during one save: every file DeepSpeed saves is
    written through :func:`write_hashed` (hashed while written, fsynced), and a failed write is
    recorded instead of raised, so this rank still reaches DeepSpeed's closing barrier and every
    rank learns of the failure together. After a failure the remaining files are skipped."""

    def __init__(self, inner):
        self.inner = inner
        self.written: dict[str, tuple[int, str]] = {}
        self.error: str | None = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def save(self, state_dict, path: str) -> None:
        if self.error is not None:
            return
        zipfile = getattr(self.inner, "zipfile_serialization", True)
        try:
            self.written[path] = write_hashed(
                path, lambda f: torch.save(state_dict, f, _use_new_zipfile_serialization=zipfile))
        except OSError as error:
            self.error = f"writing {path} failed: {os_error_text(error)}"
        except RuntimeError as error:  # torch's writer, when an OS error was wrapped on the way
            self.error = f"writing {path} failed: {error}"


# ----------------------------------------------------------------------------- saving


def _write_latest_tmp(root: str, tag: str) -> str:
    tmp = os.path.join(root, f".latest.tmp-{os.getpid()}")
    write_hashed(tmp, lambda f: f.write(tag.encode()))
    return tmp


def _remove_incomplete(root: str) -> None:
    """Delete what interrupted saves left (``.incomplete-*``): never resumed from, and they hold space."""
    for name in sorted(os.listdir(root)):
        if name.startswith(INCOMPLETE_PREFIX):
            path = os.path.join(root, name)
            _logger.info("removing %s, left by an interrupted save", path)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _save_failed(root: str, tag: str, error: str) -> CheckpointWriteError:
    latest, _ = _latest_folder(root)
    previous = f"{os.path.join(root, 'latest')} still names {latest}" if latest else "no earlier checkpoint exists"
    return CheckpointWriteError(
        f"checkpoint {tag} could not be written to {root}: {error}. The incomplete save was removed and "
        f"{previous}. Free space there (or lower checkpoint.keep), or make it writable, or set run_dir "
        "elsewhere; then rerun the same command")


def save_checkpoint(engine, root: str, step: int, rank_state: dict, world: WorldInfo, *, keep: int,
                    zero_stage: int, config: dict, protect: tuple[int, ...] = ()) -> str:
    """All ranks: write the DeepSpeed checkpoint and this rank's trainer state into a fresh
    ``.incomplete-TAG`` folder (hashing every file as it is written, then fsync); rank 0 adds the
    manifest and the config, renames the folder to ``TAG``, points ``latest`` at it and deletes all
    but the newest ``keep`` up to ``step`` and those of the steps in ``protect`` (the best one). A failed write
    (on any rank) removes the folder and raises :class:`CheckpointWriteError` on every rank; ``latest`` is left
    as it was."""
    tag = tag_of_step(step)
    staging_tag = INCOMPLETE_PREFIX + tag
    staging, final = os.path.join(root, staging_tag), os.path.join(root, tag)
    error = None
    if world.is_main:
        try:
            os.makedirs(root, exist_ok=True)
            _remove_incomplete(root)
            os.makedirs(staging)
        except OSError as failure:
            error = f"creating {staging} failed: {os_error_text(failure)}"
    _raise_on_every_rank(world, error, lambda first: _save_failed(root, tag, first))

    started = time.perf_counter()
    recorder = _RecordingCheckpointEngine(engine.checkpoint_engine)
    engine.checkpoint_engine = recorder
    try:
        engine.save_checkpoint(root, tag=staging_tag, client_state={"step": step}, save_latest=False)
    except OSError as failure:
        # Rank 0 copies DeepSpeed's recovery scripts (next to the checkpoint folders) with its own
        # file calls, after the state files: the other ranks are then in the save's closing
        # barrier, which this rank must still meet.
        recorder.error = recorder.error or f"writing {failure.filename or root} failed: {os_error_text(failure)}"
        barrier()
    finally:
        engine.checkpoint_engine = recorder.inner
    if recorder.error is None:
        recorder.save(rank_state, os.path.join(staging, _RANK_FILE.format(rank=world.rank)))
    written = {os.path.relpath(path, staging): record for path, record in recorder.written.items()}
    reports = all_gather_object((recorder.error, written))
    errors = [e for e, _ in reports if e is not None]
    if errors:
        if world.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise _save_failed(root, tag, errors[0])

    error = None
    if world.is_main:
        try:
            _commit(root, staging, final, tag, step, keep, world.world_size, zero_stage, config,
                    {name: record for _, files in reports for name, record in files.items()}, started, protect)
        except OSError as failure:
            shutil.rmtree(staging, ignore_errors=True)
            error = f"{os_error_text(failure)} ({failure.filename or root})"
    _raise_on_every_rank(world, error, lambda first: _save_failed(root, tag, first))
    return final


def _commit(root: str, staging: str, final: str, tag: str, step: int, keep: int, world_size: int,
            zero_stage: int, config: dict, records: dict[str, tuple[int, str]], started: float,
            protect: tuple[int, ...] = ()) -> None:
    """Rank 0, once every rank's files are written and flushed: config and manifest, then the folder
    renamed into place, ``latest`` replaced, old checkpoints deleted."""
    records[CONFIG_NAME] = write_json_hashed(os.path.join(staging, CONFIG_NAME), config)
    for directory, _, names in os.walk(staging):  # anything DeepSpeed wrote without its checkpoint engine
        for name in names:
            relative = os.path.relpath(os.path.join(directory, name), staging)
            if relative not in records:
                fsync_path(os.path.join(directory, name))
                records[relative] = hash_file(os.path.join(directory, name))
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "step": step, "world_size": world_size,
                "zero_stage": zero_stage,
                "files": {name: {"size": size, "sha256": digest} for name, (size, digest) in sorted(records.items())}}
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    write_json_hashed(os.path.join(staging, MANIFEST_NAME), manifest)
    fsync_path(staging)
    elapsed = time.perf_counter() - started
    total = sum(size for size, _ in records.values())
    (_logger.warning if elapsed > _SLOW_HASH_S else _logger.info)(
        "checkpoint %s: %d files, %s, written, hashed (sha256) and flushed in %.1f s", tag, len(records),
        size_text(total), elapsed)
    latest_tmp = _write_latest_tmp(root, tag)  # written before the rename: no space left fails here, harmlessly
    try:
        if os.path.exists(final):  # this step was reached before, on a timeline resumed from earlier
            replaced = os.path.join(root, f"{INCOMPLETE_PREFIX}replaced-{tag}")
            os.rename(final, replaced)
            os.rename(staging, final)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.rename(staging, final)
        fsync_path(root)
        os.replace(latest_tmp, os.path.join(root, "latest"))
        fsync_path(root)
    finally:
        with contextlib.suppress(OSError):
            os.remove(latest_tmp)
    # Folders past this step are leftovers of an abandoned timeline: never counted among the
    # newest, so they cannot push a complete checkpoint out.
    for old in [s for s in checkpoint_steps(root) if s <= step and s not in protect][:-keep]:
        shutil.rmtree(os.path.join(root, tag_of_step(old)), ignore_errors=True)


def _raise_on_every_rank(world: WorldInfo, error: str | None, make: Callable[[str], Exception]) -> None:
    """Every rank raises ``make(first error)`` when any rank had one (none is left in a collective)."""
    errors = [e for e in all_gather_object(error) if e is not None]
    if errors:
        raise make(errors[0])


# ----------------------------------------------------------------------------- reading manifests


def read_manifest(folder: str) -> Manifest:
    """The manifest of a complete checkpoint folder, every listed file checked for presence and size
    (:func:`verify_checkpoint` also checks their sha256)."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {MANIFEST_NAME}, so not a complete checkpoint (an interrupted save, "
                              "or written by an older version of this trainer)") from None
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} is damaged: {error}") from None
    if (not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT
            or raw.get("version") not in _READABLE_MANIFEST_VERSIONS):
        raise CheckpointError(f"{path} is damaged or not a checkpoint manifest: expected a {MANIFEST_FORMAT} "
                              f"manifest of version {' or '.join(map(str, _READABLE_MANIFEST_VERSIONS))}")
    if raw["version"] >= 2 and raw.get("manifest_sha256") != _manifest_digest(raw):
        raise CheckpointError(f"{path} is damaged: its content does not match its own sha256")
    try:
        if raw["version"] == 1:
            sizes, digests = {str(k): int(v) for k, v in raw["files"].items()}, {}
        else:
            sizes = {str(k): int(v["size"]) for k, v in raw["files"].items()}
            digests = {str(k): str(v["sha256"]) for k, v in raw["files"].items()}
        manifest = Manifest(int(raw["step"]), int(raw["world_size"]), int(raw["zero_stage"]), sizes, digests,
                            raw["version"])
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


def verify_checkpoint(folder: str) -> Manifest:
    """:func:`read_manifest`, and every file's sha256 against the manifest (version 1: sizes only)."""
    manifest = read_manifest(folder)
    if not manifest.sha256:
        _logger.info("%s has a version-1 manifest (sizes only): its files are checked by size", folder)
        return manifest
    started = time.perf_counter()
    for name, expected in sorted(manifest.sha256.items()):
        file = os.path.join(folder, name)
        try:
            _, actual = hash_file(file)
        except OSError as error:
            raise CheckpointError(f"{folder} is damaged: {file} cannot be read: {os_error_text(error)}") from None
        if actual != expected:
            raise CheckpointError(f"{folder} is damaged: {file} does not match its sha256 in the manifest "
                                  f"(expected {expected[:16]}..., found {actual[:16]}...): flipped bits or "
                                  "overwritten")
    elapsed = time.perf_counter() - started
    (_logger.warning if elapsed > _SLOW_HASH_S else _logger.info)(
        "verified %s: %d files, %s, sha256 in %.1f s", folder, len(manifest.sha256),
        size_text(sum(manifest.files.values())), elapsed)
    return manifest


def read_saved_config(folder: str) -> dict | None:
    """The config stored with a checkpoint (None when the folder has none)."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is damaged: {error}") from None


# ----------------------------------------------------------------------------- choosing what to resume


def _latest_folder(root: str) -> tuple[str | None, str | None]:
    """(folder ``latest`` names, or None; why it cannot be used, or None)."""
    path = os.path.join(root, "latest")
    if not os.path.exists(path):
        return None, f"{path} is missing"
    try:
        with open(path, "rb") as f:
            tag = f.read().decode("utf-8", errors="replace").strip()
    except OSError as error:
        return None, f"{path} cannot be read: {error}"
    if _step_of_tag(tag) is None:
        return None, f"{path} holds {tag[:40]!r}, not a checkpoint tag"
    return os.path.join(root, tag), None


def _choose(root: str, resume: str, world_size: int | None, config: dict | None,
            rules: tuple[str, ...] = RESUME_MAY_CHANGE) -> tuple[str | None, list[str]]:
    """Rank 0's decision: the folder to resume from (None: start at step 0) and warnings to log.
    ``world_size`` / ``config`` None: any world size and settings (export). Every file of the folder
    chosen matches its manifest (size and sha256). The saved config is compared with ``config`` in
    today's layout (:func:`pretrain.upgrade.upgrade_config_dict`)."""
    warnings: list[str] = []
    if resume == "none":
        return None, warnings
    if resume != "latest":
        folder = resume
        verify_checkpoint(folder)
    else:
        folder, problem = _latest_folder(root)
        if folder is not None:
            try:
                verify_checkpoint(folder)
            except CheckpointError as error:
                folder, problem = None, str(error)
        if folder is None:
            rejected_latest, _ = _latest_folder(root)
            steps = checkpoint_steps(root)
            if not steps:
                if os.path.exists(os.path.join(root, "latest")):
                    raise CheckpointError(f"{problem}, and {root} holds no step_N checkpoint folder: refusing to "
                                          "start over silently; pass --resume none to start from step 0")
                return None, warnings  # a new run
            rejected = []
            for step in reversed(steps):
                candidate = os.path.join(root, tag_of_step(step))
                if candidate == rejected_latest:
                    continue  # already found damaged above
                try:
                    verify_checkpoint(candidate)
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
        from .config import ConfigError
        from .upgrade import upgrade_config_dict

        try:  # moved keys put where they live now, keys added since at their defaults: only real changes count
            saved = upgrade_config_dict(saved)
        except ConfigError as error:
            raise CheckpointError(f"{os.path.join(folder, CONFIG_NAME)}: {error}") from None
        changes = config_changes(saved, config)
        refused = [change for change in changes if not may_change(change[0], rules)]
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


def _set_aside(root: str) -> None:
    """``checkpoint.resume=none`` in a run directory that holds checkpoints: move them to a sibling
    folder, so that no later fallback (a missing ``latest``) resumes this run from an older one's."""
    if not os.path.isdir(root):
        return
    names = sorted(os.listdir(root))
    held = [n for n in names if _step_of_tag(n) is not None] + (["latest"] if "latest" in names else [])
    if not held:
        return
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, attempt = f"{root}{SET_ASIDE_INFIX}{stamp}", 1
    while os.path.exists(target):
        attempt += 1
        target = f"{root}{SET_ASIDE_INFIX}{stamp}-{attempt}"
    try:
        os.rename(root, target)
    except OSError as error:
        raise CheckpointWriteError(f"checkpoint.resume=none: the checkpoints of an earlier run in {root} must be "
                                   f"moved aside before this run starts from step 0, and moving them to {target} "
                                   f"failed: {os_error_text(error)}; move or delete them yourself") from None
    _logger.warning("checkpoint.resume=none: moved what %s held (%s) to %s, so that this run, which starts from "
                    "step 0, never resumes from them; delete that folder once it is no longer needed",
                    root, ", ".join(held), target)


def _prepare_root(root: str) -> None:
    """Create ``root``, remove leftovers of interrupted saves, and prove a file can be written there."""
    probe = os.path.join(root, f".write-probe-{os.getpid()}")
    try:
        os.makedirs(root, exist_ok=True)
        _remove_incomplete(root)
        write_hashed(probe, lambda f: f.write(b"checkpoints can be written here\n"))
        os.remove(probe)
    except OSError as error:
        raise CheckpointWriteError(
            f"checkpoints cannot be written to {root}: {os_error_text(error)} ({error.filename or root}). "
            "The run would train until its first save and lose it: make the directory writable (or free "
            "space there), or set run_dir to a writable place") from None


def _check_free_space(root: str, folder: str) -> None:
    """The next save writes a whole checkpoint before older ones are deleted: ``root`` must have room
    for one as large as ``folder``."""
    needed = sum(read_manifest(folder).files.values())
    free = shutil.disk_usage(root).free
    if free < needed:
        raise CheckpointWriteError(
            f"{root} has {size_text(free)} free, less than the {size_text(needed)} that the last checkpoint "
            f"({folder}) takes: the next save would fail with no space left on device. Free space there "
            "(or lower checkpoint.keep), or set run_dir elsewhere")


def choose_checkpoint(root: str, resume: str, world: WorldInfo, config: dict,
                      rules: tuple[str, ...] = RESUME_MAY_CHANGE) -> str | None:
    """Every rank: prepare the checkpoint directory and pick the checkpoint to resume from (None:
    start at step 0), all decided on rank 0.

    ``resume`` is ``latest``, ``none`` or a folder; ``rules`` the keys a resumed run may change
    (:func:`pretrain.resume_rules.resume_rules`). With ``none``, checkpoints already under
    ``root`` are moved aside (logged). Leftovers of interrupted saves are removed; the directory
    must take a file, and as many bytes as the chosen checkpoint holds. Raises
    :class:`CheckpointError` (:class:`CheckpointWriteError` for the directory) on every rank
    together, with rank 0's message, when the checkpoint or the directory cannot be used.
    """
    decision: tuple[str | None, str | None, bool] = (None, None, False)
    if world.is_main:
        try:
            if resume == "none":
                _set_aside(root)
            _prepare_root(root)
            folder, warnings = _choose(root, resume, world.world_size, config, rules)
            for warning in warnings:
                _logger.warning("%s", warning)
            if folder is not None:
                _check_free_space(root, folder)
            decision = (folder, None, False)
        except CheckpointError as error:
            decision = (None, str(error), isinstance(error, CheckpointWriteError))
    folder, error, write_error = broadcast_object(decision)
    if error is not None:
        raise (CheckpointWriteError if write_error else CheckpointError)(error)
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
    _raise_on_every_rank(world, error, CheckpointError)
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


def read_rank_state(folder: str, rank: int) -> dict:
    """Rank ``rank``'s trainer state in a checkpoint folder (weights-only loading)."""
    return _load_rank_file(os.path.join(folder, _RANK_FILE.format(rank=rank)))


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
