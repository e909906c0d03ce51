"""Damaged data as it happens: shards cut at arbitrary offsets (not only member boundaries), bytes flipped
inside JPEGs, two writers on one target, 16-bit images. Nothing may be lost silently."""
from __future__ import annotations

import random
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards import build_eval_loader, verify_dataset, write_dataset, write_demo
from shards.loader import _Counters, shard_samples

REPO = Path(__file__).resolve().parents[1]
SAMPLES, PER_SHARD = 60, 20


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("clean") / "val"
    write_demo(str(directory), "val", num_samples=SAMPLES, samples_per_shard=PER_SHARD, seed=3)
    return directory


def cut_offsets(size: int, count: int, seed: int) -> list[int]:
    """Arbitrary cut points, a third of them on 4 KiB and 512-byte boundaries (where tar reads a clean end)."""
    rng = random.Random(seed)
    offsets = {rng.randrange(1, size) for _ in range(count // 3)}
    offsets |= {4096 * rng.randrange(1, max(2, size // 4096)) for _ in range(count // 3)}
    offsets |= {512 * rng.randrange(1, size // 512) for _ in range(count - len(offsets))}
    return sorted(o for o in offsets if 0 < o < size)[:count]


def test_a_shard_cut_anywhere_loses_no_sample_without_counting_it(clean_set, tmp_path):
    damaged = tmp_path / "val"
    shutil.copytree(clean_set, damaged)
    shard = damaged / "shard-000001.tar"
    original = shard.read_bytes()
    offsets = cut_offsets(len(original), 60, seed=0)
    assert len(offsets) >= 50 and sum(o % 512 == 0 for o in offsets) >= 20
    for offset in offsets:
        shard.write_bytes(original[:offset])
        counters, intact = _Counters(), str(damaged / "shard-000002.tar")
        samples = list(shard_samples(iter([str(shard), intact]), counters, 2, {str(shard): PER_SHARD, intact: PER_SHARD}))
        read = sum(sample["__url__"] == str(shard) for sample in samples)
        assert len(samples) - read == PER_SHARD
        assert read + counters.shard_errors == PER_SHARD, f"cut at {offset}: {read} read, {counters.shard_errors} counted"
        loader = build_eval_loader(str(damaged), batch_size=8, img_size=32, num_workers=0)
        scored = sum(len(labels) for _, labels in loader)
        assert scored + loader.bad_samples == SAMPLES, f"cut at {offset}"
    for offset in offsets[::20]:  # the same with loader worker processes
        shard.write_bytes(original[:offset])
        loader = build_eval_loader(str(damaged), batch_size=8, img_size=32, num_workers=2)
        scored = sum(len(labels) for _, labels in loader)
        assert scored + loader.bad_samples == SAMPLES, f"cut at {offset}, 2 workers"


def jpeg_payload_ranges(path: Path) -> list[tuple[int, int]]:
    with tarfile.open(path) as archive:
        return [(m.offset_data, m.size) for m in archive.getmembers() if m.name.endswith(".jpg")]


def test_a_byte_flipped_inside_a_jpeg_fails_verify_and_the_rerun_of_write_repairs_it(clean_set, tmp_path):
    target = tmp_path / "val"
    shutil.copytree(clean_set, target)
    shard = target / "shard-000000.tar"
    original = shard.read_bytes()
    rng = random.Random(1)
    for _ in range(20):
        start, size = rng.choice(jpeg_payload_ranges(shard))
        position = start + rng.randrange(size)
        data = bytearray(original)
        data[position] ^= 1 << rng.randrange(8)
        shard.write_bytes(bytes(data))
        report = verify_dataset(str(target), progress=False)
        assert not report.ok, f"flip at byte {position} not noticed"
        assert any("sha256" in p["problem"] and p["shard"] == "shard-000000.tar" for p in report.problems)
        write_demo(str(target), "val", num_samples=SAMPLES, samples_per_shard=PER_SHARD, seed=3)
        assert shard.read_bytes() == original, f"write kept the damaged shard (flip at {position})"
    assert verify_dataset(str(target), progress=False).ok


def test_a_second_writer_on_the_same_target_fails_clearly_and_the_first_finishes(tmp_path):
    target = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "shards", "write", "demo", str(target), "--num-samples", "6000",
                              "--samples-per-shard", "200"], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(target.glob("*.tar.tmp-*")):  # the first writer is writing shards
        assert first.poll() is None, first.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-m", "shards", "write", "demo", str(target), "--num-samples", "6000",
                             "--samples-per-shard", "200"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert f"another `shards write` is writing into {target}" in second.stderr
    assert first.poll() is None, "the second writer stopped the first"
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert verify_dataset(str(target), progress=False).ok


def test_16_bit_greyscale_png_keeps_its_tones(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (48, 1))  # black to white, left to right
    folder = tmp_path / "tree" / "grey"
    folder.mkdir(parents=True)
    Image.fromarray(ramp).save(folder / "ramp16.png")
    assert Image.open(folder / "ramp16.png").mode.startswith("I")
    write_dataset(str(tmp_path / "tree"), str(tmp_path / "out"), progress=False)
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as archive:
        jpeg = next(archive.extractfile(m).read() for m in archive.getmembers() if m.name.endswith(".jpg"))
    import io

    stored = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L")).astype(np.float64)
    expected = ramp.astype(np.float64) / 257.0
    assert abs(stored.mean() - expected.mean()) < 3, (stored.mean(), expected.mean())
    assert stored[:, :4].mean() < 10 and stored[:, -4:].mean() > 245
