"""Fused Dilated Reparam Block: the same function as the plain six-branch module (outputs, gradients,
BN running statistics), checked against an independent deep copy running the plain branches."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from unireplknet import UniRepLKNet
from unireplknet.kernels import fused_dilated_reparam_forward, stacked_branch_kernels
from unireplknet.model import DILATED_BRANCHES, DilatedReparamBlock, dilated_to_dense_kernel
from unireplknet.tools import max_relative_difference, randomize_statistics

TOLERANCE = 1e-10
# Absolute floor: a gradient that is zero in exact arithmetic (GRN's beta in front of a training-mode
# BN) holds only float64 rounding noise, ~1e-15.
NOISE_FLOOR = 1e-13
CHANNELS = 6


def assert_close(expected: torch.Tensor, actual: torch.Tensor, what: str) -> None:
    """max |expected - actual| below TOLERANCE relative to max |expected| (or below NOISE_FLOOR)."""
    error = (expected - actual).abs().max().item()
    assert error <= max(TOLERANCE * expected.abs().max().item(), NOISE_FLOOR), f"{what}: {error}"


def random_block(kernel_size: int, seed: int = 0) -> DilatedReparamBlock:
    """A float64 block with random conv weights, BN affines and running statistics."""
    torch.manual_seed(seed)
    block = DilatedReparamBlock(CHANNELS, kernel_size).double()
    randomize_statistics(block, torch.Generator().manual_seed(seed + 1))
    for module in block.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight)
    return block


def fused_copy(module: nn.Module) -> nn.Module:
    fused = copy.deepcopy(module)
    for block in fused.modules():
        if isinstance(block, DilatedReparamBlock):
            block.fused_branches = True
    return fused


def assert_same_step(plain: nn.Module, fused: nn.Module, x: torch.Tensor) -> None:
    """One forward/backward of both modules: outputs, input and parameter gradients, buffers."""
    x_plain, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_plain, y_fused = plain(x_plain), fused(x_fused)
    assert max_relative_difference(y_plain, y_fused) < TOLERANCE
    upstream = torch.randn_like(y_plain)
    (y_plain * upstream).sum().backward()
    (y_fused * upstream).sum().backward()
    assert max_relative_difference(x_plain.grad, x_fused.grad) < TOLERANCE
    assert_same_state(plain, fused)


def assert_same_state(plain: nn.Module, fused: nn.Module) -> None:
    """Parameters, their gradients and every buffer (num_batches_tracked exactly) agree."""
    fused_params = dict(fused.named_parameters())
    assert set(fused_params) == {name for name, _ in plain.named_parameters()}
    for name, param in plain.named_parameters():
        assert_close(param, fused_params[name], name)
        assert (param.grad is None) == (fused_params[name].grad is None), name
        if param.grad is not None:
            assert_close(param.grad, fused_params[name].grad, f"{name}.grad")
    fused_buffers = dict(fused.named_buffers())
    assert set(fused_buffers) == {name for name, _ in plain.named_buffers()}
    for name, buffer in plain.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(buffer, fused_buffers[name]), name
        else:
            assert_close(buffer, fused_buffers[name], name)


@pytest.mark.parametrize("kernel_size", sorted(DILATED_BRANCHES))
def test_fused_block_matches_plain_over_training_steps_and_in_eval(kernel_size):
    plain = random_block(kernel_size)
    fused = fused_copy(plain)
    for _ in range(3):
        assert_same_step(plain, fused, torch.randn(3, CHANNELS, 19, 23, dtype=torch.float64))
    assert int(plain.origin_bn.num_batches_tracked) == int(fused.origin_bn.num_batches_tracked) == 3
    plain.eval(), fused.eval()
    x = torch.randn(2, CHANNELS, 17, 21, dtype=torch.float64)
    with torch.no_grad():
        assert max_relative_difference(plain(x), fused(x)) < TOLERANCE
    assert_same_state(plain, fused)


def test_fused_block_momentum_none_cumulative_average():
    plain = random_block(13)
    for module in plain.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    fused = fused_copy(plain)
    for _ in range(3):
        assert_same_step(plain, fused, torch.randn(2, CHANNELS, 15, 15, dtype=torch.float64))


def test_fused_block_without_running_statistics():
    plain = random_block(9)
    for module in plain.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.track_running_stats = False
            module.running_mean = module.running_var = module.num_batches_tracked = None
    fused = fused_copy(plain)
    assert_same_step(plain, fused, torch.randn(2, CHANNELS, 15, 15, dtype=torch.float64))
    plain.eval(), fused.eval()  # no buffers: batch statistics in eval mode too
    assert_same_step(plain, fused, torch.randn(2, CHANNELS, 15, 15, dtype=torch.float64))


def test_fused_block_keeps_channels_last():
    plain = random_block(11)
    fused = fused_copy(plain)
    x = torch.randn(2, CHANNELS, 16, 16, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = fused(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert max_relative_difference(plain(x), y) < TOLERANCE


def test_stacked_kernels_are_the_dense_equivalents_of_each_branch():
    block = random_block(17)
    stacked = stacked_branch_kernels(block).view(CHANNELS, -1, 17, 17)
    assert torch.equal(stacked[:, 0], block.lk_origin.weight[:, 0])
    for index, (k, r) in enumerate(block.branches, start=1):
        dense = dilated_to_dense_kernel(getattr(block, f"dil_conv_k{k}_{r}").weight, r)
        pad = (17 - dense.shape[-1]) // 2
        assert torch.equal(stacked[:, index], F.pad(dense, [pad] * 4)[:, 0])


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("fused", "expected"), [(False, 6), (True, 1)])
def test_fused_block_runs_one_conv_and_one_batch_norm(fused, expected):
    block = fused_copy(random_block(13)) if fused else random_block(13)
    counter = _OpCounter()
    with counter:
        block(torch.randn(2, CHANNELS, 15, 15, dtype=torch.float64))
    assert counter.counts["convolution"] == expected
    assert sum(n for op, n in counter.counts.items() if "batch_norm" in op) == expected


def test_comparison_detects_a_one_tap_change():
    """The tolerance is tight enough that a 1e-6 change of one tap of one dilated branch fails it."""
    plain = random_block(13)
    fused = fused_copy(plain)
    with torch.no_grad():
        fused.dil_conv_k3_5.weight[0, 0, 0, 0] += 1e-6
    x = torch.randn(2, CHANNELS, 15, 15, dtype=torch.float64)
    assert max_relative_difference(plain(x), fused(x)) > 1e3 * TOLERANCE


def test_fused_block_rejects_what_it_cannot_reproduce():
    x = torch.randn(2, CHANNELS, 15, 15, dtype=torch.float64)
    block = random_block(7)
    block.dil_bn_k3_2.eps = 1e-3
    with pytest.raises(ValueError, match="share training mode, eps"):
        fused_dilated_reparam_forward(block, x)
    block = random_block(7)
    block.origin_bn.eval()
    with pytest.raises(ValueError, match="share training mode"):
        fused_dilated_reparam_forward(block, x)
    block = random_block(7)
    for module in block.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    block.origin_bn.num_batches_tracked += 1
    with pytest.raises(ValueError, match="num_batches_tracked"):
        fused_dilated_reparam_forward(block, x)
    block = nn.SyncBatchNorm.convert_sync_batchnorm(random_block(7))
    with pytest.raises(ValueError, match="SyncBatchNorm"):
        fused_dilated_reparam_forward(block, x)


def small_model(fused_branches: bool = False) -> UniRepLKNet:
    torch.manual_seed(0)
    model = UniRepLKNet(
        num_classes=10, depths=(1, 1, 2, 1), dims=(16, 32, 64, 128),
        kernel_sizes=((3,), (13,), (17, 7), (11,)), fused_branches=fused_branches).double()
    return randomize_statistics(model, torch.Generator().manual_seed(1))


def test_fused_model_matches_plain_model_over_sgd_steps():
    plain = small_model()
    fused = fused_copy(plain)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (plain, fused)]
    for step in range(2):
        x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        targets = torch.tensor([1, 7])
        logits_plain, logits_fused = plain(x), fused(x)
        assert max_relative_difference(logits_plain, logits_fused) < TOLERANCE
        F.cross_entropy(logits_plain, targets).backward()
        F.cross_entropy(logits_fused, targets).backward()
        assert_same_state(plain, fused)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    assert_same_state(plain, fused)


def test_fused_model_keys_switches_and_reparameterization():
    fused = small_model(fused_branches=True)
    blocks = [m for m in fused.modules() if isinstance(m, DilatedReparamBlock)]
    assert len(blocks) == 4 and all(block.fused_branches for block in blocks)
    assert list(fused.state_dict()) == list(small_model().state_dict())
    optimizer = torch.optim.SGD(fused.parameters(), lr=0.1)
    for _ in range(2):
        F.cross_entropy(fused(torch.randn(2, 3, 64, 64, dtype=torch.float64)), torch.tensor([0, 3])).backward()
        optimizer.step()
        optimizer.zero_grad()
    fused.eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = fused(x)
        fused.set_fused_branches(False)
        assert max_relative_difference(expected, fused(x)) < TOLERANCE
        fused.reparameterize()
        assert max_relative_difference(expected, fused(x)) < 1e-8
    assert fused.deployed


def test_timm_create_model_passes_fused_branches():
    with torch.device("meta"):
        model = timm.create_model("unireplknet_a", fused_branches=True)
    assert all(m.fused_branches for m in model.modules() if isinstance(m, DilatedReparamBlock))
