"""ADE20K label files: values that are not classes (after ``reduce_zero_label``, 0..num_classes-1 and 255 are),
labels of another size than their image and label PNGs cut at any offset are skipped and counted in training and
in evaluation, each named. Which files are bad comes from the damage made here and from Pillow decoding them."""
from __future__ import annotations

import io
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.ade20k.data import EvalLoader, TrainLoader, list_split
from finetune.ade20k.demo_data import write_demo
from pretrain.config import Ade20kConfig

NUM_CLASSES = 6  # the demo set's classes: label values 1..6 in the files, 0 "other"


@pytest.fixture(scope="module")
def ade(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("ade_labels") / "ADEChallengeData2016"
    write_demo(root, train_images=12, val_images=9, seed=0)
    return str(root)


def _config() -> Ade20kConfig:
    return Ade20kConfig(num_classes=NUM_CLASSES, crop_size=64, resize_scale=(160, 64), eval_scale=(160, 64))


def _labels(root, split: str) -> list:
    return sorted((root / "annotations" / split).iterdir())


def _paint(path, value: int) -> None:
    """A 5x5 block of ``value`` in the label file, the rest unchanged."""
    label = np.array(Image.open(path))
    label[2:7, 2:7] = value
    Image.fromarray(label).save(path)


def _cut(path, rng: np.random.Generator) -> bool:
    """Cut the file at a random offset; True when Pillow then refuses it (near the end it may still decode)."""
    data = path.read_bytes()
    data = data[:int(rng.integers(0, len(data)))]
    path.write_bytes(data)
    try:
        np.array(Image.open(io.BytesIO(data)))
    except (OSError, SyntaxError, ValueError):
        return True
    return False


def _in_range(labels: torch.Tensor) -> bool:
    return bool((((labels >= 0) & (labels < NUM_CLASSES)) | (labels == 255)).all())


@pytest.mark.parametrize("cut_seed", [0, 1, 2])
def test_training_skips_and_names_labels_that_are_not_classes_or_cut(ade, tmp_path, caplog, cut_seed):
    root = shutil.copytree(ade, tmp_path / "ade")
    labels = _labels(root, "training")
    _paint(labels[1], NUM_CLASSES + 1)  # class 6 after reduce_zero_label: one past the last class
    _paint(labels[3], 200)  # "Target 199 is out of bounds"
    named = [labels[1], labels[3]]
    if _cut(labels[5], np.random.default_rng(cut_seed)):
        named.append(labels[5])
    for workers in (2, 0):  # workers' warnings stay in their processes: names are checked with 0
        loader = TrainLoader(list_split(str(root), "training"), _config(), batch_size=4, rank=0, world_size=1,
                             num_workers=workers, seed=0)
        with caplog.at_level(logging.WARNING, logger="finetune.ade20k.data"):
            batches = list(loader)
        assert len(batches) == 3 and all(_in_range(targets) for _, targets in batches)
        assert loader.bad_samples == len(named)
    messages = "\n".join(r.getMessage() for r in caplog.records)
    for path in named:
        assert str(path) in messages
    assert f"values {NUM_CLASSES + 1}, not classes of ade20k.num_classes={NUM_CLASSES}" in messages
    assert f"values 200, not classes" in messages


def test_evaluation_skips_counts_and_names_bad_pairs(ade, tmp_path, caplog):
    root = shutil.copytree(ade, tmp_path / "ade")
    labels, images = _labels(root, "validation"), sorted((root / "images" / "validation").iterdir())
    _paint(labels[0], NUM_CLASSES + 1)
    Image.open(labels[2]).resize((40, 30), Image.NEAREST).save(labels[2])  # another size than its image
    data = images[4].read_bytes()
    images[4].write_bytes(data[:len(data) * 2 // 5])
    named = [labels[0], labels[2], images[4]]
    if _cut(labels[6], np.random.default_rng(3)):
        named.append(labels[6])
    files = list_split(str(root), "validation")
    for workers in (2, 0):
        loaders = [EvalLoader(files, _config(), rank=rank, world_size=2, num_workers=workers) for rank in (0, 1)]
        with caplog.at_level(logging.WARNING, logger="finetune.ade20k.data"):
            yielded = [targets for loader in loaders for _, targets in loader]
        assert all(_in_range(targets) for targets in yielded)
        assert sum(loader.num_samples for loader in loaders) == 9
        assert sum(loader.bad_samples for loader in loaders) == len(named) == 9 - len(yielded)
        assert loaders[0].description == f"{root}/images/validation"
    messages = "\n".join(r.getMessage() for r in caplog.records)
    for path in named:
        assert path.name in messages
