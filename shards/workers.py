"""DataLoader workers that leave the preemption signals to the training process.

Slurm (and torchrun's ``os.killpg``) signal the whole process group, loader workers included.
torch's worker handler dies on a SIGTERM not sent by its parent, and the rank then fails
("DataLoader worker ... killed by signal") before it can checkpoint. Every loader of the project
starts its workers through :func:`worker_iterator` (or the two helpers below) instead.
"""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["PREEMPTION_SIGNALS", "leave_preemption_to_the_parent", "preemption_signals_held", "worker_iterator"]

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""What Slurm and Kubernetes send before they stop a job: the training process checkpoints on either."""


def leave_preemption_to_the_parent(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: loader workers leave SIGTERM and SIGUSR1 to the training process.

    The signals stay blocked in the worker (it was forked with them held, :func:`preemption_signals_held`,
    so none slips through before this runs) and one thread takes them: a SIGTERM from the parent
    (which is how it shuts its workers down) ends the worker as torch's handler would; any other
    is the training process's to handle, and it shuts its workers down itself.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    threading.Thread(target=_take_preemption_signals, args=(os.getppid(),), name="preemption-signals",
                     daemon=True).start()


def _take_preemption_signals(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(PREEMPTION_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)


@contextmanager
def preemption_signals_held() -> Iterator[None]:
    """Hold SIGTERM / SIGUSR1 while DataLoader workers are forked (they inherit the held mask, which
    :func:`leave_preemption_to_the_parent` keeps); signals held here reach this process afterwards."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def worker_iterator(dataset: Any, *, num_workers: int, **loader_options: Any) -> Iterator:
    """An iterator over ``DataLoader(dataset, num_workers=num_workers, **loader_options)`` whose workers
    leave SIGTERM / SIGUSR1 to the training process (non-persistent workers, started with the signals held)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, num_workers=num_workers, persistent_workers=False,
                        worker_init_fn=leave_preemption_to_the_parent if num_workers else None, **loader_options)
    with preemption_signals_held():
        return iter(loader)
