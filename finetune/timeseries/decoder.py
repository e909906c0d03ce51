"""Corrformer's Multi-Correlation decoder, which the authors keep behind the UniRepLKNet encoder (spec, time series
step 5; the facts from ``Time-Series/layers/Multi_Correlation.py``, ``Corrformer_EncDec.py``, ``Causal_Conv.py``),
written for this project.

Rows are windows x nodes (``row = window * nodes + node``); ``tree`` factors the nodes (the authors' 7 x 50 of 350).
One :class:`MultiCorrelation` is

* auto-correlation on every node (temporal): per head, the circular correlation of queries and keys (FFT), the
  ``int(factor * ln L)`` strongest lags of its channel mean, the values rolled by each lag (``out[t] =
  v[(t + lag) mod L]``) and summed with the softmax of those correlations as weights;
* cross-correlation over each level of the tree (spatial): node features averaged up to the level, each node
  correlated with its siblings' mean (the pivot), its values rolled back by its strongest lag (``v[(t - lag) mod
  L]``) and scaled by the sigmoid of that correlation, the siblings ordered by lag and fused along that order by
  a causal convolution (weight-normalized, dilations 1, 3, 9, ...), put back in place and rolled forward again;
  each node receives its ancestor's result, averaged over the levels;

the two summed. The decoder layer (Autoformer's) adds a self and a cross Multi-Correlation and a position-wise
feed-forward, each followed by a moving-average decomposition whose trends accumulate into the trend forecast.

Differences from the authors' code, none changing the function: sums and means over lags are vectorized; lags
that tie are ordered stably (the authors' ``torch.sort`` leaves ties to the device); the causal convolution pads
on the left instead of padding both sides and chomping; weight normalization is computed in ``forward`` (no
hooks). The authors' ``normal_(0, 0.01)`` on the weight-normalized convolutions is overwritten by the hook at the
first forward, so their convolutions start from PyTorch's default initialization, as these do.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import moving_average

__all__ = ["AutoCorrelation", "CausalConv", "CrossCorrelation", "Decoder", "DecoderLayer", "MultiCorrelation",
           "SeasonalLayerNorm", "circular_correlation", "decompose", "delay_aggregate", "roll_by"]


def circular_correlation(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``corr[..., tau] = sum_t q[..., (t + tau) mod L] k[..., t]`` over the last dimension, through the FFT."""
    length = queries.shape[-1]
    spectrum = torch.fft.rfft(queries, dim=-1) * torch.conj(torch.fft.rfft(keys, dim=-1))
    return torch.fft.irfft(spectrum, n=length, dim=-1)


def roll_by(values: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``out[..., e, t] = values[..., e, (t + shift[...]) mod L]``: ``values`` (..., E, L), one integer ``shift``
    per leading index (...)."""
    length = values.shape[-1]
    index = (torch.arange(length, device=values.device) + shift[..., None]) % length  # (..., L)
    return torch.gather(values, -1, index[..., None, :].expand_as(values))


def delay_aggregate(values: torch.Tensor, corr: torch.Tensor, top_k: int) -> torch.Tensor:
    """Auto-correlation's aggregation of (B, H, E, L) ``values`` by their (B, H, E, L) correlations: the
    ``top_k`` lags of the channel-mean correlation per head, each roll weighted by the softmax of the top
    correlations."""
    weights, lags = torch.topk(corr.mean(dim=2), top_k, dim=-1)  # (B, H, k)
    weights = torch.softmax(weights, dim=-1)
    rolled = roll_by(values.unsqueeze(2).expand(-1, -1, top_k, -1, -1), lags)  # (B, H, k, E, L)
    return (rolled * weights[..., None, None]).sum(dim=2)


def _fit_length(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """``x`` cut, or zero-padded at the end, to ``length`` along ``dim`` (keys and values to the queries' length)."""
    have = x.shape[dim]
    if have >= length:
        return x.narrow(dim, 0, length)
    pad = list(x.shape)
    pad[dim] = length - have
    return torch.cat([x, x.new_zeros(pad)], dim=dim)


class AutoCorrelation(nn.Module):
    """Temporal auto-correlation with its projections: (rows, L, d) queries, (rows, S, d) keys and values."""

    def __init__(self, d_model: int, heads: int, factor: int = 1):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} does not split into {heads} heads")
        self.heads, self.factor = heads, factor
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        rows, length, _ = queries.shape
        heads = self.heads
        q = self.query(queries).view(rows, length, heads, -1)
        k = _fit_length(self.key(keys).view(rows, keys.shape[1], heads, -1), length, 1)
        v = _fit_length(self.value(values).view(rows, values.shape[1], heads, -1), length, 1)
        corr = circular_correlation(q.permute(0, 2, 3, 1), k.permute(0, 2, 3, 1))  # (rows, H, E, L)
        out = delay_aggregate(v.permute(0, 2, 3, 1), corr, int(self.factor * math.log(length)))
        return self.out(out.permute(0, 3, 1, 2).reshape(rows, length, -1))


class _WeightNormConv1d(nn.Conv1d):
    """A Conv1d whose weight is ``g * v / ||v||`` (norm per output channel), ``v`` and ``g`` the parameters."""

    def __init__(self, channels: int, kernel_size: int, dilation: int):
        super().__init__(channels, channels, kernel_size, dilation=dilation)
        self.weight_g = nn.Parameter(self.weight.detach().flatten(1).norm(dim=1).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * self.weight / self.weight.flatten(1).norm(dim=1).view(-1, 1, 1)
        pad = (self.kernel_size[0] - 1) * self.dilation[0]
        return F.conv1d(F.pad(x, (pad, 0)), weight, self.bias, dilation=self.dilation)


class _CausalBlock(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dilation: int, dropout: float):
        super().__init__()
        self.conv1 = _WeightNormConv1d(channels, kernel_size, dilation)
        self.conv2 = _WeightNormConv1d(channels, kernel_size, dilation)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dropout(F.relu(self.conv1(x)))
        y = self.dropout(F.relu(self.conv2(y)))
        return F.relu(x + y)


class CausalConv(nn.Module):
    """The cross-correlation's fusion along the lag-ordered nodes: ``layers`` residual blocks of two causal,
    weight-normalized convolutions (dilation ``3 ** i``), (N, channels, nodes) in and out."""

    def __init__(self, channels: int, layers: int = 1, kernel_size: int = 3, dropout: float = 0.2):
        super().__init__()
        self.blocks = nn.Sequential(*(_CausalBlock(channels, kernel_size, 3 ** i, dropout) for i in range(layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class CrossCorrelation(nn.Module):
    """Spatial cross-correlation among sibling nodes with its projections; ``length`` = the decoder's window
    (label + horizon), which with the head width sets the fusion's channels."""

    def __init__(self, d_model: int, heads: int, length: int, factor: int = 1, tcn_layers: int = 1):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} does not split into {heads} heads")
        self.heads, self.factor, self.length = heads, factor, length
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.fusion = CausalConv(d_model // heads * length, tcn_layers)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, nodes: int) -> torch.Tensor:
        rows, length, _ = queries.shape
        if length != self.length:
            raise ValueError(f"cross-correlation built for windows of {self.length} steps, got {length}")
        groups, heads = rows // nodes, self.heads
        q = self.query(queries).view(groups, nodes, length, heads, -1)
        k = _fit_length(self.key(keys).view(groups, nodes, keys.shape[1], heads, -1), length, 2)
        v = _fit_length(self.value(values).view(groups, nodes, values.shape[1], heads, -1), length, 2)
        channels = q.shape[-1]
        pivot = q.mean(dim=1, keepdim=True).expand_as(q)
        corr = circular_correlation(pivot.permute(0, 1, 3, 4, 2), k.permute(0, 1, 3, 4, 2))  # (G, N, H, E, L)
        scores, lags = torch.topk(corr.mean(dim=3), self.factor, dim=-1)  # (G, N, H, k)
        v = v.permute(0, 1, 3, 4, 2)  # (G, N, H, E, L)
        fused = []
        for i in range(self.factor):
            aligned = roll_by(v, length - lags[..., i])  # v[(t - lag) mod L]
            aligned = aligned * torch.sigmoid(scores[..., i])[..., None, None]
            by_head = aligned.permute(0, 2, 1, 3, 4).reshape(groups * heads, nodes, channels, length)
            order = torch.argsort((length - lags[..., i]).permute(0, 2, 1).reshape(groups * heads, nodes), dim=1,
                                  stable=True)
            gather = order[:, :, None, None].expand_as(by_head)
            ordered = by_head.gather(1, gather).reshape(groups * heads, nodes, channels * length)
            mixed = self.fusion(ordered.transpose(1, 2)).transpose(1, 2).reshape_as(by_head)
            restored = torch.empty_like(mixed).scatter_(1, gather, mixed)  # back to each node's place
            restored = restored.reshape(groups, heads, nodes, channels, length).permute(0, 2, 1, 3, 4)
            fused.append(roll_by(restored, lags[..., i]))  # rolled forward again: x[(t + lag) mod L]
        out = torch.stack(fused).mean(dim=0).permute(0, 1, 4, 2, 3)  # (G, N, L, H, E)
        return self.out(out.reshape(rows, length, -1))


class MultiCorrelation(nn.Module):
    """Auto-correlation on the leaves plus cross-correlation averaged over the levels of the node ``tree``."""

    def __init__(self, auto: AutoCorrelation, cross: CrossCorrelation, tree: tuple[int, ...], dropout: float):
        super().__init__()
        self.auto, self.cross, self.tree = auto, cross, tuple(tree)
        self.nodes = math.prod(self.tree)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        rows, length, width = x.shape
        span = cross.shape[1]
        if rows % self.nodes:
            raise ValueError(f"{rows} rows are not windows of {self.nodes} nodes (tree {self.tree})")
        batch = rows // self.nodes
        leaf = self.dropout(self.auto(x, cross, cross))
        levels = []
        for i, siblings in enumerate(self.tree):
            below = math.prod(self.tree[i + 1:])
            parents = batch * math.prod(self.tree[:i]) * siblings
            xs = x.reshape(parents, below, length, width).mean(dim=1)
            cs = cross.reshape(parents, below, span, width).mean(dim=1)
            out = self.cross(xs, cs, cs, nodes=siblings)
            levels.append(out[:, None].expand(-1, below, -1, -1).reshape(rows, length, width))
        return self.dropout(leaf) + self.dropout(torch.stack(levels).mean(dim=0))


def decompose(x: torch.Tensor, kernel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(seasonal, trend) of (N, L, C) series: the trend is the :func:`~.data.moving_average`."""
    trend = moving_average(x, kernel)
    return x - trend, trend


class DecoderLayer(nn.Module):
    """Self Multi-Correlation, cross Multi-Correlation with the encoder's tokens, feed-forward; each followed by a
    decomposition. Returns the seasonal part and the trend it removed, projected to the output channels by a
    circular k=3 convolution."""

    def __init__(self, self_correlation: MultiCorrelation, cross_correlation: MultiCorrelation, d_model: int,
                 outputs: int, d_ff: int = 2048, moving_avg: int = 25, dropout: float = 0.05):
        super().__init__()
        self.self_correlation, self.cross_correlation = self_correlation, cross_correlation
        self.conv1 = nn.Conv1d(d_model, d_ff, 1, bias=False)
        self.conv2 = nn.Conv1d(d_ff, d_model, 1, bias=False)
        self.moving_avg = moving_avg
        self.dropout = nn.Dropout(dropout)
        self.trend_projection = nn.Conv1d(d_model, outputs, 3, padding=1, padding_mode="circular", bias=False)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, trend1 = decompose(x + self.self_correlation(x, x), self.moving_avg)
        x, trend2 = decompose(x + self.cross_correlation(x, memory), self.moving_avg)
        y = self.dropout(F.gelu(self.conv1(x.transpose(1, 2))))
        y = self.dropout(self.conv2(y).transpose(1, 2))
        x, trend3 = decompose(x + y, self.moving_avg)
        trend = self.trend_projection((trend1 + trend2 + trend3).transpose(1, 2)).transpose(1, 2)
        return x, trend


class SeasonalLayerNorm(nn.Module):
    """LayerNorm over channels, then each channel's mean over time subtracted (the seasonal part averages zero)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return x - x.mean(dim=1, keepdim=True)


class Decoder(nn.Module):
    """The decoder layers, :class:`SeasonalLayerNorm` and a linear projection of the seasonal part to the output
    channels; the layers' trends are added to ``trend`` (the decoder's trend init)."""

    def __init__(self, layers: list[DecoderLayer], d_model: int, outputs: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = SeasonalLayerNorm(d_model)
        self.projection = nn.Linear(d_model, outputs)

    def forward(self, x: torch.Tensor, memory: torch.Tensor,
                trend: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in self.layers:
            x, residual = layer(x, memory)
            trend = trend + residual
        return self.projection(self.norm(x)), trend
