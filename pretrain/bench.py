"""``python -m pretrain bench --config PRESET`` (any task; ``python -m finetune bench`` is the same): the real
training step (same Trainer, engine, ZeRO, precision) on the task's synthetic batch held on the device;
reports samples/s, s/iter, peak memory and achieved TFLOP/s (FLOPs of the UniRepLKNet: the whole classifier, a
dense model's backbone; training counted as 3 x forward, activation recomputation not counted)."""
from __future__ import annotations

import dataclasses
import logging
import tempfile

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import Config, config_from_dict, config_to_dict
from .distributed import all_reduce_sum
from .metrics import Throughput, memory_stats
from .task import Task, build_task
from .trainer import Trainer

__all__ = ["SyntheticData", "bench", "forward_flops_per_sample"]

_logger = logging.getLogger(__name__)


class _RepeatedBatch:
    """A loader-shaped object that hands out one synthetic batch forever (no data loading in the timing)."""

    bad_samples = 0

    def __init__(self, batch, length: int):
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        while True:
            yield self.batch

    def set_epoch(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SyntheticData:
    """A task with its training data replaced by its own synthetic batch, repeated, and no evaluation."""

    def __init__(self, task: Task, device: torch.device, steps: int):
        self._task, self._device, self._steps = task, device, steps

    def __getattr__(self, name: str):
        return getattr(self._task, name)

    def build_train_loader(self, world):
        config = self._task.config
        accumulation = config.train.global_batch_size // (config.train.micro_batch_size * world.world_size)
        batch = self._task.synthetic_batch(self._device, torch.Generator().manual_seed(config.train.seed))
        return _RepeatedBatch(batch, self._steps * max(accumulation, 1))

    def build_eval_loader(self, world):
        return None


def forward_flops_per_sample(task: Task) -> float | None:
    """Forward FLOPs of one sample through the model's UniRepLKNet (the whole classifier, or a dense model's
    backbone), counted on ``meta`` at the task's input shape; None when the model holds no UniRepLKNet."""
    import unireplknet

    with torch.device("meta"):
        model = task.build_model()
        network = next((m for m in model.modules() if isinstance(m, unireplknet.UniRepLKNet)), None)
        if network is None:
            return None
        network.train()
        x = torch.empty(2, *task.input_shape())  # BatchNorm in training mode needs > 1 sample
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            network(x)
    return float(counter.get_total_flops()) / 2


def bench(config: Config, steps: int, warmup: int) -> dict[str, float]:
    """Time ``steps`` optimizer steps after ``warmup`` ones; all ranks take part, rank 0's figures are returned."""
    config = config_from_dict(config_to_dict(config))
    config.checkpoint = dataclasses.replace(config.checkpoint, resume="none")
    config.model = dataclasses.replace(config.model, init_from="")
    device = torch.device("cuda") if (config.launch.device != "cpu" and torch.cuda.is_available()) else torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="pretrain-bench-") as scratch:
        config.run_dir = scratch
        task = build_task(config)
        trainer = Trainer(config, SyntheticData(task, device, steps + warmup))
        try:
            return _time_steps(trainer, task, config, steps, warmup)
        finally:
            trainer.close()


def _time_steps(trainer: Trainer, task: Task, config: Config, steps: int, warmup: int) -> dict[str, float]:
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
    global_samples = all_reduce_sum(torch.tensor([float(throughput.samples)], dtype=torch.float64,
                                                 device=trainer.device)).item()
    unit = task.throughput_unit
    per_s = global_samples / summary["elapsed_s"]
    memory = memory_stats(trainer.device)
    results = {
        "task": config.task,
        "device": torch.cuda.get_device_name() if trainer.device.type == "cuda" else "cpu",
        "world_size": trainer.world.world_size,
        "precision": trainer.precision,
        "zero_stage": config.train.zero_stage,
        "micro_batch_size": config.train.micro_batch_size,
        "accumulation": trainer.grad_accum,
        "input_shape": list(task.input_shape()),
        "grad_checkpointing": config.model.grad_checkpointing,
        f"{unit}_per_s": per_s,
        "step_time_s": summary["step_time_s"],
        "peak_memory_gib": memory.get("gpu_peak_gib", memory["cpu_peak_gib"]),
    }
    flops = forward_flops_per_sample(task)
    if flops is not None:  # training = 3 x forward (backward: input and weight gradients); recomputation not counted
        results.update({"gflops_per_sample": 3 * flops / 1e9, "achieved_tflops": per_s * 3 * flops / 1e12,
                        "achieved_tflops_per_worker": per_s * 3 * flops / 1e12 / trainer.world.world_size})
    return results
