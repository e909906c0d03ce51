"""Preemption signals in a driver whose workers cannot receive them: every SIGTERM / SIGUSR1 becomes a
line in the run's stop file (``RUN_DIR/STOP``), which every rank checks each step.

Ray Train's workers are processes of the Ray cluster, outside the driver's process group, and run the
training loop off their main thread: a stop request reaches them only as that file. A driver calls
:func:`catch_stop_signals` first thing, before its slow imports, so that a signal during start-up is
kept instead of killing it; :func:`stop_file_requests` then removes a stop file that an earlier run
left behind (its request was served, or its workers died before serving it: it would stop this run
after one step), and only then writes the kept signals, and every later one, to it. Once a signal
came the handlers stay installed: the driver is on its way out for requeue, and the rest of the same
volley (Slurm and ``kill -- -PGID`` signal every process, some twice) must not kill it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import Iterator

from .preemption import PREEMPTION_SIGNALS

__all__ = ["STOP_SIGNALS", "catch_stop_signals", "reclaim_stop_signals", "stop_file_requests",
           "stop_signals_received"]

_logger = logging.getLogger(__name__)

STOP_SIGNALS = PREEMPTION_SIGNALS


class _DriverSignals:
    """The process-wide state behind the functions of this module (signal handlers are process-wide too)."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.unwritten: list[str] = []
        self.stop_file: str | None = None
        self.run_over = False
        self.previous: dict[int, object] | None = None

    def handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        if self.stop_file is not None:
            self.write(name)
        elif self.run_over:
            _logger.warning("%s received after the run ended: nothing left to stop", name)
        else:
            self.unwritten.append(name)
            _logger.warning("%s received while starting: the run will be asked to stop as soon as it starts", name)

    def write(self, name: str) -> None:
        _logger.warning("%s received: asking the workers to checkpoint and stop (%s)", name, self.stop_file)
        os.makedirs(os.path.dirname(self.stop_file), exist_ok=True)
        with open(self.stop_file, "a") as f:
            f.write(f"{name}\n")


_STATE = _DriverSignals()


def catch_stop_signals() -> bool:
    """Install the handlers (once per process); returns whether this call installed them."""
    if _STATE.previous is not None:
        return False
    _STATE.previous = {sig: signal.signal(sig, _STATE.handle) for sig in STOP_SIGNALS}
    return True


def reclaim_stop_signals() -> None:
    """Install the handlers again where they are installed: connecting a Ray driver (``ray.init``) replaces
    them by Ray's failure-signal handler, which prints a stack trace and aborts the driver on SIGTERM."""
    if _STATE.previous is not None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, _STATE.handle)


def stop_signals_received() -> list[str]:
    """Names of the stop signals this process received since its handlers were installed."""
    return list(_STATE.received)


@contextlib.contextmanager
def stop_file_requests(stop_file: str) -> Iterator[None]:
    """While inside, every stop signal appends a line to ``stop_file``. On entry a stop file from an earlier
    run is removed first, then the signals that came while this process was starting are written. On exit
    the handlers this call installed are restored, unless a signal came (then they stay: see above)."""
    installed = catch_stop_signals()
    if os.path.exists(stop_file):
        with open(stop_file, errors="replace") as f:
            reasons = ", ".join(line.strip() for line in f if line.strip()) or "empty"
        os.remove(stop_file)
        _logger.warning("removed %s (%s), left by an earlier run whose workers did not serve it", stop_file,
                        reasons)
    _STATE.stop_file = stop_file
    for name in _STATE.unwritten:
        _STATE.write(name)
    _STATE.unwritten.clear()
    try:
        yield
    finally:
        _STATE.stop_file, _STATE.run_over = None, True
        if installed and not _STATE.received:
            for sig, handler in _STATE.previous.items():
                signal.signal(sig, handler)
            _STATE.previous = None
