"""Exponential moving average of the weights, over whatever tensors this rank holds.

Under ZeRO stage 3 a rank holds only its partition of every parameter, so the EMA is kept per
partition: memory is divided like the parameters, and :func:`consolidate_ema` puts the
partitions back together when exporting. Under stages 0-2 every rank holds full tensors.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

__all__ = ["ModelEMA", "consolidate_ema"]


class ModelEMA:
    """``shadow = decay * shadow + (1 - decay) * current`` after every optimizer step, in fp32.

    ``targets()`` returns ``(tensors, full_shapes)``: the live tensors by name (parameters or their
    local partitions, and float buffers) and the unpartitioned shapes, used for consolidation. It
    is called at every use, so storage that the engine rebinds is always followed. ``after_write``
    runs (on every rank) after values were written into the targets, for engines that keep other
    copies of them (ZeRO-3 keeps small parameters gathered on every rank).
    """

    def __init__(self, targets: Callable[[], tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]],
                 decay: float, after_write: Callable[[], None] | None = None):
        self.decay = decay
        self._targets = targets
        self._after_write = after_write or (lambda: None)
        tensors, full_shapes = targets()
        self.names = list(tensors)
        self.full_shapes = {n: tuple(full_shapes[n]) for n in self.names}
        self.shadow = [t.detach().float().clone() for t in tensors.values()]

    @property
    def targets(self) -> list[torch.Tensor]:
        tensors, _ = self._targets()
        return [tensors[n] for n in self.names]

    @torch.no_grad()
    def update(self) -> None:
        current = [t.detach().float() for t in self.targets]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside this context the live tensors hold the EMA values; they are restored afterwards."""
        targets = self.targets
        with torch.no_grad():
            backup = [t.detach().clone() for t in targets]
            for target, shadow in zip(targets, self.shadow):
                target.copy_(shadow)
        self._after_write()
        try:
            yield
        finally:
            with torch.no_grad():
                for target, saved in zip(targets, backup):
                    target.copy_(saved)
            self._after_write()

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "shadow": {n: s.detach().cpu() for n, s in zip(self.names, self.shadow)},
            "full_shapes": self.full_shapes,
        }

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.names) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, shadow in zip(self.names, self.shadow):
                saved = state["shadow"][name]
                if saved.shape != shadow.shape:
                    raise ValueError(f"EMA {name}: saved shape {tuple(saved.shape)} != {tuple(shadow.shape)} "
                                     "(resume with the same ZeRO stage and world size)")
                shadow.copy_(saved)


def consolidate_ema(rank_states: list[dict]) -> dict[str, torch.Tensor]:
    """Full EMA tensors from every rank's :meth:`ModelEMA.state_dict` (in rank order)."""
    full = {}
    first = rank_states[0]
    for name, shape in first["full_shapes"].items():
        numel = 1
        for d in shape:
            numel *= d
        piece = first["shadow"][name]
        if piece.numel() == numel and tuple(piece.shape) == tuple(shape):
            full[name] = piece.clone()
        else:
            flat = torch.cat([state["shadow"][name].reshape(-1) for state in rank_states])
            full[name] = flat[:numel].view(shape).clone()
    return full
