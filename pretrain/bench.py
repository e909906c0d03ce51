"""``python -m pretrain bench``: the real training step (same Trainer, engine, ZeRO, precision) on
synthetic batches held on the device; reports images/s, step time, peak memory, achieved TFLOP/s."""
from __future__ import annotations

import dataclasses
import logging
import tempfile

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import Config
from .distributed import all_reduce_sum
from .metrics import Throughput, memory_stats
from .task import ImageClassification, build_model
from .trainer import Trainer

__all__ = ["SyntheticClassification", "bench", "training_flops_per_image"]

_logger = logging.getLogger(__name__)


class _RepeatedBatch:
    """A loader-shaped object that hands out one random batch forever (no data loading in the timing)."""

    bad_samples = 0

    def __init__(self, config: Config, device: torch.device, length: int):
        size, m = config.data.img_size, config.model
        generator = torch.Generator().manual_seed(config.train.seed)
        self.images = torch.randn(config.train.micro_batch_size, m.in_chans, size, size, generator=generator).to(device)
        self.targets = torch.randint(0, m.num_classes, (config.train.micro_batch_size,), generator=generator).to(device)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        while True:
            yield self.images, self.targets

    def set_epoch(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SyntheticClassification(ImageClassification):
    """Image classification with a synthetic in-memory batch instead of shards (benchmarks)."""

    def __init__(self, config: Config, device: torch.device, steps: int):
        super().__init__(config)
        self.device, self.steps = device, steps

    def build_train_loader(self, world):
        accumulation = self.config.train.global_batch_size // (self.config.train.micro_batch_size * world.world_size)
        return _RepeatedBatch(self.config, self.device, self.steps * max(accumulation, 1))

    def build_eval_loader(self, world):
        return None


def training_flops_per_image(config: Config) -> float:
    """Training FLOPs of one image: 3 x the forward FLOPs (backward = input + weight gradients = 2 x forward),
    counted on ``meta``; activation recomputation is not counted.

    The forward count comes from ``FlopCounterMode``; its backward count is not used because its
    ``convolution_backward`` formula ignores ``groups`` and overcounts depthwise convolutions.
    """
    config = dataclasses.replace(config)
    config.model = dataclasses.replace(config.model, init_from="", grad_checkpointing=False)
    with torch.device("meta"):
        model = build_model(config).train()
        x = torch.empty(2, config.model.in_chans, config.data.img_size, config.data.img_size)  # BN needs > 1
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    return 3.0 * float(counter.get_total_flops()) / 2


def bench(config: Config, steps: int, warmup: int) -> dict[str, float]:
    """Time ``steps`` optimizer steps after ``warmup`` ones; all ranks take part, rank 0's figures are returned."""
    config = dataclasses.replace(config)
    config.checkpoint = dataclasses.replace(config.checkpoint, resume="none")
    config.train = dataclasses.replace(config.train, ema_decay=config.train.ema_decay)
    device = torch.device("cuda") if (config.launch.device != "cpu" and torch.cuda.is_available()) else torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="pretrain-bench-") as scratch:
        config.run_dir = scratch
        trainer = Trainer(config, SyntheticClassification(config, device, steps + warmup))
        try:
            return _time_steps(trainer, config, steps, warmup)
        finally:
            trainer.close()


def _time_steps(trainer: Trainer, config: Config, steps: int, warmup: int) -> dict[str, float]:
    batches = trainer._micro_batches()
    throughput = Throughput()
    with trainer.stop_requests:
        for _ in range(warmup):
            trainer._train_step(batches, throughput)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        throughput.reset()
        for _ in range(steps):
            trainer._train_step(batches, throughput)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
    summary = throughput.summary()
    global_images = all_reduce_sum(torch.tensor([float(throughput.images)], dtype=torch.float64,
                                                device=trainer.device)).item()
    flops = training_flops_per_image(config)
    images_per_s = global_images / summary["elapsed_s"]
    memory = memory_stats(trainer.device)
    return {
        "device": torch.cuda.get_device_name() if trainer.device.type == "cuda" else "cpu",
        "world_size": trainer.world.world_size,
        "precision": trainer.precision,
        "zero_stage": config.train.zero_stage,
        "micro_batch_size": config.train.micro_batch_size,
        "accumulation": trainer.grad_accum,
        "img_size": config.data.img_size,
        "images_per_s": images_per_s,
        "step_time_s": summary["step_time_s"],
        "peak_memory_gib": memory.get("gpu_peak_gib", memory["cpu_peak_gib"]),
        "gflops_per_image": flops / 1e9,
        "achieved_tflops": images_per_s * flops / 1e12,
        "achieved_tflops_per_worker": images_per_s * flops / 1e12 / trainer.world.world_size,
    }
