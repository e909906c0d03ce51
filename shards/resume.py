"""Exact mid-epoch resume: the position of a training loader, its saved form, and the epoch rules.

Every resumable training loader of the project (the shard loaders of every modality, the dense
fine-tuning tasks' loaders) derives from :class:`ResumableLoader`, so one format holds for all:
``{"version": STATE_VERSION, <identity settings>, "epoch", "batches_done", <loader's position>}``,
plain Python data (``torch.save`` with ``weights_only=True`` reads it). A state saved under other
identity settings is refused with a ``ValueError`` naming the setting; a state of an unknown
version is refused naming the versions. A new format keeps reading the old one (an upgrade never
strands a run): bump ``STATE_VERSION`` and convert older versions in ``_upgraded``.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["STATE_VERSION", "ResumableLoader"]

STATE_VERSION = 1


def _upgraded(state: Mapping[str, Any], *, loader: str) -> Mapping[str, Any]:
    """``state`` in the current format (version 1 is the current and only one so far)."""
    version = state.get("version")
    if version != STATE_VERSION:
        raise ValueError(f"{loader} loader state version {version!r} is not supported (this code reads version "
                         f"{STATE_VERSION}); resume with the code that wrote it, or start the data position afresh")
    return state


class ResumableLoader:
    """Base of a training loader resumable mid-epoch: the epoch and the batches handed out in it.

    ``set_epoch(e)`` makes the next iteration cover epoch ``e``: from its start, or, when ``e`` is
    the epoch of the current position (e.g. just restored from a checkpoint), from that position
    on, which yields nothing if ``e`` was already complete. Without ``set_epoch`` an iteration
    continues the current epoch, or starts the next one if it is complete.

    Subclasses call :meth:`_start` in ``__init__`` and :meth:`_begin_iteration` at the start of
    ``__iter__``, count ``self._batches_done``, and implement ``__len__`` and :meth:`_identity`;
    :meth:`_position` / :meth:`_restore` carry their own extra position fields, :meth:`_start_epoch`
    resets them. ``name`` and ``resume_needs`` word the refusal messages.
    """

    name = "train"
    """What the messages call this loader (``"<name> loader state ..."``)."""
    resume_needs = "the same data, seed, world size and batch size"
    """What exact resume needs, for the message refusing a state saved under other settings."""
    unchecked_settings: tuple[str, ...] = ()
    """Identity entries saved but not compared (a data root that may move between machines)."""

    def _start(self) -> None:
        self._epoch, self._batches_done, self._epoch_chosen = 0, 0, False

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def epoch(self) -> int:
        """The epoch of the current position."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration cover ``epoch`` (keeping a restored position within it)."""
        if epoch != self._epoch:
            self._start_epoch(epoch)
        self._epoch_chosen = True

    def _start_epoch(self, epoch: int) -> None:
        """Move to the start of ``epoch`` (subclasses reset their own position fields too)."""
        self._epoch, self._batches_done = epoch, 0

    def _begin_iteration(self) -> int:
        """Apply the epoch rules at the start of an iteration; returns how many batches it yields."""
        if self._batches_done >= len(self) and not self._epoch_chosen:
            self._start_epoch(self._epoch + 1)
        self._epoch_chosen = False
        return max(0, len(self) - self._batches_done)

    def _identity(self) -> dict[str, Any]:
        """The settings a saved position is only valid under."""
        raise NotImplementedError

    def _position(self) -> dict[str, Any]:
        """This loader's position fields beyond ``epoch`` and ``batches_done``."""
        return {}

    def _restore(self, state: Mapping[str, Any]) -> None:
        """Read this loader's position fields beyond ``epoch`` and ``batches_done`` from a checked state."""

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch handed out (plain Python data)."""
        return {"version": STATE_VERSION, **self._identity(), "epoch": self._epoch,
                "batches_done": self._batches_done, **self._position()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`; ``ValueError`` naming a setting that differs."""
        state = _upgraded(state, loader=self.name)
        for setting, current in self._identity().items():
            if setting not in self.unchecked_settings and state.get(setting) != current:
                raise ValueError(f"{self.name} loader state was saved with {setting}={state.get(setting)!r} but this "
                                 f"loader has {setting}={current!r}; exact resume needs {self.resume_needs}")
        _require(state, ("epoch", "batches_done", *self._position()), loader=self.name)
        self._epoch, self._batches_done = int(state["epoch"]), int(state["batches_done"])
        self._restore(state)


def _require(state: Mapping[str, Any], fields: Iterable[str], *, loader: str) -> None:
    missing = [field for field in fields if field not in state]
    if missing:
        raise ValueError(f"{loader} loader state has no {', '.join(missing)} (saved keys: {', '.join(map(str, state))})")
