"""``python -m finetune bench --config PRESET``: one rank's training step of a dense preset at its recipe's
per-GPU batch on synthetic inputs: seconds per iteration and peak accelerator memory.

What it runs is the task's own model and loss (activation checkpointing, BatchNorm, the preset's precision:
bf16 autocast on GPU) with AdamW over the task's parameter groups, without DeepSpeed, at the preset's
training input size: COCO images of ``max_size`` x the largest train scale padded to 32 with ``--objects``
instances each, ADE20K crops of ``crop_size``. The figure answers "does XL fit an 80 GB GPU at 2 images".
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

__all__ = ["bench_dense", "synthetic_batch"]


def synthetic_batch(config, device: torch.device, objects: int = 8, seed: int = 0):
    """(inputs, targets) in the task's training format at the preset's largest training size."""
    generator = torch.Generator().manual_seed(seed)
    batch = config.train.micro_batch_size
    if config.task == "ade20k":
        size = config.ade20k.crop_size
        images = torch.randn(batch, 3, size, size, generator=generator)
        labels = torch.randint(0, config.ade20k.num_classes, (batch, size, size), generator=generator)
        return images.to(device), labels.to(device)
    coco = config.coco
    short = max(coco.train_scales)
    long = min(coco.max_size, round(short * 4 / 3))
    height, width = (math.ceil(v / coco.size_divisor) * coco.size_divisor for v in (short, long))
    images = torch.randn(batch, 3, height, width, generator=generator)
    targets = []
    for _ in range(batch):
        corners = torch.rand(objects, 2, generator=generator) * torch.tensor([width * 0.7, height * 0.7])
        extent = (torch.rand(objects, 2, generator=generator) * 0.25 + 0.05) * torch.tensor([width, height])
        boxes = torch.cat([corners, corners + extent], dim=1).round()
        masks = torch.zeros(objects, height, width, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[k, y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(0, coco.num_classes, (objects,),
                                                                            generator=generator).to(device),
                        "masks": masks.to(device), "image_size": (height, width)})
    return images.to(device), targets


def bench_dense(preset: str, overrides: list[str], steps: int, warmup: int, objects: int) -> dict:
    from pretrain.config import load_config
    from pretrain.task import build_task

    config = load_config(preset, ["model.init_from=", *overrides])
    if config.task not in ("coco", "ade20k"):
        raise ValueError(f"{preset}: task={config.task}; bench covers the dense tasks (coco, ade20k)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = build_task(config)
    model = task.build_model().to(device)
    if config.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(task.build_param_groups(model, config.optim), lr=config.optim.lr)
    bf16 = config.train.precision == "bf16" or (config.train.precision == "auto" and device.type == "cuda")
    inputs, targets = synthetic_batch(config, device, objects)
    model.train()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            losses = task.training_losses(model, inputs, targets)
        loss = sum(losses.values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - started)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{preset}: loss {loss.item()} at step {step}")
    shape = list(inputs.shape)
    return {"preset": preset, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "batch_per_gpu": config.train.micro_batch_size, "input": shape, "precision": "bf16" if bf16 else "fp32",
            "grad_checkpointing": config.model.grad_checkpointing,
            "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "s_per_iter": round(statistics.median(times), 4),
            "images_per_s": round(config.train.micro_batch_size / statistics.median(times), 2),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
            "losses": {k: round(float(v), 4) for k, v in losses.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a coco or ade20k preset, e.g. coco_xl_cascade_3x")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--objects", type=int, default=8, help="COCO: instances per synthetic image")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    print(json.dumps(bench_dense(args.config, args.overrides, args.steps, args.warmup, args.objects)))
    return 0
