"""The run's best evaluation (``train.best_metric``): which checkpoint holds it, so that checkpoint is kept from
pruning and its weights score the task's test set when the run completes (the authors' Speech Commands protocol:
the epoch with the best validation accuracy is evaluated on the test list).

The record lives next to the checkpoints (``checkpoints/best.json``), written after its checkpoint is complete,
so it survives preemption and resume and is set aside with them (``--resume none``)."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Iterator

import torch

from unireplknet.files import atomic_write_json

_logger = logging.getLogger(__name__)

BEST_NAME = "best.json"

__all__ = ["BEST_NAME", "Best", "read_best", "weights_of", "write_best"]


@dataclass(frozen=True, slots=True)
class Best:
    """The best evaluation so far: ``metric`` reached ``value`` at ``step`` (``mode``: max or min is better)."""

    metric: str
    mode: str
    value: float
    step: int

    def beaten_by(self, value: float) -> bool:
        """Whether ``value`` is strictly better (a tie keeps the earlier step)."""
        return value > self.value if self.mode == "max" else value < self.value


def read_best(root: str, metric: str, mode: str) -> Best | None:
    """The record in checkpoint folder ``root``, if it is for ``metric`` and ``mode`` (one for another metric,
    from before a resume changed ``train.best_metric``, is not used)."""
    path = os.path.join(root, BEST_NAME)
    if not metric or not os.path.isfile(path):
        return None
    with open(path) as f:
        values = json.load(f)
    best = Best(**values)
    if (best.metric, best.mode) != (metric, mode):
        _logger.warning("%s is for %s (%s), not train.best_metric %s (%s): the best is chosen anew from here on",
                        path, best.metric, best.mode, metric, mode)
        return None
    return best


def write_best(root: str, best: Best) -> None:
    """Rank 0: replace the record, atomically."""
    if not math.isfinite(best.value):
        raise ValueError(f"{best.metric} is {best.value} at step {best.step}: not a usable best")
    atomic_write_json(os.path.join(root, BEST_NAME), asdict(best), indent=2)


@contextlib.contextmanager
def weights_of(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], ema=None,
               ema_state: dict | None = None) -> Iterator[None]:
    """Inside: ``module`` (and ``ema``, when given) hold a checkpoint's weights; the live ones are put back
    afterwards, bit for bit."""
    live = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
    live_ema = None
    if ema is not None and ema_state is not None:
        live_ema = ema.state_dict()
        live_ema = {**live_ema, "shadow": {n: s.clone() for n, s in live_ema["shadow"].items()}}
    with torch.no_grad():
        module.load_state_dict(state_dict, strict=True)
        if live_ema is not None:
            ema.load_state_dict(ema_state)
    try:
        yield
    finally:
        with torch.no_grad():
            module.load_state_dict(live, strict=True)
            if live_ema is not None:
                ema.load_state_dict(live_ema)
