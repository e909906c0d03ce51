"""Depthwise large-kernel conv: Triton kernels vs ``F.conv2d`` (forward, gradients), custom op, dispatch.

The Triton kernels run on CPU in Triton's interpreter, which needs ``TRITON_INTERPRET=1`` before
``triton`` is first imported; in a full test run ``timm`` has imported it already. So those tests
run in a child pytest process started with that variable (``test_triton_kernels_in_interpreter``)
and are skipped in the parent; ``TRITON_INTERPRET=1 pytest tests/test_kernels.py`` runs them directly.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from unireplknet.kernels import DepthwiseConv2d, depthwise_conv2d, make_depthwise_conv, triton_eligible
from unireplknet.kernels import depthwise as dw

pytest.importorskip("triton")

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    not IN_INTERPRETER, reason="runs in the TRITON_INTERPRET=1 child of test_triton_kernels_in_interpreter")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls into the Triton launchers (proves which backend ran)."""
    kernels = dw._kernels()
    calls = {"forward": 0, "grad_input": 0, "grad_weight": 0}
    for name in calls:
        launcher = getattr(kernels, f"dwconv_{name}")

        def counted(*args, _name=name, _launcher=launcher):
            calls[_name] += 1
            return _launcher(*args)

        monkeypatch.setattr(kernels, f"dwconv_{name}", counted)
    return calls


def make_inputs(shape, k, dtype=torch.float32, channels_last=False, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, k, k, generator=g, dtype=torch.float64).to(dtype) / k
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return x, weight, b


def reference(x, weight, bias, dilation):
    """fp64 ``F.conv2d`` on the same (possibly rounded) inputs."""
    pad = dilation * (weight.shape[-1] - 1) // 2
    b = None if bias is None else bias.double()
    return F.conv2d(x.double(), weight.double(), b, 1, pad, dilation, x.shape[1])


def test_triton_kernels_in_interpreter():
    if IN_INTERPRETER:
        pytest.skip("already running in the Triton interpreter")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("UNIREPLKNET_DWCONV", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


@interpreted
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize("k", [3, 5, 7, 13])
def test_forward_fp32_matches_conv2d(k, dilation, channels_last, kernel_calls):
    # Odd sizes, smaller than the effective kernel for the larger K and dilations.
    x, weight, bias = make_inputs((1, 3, 9, 7), k, channels_last=channels_last, bias=(k + dilation) % 2 == 0)
    y = depthwise_conv2d(x, weight, bias, dilation, impl="triton")
    assert kernel_calls["forward"] == 1
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(y.double(), reference(x, weight, bias, dilation), rtol=1e-5, atol=1e-5)


@interpreted
@pytest.mark.parametrize("k, dilation, channels_last", [(31, 1, False), (17, 2, True)])
def test_forward_largest_kernels(k, dilation, channels_last, kernel_calls):
    x, weight, bias = make_inputs((1, 2, 7, 11), k, channels_last=channels_last)
    y = depthwise_conv2d(x, weight, bias, dilation, impl="triton")
    assert kernel_calls["forward"] == 1
    torch.testing.assert_close(y.double(), reference(x, weight, bias, dilation), rtol=1e-5, atol=1e-5)


@interpreted
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_half_precision_accumulates_in_fp32(dtype, channels_last):
    # fp32 accumulation leaves only the final rounding: within one ulp of the fp64 result.
    x, weight, bias = make_inputs((2, 3, 8, 9), 7, dtype=dtype, channels_last=channels_last)
    y = depthwise_conv2d(x, weight, bias, 2, impl="triton")
    assert y.dtype == dtype
    ref = reference(x, weight, bias, 2)
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(y.double(), ref, rtol=ulp, atol=ulp)


def conv_grads(fn, x, weight, bias, grad_y):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    bias = None if bias is None else bias.detach().requires_grad_()
    fn(x, weight, bias).backward(grad_y)
    return x.grad, weight.grad, None if bias is None else bias.grad


@interpreted
@pytest.mark.parametrize("k, dilation, channels_last, grad_channels_last", [
    (3, 1, False, False),
    (5, 3, True, True),
    (7, 2, False, True),
    (13, 1, True, False),
])
def test_backward_fp32_matches_autograd(k, dilation, channels_last, grad_channels_last, kernel_calls):
    x, weight, bias = make_inputs((2, 2, 9, 7), k, channels_last=channels_last)
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    if grad_channels_last:
        grad_y = grad_y.contiguous(memory_format=torch.channels_last)
    got = conv_grads(lambda *a: depthwise_conv2d(*a, dilation, impl="triton"), x, weight, bias, grad_y)
    want = conv_grads(lambda *a: reference(*a, dilation), x.double(), weight.double(), bias.double(), grad_y.double())
    assert kernel_calls == {"forward": 1, "grad_input": 1, "grad_weight": 1}
    assert got[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_half_precision(dtype):
    x, weight, bias = make_inputs((1, 4, 8, 8), 5, dtype=dtype, channels_last=True)
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = conv_grads(lambda *a: depthwise_conv2d(*a, 2, impl="triton"), x, weight, bias, grad_y)
    want = conv_grads(lambda *a: reference(*a, 2), x.double(), weight.double(), bias.double(), grad_y.double())
    ulp = torch.finfo(dtype).eps
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w, rtol=ulp, atol=ulp * w.abs().max().item())


@interpreted
@pytest.mark.parametrize("k, dilation, channels_last, fast_mode", [
    (3, 1, False, False),
    (3, 2, True, True),
    (5, 1, False, True),
])
def test_gradcheck_float64(k, dilation, channels_last, fast_mode, kernel_calls):
    # The interpreter runs the kernels in float64 (fp64 accumulation too); full-mode gradcheck
    # costs one kernel launch per input element, so the larger cases use fast_mode.
    x, weight, bias = make_inputs((1, 2, 5, 4) if not fast_mode else (2, 3, 6, 5), k, torch.float64, channels_last)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(
        lambda *a: depthwise_conv2d(*a, dilation, impl="triton"), inputs, fast_mode=fast_mode)
    assert all(kernel_calls.values())


@interpreted
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_custom_ops_pass_opcheck(channels_last):
    x, weight, bias = make_inputs((1, 2, 6, 5), 5, channels_last=channels_last)
    grad_y = torch.randn_like(x)
    torch.library.opcheck(
        torch.ops.unireplknet.dwconv2d, (x.requires_grad_(), weight.requires_grad_(), bias, 2, "triton"))
    torch.library.opcheck(torch.ops.unireplknet.dwconv2d_grad_input, (grad_y, weight.detach(), 2, "triton"))
    torch.library.opcheck(
        torch.ops.unireplknet.dwconv2d_grad_weight, (grad_y, x.detach(), weight.detach(), 2, "triton"))


@interpreted
def test_torch_compile_keeps_custom_op_in_one_graph(monkeypatch, kernel_calls):
    monkeypatch.setenv(dw.MODE_ENV, "triton")
    torch._dynamo.reset()
    conv = DepthwiseConv2d(3, 5, dilation=2, bias=True)
    x = torch.randn(2, 3, 7, 6).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(conv, backend="aot_eager", fullgraph=True)
    y = compiled(x.requires_grad_())
    y.square().sum().backward()
    assert kernel_calls == {"forward": 1, "grad_input": 1, "grad_weight": 1}
    grads = [x.grad, conv.weight.grad, conv.bias.grad]
    ref = conv_grads(lambda *a: reference(*a, 2), x.double(), conv.weight.double(), conv.bias.double(),
                     2 * reference(x, conv.weight, conv.bias, 2))
    torch.testing.assert_close(y.double(), reference(x, conv.weight, conv.bias, 2), rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, ref):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


@interpreted
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_autocast_runs_kernels_in_autocast_dtype(x_dtype, kernel_calls):
    # bf16 activations with fp32 weights is the usual case inside an autocast model.
    x, weight, bias = make_inputs((1, 2, 6, 6), 3)
    x = x.to(x_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = depthwise_conv2d(x, weight, bias, impl="triton")
        want = F.conv2d(x, weight, bias, padding=1, groups=2)
    assert kernel_calls["forward"] == 1
    assert y.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(y, want)


@pytest.mark.skipif(IN_INTERPRETER, reason="compiles the non-interpreted kernels")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernels_compile_for_cuda(dtype, channels_last):
    # Full Triton compile down to an sm_90 cubin with the bundled ptxas; needs no GPU.
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = dw._kernels()
    x = torch.empty(64, 128, 56, 56, device="meta", dtype=dtype)
    block_h, block_w, block_c = kernels._tile(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    elem = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    blocks = dict(ACC=tl.float32, BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c)
    for fn, pointers, constexprs in [
        (kernels._dwconv_tile_kernel, dict(x_ptr=elem, w_ptr=elem, b_ptr=elem, y_ptr=elem),
         dict(K=31, DIL=1, FLIP=True, HAS_BIAS=True, **blocks)),
        (kernels._dwconv_wgrad_kernel, dict(x_ptr=elem, gy_ptr=elem, part_ptr="fp32"), dict(K=13, DIL=2, **blocks)),
    ]:
        signature = {name: "constexpr" if name in constexprs else f"*{pointers[name]}" if name in pointers else "i32"
                     for name in fn.arg_names}
        source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert compiled.asm["cubin"]


@pytest.mark.parametrize("weight_shape, stride, groups", [
    ((4, 1, 4, 4), 1, 4),     # even kernel
    ((4, 1, 3, 3), 2, 4),     # stride 2
    ((6, 2, 3, 3), 1, 2),     # grouped, not depthwise
    ((4, 1, 33, 33), 1, 4),   # beyond the largest supported kernel
], ids=["even_kernel", "stride_2", "grouped", "kernel_33"])
def test_unsupported_calls_fall_back_to_torch(weight_shape, stride, groups, monkeypatch):
    monkeypatch.setattr(dw, "_dwconv2d", lambda *a: pytest.fail("custom op used for an unsupported call"))
    x, weight = torch.randn(1, 4, 9, 9), torch.randn(weight_shape)
    assert not triton_eligible(x, weight, dilation=2, stride=stride)
    y = depthwise_conv2d(x, weight, None, 2, stride=stride, impl="triton")
    pad = 2 * (weight.shape[-1] - 1) // 2
    torch.testing.assert_close(y, F.conv2d(x, weight, None, stride, pad, 2, groups))


def test_eligibility_requires_matching_dtypes_and_bias_shape():
    x, weight = torch.randn(1, 4, 9, 9), torch.randn(4, 1, 5, 5)
    assert triton_eligible(x, weight, torch.randn(4), dilation=3)
    assert not triton_eligible(x, weight.double())
    assert not triton_eligible(x, weight, torch.randn(5))
    assert not triton_eligible(x.half(), weight.half(), torch.randn(4))


def test_auto_uses_torch_on_cpu(monkeypatch):
    monkeypatch.setattr(dw, "_dwconv2d", lambda *a: pytest.fail("custom op used on CPU in auto mode"))
    x, weight, bias = make_inputs((1, 3, 8, 8), 7)
    y = depthwise_conv2d(x, weight, bias, 1, impl="auto")
    torch.testing.assert_close(y, F.conv2d(x, weight, bias, padding=3, groups=3))


def test_invalid_mode_names_the_env_var(monkeypatch):
    monkeypatch.setenv(dw.MODE_ENV, "cuda")
    with pytest.raises(ValueError, match=dw.MODE_ENV):
        depthwise_conv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3))


def test_module_is_a_drop_in_for_conv2d():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 7, padding=6, dilation=2, groups=4, bias=True)
    fast = DepthwiseConv2d(4, 7, dilation=2, bias=True)
    assert isinstance(fast, nn.Conv2d)
    assert {k: v.shape for k, v in fast.state_dict().items()} == {k: v.shape for k, v in conv.state_dict().items()}
    fast.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(fast(x), conv(x))


def test_factory_picks_module_by_mode_and_kernel(monkeypatch):
    monkeypatch.setenv(dw.MODE_ENV, "auto")
    assert type(make_depthwise_conv(8, 13, bias=True)) is DepthwiseConv2d
    assert type(make_depthwise_conv(8, 4)) is nn.Conv2d
    monkeypatch.setenv(dw.MODE_ENV, "torch")
    conv = make_depthwise_conv(8, 5, dilation=3)
    assert type(conv) is nn.Conv2d and conv.padding == (6, 6) and conv.groups == 8 and conv.bias is None
