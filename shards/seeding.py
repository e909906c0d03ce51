"""Seeds of the loaders' random streams, one derivation for every modality, and the seeded global RNGs.

A stream of random draws (a slot's shard order, its shuffle buffer, its augmentation, the mixup
of a rank's batches) is seeded by :func:`stream_seed` from its :class:`SeedPurpose` and the
integers it depends on (seed, epoch, slot, ...); sample ``position`` of a stream by
:func:`sample_seed`. Transforms that draw from Python's, NumPy's and torch's global RNGs (timm's
do) run inside :func:`seeded_global_rngs`. The values are part of every run's sample order and
augmentation: changing them changes what a resumed run sees.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import IntEnum
from functools import partial

import numpy as np
import torch

__all__ = ["SeedPurpose", "epoch_generator", "epoch_order", "sample_generator", "sample_seed", "sample_seeds", "seed_global_rngs",
           "seeded_global_rngs", "stream_seed"]


class SeedPurpose(IntEnum):
    """What a derived seed is for: the first part of every derived seed, so no two uses share one.
    New uses take new values (existing values are part of saved runs' sample orders)."""

    SHARD_ORDER = 0
    SOURCE_MIX = 1
    SHUFFLE = 2
    AUGMENT = 3
    MIXUP = 4


def stream_seed(purpose: int, *parts: int) -> int:
    """A 32-bit seed that depends on ``purpose`` and every part (NumPy ``SeedSequence``, about 100 us)."""
    return int(np.random.SeedSequence([int(purpose), *map(int, parts)]).generate_state(1)[0])


_MASK64 = (1 << 64) - 1


def _mix(stream: int, position: int) -> int:
    """splitmix64's mixer on the pair ``(stream, position)``, its high 32 bits (a few microseconds)."""
    z = (stream * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 32


def sample_seeds(purpose: int, seed: int, epoch: int, slot: int = 0) -> Callable[[int], int]:
    """``position -> sample_seed(seed, epoch, position, purpose=purpose, slot=slot)``, the stream part computed
    once (what a per-sample loop calls)."""
    return partial(_mix, stream_seed(purpose, seed, epoch, slot))


def sample_seed(seed: int, epoch: int, position: int, *, purpose: int, slot: int = 0) -> int:
    """The 32-bit seed of sample ``position`` (an index in the epoch, or in a slot's stream) of ``epoch``.

    ``slot`` tells apart streams read in parallel (a rank's DataLoader workers); ``purpose`` the
    uses of one seed. A loop over many samples takes :func:`sample_seeds` instead.
    """
    return sample_seeds(purpose, seed, epoch, slot)(position)


def seed_global_rngs(seed: int) -> None:
    """Seed what transforms draw from: Python's and NumPy's global RNGs and torch's CPU generator.

    ``torch.default_generator.manual_seed``, not ``torch.manual_seed``: the latter also seeds every
    accelerator backend and, for one not yet initialised, queues the seed with a captured stack
    trace (a third of a millisecond per call).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)


@contextmanager
def seeded_global_rngs(seed: int, *, restore: bool = True) -> Iterator[None]:
    """:func:`seed_global_rngs` inside; with ``restore``, the previous RNG states come back afterwards (in the
    training process, whose RNG streams belong to the training loop; a loader worker's serve nothing else)."""
    if not restore:
        seed_global_rngs(seed)
        yield
        return
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    seed_global_rngs(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.default_generator.set_state(torch_state)


def sample_generator(seed: int, epoch: int, index: int, purpose: int) -> np.random.Generator:
    """A NumPy generator of its own for sample ``index`` of ``epoch`` (PCG64 seeded by ``SeedSequence([seed,
    epoch, index, purpose])``): what map-style loaders (the dense tasks') draw a sample's augmentation from, in
    whichever worker it lands. ``purpose`` tells tasks apart (ADE20K 0xADE, COCO 0xC0C0)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, index, purpose])))


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The torch generator of ``epoch``'s sample order (seeded by ``seed * 100003 + epoch``), the same on every
    rank, which then takes its share."""
    return torch.Generator().manual_seed(seed * 100003 + epoch)


def epoch_order(size: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of ``size`` indexed samples in ``epoch``: a permutation from :func:`epoch_generator`."""
    return torch.randperm(size, generator=epoch_generator(seed, epoch))
