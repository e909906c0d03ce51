"""Fast depthwise large-kernel convolution (Triton), with torch as the fallback.

What the Triton path covers:
    depthwise (weight (C, 1, K, K)), odd square K in [3, 31], stride 1, "same" padding
    ``dilation * (K - 1) // 2``, any dilation >= 1; fp16 / bf16 (fp32 accumulation), fp32, fp64;
    NCHW and channels_last (the output keeps the input's memory format; other strided inputs
    are made contiguous first). Forward with optional bias, input gradient (the forward kernel
    with the rotated kernel) and weight gradient (a tiled fp32 reduction over N*H*W, split over
    programs and summed in a second stage). Double backward is not supported.

What falls back to ``F.conv2d``:
    everything else (even or out-of-range K, stride != 1, non-depthwise weights, mixed dtypes),
    CPU tensors unless forced into the Triton interpreter, and ``UNIREPLKNET_DWCONV=torch``.

Choosing the backend (``impl=`` argument of ``depthwise_conv2d``, else ``UNIREPLKNET_DWCONV``):
    ``auto`` (default): CUDA tensors go through the ``unireplknet::dwconv2d`` custom op, whose
        forward, input-gradient and weight-gradient passes each time Triton against torch once
        per (channels, K, dilation, dtype, layout, size bucket = next power of two of N*H*W) on
        first use (2 warm-up + 5 timed runs, median) and keep the faster (``BACKEND_CHOICES``;
        ``autotune_choices()`` lists the decisions). The trainer makes new decisions collectively
        in training steps (rank 0's timing wins), syncs the table before every checkpoint and
        restores it on resume; ``train.deterministic`` skips timing and uses torch. Nothing is
        timed during CUDA-graph capture (a known decision, else torch). CPU tensors use ``F.conv2d``.
    ``triton``: always the Triton kernels when eligible; on CPU this needs ``TRITON_INTERPRET=1``
        in the environment before ``triton`` is first imported (``import timm`` imports it), e.g.
        ``TRITON_INTERPRET=1 UNIREPLKNET_DWCONV=triton python ...``; otherwise torch, with a warning.
    ``torch``: always ``F.conv2d``; ``make_depthwise_conv`` then builds plain ``nn.Conv2d``.

``torch.compile``: the custom op has fake (meta) implementations and a registered autograd
formula, so compiled graphs keep it as one node (no graph break); the backend choice is made at
run time inside the op.

Usage::

    from unireplknet.kernels import make_depthwise_conv
    conv = make_depthwise_conv(channels=256, kernel_size=13, dilation=1, bias=True)
    y = conv(x)  # same parameters and state-dict keys as nn.Conv2d(..., groups=channels)

``fused_dilated_reparam_forward(block, x)`` (``fused_drb``) computes a training-structure Dilated
Reparam Block as one grouped conv of zero-stuffed KxK kernels and one batch norm over all branches;
``UniRepLKNet(fused_branches=True)`` or ``model.set_fused_branches(True)`` switches it on.
"""
from .depthwise import (
    BACKEND_CHOICES,
    MODE_ENV,
    BackendChoices,
    DepthwiseConv2d,
    autotune_choices,
    depthwise_conv2d,
    make_depthwise_conv,
    plain_depthwise_conv,
    triton_eligible,
)
from .fused_drb import fused_dilated_reparam_forward, stacked_branch_kernels

__all__ = [
    "BACKEND_CHOICES",
    "BackendChoices",
    "MODE_ENV",
    "DepthwiseConv2d",
    "autotune_choices",
    "depthwise_conv2d",
    "fused_dilated_reparam_forward",
    "make_depthwise_conv",
    "plain_depthwise_conv",
    "stacked_branch_kernels",
    "triton_eligible",
]
