"""Typed, validated run configuration: dataclasses, recipes as functions, ``--set`` overrides, dump.

A run is described by one :class:`Config`. Recipes (presets) are plain functions returning a
``Config``; ``--set section.key=value`` overrides are parsed against the field's annotation, and
:func:`validate` checks every value before anything is built. Every error is a
:class:`ConfigError` whose message starts with the dotted key and says what was expected.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

__all__ = [
    "Ade20kConfig",
    "CheckpointConfig",
    "CocoConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LaunchConfig",
    "ModelConfig",
    "OptimConfig",
    "PRESETS",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
    "validate",
]


class ConfigError(ValueError):
    """A configuration value is wrong; the message starts with the dotted key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Which network to train and how it is built."""

    name: str = "unireplknet_a"
    """timm model name (``unireplknet_a`` ... ``unireplknet_xl``)."""
    num_classes: int = 1000
    """Classifier outputs (21841 for ImageNet-22K, 1000 for ImageNet-1K)."""
    in_chans: int = 3
    """Input channels."""
    drop_path_rate: float = 0.0
    """Stochastic depth, linearly increasing over blocks up to this value."""
    head_init_scale: float = 1.0
    """Multiplies the initial classifier weights (0.001 for the 22K -> 1K fine-tune)."""
    depths: tuple[int, ...] | None = None
    """Override the variant's blocks per stage (small test networks)."""
    dims: tuple[int, ...] | None = None
    """Override the variant's channels per stage."""
    kernel_sizes: tuple[tuple[int, ...], ...] | None = None
    """Override the variant's depthwise kernel size per block, per stage."""
    init_from: str = ""
    """Weights to start from: an exported or official ``.pth`` (classifier skipped when its shape differs)."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in backward (saves memory at XL/384)."""
    channels_last: bool = False
    """Feed inputs in NHWC memory format (convolutions then run and return NHWC; parameters stay contiguous)."""
    sync_batchnorm: bool = False
    """Convert BatchNorm to SyncBatchNorm (GPU only); buffers are averaged across ranks regardless."""
    fused_branches: bool = False
    """Run each Dilated Reparam Block's branches as one grouped conv + one batch norm (same function)."""

    def validate(self) -> None:
        _off_words_to_empty(self, "init_from")
        if self.fused_branches and self.sync_batchnorm:
            raise ConfigError("fused_branches", "expected false with model.sync_batchnorm=true (the fused "
                              "branches use one plain batch norm, which would drop the cross-rank statistics)")
        if not self.name.startswith("unireplknet_"):
            raise ConfigError("name", f"expected a unireplknet_* model name, got {self.name!r}")
        _positive("num_classes", self.num_classes)
        _positive("in_chans", self.in_chans)
        _in_range("drop_path_rate", self.drop_path_rate, 0.0, 1.0, upper_open=True)
        if self.head_init_scale <= 0:
            raise ConfigError("head_init_scale", f"expected > 0, got {self.head_init_scale}")
        for key in ("depths", "dims"):
            value = getattr(self, key)
            if value is not None and (len(value) != 4 or min(value) <= 0):
                raise ConfigError(key, f"expected 4 positive integers, got {value}")
        if self.kernel_sizes is not None:
            if len(self.kernel_sizes) != 4:
                raise ConfigError("kernel_sizes", f"expected 4 stages, got {len(self.kernel_sizes)}")
            if self.depths is not None and tuple(len(k) for k in self.kernel_sizes) != tuple(self.depths):
                raise ConfigError("kernel_sizes", f"expected one kernel size per block (depths {self.depths})")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the images come from and how they are augmented."""

    source: Literal["shards", "demo"] = "shards"
    """``shards``: read ``train_urls``/``val_urls``; ``demo``: generate small shards under ``demo_dir`` first."""
    train_urls: str = ""
    """Training shards (brace pattern, directory or list file understood by ``shards``)."""
    val_urls: str = ""
    """Validation shards; empty disables evaluation."""
    demo_dir: str = "data/demo"
    """With ``source=demo``: where the generated shards live (created once, then reused)."""
    demo_train_samples: int = 4096
    """With ``source=demo``: training images to generate."""
    demo_val_samples: int = 1000
    """With ``source=demo``: validation images to generate."""
    img_size: int = 224
    """Training and evaluation resolution."""
    eval_crop_pct: float | None = None
    """Evaluation: resize to ``img_size / eval_crop_pct``, then crop ``img_size``. None: the authors'
    protocol (their ``datasets.py``): at ``img_size >= 384`` warp the image to img_size x img_size
    (crop 1.0, squash), below that resize the shorter side to img_size / 0.875 and center-crop."""
    eval_incomplete: Literal["error", "warn"] = "error"
    """When an evaluation scored fewer samples than ``data.val_urls`` holds (damaged shards or images):
    ``error`` stops the run naming the shortfall, ``warn`` logs it loudly and goes on."""
    eval_crop_mode: Literal["center", "squash"] | None = None
    """Evaluation resize: ``center`` keeps the aspect ratio (shorter side), ``squash`` warps to a square.
    None: follows ``eval_crop_pct`` / the authors' protocol (squash at >= 384)."""
    num_workers: int = 8
    """Loader worker processes per rank."""
    samples_per_epoch: int | None = None
    """Nominal epoch length (all ranks together); default: the shards' sample count."""
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    """timm RandAugment policy; empty for none."""
    random_erasing: float = 0.25
    """Random erasing probability."""
    crop_scale_min: float = 0.08
    """Smallest area fraction of the random resized crop."""
    hflip: float = 0.5
    """Horizontal flip probability."""
    color_jitter: float = 0.4
    """Colour jitter strength, used only without ``auto_augment`` (0 disables)."""
    mixup_alpha: float = 0.8
    """Mixup alpha (0 disables)."""
    cutmix_alpha: float = 1.0
    """CutMix alpha (0 disables)."""

    def validate(self) -> None:
        _off_words_to_empty(self, "auto_augment", "val_urls")
        if self.auto_augment:
            _check_auto_augment(self.auto_augment)
        if self.source == "demo" and not self.demo_dir:
            raise ConfigError("demo_dir", "expected a directory for the generated demo shards")
        _positive("demo_train_samples", self.demo_train_samples)
        _positive("demo_val_samples", self.demo_val_samples)
        if self.img_size < 32 or self.img_size % 32:
            raise ConfigError("img_size", f"expected a multiple of 32 (the network's stride), got {self.img_size}")
        if self.num_workers < 0:
            raise ConfigError("num_workers", f"expected >= 0, got {self.num_workers}")
        if self.eval_crop_pct is not None:
            _in_range("eval_crop_pct", self.eval_crop_pct, 0.0, 1.0, lower_open=True)
        if self.samples_per_epoch is not None:
            _positive("samples_per_epoch", self.samples_per_epoch)
        _in_range("random_erasing", self.random_erasing, 0.0, 1.0)
        _in_range("crop_scale_min", self.crop_scale_min, 0.0, 1.0, lower_open=True)
        _in_range("hflip", self.hflip, 0.0, 1.0)
        if self.color_jitter < 0:
            raise ConfigError("color_jitter", f"expected >= 0, got {self.color_jitter}")
        for key in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"expected >= 0, got {getattr(self, key)}")

    @property
    def eval_crop(self) -> tuple[float, str]:
        """``(crop_pct, crop_mode)`` of the evaluation transform (see ``eval_crop_pct``)."""
        warp = self.img_size >= 384
        crop_pct = self.eval_crop_pct if self.eval_crop_pct is not None else (1.0 if warp else 0.875)
        crop_mode = self.eval_crop_mode or ("squash" if warp and self.eval_crop_pct is None else "center")
        return crop_pct, crop_mode

    @property
    def uses_mixup(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """Optimizer and learning-rate schedule (per optimizer step)."""

    name: Literal["adamw", "lamb"] = "adamw"
    """``adamw`` (fused on GPU, NVIDIA apex FusedAdam when installed) or ``lamb`` (apex, DeepSpeed or timm)."""
    lr: float = 4e-3
    """Peak learning rate (for the whole global batch)."""
    min_lr: float = 1e-6
    """Learning rate at the end of the cosine."""
    warmup_epochs: float = 5.0
    """Linear warmup length in epochs (converted to steps)."""
    weight_decay: float = 0.05
    """Decoupled weight decay; never applied to norms, biases, layer scale or GRN."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    layer_decay: float = 1.0
    """Layer-wise lr decay from the model's group_matcher (1.0 = off; 0.8 for the 22K -> 1K fine-tune)."""
    clip_grad: float | None = None
    """Clip the global gradient norm to this value (None: no clipping)."""
    schedule: Literal["cosine", "multistep", "poly"] = "cosine"
    """``cosine`` to ``min_lr``; ``multistep``: x ``gamma`` at each of ``milestones`` (mmdet's step policy);
    ``poly``: ``(lr - min_lr) * (1 - t/T) ** power + min_lr`` (mmseg's poly policy)."""
    warmup_steps: int | None = None
    """Linear warmup in optimizer steps (iterations); overrides ``warmup_epochs`` when set."""
    warmup_ratio: float | None = None
    """Warmup starts at ``lr * warmup_ratio`` and rises linearly (mmcv's linear warmup; None: the cosine
    schedule's ``(t+1)/warmup`` ramp). COCO 3x: 0.001; ADE20K: 1e-6."""
    milestones: tuple[float, ...] = ()
    """``multistep``: the epochs at which the lr drops (COCO 3x: 27, 33 of 36)."""
    gamma: float = 0.1
    """``multistep``: the factor at each milestone."""
    power: float = 1.0
    """``poly``: the exponent."""
    layer_decay_layers: int = 12
    """Dense tasks (``task=coco|ade20k``): the authors' ``num_layers`` of their layer-wise decay (12; 9 for T)."""

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError("lr", f"expected > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError("min_lr", f"expected between 0 and optim.lr ({self.lr}), got {self.min_lr}")
        if self.warmup_epochs < 0:
            raise ConfigError("warmup_epochs", f"expected >= 0, got {self.warmup_epochs}")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", f"expected >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"expected two values in [0, 1), got {self.betas}")
        if self.eps <= 0:
            raise ConfigError("eps", f"expected > 0, got {self.eps}")
        _in_range("layer_decay", self.layer_decay, 0.0, 1.0, lower_open=True)
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError("clip_grad", f"expected > 0 or none, got {self.clip_grad}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError("warmup_steps", f"expected >= 0 or none, got {self.warmup_steps}")
        if self.warmup_ratio is not None:
            _in_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0, lower_open=True)
        if self.schedule == "multistep":
            if not self.milestones or list(self.milestones) != sorted(self.milestones) or min(self.milestones) <= 0:
                raise ConfigError("milestones", f"expected increasing positive epochs with optim.schedule=multistep, "
                                  f"got {list(self.milestones)}")
        _in_range("gamma", self.gamma, 0.0, 1.0, lower_open=True)
        if self.power <= 0:
            raise ConfigError("power", f"expected > 0, got {self.power}")
        _positive("layer_decay_layers", self.layer_decay_layers)


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """The training loop: length, batch, precision, ZeRO stage, loss, EMA, logging and eval cadence."""

    epochs: int = 90
    """Schedule length in epochs."""
    steps: int | None = None
    """Schedule length in optimizer steps (iterations, as the dense recipes count: 160k); overrides ``epochs``."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (the schedule still spans ``epochs`` / ``steps``)."""
    global_batch_size: int = 4096
    """Images per optimizer step over all ranks; accumulation = global / (micro x world size)."""
    micro_batch_size: int = 32
    """Images per rank per forward pass."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage: 1 (optimizer states), 2 (+ gradients), 3 (+ parameters); 0 for none (LAMB)."""
    precision: Literal["auto", "bf16", "fp32", "fp64"] = "auto"
    """``auto``: bf16 autocast on GPU, fp32 on CPU. BatchNorm weights and buffers stay fp32. ``fp64``:
    model, inputs and losses in float64 (numerical checks; DeepSpeed keeps fp32 master weights)."""
    label_smoothing: float = 0.1
    """Label smoothing (folded into the soft targets when mixup is on)."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights with this decay (None: off)."""
    seed: int = 0
    """Seed for model init, loader shuffling and per-rank drop path."""
    deterministic: bool = False
    """Ask torch for deterministic kernels (slower on GPU; exact resume on CPU holds without it)."""
    log_every: int = 50
    """Steps between log lines and TensorBoard scalars."""
    eval_every: int = 0
    """Steps between evaluations (0: only at the end)."""

    def validate(self) -> None:
        _positive("epochs", self.epochs)
        if self.steps is not None:
            _positive("steps", self.steps)
        if self.max_steps is not None:
            _positive("max_steps", self.max_steps)
        _positive("global_batch_size", self.global_batch_size)
        _positive("micro_batch_size", self.micro_batch_size)
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError("global_batch_size", f"expected a multiple of train.micro_batch_size "
                              f"({self.micro_batch_size}), got {self.global_batch_size}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("zero_stage", f"expected one of 0, 1, 2, 3, got {self.zero_stage}")
        _in_range("label_smoothing", self.label_smoothing, 0.0, 1.0, upper_open=True)
        if self.ema_decay is not None:
            _in_range("ema_decay", self.ema_decay, 0.0, 1.0, lower_open=True, upper_open=True)
        _positive("log_every", self.log_every)
        if self.eval_every < 0:
            raise ConfigError("eval_every", f"expected >= 0, got {self.eval_every}")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """When to save and what to resume from."""

    every: int = 1000
    """Steps between checkpoints (one is always written at the end and on preemption)."""
    keep: int = 3
    """Keep the newest ``keep`` checkpoints."""
    resume: str = "latest"
    """``latest``: continue from the run directory's latest checkpoint if any; ``none``; or a checkpoint folder."""

    def validate(self) -> None:
        _positive("every", self.every)
        _positive("keep", self.keep)
        if not self.resume:
            raise ConfigError("resume", "expected 'latest', 'none' or a checkpoint folder")


@dataclass(kw_only=True, slots=True)
class LaunchConfig:
    """How many workers run the loop, and started by whom."""

    launcher: Literal["local", "torchrun", "ray"] = "local"
    """``local``: this process; ``torchrun``: a child torchrun on this node; ``ray``: Ray Train TorchTrainer."""
    num_workers: int = 1
    """Workers (ranks) in all, for ``torchrun`` (over ``launch.nodes`` nodes) and ``ray``."""
    nodes: int = 1
    """torchrun: nodes taking part; start the same command on each (``num_workers / nodes`` ranks per node)."""
    rdzv_endpoint: str = ""
    """torchrun with ``nodes > 1``: ``host:port`` of the c10d rendezvous (a port on the first node)."""
    rdzv_id: str = ""
    """torchrun with ``nodes > 1``: the job's rendezvous id (default: ``SLURM_JOB_ID``, else the run directory)."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """``auto``: CUDA when available (Ray: when the cluster has GPUs; a cluster without any is refused)."""
    ray_address: str = ""
    """Ray cluster to join (empty: the one this process is connected to, or a new local one)."""
    max_failures: int = 3
    """Ray Train: restarts of the worker group after a worker or node dies (each resumes from ``latest``)."""
    cpus_per_worker: int | None = None
    """Ray Train: CPUs reserved per worker (default: 1 + ``data.num_workers``, the loader processes)."""

    def validate(self) -> None:
        _positive("num_workers", self.num_workers)
        _positive("nodes", self.nodes)
        if self.launcher == "local" and self.num_workers != 1:
            raise ConfigError("num_workers", "expected 1 with launch.launcher=local (use torchrun or ray)")
        if self.nodes > 1:
            if self.launcher != "torchrun":
                raise ConfigError("nodes", f"expected 1 with launch.launcher={self.launcher} (multi-node runs use "
                                  "torchrun; Ray places its workers itself)")
            if self.num_workers % self.nodes:
                raise ConfigError("num_workers", f"expected a multiple of launch.nodes ({self.nodes}), got "
                                  f"{self.num_workers}")
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError("rdzv_endpoint", f"expected host:port of the rendezvous with launch.nodes > 1, "
                                  f"got {self.rdzv_endpoint!r}")
        if self.max_failures < 0:
            raise ConfigError("max_failures", f"expected >= 0, got {self.max_failures}")
        if self.cpus_per_worker is not None:
            _positive("cpus_per_worker", self.cpus_per_worker)


@dataclass(kw_only=True, slots=True)
class Ade20kConfig:
    """``task=ade20k``: UperNet semantic segmentation on the ADEChallengeData2016 layout (mmseg's pipeline)."""

    data_root: str = ""
    """``ROOT`` holding ``images/{training,validation}`` and ``annotations/{training,validation}``; a local
    path or an fsspec URL."""
    generate_demo: bool = False
    """Write the generated demo set (``python -m finetune make-demo-data ade20k``) into ``data_root`` first
    when it is not there yet."""
    num_classes: int = 150
    """Classes after ``reduce_zero_label`` (label 0 is ignored, k becomes k-1)."""
    crop_size: int = 512
    """Training crop (square), padded with label 255 where the image is smaller."""
    resize_scale: tuple[int, int] = (2048, 512)
    """Training resize target (long, short) before the random ratio; (2560, 640) for the 640 crop."""
    ratio_range: tuple[float, float] = (0.5, 2.0)
    """Random ratio applied to ``resize_scale``."""
    cat_max_ratio: float = 0.75
    """Random crop: retry (up to 10 times) while one class covers more than this fraction of the crop."""
    hflip: float = 0.5
    """Horizontal flip probability."""
    photometric: bool = True
    """mmseg's PhotoMetricDistortion (brightness, contrast, saturation, hue)."""
    eval_scale: tuple[int, int] = (2048, 512)
    """Evaluation resize (long, short), keeping the ratio, then to a multiple of 32."""
    eval_mode: Literal["whole", "slide"] = "whole"
    """Inference on the whole resized image, or sliding windows of ``crop_size`` at ``eval_stride``."""
    eval_stride: int = 341
    """``slide``: window stride (mmseg: 341 for 512 crops, 426 for 640)."""
    eval_ratios: tuple[float, ...] = (1.0,)
    """Scales of ``eval_scale`` evaluated and averaged (multi-scale: 0.5, 0.75, 1.0, 1.25, 1.5, 1.75)."""
    eval_flip: bool = False
    """Also average the horizontally flipped predictions."""
    channels: int = 512
    """UperNet decode-head channels."""
    aux_channels: int = 256
    """Auxiliary FCN head channels (on the stride-16 feature)."""
    aux_weight: float = 0.4
    """Auxiliary loss weight (0 removes the auxiliary head)."""
    dropout: float = 0.1
    """Dropout2d before each classifier."""

    def validate(self) -> None:
        _positive("num_classes", self.num_classes)
        if self.crop_size < 32 or self.crop_size % 32:
            raise ConfigError("crop_size", f"expected a multiple of 32, got {self.crop_size}")
        for key in ("resize_scale", "eval_scale"):
            if min(getattr(self, key)) <= 0:
                raise ConfigError(key, f"expected two positive sizes, got {list(getattr(self, key))}")
        low, high = self.ratio_range
        if not 0 < low <= high:
            raise ConfigError("ratio_range", f"expected 0 < low <= high, got {list(self.ratio_range)}")
        _in_range("cat_max_ratio", self.cat_max_ratio, 0.0, 1.0, lower_open=True)
        _in_range("hflip", self.hflip, 0.0, 1.0)
        _positive("eval_stride", self.eval_stride)
        if not self.eval_ratios or min(self.eval_ratios) <= 0:
            raise ConfigError("eval_ratios", f"expected positive scales, got {list(self.eval_ratios)}")
        _positive("channels", self.channels)
        _positive("aux_channels", self.aux_channels)
        if self.aux_weight < 0:
            raise ConfigError("aux_weight", f"expected >= 0, got {self.aux_weight}")
        _in_range("dropout", self.dropout, 0.0, 1.0, upper_open=True)


@dataclass(kw_only=True, slots=True)
class CocoConfig:
    """``task=coco``: Cascade Mask R-CNN (or Mask R-CNN) instance segmentation on the COCO 2017 layout, the
    authors' mmdet recipe: FPN P2-P6, RPN, cascade RoI heads with 4conv1fc box heads and GIoU loss."""

    data_root: str = ""
    """``ROOT`` holding ``annotations/instances_{train,val}2017.json`` and ``{train,val}2017/``; a local path or
    an fsspec URL."""
    generate_demo: bool = False
    """Write the generated demo set (``python -m finetune make-demo-data coco``) into ``data_root`` first when
    it is not there yet."""
    detector: Literal["cascade_mask_rcnn", "mask_rcnn"] = "cascade_mask_rcnn"
    """Three cascade stages (IoU 0.5/0.6/0.7), or one stage (Mask R-CNN: the first cascade stage alone)."""
    num_classes: int = 80
    """Object categories (the annotation file's, in sorted id order; 80 for COCO)."""
    train_scales: tuple[int, ...] = tuple(range(480, 801, 32))
    """Policy (a) of the authors' AutoAugment: shorter side resized to one of these, longer side <= max_size."""
    max_size: int = 1333
    """Longest side after any resize."""
    crop_policy: bool = True
    """Also use policy (b), chosen with probability 0.5 per image: resize to ``crop_resize_scales``, random
    crop of an absolute size in ``crop_size_range``, then policy (a)'s resize."""
    crop_resize_scales: tuple[int, ...] = (400, 500, 600)
    """Policy (b): shorter side before the crop."""
    crop_size_range: tuple[int, int] = (384, 600)
    """Policy (b): crop height and width, each drawn from this inclusive range (clipped to the image)."""
    hflip: float = 0.5
    """Horizontal flip probability."""
    size_divisor: int = 32
    """Batches are zero-padded (after normalization) to a multiple of this."""
    eval_scale: tuple[int, int] = (1333, 800)
    """Test resize (long, short), keeping the aspect ratio."""
    fpn_channels: int = 256
    """FPN output channels (P2-P6)."""
    anchor_scale: float = 8.0
    """RPN anchor size = scale x level stride (strides 4..64); one scale, ratios ``anchor_ratios``."""
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_batch: int = 256
    """Anchors sampled per image for the RPN loss (half positive at most)."""
    rpn_proposals_train: int = 2000
    """Proposals per image kept after NMS 0.7 in training (and taken per level before it)."""
    rpn_proposals_test: int = 1000
    """The same at test time."""
    roi_batch: int = 512
    """RoIs sampled per image per cascade stage (a quarter positive at most)."""
    stage_ious: tuple[float, ...] = (0.5, 0.6, 0.7)
    """Positive IoU of each cascade stage's assigner (one value per stage; the first for mask_rcnn)."""
    stage_weights: tuple[float, ...] = (1.0, 0.5, 0.25)
    """Loss weight of each cascade stage."""
    box_channels: int = 256
    """Box head: 4 shared 3x3 convs of this width (BN), then one fc of ``box_fc``."""
    box_fc: int = 1024
    mask_channels: int = 256
    """Mask head: 4 3x3 convs of this width, deconv x2, class-specific 1x1 (28x28 masks)."""
    giou_weight: float = 10.0
    """Weight of the GIoU loss on decoded boxes."""
    score_threshold: float = 0.05
    nms_iou: float = 0.5
    max_detections: int = 100

    def validate(self) -> None:
        _positive("num_classes", self.num_classes)
        for key in ("train_scales", "crop_resize_scales"):
            if not getattr(self, key) or min(getattr(self, key)) <= 0:
                raise ConfigError(key, f"expected positive sizes, got {list(getattr(self, key))}")
        _positive("max_size", self.max_size)
        low, high = self.crop_size_range
        if not 0 < low <= high:
            raise ConfigError("crop_size_range", f"expected 0 < low <= high, got {list(self.crop_size_range)}")
        _in_range("hflip", self.hflip, 0.0, 1.0)
        _positive("size_divisor", self.size_divisor)
        if min(self.eval_scale) <= 0:
            raise ConfigError("eval_scale", f"expected two positive sizes, got {list(self.eval_scale)}")
        for key in ("fpn_channels", "rpn_batch", "rpn_proposals_train", "rpn_proposals_test", "roi_batch",
                    "box_channels", "box_fc", "mask_channels", "max_detections"):
            _positive(key, getattr(self, key))
        if self.anchor_scale <= 0 or not self.anchor_ratios or min(self.anchor_ratios) <= 0:
            raise ConfigError("anchor_ratios", "expected a positive anchor_scale and positive ratios")
        stages = 3 if self.detector == "cascade_mask_rcnn" else 1
        for key in ("stage_ious", "stage_weights"):
            if len(getattr(self, key)) != stages:
                raise ConfigError(key, f"expected {stages} value(s) with detector={self.detector}, "
                                  f"got {list(getattr(self, key))}")
        for iou in self.stage_ious:
            _in_range("stage_ious", iou, 0.0, 1.0, lower_open=True, upper_open=True)
        if min(self.stage_weights) < 0:
            raise ConfigError("stage_weights", f"expected >= 0, got {list(self.stage_weights)}")
        if self.giou_weight < 0:
            raise ConfigError("giou_weight", f"expected >= 0, got {self.giou_weight}")
        _in_range("score_threshold", self.score_threshold, 0.0, 1.0)
        _in_range("nms_iou", self.nms_iou, 0.0, 1.0, lower_open=True)


DENSE_TASKS = ("ade20k", "coco")


@dataclass(kw_only=True, slots=True)
class Config:
    """One training run."""

    run_dir: str = "runs/demo"
    """Everything the run writes: config.json, checkpoints/, tensorboard/, log."""
    task: Literal["classification", "ade20k", "coco"] = "classification"
    """``classification`` (pretraining, 22K -> 1K; ``data`` section), ``ade20k`` (UperNet segmentation;
    ``ade20k`` section), ``coco`` (Cascade Mask R-CNN instance segmentation; ``coco`` section)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    ade20k: Ade20kConfig = field(default_factory=Ade20kConfig)
    coco: CocoConfig = field(default_factory=CocoConfig)

    def validate(self) -> None:
        if not self.run_dir:
            raise ConfigError("run_dir", "expected a directory")
        if self.task == "classification" and self.data.source == "shards" and not self.data.train_urls:
            raise ConfigError("data.train_urls", "expected the training shards (or data.source=demo)")
        if self.task == "coco" and not self.coco.data_root:
            raise ConfigError("coco.data_root", "expected the COCO 2017 folder (or URL) with task=coco")
        if self.task == "ade20k" and not self.ade20k.data_root:
            raise ConfigError("ade20k.data_root", "expected the ADEChallengeData2016 folder (or URL) with task=ade20k")
        if self.task in DENSE_TASKS and self.train.zero_stage == 3:
            raise ConfigError("train.zero_stage", f"expected 0, 1 or 2 with task={self.task}: ranks run different "
                              "numbers of forward passes in evaluation (image sizes, sliding windows), which "
                              "ZeRO-3's collective parameter gathering cannot follow")
        if self.optim.name == "lamb" and self.train.zero_stage != 0:
            raise ConfigError("train.zero_stage", "expected 0 with optim.name=lamb: ZeRO flattens parameters, "
                              "so LAMB's per-parameter trust ratio would be computed over whole partitions")


def _off_words_to_empty(section, *names: str) -> None:
    """String fields where empty means "off": the words none/off/false also mean off."""
    for name in names:
        if getattr(section, name).strip().lower() in ("", "none", "off", "false"):
            setattr(section, name, "")


def _check_auto_augment(policy: str) -> None:
    """A timm auto-augment policy string (``rand-m9-mstd0.5-inc1``, ``augmix-m5``, ``original``, ...)."""
    from timm.data.auto_augment import auto_augment_transform, augment_and_mix_transform, rand_augment_transform

    try:
        if policy.startswith("rand"):
            rand_augment_transform(policy, {})
        elif policy.startswith("augmix"):
            augment_and_mix_transform(policy, {})
        else:
            auto_augment_transform(policy, {})
    except (AssertionError, ValueError, KeyError, IndexError) as error:
        raise ConfigError("auto_augment", f"expected a timm policy such as 'rand-m9-mstd0.5-inc1' or '' for none, "
                          f"got {policy!r} ({type(error).__name__}: {error})") from None


def _non_finite_floats(value: Any, key: str) -> Iterator[str]:
    """Dotted keys of every NaN or infinite float in a config (sections walked recursively)."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _non_finite_floats(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _non_finite_floats(item, f"{key}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        yield key


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(key, f"expected > 0, got {value}")


def _in_range(key: str, value: float, low: float, high: float, lower_open: bool = False, upper_open: bool = False):
    too_low = value <= low if lower_open else value < low
    too_high = value >= high if upper_open else value > high
    if too_low or too_high:
        interval = f"{'(' if lower_open else '['}{low}, {high}{')' if upper_open else ']'}"
        raise ConfigError(key, f"expected a value in {interval}, got {value}")


def validate(config: Config) -> Config:
    """Check every section, then the cross-section rules; errors name the dotted key."""
    for key in _non_finite_floats(config, ""):
        raise ConfigError(key, f"expected a finite number, got {_get(config, key)}")
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if dataclasses.is_dataclass(value):
            try:
                value.validate()
            except ConfigError as error:
                raise ConfigError(f"{section.name}.{error.key}", str(error).split(": ", 1)[1]) from None
    config.validate()
    return config


def _get(config: Config, key: str) -> Any:
    value: Any = config
    for part in key.replace("[", ".").replace("]", "").split("."):
        value = value[int(part)] if part.isdigit() else getattr(value, part)
    return value


# ----------------------------------------------------------------------------- parsing


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    if annotation is type(None):
        return "none"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert ``value`` (from JSON or a parsed ``--set``) to ``annotation`` or raise a ConfigError."""
    origin = typing.get_origin(annotation)
    expected = _type_name(annotation)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _coerce(key, value, option)
            except ConfigError as error:
                errors.append(error)
        raise ConfigError(key, f"expected {expected}, got {value!r}")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(key, f"expected none, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(annotation):
            return value
        raise ConfigError(key, f"expected {expected}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected {expected}, got {value!r}")
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(key, f"expected {expected}, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping of {annotation.__name__} fields, got {value!r}")
        return _dataclass_from_dict(annotation, value, prefix=f"{key}.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(key, f"expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r}")
    raise TypeError(f"{key}: unsupported annotation {annotation!r}")


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _dataclass_from_dict(cls, values: dict, prefix: str = ""):
    known = _fields(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(prefix + unknown[0], f"unknown key; expected one of {', '.join(sorted(known))}")
    return cls(**{name: _coerce(prefix + name, value, known[name]) for name, value in values.items()})


def config_from_dict(values: dict) -> Config:
    """Build a Config from nested plain values (as written by :func:`config_to_dict`); not yet validated."""
    return _dataclass_from_dict(Config, values)


def config_to_dict(config: Config) -> dict:
    """Nested plain values (tuples as lists), JSON-serializable."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


_TRUE_WORDS, _FALSE_WORDS, _NONE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0"), ("none", "null")


def _parse_text(key: str, text: str, annotation: Any) -> Any:
    """Turn the text of ``--set key=TEXT`` into a value of the field's type ``annotation``.

    The field's type decides what the text means: a string field takes the text as it is
    (``checkpoint.resume=none`` is the word "none", ``data.auto_augment=off`` the word "off");
    ``none``/``null`` mean None only where the field accepts None; ``true/yes/on/1`` and
    ``false/no/off/0`` only for booleans; lists are JSON or comma-separated.
    """
    origin = typing.get_origin(annotation)
    expected = _type_name(annotation)
    stripped = text.strip()
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if type(None) in options and stripped.lower() in _NONE_WORDS:
            return None
        for option in (o for o in options if o is not type(None)):
            try:
                return _parse_text(key, text, option)
            except ConfigError:
                continue
        raise ConfigError(key, f"expected {expected}, got {text!r}")
    if origin is Literal:
        if stripped in typing.get_args(annotation):
            return stripped
        raise ConfigError(key, f"expected {expected}, got {text!r}")
    if origin is tuple:
        if stripped.startswith("["):
            try:
                return json.loads(stripped)
            except json.JSONDecodeError as error:
                raise ConfigError(key, f"expected {expected} (JSON or comma-separated), got {text!r}: {error}") from None
        args = typing.get_args(annotation)
        element_types = [args[0]] * (stripped.count(",") + 1) if len(args) == 2 and args[1] is Ellipsis else list(args)
        parts = stripped.split(",") if stripped else []
        if len(parts) != len(element_types):
            raise ConfigError(key, f"expected {expected}, got {text!r}")
        return [_parse_text(f"{key}[{i}]", part, element) for i, (part, element) in enumerate(zip(parts, element_types))]
    if annotation is bool:
        if stripped.lower() in _TRUE_WORDS:
            return True
        if stripped.lower() in _FALSE_WORDS:
            return False
        raise ConfigError(key, f"expected true or false, got {text!r}")
    if annotation is int:
        try:
            return int(stripped)
        except ValueError:
            raise ConfigError(key, f"expected an integer, got {text!r}") from None
    if annotation is float:
        try:
            return float(stripped)
        except ValueError:
            raise ConfigError(key, f"expected a number, got {text!r}") from None
    if annotation is str:
        return text
    raise ConfigError(key, f"cannot be set from text (type {expected})")


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings in order; unknown keys and bad values raise ConfigError."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "expected key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        target, annotation_owner = config, Config
        for depth, part in enumerate(parts):
            known = _fields(annotation_owner)
            if part not in known:
                where = ".".join(parts[:depth]) or "the config"
                raise ConfigError(key, f"unknown key; {where} has {', '.join(sorted(known))}")
            annotation = known[part]
            if depth < len(parts) - 1:
                if not dataclasses.is_dataclass(annotation):
                    raise ConfigError(key, f"{'.'.join(parts[:depth + 1])} is a value, not a section")
                target, annotation_owner = getattr(target, part), annotation
            else:
                if dataclasses.is_dataclass(annotation):
                    raise ConfigError(key, f"is a section; set one of its keys: "
                                      f"{', '.join(sorted(_fields(annotation)))}")
                setattr(target, part, _coerce(key, _parse_text(key, text, annotation), annotation))
    return config


def save_config(config: Config, path: str) -> None:
    """Write the effective config as JSON (atomically)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(config_to_dict(config), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def load_config(name_or_path: str, overrides: list[str] = ()) -> Config:
    """A preset name or a JSON file, then ``--set`` overrides, then validation."""
    if name_or_path in PRESETS:
        config = PRESETS[name_or_path]()
    elif os.path.isfile(name_or_path):
        with open(name_or_path) as f:
            config = config_from_dict(json.load(f))
    else:
        raise ConfigError("--config", f"expected a preset ({', '.join(PRESETS)}) or a JSON file, got {name_or_path!r}")
    return validate(apply_overrides(config, list(overrides)))


# ----------------------------------------------------------------------------- recipes


def demo() -> Config:
    """A tiny UniRepLKNet on generated 32x32 digit shards, CPU, a few minutes; learns well above chance."""
    return Config(
        run_dir="runs/demo",
        model=ModelConfig(
            name="unireplknet_a", num_classes=10, depths=(1, 1, 2, 1), dims=(16, 32, 64, 128),
            kernel_sizes=((3,), (13,), (13, 3), (13,)), drop_path_rate=0.0),
        data=DataConfig(
            source="demo", demo_dir="data/demo", demo_train_samples=4096, demo_val_samples=1000, img_size=32,
            num_workers=1, auto_augment="", random_erasing=0.0, crop_scale_min=0.8, hflip=0.0, color_jitter=0.0,
            mixup_alpha=0.0, cutmix_alpha=0.0),
        optim=OptimConfig(lr=4e-3, min_lr=1e-5, warmup_epochs=0.5, weight_decay=0.05, clip_grad=5.0),
        train=TrainConfig(epochs=5, global_batch_size=64, micro_batch_size=64, zero_stage=1,
                          label_smoothing=0.0, log_every=25, eval_every=128),
        checkpoint=CheckpointConfig(every=128, keep=2),
    )


# Per variant: (input size of the authors' 22K pretraining, drop path in 22K pretraining).
_IN22K_VARIANTS = {"s": (224, 0.1), "b": (224, 0.1), "l": (192, 0.1), "xl": (192, 0.2)}


def in22k_pretrain(variant: str, img_size: int | None = None) -> Config:
    """The authors' ImageNet-22K pretraining recipe (paper Table 16, README), optionally at another size.

    90 epochs (5 warmup), AdamW, cosine, weight decay 0.05, global batch 4096, mixup 0.8, cutmix
    1.0, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, label smoothing 0.1. lr 4e-3 for
    S/B (paper), 1e-3 for L/XL (README). XL: 32 images per GPU; accumulation follows from the
    world size (4 nodes x 8 GPUs -> 4 steps).
    """
    default_size, drop_path = _IN22K_VARIANTS[variant]
    img_size = img_size or default_size
    return Config(
        run_dir=f"runs/{variant}_in22k_{img_size}",
        model=ModelConfig(name=f"unireplknet_{variant}", num_classes=21841, drop_path_rate=drop_path,
                          grad_checkpointing=variant in ("l", "xl") and img_size > 224,
                          channels_last=True),
        data=DataConfig(train_urls="data/imagenet22k/train", val_urls="data/imagenet22k/val",
                        img_size=img_size, num_workers=8),
        optim=OptimConfig(lr=1e-3 if variant in ("l", "xl") else 4e-3, min_lr=1e-6, warmup_epochs=5,
                          weight_decay=0.05),
        train=TrainConfig(epochs=90, global_batch_size=4096, micro_batch_size=32 if variant == "xl" else 64,
                          zero_stage=2 if variant in ("l", "xl") else 1, label_smoothing=0.1,
                          eval_every=5000),
        checkpoint=CheckpointConfig(every=1000, keep=3),
    )


def in1k_finetune_384(variant: str) -> Config:
    """22K -> 1K fine-tune at 384: batch 512, AdamW lr 5e-5, cosine without warmup, weight decay 1e-8,
    no mixup/cutmix, head init 0.001, layer decay 0.8; 20 epochs, drop path 0.3, label smoothing 0.3
    and EMA (the spec's L/XL recipe; S and B reuse it, drop path 0.2 for them).

    Starts from ``model.init_from`` (the 22K checkpoint in the official key layout or an export).
    """
    return Config(
        run_dir=f"runs/{variant}_in1k_ft_384",
        model=ModelConfig(name=f"unireplknet_{variant}", num_classes=1000,
                          drop_path_rate=0.3 if variant in ("l", "xl") else 0.2, head_init_scale=0.001,
                          init_from=f"unireplknet_{variant}_in22k_pretrain.pth",
                          grad_checkpointing=variant in ("l", "xl"), channels_last=True),
        data=DataConfig(train_urls="data/imagenet1k/train", val_urls="data/imagenet1k/val", img_size=384,
                        num_workers=8, mixup_alpha=0.0, cutmix_alpha=0.0),
        optim=OptimConfig(lr=5e-5, min_lr=1e-6, warmup_epochs=0, weight_decay=1e-8, layer_decay=0.8),
        train=TrainConfig(epochs=20, global_batch_size=512, micro_batch_size=16,
                          zero_stage=2 if variant in ("l", "xl") else 1, label_smoothing=0.3,
                          ema_decay=0.9999, eval_every=1000),
        checkpoint=CheckpointConfig(every=500, keep=3),
    )


def ade20k_demo() -> Config:
    """UperNet on a tiny backbone over the generated ADE20K-layout demo set (``finetune make-demo-data``), CPU,
    a few minutes; starts from ``model.init_from`` when given (e.g. the demo pretraining's export)."""
    return Config(
        run_dir="runs/ade20k_demo", task="ade20k",
        model=ModelConfig(name="unireplknet_a", depths=(1, 1, 2, 1), dims=(16, 32, 64, 128),
                          kernel_sizes=((3,), (13,), (13, 3), (13,)), drop_path_rate=0.0),
        data=DataConfig(num_workers=1),
        ade20k=Ade20kConfig(data_root="data/ade20k_demo", generate_demo=True, num_classes=6, crop_size=128,
                            resize_scale=(320, 128), ratio_range=(0.75, 1.5), eval_scale=(320, 128), channels=64,
                            aux_channels=32),
        optim=OptimConfig(lr=4e-3, min_lr=0.0, weight_decay=0.05, schedule="poly", warmup_steps=20,
                          warmup_ratio=1e-6, layer_decay=0.9, layer_decay_layers=6),
        train=TrainConfig(steps=240, global_batch_size=8, micro_batch_size=8, zero_stage=1, log_every=20,
                          eval_every=120),
        checkpoint=CheckpointConfig(every=120, keep=2),
    )


# Per variant: (drop path, layer-decay num_layers, decay rate, crop) of the authors' UperNet 160k configs.
_ADE20K_VARIANTS = {"t": (0.2, 9, 1.0, 512), "s": (0.3, 12, 0.9, 512), "b": (0.3, 12, 0.9, 640),
                    "l": (0.4, 12, 0.85, 640), "xl": (0.4, 12, 0.85, 640)}


def ade20k_upernet(variant: str, crop: int | None = None) -> Config:
    """The authors' UperNet 160k recipe: AdamW lr 1e-4, weight decay 0.05, layer-wise decay, poly (power 1)
    with 1500 warmup iterations from 1e-6, 16 images per step (2 per GPU x 8), crop 512 with resize
    (2048, 512) or 640 with (2560, 640), whole-image evaluation every 16k iterations."""
    drop_path, layers, decay, default_crop = _ADE20K_VARIANTS[variant]
    crop = crop or default_crop
    scale = (2048, 512) if crop == 512 else (2560, 640)
    return Config(
        run_dir=f"runs/ade20k_{variant}_upernet_{crop}_160k", task="ade20k",
        model=ModelConfig(name=f"unireplknet_{variant}", drop_path_rate=drop_path,
                          init_from=f"unireplknet_{variant}_{'in1k' if crop == 512 else 'in22k'}_pretrain.pth",
                          grad_checkpointing=variant in ("l", "xl")),
        data=DataConfig(num_workers=4),
        ade20k=Ade20kConfig(data_root="data/ADEChallengeData2016", num_classes=150, crop_size=crop,
                            resize_scale=scale, eval_scale=scale, eval_stride=341 if crop == 512 else 426),
        optim=OptimConfig(lr=1e-4, min_lr=0.0, weight_decay=0.05, schedule="poly", power=1.0, warmup_steps=1500,
                          warmup_ratio=1e-6, layer_decay=decay, layer_decay_layers=layers),
        train=TrainConfig(steps=160_000, global_batch_size=16, micro_batch_size=2, zero_stage=1 if variant != "xl" else 2,
                          log_every=50, eval_every=16_000),
        checkpoint=CheckpointConfig(every=2000, keep=3),
    )


_ADE20K_NOTES = {
    "t": "(the authors' T config: 1K-pretrained, crop 512, num_layers 9, decay 1.0).",
    "s": "(the authors' S 1K config; s_upernet_640 is their S 22K config).",
    "b": "(the authors' B 22K config). Their 640 files never pass the 640 pipeline to data.train, so they "
         "trained at 512; this preset trains at 640 as its name says.",
    "l": "(the authors' L 22K config, trained here at 640 as named; see b).",
    "xl": "(no XL config was published, the authors' files were lost: chosen as L's recipe — drop path 0.4, "
          "decay 0.85 — with ZeRO-2 and activation checkpointing so it fits an 80 GB GPU at 2 images).",
}


def coco_demo() -> Config:
    """Cascade Mask R-CNN on a tiny backbone over the generated COCO-layout demo set (``finetune make-demo-data
    coco``), CPU, minutes: the recipe's structure scaled to 96-192 px images (anchors 8-128 px, narrow heads)."""
    return Config(
        run_dir="runs/coco_demo", task="coco",
        model=ModelConfig(name="unireplknet_a", depths=(1, 1, 2, 1), dims=(16, 32, 64, 128),
                          kernel_sizes=((3,), (13,), (13, 3), (13,)), drop_path_rate=0.0),
        data=DataConfig(num_workers=1),
        coco=CocoConfig(data_root="data/coco_demo", generate_demo=True, num_classes=4,
                        train_scales=(112, 128, 144, 160), max_size=256, crop_resize_scales=(100, 125, 150),
                        crop_size_range=(80, 150), eval_scale=(256, 144), fpn_channels=64, anchor_scale=2.0,
                        rpn_batch=128, rpn_proposals_train=300, rpn_proposals_test=300, roi_batch=128,
                        box_channels=64, box_fc=256, mask_channels=64),
        optim=OptimConfig(lr=2e-3, min_lr=0.0, weight_decay=0.05, schedule="multistep", milestones=(27.0, 33.0),
                          warmup_steps=20, warmup_ratio=0.001, layer_decay=0.9, layer_decay_layers=6),
        train=TrainConfig(epochs=36, steps=200, global_batch_size=4, micro_batch_size=4, zero_stage=1,
                          log_every=20, eval_every=100),
        checkpoint=CheckpointConfig(every=100, keep=2),
    )


# Per variant: (drop path, layer-decay rate) of the authors' Cascade Mask R-CNN 3x configs (num_layers 12).
_COCO_VARIANTS = {"t": (0.3, 0.8), "s": (0.5, 0.8), "b": (0.6, 0.8), "l": (0.7, 0.7), "xl": (0.7, 0.7)}


def coco_cascade_3x(variant: str) -> Config:
    """The authors' Cascade Mask R-CNN 3x recipe: AdamW lr 1e-4, weight decay 0.05, layer-wise decay over 12
    layers, 16 images per step (2 per GPU x 8), 36 epochs with x0.1 at 27 and 33, 500 warmup iterations from
    0.001, EMA, activation checkpointing, DETR-style multi-scale training, test at (1333, 800)."""
    drop_path, decay = _COCO_VARIANTS[variant]
    return Config(
        run_dir=f"runs/coco_{variant}_cascade_3x", task="coco",
        model=ModelConfig(name=f"unireplknet_{variant}", drop_path_rate=drop_path,
                          init_from=f"unireplknet_{variant}_{'in1k' if variant == 't' else 'in22k'}_pretrain.pth",
                          grad_checkpointing=True),
        data=DataConfig(num_workers=4),
        coco=CocoConfig(data_root="data/coco"),
        optim=OptimConfig(lr=1e-4, min_lr=0.0, weight_decay=0.05, schedule="multistep", milestones=(27.0, 33.0),
                          gamma=0.1, warmup_steps=500, warmup_ratio=0.001, layer_decay=decay, layer_decay_layers=12),
        train=TrainConfig(epochs=36, global_batch_size=16, micro_batch_size=2, zero_stage=1 if variant != "xl" else 2,
                          ema_decay=0.9999, log_every=50, eval_every=7330),
        checkpoint=CheckpointConfig(every=2000, keep=3),
    )


_COCO_NOTES = {
    "t": "(the authors' T config, 1K-pretrained, drop path 0.3, decay 0.8).",
    "s": "(the authors' S 22K config; their S 1K config is the same but for the checkpoint).",
    "b": "(the authors' B 22K config, drop path 0.6).",
    "l": "(the authors' L 22K config, drop path 0.7, decay 0.7).",
    "xl": "(the authors' XL 22K config, drop path 0.7, decay 0.7; ZeRO-2 and activation checkpointing so it "
          "fits an 80 GB GPU at 2 images; paper: 56.4 box AP / 49.0 mask AP).",
}


def _preset(make: Callable[[], Config], summary: str) -> Callable[[], Config]:
    make.__doc__ = summary
    return make


def _preset_table() -> dict[str, Callable[[], Config]]:
    table: dict[str, Callable[[], Config]] = {"demo": demo, "ade20k_demo": ade20k_demo, "coco_demo": coco_demo}
    for variant in _COCO_VARIANTS:
        table[f"coco_{variant}_cascade_3x"] = _preset(
            lambda v=variant: coco_cascade_3x(v),
            f"{variant.upper()} Cascade Mask R-CNN 3x on COCO {_COCO_NOTES[variant]}")
    for variant, (_, _, _, crop) in _ADE20K_VARIANTS.items():
        crops = (512, 640) if variant == "s" else (crop,)
        for size in crops:
            table[f"ade20k_{variant}_upernet_{size}_160k"] = _preset(
                lambda v=variant, c=size: ade20k_upernet(v, c),
                f"{variant.upper()} UperNet 160k on ADE20K at {size} {_ADE20K_NOTES[variant]}")
    for variant, (size, _) in _IN22K_VARIANTS.items():
        name = variant.upper()
        table[f"{variant}_in22k_{size}"] = _preset(
            lambda v=variant: in22k_pretrain(v), f"{name} ImageNet-22K pretraining at {size}, the authors' recipe.")
        if size != 384:
            table[f"{variant}_in22k_384"] = _preset(
                lambda v=variant: in22k_pretrain(v, 384), f"{name} ImageNet-22K pretraining at 384 (the recipe at 384x384).")
        table[f"{variant}_in1k_ft_384"] = _preset(
            lambda v=variant: in1k_finetune_384(v),
            f"{name} 22K -> 1K fine-tune at 384: layer decay 0.8, EMA, label smoothing 0.3, head init 0.001.")
    return table


PRESETS: dict[str, Callable[[], Config]] = _preset_table()
"""Preset name -> function returning a fresh Config (``demo``, ``xl_in22k_192``, ``xl_in22k_384``, ...)."""
