"""The authors' point-cloud model (P2P with UniRepLKNet, ``Point/models/p2p_adaptor_lk.py`` and
``models/layers/{encoder,fusion,head,transformer}.py``), written from the spec in plain torch:

1. four views: the cloud rotated by the Euler angles ``(k pi/2, 0, pi/2)``, k = 0..3 (``X @ Y @ Z``; the z shift
   of 1.4 that follows does not move the xy projection and is left out);
2. point features of the unrotated cloud: Conv1d(3 -> 8), kNN (k = 32) edge features ``[f_j - f_i, f_i]``,
   1x1 Conv2d(16 -> 64, no bias) + GroupNorm(4) + LeakyReLU(0.2), max over the neighbours, Conv1d(64 -> 64);
3. each view's points scattered into a ``size`` x ``size`` map (:mod:`finetune.pointcloud.projection`);
4. a ResNet BasicBlock(64) + 1x1 conv; the cross-view fusion: 7x7 stride-7 conv (64 -> 128), one pre-norm
   transformer layer (8 heads of 128, MLP 256) over the 4 views' tokens together, nearest upsampling, 3x3
   conv + GELU, concatenation with its input, 1x1 conv + GELU; 1x1 conv to 3 channels, sigmoid, ImageNet
   normalization: (B x 4, 3, size, size) images;
5. the UniRepLKNet's last-stage maps (B x 4, C, size/32, size/32), the views concatenated on channels, global
   average pooling, LayerNorm, Linear (``PoolingClsHead``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .projection import project_features

__all__ = ["MultiViewFusion", "P2PClassifier", "PointEncoder", "PointToImage", "VIEW_ANGLES", "euler_to_matrix",
           "knn_indices", "rotate_views"]

VIEW_ANGLES = tuple((k * math.pi / 2, 0.0, math.pi / 2) for k in range(4))
"""The authors' first four views (x, y, z Euler angles)."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def euler_to_matrix(angles: torch.Tensor) -> torch.Tensor:
    """(V, 3) Euler angles (x, y, z) -> (V, 3, 3) rotations ``Rx @ Ry @ Rz`` (the authors' ``euler2mat``)."""
    x, y, z = angles.unbind(-1)
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    rz = torch.stack([z.cos(), -z.sin(), zero, z.sin(), z.cos(), zero, zero, zero, one], -1).reshape(-1, 3, 3)
    ry = torch.stack([y.cos(), zero, y.sin(), zero, one, zero, -y.sin(), zero, y.cos()], -1).reshape(-1, 3, 3)
    rx = torch.stack([one, zero, zero, zero, x.cos(), -x.sin(), zero, x.sin(), x.cos()], -1).reshape(-1, 3, 3)
    return rx @ ry @ rz


def rotate_views(points: torch.Tensor, angles=VIEW_ANGLES) -> torch.Tensor:
    """(B, N, 3) -> (B x V, N, 3): each cloud rotated into each view (views vary fastest), ``R p``."""
    rotations = euler_to_matrix(torch.tensor(angles, dtype=points.dtype, device=points.device))  # (V, 3, 3)
    rotated = torch.einsum("vij,bnj->bvni", rotations, points[..., :3])
    return rotated.reshape(-1, *rotated.shape[2:])


def knn_indices(points: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N, 3) -> (B, N, k): each point's k nearest points by squared distance, itself included."""
    distance = torch.cdist(points, points).square()
    return distance.topk(k, dim=-1, largest=False).indices


class PointEncoder(nn.Module):
    """Per-point features (B, N, ``dim``) of the unrotated cloud from kNN edge features (step 2)."""

    def __init__(self, neighbours: int = 32, embed: int = 8, dim: int = 64):
        super().__init__()
        self.neighbours = neighbours
        self.input_trans = nn.Conv1d(3, embed, 1)
        self.graph_layer = nn.Sequential(nn.Conv2d(2 * embed, dim, 1, bias=False), nn.GroupNorm(4, dim),
                                         nn.LeakyReLU(0.2))
        self.proj_layer = nn.Conv1d(dim, dim, 1)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        xyz = points[..., :3]
        features = self.input_trans(xyz.transpose(1, 2))  # (B, E, N)
        index = knn_indices(xyz, min(self.neighbours, xyz.shape[1]))  # (B, N, k)
        batch, embed, count = features.shape
        flat = features.transpose(1, 2).reshape(batch * count, embed)
        offsets = torch.arange(batch, device=points.device)[:, None, None] * count
        neighbours = flat[(index + offsets).reshape(-1)].reshape(batch, count, -1, embed).permute(0, 3, 1, 2)
        centre = features[..., None].expand_as(neighbours)
        edges = self.graph_layer(torch.cat([neighbours - centre, centre], dim=1))  # (B, D, N, k)
        return self.proj_layer(edges.max(dim=-1).values).transpose(1, 2)


class BasicBlock(nn.Module):
    """ResNet's basic block at constant width (conv-BN-ReLU-conv-BN + identity, ReLU)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class _TransformerLayer(nn.Module):
    """One pre-norm layer: multi-head self-attention (``heads`` x ``head_dim``, no qkv bias) and a GELU MLP."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp: int):
        super().__init__()
        self.heads, self.scale = heads, head_dim ** -0.5
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = (t.reshape(batch, tokens, self.heads, -1).transpose(1, 2)
                   for t in self.to_qkv(self.norm1(x)).chunk(3, dim=-1))
        attention = ((q @ k.transpose(-1, -2)) * self.scale).softmax(dim=-1)
        x = x + self.to_out((attention @ v).transpose(1, 2).reshape(batch, tokens, -1))
        return x + self.mlp(self.norm2(x))


class MultiViewFusion(nn.Module):
    """The authors' ``MultiViewFusionV2``: every view's map sees the others through attention over all views'
    7x7-patch tokens."""

    def __init__(self, dim: int = 64, views: int = 4, patch: int = 7):
        super().__init__()
        width = 2 * dim  # the authors' 64 -> 128, heads of 128, MLP 256
        self.views, self.patch = views, patch
        self.conv1 = nn.Conv2d(dim, width, patch, stride=patch, bias=False)
        self.transformer = _TransformerLayer(width, heads=8, head_dim=width, mlp=2 * width)
        self.conv2 = nn.Sequential(nn.Conv2d(width, dim, 3, padding=1), nn.GELU())
        self.conv3 = nn.Sequential(nn.Conv2d(2 * dim, dim, 1), nn.GELU())

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        size = maps.shape[-1]
        tokens = self.conv1(maps)  # (B V, W, s, s)
        bv, width, side = tokens.shape[0], tokens.shape[1], tokens.shape[-1]
        tokens = tokens.reshape(bv // self.views, self.views, width, side * side).permute(0, 1, 3, 2)
        tokens = self.transformer(tokens.reshape(bv // self.views, -1, width))
        tokens = tokens.reshape(bv // self.views, self.views, side * side, width).permute(0, 1, 3, 2)
        upsampled = F.interpolate(tokens.reshape(bv, width, side, side), size=size)  # nearest
        return self.conv3(torch.cat([self.conv2(upsampled), maps], dim=1))


class PointToImage(nn.Module):
    """Steps 1-4: clouds (B, N, 3) -> normalized images (B x V, 3, size, size), ``size`` a multiple of 7."""

    def __init__(self, size: int = 224, views: int = 4, neighbours: int = 32, dim: int = 64):
        super().__init__()
        if size % 7:
            raise ValueError(f"the projection size must be a multiple of 7 (the fusion's patches), got {size}")
        self.size, self.views = size, views
        self.encoder = PointEncoder(neighbours, 8, dim)
        self.img_block = nn.Sequential(BasicBlock(dim), nn.Conv2d(dim, dim, 1))
        self.fusion = MultiViewFusion(dim, views)
        self.img_layer = nn.Conv2d(dim, 3, 1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, points: torch.Tensor, original: torch.Tensor | None = None) -> torch.Tensor:
        """``points`` (the augmented cloud) are projected; the point features come from ``original`` (the same
        points before rotation, scaling and shift, as the authors train; default ``points``)."""
        features = self.encoder(points if original is None else original)  # (B, N, D), the same for every view
        views = rotate_views(points, VIEW_ANGLES[:self.views])
        maps = project_features(views, features.repeat_interleave(self.views, dim=0), self.size)
        image = torch.sigmoid(self.img_layer(self.fusion(self.img_block(maps))))
        return (image - self.mean) / self.std


class P2PClassifier(nn.Module):
    """Steps 1-5: clouds (B, N, >= 3) -> class logits (B, classes), with ``backbone`` a
    :class:`~unireplknet.UniRepLKNet` (its ``forward_features`` gives the last-stage maps)."""

    def __init__(self, backbone: nn.Module, num_classes: int, size: int = 224, views: int = 4,
                 neighbours: int = 32, dim: int = 64):
        super().__init__()
        self.views = views
        self.projector = PointToImage(size, views, neighbours, dim)
        self.backbone = backbone
        features = backbone.num_features * views
        self.norm = nn.LayerNorm(features)
        self.head = nn.Linear(features, num_classes)

    def forward(self, points: torch.Tensor, original: torch.Tensor | None = None) -> torch.Tensor:
        maps = self.backbone.forward_features(self.projector(points, original))  # (B V, C, h, w)
        pooled = maps.reshape(-1, self.views * maps.shape[1], *maps.shape[2:]).mean(dim=(-2, -1))
        return self.head(self.norm(pooled))
