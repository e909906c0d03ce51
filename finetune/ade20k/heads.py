"""UperNet on a UniRepLKNet backbone, as the authors train it on ADE20K (mmseg ``EncoderDecoder``).

Written from mmseg's ``UPerHead`` and ``FCNHead`` (no mmcv): PPM on the stride-32 feature,
lateral 1x1 convs, a top-down bilinear path, 3x3 FPN convs, fusion of all four levels at stride 4,
``Dropout2d`` and a 1x1 classifier; an auxiliary FCN head on the stride-16 feature.

Names follow mmseg so that mmseg UperNet checkpoints map one to one: the model holds
``backbone`` (an unwrapped features_only :class:`unireplknet.UniRepLKNet`, so parameters are
``backbone.downsample_layers.0...``, ``backbone.stages.2.5...``, ``backbone.norm0...`` exactly as in
the official checkpoints), ``decode_head`` (``psp_modules.{i}.1``, ``bottleneck``,
``lateral_convs.{i}``, ``fpn_convs.{i}``, ``fpn_bottleneck``, ``conv_seg``) and ``auxiliary_head``
(``convs.{i}``, ``conv_seg``); every conv + norm + ReLU unit is ``conv``/``bn``/``activate`` like
mmcv's ``ConvModule``.

Norm layers are ``nn.BatchNorm2d``; the trainer converts them to ``SyncBatchNorm`` itself with
``model.sync_batchnorm`` (the authors' segmentation and detection configs use SyncBN in the backbone,
``use_sync_bn=True``, and in every head ConvModule, at 2 images per GPU x 8 GPUs: the paper-scale presets set
``auto``, SyncBN on CUDA with more than one rank).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


__all__ = [
    "ConvBNReLU",
    "FCNHead",
    "UPerHead",
    "UperNet",
    "build_upernet",
]


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with ``align_corners=False`` (the authors' setting everywhere); no-op at the same size (and
    under ``torch.export``, where sizes are symbolic, the resize itself, which is the identity at the same size)."""
    if not torch.compiler.is_exporting() and tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _pooling_matrix(out_size: int, in_size, like: torch.Tensor) -> torch.Tensor:
    """(out_size, in_size) weights of adaptive average pooling along one axis: bin i averages the inputs
    ``[floor(i * in / out), ceil((i + 1) * in / out))``, torch's bins; ``in_size`` may be symbolic."""
    i = torch.arange(out_size, device=like.device).unsqueeze(1)
    j = torch.arange(in_size, device=like.device).unsqueeze(0)
    start, end = (i * in_size) // out_size, ((i + 1) * in_size + out_size - 1) // out_size
    inside = ((j >= start) & (j < end)).to(like.dtype)
    return inside / (end - start).to(like.dtype)


def adaptive_avg_pool2d_by_matrices(x: torch.Tensor, size: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, size)`` as ``rows @ x @ cols^T``: the same bins, written with shape arithmetic
    that ``torch.export`` keeps symbolic (ONNX has no adaptive pooling)."""
    rows, cols = _pooling_matrix(size, x.shape[-2], x), _pooling_matrix(size, x.shape[-1], x)
    return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """torch's adaptive average pooling (square output); under ``torch.export`` (ONNX export)
    :func:`adaptive_avg_pool2d_by_matrices`, so the exported graph holds for any input size (an exporter
    otherwise bakes the traced input size into the pooling)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_exporting():
            return super().forward(x)
        size = self.output_size if isinstance(self.output_size, int) else self.output_size[0]
        return adaptive_avg_pool2d_by_matrices(x, size)


class ConvBNReLU(nn.Module):
    """Conv (no bias) + BatchNorm + ReLU: mmcv's ``ConvModule`` with ``norm_cfg=BN``, same submodule names.

    Initialized like ``ConvModule``: Kaiming normal (fan_out, ReLU) conv weights, norm weight 1, bias 0.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class _Classifier(nn.Module):
    """mmseg ``BaseDecodeHead.cls_seg``: ``Dropout2d`` then a 1x1 conv with bias (normal init, std 0.01)."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))


class UPerHead(_Classifier):
    """mmseg ``UPerHead``: logits at the stride of the first (finest) feature.

    Args:
        in_channels: channels of the features, finest first (strides 4/8/16/32).
        channels: width of every internal conv (512 in the authors' configs).
        num_classes: classifier outputs (150 for ADE20K).
        pool_scales: PPM output sizes on the coarsest feature.
        dropout: ``Dropout2d`` rate before the classifier.
    """

    def __init__(
            self,
            in_channels: Sequence[int],
            channels: int = 512,
            num_classes: int = 150,
            pool_scales: Sequence[int] = (1, 2, 3, 6),
            dropout: float = 0.1,
    ):
        super().__init__(channels, num_classes, dropout)
        in_channels = tuple(in_channels)
        if len(in_channels) < 2:
            raise ValueError(f"UPerHead needs at least two feature levels, got in_channels={in_channels}")
        self.in_channels = in_channels
        self.channels = channels
        self.pool_scales = tuple(pool_scales)
        self.psp_modules = nn.ModuleList(
            nn.Sequential(AdaptiveAvgPool2d(scale), ConvBNReLU(in_channels[-1], channels, 1))
            for scale in self.pool_scales)
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(self.pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3, padding=1) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3, padding=1)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pyramid pooling on the coarsest feature, concatenated with it, then the 3x3 bottleneck."""
        pooled = [_resize(module(x), x.shape[-2:]) for module in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.in_channels):
            raise ValueError(f"UPerHead built for {len(self.in_channels)} feature levels, got {len(features)}")
        laterals = [conv(features[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(features[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse into fine
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)]
        outs.append(laterals[-1])
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([_resize(o, size) for o in outs], dim=1))
        return self.cls_seg(fused)


class FCNHead(_Classifier):
    """mmseg ``FCNHead`` with ``concat_input=False``: ``num_convs`` 3x3 ConvBNReLU, then the classifier.

    Args:
        in_channels: channels of the one input feature.
        channels: width of the convs (256 for the authors' auxiliary head).
        num_classes: classifier outputs.
        num_convs: number of 3x3 convs (0: the classifier sees the input, which needs
            ``in_channels == channels``).
        dropout: ``Dropout2d`` rate before the classifier.
    """

    def __init__(self, in_channels: int, channels: int = 256, num_classes: int = 150, num_convs: int = 1,
                 dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        if num_convs < 0:
            raise ValueError(f"num_convs must be >= 0, got {num_convs}")
        if num_convs == 0 and in_channels != channels:
            raise ValueError(f"num_convs=0 needs in_channels == channels, got {in_channels} and {channels}")
        self.in_channels = in_channels
        self.channels = channels
        self.convs = nn.Sequential(*[
            ConvBNReLU(in_channels if i == 0 else channels, channels, 3, padding=1) for i in range(num_convs)])

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.cls_seg(self.convs(feature))


class UperNet(nn.Module):
    """Backbone + ``UPerHead`` + auxiliary ``FCNHead`` (mmseg ``EncoderDecoder``, ``mode='whole'``).

    Args:
        backbone: a features_only model returning the stride-4/8/16/32 features as a list, with
            ``feature_info.channels()`` (a features_only :class:`unireplknet.UniRepLKNet`).
        num_classes: classes (150 for ADE20K).
        channels: decode head width (512).
        aux_channels: auxiliary head width (256); ``None`` builds no auxiliary head.
        aux_index: which feature the auxiliary head reads (2: stride 16).
        dropout: ``Dropout2d`` rate of both heads.

    ``forward(images)`` returns ``{"logits": (N, num_classes, H, W)}`` upsampled to the input size
    (bilinear, ``align_corners=False``) and, in training mode, ``"aux_logits"`` likewise.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, channels: int = 512, aux_channels: int | None = 256,
                 aux_index: int = 2, dropout: float = 0.1):
        super().__init__()
        in_channels = list(backbone.feature_info.channels())
        if not 0 <= aux_index < len(in_channels):
            raise ValueError(f"aux_index {aux_index} out of range for {len(in_channels)} feature levels")
        self.num_classes = num_classes
        self.aux_index = aux_index
        self.backbone = backbone
        self.decode_head = UPerHead(in_channels, channels=channels, num_classes=num_classes, dropout=dropout)
        self.auxiliary_head = None if aux_channels is None else FCNHead(
            in_channels[aux_index], channels=aux_channels, num_classes=num_classes, num_convs=1, dropout=dropout)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(images)
        size = images.shape[-2:]
        outputs = {"logits": _resize(self.decode_head(features), size)}
        if self.training and self.auxiliary_head is not None:
            outputs["aux_logits"] = _resize(self.auxiliary_head(features[self.aux_index]), size)
        return outputs

    @staticmethod
    def losses(outputs: dict[str, torch.Tensor], labels: torch.Tensor, aux_weight: float = 0.4,
               ignore_index: int = 255, avg_non_ignore: bool = False) -> dict[str, torch.Tensor]:
        """``{"loss_seg": CE(logits), "loss_aux": aux_weight * CE(aux_logits)}`` (the latter only if present).

        Logits are resized to the label size first (bilinear, ``align_corners=False``), and the
        cross-entropy is computed in float32. Reduction as mmseg's ``CrossEntropyLoss`` with its
        default ``avg_non_ignore=False`` (what the authors' configs use): the per-pixel losses of
        non-ignored pixels are summed and divided by the number of *all* label pixels (ignored
        pixels count as 0). ``avg_non_ignore=True`` divides by the non-ignored count instead
        (PyTorch's ``reduction='mean'``). Either way a batch whose labels are all ``ignore_index``
        gives a loss of exactly 0 (with zero gradients) where PyTorch's mean would give NaN.
        """
        labels = labels.long()
        if labels.dim() == 4:
            labels = labels.squeeze(1)
        denominator = labels.numel()
        if avg_non_ignore:
            denominator = max(int((labels != ignore_index).sum()), 1)

        def cross_entropy(logits: torch.Tensor) -> torch.Tensor:
            logits = _resize(logits, labels.shape[-2:]).float()
            per_pixel = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
            return per_pixel.sum() / denominator

        losses = {"loss_seg": cross_entropy(outputs["logits"])}
        if "aux_logits" in outputs:
            losses["loss_aux"] = aux_weight * cross_entropy(outputs["aux_logits"])
        return losses

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The backbone's ``no_weight_decay`` names under the ``backbone.`` prefix (1-D params are the trainer's rule)."""
        names = getattr(self.backbone, "no_weight_decay", lambda: set())()
        return {f"backbone.{name}" for name in names}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the backbone blocks (the authors' ``with_cp=True``)."""
        self.backbone.set_grad_checkpointing(enable)


def build_upernet(
        backbone_name: str,
        num_classes: int,
        drop_path_rate: float,
        depths: Sequence[int] | None = None,
        dims: Sequence[int] | None = None,
        kernel_sizes: Sequence[Sequence[int]] | None = None,
        channels: int = 512,
        aux_channels: int | None = 256,
        dropout: float = 0.1,
        grad_checkpointing: bool = False,
) -> UperNet:
    """A UperNet on a features_only UniRepLKNet (randomly initialized; load weights with
    ``unireplknet.load_official(model.backbone, path)``).

    Args:
        backbone_name: ``unireplknet_{a,f,p,n,t,s,b,l,xl}`` (a ``.tag`` suffix is ignored).
        num_classes: segmentation classes.
        drop_path_rate: stochastic depth of the backbone (T 0.2, S/B 0.3, L 0.4 in the authors' configs).
        depths, dims, kernel_sizes: override the variant's architecture (e.g. a tiny test backbone);
            each defaults to the variant's. Kernel sizes default to the variant's only when the
            depths are the variant's; otherwise pass them (one tuple per stage, one size per block).
        channels, aux_channels: decode / auxiliary head widths (``aux_channels=None``: no auxiliary head).
        dropout: ``Dropout2d`` rate of both heads.
        grad_checkpointing: checkpoint the backbone blocks.
    """
    from ..backbone import build_dense_backbone

    backbone = build_dense_backbone(backbone_name, drop_path_rate=drop_path_rate, depths=depths, dims=dims,
                                    kernel_sizes=kernel_sizes, grad_checkpointing=grad_checkpointing)
    return UperNet(backbone, num_classes, channels=channels, aux_channels=aux_channels, dropout=dropout)
