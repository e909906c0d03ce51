"""Image classification as a :class:`~pretrain.task.Task`: single-label classification from ``shards`` loaders,
cross-entropy with label smoothing (soft-target cross-entropy under mixup/cutmix), top-1/top-5 evaluation."""
from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import WorldInfo, pick_device
from ..task import SumsEvaluator, TaskBase, denormalize
from .config import ClassificationConfig

__all__ = ["ImageClassification", "build_model"]

_logger = logging.getLogger(__name__)


def build_model(config: ClassificationConfig) -> nn.Module:
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


class ImageClassification(TaskBase):
    """Single-label classification from ``shards`` loaders: cross-entropy with label smoothing, or
    soft-target cross-entropy when mixup/cutmix produce soft targets; top-1/top-5 evaluation."""

    throughput_unit = "images"
    eval_sum_names = ("correct1", "correct5", "loss", "count")
    config: ClassificationConfig

    def __init__(self, config: ClassificationConfig):
        super().__init__(config)
        self._train_urls, self._val_urls = config.data.train_urls, config.data.val_urls

    def build_model(self) -> nn.Module:
        return build_model(self.config)

    def _prepare_demo_shards(self, world: WorldInfo) -> None:
        """Generate the demo shards once (rank 0; everyone else waits); then point the urls at them."""
        import shards

        data = self.config.data
        train_dir, val_dir = os.path.join(data.demo_dir, "train"), os.path.join(data.demo_dir, "val")

        def write() -> None:
            for split, folder, count in (("train", train_dir, data.demo_train_samples),
                                         ("val", val_dir, data.demo_val_samples)):
                shards.write_demo(folder, split=split, num_samples=count, seed=self.config.train.seed,
                                  image_size=data.img_size)

        self.generate_once(data.demo_dir, write, world, "demo shards")
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
        device = pick_device(self.config.launch.device, world)  # the trainer's: batches and mixup go there
        return shards.build_train_loader(
            self._train_urls, batch_size=train.micro_batch_size, img_size=data.img_size, rank=world.rank,
            world_size=world.world_size, num_workers=self.config.loader.num_workers, seed=train.seed,
            samples_per_epoch=data.samples_per_epoch, augment=augment, mixup=mixup,
            num_classes=self.config.model.num_classes, device=device, pin_memory=device.type == "cuda")

    def build_eval_loader(self, world: WorldInfo):
        import shards

        if self.config.data.source == "demo" and not self._val_urls:  # an evaluation builds no train loader
            self._prepare_demo_shards(world)
        if not self._val_urls:
            return None
        crop_pct, crop_mode = self.config.data.eval_crop
        return shards.build_eval_loader(
            self._val_urls, batch_size=self.config.train.micro_batch_size, img_size=self.config.data.img_size,
            rank=world.rank, world_size=world.world_size, num_workers=self.config.loader.num_workers,
            crop_pct=crop_pct, crop_mode=crop_mode)

    def prepare_batch(self, batch, device: torch.device):
        images, targets = batch
        memory_format = torch.channels_last if self.config.model.channels_last else torch.contiguous_format
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        return images, targets.to(device, non_blocking=True)

    def training_losses(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": self.loss(model(inputs), targets)}

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

    def input_shape(self) -> tuple[int, ...]:
        size = self.config.data.img_size
        return (self.config.model.in_chans, size, size)

    def synthetic_batch(self, device: torch.device, generator: torch.Generator):
        batch = self.config.train.micro_batch_size
        images = torch.randn(batch, *self.input_shape(), generator=generator)
        targets = torch.randint(0, self.config.model.num_classes, (batch,), generator=generator)
        return images.to(device), targets.to(device)

    def preview(self, inputs: torch.Tensor) -> torch.Tensor:
        return denormalize(inputs)

    def data_bound_hint(self, samples_per_s_needed: float) -> str:
        return (f"raise loader.num_workers (now {self.config.loader.num_workers}), e.g. to the count "
                f"`python -m shards bench URL --img-size {self.config.data.img_size} --target "
                f"{samples_per_s_needed:.0f}` prints")


def preflight(config: ClassificationConfig) -> None:
    """Before any worker starts: the shards exist and have ``info.json`` counts, and their classes fit the
    classifier. Raises ``ConfigError`` naming the key."""
    from ..config import ConfigError

    data = config.data
    if data.source != "shards":
        return
    from shards.info import ShardReadError, resolve_shard_set

    for key in ("train_urls", "val_urls"):
        spec = getattr(data, key)
        if not spec:
            continue
        try:
            shard_set = resolve_shard_set(spec, require_counts=key == "val_urls" or data.samples_per_epoch is None)
        except (FileNotFoundError, ValueError, ShardReadError) as error:
            raise ConfigError(f"data.{key}", str(error)) from error
        if shard_set.classes and len(shard_set.classes) > config.model.num_classes:
            raise ConfigError("model.num_classes", f"expected at least the {len(shard_set.classes)} classes of "
                              f"data.{key} ({spec}), got {config.model.num_classes}")
