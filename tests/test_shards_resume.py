"""The one resumable-loader state (shards.resume.ResumableLoader) as the dense tasks' loaders use it
(shards.indexed.ResumableBatches, formerly finetune.loading): exact mid-epoch resume through loader workers, states written by the
first format still load, other settings and unknown versions are refused naming what differs; and the one
per-sample seed derivation (shards.seeding)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from shards.indexed import ResumableBatches
from shards.seeding import SeedPurpose, sample_seed, sample_seeds, seeded_global_rngs, stream_seed

UNREADABLE = 13  # this index stands for an image that did not decode (replaced by another, counted)


class _Numbers(Dataset):
    """``(epoch, index)`` -> ``(tensor([index, epoch]), skipped)``."""

    def __getitem__(self, item):
        epoch, index = item
        return torch.tensor([index, epoch]), int(index == UNREADABLE)

    def __len__(self) -> int:
        return 40


def _collate(items):
    return torch.stack([value for value, _ in items]), sum(skipped for _, skipped in items)


class NumberBatches(ResumableBatches):
    """A dense-task-like training loader over 40 indices: seeded batches per epoch, split by rank."""

    name = "numbers"

    def __init__(self, *, batch_size: int = 3, rank: int = 1, world_size: int = 2, num_workers: int = 2, seed: int = 4,
                 root: str = "/data/numbers"):
        self._samples, self._collate = _Numbers(), _collate
        self.batch_size, self.rank, self.world_size, self.num_workers, self.seed, self.root = (
            batch_size, rank, world_size, num_workers, seed, root)
        self._start()

    def __len__(self) -> int:
        return len(self._samples) // (self.batch_size * self.world_size)

    def _all_batches(self) -> list[list[int]]:
        order = torch.randperm(len(self._samples), generator=torch.Generator().manual_seed(self.seed * 1000 + self._epoch))
        batches = [order[b:b + self.batch_size].tolist() for b in range(0, len(order) - self.batch_size + 1, self.batch_size)]
        return batches[self.rank::self.world_size]

    def _identity(self) -> dict:
        return {"root": self.root, "images": len(self._samples), "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.batch_size}


def _two_epochs(loader) -> list[torch.Tensor]:
    batches = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches += [values for (values,) in loader]
    return batches


def test_dense_loader_resumes_mid_epoch_through_workers(tmp_path):
    reference = _two_epochs(NumberBatches())
    assert len(reference) == 2 * 6 and all(values.shape == (3, 2) for values in reference)
    interrupted = NumberBatches()
    seen = []
    for (values,) in interrupted:
        seen.append(values)
        if len(seen) == 4:
            break
    torch.save({"data": interrupted.state_dict()}, tmp_path / "state.pt")
    resumed = NumberBatches(num_workers=1)  # worker count is not part of a dense loader's identity
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["data"])
    seen += _two_epochs(resumed)
    assert len(seen) == len(reference) and all(torch.equal(a, b) for a, b in zip(seen, reference))
    expected_bad = sum(int((values[:, 0] == UNREADABLE).sum()) for values in reference)
    assert resumed.bad_samples == expected_bad


def test_a_dense_loader_state_in_the_version_1_format_still_resumes():
    """Written by ``state_dict()`` of the pre-split finetune/loading.py (commit 6436cc4) for ``NumberBatches()``
    after 4 batches (one of them held the unreadable index); the root has moved since (roots are not compared)."""
    saved = {"version": 1, "root": "/elsewhere/numbers", "images": 40, "seed": 4, "rank": 1, "world_size": 2,
             "batch_size": 3, "epoch": 0, "batches_done": 4, "bad_samples": 1}
    reference = _two_epochs(NumberBatches())
    resumed = NumberBatches()
    resumed.load_state_dict(saved)
    assert resumed.epoch == 0 and resumed.bad_samples == 1
    rest = _two_epochs(resumed)
    assert len(rest) == len(reference) - 4 and all(torch.equal(a, b) for a, b in zip(rest, reference[4:]))
    assert resumed.bad_samples == 1 + sum(int((values[:, 0] == UNREADABLE).sum()) for values in rest)


def test_other_settings_unknown_versions_and_missing_fields_are_refused_by_name():
    state = NumberBatches().state_dict()
    with pytest.raises(ValueError, match=r"numbers loader state was saved with batch_size=3 but this loader has batch_size=2"):
        NumberBatches(batch_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"saved with seed=4 .* exact resume needs the same data, seed"):
        NumberBatches(seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match=r"numbers loader state version 2 is not supported \(this code reads version 1\)"):
        NumberBatches().load_state_dict({**state, "version": 2})
    with pytest.raises(ValueError, match=r"numbers loader state has no bad_samples"):
        NumberBatches().load_state_dict({k: v for k, v in state.items() if k != "bad_samples"})


# ----------------------------------------------------------------------------- seeding


def test_sample_seed_is_one_derivation_for_every_caller():
    seeds = sample_seeds(SeedPurpose.AUGMENT, 5, 2, 3)
    assert [seeds(p) for p in range(4)] == [sample_seed(5, 2, p, purpose=SeedPurpose.AUGMENT, slot=3) for p in range(4)]
    # every part matters: seed, epoch, position, purpose, slot
    variants = {sample_seed(5, 2, 7, purpose=SeedPurpose.AUGMENT, slot=3), sample_seed(6, 2, 7, purpose=SeedPurpose.AUGMENT, slot=3),
                sample_seed(5, 3, 7, purpose=SeedPurpose.AUGMENT, slot=3), sample_seed(5, 2, 8, purpose=SeedPurpose.AUGMENT, slot=3),
                sample_seed(5, 2, 7, purpose=SeedPurpose.MIXUP, slot=3), sample_seed(5, 2, 7, purpose=SeedPurpose.AUGMENT, slot=4)}
    assert len(variants) == 6 and all(0 <= s < 2**32 for s in variants)
    # the stream part is NumPy's SeedSequence over (purpose, parts...): an independent computation
    assert stream_seed(SeedPurpose.SHUFFLE, 1, 2, 3) == int(np.random.SeedSequence([2, 1, 2, 3]).generate_state(1)[0])


def test_seeded_global_rngs_give_the_same_draws_and_restore_the_callers_streams():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = random.random(), np.random.rand(), torch.rand(())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with seeded_global_rngs(99):
        first = random.random(), np.random.rand(), torch.rand(())
    assert (random.random(), np.random.rand(), torch.rand(())) == before  # the caller's streams go on untouched
    with seeded_global_rngs(99, restore=False):
        again = random.random(), np.random.rand(), torch.rand(())
    assert again == first
