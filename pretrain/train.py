"""Run one worker's training from a Config: what every launcher (in-process, torchrun, Ray Train) calls.

    python -m pretrain --config demo                               # one process (laptop, demo)
    torchrun --nproc_per_node 8 -m pretrain --config xl_in22k_384  # one node, 8 GPUs
    python -m pretrain --config xl_in22k_384 --set launch.launcher=ray launch.num_workers=32
"""
from __future__ import annotations

import logging
import os

from .config import Config
from .preemption import REQUEUE_EXIT_CODE, REQUEUE_MARKER
from .trainer import TrainResult, Trainer

__all__ = ["REQUEUE_EXIT_CODE", "REQUEUE_MARKER", "run_worker"]

_logger = logging.getLogger(__name__)



def run_worker(config: Config) -> TrainResult:
    """Build a Trainer, train, close; rank 0 leaves ``RUN_DIR/REQUEUE`` when preempted."""
    marker = os.path.join(config.run_dir, REQUEUE_MARKER)
    trainer = Trainer(config)
    try:
        if trainer.world.is_main and os.path.exists(marker):
            os.remove(marker)
        result = trainer.train()
        if result.status == "preempted" and trainer.world.is_main:
            with open(marker, "w") as f:
                f.write(f"{result.step}\n")
        _logger.info("%s at step %d; checkpoint %s", result.status, result.step, result.checkpoint)
        return result
    finally:
        trainer.close()
