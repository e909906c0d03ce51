"""The words of preemption, shared by the trainer, its launchers, the cluster stages and the pipeline.

A preemption request is one of :data:`PREEMPTION_SIGNALS` (what Slurm's ``--signal``, a Kubernetes pod stop
and ``kill`` send) or the file :data:`STOP_FILE` in the run directory (how it reaches workers that cannot
receive signals). A run that checkpointed because of one exits with :data:`REQUEUE_EXIT_CODE`; rerunning the
same command resumes it. Standard library only (and the signal set of the loader workers, ``shards.workers``),
so a driver can import it before its slow imports.
"""
from __future__ import annotations

from shards.workers import PREEMPTION_SIGNALS

__all__ = ["PREEMPTION_SIGNALS", "REQUEUE_EXIT_CODE", "REQUEUE_MARKER", "STOP_FILE"]

STOP_FILE = "STOP"
"""A file in the run directory that asks a running job to checkpoint and exit for requeue, however it
was launched (Ray Train workers run the loop off the main thread, where no signal handler can be set)."""

REQUEUE_EXIT_CODE = 75
"""Exit status after a preemption request was served and a checkpoint written (EX_TEMPFAIL: "try again").
Slurm and Kubernetes wrappers requeue on it; rerunning resumes from ``latest``."""

REQUEUE_MARKER = "REQUEUE"
"""File in the run directory written on preemption (workers under torchrun exit 0; launchers read this)."""
