"""The forecaster's input side (issue 22 point 6): normalization and its inverse, node grouping, the embedding's
circular convolution and position standardization (against scikit-learn), the map and token reshapes."""
from __future__ import annotations

import math

import numpy as np
import torch

from finetune.timeseries.model import (DataEmbedding, WindowNormalization, embedding_map, encoder_tokens,
                                       from_nodes, standardized_positions, to_nodes)


def test_window_normalization_by_hand_and_its_inverse():
    norm = WindowNormalization(stations_per_node=1).double()
    with torch.no_grad():
        norm.affine_weight.fill_(2.0)
        norm.affine_bias.fill_(0.5)
    x = torch.tensor([[[1.0, 10.0], [2.0, 10.0], [3.0, 10.0]]], dtype=torch.float64)  # (1, 3, 2): 2 nodes of 1
    normalized, stats = norm(x)
    # column 0: mean 2, biased variance 2/3; column 1: constant, variance 0 -> divided by sqrt(1e-5)
    std0 = math.sqrt(2 / 3 + 1e-5)
    expected0 = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / std0 * 2 + 0.5
    torch.testing.assert_close(normalized[0, :, 0], expected0, rtol=0, atol=1e-12)
    torch.testing.assert_close(normalized[0, :, 1], torch.full((3,), 0.5, dtype=torch.float64), rtol=0, atol=1e-12)
    # the forecast's inverse: (y - b) / (w + 1e-10) * std + mean
    torch.testing.assert_close(norm.restore(normalized, stats), x, rtol=0, atol=1e-9)


def test_nodes_group_consecutive_columns_and_ungroup():
    x = torch.arange(2 * 3 * 6, dtype=torch.float64).reshape(2, 3, 6)  # 2 windows, 3 steps, 3 nodes of 2
    nodes = to_nodes(x, 3)
    assert nodes.shape == (6, 3, 2)
    assert torch.equal(nodes[1], x[0, :, 2:4]) and torch.equal(nodes[5], x[1, :, 4:6])  # window 1, node 2
    assert torch.equal(from_nodes(nodes, 3), x)


def test_positions_are_standardized_as_scikit_learn_does():
    from sklearn.preprocessing import StandardScaler

    positions = np.random.default_rng(0).normal(size=(12, 3)) * [30, 90, 500]
    positions[:, 2] = 7.0  # a constant column: centred only, as StandardScaler
    np.testing.assert_allclose(standardized_positions(positions), StandardScaler().fit_transform(positions),
                               rtol=0, atol=1e-12)


def test_the_embedding_convolves_circularly_and_adds_time_and_place():
    torch.manual_seed(0)
    positions = np.random.default_rng(1).normal(size=(6, 3))
    embedding = DataEmbedding(positions, nodes=3, d_model=16, dropout=0.0).double()
    constant = torch.ones(3, 8, 2, dtype=torch.float64) * torch.tensor([1.0, -2.0], dtype=torch.float64)
    marks = torch.zeros(3, 8, 4, dtype=torch.float64)
    out = embedding(constant, marks)
    assert out.shape == (3, 8, 16)
    # a series constant in time embeds to the same vector at every step: circular padding (zero padding would
    # change the first and last steps)
    torch.testing.assert_close(out, out[:, :1].expand_as(out), rtol=0, atol=1e-12)
    # nodes differ only by their stations' positions
    assert not torch.allclose(out[0], out[1])
    doubled = embedding(torch.cat([constant, constant]), torch.cat([marks, marks]))  # 2 windows x 3 nodes
    torch.testing.assert_close(doubled[3:], out, rtol=0, atol=1e-12)


def test_map_and_token_reshapes_are_the_authors():
    tokens = torch.randn(2, 48, 768)
    assert embedding_map(tokens).shape == (2, 1, 192, 192)
    maps = torch.arange(768 * 36, dtype=torch.float64).reshape(1, 768, 6, 6)
    out = encoder_tokens(maps, 768)
    assert out.shape == (1, 36, 768)
    # a plain reshape: token 0 is the first 768 values of the channel-major memory (channels 0-20 and 12 positions
    # of channel 21), not the 768 channels at position 0
    assert out[0, 0, :36].tolist() == list(range(36)) and out[0, 1, 0].item() == 768
