"""Modality adapters feed the unchanged backbone."""
from __future__ import annotations

import pytest
import timm
import torch

import unireplknet  # noqa: F401
from unireplknet.adapters import TimeSeriesEmbedding, project_points, spectrogram_to_map, tile_frames


def test_audio_spectrogram_runs_through_one_channel_model():
    spec = torch.randn(2, 64, 48)
    model = timm.create_model("unireplknet_a", in_chans=1, num_classes=35)
    assert model(spectrogram_to_map(spec)).shape == (2, 35)


def test_tile_frames_places_each_frame_in_its_cell():
    video = torch.arange(2 * 4 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 4, 3, 5, 6)
    tiled = tile_frames(video)
    assert tiled.shape == (2, 3, 10, 12)
    for i in range(4):
        r, c = divmod(i, 2)
        assert torch.equal(tiled[:, :, r * 5:(r + 1) * 5, c * 6:(c + 1) * 6], video[:, i])
    assert tile_frames(video, rows=1).shape == (2, 3, 5, 24)
    with pytest.raises(ValueError, match="cannot be tiled"):
        tile_frames(video, rows=3)


def test_time_series_embedding_shape_and_grouping():
    embed = TimeSeriesEmbedding(in_features=5, groups=3, embed_dim=8, height=16)
    series = torch.randn(2, 32, 5)
    maps = embed(series)
    assert maps.shape == (6, 1, 16, 16)
    expected = embed.embed(series[1]).reshape(32, 3, 8)[:, 2].reshape(16, 16)
    assert torch.allclose(maps[1 * 3 + 2, 0], expected)


def test_point_projection_marks_the_nearest_point():
    points = torch.tensor([[[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]]])
    image = project_points(points, size=8)
    assert image.shape == (1, 3, 8, 8)
    # Depth along z (view 2, pixel u=x, v=y): each corner holds a point at z=1 and one at z=-1; z=-1 is nearer.
    assert image[0, 2, 7, 7] == pytest.approx(1.0, abs=1e-5)
    assert image[0, 2, 0, 0] == pytest.approx(1.0, abs=1e-5)
    assert int((image[0, 2] > 0).sum()) == 2
