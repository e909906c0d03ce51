"""A non-image modality on the shard loaders: 1-D series stored as ``.npy`` in WebDataset shards (written with
webdataset's own ``TarWriter``), streamed by the same TrainLoader / EvalLoader through a SamplePipeline, with
loader workers, exact mid-epoch resume and damaged data skipped and counted."""
from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from shards import SamplePipeline, ShardSources
from shards.info import resolve_shard_set
from shards.loader import EvalLoader, TrainLoader
from shards.samples import BadSampleError
from test_shards import write_info

LENGTH, CLASSES, SHARD_SIZES = 24, 3, [30, 25, 35, 30]
GARBAGE_KEY = "s2_0007"


def series_of(key: str) -> np.ndarray:
    seed = int(key[1]) * 1000 + int(key[3:])
    return np.random.default_rng(seed).standard_normal(LENGTH).astype(np.float32)


def label_of(key: str) -> int:
    return (int(key[1]) + int(key[3:])) % CLASSES


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def series_shards(tmp_path_factory) -> tuple[Path, str, int]:
    """Four shards of series; one sample's npy is garbage, shard 1 is cut at an arbitrary offset.
    Returns (directory, the cut shard's URL, how many of its samples survive the cut intact)."""
    import webdataset as wds

    directory = tmp_path_factory.mktemp("series")
    for shard, size in enumerate(SHARD_SIZES):
        with wds.TarWriter(str(directory / f"shard-{shard:06d}.tar")) as writer:
            for i in range(size):
                key = f"s{shard}_{i:04d}"
                payload = b"\x93NUMPY garbage" if key == GARBAGE_KEY else npy_bytes(series_of(key))
                writer.write({"__key__": key, "npy": payload, "cls": str(label_of(key)).encode()})
    write_info(directory, SHARD_SIZES, [f"c{i}" for i in range(CLASSES)])
    cut = directory / "shard-000001.tar"
    data = cut.read_bytes()
    offset = random.Random(11).randrange(len(data) // 3, 2 * len(data) // 3)
    assert offset % 512, "an arbitrary offset, not a member boundary"
    cut.write_bytes(data[:offset])
    return directory, str(cut), offset


def decode_series(sample) -> tuple[torch.Tensor, int]:
    where = f"{sample['__url__']} key {sample['__key__']!r}"
    try:
        series = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
    except (KeyError, ValueError, OSError) as exc:
        raise BadSampleError(f"{where}: npy does not load: {exc}") from exc
    if series.shape != (LENGTH,):
        raise BadSampleError(f"{where}: series of shape {series.shape}, expected ({LENGTH},)")
    return torch.from_numpy(series), int(sample["cls"])


def shifted_into(slot: torch.Tensor, series: torch.Tensor) -> None:
    """A random circular shift (a time-series augmentation), drawn from torch's global RNG as timm's transforms draw."""
    slot.copy_(torch.roll(series, int(torch.randint(LENGTH, ()))))


TRAIN = SamplePipeline(decode=decode_series, into=shifted_into, sample_shape=(LENGTH,))
EVAL = SamplePipeline(decode=decode_series, into=torch.Tensor.copy_, sample_shape=(LENGTH,))


def make_train(directory: Path) -> TrainLoader:
    return TrainLoader(ShardSources.resolve(str(directory)), TRAIN, batch_size=4, num_workers=2, seed=3,
                       shuffle_buffer=8, return_keys=True)


def is_rotation(row: torch.Tensor, series: np.ndarray) -> bool:
    return any(np.array_equal(row.numpy(), np.roll(series, shift)) for shift in range(LENGTH))


def test_a_series_modality_streams_resumes_exactly_and_counts_damage(series_shards, tmp_path):
    directory, _, _ = series_shards
    reference = []
    loader = make_train(directory)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        reference += list(loader)
    assert len(reference) == 2 * (sum(SHARD_SIZES) // 4)
    for inputs, targets, keys in reference:
        assert inputs.shape == (4, LENGTH) and inputs.dtype == torch.float32 and targets.dtype == torch.int64
        assert GARBAGE_KEY not in keys
        for row, target, key in zip(inputs, targets.tolist(), keys):
            assert target == label_of(key) and is_rotation(row, series_of(key)), key
    assert any(not np.array_equal(row.numpy(), series_of(key))
               for inputs, _, keys in reference for row, key in zip(inputs, keys)), "the augmentation never shifted"
    assert loader.bad_samples > 0

    interrupted = make_train(directory)
    consumed = []
    for batch in interrupted:
        consumed.append(batch)
        if len(consumed) == 5:  # odd: worker 1 serves the next batch
            break
    torch.save({"data": interrupted.state_dict()}, tmp_path / "state.pt")
    resumed = make_train(directory)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["data"])
    resumed.set_epoch(0)
    consumed += list(resumed)
    resumed.set_epoch(1)
    consumed += list(resumed)
    assert len(consumed) == len(reference)
    for (inputs, targets, keys), (ref_inputs, ref_targets, ref_keys) in zip(consumed, reference):
        assert keys == ref_keys and torch.equal(inputs, ref_inputs) and torch.equal(targets, ref_targets)
    assert resumed.bad_samples == loader.bad_samples


def test_a_series_modality_evaluates_every_sample_once_and_counts_the_rest(series_shards):
    directory, cut_url, _ = series_shards
    source = resolve_shard_set(str(directory), require_counts=True)
    seen: dict[str, int] = {}
    bad = 0
    for rank in (0, 1):
        loader = EvalLoader(source, EVAL, batch_size=5, rank=rank, world_size=2, num_workers=2, return_keys=True)
        for inputs, targets, keys in loader:
            for row, target, key in zip(inputs, targets.tolist(), keys):
                assert key not in seen
                assert np.array_equal(row.numpy(), series_of(key)) and target == label_of(key)
                seen[key] = target
        bad += loader.bad_samples
    survivors = sum(key.startswith("s1_") for key in seen)
    assert 0 < survivors < SHARD_SIZES[1]
    assert GARBAGE_KEY not in seen
    # every sample is either scored or counted: the garbage one and those the cut shard lost
    assert bad == 1 + (SHARD_SIZES[1] - survivors) and len(seen) + bad == sum(SHARD_SIZES)
