"""What the one training loop needs from a problem: model, data, loss, evaluation.

Image classification (pretraining, the 22K -> 1K fine-tune) is :class:`ImageClassification`;
detection and segmentation fine-tuning plug in by implementing the same :class:`Task` protocol.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config, OptimConfig
from .distributed import WorldInfo, all_reduce_sum, barrier

__all__ = ["Evaluator", "ImageClassification", "SumsEvaluator", "Task", "build_model", "build_task", "denormalize",
           "preflight_task"]

_logger = logging.getLogger(__name__)


class Evaluator(Protocol):
    """Accumulates one evaluation pass; :meth:`compute` does its own collectives (every rank calls it
    once, with whatever it saw) and returns the same metrics on every rank, ``samples`` among them."""

    def reset(self) -> None: ...

    def update(self, outputs: Any, targets: Any) -> None: ...

    def compute(self, world: WorldInfo) -> dict[str, float]: ...


class Task(Protocol):
    """The pluggable parts of training. Loaders follow the ``shards`` contract: ``set_epoch``,
    ``len`` (micro-batches per epoch, equal on all ranks), ``state_dict``/``load_state_dict``,
    ``bad_samples``; an eval loader may hold a different number of batches on each rank."""

    def build_model(self) -> nn.Module: ...

    def build_param_groups(self, model: nn.Module, config: OptimConfig) -> list[dict]:
        """Optimizer groups (``pretrain.optim.build_param_groups`` with the task's layer-decay rule)."""

    def build_train_loader(self, world: WorldInfo) -> Any: ...

    def build_eval_loader(self, world: WorldInfo) -> Iterable | None: ...

    def prepare_batch(self, batch: Any, device: torch.device) -> tuple[Any, Any]:
        """(inputs for the model, targets) on ``device``."""

    def training_losses(self, model: nn.Module, inputs: Any, targets: Any) -> dict[str, torch.Tensor]:
        """The task's training step up to backward: named loss terms whose sum is minimized (each is logged)."""

    def batch_size(self, inputs: Any) -> int:
        """Images in ``inputs`` (for throughput)."""

    def build_evaluator(self, device: torch.device) -> Evaluator: ...

    def evaluation_step(self, model: nn.Module, inputs: Any, targets: Any, evaluator: Evaluator) -> None:
        """Predict (whole image, sliding windows, test-time augmentation: the task's choice) and update."""

    def dummy_input(self, device: torch.device) -> torch.Tensor | None:
        """A one-sample input for ranks that ran out of evaluation data while others still run (ZeRO-3
        forward passes are collective); None for tasks that refuse ZeRO-3."""

    def preview(self, inputs: Any) -> torch.Tensor:
        """Inputs turned back into displayable images in [0, 1] (N, 3, H, W)."""


def build_task(config: Config) -> Task:
    """The task ``config.task`` names."""
    if config.task == "ade20k":
        from finetune.ade20k.task import Ade20kSegmentation

        return Ade20kSegmentation(config)
    if config.task == "coco":
        from finetune.coco.task import CocoInstanceSegmentation

        return CocoInstanceSegmentation(config)
    if config.task != "classification":
        raise ValueError(f"task: {config.task!r} is not available")
    return ImageClassification(config)


def preflight_task(config: Config) -> None:
    """The task's own input checks (a dense task's data layout), run by the launch before any worker starts or
    any model is built: ``ConfigError`` naming the key. Classification's shards are checked by the launch."""
    if config.task == "ade20k":
        from finetune.ade20k.task import preflight
    elif config.task == "coco":
        from finetune.coco.task import preflight
    else:
        return
    preflight(config)


def denormalize(images: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """ImageNet-normalized (N, 3, H, W) back to [0, 1]."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    images = images.detach().float().cpu()[:, :3]
    mean = torch.tensor(mean or IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(std or IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


class SumsEvaluator:
    """Per-batch sums (from ``sums(outputs, targets)``), summed over batches and then over ranks in one
    all-reduce, turned into metrics by ``results(sums)``."""

    def __init__(self, names: tuple[str, ...], sums, results, device: torch.device):
        self.names, self._sums, self._results, self.device = names, sums, results, device
        self.reset()

    def reset(self) -> None:
        self.totals = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)

    def update(self, outputs: Any, targets: Any) -> None:
        batch = self._sums(outputs, targets)
        self.totals += torch.stack([batch[n].double() for n in self.names])

    def compute(self, world: WorldInfo) -> dict[str, float]:
        totals = all_reduce_sum(self.totals.clone())
        return self._results(dict(zip(self.names, totals.tolist())))


def build_model(config: Config) -> nn.Module:
    """The timm model named by ``config.model``, with optional depth/width/kernel overrides and init weights."""
    import timm
    import unireplknet

    m = config.model
    overrides = {k: getattr(m, k) for k in ("depths", "dims", "kernel_sizes") if getattr(m, k) is not None}
    if overrides:
        model = unireplknet.UniRepLKNet(
            in_chans=m.in_chans, num_classes=m.num_classes, drop_path_rate=m.drop_path_rate,
            head_init_scale=m.head_init_scale,
            depths=overrides.get("depths", unireplknet.VARIANTS[m.name[len("unireplknet_"):]][0]),
            dims=overrides.get("dims", unireplknet.VARIANTS[m.name[len("unireplknet_"):]][1]),
            kernel_sizes=overrides.get("kernel_sizes"))
    else:
        model = timm.create_model(m.name, num_classes=m.num_classes, in_chans=m.in_chans,
                                  drop_path_rate=m.drop_path_rate, head_init_scale=m.head_init_scale)
    if m.init_from:
        head = model.get_classifier()
        state = unireplknet.read_state_dict(m.init_from)
        ignore_head = "head.weight" in state and tuple(state["head.weight"].shape) != tuple(head.weight.shape)
        unireplknet.load_official(model, state, ignore_head=ignore_head)
        _logger.info("initialized from %s%s", m.init_from, " (new classifier)" if ignore_head else "")
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.set_fused_branches(m.fused_branches)
    return model


class ImageClassification:
    """Single-label classification from ``shards`` loaders: cross-entropy with label smoothing, or
    soft-target cross-entropy when mixup/cutmix produce soft targets; top-1/top-5 evaluation."""

    eval_sum_names = ("correct1", "correct5", "loss", "count")

    def __init__(self, config: Config):
        self.config = config
        self._train_urls, self._val_urls = config.data.train_urls, config.data.val_urls

    def build_model(self) -> nn.Module:
        return build_model(self.config)

    def build_param_groups(self, model: nn.Module, config: OptimConfig) -> list[dict]:
        from .optim import build_param_groups

        return build_param_groups(model, config)

    def _prepare_demo_shards(self, world: WorldInfo) -> None:
        """Generate the demo shards once (rank 0), everyone else waits; then point the urls at them."""
        import shards

        data = self.config.data
        train_dir, val_dir = os.path.join(data.demo_dir, "train"), os.path.join(data.demo_dir, "val")
        done = os.path.join(data.demo_dir, "COMPLETE")
        if world.is_main and not os.path.isfile(done):
            _logger.info("generating demo shards in %s", data.demo_dir)
            for split, folder, count in (("train", train_dir, data.demo_train_samples),
                                         ("val", val_dir, data.demo_val_samples)):
                shards.write_demo(folder, split=split, num_samples=count, seed=self.config.train.seed,
                                  image_size=data.img_size)
            with open(done, "w") as f:
                f.write("ok\n")
        barrier()
        self._train_urls, self._val_urls = train_dir, val_dir

    def build_train_loader(self, world: WorldInfo):
        import shards

        data, train = self.config.data, self.config.train
        if data.source == "demo":
            self._prepare_demo_shards(world)
        augment = shards.AugmentConfig(auto_augment=data.auto_augment or None, reprob=data.random_erasing,
                                       scale=(data.crop_scale_min, 1.0), hflip=data.hflip,
                                       color_jitter=data.color_jitter or None)
        mixup = shards.MixupConfig(mixup_alpha=data.mixup_alpha, cutmix_alpha=data.cutmix_alpha,
                                   label_smoothing=train.label_smoothing) if data.uses_mixup else None
        from .trainer import pick_device

        device = pick_device(self.config.launch.device, world)  # the trainer's: batches and mixup go there
        return shards.build_train_loader(
            self._train_urls, batch_size=train.micro_batch_size, img_size=data.img_size, rank=world.rank,
            world_size=world.world_size, num_workers=data.num_workers, seed=train.seed,
            samples_per_epoch=data.samples_per_epoch, augment=augment, mixup=mixup,
            num_classes=self.config.model.num_classes, device=device, pin_memory=device.type == "cuda")

    def build_eval_loader(self, world: WorldInfo):
        import shards

        if not self._val_urls:
            return None
        crop_pct, crop_mode = self.config.data.eval_crop
        return shards.build_eval_loader(
            self._val_urls, batch_size=self.config.train.micro_batch_size, img_size=self.config.data.img_size,
            rank=world.rank, world_size=world.world_size, num_workers=self.config.data.num_workers,
            crop_pct=crop_pct, crop_mode=crop_mode)

    def prepare_batch(self, batch, device: torch.device):
        images, targets = batch
        memory_format = torch.channels_last if self.config.model.channels_last else torch.contiguous_format
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        return images, targets.to(device, non_blocking=True)

    def training_losses(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": self.loss(model(inputs), targets)}

    def batch_size(self, inputs: torch.Tensor) -> int:
        return inputs.shape[0]

    def build_evaluator(self, device: torch.device) -> SumsEvaluator:
        return SumsEvaluator(self.eval_sum_names, self.eval_sums, self.eval_results, device)

    def evaluation_step(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                        evaluator: SumsEvaluator) -> None:
        evaluator.update(model(inputs), targets)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = outputs.to(torch.promote_types(outputs.dtype, torch.float32))  # bf16 -> fp32; fp64 stays
        if targets.is_floating_point():
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=self.config.train.label_smoothing)

    def eval_sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = outputs.float()
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top5 == targets[:, None]
        return {
            "correct1": hits[:, 0].sum().float(),
            "correct5": hits.any(dim=-1).sum().float(),
            "loss": F.cross_entropy(logits, targets, reduction="sum"),
            "count": torch.tensor(float(targets.numel()), device=logits.device),
        }

    def eval_results(self, sums: dict[str, float]) -> dict[str, float]:
        count = max(sums["count"], 1.0)
        return {"top1": 100.0 * sums["correct1"] / count, "top5": 100.0 * sums["correct5"] / count,
                "loss": sums["loss"] / count, "samples": sums["count"]}

    def dummy_input(self, device: torch.device) -> torch.Tensor:
        size = self.config.data.img_size
        return torch.zeros(1, self.config.model.in_chans, size, size, device=device)

    def preview(self, inputs: torch.Tensor) -> torch.Tensor:
        return denormalize(inputs)
