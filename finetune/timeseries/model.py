"""The authors' forecaster (``Time-Series/models/Corrformer.py``, ``layers/Embed.py``), written from the spec:
UniRepLKNet replaces Corrformer's encoder, Corrformer's embedding and Multi-Correlation decoder stay
(:class:`Forecaster`; the decoder in :mod:`.decoder`).

1. Per window and column: minus the mean over time, divided by ``sqrt(var + 1e-5)`` (biased variance), then a
   learnable affine of ``stations_per_node`` weights shared by every node (:class:`WindowNormalization`, which
   also undoes it on the forecast).
2. ``D = nodes x stations_per_node`` columns -> (B x nodes, L, stations_per_node) (:func:`to_nodes`).
3. :class:`DataEmbedding`: a circular Conv1d (k = 3, no bias) of the values + a Linear(4, no bias) of the time
   features + a Linear of the node's station positions (3 each, standardized over all stations); dropout.
4. (B x nodes, 48, 768) -> (B x nodes, 1, 192, 192) for UniRepLKNet (:func:`embedding_map`); its last-stage map
   (n, 768, 6, 6) becomes the decoder's tokens by a plain reshape to (n, 36, 768) (:func:`encoder_tokens`: the
   authors' reshape, not a transpose of channels and positions).
5. The decoder's inputs: the seasonal part of the last ``label`` normalized steps then zeros, embedded by a second
   :class:`DataEmbedding` with the time features of those ``label + horizon`` steps; the trend part then the
   window's mean as the trend init (:func:`~.data.decoder_inits`). The forecast is the decoder's seasonal output
   plus its trend, the last ``horizon`` steps, regrouped and de-normalized.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

__all__ = ["DataEmbedding", "Forecaster", "WindowNormalization", "embedding_map", "encoder_tokens", "from_nodes",
           "standardized_positions", "to_nodes"]


class WindowNormalization(nn.Module):
    """Step 1 and its inverse. ``forward(x)`` (B, L, D) returns the normalized window and the statistics that
    :meth:`restore` needs; ``restore(y, stats)`` maps a forecast (B, L', D) back to the data's units."""

    def __init__(self, stations_per_node: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.affine_weight = nn.Parameter(torch.ones(1, 1, stations_per_node))
        self.affine_bias = nn.Parameter(torch.zeros(1, 1, stations_per_node))

    def _tiled(self, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        repeats = columns // self.affine_weight.shape[-1]
        return self.affine_weight.repeat(1, 1, repeats), self.affine_bias.repeat(1, 1, repeats)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        mean = x.mean(dim=1, keepdim=True).detach()
        centred = x - mean
        std = torch.sqrt(centred.var(dim=1, keepdim=True, unbiased=False) + self.eps).detach()
        weight, bias = self._tiled(x.shape[-1])
        return centred / std * weight + bias, (mean, std)

    def restore(self, y: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        mean, std = stats
        weight, bias = self._tiled(y.shape[-1])
        return (y - bias) / (weight + self.eps * self.eps) * std + mean


def to_nodes(x: torch.Tensor, nodes: int) -> torch.Tensor:
    """(B, L, nodes x s) -> (B x nodes, L, s): column ``node * s + j`` is station ``j`` of ``node``."""
    batch, length, columns = x.shape
    return x.reshape(batch, length, nodes, columns // nodes).permute(0, 2, 1, 3).reshape(batch * nodes, length, -1)


def from_nodes(x: torch.Tensor, nodes: int) -> torch.Tensor:
    """The inverse of :func:`to_nodes`: (B x nodes, L, s) -> (B, L, nodes x s)."""
    total, length, per_node = x.shape
    return x.reshape(total // nodes, nodes, length, per_node).permute(0, 2, 1, 3).reshape(total // nodes, length, -1)


def standardized_positions(positions: np.ndarray) -> np.ndarray:
    """Station positions (S, 3) standardized per column (scikit-learn's ``StandardScaler``: population standard
    deviation; a constant column is only centred)."""
    positions = np.asarray(positions, dtype=np.float64)
    std = positions.std(axis=0)
    return (positions - positions.mean(axis=0)) / np.where(std > 0, std, 1.0)


class DataEmbedding(nn.Module):
    """Step 3 for (B x nodes, L, s) windows and their (B x nodes, L, 4) time features; ``positions`` (S, 3) are
    all stations' (``stations_sorted.npy``), S = nodes x s."""

    def __init__(self, positions: np.ndarray, nodes: int, d_model: int = 768, time_features: int = 4,
                 dropout: float = 0.05):
        super().__init__()
        stations = len(positions)
        if stations % nodes:
            raise ValueError(f"{stations} stations do not split into {nodes} nodes")
        per_node = stations // nodes
        self.nodes = nodes
        self.register_buffer("positions", torch.from_numpy(standardized_positions(positions)).float()
                             .reshape(nodes, per_node * 3), persistent=False)
        self.value_embedding = nn.Conv1d(per_node, d_model, 3, padding=1, padding_mode="circular", bias=False)
        nn.init.kaiming_normal_(self.value_embedding.weight, mode="fan_in", nonlinearity="leaky_relu")
        self.temporal_embedding = nn.Linear(time_features, d_model, bias=False)
        self.position_embedding = nn.Linear(per_node * 3, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, marks: torch.Tensor) -> torch.Tensor:
        values = self.value_embedding(x.transpose(1, 2)).transpose(1, 2)  # (B n, L, d)
        where = self.position_embedding(self.positions).repeat(len(x) // self.nodes, 1)[:, None]  # (B n, 1, d)
        return self.dropout(values + self.temporal_embedding(marks) + where)


def embedding_map(tokens: torch.Tensor) -> torch.Tensor:
    """(N, L, d) -> (N, 1, H, H), H = sqrt(L d) (48 x 768 = 192^2), by a plain reshape."""
    side = math.isqrt(tokens.shape[1] * tokens.shape[2])
    if side * side != tokens.shape[1] * tokens.shape[2]:
        raise ValueError(f"{tokens.shape[1]} steps x {tokens.shape[2]} channels is not a square map")
    return tokens.reshape(len(tokens), 1, side, side)


def encoder_tokens(maps: torch.Tensor, d_model: int) -> torch.Tensor:
    """The encoder's (N, C, h, w) maps as the decoder's (N, C h w / d_model, d_model) tokens: the authors' plain
    reshape of the memory (channel-major), not a transpose."""
    return maps.reshape(len(maps), -1, d_model)


class Forecaster(nn.Module):
    """Steps 1-5 around ``encoder`` (a :class:`~unireplknet.UniRepLKNet` with ``in_chans=1``: its
    ``forward_features``). ``forward(x, x_marks, y_marks)``: the (B, L, D) window, its (B, L, 4) time features and
    the (B, label + horizon, 4) time features of the decoder's steps; returns the (B, horizon, D) forecast in the
    data's units. ``tree`` factors the nodes for the cross-correlation (the authors' 7 x 50 of 350)."""

    def __init__(self, encoder: nn.Module, positions: np.ndarray, nodes: int, tree: tuple[int, ...], *,
                 d_model: int = 768, heads: int = 16, d_ff: int = 2048, label: int = 24, horizon: int = 24,
                 moving_avg: int = 25, dropout: float = 0.05, tcn_layers: int = 1, decoder_layers: int = 1):
        super().__init__()
        from .decoder import AutoCorrelation, CrossCorrelation, Decoder, DecoderLayer, MultiCorrelation

        if math.prod(tree) != nodes:
            raise ValueError(f"the node tree {tuple(tree)} holds {math.prod(tree)} nodes, not {nodes}")
        per_node = len(positions) // nodes
        self.nodes, self.d_model, self.label, self.horizon, self.moving_avg = nodes, d_model, label, horizon, moving_avg
        self.normalization = WindowNormalization(per_node)
        self.encoder_embedding = DataEmbedding(positions, nodes, d_model, dropout=dropout)
        self.decoder_embedding = DataEmbedding(positions, nodes, d_model, dropout=dropout)
        self.encoder = encoder

        def multi_correlation() -> MultiCorrelation:
            return MultiCorrelation(AutoCorrelation(d_model, heads),
                                    CrossCorrelation(d_model, heads, label + horizon, tcn_layers=tcn_layers),
                                    tree, dropout)

        self.decoder = Decoder([DecoderLayer(multi_correlation(), multi_correlation(), d_model, per_node, d_ff,
                                             moving_avg, dropout) for _ in range(decoder_layers)], d_model, per_node)

    def forward(self, x: torch.Tensor, x_marks: torch.Tensor, y_marks: torch.Tensor) -> torch.Tensor:
        from .data import decoder_inits

        nodes = self.nodes
        normalized, stats = self.normalization(x)
        seasonal, trend = decoder_inits(normalized, self.label, self.horizon, self.moving_avg)
        tokens = self.encoder_embedding(to_nodes(normalized, nodes), x_marks.repeat_interleave(nodes, dim=0))
        memory = encoder_tokens(self.encoder.forward_features(embedding_map(tokens)), self.d_model)
        queries = self.decoder_embedding(to_nodes(seasonal, nodes), y_marks.repeat_interleave(nodes, dim=0))
        seasonal_part, trend_part = self.decoder(queries, memory, to_nodes(trend, nodes))
        forecast = from_nodes((seasonal_part + trend_part)[:, -self.horizon:], nodes)
        return self.normalization.restore(forecast, stats)
