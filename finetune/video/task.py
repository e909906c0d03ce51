"""Video classification as a ``pretrain.task.Task``: UniRepLKNet on clips laid out as one map (the authors' memory
reshape by default), trained by the one trainer (every launcher, resume, EMA, TensorBoard), evaluated top-1/top-5
with softmax averaged over each video's views."""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import ConfigError, OptimConfig
from pretrain.distributed import WorldInfo
from pretrain.task import SumsEvaluator, TaskBase, denormalize

from .config import VideoRunConfig
from .data import MEAN, STD, EvalLoader, TrainLoader, check_labels, read_list
from .model import VideoUniRepLKNet, map_shape

__all__ = ["VideoClassification", "build_video_model", "preflight", "topk_sums", "video_probabilities"]

_logger = logging.getLogger(__name__)


def build_video_model(config: VideoRunConfig) -> VideoUniRepLKNet:
    """The UniRepLKNet ``config.model`` names (with its depth/width/kernel overrides), taking clips."""
    import unireplknet

    m, v = config.model, config.video
    depths, dims, kernels = unireplknet.VARIANTS[m.name[len("unireplknet_"):]]
    model = VideoUniRepLKNet(layout=v.layout, rows=v.rows, in_chans=3, num_classes=v.num_classes,
                             depths=m.depths or depths, dims=m.dims or dims,
                             kernel_sizes=m.kernel_sizes or (kernels if m.depths is None else None),
                             drop_path_rate=m.drop_path_rate, head_init_scale=m.head_init_scale)
    if m.init_from:
        state = unireplknet.read_state_dict(m.init_from)
        ignore_head = "head.weight" in state and tuple(state["head.weight"].shape) != tuple(model.head.weight.shape)
        unireplknet.load_official(model, state, ignore_head=ignore_head)
        _logger.info("initialized from %s%s", m.init_from, " (new classifier)" if ignore_head else "")
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.set_fused_branches(m.fused_branches)
    return model


def video_probabilities(model: nn.Module, views: torch.Tensor, chunk: int) -> torch.Tensor:
    """``(B, V, 3, T, H, W)`` views -> ``(B, K)`` softmax averaged over each video's V views (forward passes of at
    most ``chunk`` clips)."""
    b, v = views.shape[:2]
    flat = views.flatten(0, 1)
    logits = torch.cat([model(flat[i:i + chunk]).float() for i in range(0, len(flat), chunk)])
    return logits.softmax(dim=-1).view(b, v, -1).mean(dim=1)


LOSS_GRID = 2.0 ** 24
"""Evaluation loss terms are multiples of ``2**-24`` (each below 28, so sums stay exact below 2**29)."""


def topk_sums(probabilities: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-batch sums of top-1 and top-5 hits, the negative log of the true class's averaged probability, count.
    Each log term is rounded to a multiple of ``1 / LOSS_GRID``, so its float64 sums are exact and the totals do
    not depend on how the videos are batched or split over ranks."""
    top = probabilities.topk(min(5, probabilities.shape[-1]), dim=-1).indices
    hits = top == labels[:, None]
    true = probabilities.gather(1, labels[:, None]).squeeze(1)
    return {"correct1": hits[:, 0].sum().double(), "correct5": hits.any(dim=-1).sum().double(),
            "loss": (torch.round(-true.clamp_min(1e-12).double().log() * LOSS_GRID) / LOSS_GRID).sum(),
            "count": torch.tensor(float(labels.numel()), dtype=torch.float64, device=labels.device)}


def topk_results(sums: dict[str, float]) -> dict[str, float]:
    count = max(sums["count"], 1.0)
    return {"top1": 100.0 * sums["correct1"] / count, "top5": 100.0 * sums["correct5"] / count,
            "loss": sums["loss"] / count, "samples": sums["count"]}


class VideoClassification(TaskBase):
    """Clip classification on the Kinetics list layout (or the generated demo clips)."""

    throughput_unit = "clips"
    config: VideoRunConfig

    def __init__(self, config: VideoRunConfig):
        super().__init__(config)
        self.section = config.video

    def build_model(self) -> nn.Module:
        return build_video_model(self.config)

    def build_param_groups(self, model: nn.Module, config: OptimConfig) -> list[dict]:
        """The authors' layer-wise decay (``video.layer_decay_layers`` groups: stem 0, stage 0: 1, stage 1 and its
        downsample: 2, downsample 2: 3, stage-2 block b: 3 + b // 3, stage 3 and its downsample: N, the rest
        N + 1), lr x ``decay ** (N + 1 - id)``: the dense tasks' rule on the backbone's names."""
        from pretrain.optim import build_param_groups

        from ..dense import layer_id_for_dense, lr_scale_for_dense

        layers = self.section.layer_decay_layers

        def layer_scale(name: str) -> tuple[int, float]:
            layer = layer_id_for_dense(f"backbone.{name}", layers)
            return layer, lr_scale_for_dense(layer, layers, config.layer_decay)

        return build_param_groups(model, config, layer_scale=layer_scale)

    def _root(self, world: WorldInfo) -> str:
        root = self.section.data_root
        if self.section.generate_demo:
            from .demo_data import write_demo

            self.generate_once(root, lambda: write_demo(root, seed=self.config.train.seed), world, "video demo set")
        return root

    def build_train_loader(self, world: WorldInfo) -> TrainLoader:
        videos = read_list(self._root(world), "train")
        check_labels(videos, self.section.num_classes)
        return TrainLoader(videos, self.section, batch_size=self.config.train.micro_batch_size, rank=world.rank,
                           world_size=world.world_size, num_workers=self.config.loader.num_workers,
                           seed=self.config.train.seed, label_smoothing=self.config.train.label_smoothing)

    def build_eval_loader(self, world: WorldInfo) -> EvalLoader:
        videos = read_list(self._root(world), "val")
        check_labels(videos, self.section.num_classes)
        return EvalLoader(videos, self.section, batch_size=self._eval_videos_per_batch(), rank=world.rank,
                          world_size=world.world_size, num_workers=self.config.loader.num_workers)

    def _eval_videos_per_batch(self) -> int:
        return max(1, self.config.train.micro_batch_size // self.section.repeated_aug)

    def prepare_batch(self, batch, device: torch.device):
        clips, targets = batch
        return clips.to(device, non_blocking=True), targets.to(device, non_blocking=True)

    def training_losses(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = model(inputs)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if targets.is_floating_point():  # soft targets of mixup/cutmix (label smoothing folded in)
            return {"loss": torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()}
        return {"loss": F.cross_entropy(logits, targets, label_smoothing=self.config.train.label_smoothing)}

    def build_evaluator(self, device: torch.device) -> SumsEvaluator:
        return SumsEvaluator(("correct1", "correct5", "loss", "count"), topk_sums, topk_results, device)

    def evaluation_step(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, evaluator) -> None:
        evaluator.update(video_probabilities(model, inputs, self.config.train.micro_batch_size), targets)

    def input_shape(self) -> tuple[int, ...]:
        """The backbone's input: the laid-out map of one clip."""
        v = self.section
        return (3, *map_shape(v.num_frames, v.input_size, v.input_size, v.rows))

    def clip_shape(self) -> tuple[int, ...]:
        v = self.section
        return (3, v.num_frames, v.input_size, v.input_size)

    def synthetic_batch(self, device: torch.device, generator: torch.Generator):
        batch = self.config.train.micro_batch_size
        clips = torch.randn(batch, *self.clip_shape(), generator=generator)
        targets = torch.randint(0, self.section.num_classes, (batch,), generator=generator)
        return clips.to(device), targets.to(device)

    def dummy_input(self, device: torch.device) -> None:
        return None  # ZeRO-3 is refused at config time

    def preview(self, inputs: torch.Tensor) -> torch.Tensor:
        """A frame grid: up to 8 clips (rows) x their frames (columns), de-normalized."""
        clips = inputs[:8].detach().float().cpu()
        b, c, t, h, w = clips.shape
        frames = denormalize(clips.transpose(1, 2).reshape(b * t, c, h, w), list(MEAN), list(STD))
        return frames.view(b, t, c, h, w).permute(0, 2, 3, 1, 4).reshape(b, c, h, t * w)

    def data_bound_hint(self, samples_per_s_needed: float) -> str:
        return (f"raise loader.num_workers (now {self.config.loader.num_workers}) until the loader delivers "
                f"{samples_per_s_needed:.0f} clips/s per rank (decoding dominates)")


def preflight(config: VideoRunConfig) -> None:
    """Before any worker starts: ``video.data_root`` holds both lists and their labels fit ``video.num_classes``,
    unless the demo set is to be generated there. Raises ``ConfigError`` naming the key."""
    if config.video.generate_demo:
        return
    for split in ("train", "val"):
        try:
            videos = read_list(config.video.data_root, split)
        except (FileNotFoundError, ValueError, OSError) as error:
            raise ConfigError("video.data_root", str(error)) from None
        try:
            check_labels(videos, config.video.num_classes)
        except ValueError as error:
            raise ConfigError("video.num_classes", str(error).removeprefix("video.num_classes: ")) from None
