"""Tests for shards/: write -> verify -> read round trips, fall11 layouts, resume, equal batches, bad data, CLI.

Shards are built at test time (tiny 32x32 images); expectations come from independent readers
(Python's ``tarfile``, ``webdataset``) and from recomputing labels from their definitions.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import uuid
from importlib import resources
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shards import (
    AugmentConfig,
    MixupConfig,
    ShardReadError,
    build_eval_loader,
    build_train_loader,
    read_info,
    verify_dataset,
    write_dataset,
    write_demo,
)
from shards.cli import main as cli_main
from shards.demo import DEMO_CLASSES, demo_label

REPO = Path(__file__).resolve().parents[1]
SIMPLE = AugmentConfig(auto_augment=None, reprob=0.0, color_jitter=None)


# ----------------------------------------------------------------------------- helpers


def jpeg_bytes(seed: int, size: tuple[int, int] = (32, 32)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as archive:
        for key, fields in samples:
            for extension, payload in fields.items():
                member = tarfile.TarInfo(f"{key}.{extension}")
                member.size = len(payload)
                archive.addfile(member, io.BytesIO(payload))


def read_tar(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """Samples of a tar, read with tarfile only (independent of shards.samples)."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            key, extension = member.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][extension] = archive.extractfile(member).read()
    return samples


def dataset_samples(directory: Path) -> dict[str, dict[str, bytes]]:
    info = json.loads((directory / "info.json").read_text())
    return {key: fields for shard in info["shards"] for key, fields in read_tar(directory / shard["name"])}


def write_info(directory: Path, counts: list[int], classes: list[str]) -> None:
    shards = [{"name": f"shard-{i:06d}.tar", "count": count} for i, count in enumerate(counts)]
    (directory / "info.json").write_text(json.dumps({"total": sum(counts), "shards": shards, "classes": classes}))


UNEVEN_SIZES = [37, 80, 13, 55, 95]


@pytest.fixture(scope="module")
def uneven_dir(tmp_path_factory) -> Path:
    """Five hand-written shards of different sizes (280 samples, 7 classes)."""
    directory = tmp_path_factory.mktemp("uneven")
    for shard, size in enumerate(UNEVEN_SIZES):
        samples = [
            (f"u{shard}_{i:03d}", {"jpg": jpeg_bytes(1000 * shard + i), "cls": str((shard + i) % 7).encode()})
            for i in range(size)
        ]
        write_tar(directory / f"shard-{shard:06d}.tar", samples)
    write_info(directory, UNEVEN_SIZES, [f"c{i}" for i in range(7)])
    return directory


@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo")
    write_demo(str(root / "train"), "train", num_samples=400, samples_per_shard=60, seed=3)
    write_demo(str(root / "val"), "val", num_samples=120, samples_per_shard=50, seed=3)
    return {"train": root / "train", "val": root / "val"}


# ----------------------------------------------------------------------------- writing


def test_demo_write_verify_and_labels(demo_dirs):
    directory = demo_dirs["train"]
    info = read_info(str(directory))
    assert info["total"] == 400 and [s["count"] for s in info["shards"]] == [60] * 6 + [40]
    assert info["classes"] == list(DEMO_CLASSES)
    assert (directory / "classes.txt").read_text().split() == list(DEMO_CLASSES)
    assert "python -m shards write demo:train" in info["command"]

    samples = dataset_samples(directory)
    assert len(samples) == 400
    for key, fields in samples.items():
        meta = json.loads(fields["json"])
        index = int(meta["source"].rsplit("_", 1)[1].split(".")[0])
        assert int(fields["cls"]) == meta["label"] == demo_label("train", index, 3)
        assert meta["class"] == DEMO_CLASSES[meta["label"]]
        assert fields["jpg"][:2] == b"\xff\xd8" and (meta["width"], meta["height"]) == (32, 32)
    for shard in info["shards"]:
        classes_in_shard = {int(fields["cls"]) for _, fields in read_tar(directory / shard["name"])}
        assert len(classes_in_shard) >= 6, "the seeded shuffle must spread classes across shards"

    import webdataset as wds

    reference = {sample["__key__"]: int(sample["cls"]) for sample in wds.WebDataset(str(directory / "shard-{000000..000006}.tar"), shardshuffle=False)}
    assert reference == {key: int(fields["cls"]) for key, fields in samples.items()}

    report = verify_dataset(str(directory), progress=False)
    assert report.ok and report.samples == report.decoded == 400


def test_demo_splits_use_disjoint_digit_scans():
    from shards.demo import demo_scan_indices

    assert not set(demo_scan_indices("train")) & set(demo_scan_indices("val"))


def test_memory_target_round_trip():
    url = f"memory://shards-test-{uuid.uuid4().hex}/val"
    info = write_demo(url, "val", num_samples=90, samples_per_shard=40, workers=2)
    assert info["total"] == 90 and read_info(url)["total"] == 90
    assert verify_dataset(url, progress=False).ok
    for workers in (0, 2):
        loader = build_eval_loader(url, batch_size=16, img_size=32, num_workers=workers, return_keys=True)
        keys = [key for _, _, batch_keys in loader for key in batch_keys]
        assert len(keys) == len(set(keys)) == 90
    images, targets = next(iter(build_train_loader(url, batch_size=8, img_size=32, num_workers=2, augment=SIMPLE)))
    assert images.shape == (8, 3, 32, 32) and targets.dtype == torch.int64


def smooth_rgba() -> np.ndarray:
    """A colour gradient whose left half is fully transparent."""
    rows, columns = np.mgrid[0:24, 0:20]
    rgba = np.stack([rows * 10, columns * 12, 255 - rows * 5, np.full_like(rows, 255)], axis=-1).astype(np.uint8)
    rgba[:, :10, 3] = 0
    return rgba


def make_tree(root: Path) -> dict[str, bytes]:
    """An image tree with JPEGs of several sizes, an RGBA PNG, a corrupt file and a non-image."""
    originals = {}
    for c, name in enumerate(["zebra", "apple", "mango"]):
        (root / name).mkdir(parents=True)
        for i in range(4):
            data = jpeg_bytes(10 * c + i, size=(40 + 8 * i, 30))
            (root / name / f"img{i}.jpg").write_bytes(data)
            originals[f"{name}/img{i}.jpg"] = data
    Image.fromarray(smooth_rgba(), "RGBA").save(root / "apple" / "drawing.png")
    originals["apple/drawing.png"] = (root / "apple" / "drawing.png").read_bytes()
    (root / "mango" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "mango" / "notes.txt").write_text("not an image")
    return originals


def test_image_tree_labels_reencoding_and_skipped_file(tmp_path):
    originals = make_tree(tmp_path / "tree")
    out = tmp_path / "out"
    info = write_dataset(str(tmp_path / "tree"), str(out), samples_per_shard=5, workers=2, progress=False)
    assert info["classes"] == ["apple", "mango", "zebra"] and info["class_map"] == "folders"
    assert info["total"] == 13 and [entry["source"] for entry in info["skipped"]] == ["mango/broken.jpg"]
    assert info["skipped"][0]["reason"]

    samples = dataset_samples(out)
    by_source = {json.loads(fields["json"])["source"]: fields for fields in samples.values()}
    assert set(by_source) == set(originals)
    for source, fields in by_source.items():
        assert int(fields["cls"]) == ["apple", "mango", "zebra"].index(source.split("/")[0])
        if source.endswith(".jpg"):
            assert fields["jpg"] == originals[source], "JPEGs that need no change are kept byte for byte"
    png = by_source["apple/drawing.png"]
    assert png["jpg"][:2] == b"\xff\xd8"
    decoded = np.asarray(Image.open(io.BytesIO(png["jpg"])).convert("RGB"), np.float32)
    expected = smooth_rgba()[..., :3].astype(np.float32)
    expected[:, :10] = 255.0  # transparent pixels become white
    assert np.abs(decoded - expected).mean() < 6

    resized = tmp_path / "resized"
    write_dataset(str(tmp_path / "tree"), str(resized), samples_per_shard=5, max_side=16, progress=False)
    for fields in dataset_samples(resized).values():
        meta = json.loads(fields["json"])
        width, height = Image.open(io.BytesIO(fields["jpg"])).size
        assert max(width, height) == 16 and max(meta["width"], meta["height"]) > 16
        assert abs(width / height - meta["width"] / meta["height"]) < 0.15


def timm_22k_synsets() -> list[str]:
    text = resources.files("timm.data").joinpath("_info/imagenet22k_synsets.txt").read_text()
    return text.split()


def make_fall11(directory: Path, wnids: list[str]) -> dict[str, bytes]:
    directory.mkdir(parents=True)
    images = {}
    for n, wnid in enumerate(wnids):
        members = [(f"{wnid}_{i}", {"JPEG": jpeg_bytes(100 * n + i)}) for i in range(3)]
        write_tar(directory / f"{wnid}.tar", members)
        images.update({key: fields["JPEG"] for key, fields in members})
    return images


def test_fall11_directory_and_outer_tar(tmp_path):
    synsets = timm_22k_synsets()
    assert len(synsets) == 21841 and synsets == sorted(synsets)
    wnids = [synsets[0], synsets[1], synsets[5000], synsets[21840]]
    images = make_fall11(tmp_path / "fall11", wnids)
    before = sorted(p.name for p in (tmp_path / "fall11").iterdir())
    with tarfile.open(tmp_path / "fall11_whole.tar", "w") as outer:
        for wnid in wnids:
            outer.add(tmp_path / "fall11" / f"{wnid}.tar", arcname=f"fall11/{wnid}.tar")

    results = {}
    for name, source in (("dir", tmp_path / "fall11"), ("outer", tmp_path / "fall11_whole.tar")):
        if name == "dir":  # a broken synset tar is skipped and reported, the rest is written
            (source / f"{synsets[7]}.tar").write_bytes(b"not a tar" * 100)
        out = tmp_path / f"out-{name}"
        info = write_dataset(str(source), str(out), samples_per_shard=5, workers=2, progress=False)
        assert info["num_classes"] == 21841 and info["classes"] == synsets
        assert len((out / "classes.txt").read_text().split()) == 21841
        samples = dataset_samples(out)
        assert {key: fields["jpg"] for key, fields in samples.items()} == images
        assert [entry["source"] for entry in info["skipped"]] == ([f"{synsets[7]}.tar"] if name == "dir" else [])
        for key, fields in samples.items():
            wnid = key.split("_")[0]
            assert int(fields["cls"]) == synsets.index(wnid) and json.loads(fields["json"])["wnid"] == wnid
        results[name] = {key: int(fields["cls"]) for key, fields in samples.items()}
    assert results["dir"] == results["outer"]
    after = sorted(p.name for p in (tmp_path / "fall11").iterdir())
    assert after == sorted(before + [f"{synsets[7]}.tar"]), "nothing is unpacked next to the source"


def test_unknown_wnid_is_an_error_naming_it(tmp_path):
    synsets = timm_22k_synsets()
    make_fall11(tmp_path / "fall11", [synsets[0], "n99999999"])
    with pytest.raises(ValueError, match="n99999999"):
        write_dataset(str(tmp_path / "fall11"), str(tmp_path / "out"), progress=False)
    for wnid in (synsets[0], "n99999999"):
        (tmp_path / "tree" / wnid).mkdir(parents=True)
        (tmp_path / "tree" / wnid / "a.jpg").write_bytes(jpeg_bytes(1))
    with pytest.raises(ValueError, match="n99999999"):
        write_dataset(str(tmp_path / "tree"), str(tmp_path / "out2"), classes="imagenet22k", progress=False)


def test_shards_are_cut_by_count_and_bytes():
    from shards.writer import plan_shards

    sizes = [100, 300, 50, 700, 20, 80, 400, 10, 90, 250]
    plan = plan_shards(sizes, seed=1, samples_per_shard=3, shard_bytes=600)
    assert sorted(i for shard in plan for i in shard) == list(range(10))
    assert all(len(shard) <= 3 for shard in plan)
    assert all(sum(sizes[i] for i in shard) <= 600 or len(shard) == 1 for shard in plan)
    for shard, following in zip(plan, plan[1:]):
        assert len(shard) == 3 or sum(sizes[i] for i in shard) + sizes[following[0]] > 600, "a shard closes only when full"
    assert plan == plan_shards(sizes, seed=1, samples_per_shard=3, shard_bytes=600)
    assert plan_shards(sizes, seed=2, samples_per_shard=10, shard_bytes=None)[0] != plan_shards(sizes, seed=1, samples_per_shard=10, shard_bytes=None)[0]


def test_writer_resumes_and_is_deterministic(tmp_path):
    out = tmp_path / "out"
    write_demo(str(out), "val", num_samples=200, samples_per_shard=40, workers=2)
    names = [f"shard-{i:06d}.tar" for i in range(5)]
    original = {name: (out / name).read_bytes() for name in names}

    serial = tmp_path / "serial"
    write_demo(str(serial), "val", num_samples=200, samples_per_shard=40, workers=1)
    assert {name: (serial / name).read_bytes() for name in names} == original

    stamps = {name: (out / name).stat().st_mtime_ns for name in names}
    (out / names[1]).unlink()
    (out / names[2]).write_bytes(original[names[2]][: len(original[names[2]]) // 2])
    (out / f"{names[3]}.tmp-deadbeef").write_bytes(b"half a shard")
    info = write_demo(str(out), "val", num_samples=200, samples_per_shard=40, workers=2)
    assert {name: (out / name).read_bytes() for name in names} == original
    assert [(out / name).stat().st_mtime_ns == stamps[name] for name in names] == [True, False, False, True, True]
    assert not list(out.glob("*.tmp-*")) and info["total"] == 200
    assert verify_dataset(str(out), progress=False).ok


def test_verify_reports_bad_samples_and_count_mismatch(tmp_path, demo_dirs):
    directory = tmp_path / "copy"
    directory.mkdir()
    for path in demo_dirs["val"].iterdir():
        if path.is_file():
            (directory / path.name).write_bytes(path.read_bytes())
    samples = read_tar(directory / "shard-000000.tar")
    bad_key = samples[3][0]
    samples[3][1]["jpg"] = b"garbage"
    write_tar(directory / "shard-000000.tar", samples)
    data = (directory / "shard-000001.tar").read_bytes()
    (directory / "shard-000001.tar").write_bytes(data[: len(data) // 2])

    report = verify_dataset(str(directory), workers=2, progress=False)
    assert not report.ok
    assert any(p["shard"] == "shard-000000.tar" and p["key"] == bad_key and "decode" in p["problem"] for p in report.problems)
    assert any(p["shard"] == "shard-000001.tar" and p["key"] is None for p in report.problems)
    assert cli_main(["verify", str(directory), "--workers", "1"]) == 1
    assert cli_main(["verify", str(demo_dirs["val"]), "--workers", "1"]) == 0
    partial = verify_dataset(str(demo_dirs["val"]), sample_fraction=0.5, progress=False)
    assert partial.ok and partial.samples == 120 and 30 < partial.decoded < 90


# ----------------------------------------------------------------------------- reading


def collect(loader, epochs=(0,)):
    batches = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        batches.extend(loader)
    return batches


def test_every_rank_gets_the_same_number_of_full_batches(uneven_dir):
    for samples_per_epoch, expected in ((None, 280 // 16), (1000, 1000 // 16)):
        counts = []
        for rank in (0, 1):
            loader = build_train_loader(
                str(uneven_dir), batch_size=8, img_size=32, rank=rank, world_size=2, num_workers=2,
                samples_per_epoch=samples_per_epoch, augment=SIMPLE, shuffle_buffer=20, return_keys=True,
            )
            batches = list(loader)
            assert len(loader) == expected and all(images.shape == (8, 3, 32, 32) for images, _, _ in batches)
            counts.append(len(batches))
        assert counts == [expected, expected]


def test_train_stream_is_deterministic_per_epoch(uneven_dir):
    def keys(epoch: int, seed: int = 0) -> list[str]:
        loader = build_train_loader(str(uneven_dir), batch_size=8, img_size=32, num_workers=2, seed=seed, augment=SIMPLE, shuffle_buffer=30, return_keys=True)
        loader.set_epoch(epoch)
        return [key for _, _, batch in loader for key in batch]

    assert keys(0) == keys(0)
    assert keys(1) != keys(0) and keys(0, seed=1) != keys(0)
    assert len(set(keys(0))) > 200, "one epoch covers most of the 280 samples"


def test_resume_gives_bit_identical_batches(uneven_dir, tmp_path):
    def make():
        return build_train_loader(
            str(uneven_dir), batch_size=8, img_size=32, rank=1, world_size=2, num_workers=2, seed=5,
            mixup=MixupConfig(), shuffle_buffer=25, return_keys=True,
        )

    reference = collect(make(), epochs=(0, 1))
    assert len(reference) == 2 * (280 // 16)
    for stop in (7, 17):  # mid-epoch (odd, so worker 1 is next) and right after the last batch of epoch 0
        loader = make()
        consumed = []
        for images, targets, keys in loader:
            consumed.append((images, targets, keys))
            if len(consumed) == stop:
                break
        torch.save({"data": loader.state_dict()}, tmp_path / "ckpt.pt")
        bad_before = loader.bad_samples

        resumed = make()
        resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["data"])
        assert resumed.bad_samples == bad_before
        consumed += collect(resumed, epochs=(0, 1))
        assert len(consumed) == len(reference)
        for (images, targets, keys), (ref_images, ref_targets, ref_keys) in zip(consumed, reference):
            assert keys == ref_keys
            assert torch.equal(images, ref_images) and torch.equal(targets, ref_targets)
    assert reference[0][1].shape == (8, 7) and torch.allclose(reference[0][1].sum(1), torch.ones(8))


# Digests of what the image loaders deliver on ``uneven_dir`` (images with their shape and strides, targets, keys),
# obtained by running these same loaders and ``loader_digest`` on the code before the loader was split by concern
# (commit 571d9e0; torch 2.x, timm, Pillow and libjpeg-turbo of this project's environment). They pin the whole
# path (shard order, shuffle, decode, timm's augmentation with its per-sample seeds, mixup, eval transform):
# a refactor that keeps them keeps every batch bit for bit, for several (seed, epoch, rank, worker) settings.
PINNED_DIGESTS = {
    "rank 1 of 2, 2 workers, seed 5, mixup, epochs 0-1": (
        dict(rank=1, world_size=2, num_workers=2, seed=5, mixup=MixupConfig(), shuffle_buffer=25), (0, 1),
        "1125755c6f945b36f63c992ddae5669b"),
    "in-process, seed 0, epoch 2": (dict(num_workers=0, seed=0, shuffle_buffer=40), (2,), "508830e5d54ea1244b850f292a1c4f3c"),
    "rank 0 of 2, 3 workers, seed 7, epoch 1": (
        dict(rank=0, world_size=2, num_workers=3, seed=7, shuffle_buffer=10), (1,), "d529047b3305373633872a6f7ea59c46"),
}
PINNED_EVAL_DIGEST = "78c6e428047377fa79ab3af59b64709b"  # rank 1 of 2, 2 workers, batch 16, 32 px


def loader_digest(loader, epochs) -> str:
    digest = hashlib.sha256()
    for epoch in epochs:
        if epoch is not None:
            loader.set_epoch(epoch)
        for images, targets, keys in loader:
            digest.update(f"{tuple(images.shape)}{images.stride()}".encode())
            digest.update(images.numpy().tobytes() + targets.numpy().tobytes() + ",".join(keys).encode())
    return digest.hexdigest()[:32]


def test_loader_output_is_pinned_bit_for_bit(uneven_dir):
    for name, (settings, epochs, expected) in PINNED_DIGESTS.items():
        loader = build_train_loader(str(uneven_dir), batch_size=8, img_size=32, return_keys=True, **settings)
        assert loader_digest(loader, epochs) == expected, name
    loader = build_eval_loader(str(uneven_dir), batch_size=16, img_size=32, rank=1, world_size=2, num_workers=2,
                               return_keys=True)
    assert loader_digest(loader, (None,)) == PINNED_EVAL_DIGEST


def test_a_loader_state_in_the_version_1_format_still_resumes(uneven_dir):
    """A state as the first format wrote it into checkpoints (printed by ``state_dict()`` on commit 571d9e0 after
    7 batches of this loader) resumes at the same batch: an upgrade never strands a run."""
    def make():
        return build_train_loader(str(uneven_dir), batch_size=8, img_size=32, rank=1, world_size=2, num_workers=2,
                                  seed=5, mixup=MixupConfig(), shuffle_buffer=25, return_keys=True)

    shard_urls = ",".join(str(uneven_dir / f"shard-{i:06d}.tar") for i in range(5))
    saved = {"version": 1, "seed": 5, "rank": 1, "world_size": 2, "num_workers": 2, "batch_size": 8,
             "samples_per_epoch": 280, "shuffle_buffer": 25, "sources": [f"1.0:{shard_urls}"], "epoch": 0,
             "batches_done": 7, "bad_samples_before_epoch": 0, "workers": [[4, 32, 0, 0], [3, 24, 0, 0]]}
    reference = list(make())
    resumed = make()
    resumed.load_state_dict(saved)
    rest = list(resumed)
    assert len(rest) == len(reference) - 7
    for (images, targets, keys), (ref_images, ref_targets, ref_keys) in zip(rest, reference[7:]):
        assert keys == ref_keys and torch.equal(images, ref_images) and torch.equal(targets, ref_targets)


def test_state_from_other_settings_is_refused(uneven_dir):
    def make(**overrides):
        settings = dict(batch_size=8, img_size=32, world_size=2, num_workers=2, augment=SIMPLE)
        return build_train_loader(str(uneven_dir), **{**settings, **overrides})

    state = make().state_dict()
    with pytest.raises(ValueError, match="num_workers"):
        make(num_workers=1).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        make(world_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        make().load_state_dict({**state, "version": 99})


def test_augmented_batches_at_224_and_192(demo_dirs):
    url = str(demo_dirs["train"])
    images, targets = next(iter(build_train_loader(url, batch_size=4, img_size=192, num_workers=0)))
    assert images.shape == (4, 3, 192, 192) and images.dtype == torch.float32 and targets.dtype == torch.int64
    images, targets = next(iter(build_train_loader(url, batch_size=4, img_size=224, num_workers=0, mixup=MixupConfig())))
    assert images.shape == (4, 3, 224, 224) and targets.shape == (4, 10) and targets.dtype == torch.float32
    assert -3 < images.mean() < 3 and images.std() > 0.2, "normalized with ImageNet mean/std"


def test_eval_sees_every_sample_exactly_once(demo_dirs):
    directory = demo_dirs["val"]
    expected = {key: int(fields["cls"]) for key, fields in dataset_samples(directory).items()}
    seen: dict[str, int] = {}
    for rank in (0, 1):
        loader = build_eval_loader(str(directory), batch_size=16, img_size=32, rank=rank, world_size=2, num_workers=2, return_keys=True)
        batches = list(loader)
        assert len(batches) == len(loader)
        for images, targets, keys in batches:
            assert images.shape[1:] == (3, 32, 32) and targets.dtype == torch.int64
            for key, target in zip(keys, targets.tolist()):
                assert key not in seen
                seen[key] = target
    assert seen == expected


def test_eval_transform_is_resize_and_center_crop(demo_dirs):
    loader = build_eval_loader(str(demo_dirs["val"]), batch_size=8, img_size=64, num_workers=0, crop_pct=1.0)
    images, _ = next(iter(loader))
    again, _ = next(iter(loader))
    assert images.shape == (8, 3, 64, 64) and torch.equal(images, again)


@pytest.fixture()
def bad_dir(tmp_path) -> tuple[Path, dict[str, list[str]]]:
    """Shard 0: a corrupt JPEG and a sample without cls; shard 1: truncated; shard 2: clean."""
    good: dict[str, list[str]] = {}
    samples0 = [(f"a{i:02d}", {"jpg": jpeg_bytes(i), "cls": b"1"}) for i in range(20)]
    samples0.insert(5, ("a_corrupt", {"jpg": b"\xff\xd8\xff not really", "cls": b"0"}))
    samples0.insert(12, ("a_nocls", {"jpg": jpeg_bytes(99)}))
    write_tar(tmp_path / "shard-000000.tar", samples0)
    good["shard-000000.tar"] = [f"a{i:02d}" for i in range(20)]
    samples1 = [(f"b{i:02d}", {"jpg": jpeg_bytes(200 + i), "cls": b"2"}) for i in range(20)]
    write_tar(tmp_path / "shard-000001.tar", samples1)
    data = (tmp_path / "shard-000001.tar").read_bytes()
    (tmp_path / "shard-000001.tar").write_bytes(data[: int(len(data) * 0.6)])
    good["shard-000001.tar"] = [f"b{i:02d}" for i in range(20)]
    write_tar(tmp_path / "shard-000002.tar", [(f"c{i:02d}", {"jpg": jpeg_bytes(300 + i), "cls": b"0"}) for i in range(20)])
    good["shard-000002.tar"] = [f"c{i:02d}" for i in range(20)]
    write_info(tmp_path, [22, 20, 20], ["x", "y", "z"])
    return tmp_path, good


def test_bad_data_is_skipped_and_counted(bad_dir):
    directory, good = bad_dir
    loader = build_eval_loader(str(directory), batch_size=8, img_size=32, num_workers=2, return_keys=True)
    keys = [key for _, _, batch in loader for key in batch]
    assert len(keys) == len(set(keys))
    assert set(good["shard-000000.tar"]) <= set(keys) and set(good["shard-000002.tar"]) <= set(keys)
    truncated = sorted(key for key in keys if key.startswith("b"))
    assert 5 <= len(truncated) < 20 and truncated == good["shard-000001.tar"][: len(truncated)]
    # corrupt JPEG, missing cls, and every sample the truncated shard should hold (info.json) but lost
    assert loader.bad_samples == 2 + (20 - len(truncated))
    assert len(keys) + loader.bad_samples == 62

    train = build_train_loader(str(directory), batch_size=8, img_size=32, num_workers=2, augment=SIMPLE, shuffle_buffer=10, return_keys=True)
    batches = list(train)
    assert len(batches) == len(train) == 62 // 8 and all(len(batch_keys) == 8 for _, _, batch_keys in batches)
    assert not {"a_corrupt", "a_nocls"} & {key for _, _, batch_keys in batches for key in batch_keys}
    assert train.bad_samples >= 1

    def make():
        return build_train_loader(str(directory), batch_size=8, img_size=32, num_workers=2, augment=SIMPLE, shuffle_buffer=10, return_keys=True)

    interrupted = make()
    first = [keys for _, _, keys in islice(interrupted, 3)]
    resumed = make()
    resumed.load_state_dict(interrupted.state_dict())
    rest = [keys for _, _, keys in resumed]
    assert first + rest == [keys for _, _, keys in batches]
    assert resumed.bad_samples == train.bad_samples


def test_unusable_data_fails_instead_of_hanging(tmp_path):
    write_tar(tmp_path / "shard-000000.tar", [(f"k{i}", {"jpg": jpeg_bytes(i)}) for i in range(30)])
    write_info(tmp_path, [30], ["only"])
    loader = build_train_loader(str(tmp_path), batch_size=4, img_size=32, num_workers=0, augment=SIMPLE, shuffle_buffer=5)
    with pytest.raises(RuntimeError, match="bad samples in a row.*no cls"):
        next(iter(loader))


def test_missing_shard_or_store_fails_naming_the_url(tmp_path, uneven_dir):
    missing = str(uneven_dir / "shard-000009.tar")
    urls = [str(uneven_dir / "shard-000000.tar"), missing]
    train = build_train_loader(urls, batch_size=8, img_size=32, num_workers=2, samples_per_epoch=200, augment=SIMPLE, shuffle_buffer=10)
    with pytest.raises(Exception, match="shard-000009.tar"):
        list(train)
    with pytest.raises(ValueError, match="shard-000009.tar"):
        build_eval_loader(urls, batch_size=8, img_size=32)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        build_train_loader(str(tmp_path), batch_size=8, img_size=32)
    with pytest.raises(ShardReadError, match="nosuchstore://bucket"):
        build_train_loader("nosuchstore://bucket/shard-{000000..000001}.tar", batch_size=8, img_size=32, samples_per_epoch=64)


def test_weighted_sources_mix_in_proportion(demo_dirs, uneven_dir):
    loader = build_train_loader(
        f"{demo_dirs['train']}::{uneven_dir}/shard-{{000000..000004}}.tar", weights=[3.0, 1.0], batch_size=20, img_size=32, num_workers=2,
        samples_per_epoch=600, augment=SIMPLE, shuffle_buffer=20, return_keys=True,
    )
    keys = [key for _, _, batch in loader for key in batch]
    share = sum(key.startswith("digit_") for key in keys) / len(keys)
    assert len(keys) == 600 and abs(share - 0.75) < 0.07


# ----------------------------------------------------------------------------- command line


def test_cli_write_verify_bench(tmp_path, capsys):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "shards", "write", "demo:val", str(out), "--num-samples", "100", "--samples-per-shard", "30", "--workers", "2"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote 100 samples in 4 shards" in result.stdout
    info = read_info(str(out))
    assert info["command"].startswith("python -m shards write demo:val")
    helptext = subprocess.run([sys.executable, "-m", "shards", "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert all(word in helptext.stdout for word in ("write", "verify", "bench"))

    assert cli_main(["verify", str(out), "--workers", "1"]) == 0
    assert cli_main(["bench", str(out), "--img-size", "32", "--batch-size", "8", "--batches", "4", "--workers", "2", "--target", "5000"]) == 0
    printed = capsys.readouterr().out
    assert "per worker:" in printed and "images/s with 2 workers" in printed and "num_workers >=" in printed


def test_bench_compare_times_the_three_readers_per_cpu_second(tmp_path):
    pytest.importorskip("skimage")
    result = subprocess.run([sys.executable, "-m", "shards", "write", "photos", str(tmp_path / "photos"),
                             "--num-samples", "120", "--samples-per-shard", "40"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report_path = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "shards", "bench", str(tmp_path / "photos"), "--compare",
                             "timm,webdataset", "--img-size", "64", "--batch-size", "8", "--batches", "3",
                             "--workers", "1", "--rounds", "1", "--json", str(report_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "img/CPU-s" in result.stdout and "vs timm" in result.stdout
    report = json.loads(report_path.read_text())
    assert set(report["readers"]) == {"project", "timm", "webdataset"}
    for entry in report["readers"].values():
        (trial,) = entry["trials"]
        assert trial["images"] == 24 and trial["cpu_s"] > 0 and entry["images_per_cpu_s"] > 0
    assert report["readers"]["timm"]["vs_timm"] == 1.0
    assert report["seeding_us_per_sample"]["loader"] < report["seeding_us_per_sample"]["torch.manual_seed"]


def test_batches_and_mixup_are_delivered_on_the_given_device(demo_dirs):
    """``device``: the batch is moved first and mixup runs there (on ``meta`` nothing can be computed on
    the CPU after the move, so a mixed batch on ``meta`` shows where mixup ran); on ``cpu`` the batches
    are bit for bit the default's."""
    def batches(device):
        loader = build_train_loader(str(demo_dirs["train"]), batch_size=8, img_size=32, num_workers=1,
                                    samples_per_epoch=32, mixup=MixupConfig(), augment=SIMPLE, device=device)
        return list(loader)

    default, on_cpu, on_meta = batches(None), batches("cpu"), batches("meta")
    for (images, targets), (cpu_images, cpu_targets), (meta_images, meta_targets) in zip(default, on_cpu, on_meta):
        assert torch.equal(images, cpu_images) and torch.equal(targets, cpu_targets)
        assert meta_images.device.type == "meta" and meta_targets.device.type == "meta"
        assert meta_images.shape == images.shape and meta_targets.shape == targets.shape == (8, 10)
