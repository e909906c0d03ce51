"""The point-cloud augmentation, test-time rotations and metrics (issue 22 points 3 and 10) against hand
computations and scikit-learn."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from finetune.pointcloud.augment import (axis_angle_matrix, rotate, sample_training_points, scale_and_translate,
                                         voting_angles, theta_phi_matrix, training_angles, validation_angles)
from finetune.pointcloud.metrics import class_sums, oa_macc


def test_rotations_by_hand():
    # a quarter turn about z takes x to y; about x, y to z (Rodrigues)
    quarter = torch.tensor([math.pi / 2], dtype=torch.float64)
    about_z = axis_angle_matrix(quarter, torch.tensor([[0.0, 0, 1]], dtype=torch.float64))[0]
    torch.testing.assert_close(about_z @ torch.tensor([1.0, 0, 0], dtype=torch.float64),
                               torch.tensor([0.0, 1, 0], dtype=torch.float64), rtol=0, atol=1e-15)
    # theta alone (phi = 0): Rz(-theta); theta = pi/2 takes x to -y
    rotation = theta_phi_matrix(torch.tensor([[math.pi / 2, 0.0]], dtype=torch.float64))[0]
    torch.testing.assert_close(rotation @ torch.tensor([1.0, 0, 0], dtype=torch.float64),
                               torch.tensor([0.0, -1, 0], dtype=torch.float64), rtol=0, atol=1e-15)
    # theta = 0, phi = -pi/2: a quarter turn about v = (0, -1, 0) by +pi/2 takes z to -x... by hand:
    # R_v(a) z = cos a z + sin a (v x z) = (v x z) = (-1, 0, 0) for v = (0, -1, 0), a = pi/2
    rotation = theta_phi_matrix(torch.tensor([[0.0, -math.pi / 2]], dtype=torch.float64))[0]
    torch.testing.assert_close(rotation @ torch.tensor([0.0, 0, 1], dtype=torch.float64),
                               torch.tensor([-1.0, 0, 0], dtype=torch.float64), rtol=0, atol=1e-15)
    # normals turn with the points, further columns stay
    cloud = torch.tensor([[1.0, 0, 0, 0, 0, 1, 7.0]], dtype=torch.float64)
    turned = rotate(cloud, about_z)
    torch.testing.assert_close(turned, torch.tensor([[0.0, 1, 0, 0, 0, 1, 7.0]], dtype=torch.float64), rtol=0,
                               atol=1e-15)


def test_angle_grids_are_the_authors():
    validation = validation_angles() / math.pi
    torch.testing.assert_close(validation[:, 0], torch.tensor([0.1 + 0.2375 * k for k in range(8)],
                                                              dtype=torch.float64), rtol=0, atol=1e-12)
    assert (validation[:, 1] == -0.35).all()
    test = voting_angles() / math.pi
    assert test.shape == (40, 2)
    torch.testing.assert_close(test[:10, 0], torch.arange(10, dtype=torch.float64) * 0.2, rtol=0, atol=1e-12)
    torch.testing.assert_close(test[::10, 1], torch.tensor([-0.4, -0.4 + 0.2 / 3, -0.4 + 0.4 / 3, -0.2],
                                                           dtype=torch.float64), rtol=0, atol=1e-12)


def test_training_draws_stay_in_the_authors_ranges_and_follow_the_generator():
    draws = np.array([training_angles(np.random.default_rng(seed)) for seed in range(400)]) / math.pi
    assert draws[:, 0].min() >= 0.04 and draws[:, 0].max() < 1.94 and draws[:, 1].min() >= -0.4
    assert draws[:, 1].max() < -0.2 and draws[:, 0].max() > 1.8 and draws[:, 0].min() < 0.2
    cube = torch.ones(5, 6, dtype=torch.float64)
    moved = scale_and_translate(cube, np.random.default_rng(1))
    rng = np.random.default_rng(1)
    scale, shift = rng.uniform(2 / 3, 3 / 2, size=3), rng.uniform(-0.2, 0.2, size=3)
    torch.testing.assert_close(moved[:, :3], torch.from_numpy(scale + shift).expand(5, 3), rtol=0, atol=1e-15)
    assert torch.equal(moved[:, 3:], cube[:, 3:])
    cloud = torch.rand(300, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = sample_training_points(cloud, 100, 120, np.random.default_rng(5))
    b = sample_training_points(cloud, 100, 120, np.random.default_rng(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and a[0].shape == a[1].shape == (100, 6)
    # the original is a subset of the cloud's 120 farthest points, without repeats
    rows = {tuple(row.tolist()) for row in cloud}
    assert all(tuple(row.tolist()) in rows for row in a[1]) and len({tuple(r.tolist()) for r in a[1]}) == 100


def test_oa_and_macc_by_hand_and_as_scikit_learn():
    from sklearn.metrics import balanced_accuracy_score

    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    predicted = torch.tensor([0, 0, 1, 1, 0, 2])
    logits = torch.nn.functional.one_hot(predicted, 4).float()
    halves = [class_sums(logits[:3], labels[:3], 4), class_sums(logits[3:], labels[3:], 4)]
    total = {k: halves[0][k] + halves[1][k] for k in halves[0]}
    result = oa_macc(total)
    # 4 of 6 right; recalls 2/3, 1, 1/2 over the 3 classes present (class 3 has no sample)
    assert result["oa"] == pytest.approx(400 / 6) and result["samples"] == 6
    assert result["macc"] == pytest.approx(100 * (2 / 3 + 1 + 1 / 2) / 3)
    assert result["macc"] == pytest.approx(100 * balanced_accuracy_score(labels.numpy(), predicted.numpy()))
