"""The Triton depthwise kernels compiled for a real GPU, against torch's own conv on the same GPU.

Skipped without CUDA (CI has none: there the kernels are checked in Triton's interpreter by
``test_kernels.py``). ``.ci/gpu_check`` runs this file on a lent GPU machine.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unireplknet.kernels import depthwise_conv2d

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("triton")

# Largest |difference| relative to max |reference|: fp32 accumulation either way, inputs rounded.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def conv_reference(x, weight, bias, dilation):
    """float64 torch conv on the same (rounded) inputs, on the GPU."""
    padding = dilation * (weight.shape[-1] - 1) // 2
    return F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), 1, padding, dilation,
                    x.shape[1])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k, dilation", [(3, 1), (5, 2), (7, 3), (13, 1), (17, 1), (31, 1), (3, 5)])
def test_forward_and_gradients_match_torch_on_gpu(k, dilation, dtype, channels_last):
    generator = torch.Generator(device="cuda").manual_seed(k * 10 + dilation)
    x = torch.randn(4, 96, 28, 28, device="cuda", generator=generator).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(96, 1, k, k, device="cuda", generator=generator) / k).to(dtype)
    bias = torch.randn(96, device="cuda", generator=generator).to(dtype)
    grad = torch.randn(4, 96, 28, 28, device="cuda", generator=generator).to(dtype)

    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    out = depthwise_conv2d(*leaves, dilation=dilation, impl="triton")
    out.backward(grad)
    reference_leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    expected = conv_reference(*reference_leaves, dilation)
    expected.backward(grad.double())

    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last) == channels_last
    tolerance = TOLERANCE[dtype]
    assert relative_error(out, expected) < tolerance
    for leaf, reference_leaf, name in zip(leaves, reference_leaves, ("input", "weight", "bias")):
        assert relative_error(leaf.grad, reference_leaf.grad) < tolerance * 4, name


def test_auto_mode_records_a_choice_per_shape():
    from unireplknet.kernels import autotune_choices

    x = torch.randn(8, 64, 56, 56, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(64, 1, 13, 13, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    depthwise_conv2d(x, weight, impl="auto").float().sum().backward()
    choices = autotune_choices()
    assert choices and set(choices.values()) <= {"triton", "torch"}
