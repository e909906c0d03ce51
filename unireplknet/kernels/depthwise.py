"""Depthwise large-kernel conv: custom ops around the Triton kernels, backend selection, module.

``depthwise_conv2d`` routes eligible calls through the ``unireplknet::dwconv2d`` custom op (with
``register_fake`` and ``register_autograd``, so ``torch.compile`` treats it as one opaque node);
everything else goes to ``F.conv2d``. Inside the op, forward, input-gradient and weight-gradient
each pick Triton or torch: forced by the mode, or in ``"auto"`` by a one-time timing per key
(:class:`BackendChoices`: shape bucketed, agreed across ranks in training, kept in checkpoints).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from types import ModuleType
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "BACKEND_CHOICES",
    "BackendChoices",
    "MODE_ENV",
    "DepthwiseConv2d",
    "depthwise_conv2d",
    "make_depthwise_conv",
    "plain_depthwise_conv",
    "triton_eligible",
    "autotune_choices",
]

_logger = logging.getLogger(__name__)

MODE_ENV = "UNIREPLKNET_DWCONV"
_MODES = ("auto", "triton", "torch")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MIN_KERNEL, _MAX_KERNEL = 3, 31
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

class BackendChoices:
    """The Triton-or-torch decisions of ``"auto"``, one per (pass, channels, kernel, dilation, dtype,
    layout, device type, size bucket): the bucket is the power of two at or above N*H*W, so
    multi-scale inputs and sliding windows reuse a decision instead of timing every new shape.

    A decision is timed once per key. Inside :meth:`collective` (every rank running the same
    shapes, as in a training step) rank 0's result is broadcast, so all ranks take the same kernel.
    :meth:`state_dict` / :meth:`load_state_dict` carry the table in checkpoints (a resumed run
    keeps its kernels); :meth:`sync` adopts rank 0's table everywhere. ``deterministic``: no
    timing, always torch (which honours ``torch.use_deterministic_algorithms``).
    """

    def __init__(self):
        self._table: dict[str, str] = {}
        self._collective = 0
        self.deterministic = False

    @staticmethod
    def key(name: str, x: torch.Tensor, weight: torch.Tensor, dilation: int) -> str:
        n, c, h, w = x.shape
        bucket = max(0, (n * h * w - 1).bit_length())
        layout = "nhwc" if _is_channels_last(x) else "nchw"
        return (f"{name}|C={c}|K={weight.shape[-1]}|d={dilation}|{str(x.dtype).removeprefix('torch.')}|{layout}|"
                f"{x.device.type}|px<=2^{bucket}")

    @contextlib.contextmanager
    def collective(self) -> Iterator[None]:
        """New decisions made inside are agreed across ranks (rank 0's timing wins): every rank must
        run the same sequence of convolutions inside, as data-parallel training steps do."""
        self._collective += 1
        try:
            yield
        finally:
            self._collective -= 1

    def get(self, key: str) -> str | None:
        return self._table.get(key)

    def decide(self, key: str, device: torch.device, time_triton: Callable[[], float],
               time_torch: Callable[[], float]) -> str:
        choice = self._table.get(key)
        if choice is not None:
            return choice
        if self.deterministic:
            choice = "torch"
        else:
            try:
                triton_ms = time_triton()
            except Exception as e:  # e.g. no Triton backend for this GPU: stay on torch for this key
                _logger.warning("Triton depthwise conv failed for %s (%s); using torch.", key, e)
                triton_ms = float("inf")
            torch_ms = time_torch()
            choice = "triton" if triton_ms < torch_ms else "torch"
            _logger.info("depthwise conv %s: triton %.3f ms, torch %.3f ms -> %s", key, triton_ms, torch_ms, choice)
        if self._collective and _distributed():
            import torch.distributed as dist

            flag = torch.tensor([1.0 if choice == "triton" else 0.0], device=device)
            dist.broadcast(flag, src=0)
            choice = "triton" if flag.item() == 1.0 else "torch"
        self._table[key] = choice
        return choice

    def state_dict(self) -> dict[str, str]:
        return dict(self._table)

    def load_state_dict(self, state: dict[str, str]) -> None:
        bad = {k: v for k, v in state.items() if v not in ("triton", "torch")}
        if bad:
            raise ValueError(f"depthwise conv choices must be 'triton' or 'torch', got {bad}")
        self._table.update(state)

    def sync(self) -> dict[str, str]:
        """Every rank: adopt rank 0's decisions (collective); returns the table."""
        if _distributed():
            import torch.distributed as dist

            holder = [self._table]
            dist.broadcast_object_list(holder, src=0)
            self._table.update(holder[0])
        return dict(self._table)

    def clear(self) -> None:
        self._table.clear()


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


BACKEND_CHOICES = BackendChoices()
"""The process-wide decisions of ``"auto"`` (the trainer syncs, saves and restores them)."""


def autotune_choices() -> dict[str, str]:
    """The backend picked per key so far by ``"auto"`` (a copy, for logging and debugging)."""
    return BACKEND_CHOICES.state_dict()


def _resolve_mode(impl: str | None) -> str:
    mode = (impl if impl is not None else os.environ.get(MODE_ENV, "auto")).lower()
    if mode not in _MODES:
        raise ValueError(f"depthwise conv implementation must be one of {_MODES}, got {mode!r}; "
                         f"check the `impl` argument or the {MODE_ENV} environment variable.")
    return mode


@functools.cache
def _kernels() -> ModuleType | None:
    """The Triton kernel module, imported on first use."""
    if not _TRITON_INSTALLED:
        return None
    try:
        from . import triton_dwconv
    except Exception as e:  # a broken Triton install must not take the model down
        _logger.warning("Triton kernels for depthwise conv unavailable (%s); using torch.", e)
        return None
    return triton_dwconv


@functools.cache
def _warn_once(message: str) -> None:
    _logger.warning(message)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout of every activation-shaped output: channels_last if ``x`` is, else contiguous."""
    return torch.channels_last if _is_channels_last(x) else torch.contiguous_format


def triton_eligible(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        dilation: int = 1,
        stride: int = 1,
) -> bool:
    """Whether the Triton kernels cover this call: depthwise, odd square K in [3, 31], stride 1."""
    if x.dim() != 4 or weight.dim() != 4 or stride != 1 or dilation < 1:
        return False
    channels, k = x.shape[1], weight.shape[-1]
    if tuple(weight.shape) != (channels, 1, k, k) or k % 2 == 0 or not _MIN_KERNEL <= k <= _MAX_KERNEL:
        return False
    if x.dtype not in _DTYPES or weight.dtype != x.dtype or weight.device != x.device or x.numel() == 0:
        return False
    return bias is None or (tuple(bias.shape) == (channels,) and bias.dtype == x.dtype)


def _can_run_triton(x: torch.Tensor) -> bool:
    kernels = _kernels()
    return kernels is not None and (x.is_cuda or kernels.INTERPRETED)


def _timed_ms(fn: Callable[[], object], reps: int = 5) -> float:
    for _ in range(2):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[reps // 2]


def _pick(name: str, x: torch.Tensor, weight: torch.Tensor, dilation: int, mode: str,
          run_triton: Callable[[], torch.Tensor], run_torch: Callable[[], torch.Tensor]) -> str:
    """``"triton"`` or ``"torch"`` for one pass; in ``"auto"`` the faster of the two, timed once per shape."""
    if mode == "torch":
        return "torch"
    if not _can_run_triton(x):
        if mode == "triton":
            _warn_once(f"{MODE_ENV}=triton needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                       "first imported; falling back to torch.")
        return "torch"
    if mode == "triton":
        return "triton"
    if not x.is_cuda:
        return "torch"
    key = BackendChoices.key(name, x, weight, dilation)
    if torch.cuda.is_current_stream_capturing():
        return BACKEND_CHOICES.get(key) or "torch"
    return BACKEND_CHOICES.decide(key, x.device, lambda: _timed_ms(run_triton), lambda: _timed_ms(run_torch))


def _padding(weight: torch.Tensor, dilation: int) -> int:
    return dilation * (weight.shape[-1] - 1) // 2


@torch.library.custom_op("unireplknet::dwconv2d", mutates_args=())
def _dwconv2d(
        x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int, mode: str) -> torch.Tensor:
    def run_triton():
        return _kernels().dwconv_forward(x, weight, bias, dilation)

    def run_torch():
        y = F.conv2d(x, weight, bias, 1, _padding(weight, dilation), dilation, x.shape[1])
        return y.contiguous(memory_format=_memory_format(x))

    choice = _pick("forward", x, weight, dilation, mode, run_triton, run_torch)
    return run_triton() if choice == "triton" else run_torch()


@_dwconv2d.register_fake
def _(x, weight, bias, dilation, mode):
    return torch.empty_like(x, memory_format=_memory_format(x))


@torch.library.custom_op("unireplknet::dwconv2d_grad_input", mutates_args=())
def _dwconv2d_grad_input(grad_y: torch.Tensor, weight: torch.Tensor, dilation: int, mode: str) -> torch.Tensor:
    def run_triton():
        return _kernels().dwconv_grad_input(grad_y, weight, dilation)

    def run_torch():
        flipped = weight.flip((-2, -1))
        grad_x = F.conv2d(grad_y, flipped, None, 1, _padding(weight, dilation), dilation, grad_y.shape[1])
        return grad_x.contiguous(memory_format=_memory_format(grad_y))

    choice = _pick("grad_input", grad_y, weight, dilation, mode, run_triton, run_torch)
    return run_triton() if choice == "triton" else run_torch()


@_dwconv2d_grad_input.register_fake
def _(grad_y, weight, dilation, mode):
    return torch.empty_like(grad_y, memory_format=_memory_format(grad_y))


@torch.library.custom_op("unireplknet::dwconv2d_grad_weight", mutates_args=())
def _dwconv2d_grad_weight(
        grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dilation: int, mode: str) -> torch.Tensor:
    def run_triton():
        return _kernels().dwconv_grad_weight(grad_y, x, weight.shape[-1], dilation)

    def run_torch():
        pad = _padding(weight, dilation)
        return torch.ops.aten.convolution_backward(
            grad_y, x, weight, None, [1, 1], [pad, pad], [dilation, dilation], False, [0, 0], x.shape[1],
            [False, True, False])[1].contiguous()

    choice = _pick("grad_weight", x, weight, dilation, mode, run_triton, run_torch)
    return run_triton() if choice == "triton" else run_torch()


@_dwconv2d_grad_weight.register_fake
def _(grad_y, x, weight, dilation, mode):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, weight, bias, dilation, mode = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.dilation, ctx.mode = dilation, mode


def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    grad_y = grad_y.contiguous(memory_format=_memory_format(x))
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _dwconv2d_grad_input(grad_y, weight, ctx.dilation, ctx.mode)
    if ctx.needs_input_grad[1]:
        grad_w = _dwconv2d_grad_weight(grad_y, x, weight, ctx.dilation, ctx.mode)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad_y.sum((0, 2, 3), dtype=torch.promote_types(grad_y.dtype, torch.float32)).to(grad_y.dtype)
    return grad_x, grad_w, grad_b, None, None


_dwconv2d.register_autograd(_backward, setup_context=_setup_context)


def depthwise_conv2d(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        dilation: int = 1,
        stride: int = 1,
        impl: str | None = None,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding=dilation * (K - 1) // 2, dilation, groups=C)``.

    Args:
        x: input (N, C, H, W), NCHW or channels_last; the output has the same memory format.
        weight: (C, 1, K, K) depthwise kernel; any other shape falls back to ``F.conv2d``.
        bias: optional (C,) bias.
        dilation: dilation of the kernel taps.
        stride: only 1 uses the Triton kernels.
        impl: ``"auto"``, ``"triton"`` or ``"torch"``; ``None`` reads ``UNIREPLKNET_DWCONV``
            (default ``"auto"``). ``"auto"`` considers Triton only for CUDA tensors.
    """
    mode = _resolve_mode(impl)
    use_op = mode == "triton" or (mode == "auto" and x.is_cuda and _TRITON_INSTALLED)
    if use_op and torch.is_autocast_enabled(x.device.type):
        # What autocast does for F.conv2d (the custom op itself is not autocast-aware).
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if use_op and triton_eligible(x, weight, bias, dilation, stride):
        x = x.contiguous(memory_format=_memory_format(x))
        return _dwconv2d(x, weight.contiguous(), bias, dilation, mode)
    groups = x.shape[1] // weight.shape[1]
    padding = dilation * (weight.shape[-1] - 1) // 2
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class DepthwiseConv2d(nn.Conv2d):
    """Drop-in for ``nn.Conv2d(C, C, K, padding=dilation * (K - 1) // 2, dilation=dilation, groups=C)``.

    Same parameters (``weight`` (C, 1, K, K), optional ``bias``), state-dict keys and init as that
    conv; only ``forward`` differs, going through ``depthwise_conv2d``.
    """

    def __init__(
            self,
            channels: int,
            kernel_size: int,
            dilation: int = 1,
            bias: bool = False,
            device: torch.device | None = None,
            dtype: torch.dtype | None = None,
    ):
        super().__init__(
            channels, channels, kernel_size, padding=dilation * (kernel_size - 1) // 2, dilation=dilation,
            groups=channels, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(x, self.weight, self.bias, self.dilation[0])


def make_depthwise_conv(channels: int, kernel_size: int, dilation: int = 1, bias: bool = False) -> nn.Conv2d:
    """A stride-1 "same"-padded depthwise conv: ``DepthwiseConv2d`` when the fast path can apply.

    Plain ``nn.Conv2d`` (same parameters and keys) when ``UNIREPLKNET_DWCONV=torch``, Triton is
    not installed, or the kernel size is outside the Triton kernels' range (even, < 3 or > 31).
    """
    fast = (_resolve_mode(None) != "torch" and _TRITON_INSTALLED
            and kernel_size % 2 == 1 and _MIN_KERNEL <= kernel_size <= _MAX_KERNEL)
    if fast:
        return DepthwiseConv2d(channels, kernel_size, dilation=dilation, bias=bias)
    return plain_depthwise_conv(channels, kernel_size, dilation=dilation, bias=bias)


def plain_depthwise_conv(channels: int, kernel_size: int, dilation: int = 1, bias: bool = False) -> nn.Conv2d:
    """The same conv as a plain ``nn.Conv2d`` (torch's own kernels only)."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Conv2d(channels, channels, kernel_size, padding=padding, dilation=dilation, groups=channels, bias=bias)
