"""A task defined outside the project, as a user would write one: "bars", telling horizontal from vertical bars.

Nothing in the repository names it. It registers itself when imported, so it is found through
``UNIREPLKNET_TASKS=toy_task`` (with this folder on ``PYTHONPATH``), and then trains, resumes, exports,
predicts and runs as a cluster stage through the project's own commands. It uses only the project's
public pieces: the core config, the registry, ``TaskBase``, ``SumsEvaluator``, the resumable index-batch
loader and the per-sample seeds of ``shards``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

from pretrain.config import (CheckpointConfig, Config, ConfigError, LoaderConfig, ModelConfig, OptimConfig,
                             TrainConfig, positive)
from pretrain.registry import TaskSpec, register_task
from pretrain.task import SumsEvaluator, TaskBase
from shards.indexed import ResumableBatches
from shards.seeding import epoch_order, sample_seed

SIZE = 32


@dataclass(kw_only=True, slots=True)
class BarsSection:
    """The toy task's own section."""

    data_root: str = ""
    """Folder holding train.npz and val.npz (``make-demo-data bars``)."""
    generate_demo: bool = True
    """Write the generated set into ``data_root`` first when it is not there."""
    train_images: int = 96
    val_images: int = 32

    def validate(self) -> None:
        positive("train_images", self.train_images)
        positive("val_images", self.val_images)


@dataclass(kw_only=True, slots=True)
class BarsConfig(Config):
    task: str = "bars"
    bars: BarsSection = field(default_factory=BarsSection)

    def validate(self) -> None:
        Config.validate(self)
        if not self.bars.data_root:
            raise ConfigError("bars.data_root", "expected a folder")


def bars_demo() -> BarsConfig:
    """The demo network (as the digit demo's, so the pipeline's backbone loads) on 32x32 bars, a minute on a CPU."""
    return BarsConfig(
        run_dir="runs/bars_demo",
        model=ModelConfig(name="unireplknet_a", num_classes=2, depths=(1, 1, 2, 1), dims=(16, 32, 64, 128),
                          kernel_sizes=((3,), (13,), (13, 3), (13,))),
        bars=BarsSection(data_root="data/bars_demo"),
        optim=OptimConfig(lr=2e-3, min_lr=1e-5, warmup_epochs=0.0, weight_decay=0.05),
        train=TrainConfig(steps=24, global_batch_size=16, micro_batch_size=16, zero_stage=1, label_smoothing=0.0,
                          log_every=4, eval_every=12),
        checkpoint=CheckpointConfig(every=12, keep=2),
        loader=LoaderConfig(num_workers=1),
    )


def write_bars(out: str, seed: int = 0, train_images: int = 96, val_images: int = 32) -> None:
    """``OUT/{train,val}.npz``: images (N, 32, 32, 3) uint8 of one bar on noise, labels 0 horizontal, 1 vertical."""
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    for split, count in (("train", train_images), ("val", val_images)):
        labels = rng.integers(0, 2, count)
        images = rng.integers(0, 96, (count, SIZE, SIZE, 3), dtype=np.uint8)
        for image, label in zip(images, labels):
            start, width = rng.integers(4, 20), rng.integers(3, 8)
            if label:
                image[:, start:start + width] = 230
            else:
                image[start:start + width] = 230
        np.savez(os.path.join(out, f"{split}.npz"), images=images, labels=labels)


def _load(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(os.path.join(root, f"{split}.npz")) as data:
        return data["images"], data["labels"]


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


class _Samples(torch.utils.data.Dataset):
    """Sample ``(epoch, index)``: the image, flipped on both axes by the sample's own seed."""

    def __init__(self, root: str, split: str, seed: int):
        self.images, self.labels = _load(root, split)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item):
        epoch, index = item
        flip = sample_seed(self.seed, epoch, index, purpose=1000) % 2  # purpose: any value of this task's own
        image = self.images[index][::-1, ::-1] if flip else self.images[index]
        return np.ascontiguousarray(image), int(self.labels[index])


def _collate(items):
    images = _to_tensor(np.stack([i for i, _ in items]))
    return images, torch.tensor([label for _, label in items]), 0


class BarsTrainLoader(ResumableBatches):
    name = "bars"

    def __init__(self, root: str, *, batch_size: int, rank: int, world_size: int, num_workers: int, seed: int):
        self._samples = _Samples(root, "train", seed)
        self.root, self.batch_size, self.rank, self.world_size = root, batch_size, rank, world_size
        self.num_workers, self.seed = num_workers, seed
        self._collate = _collate
        self._start()

    def __len__(self) -> int:
        return len(self._samples) // self.world_size // self.batch_size

    def _all_batches(self):
        order = epoch_order(len(self._samples), self.seed, self._epoch)
        mine = order[self.rank::self.world_size][:len(self) * self.batch_size].tolist()
        return [mine[b * self.batch_size:(b + 1) * self.batch_size] for b in range(len(self))]

    def _identity(self):
        return {"root": self.root, "images": len(self._samples), "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.batch_size}


class BarsEvalLoader:
    """This rank's share of the validation images, in batches."""

    def __init__(self, root: str, *, batch_size: int, rank: int, world_size: int):
        images, labels = _load(root, "val")
        self.images, self.labels = images[rank::world_size], labels[rank::world_size]
        self.batch_size = batch_size
        self.num_samples = len(self.labels)
        self.description = os.path.join(root, "val.npz")

    def __iter__(self):
        for start in range(0, len(self.labels), self.batch_size):
            yield (_to_tensor(self.images[start:start + self.batch_size]),
                   torch.from_numpy(self.labels[start:start + self.batch_size]))


class Bars(TaskBase):
    throughput_unit = "images"
    config: BarsConfig

    def build_model(self) -> nn.Module:
        from pretrain.classification.task import build_model

        return build_model(self.config)

    def _root(self, world) -> str:
        section = self.config.bars
        if section.generate_demo:
            self.generate_once(section.data_root, lambda: write_bars(section.data_root, self.config.train.seed,
                                                                     section.train_images, section.val_images),
                               world, "bars demo set")
        return section.data_root

    def build_train_loader(self, world):
        return BarsTrainLoader(self._root(world), batch_size=self.config.train.micro_batch_size, rank=world.rank,
                               world_size=world.world_size, num_workers=self.config.loader.num_workers,
                               seed=self.config.train.seed)

    def build_eval_loader(self, world):
        return BarsEvalLoader(self.config.bars.data_root, batch_size=self.config.train.micro_batch_size,
                              rank=world.rank, world_size=world.world_size)

    def prepare_batch(self, batch, device):
        images, labels = batch[0], batch[1]
        return images.to(device), labels.to(device)

    def training_losses(self, model, inputs, targets):
        return {"loss": F.cross_entropy(model(inputs).float(), targets)}

    def build_evaluator(self, device):
        return SumsEvaluator(("correct", "count"), self._sums, self._results, device)

    @staticmethod
    def _sums(logits, labels):
        return {"correct": (logits.argmax(-1) == labels).sum().float(),
                "count": torch.tensor(float(labels.numel()), device=labels.device)}

    @staticmethod
    def _results(sums):
        return {"accuracy": 100 * sums["correct"] / max(sums["count"], 1.0), "samples": sums["count"]}

    def evaluation_step(self, model, inputs, targets, evaluator):
        evaluator.update(model(inputs), targets)

    def input_shape(self):
        return (3, SIZE, SIZE)

    def synthetic_batch(self, device, generator):
        batch = self.config.train.micro_batch_size
        return (torch.randn(batch, 3, SIZE, SIZE, generator=generator).to(device),
                torch.randint(0, 2, (batch,), generator=generator).to(device))


def draw(config: BarsConfig, model: nn.Module, image: Image.Image, **_) -> Image.Image:
    """The image with a frame: red for a predicted horizontal bar, blue for a vertical one."""
    pixels = np.asarray(image.resize((SIZE, SIZE), Image.BILINEAR))
    label = int(model(_to_tensor(pixels[None])).argmax(-1))
    framed = image.copy()
    ImageDraw.Draw(framed).rectangle([0, 0, image.width - 1, image.height - 1],
                                     outline=(255, 0, 0) if label == 0 else (0, 0, 255), width=3)
    return framed


TASK = register_task(TaskSpec(
    name="bars", summary="toy: horizontal vs vertical bars (a task defined outside the project)",
    config_class=BarsConfig, build=Bars, presets={"bars_demo": bars_demo}, demo_preset="bars_demo",
    cluster_preset="bars_demo", path_keys=("bars.data_root",), metrics=("eval/accuracy",),
    data_key="bars.data_root", environment={"UNIREPLKNET_BARS_ROOT": "bars.data_root"},
    real_data_overrides=("bars.generate_demo=false",), write_demo_data=write_bars, predict=draw,
))
