"""ADE20K label files: values that are not classes (after ``reduce_zero_label``, 0..num_classes-1 and 255 are),
labels of another size than their image and label PNGs cut or bit-flipped at random offsets are skipped and counted
in training and in evaluation, each named. Which files are bad comes from the damage made here and from Pillow
decoding them."""
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
from finetune.ade20k.config import Ade20kConfig

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


def _damage(path, how: str, rng: np.random.Generator) -> bool:
    """Cut the file at a random offset or flip one of its bits; True when the pair must then be skipped: Pillow
    refuses the file, or it decodes to another size or to values that are not classes (the rule: 0..C, 255)."""
    data = bytearray(path.read_bytes())
    shape = np.array(Image.open(path)).shape
    if how == "cut":
        data = data[:int(rng.integers(0, len(data)))]
    else:
        data[int(rng.integers(0, len(data)))] ^= 1 << int(rng.integers(0, 8))
    path.write_bytes(bytes(data))
    try:
        label = np.array(Image.open(io.BytesIO(bytes(data))))
    except (OSError, SyntaxError, ValueError):
        return True
    return label.shape != shape or bool(((label > NUM_CLASSES) & (label != 255)).any())


def _in_range(labels: torch.Tensor) -> bool:
    return bool((((labels >= 0) & (labels < NUM_CLASSES)) | (labels == 255)).all())


@pytest.mark.parametrize("how, seed", [("cut", 0), ("cut", 1), ("flip", 0), ("flip", 1), ("flip", 2)])
def test_training_skips_and_names_labels_that_are_not_classes_or_damaged(ade, tmp_path, caplog, how, seed):
    root = shutil.copytree(ade, tmp_path / "ade")
    labels = _labels(root, "training")
    _paint(labels[1], NUM_CLASSES + 1)  # class 6 after reduce_zero_label: one past the last class
    _paint(labels[3], 200)  # "Target 199 is out of bounds"
    named = [labels[1], labels[3]]
    if _damage(labels[5], how, np.random.default_rng(seed)):
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
    assert "values 200, not classes" in messages


def test_evaluation_skips_counts_and_names_bad_pairs(ade, tmp_path, caplog):
    root = shutil.copytree(ade, tmp_path / "ade")
    labels, images = _labels(root, "validation"), sorted((root / "images" / "validation").iterdir())
    _paint(labels[0], NUM_CLASSES + 1)
    Image.open(labels[2]).resize((40, 30), Image.NEAREST).save(labels[2])  # another size than its image
    data = images[4].read_bytes()
    images[4].write_bytes(data[:len(data) * 2 // 5])
    named = [labels[0], labels[2], images[4]]
    for index, how in ((6, "cut"), (8, "flip")):
        if _damage(labels[index], how, np.random.default_rng(index)):
            named.append(labels[index])
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
