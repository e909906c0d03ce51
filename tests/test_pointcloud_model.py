"""The point-cloud model's parts (issue 22 point 2): the authors' view rotations by hand, kNN, the point encoder's
equivariance, the fusion's attention across views, and a tiny P2P classifier end to end (CPU)."""
from __future__ import annotations

import math

import pytest
import torch

from finetune.pointcloud.model import (MultiViewFusion, P2PClassifier, PointEncoder, euler_to_matrix, knn_indices,
                                       rotate_views)


def test_views_rotate_as_the_authors_euler2mat_by_hand():
    """``Rx(a) @ Ry(0) @ Rz(pi/2)`` for a = k pi/2: Rz(pi/2) takes x to y; then Rx(pi/2) takes y to z, Rx(pi) to
    -y, Rx(3 pi/2) to -z. So the x axis lands on y, z, -y, -z in views 0..3, and the z axis stays z, then goes
    to -y, -z, y."""
    x_axis, z_axis = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]]).unbind(1)
    views = rotate_views(torch.stack([x_axis, z_axis], dim=1).double())  # (4, 2, 3)
    expected_x = torch.tensor([[0.0, 1, 0], [0, 0, 1], [0, -1, 0], [0, 0, -1]], dtype=torch.float64)
    expected_z = torch.tensor([[0.0, 0, 1], [0, -1, 0], [0, 0, -1], [0, 1, 0]], dtype=torch.float64)
    torch.testing.assert_close(views[:, 0], expected_x, rtol=0, atol=1e-15)
    torch.testing.assert_close(views[:, 1], expected_z, rtol=0, atol=1e-15)
    rotation = euler_to_matrix(torch.tensor([[0.3, -0.2, 1.1]], dtype=torch.float64))[0]
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-15)
    assert math.isclose(torch.det(rotation).item(), 1.0, abs_tol=1e-15)


def test_knn_by_hand_includes_the_point_itself():
    line = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [3, 0, 0], [10, 0, 0]]])
    neighbours = knn_indices(line, 2)[0]
    assert [sorted(row) for row in neighbours.tolist()] == [[0, 1], [0, 1], [1, 2], [2, 3]]


def test_point_features_follow_the_points_order():
    """kNN edge features with a max over neighbours: permuting the points permutes their features, nothing else."""
    torch.manual_seed(0)
    encoder = PointEncoder(neighbours=8).double().eval()
    cloud = torch.rand(2, 64, 3, dtype=torch.float64)
    order = torch.randperm(64)
    features = encoder(cloud)
    assert features.shape == (2, 64, 64)
    torch.testing.assert_close(encoder(cloud[:, order]), features[:, order], rtol=0, atol=1e-12)


def test_the_fusion_attends_across_the_views_of_one_cloud_only():
    torch.manual_seed(0)
    fusion = MultiViewFusion(dim=16, views=4).double().eval()
    maps = torch.rand(8, 16, 28, 28, dtype=torch.float64)  # 2 clouds x 4 views
    changed = maps.clone()
    changed[1] += 1.0  # view 1 of the first cloud
    before, after = fusion(maps), fusion(changed)
    assert not torch.allclose(before[0], after[0])  # view 0 of the same cloud sees it
    torch.testing.assert_close(before[4:], after[4:], rtol=0, atol=0)  # the other cloud does not


def test_a_tiny_p2p_classifier_maps_clouds_to_logits_and_trains_every_part():
    import unireplknet

    torch.manual_seed(0)
    backbone = unireplknet.UniRepLKNet(num_classes=0, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64),
                                       kernel_sizes=((3,), (5,), (5,), (3,)))
    model = P2PClassifier(backbone, num_classes=6, size=56, neighbours=8)
    clouds = torch.rand(2, 128, 6) * 2 - 1
    images = model.projector(clouds)
    assert images.shape == (8, 3, 56, 56)
    low = (0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    high = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert (images >= low.view(1, 3, 1, 1) - 1e-6).all() and (images <= high.view(1, 3, 1, 1) + 1e-6).all()
    logits = model(clouds)
    assert logits.shape == (2, 6) and model.norm.normalized_shape == (4 * 64,)
    # the point features come from the original cloud when given: another original, other logits
    assert not torch.allclose(model(clouds, clouds.flip(1) * 0.5), logits)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 5])).backward()
    # every part learns; the backbone's own pooled-feature norm is unused (the head pools the views itself), as in
    # the authors' model, whose files still hold it
    unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert unused == ["backbone.norm.weight", "backbone.norm.bias"]
    with pytest.raises(ValueError, match="multiple of 7"):
        P2PClassifier(backbone, num_classes=6, size=64)
