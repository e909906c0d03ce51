"""Damaged data as it happens: shards cut at arbitrary offsets (not only member boundaries), bytes flipped
inside JPEGs, two writers on one target, 16-bit images. Nothing may be lost silently."""
from __future__ import annotations

import io
import logging
import logging.handlers
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards import AugmentConfig, build_eval_loader, build_train_loader, verify_dataset, write_dataset, write_demo
from shards.stream import DamageCounts, shard_samples

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
        counters, intact = DamageCounts(), str(damaged / "shard-000002.tar")
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


@pytest.fixture()
def worker_warnings(caplog):
    """``warnings()``: the messages logged at WARNING or above by the ``shards`` loggers since the last call, those
    of forked loader workers included (call it once they have exited). The workers inherit a queue handler that
    sends their records back to ``caplog`` (the logging cookbook's recipe for several processes)."""
    queue = multiprocessing.get_context("fork").Queue()
    parent = os.getpid()
    sender = logging.handlers.QueueHandler(queue)
    sender.addFilter(lambda record: os.getpid() != parent)  # this process's records reach caplog directly
    listener = logging.handlers.QueueListener(queue, caplog.handler, respect_handler_level=True)
    caplog.set_level(logging.WARNING, logger="shards")
    logging.getLogger("shards").addHandler(sender)
    listener.start()

    def warnings() -> list[str]:
        listener.stop()  # handles every record queued so far
        messages = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
        caplog.clear()
        listener.start()
        return messages

    try:
        yield warnings
    finally:
        logging.getLogger("shards").removeHandler(sender)
        listener.stop()


def test_a_shard_short_by_many_samples_is_a_warning_naming_it_and_the_loss(clean_set, tmp_path, worker_warnings):
    damaged = tmp_path / "val"
    shutil.copytree(clean_set, damaged)
    shard = damaged / "shard-000001.tar"
    original = shard.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(original)) as archive:
        shard_keys = {member.name.split(".")[0] for member in archive.getmembers()}
    offset = random.Random(7).randrange(513, len(original) // 3)  # arbitrary, inside the first third of the shard
    assert offset % 512
    shard.write_bytes(original[:offset])

    evaluation = build_eval_loader(str(damaged), batch_size=8, img_size=32, num_workers=2, return_keys=True)
    delivered = len({key for _, _, keys in evaluation for key in keys} & shard_keys)
    lost = PER_SHARD - delivered
    assert lost > 10 and evaluation.bad_samples == lost
    # each eval worker reads its own range of the shard and reports what it lost of it
    reported = [int(want) - int(gave) for line in worker_warnings() if str(shard) in line
                for gave, want in re.findall(r"gave (\d+) of the (\d+) samples", line)]
    assert sum(reported) == lost, f"{lost} samples lost, WARNING lines account for {reported}"

    train = build_train_loader(str(damaged), batch_size=4, img_size=32, num_workers=2, samples_per_epoch=SAMPLES,
                               augment=AugmentConfig(auto_augment=None, reprob=0.0), shuffle_buffer=10)
    assert sum(1 for _ in train) == len(train)
    loud = [line for line in worker_warnings() if str(shard) in line]
    assert loud, f"no WARNING names {shard} ({lost} samples lost)"
    assert all(f"gave {delivered} of the {PER_SHARD} samples" in line and f"{lost} lost" in line for line in loud), loud
    assert train.bad_samples == lost * len(loud)  # one warning each time a worker read the shard

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
