"""The training-structure forward of a Dilated Reparam Block as one grouped conv and one batch norm.

The plain block runs B = 1 + len(branches) depthwise convs (the KxK ``lk_origin`` and the dilated
small kernels), B BatchNorms and B - 1 additions. A dilated branch (kernel k, dilation r) is a dense
conv with the zero-stuffed kernel of size r(k-1)+1 <= K, so every branch fits, centred, in a KxK
kernel. :func:`fused_dilated_reparam_forward` stacks those kernels as B output channels per input
channel, runs one grouped conv (groups=C, channel ``c * B + b`` is branch b of channel c), one
``F.batch_norm`` over the C*B channels with the branches' own affine parameters and running
statistics, and sums over the branch axis.

Same function as the plain block, not an approximation: per-channel batch statistics, the
normalization and the running-statistics update are those of the B separate BatchNorms (including
``num_batches_tracked`` and ``momentum=None``, the cumulative average), and gradients reach the
block's own conv weights and BN affine parameters. No parameter or buffer is added, so the state
dict is unchanged. The cost: each branch is computed at KxK, e.g. 6 * 169 = 1014 taps per output
pixel at K=13 instead of 169 + 25 + 49 + 3 * 9 = 270.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["fused_dilated_reparam_forward", "stacked_branch_kernels"]


def _branch_modules(block: nn.Module) -> tuple[list[nn.Conv2d], list[nn.BatchNorm2d]]:
    """The block's convs and BNs in branch order: ``lk_origin`` / ``origin_bn`` first, then ``block.branches``."""
    _, convs, norms = zip(*block.branch_layers())
    return list(convs), list(norms)


def stacked_branch_kernels(block: nn.Module) -> torch.Tensor:
    """Every branch's kernel zero-stuffed and centred in KxK, as a (C * B, 1, K, K) grouped-conv weight.

    Built with differentiable slice assignments (no extra conv launches, unlike the transposed conv
    of ``dilated_to_dense_kernel``), so gradients flow back to each branch's weight.
    """
    layers, size = block.branch_layers(), block.kernel_size
    lk_weight = layers[0][1].weight
    channels = lk_weight.shape[0]
    stacked = lk_weight.new_zeros(channels, len(layers), size, size)
    for index, (dilation, conv, _) in enumerate(layers):
        span = dilation * (conv.weight.shape[-1] - 1) + 1
        start = (size - span) // 2
        stacked[:, index, start:start + span:dilation, start:start + span:dilation] = conv.weight[:, 0]
    return stacked.reshape(channels * len(layers), 1, size, size)


def _check_fusable(convs: list[nn.Conv2d], norms: list[nn.BatchNorm2d]) -> None:
    """Reject what one grouped conv and one ``F.batch_norm`` call cannot reproduce exactly."""
    if any(conv.bias is not None for conv in convs):
        raise ValueError("fused Dilated Reparam Block expects bias-free branch convs (the training structure)")
    for norm in norms:
        if type(norm) is not nn.BatchNorm2d:
            raise ValueError(
                f"fused Dilated Reparam Block supports nn.BatchNorm2d only, got {type(norm).__name__} "
                "(e.g. SyncBatchNorm's cross-process statistics are not reproduced); turn fused_branches off")
    settings = {
        (n.training, n.eps, n.momentum, n.affine, n.track_running_stats, n.running_mean is None) for n in norms}
    if len(settings) > 1:
        raise ValueError(
            "fused Dilated Reparam Block needs every branch BatchNorm to share training mode, eps, momentum, "
            f"affine and track_running_stats; got (training, eps, momentum, affine, track, no buffers) = {settings}")
    first = norms[0]
    if first.momentum is None and first.training and first.track_running_stats:
        if len({int(n.num_batches_tracked) for n in norms}) > 1:
            raise ValueError(
                "fused Dilated Reparam Block with momentum=None (cumulative average) needs equal "
                "num_batches_tracked in every branch BatchNorm")


def _stack_channels(tensors: list[torch.Tensor]) -> torch.Tensor:
    """B tensors of shape (C,) -> (C * B,) in the grouped conv's channel order ``c * B + b``."""
    return torch.stack(tensors, dim=1).reshape(-1)


def _sum_branches(y: torch.Tensor, num_branches: int) -> torch.Tensor:
    """(N, C * B, H, W) -> (N, C, H, W), summing each channel's B branches; channels_last stays channels_last."""
    if y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous():
        return y.permute(0, 2, 3, 1).unflatten(3, (-1, num_branches)).sum(4).permute(0, 3, 1, 2)
    return y.unflatten(1, (-1, num_branches)).sum(2)


def fused_dilated_reparam_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The training-structure forward of ``block`` (a ``DilatedReparamBlock``) in one conv and one batch norm.

    Mirrors ``nn.BatchNorm2d.forward`` for every branch BN: in training mode with tracked statistics
    each BN's ``num_batches_tracked`` is incremented and its running mean/var updated with its own
    momentum; in eval mode the running statistics normalize.
    """
    convs, norms = _branch_modules(block)
    _check_fusable(convs, norms)
    channels = x.shape[1]
    num_branches = len(convs)
    y = F.conv2d(x, stacked_branch_kernels(block), None, 1, block.kernel_size // 2, 1, channels)

    first = norms[0]
    factor = 0.0 if first.momentum is None else first.momentum
    if first.training and first.track_running_stats:
        for norm in norms:
            norm.num_batches_tracked.add_(1)
        if first.momentum is None:
            factor = 1.0 / float(first.num_batches_tracked)
    use_batch_stats = first.training or first.running_mean is None
    pass_running = first.running_mean is not None and (not first.training or first.track_running_stats)
    running_mean = _stack_channels([n.running_mean for n in norms]) if pass_running else None
    running_var = _stack_channels([n.running_var for n in norms]) if pass_running else None
    weight = _stack_channels([n.weight for n in norms]) if first.affine else None
    bias = _stack_channels([n.bias for n in norms]) if first.affine else None

    y = F.batch_norm(y, running_mean, running_var, weight, bias, use_batch_stats, factor, first.eps)
    if pass_running and use_batch_stats:
        with torch.no_grad():
            for index, norm in enumerate(norms):
                norm.running_mean.copy_(running_mean.view(channels, num_branches)[:, index])
                norm.running_var.copy_(running_var.view(channels, num_branches)[:, index])
    return _sum_branches(y, num_branches)
