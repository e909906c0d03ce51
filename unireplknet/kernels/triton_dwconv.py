"""Triton kernels for a stride-1, "same"-padded depthwise conv with odd kernel size and dilation.

Every kernel works on a 3-D tile ``[BLOCK_H, BLOCK_W, BLOCK_C]`` of one image and indexes all
tensors by their strides, so NCHW and channels_last share one code path; only the tile shape
differs (NCHW: one channel, wide along W; channels_last: a block of channels along the contiguous
C axis). Products are accumulated in fp32 (fp64 for fp64 tensors).

On CPU the kernels run in Triton's interpreter, which needs ``TRITON_INTERPRET=1`` set before
``triton`` is first imported (``triton.jit`` reads it when decorating, ``triton.language``
included); ``unireplknet.kernels.depthwise`` imports this module lazily.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime import JITFunction

from .depthwise import _memory_format

__all__ = ["INTERPRETED", "dwconv_forward", "dwconv_grad_input", "dwconv_grad_weight"]

# Target number of programs for the weight-gradient reduction (a few waves on a large GPU).
_WGRAD_TARGET_PROGRAMS = 2048


@triton.jit
def _dwconv_tile_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr,
        C, H, W,
        sxn, sxc, sxh, sxw,
        syn, syc, syh, syw,
        swc, swt,
        K: tl.constexpr, DIL: tl.constexpr, FLIP: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y[n, c, h, w] = sum_ij x[n, c, h + i*DIL - P, w + j*DIL - P] * w[c, i, j] (+ b[c]).

    With ``FLIP`` the kernel is rotated by 180 degrees, which turns the forward into the input
    gradient (grad_x = grad_y correlated with the rotated kernel).
    """
    pid_nc = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_w = tl.program_id(2)
    num_cb = tl.cdiv(C, BLOCK_C)
    n = (pid_nc // num_cb).to(tl.int64)
    cb = pid_nc % num_cb
    PAD: tl.constexpr = DIL * (K - 1) // 2

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    h3 = offs_h[:, None, None]
    w3 = offs_w[None, :, None]
    c3 = offs_c[None, None, :]
    mask_c = c3 < C
    x_base = x_ptr + n * sxn + c3 * sxc
    w_base = w_ptr + c3 * swc

    acc = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=ACC)
    for i in range(K):
        ih = h3 + (i * DIL - PAD)
        mask_h = (ih >= 0) & (ih < H) & mask_c
        for j in range(K):
            iw = w3 + (j * DIL - PAD)
            mask = mask_h & (iw >= 0) & (iw < W)
            xv = tl.load(x_base + ih * sxh + iw * sxw, mask=mask, other=0.0).to(ACC)
            if FLIP:
                tap = (K - 1 - i) * K + (K - 1 - j)
            else:
                tap = i * K + j
            wv = tl.load(w_base + tap * swt, mask=mask_c, other=0.0).to(ACC)
            acc += xv * wv
    if HAS_BIAS:
        acc += tl.load(b_ptr + c3, mask=mask_c, other=0.0).to(ACC)

    out_mask = (h3 < H) & (w3 < W) & mask_c
    y_offs = n * syn + c3 * syc + h3 * syh + w3 * syw
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _dwconv_wgrad_kernel(
        x_ptr, gy_ptr, part_ptr,
        N, C, H, W,
        sxn, sxc, sxh, sxw,
        sgn, sgc, sgh, sgw,
        K: tl.constexpr, DIL: tl.constexpr, ACC: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """part[s, c, tap] = sum over tiles t = s, s + S, ... of grad_y * (x shifted by the tap).

    Grid: (channel blocks, S splits of the N*H*W tiles). The S partial sums are added on the host.
    """
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    PAD: tl.constexpr = DIL * (K - 1) // 2

    num_tw = tl.cdiv(W, BLOCK_W)
    tiles_per_image = tl.cdiv(H, BLOCK_H) * num_tw
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c3 = offs_c[None, None, :]
    mask_c = c3 < C
    arange_h = tl.arange(0, BLOCK_H)[:, None, None]
    arange_w = tl.arange(0, BLOCK_W)[None, :, None]
    part_base = part_ptr + (split * C + offs_c) * (K * K)

    for tap in range(K * K):
        dh = (tap // K) * DIL - PAD
        dw = (tap % K) * DIL - PAD
        acc = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=ACC)
        for t in range(split, N * tiles_per_image, num_splits):
            n = (t // tiles_per_image).to(tl.int64)
            rem = t % tiles_per_image
            h3 = (rem // num_tw) * BLOCK_H + arange_h
            w3 = (rem % num_tw) * BLOCK_W + arange_w
            mask_out = (h3 < H) & (w3 < W) & mask_c
            gy = tl.load(gy_ptr + n * sgn + c3 * sgc + h3 * sgh + w3 * sgw, mask=mask_out, other=0.0)
            ih = h3 + dh
            iw = w3 + dw
            mask_in = mask_out & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xv = tl.load(x_ptr + n * sxn + c3 * sxc + ih * sxh + iw * sxw, mask=mask_in, other=0.0)
            acc += gy.to(ACC) * xv.to(ACC)
        tl.store(part_base + tap, tl.sum(tl.sum(acc, axis=0), axis=0), mask=offs_c < C)


# True when the kernels (and triton.language) were decorated for Triton's CPU interpreter.
INTERPRETED = not isinstance(_dwconv_tile_kernel, JITFunction) and not isinstance(tl.zeros, JITFunction)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _tile(x: torch.Tensor) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_W, BLOCK_C): ~512 elements, vectorized along the contiguous axis. Untuned."""
    _, c, h, w = x.shape
    if _memory_format(x) == torch.channels_last:
        block_c = min(64, triton.next_power_of_2(c))
        block_w = min(triton.next_power_of_2(w), max(1, 512 // block_c))
        block_h = min(triton.next_power_of_2(h), max(1, 512 // (block_c * block_w)))
        return block_h, block_w, block_c
    block_w = min(64, triton.next_power_of_2(w))
    block_h = min(triton.next_power_of_2(h), max(1, 512 // block_w))
    return block_h, block_w, 1


def _launch_tile_kernel(x, weight, bias, out, dilation: int, flip: bool) -> torch.Tensor:
    n, c, h, w = x.shape
    k = weight.shape[-1]
    block_h, block_w, block_c = _tile(x)
    if block_c > 1:
        taps = weight.reshape(c, k * k).t().contiguous()  # (K*K, C): contiguous over channels
        swc, swt = taps.stride(1), taps.stride(0)
    else:
        taps = weight.reshape(c, k * k).contiguous()
        swc, swt = taps.stride(0), taps.stride(1)
    grid = (n * triton.cdiv(c, block_c), triton.cdiv(h, block_h), triton.cdiv(w, block_w))
    _dwconv_tile_kernel[grid](
        x, taps, taps if bias is None else bias, out,
        c, h, w,
        *x.stride(), *out.stride(),
        swc, swt,
        K=k, DIL=dilation, FLIP=flip, HAS_BIAS=bias is not None, ACC=_acc_dtype(x.dtype),
        BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c,
        num_warps=4,
    )
    return out


def dwconv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int) -> torch.Tensor:
    """Depthwise conv of ``x`` (N, C, H, W) with ``weight`` (C, 1, K, K); output has x's layout."""
    out = torch.empty_like(x, memory_format=_memory_format(x))
    return _launch_tile_kernel(x, weight, bias, out, dilation, flip=False)


def dwconv_grad_input(grad_y: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """Gradient w.r.t. the input: grad_y convolved with the 180-degree rotated kernel."""
    out = torch.empty_like(grad_y, memory_format=_memory_format(grad_y))
    return _launch_tile_kernel(grad_y, weight, None, out, dilation, flip=True)


def dwconv_grad_weight(grad_y: torch.Tensor, x: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """Gradient w.r.t. the weight (C, 1, K, K), reduced over N, H, W in two stages (in x's dtype)."""
    n, c, h, w = x.shape
    k = kernel_size
    block_h, block_w, block_c = _tile(x)
    num_cb = triton.cdiv(c, block_c)
    tiles = n * triton.cdiv(h, block_h) * triton.cdiv(w, block_w)
    splits = max(1, min(tiles, triton.cdiv(_WGRAD_TARGET_PROGRAMS, num_cb), 65535))
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    partial = torch.empty((splits, c, k * k), device=x.device, dtype=acc_dtype)
    _dwconv_wgrad_kernel[(num_cb, splits)](
        x, grad_y, partial,
        n, c, h, w,
        *x.stride(), *grad_y.stride(),
        K=k, DIL=dilation, ACC=_acc_dtype(x.dtype),
        BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c,
        num_warps=4,
    )
    return partial.sum(0).reshape(c, 1, k, k).to(x.dtype)
