"""UniRepLKNet: A Universal Perception Large-Kernel ConvNet.

Paper: "UniRepLKNet: A Universal Perception Large-Kernel ConvNet for Audio, Video, Point Cloud,
Time-Series and Image Recognition" (CVPR 2024), https://arxiv.org/abs/2311.15599, and its TPAMI
2025 extension, https://arxiv.org/abs/2410.08049. Original code: AILab-CVC/UniRepLKNet
(Apache-2.0). This file is written from the architecture facts; module and parameter names follow
the authors' release so that their checkpoints load without renaming.

Two structures compute the same function in eval mode:
- training structure: Dilated Reparam Blocks (a large depthwise conv plus dilated small convs,
  each with its own BatchNorm), BatchNorms after the depthwise conv and the second Linear, GRN
  with a bias, layer scale;
- inference structure (``deploy=True`` or ``model.reparameterize()``): one depthwise conv with
  bias per block and everything linear folded into the neighbouring convs and Linears.
"""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import FeatureInfo

from . import kernels


_DEPTHWISE_IMPLEMENTATIONS = ("fast", "torch")
_depthwise_impl = "fast"


@contextlib.contextmanager
def depthwise_conv_implementation(name: str):
    """Build models inside this context with ``"torch"`` (plain ``nn.Conv2d``) or ``"fast"`` depthwise convs."""
    global _depthwise_impl
    if name not in _DEPTHWISE_IMPLEMENTATIONS:
        raise ValueError(f"depthwise conv implementation must be one of {_DEPTHWISE_IMPLEMENTATIONS}, got {name!r}")
    previous, _depthwise_impl = _depthwise_impl, name
    try:
        yield
    finally:
        _depthwise_impl = previous


def make_depthwise_conv(channels: int, kernel_size: int, dilation: int = 1, bias: bool = False) -> nn.Conv2d:
    """A stride-1 "same"-padded depthwise conv (the one place that picks the conv implementation).

    ``"fast"``: :class:`unireplknet.kernels.DepthwiseConv2d` (Triton on CUDA when faster for the shape,
    ``F.conv2d`` otherwise); ``"torch"``: plain ``nn.Conv2d``. Both have the same parameters and keys.
    """
    if _depthwise_impl == "fast":
        return kernels.make_depthwise_conv(channels, kernel_size, dilation=dilation, bias=bias)
    return kernels.plain_depthwise_conv(channels, kernel_size, dilation=dilation, bias=bias)

__all__ = [
    "UniRepLKNet",
    "UniRepLKNetBlock",
    "DilatedReparamBlock",
    "GRN",
    "SEBlock",
    "LayerNorm2d",
    "DILATED_BRANCHES",
    "VARIANTS",
    "reparameterize_model",
]

# Branches (kernel size k, dilation r) added in parallel to a KxK depthwise conv.
DILATED_BRANCHES: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    17: ((5, 9, 3, 3, 3), (1, 2, 4, 5, 7)),
    15: ((5, 7, 3, 3, 3), (1, 2, 3, 5, 7)),
    13: ((5, 7, 3, 3, 3), (1, 2, 3, 4, 5)),
    11: ((5, 5, 3, 3, 3), (1, 2, 3, 4, 5)),
    9: ((5, 5, 3, 3), (1, 2, 3, 4)),
    7: ((5, 3, 3), (1, 2, 3)),
    5: ((3, 3), (1, 2)),
}

_SMALL_BACKBONE_KERNELS = ((3, 3), (13, 13), (13,) * 6, (13, 13))
_N_KERNELS = ((3, 3), (13, 13), (13,) * 8, (13, 13))
_T_KERNELS = ((3, 3, 3), (13, 13, 13), (13, 3) * 9, (13, 13, 13))
_LARGE_KERNELS = ((3, 3, 3), (13, 13, 13), (13, 3, 3) * 9, (13, 13, 13))

# name -> (depths, dims, kernel sizes per block)
VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[tuple[int, ...], ...]]] = {
    "a": ((2, 2, 6, 2), (40, 80, 160, 320), _SMALL_BACKBONE_KERNELS),
    "f": ((2, 2, 6, 2), (48, 96, 192, 384), _SMALL_BACKBONE_KERNELS),
    "p": ((2, 2, 6, 2), (64, 128, 256, 512), _SMALL_BACKBONE_KERNELS),
    "n": ((2, 2, 8, 2), (80, 160, 320, 640), _N_KERNELS),
    "t": ((3, 3, 18, 3), (80, 160, 320, 640), _T_KERNELS),
    "s": ((3, 3, 27, 3), (96, 192, 384, 768), _LARGE_KERNELS),
    "b": ((3, 3, 27, 3), (128, 256, 512, 1024), _LARGE_KERNELS),
    "l": ((3, 3, 27, 3), (192, 384, 768, 1536), _LARGE_KERNELS),
    "xl": ((3, 3, 27, 3), (256, 512, 1024, 2048), _LARGE_KERNELS),
}


def fuse_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the conv (weight, bias) that feeds it."""
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    conv_bias = torch.zeros_like(bn.running_mean) if bias is None else bias
    fused_weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    fused_bias = bn.bias + (conv_bias - bn.running_mean) * scale
    return fused_weight, fused_bias


def dilated_to_dense_kernel(kernel: torch.Tensor, dilation: int) -> torch.Tensor:
    """Insert ``dilation - 1`` zeros between the taps of a depthwise kernel (C, 1, k, k)."""
    if dilation == 1:
        return kernel
    ones = torch.ones(1, 1, 1, 1, dtype=kernel.dtype, device=kernel.device)
    return F.conv_transpose2d(kernel, ones, stride=dilation)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of an NCHW tensor (the release's channels_first LN)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ToChannelsLast(nn.Module):
    """NCHW -> NHWC."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class ToChannelsFirst(nn.Module):
    """NHWC -> NCHW."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization on NHWC input (ConvNeXt V2), optional bias ``beta``."""

    def __init__(self, dim: int, use_bias: bool = True):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim)) if use_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        global_norm = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        normalized = global_norm / (global_norm.mean(dim=-1, keepdim=True) + 1e-6)
        out = (self.gamma * normalized + 1) * x
        return out if self.beta is None else out + self.beta


class SEBlock(nn.Module):
    """Squeeze-and-Excitation with 1x1 convs named ``down`` / ``up`` as in the release."""

    def __init__(self, channels: int, internal_channels: int):
        super().__init__()
        self.down = nn.Conv2d(channels, internal_channels, kernel_size=1, bias=True)
        self.up = nn.Conv2d(internal_channels, channels, kernel_size=1, bias=True)
        self.nonlinear = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = torch.sigmoid(self.up(self.nonlinear(self.down(scale))))
        return x * scale


class DilatedReparamBlock(nn.Module):
    """A KxK depthwise conv + BN in parallel with dilated small depthwise convs, each with a BN.

    ``reparameterize()`` merges all branches into one KxK depthwise conv with bias (``lk_origin``).
    With ``fused_branches`` set, the training structure runs as one grouped conv and one batch norm
    (:func:`unireplknet.kernels.fused_dilated_reparam_forward`): same function, parameters and keys.
    """

    def __init__(self, channels: int, kernel_size: int, deploy: bool = False):
        super().__init__()
        if kernel_size not in DILATED_BRANCHES:
            raise ValueError(
                f"Dilated Reparam Block supports kernel sizes {sorted(DILATED_BRANCHES)}, got {kernel_size}")
        self.kernel_size = kernel_size
        self.fused_branches = False
        self.lk_origin = make_depthwise_conv(channels, kernel_size, bias=deploy)
        self.branches = tuple(zip(*DILATED_BRANCHES[kernel_size]))
        if deploy:
            return
        self.origin_bn = nn.BatchNorm2d(channels)
        for k, r in self.branches:
            self.add_module(f"dil_conv_k{k}_{r}", make_depthwise_conv(channels, k, dilation=r, bias=False))
            self.add_module(f"dil_bn_k{k}_{r}", nn.BatchNorm2d(channels))

    @property
    def deployed(self) -> bool:
        return not hasattr(self, "origin_bn")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deployed:
            return self.lk_origin(x)
        if self.fused_branches:
            return kernels.fused_dilated_reparam_forward(self, x)
        (_, origin_conv, origin_bn), *dilated = self.branch_layers()
        out = origin_bn(origin_conv(x))
        for _, conv, bn in dilated:
            out = out + bn(conv(x))
        return out

    def branch_layers(self) -> list[tuple[int, nn.Conv2d, nn.BatchNorm2d]]:
        """(dilation, conv, bn) of every branch of the training structure, ``lk_origin`` first."""
        return [(1, self.lk_origin, self.origin_bn)] + [
            (r, getattr(self, f"dil_conv_k{k}_{r}"), getattr(self, f"dil_bn_k{k}_{r}")) for k, r in self.branches]

    def merged_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (weight, bias) of the single KxK conv equal to all branches in eval mode."""
        (_, origin_conv, origin_bn), *dilated = self.branch_layers()
        weight, bias = fuse_bn(origin_conv.weight, origin_conv.bias, origin_bn)
        for dilation, conv, bn in dilated:
            branch_weight, branch_bias = fuse_bn(conv.weight, conv.bias, bn)
            dense = dilated_to_dense_kernel(branch_weight, dilation)
            pad = self.kernel_size // 2 - dense.shape[-1] // 2
            weight = weight + F.pad(dense, [pad] * 4)
            bias = bias + branch_bias
        return weight, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge every branch into ``lk_origin`` in place (a no-op when already merged)."""
        if self.deployed:
            return
        weight, bias = self.merged_kernel()
        channels = weight.shape[0]
        merged = make_depthwise_conv(channels, self.kernel_size, bias=True).to(weight.device, weight.dtype)
        merged.weight.copy_(weight)
        merged.bias.copy_(bias)
        self.lk_origin = merged
        del self.origin_bn
        for k, r in self.branches:
            delattr(self, f"dil_conv_k{k}_{r}")
            delattr(self, f"dil_bn_k{k}_{r}")


class UniRepLKNetBlock(nn.Module):
    """One UniRepLKNet block: depthwise conv (LarK or SmaK) -> BN -> SE -> FFN with GRN -> BN."""

    def __init__(
            self,
            dim: int,
            kernel_size: int,
            drop_path: float = 0.0,
            layer_scale_init_value: float = 1e-6,
            deploy: bool = False,
            ffn_factor: int = 4,
    ):
        super().__init__()
        if kernel_size >= 7:
            self.dwconv = DilatedReparamBlock(dim, kernel_size, deploy=deploy)
        elif kernel_size in (3, 5):
            self.dwconv = make_depthwise_conv(dim, kernel_size, bias=deploy)
        else:
            raise ValueError(f"block kernel size must be 3, 5 or one of {sorted(DILATED_BRANCHES)}, got {kernel_size}")
        self.norm = nn.Identity() if deploy else nn.BatchNorm2d(dim)
        self.se = SEBlock(dim, dim // 4)
        ffn_dim = int(ffn_factor * dim)
        self.pwconv1 = nn.Sequential(ToChannelsLast(), nn.Linear(dim, ffn_dim))
        self.act = nn.Sequential(nn.GELU(), GRN(ffn_dim, use_bias=not deploy))
        if deploy:
            self.pwconv2 = nn.Sequential(nn.Linear(ffn_dim, dim), ToChannelsFirst())
            self.gamma = None
        else:
            self.pwconv2 = nn.Sequential(nn.Linear(ffn_dim, dim, bias=False), ToChannelsFirst(), nn.BatchNorm2d(dim))
            self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim)) if layer_scale_init_value > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(self.norm(self.dwconv(x)))
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma.view(1, -1, 1, 1) * y
        return x + self.drop_path(y)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Turn this block into the inference structure in place (idempotent)."""
        if isinstance(self.dwconv, DilatedReparamBlock):
            self.dwconv.reparameterize()
            conv = self.dwconv.lk_origin
        else:
            conv = self.dwconv
        if isinstance(self.norm, nn.BatchNorm2d):
            weight, bias = fuse_bn(conv.weight, conv.bias, self.norm)
            fused = make_depthwise_conv(weight.shape[0], weight.shape[-1], bias=True).to(weight.device, weight.dtype)
            fused.weight.copy_(weight)
            fused.bias.copy_(bias)
            if isinstance(self.dwconv, DilatedReparamBlock):
                self.dwconv.lk_origin = fused
            else:
                self.dwconv = fused
            self.norm = nn.Identity()
        if len(self.pwconv2) == 3:
            self._fold_ffn_output()

    def _fold_ffn_output(self) -> None:
        linear, bn = self.pwconv2[0], self.pwconv2[2]
        grn = self.act[1]
        bias = torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)
        if linear.bias is not None:
            bias = bias + linear.bias
        if grn.beta is not None:
            bias = bias + linear.weight @ grn.beta.reshape(-1)
            grn.beta = None
        weight, bias = fuse_bn(linear.weight, bias, bn)
        if self.gamma is not None:
            weight = weight * self.gamma.view(-1, 1)
            bias = bias * self.gamma
            self.gamma = None
        folded = nn.Linear(linear.in_features, linear.out_features, bias=True).to(weight.device, weight.dtype)
        folded.weight.copy_(weight)
        folded.bias.copy_(bias)
        self.pwconv2 = nn.Sequential(folded, ToChannelsFirst())


class UniRepLKNet(nn.Module):
    """UniRepLKNet backbone with a classification head or, with ``features_only``, per-stage features.

    Args:
        in_chans: input channels (3 for images, 1 for spectrograms).
        num_classes: classifier outputs (1000 for ImageNet-1K, 21841 for ImageNet-22K); 0 for none.
        depths: blocks per stage.
        dims: channels per stage.
        kernel_sizes: per stage, the depthwise kernel size of each block (3 = SmaK, >=7 = LarK).
        drop_path_rate: stochastic depth, linearly increasing over blocks up to this value.
        layer_scale_init_value: initial layer-scale gamma (training structure).
        head_init_scale: multiplies the initial classifier weights and bias.
        deploy: build directly in the inference structure.
        features_only: no head; return a list of normalized feature maps at strides 4/8/16/32.
        out_indices: which stages to return with ``features_only``.
        drop_rate: dropout before the classifier.
        fused_branches: run each Dilated Reparam Block's training structure as one grouped conv and
            one batch norm (same function; see :meth:`set_fused_branches`).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            depths: Sequence[int] = (3, 3, 27, 3),
            dims: Sequence[int] = (96, 192, 384, 768),
            kernel_sizes: Sequence[Sequence[int]] | None = None,
            drop_path_rate: float = 0.0,
            layer_scale_init_value: float = 1e-6,
            head_init_scale: float = 1.0,
            deploy: bool = False,
            features_only: bool = False,
            out_indices: Sequence[int] = (0, 1, 2, 3),
            drop_rate: float = 0.0,
            global_pool: str = "avg",
            fused_branches: bool = False,
    ):
        super().__init__()
        depths, dims = tuple(depths), tuple(dims)
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"depths and dims need 4 stages, got depths={depths} dims={dims}")
        if kernel_sizes is None:
            kernel_sizes = _default_kernel_sizes(depths)
        kernel_sizes = tuple(tuple(k) for k in kernel_sizes)
        for stage, (depth, sizes) in enumerate(zip(depths, kernel_sizes)):
            if len(sizes) != depth:
                raise ValueError(f"stage {stage}: {len(sizes)} kernel sizes for {depth} blocks")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.dims = dims
        self.depths = depths
        self.kernel_sizes = kernel_sizes
        self.features_only = features_only
        self.out_indices = tuple(out_indices)
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False

        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(
            nn.Conv2d(in_chans, dims[0] // 2, kernel_size=3, stride=2, padding=1),
            LayerNorm2d(dims[0] // 2),
            nn.GELU(),
            nn.Conv2d(dims[0] // 2, dims[0], kernel_size=3, stride=2, padding=1),
            LayerNorm2d(dims[0]),
        ))
        for i in range(1, 4):
            self.downsample_layers.append(nn.Sequential(
                nn.Conv2d(dims[i - 1], dims[i], kernel_size=3, stride=2, padding=1),
                LayerNorm2d(dims[i]),
            ))

        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        self.feature_info = []
        block_index = 0
        for i in range(4):
            self.stages.append(nn.Sequential(*[
                UniRepLKNetBlock(
                    dims[i], kernel_sizes[i][j], drop_path=rates[block_index + j],
                    layer_scale_init_value=layer_scale_init_value, deploy=deploy)
                for j in range(depths[i])
            ]))
            block_index += depths[i]
            self.feature_info.append(dict(num_chs=dims[i], reduction=2 ** (i + 2), module=f"stages.{i}"))

        if features_only:
            for i in self.out_indices:
                self.add_module(f"norm{i}", LayerNorm2d(dims[i]))
            self.feature_info = FeatureInfo(self.feature_info, self.out_indices)
        else:
            self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
            self.head_drop = nn.Dropout(drop_rate)
            self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)
        if not features_only and isinstance(self.head, nn.Linear):
            self.head.weight.data.mul_(head_init_scale)
            self.head.bias.data.mul_(head_init_scale)
        self.set_fused_branches(fused_branches)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise lr decay: stem, then stage blocks in order, then the head."""
        return dict(
            stem=r"^downsample_layers\.0\.",
            blocks=r"^(?:stages|downsample_layers|norm)\.?(\d+)" if coarse else [
                (r"^downsample_layers\.(\d+)\.", (0,)),
                (r"^stages\.(\d+)\.(\d+)\.", None),
                (r"^norm(\d+)\.", (99999,)),
                (r"^norm\.", (99999,)),
            ],
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names that should not get weight decay beyond biases and norms (layer scale, GRN)."""
        return {name for name, _ in self.named_parameters() if name.endswith((".gamma", ".beta"))}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass to save memory."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def set_fused_branches(self, enable: bool = True) -> None:
        """Compute every Dilated Reparam Block's branches in one grouped conv and one batch norm.

        The same function as the separate branches (outputs, gradients, BN running statistics) with
        the same parameters and state-dict keys; each branch kernel is zero-stuffed to KxK, so it
        trades FLOPs for fewer kernel launches and passes over the input.
        """
        for module in self.modules():
            if isinstance(module, DilatedReparamBlock):
                module.fused_branches = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a new one of ``num_classes`` outputs (0 removes it)."""
        if self.features_only:
            raise RuntimeError("a features_only model has no classifier")
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        device = self.norm.weight.device
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            self._init_weights(self.head)

    def _run_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample_layers[index](x)
        for block in self.stages[index]:
            if self.grad_checkpointing and x.requires_grad and not torch.jit.is_scripting():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward_intermediates_list(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalized feature maps of the stages in ``out_indices`` (features_only models)."""
        outputs = []
        for i in range(max(self.out_indices) + 1):
            x = self._run_stage(i, x)
            if i in self.out_indices:
                outputs.append(getattr(self, f"norm{i}")(x))
        return outputs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (N, C, H/32, W/32)."""
        for i in range(4):
            x = self._run_stage(i, x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, normalize and classify a feature map from ``forward_features``."""
        if self.global_pool == "avg":
            x = x.mean(dim=(-2, -1))
        x = self.norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.features_only:
            return self.forward_intermediates_list(x)
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def reparameterize(self) -> "UniRepLKNet":
        """Convert every block to the inference structure in place; returns self."""
        for module in self.modules():
            if isinstance(module, UniRepLKNetBlock):
                module.reparameterize()
        return self

    @property
    def deployed(self) -> bool:
        """True when every block is in the inference structure."""
        return all(
            isinstance(block.norm, nn.Identity) and len(block.pwconv2) == 2
            for stage in self.stages for block in stage)


def _default_kernel_sizes(depths: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    for _, (variant_depths, _, kernels) in VARIANTS.items():
        if variant_depths == depths:
            return kernels
    raise ValueError(f"no default kernel sizes for depths {depths}; pass kernel_sizes explicitly")


def reparameterize_model(model: nn.Module) -> nn.Module:
    """Re-parameterize every UniRepLKNet block inside ``model`` (any wrapper) in place."""
    for module in model.modules():
        if isinstance(module, UniRepLKNetBlock):
            module.reparameterize()
    return model


def _create_unireplknet(variant: str, pretrained: bool = False, **kwargs) -> UniRepLKNet:
    arch = variant.split(".")[0][len("unireplknet_"):]
    depths, dims, kernel_sizes = VARIANTS[arch]
    # timm's builder would wrap a features_only model in its own FeatureListNet; this model builds
    # its per-stage norms itself, so those two arguments go straight to the constructor.
    model_cls = partial(
        UniRepLKNet,
        features_only=kwargs.pop("features_only", False),
        out_indices=kwargs.pop("out_indices", (0, 1, 2, 3)),
    )
    model = build_model_with_cfg(
        model_cls, variant, pretrained=False, depths=depths, dims=dims, kernel_sizes=kernel_sizes, **kwargs)
    if pretrained:
        from .checkpoint import load_pretrained

        load_pretrained(model)
    return model


_HF_REPO = "DingXiaoH/UniRepLKNet"


def _cfg(filename: str = "", **kwargs) -> dict:
    return {
        "hf_hub_id": _HF_REPO if filename else None,
        "hf_hub_filename": filename or None,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "downsample_layers.0.0",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2311.15599",
        **kwargs,
    }


_IN22K = dict(num_classes=21841)
_AT_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0, crop_mode="squash")
"""At 384 the authors evaluate by warping the whole image to 384 x 384 (their ``datasets.py``)."""

default_cfgs = generate_default_cfgs({
    "unireplknet_a.in1k": _cfg("unireplknet_a_in1k_224_acc77.03.pth"),
    "unireplknet_f.in1k": _cfg("unireplknet_f_in1k_224_acc78.58.pth"),
    "unireplknet_p.in1k": _cfg("unireplknet_p_in1k_224_acc80.23.pth"),
    "unireplknet_n.in1k": _cfg("unireplknet_n_in1k_224_acc81.64.pth"),
    "unireplknet_t.in1k": _cfg("unireplknet_t_in1k_224_acc83.21.pth"),
    "unireplknet_s.in1k": _cfg("unireplknet_s_in1k_224_acc83.91.pth"),
    "unireplknet_s.in22k_ft_in1k_384": _cfg("unireplknet_s_in22k_to_in1k_384_acc86.44.pth", **_AT_384),
    "unireplknet_s.in22k": _cfg("unireplknet_s_in22k_pretrain.pth", **_IN22K),
    "unireplknet_b.in22k_ft_in1k_384": _cfg("unireplknet_b_in22k_to_in1k_384_acc87.40.pth", **_AT_384),
    "unireplknet_b.in22k": _cfg("unireplknet_b_in22k_pretrain.pth", **_IN22K),
    "unireplknet_l.in22k_ft_in1k_384": _cfg("unireplknet_l_in22k_to_in1k_384_acc87.88.pth", **_AT_384),
    "unireplknet_l.in22k": _cfg("unireplknet_l_in22k_pretrain.pth", input_size=(3, 192, 192), **_IN22K),
    "unireplknet_xl.in22k_ft_in1k_384": _cfg("unireplknet_xl_in22k_to_in1k_384_acc87.96.pth", **_AT_384),
    "unireplknet_xl.in22k": _cfg("unireplknet_xl_in22k_pretrain.pth", input_size=(3, 192, 192), **_IN22K),
})


@register_model
def unireplknet_a(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-A (atto), 4.4M params inference structure."""
    return _create_unireplknet("unireplknet_a", pretrained, **kwargs)


@register_model
def unireplknet_f(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-F (femto)."""
    return _create_unireplknet("unireplknet_f", pretrained, **kwargs)


@register_model
def unireplknet_p(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-P (pico)."""
    return _create_unireplknet("unireplknet_p", pretrained, **kwargs)


@register_model
def unireplknet_n(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-N (nano)."""
    return _create_unireplknet("unireplknet_n", pretrained, **kwargs)


@register_model
def unireplknet_t(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-T (tiny)."""
    return _create_unireplknet("unireplknet_t", pretrained, **kwargs)


@register_model
def unireplknet_s(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-S (small)."""
    return _create_unireplknet("unireplknet_s", pretrained, **kwargs)


@register_model
def unireplknet_b(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-B (base)."""
    return _create_unireplknet("unireplknet_b", pretrained, **kwargs)


@register_model
def unireplknet_l(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-L (large)."""
    return _create_unireplknet("unireplknet_l", pretrained, **kwargs)


@register_model
def unireplknet_xl(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-XL (extra large)."""
    return _create_unireplknet("unireplknet_xl", pretrained, **kwargs)
