"""The point-cloud task's data layer (issue 22, points 1, 4 and the FPS of point 10): both ModelNet layouts, the
glued OFF headers, surface sampling and its cache, damaged files, the authors' normalization and farthest-point
sampling, each against hand computations or geometry."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.pointcloud.data import (PointClouds, farthest_point_sample, list_split, normalize_cloud,
                                      read_cloud)
from finetune.pointcloud.demo_data import CLASSES, write_demo
from pretrain.config import ConfigError


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    return write_demo(tmp_path_factory.mktemp("pointcloud"), train_per_class=3, test_per_class=2, points=256)


CUBE = b"OFF8 12 0\n" + b"".join(f"{x} {y} {z}\n".encode() for x in (-0.5, 0.5) for y in (-0.5, 0.5)
                                  for z in (-0.5, 0.5)) + b"".join(
    f"3 {a} {b} {c}\n".encode() for a, b, c in ((0, 1, 3), (0, 3, 2), (4, 6, 7), (4, 7, 5), (0, 4, 5), (0, 5, 1),
                                                (2, 3, 7), (2, 7, 6), (0, 2, 6), (0, 6, 4), (1, 5, 7), (1, 7, 3)))
"""A unit cube centred at 0 whose header is glued to its counts (``OFF8 12 0``), as some ModelNet40 files are."""


def test_farthest_point_sampling_by_hand():
    # on a line at 0, 1, 2, 3, 10 from point 0: 10 (distance 100), then 3 (min(9, 49) = 9 beats 4 and 1)
    line = torch.tensor([[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0], [10, 0, 0]])
    assert farthest_point_sample(line, 3).tolist() == [0, 4, 3]
    # from 10: 0 (distance 100), then 3: min(49, 9) = 9 beats min(64, 4) and min(81, 1)
    assert farthest_point_sample(line, 3, start=4).tolist() == [4, 0, 3]
    # equal distances: the first such point (pointnet2's kernel keeps the earlier index on ties)
    square = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]])
    assert farthest_point_sample(square, 4).tolist() == [0, 3, 1, 2]
    batched = farthest_point_sample(torch.stack([line, line.flip(0)]), 3)
    assert batched.tolist() == [[0, 4, 3], [0, 4, 1]]
    with pytest.raises(ValueError, match="cannot sample 6 of 5"):
        farthest_point_sample(line, 6)


def test_normalization_is_the_authors_unit_sphere_and_axis_map():
    cloud = np.array([[0.0, 0, 0, 0, 0, 1], [2, 0, 0, 1, 0, 0], [1, 0, 1, 0, 1, 0]], np.float32)
    # centroid (1, 0, 1/3); distances sqrt(1 + 1/9), sqrt(1 + 1/9), 2/3: radius sqrt(10)/3
    out = normalize_cloud(cloud)
    radius = np.sqrt(10) / 3
    xyz = (cloud[:, :3] - [1, 0, 1 / 3]) / radius
    np.testing.assert_allclose(out[:, :3], np.stack([-xyz[:, 2], -xyz[:, 0], xyz[:, 1]], 1), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out[:, 3:], cloud[:, 3:])  # normals untouched
    assert np.isclose(np.linalg.norm(out[:, :3], axis=1).max(), 1.0)


def test_a_glued_header_mesh_is_sampled_on_its_surface_deterministically_and_cached(tmp_path):
    root = tmp_path / "ModelNet"
    for split in ("train", "test"):
        (root / "cube" / split).mkdir(parents=True)
        (root / "cube" / split / f"cube_{split}.off").write_bytes(CUBE)
    (root / "sphere" / "train").mkdir(parents=True)
    split = list_split(str(root), "train")
    assert split.layout == "mesh" and split.classes == ("cube", "sphere") and len(split) == 1
    cloud = read_cloud(split, 0, num_points=500)
    assert cloud.shape == (500, 6) and cloud.dtype == np.float32
    # every point lies on a face of the cube, and its normal is that face's outward axis
    np.testing.assert_allclose(np.abs(cloud[:, :3]).max(axis=1), 0.5, rtol=0, atol=1e-6)
    axis = np.abs(cloud[:, :3]).argmax(axis=1)
    np.testing.assert_allclose(np.abs(cloud[np.arange(500), 3 + axis]), 1.0, rtol=0, atol=1e-6)
    assert (np.sign(cloud[np.arange(500), 3 + axis]) == np.sign(cloud[np.arange(500), axis])).all()
    assert np.array_equal(read_cloud(split, 0, num_points=500), cloud)  # seeded by the file's path
    cache = tmp_path / "cache"
    assert np.array_equal(read_cloud(split, 0, 500, str(cache)), cloud) and len(os.listdir(cache)) == 1
    (root / "cube" / "train" / "cube_train.off").write_bytes(CUBE.replace(b"0.5", b"1.5"))  # changed: sampled again
    assert np.abs(read_cloud(split, 0, 500, str(cache))[:, :3]).max() == pytest.approx(1.5)
    assert len(os.listdir(cache)) == 2


def test_the_resampled_layout_and_its_checks(demo, tmp_path):
    split = list_split(demo["resampled"], "test", 6)
    assert split.layout == "resampled" and split.classes == CLASSES and len(split) == 12
    assert split.items[0] == ("box/box_0004.txt", 0) and split.items[-1] == ("torus/torus_0005.txt", 5)
    cloud = read_cloud(split, 0)
    assert cloud.shape == (256, 6)
    with pytest.raises(ConfigError, match=r"^pointcloud\.num_classes: .*found 6 \(box, capsule"):
        list_split(demo["resampled"], "train", 40)
    ten = tmp_path / "modelnet10"
    shutil.copytree(demo["resampled"], ten)
    for name in ("shape_names", "train", "test"):
        (ten / f"modelnet40_{name}.txt").rename(ten / f"modelnet10_{name}.txt")
    assert list_split(str(ten), "train", 6).items == list_split(demo["resampled"], "train", 6).items
    (ten / "modelnet10_test.txt").write_text("box_0004\nchair_0001\n")
    with pytest.raises(ValueError, match=r"modelnet10_test\.txt: 'chair_0001' names no class"):
        list_split(str(ten), "test")


def test_both_layouts_hold_the_same_shapes(demo):
    for split in ("train", "test"):
        meshes, texts = list_split(demo["mesh"], split, 6), list_split(demo["resampled"], split, 6)
        assert [(Path(p).stem, label) for p, label in meshes.items] == [
            (Path(p).stem, label) for p, label in texts.items]


@pytest.mark.parametrize("layout", ["mesh", "resampled"])
def test_damaged_files_are_skipped_named_and_counted_in_every_split(demo, tmp_path, layout, caplog):
    root = tmp_path / layout
    shutil.copytree(demo[layout], root)
    caplog.set_level(logging.WARNING)
    for split in ("train", "test"):
        clouds = PointClouds(list_split(str(root), split, 6), num_points=64)
        relative = clouds.split.items[1][0]
        damaged = root / relative
        damaged.write_bytes(b"OFF\n8 12 0\n0 0\n" if layout == "mesh" else b"0.1,0.2\n0.3")
        assert clouds[1] is None and clouds.skipped == 1 and relative in caplog.text
        assert clouds[0] is not None and clouds[0][0].shape[1] == 6


def test_projection_cells_and_scatter_by_hand():
    """The authors' ``ProjEnc`` arithmetic on a map of 8: points (0, 0), (5, 2) and (1, 0): extents 5 and 2, cell
    5 / 5 = 1; cells (0, 0), (5, 2), (1, 0); their 3 x 3 neighbourhoods + 1 span rows 0..7, columns 0..4; centre
    floor(7 / 2) = 3 and floor(4 / 2) = 2; shift 8 / 2 - centre - 1 = (0, 1): rows 0..2 x columns 1..3, rows 5..7 x
    columns 3..5 and rows 1..3 x columns 1..3 (overlapping the first on rows 1..2: summed there)."""
    from finetune.pointcloud.projection import project_features, projection_indices

    points = torch.tensor([[[0.0, 0.0, 9.0], [5.0, 2.0, -9.0], [1.0, 0.0, 0.0]]])
    index = projection_indices(points, 8)
    cells = [sorted(r * 8 + c for r in rows for c in columns)
             for rows, columns in ((range(0, 3), range(1, 4)), (range(5, 8), range(3, 6)), (range(1, 4), range(1, 4)))]
    assert [sorted(index[0, 9 * k:9 * k + 9].tolist()) for k in range(3)] == cells
    grid = project_features(points, torch.tensor([[[1.0, 10.0], [2.0, 20.0], [4.0, 40.0]]]), 8)
    expected = torch.zeros(2, 8, 8)
    expected[:, 0:3, 1:4] += torch.tensor([1.0, 10.0])[:, None, None]
    expected[:, 5:8, 3:6] += torch.tensor([2.0, 20.0])[:, None, None]
    expected[:, 1:4, 1:4] += torch.tensor([4.0, 40.0])[:, None, None]
    assert torch.equal(grid[0], expected) and grid[0, 1, 1, 1] == 10.0 + 40.0
    # a real cloud fills a centred 224 map: its cells span at most 222 rows, the middle at 111-112
    cloud = torch.rand(2, 1024, 3, generator=torch.Generator().manual_seed(0))
    rows = projection_indices(cloud, 224) // 224
    assert rows.min() >= 0 and rows.max() <= 223 and abs((rows.max() + rows.min()) / 2 - 111.5) <= 1


def test_farthest_points_are_computed_once_per_file_content_and_cached(demo, tmp_path):
    """FPS is deterministic, so the loaders cache it per file: the cached indices are the computation's, the
    second read comes from the cache, and a changed file is sampled again."""
    root = tmp_path / "copy"
    shutil.copytree(demo["resampled"], root)
    split = list_split(str(root), "train", 6)
    cache = tmp_path / "cache"
    clouds = PointClouds(split, cache_dir=str(cache))
    xyz = normalize_cloud(clouds[0][0])[:, :3].copy()
    expected = farthest_point_sample(torch.from_numpy(xyz), 100)
    assert torch.equal(clouds.farthest(0, xyz, 100), expected) and len(list(cache.glob("*.fps.npy"))) == 1
    assert torch.equal(PointClouds(split, cache_dir=str(cache)).farthest(0, xyz, 100), expected)
    assert len(list(cache.glob("*.fps.npy"))) == 1
    path = root / split.items[0][0]
    path.write_text(path.read_text().replace("0.", "0.1", 5))
    os.utime(path, (1, 1))  # a different modification time too: fsspec's key of the file changes
    PointClouds(split, cache_dir=str(cache)).farthest(0, xyz, 100)
    assert len(list(cache.glob("*.fps.npy"))) == 2
