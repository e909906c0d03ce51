"""Corrformer's Multi-Correlation decoder (issue 22 point 6) against hand computations: the FFT correlation, the
rolls, the auto-correlation's top-lag aggregation, the cross-correlation's alignment, sort and fusion (its
causality along the lag order), the node tree's levels, the causal weight-normalized convolution, the seasonal
LayerNorm, and the forecaster's shapes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from finetune.timeseries.decoder import (AutoCorrelation, CausalConv, CrossCorrelation, MultiCorrelation,
                                         SeasonalLayerNorm, circular_correlation, delay_aggregate, roll_by)


def test_circular_correlation_is_the_direct_sum():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 3, 10)), rng.normal(size=(2, 3, 10))
    expected = np.zeros_like(q)
    for tau in range(10):  # corr[tau] = sum_t q[(t + tau) mod L] k[t]
        expected[..., tau] = sum(q[..., (t + tau) % 10] * k[..., t] for t in range(10))
    out = circular_correlation(torch.from_numpy(q), torch.from_numpy(k))
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)
    # odd lengths too (the authors' irfft without n would return L - 1 values)
    q9, k9 = torch.from_numpy(q[..., :9]), torch.from_numpy(k[..., :9])
    assert circular_correlation(q9, k9).shape == (2, 3, 9)


def test_roll_by_reads_each_row_shifted_by_its_own_amount():
    values = torch.arange(10.0).reshape(2, 1, 5)  # two rows of one channel
    out = roll_by(values, torch.tensor([1, 3]))
    assert out.tolist() == [[[1, 2, 3, 4, 0]], [[8, 9, 5, 6, 7]]]


def test_delay_aggregation_weights_the_top_lags_by_their_softmax():
    length = 8
    values = torch.arange(length, dtype=torch.float64).reshape(1, 1, 1, length) ** 2
    corr = torch.zeros(1, 1, 2, length, dtype=torch.float64)
    corr[..., 0, 2], corr[..., 1, 2] = 3.0, 1.0  # channel mean 2.0 at lag 2
    corr[..., 0, 5], corr[..., 1, 5] = 0.5, 0.5  # 0.5 at lag 5; every other lag 0
    out = delay_aggregate(values.expand(1, 1, 2, length), corr, top_k=2)
    w2, w5 = math.exp(2.0) / (math.exp(2.0) + math.exp(0.5)), math.exp(0.5) / (math.exp(2.0) + math.exp(0.5))
    v = values[0, 0, 0]
    expected = w2 * v.roll(-2) + w5 * v.roll(-5)  # out[t] = v[(t + lag) mod L]
    torch.testing.assert_close(out[0, 0, 0], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(out[0, 0, 1], expected, rtol=0, atol=1e-12)


def _identity_projections(module: nn.Module) -> None:
    with torch.no_grad():
        for name in ("query", "key", "value", "out"):
            layer = getattr(module, name)
            layer.weight.copy_(torch.eye(layer.weight.shape[0]))
            layer.bias.zero_()


def test_auto_correlation_pads_the_keys_and_rolls_the_values():
    """Identity projections, one head: the correlation of queries and zero-padded keys (36 -> 48 steps, as the
    encoder's 36 tokens against the decoder's 48), its int(ln 48) = 3 best lags, the values rolled."""
    torch.manual_seed(0)
    layer = AutoCorrelation(d_model=4, heads=1).double()
    _identity_projections(layer)
    queries, memory = torch.randn(2, 48, 4, dtype=torch.float64), torch.randn(2, 36, 4, dtype=torch.float64)
    out = layer(queries, memory, memory)
    padded = torch.cat([memory, torch.zeros(2, 12, 4, dtype=torch.float64)], dim=1)
    corr = circular_correlation(queries.transpose(1, 2), padded.transpose(1, 2)).mean(dim=1)  # (2, 48)
    for row in range(2):
        weights, lags = torch.topk(corr[row], 3)
        weights = torch.softmax(weights, dim=0)
        expected = sum(w * padded[row].roll(-int(lag), dims=0) for w, lag in zip(weights, lags))
        torch.testing.assert_close(out[row], expected, rtol=0, atol=1e-12)


def _cross(nodes_length: int = 12, d_model: int = 4, heads: int = 2, silent_fusion: bool = True) -> CrossCorrelation:
    layer = CrossCorrelation(d_model, heads, nodes_length).double().eval()
    _identity_projections(layer)
    if silent_fusion:  # g = 0: each causal block outputs relu(x + relu(relu(0))) = relu(x)
        with torch.no_grad():
            for block in layer.fusion.blocks:
                for conv in (block.conv1, block.conv2):
                    conv.weight_g.zero_()
                    conv.bias.zero_()
    return layer


def test_cross_correlation_aligns_scales_and_puts_every_node_back_in_place():
    """With identity projections and a fusion that is relu, the sort, the fusion and the roll back leave each
    node's values in place: out = sigmoid(best pivot correlation) * relu(values), per node and head."""
    torch.manual_seed(1)
    nodes, length, heads, width = 5, 12, 2, 4
    layer = _cross(length, width, heads)
    q, k, v = (torch.randn(2 * nodes, length, width, dtype=torch.float64) for _ in range(3))
    out = layer(q, k, v, nodes=nodes)
    head = width // heads
    for group in range(2):
        rows = slice(group * nodes, (group + 1) * nodes)
        pivot = q[rows].mean(dim=0)  # (L, width)
        for node in range(nodes):
            row = group * nodes + node
            for h in range(heads):
                channels = slice(h * head, (h + 1) * head)
                corr = circular_correlation(pivot[:, channels].T, k[row][:, channels].T).mean(dim=0)
                scale = torch.sigmoid(corr.max())
                torch.testing.assert_close(out[row][:, channels], scale * v[row][:, channels].clamp_min(0),
                                           rtol=0, atol=1e-12)


def test_cross_correlation_fuses_causally_along_the_lag_order():
    """The fusion is a causal convolution over the nodes sorted by ``L - lag``: changing the values of the node
    last in that order changes no other node's output; changing the first one's changes the others'."""
    torch.manual_seed(2)
    nodes, length = 6, 12
    layer = _cross(length, silent_fusion=False)
    base = torch.randn(length, 4, dtype=torch.float64)
    q = base.expand(nodes, -1, -1)  # the pivot is the base series; node n's keys are it delayed by 2n steps
    k = torch.stack([base.roll(2 * n, dims=0) for n in range(nodes)])
    v = torch.randn(nodes, length, 4, dtype=torch.float64)
    # one head's lags, as the layer finds them: the pivot's correlation with each node's keys
    pivot = q.mean(dim=0)[:, :2].T
    lags = torch.stack([circular_correlation(pivot, k[n][:, :2].T).mean(dim=0).argmax() for n in range(nodes)])
    order = torch.argsort(length - lags, stable=True).tolist()
    assert sorted(lags.tolist()) == sorted((-2 * n) % length for n in range(nodes))  # each node its own lag
    base = layer(q, k, v, nodes=nodes)[:, :, :2]
    changed = v.clone()
    changed[order[-1]] += 1.0
    moved = layer(q, k, changed, nodes=nodes)[:, :, :2]
    others = [n for n in range(nodes) if n != order[-1]]
    torch.testing.assert_close(moved[others], base[others], rtol=0, atol=0)
    changed = v.clone()
    changed[order[0]] += 1.0
    moved = layer(q, k, changed, nodes=nodes)[:, :, :2]
    assert not torch.allclose(moved[order[1]], base[order[1]])


class _Probe(nn.Module):
    """Returns its queries (the level's averaged node features) and records how many siblings it was given."""

    def __init__(self):
        super().__init__()
        self.calls: list[int] = []

    def forward(self, queries, keys, values, nodes=None):
        if nodes is None:  # the auto-correlation slot: contributes nothing
            return torch.zeros_like(queries)
        self.calls.append(nodes)
        return queries


def test_the_node_tree_averages_each_level_and_hands_it_to_the_leaves():
    """Tree 2 x 2 (4 nodes): level 0 correlates the 2 parents (each the mean of its 2 leaves), level 1 the 2 leaves
    under each parent; every leaf gets the mean of its ancestors' results: (pair mean + itself) / 2."""
    probe = _Probe()
    layer = MultiCorrelation(_Probe(), probe, (2, 2), dropout=0.0)
    x = torch.arange(2 * 4 * 3, dtype=torch.float64).reshape(8, 3, 1) ** 2  # 2 windows x 4 nodes, 3 steps
    out = layer(x, x)
    assert probe.calls == [2, 2]
    pairs = x.reshape(2, 2, 2, 3, 1).mean(dim=2, keepdim=True).expand(-1, -1, 2, -1, -1).reshape(8, 3, 1)
    torch.testing.assert_close(out, (pairs + x) / 2, rtol=0, atol=1e-12)


def test_the_causal_convolution_sees_only_the_past_and_is_weight_normalized():
    torch.manual_seed(3)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # g = ||v|| computed in float64 at construction
    try:
        fusion = CausalConv(channels=3, layers=2).eval()
    finally:
        torch.set_default_dtype(default)
    x = torch.randn(1, 3, 20, dtype=torch.float64)
    out = fusion(x)
    later = x.clone()
    later[..., 12:] += 5.0
    torch.testing.assert_close(fusion(later)[..., :12], out[..., :12], rtol=0, atol=0)  # nothing from the future
    assert not torch.allclose(fusion(later)[..., 12:], out[..., 12:])
    conv = fusion.blocks[0].conv1  # at initialization the weight is the plain convolution's (g = ||v||)
    padded = torch.nn.functional.pad(x, (2, 0))
    torch.testing.assert_close(conv(x), torch.nn.functional.conv1d(padded, conv.weight, conv.bias), rtol=0,
                               atol=1e-12)
    with torch.no_grad():
        conv.weight.mul_(7.0)  # the direction's scale does not matter, only g
    torch.testing.assert_close(conv(x), torch.nn.functional.conv1d(padded, conv.weight / 7.0, conv.bias), rtol=0,
                               atol=1e-12)
    assert [block.conv1.dilation[0] for block in fusion.blocks] == [1, 3]


def test_the_seasonal_layer_norm_averages_zero_over_time():
    norm = SeasonalLayerNorm(6).double()
    x = torch.randn(2, 10, 6, dtype=torch.float64) * 3 + 1
    out = norm(x)
    expected = torch.nn.functional.layer_norm(x, (6,))
    torch.testing.assert_close(out, expected - expected.mean(dim=1, keepdim=True), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(2, 6, dtype=torch.float64), rtol=0, atol=1e-12)


def test_the_forecaster_maps_windows_to_forecasts_in_the_datas_units():
    import unireplknet

    from finetune.timeseries.model import Forecaster

    torch.manual_seed(4)
    encoder = unireplknet.UniRepLKNet(in_chans=1, num_classes=0, depths=(1, 1, 1, 1), dims=(8, 16, 32, 96),
                                      kernel_sizes=((3,), (3,), (3,), (3,)))
    positions = np.random.default_rng(0).normal(size=(44, 3))
    model = Forecaster(encoder, positions, nodes=4, tree=(2, 2), d_model=48, heads=4, d_ff=32).double().eval()
    x = torch.randn(2, 48, 44, dtype=torch.float64) * 5 + 20
    marks = torch.rand(2, 48, 4, dtype=torch.float64) - 0.5
    forecast = model(x, marks, marks)
    assert forecast.shape == (2, 24, 44)
    # the forecast is de-normalized per window and station: around the window's level, not the normalized scale
    assert (forecast.mean(dim=1) - x.mean(dim=1)).abs().mean() < 5 * x.std(dim=1).mean()
    with pytest.raises(ValueError, match="holds 6 nodes, not 4"):
        Forecaster(encoder, positions, nodes=4, tree=(2, 3), d_model=48, heads=4)
