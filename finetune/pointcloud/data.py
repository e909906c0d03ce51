"""ModelNet data for the point-cloud task (issue 22): both layouts users have, read into ``(points, label)``.

Layouts (a local folder or any fsspec URL):

    mesh        ROOT/<class>/{train,test}/<class>_NNNN.off     the raw ModelNet tree; classes = the sorted class
                                                                folders; some headers are glued to the counts
                                                                (``OFF490 518 0``: trimesh reads those too)
    resampled   ROOT/modelnet40_shape_names.txt                 class names, index = line
                ROOT/modelnet40_{train,test}.txt                ids such as ``airplane_0001``
                ROOT/<class>/<class>_NNNN.txt                   ``x,y,z,nx,ny,nz`` per line
                (ModelNet10: the same with ``modelnet10_*``)

A mesh is sampled once: ``num_points`` surface points with their face normals
(``trimesh.sample.sample_surface``, seeded by the file's relative path, so every process and every rerun gets
the same cloud), cached as ``.npy`` under ``cache_dir`` keyed by the file's path and fsspec ``ukey`` (a changed
file is sampled again). A file that does
not parse raises ``ValueError`` naming it (:class:`PointClouds` skips it, names it in a warning and counts it).

The authors' preprocessing (``Point/dataset/modelnet.py``): the cloud centred and scaled into the unit sphere,
axes mapped ``(x, y, z) -> (-z, -x, y)`` (:func:`normalize_cloud`); farthest-point sampling in plain torch
(:func:`farthest_point_sample`, what ``pointnet2_ops`` computes on CUDA).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from pretrain.config import ConfigError

__all__ = ["PointClouds", "PointSplit", "farthest_point_sample", "list_split", "normalize_cloud", "read_cloud"]

_logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
CACHE_VERSION = 1
"""Part of every cache key: raise it when sampling or FPS computes anything else, so old entries are not used."""


def _filesystem(root: str):
    import fsspec

    return fsspec.core.url_to_fs(root)


@dataclass(frozen=True)
class PointSplit:
    """One split: the root URL, the layout (``mesh`` or ``resampled``), class names (index = label) and the
    ``(relative path, label)`` of every sample, in the layout's order."""

    root: str
    layout: str
    split: str
    classes: tuple[str, ...]
    items: tuple[tuple[str, int], ...]

    def __len__(self) -> int:
        return len(self.items)


def _resampled_prefix(fs, base: str) -> str | None:
    """``modelnet40`` or ``modelnet10`` when ``base`` holds that resampled layout's shape names, else None."""
    for prefix in ("modelnet40", "modelnet10"):
        if fs.isfile(f"{base}/{prefix}_shape_names.txt"):
            return prefix
    return None


def _lines(fs, path: str) -> list[str]:
    with fs.open(path, "r") as f:
        return [line.strip() for line in f if line.strip()]


def _checked(root: str, classes: tuple[str, ...], num_classes: int | None) -> tuple[str, ...]:
    if num_classes is not None and len(classes) != num_classes:
        shown = ", ".join(classes[:6]) + (", ..." if len(classes) > 6 else "")
        raise ConfigError("pointcloud.num_classes", f"expected the number of classes of {root}: found "
                          f"{len(classes)} ({shown}), got {num_classes}")
    return classes


def list_split(root: str, split: str, num_classes: int | None = None) -> PointSplit:
    """The samples of ``split`` (``train`` or ``test``) under ``root``, in either layout (the resampled one when
    its shape-name file is there). ``num_classes`` other than the classes found raises ``ConfigError`` on
    ``pointcloud.num_classes``; a missing root, split file or empty split raises ``FileNotFoundError``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected train or test")
    fs, base = _filesystem(root)
    base = base.rstrip("/")
    if not fs.isdir(base):
        raise FileNotFoundError(f"{root}: no such folder; expected ModelNet (<class>/{{train,test}}/*.off, or "
                                "modelnet40_normal_resampled with modelnet40_shape_names.txt)")
    prefix = _resampled_prefix(fs, base)
    if prefix is not None:
        classes = _checked(root, tuple(_lines(fs, f"{base}/{prefix}_shape_names.txt")), num_classes)
        index = {name: label for label, name in enumerate(classes)}
        listed = f"{base}/{prefix}_{split}.txt"
        if not fs.isfile(listed):
            raise FileNotFoundError(f"{listed}: missing; the resampled layout lists each split's ids there")
        items = []
        for shape_id in _lines(fs, listed):
            name = shape_id.rsplit("_", 1)[0]
            if name not in index:
                raise ValueError(f"{listed}: {shape_id!r} names no class of {prefix}_shape_names.txt")
            items.append((f"{name}/{shape_id}.txt", index[name]))
        layout = "resampled"
    else:
        folders = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(base, detail=False) if fs.isdir(p))
        classes = _checked(root, tuple(c for c in folders if not c.startswith((".", "_"))), num_classes)
        items = []
        for label, name in enumerate(classes):
            folder = f"{base}/{name}/{split}"
            if fs.isdir(folder):
                items += [(f"{name}/{split}/{os.path.basename(p)}", label)
                          for p in sorted(fs.ls(folder, detail=False)) if p.lower().endswith(".off")]
        layout = "mesh"
    if not items:
        raise FileNotFoundError(f"{root}: the {split} split has no samples ({layout} layout)")
    return PointSplit(root, layout, split, classes, tuple(items))


def _sample_mesh(data: bytes, where: str, num_points: int) -> np.ndarray:
    import trimesh

    try:
        mesh = trimesh.load(io.BytesIO(data), file_type="off", force="mesh", process=False)
    except Exception as error:  # noqa: BLE001 - trimesh's parse errors vary: one message naming the file
        raise ValueError(f"{where}: does not parse as an OFF mesh: {type(error).__name__}: {error}") from error
    if len(mesh.faces) == 0 or not np.isfinite(mesh.vertices).all() or mesh.area <= 0:
        raise ValueError(f"{where}: an OFF mesh without a surface ({len(mesh.vertices)} vertices, "
                         f"{len(mesh.faces)} faces)")
    seed = int.from_bytes(hashlib.sha256(where.encode()).digest()[:8], "little")
    points, faces = trimesh.sample.sample_surface(mesh, num_points, seed=seed)
    return np.concatenate([points, mesh.face_normals[faces]], axis=1).astype(np.float32)


def _parse_resampled(data: bytes, where: str) -> np.ndarray:
    try:
        cloud = np.loadtxt(io.BytesIO(data), delimiter=",", dtype=np.float32, ndmin=2)
    except ValueError as error:
        raise ValueError(f"{where}: expected lines of x,y,z,nx,ny,nz: {error}") from error
    if cloud.shape[1] != 6 or len(cloud) == 0 or not np.isfinite(cloud).all():
        raise ValueError(f"{where}: expected lines of 6 finite values x,y,z,nx,ny,nz, got shape {cloud.shape}")
    return cloud


def _cached_array(cache_dir: str, key_text: str, compute, suffix: str = ".npy") -> np.ndarray:
    """``compute()``'s array, stored once under ``cache_dir`` by the hash of ``key_text`` (written atomically) and
    read back from there afterwards."""
    from unireplknet.files import atomic_open

    cached = os.path.join(cache_dir, hashlib.sha256(key_text.encode()).hexdigest()[:24] + suffix)
    if os.path.exists(cached):
        return np.load(cached)
    array = compute()
    os.makedirs(cache_dir, exist_ok=True)
    with atomic_open(cached, "wb", durable=False) as f:
        np.save(f, array)
    return array


def _content_key(fs, path: str) -> str:
    """fsspec's key of the file's current content (path, size, mtime or checksum); ``ValueError`` naming it."""
    try:
        return str(fs.ukey(path))
    except OSError as error:
        raise ValueError(f"{path}: {type(error).__name__}: {error}") from error


def read_cloud(split: PointSplit, index: int, num_points: int = 8192, cache_dir: str | None = None,
               location: tuple | None = None) -> np.ndarray:
    """Sample ``index`` of ``split`` as ``(N, 6)`` float32 (xyz, normals): a resampled file as stored, a mesh
    sampled at ``num_points`` (cached under ``cache_dir`` when given). ``location``: the split's ``(fs, base)``
    when the caller resolved it already. ``ValueError`` naming the file when it cannot be read."""
    fs, base = location or _filesystem(split.root)
    relative = split.items[index][0]
    path = f"{base.rstrip('/')}/{relative}"

    def read() -> bytes:
        try:
            with fs.open(path, "rb") as f:
                return f.read()
        except OSError as error:
            raise ValueError(f"{path}: {type(error).__name__}: {error}") from error

    if split.layout == "resampled":
        return _parse_resampled(read(), path)
    if not cache_dir:
        return _sample_mesh(read(), relative, num_points)
    key = f"mesh{CACHE_VERSION}|{split.root}|{relative}|{_content_key(fs, path)}|{num_points}"
    return _cached_array(cache_dir, key, lambda: _sample_mesh(read(), relative, num_points))


class PointClouds(torch.utils.data.Dataset):
    """The clouds of a split, ``(points (N, 6) float32, label)`` each, or None for a file that cannot be read
    (named in a warning; :attr:`skipped` counts them in this process)."""

    def __init__(self, split: PointSplit, num_points: int = 8192, cache_dir: str | None = None):
        self.split, self.num_points, self.cache_dir = split, num_points, cache_dir
        self.skipped = 0
        self._location = None

    def __len__(self) -> int:
        return len(self.split)

    def _where(self) -> tuple:
        """The split's ``(fs, base)``, resolved once per process (each loader worker opens its own)."""
        if self._location is None:
            self._location = _filesystem(self.split.root)
        return self._location

    def farthest(self, index: int, xyz: np.ndarray, count: int) -> torch.Tensor:
        """Indices of the ``count`` farthest points of sample ``index``'s (normalized) ``xyz``: deterministic (the
        same every epoch, as the authors' FPS on the GPU), so computed once per file content and cached under
        ``cache_dir`` (FPS of 4800 of 10,000 points costs about half a CPU-second)."""
        def compute() -> np.ndarray:
            return farthest_point_sample(torch.from_numpy(xyz), count).numpy().astype(np.int32)

        if not self.cache_dir:
            return torch.from_numpy(compute().astype(np.int64))
        fs, base = self._where()
        relative = self.split.items[index][0]
        version = _content_key(fs, f"{base.rstrip('/')}/{relative}")
        key = f"fps{CACHE_VERSION}|{self.split.root}|{relative}|{version}|{self.num_points}|{len(xyz)}|{count}"
        return torch.from_numpy(_cached_array(self.cache_dir, key, compute, ".fps.npy").astype(np.int64))

    def __getitem__(self, index: int) -> tuple[np.ndarray, int] | None:
        try:
            cloud = read_cloud(self.split, index, self.num_points, self.cache_dir, self._where())
        except ValueError as error:
            self.skipped += 1
            _logger.warning("skipping %s", error)
            return None
        return cloud, self.split.items[index][1]


def normalize_cloud(points: np.ndarray) -> np.ndarray:
    """The authors' ``pc_normalize`` and axis map: xyz centred on its mean, divided by the largest distance from
    it (into the unit sphere), then ``(x, y, z) -> (-z, -x, y)``; further columns (normals) are left as they are."""
    xyz = points[:, :3] - points[:, :3].mean(axis=0)
    radius = np.sqrt((xyz ** 2).sum(axis=1)).max()
    xyz = xyz / (radius if radius > 0 else 1.0)
    mapped = np.stack([-xyz[:, 2], -xyz[:, 0], xyz[:, 1]], axis=1)
    return np.concatenate([mapped, points[:, 3:]], axis=1).astype(points.dtype)


def farthest_point_sample(points: torch.Tensor, count: int, start: int = 0) -> torch.Tensor:
    """Indices of ``count`` farthest points of ``points`` ((N, D) or (B, N, D); the first 3 columns are used),
    as ``pointnet2_ops.furthest_point_sample``: start at ``start``, then repeatedly the point whose squared
    distance to the chosen set is largest (the first of equal ones). Returns (count,) or (B, count) int64."""
    single = points.dim() == 2
    xyz = (points[None] if single else points)[..., :3].to(torch.float64)
    batch, size = xyz.shape[:2]
    if not 0 < count <= size:
        raise ValueError(f"cannot sample {count} of {size} points")
    chosen = torch.empty(batch, count, dtype=torch.int64, device=xyz.device)
    nearest = torch.full((batch, size), float("inf"), dtype=torch.float64, device=xyz.device)
    farthest = torch.full((batch,), start, dtype=torch.int64, device=xyz.device)
    rows = torch.arange(batch, device=xyz.device)
    for i in range(count):
        chosen[:, i] = farthest
        distance = ((xyz - xyz[rows, farthest][:, None]) ** 2).sum(-1)
        nearest = torch.minimum(nearest, distance)
        farthest = nearest.argmax(dim=1)
    return chosen[0] if single else chosen
