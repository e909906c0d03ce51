"""The time-series task's data layer (issue 22 points 5, 8 and the parity tests of point 10): the layout read
safely, windows, time features, the moving-average decomposition, decoder inits and the persistence baseline,
each against hand computations."""
from __future__ import annotations

import datetime
import fractions
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from finetune.timeseries.data import (decoder_inits, group_stations, load_times, moving_average, persistence_sums,
                                      read_split, time_features, window, window_count)
from finetune.timeseries.demo_data import write_demo
from pretrain.config import ConfigError


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    return write_demo(tmp_path_factory.mktemp("timeseries"), stations=22, days=30)


def test_windows_by_hand():
    series = np.arange(100)
    assert window_count(100) == 29  # 100 - 48 - 24 + 1
    x, y = window(series, 0)
    assert x.tolist() == list(range(48)) and y.tolist() == list(range(24, 72))
    x, y = window(series, 28)
    assert x[0] == 28 and x[-1] == 75 and y[0] == 52 and y[-1] == 99
    with pytest.raises(IndexError, match="window 29 of a series of 100 steps"):
        window(series, 29)


def test_time_features_by_hand():
    times = np.array(["2020-01-01T00:00", "2020-12-31T23:00"], dtype="datetime64[ns]")
    # Wednesday 1 Jan 2020 (day of week 2), hour 0; Thursday 31 Dec 2020 (3), hour 23, day 366 of a leap year
    expected = np.array([[-0.5, 2 / 6 - 0.5, -0.5, -0.5], [0.5, 0.0, 0.5, 365 / 365 - 0.5]], np.float32)
    np.testing.assert_allclose(time_features(times), expected, rtol=0, atol=1e-7)


def test_moving_average_and_decoder_inits_by_hand():
    spike = torch.tensor([0.0, 0, 3, 0, 0], dtype=torch.float64).view(1, 5, 1)
    # kernel 3: padded 0 | 0 0 3 0 0 | 0 -> means 0, 1, 1, 1, 0
    assert moving_average(spike, 3).view(-1).tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    ramp = torch.arange(60, dtype=torch.float64).view(1, 60, 1)
    torch.testing.assert_close(moving_average(ramp)[:, 12:48], ramp[:, 12:48], rtol=0, atol=1e-12)  # linear: kept
    x = torch.tensor([1.0, 2, 3, 4], dtype=torch.float64).view(1, 4, 1)
    # trend (kernel 3): padded 1 | 1 2 3 4 | 4 -> 4/3, 2, 3, 11/3; seasonal: -1/3, 0, 0, 1/3; mean 2.5
    seasonal, trend = decoder_inits(x, label=2, outputs=2, kernel=3)
    torch.testing.assert_close(seasonal.view(-1), torch.tensor([0, 1 / 3, 0, 0], dtype=torch.float64), rtol=0,
                               atol=1e-15)
    torch.testing.assert_close(trend.view(-1), torch.tensor([3, 11 / 3, 2.5, 2.5], dtype=torch.float64), rtol=0,
                               atol=1e-15)


def test_persistence_baseline_by_hand(demo):
    from finetune.timeseries.data import SeriesSplit

    ramp = SeriesSplit(np.arange(10, dtype=np.float32)[:, None] * 2, np.zeros(10, "datetime64[ns]"),
                       np.zeros((1, 3), np.float32), 1)
    # inputs 2, outputs 3: 6 windows; the errors of a ramp of slope 2 are 2, 4, 6 in each
    sums = persistence_sums(ramp, inputs=2, outputs=3)
    assert sums == {"squared": 6 * (4 + 16 + 36), "absolute": 6 * 12, "count": 18.0}


def test_stations_group_into_nodes_or_the_key_is_named():
    assert group_stations(3850, 11) == 350
    with pytest.raises(ConfigError, match=r"^timeseries\.stations_per_node: expected a divisor of the 44 stations"):
        group_stations(44, 7)


def test_the_layout_reads_every_split_and_names_what_is_wrong(demo, tmp_path):
    lengths = {name: len(read_split(demo["root"], "temp", name)) for name in ("train", "val", "test")}
    assert lengths == {name: demo[name] for name in ("train", "val", "test")} and sum(lengths.values()) == 30 * 24
    split = read_split(demo["root"], "temp", "val")
    assert split.values.shape == (demo["val"], 22) and split.values.dtype == np.float32 and split.features == 1
    assert split.times[1] - split.times[0] == np.timedelta64(1, "h")
    root = tmp_path / "copy"
    shutil.copytree(demo["root"], root)
    (root / "data_time_test.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_time_test\.npy: missing"):
        read_split(str(root), "temp", "test")
    np.save(root / "stations_sorted.npy", np.zeros((21, 3), np.float32))
    with pytest.raises(ValueError, match=r"stations_sorted\.npy: shape \(21, 3\), expected \(22, 3\)"):
        read_split(str(root), "temp", "train")
    with pytest.raises(ConfigError, match=r"^timeseries\.variable"):
        read_split(str(root), "rain", "train")


def test_timestamps_in_object_arrays_load_through_the_allow_list_only(tmp_path):
    stamps = [datetime.datetime(2020, 1, 1, h) for h in range(3)]
    for name, values in (("datetimes", np.array(stamps, dtype=object)),
                         ("timestamps", np.array([pd.Timestamp(s) for s in stamps], dtype=object)),
                         ("strings", np.array([s.isoformat() for s in stamps]))):
        np.save(tmp_path / f"{name}.npy", values, allow_pickle=True)
        times = load_times((tmp_path / f"{name}.npy").read_bytes(), name)
        assert times.tolist() == np.array(stamps, dtype="datetime64[ns]").tolist(), name
    np.save(tmp_path / "other.npy", np.array([fractions.Fraction(1, 2)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"other\.npy: .*fractions\.Fraction is not a timestamp type"):
        load_times((tmp_path / "other.npy").read_bytes(), "other.npy")


def test_the_layout_reads_the_same_from_an_fsspec_url(demo):
    """The same files in fsspec's in-memory filesystem (any URL fsspec opens: s3://, gs://, ...): the same arrays,
    and the preflight's header-only shapes."""
    import fsspec

    from finetune.timeseries.task import split_shapes

    fs = fsspec.filesystem("memory")
    for path in sorted(__import__("pathlib").Path(demo["root"]).iterdir()):
        fs.pipe(f"/timeseries_url/{path.name}", path.read_bytes())
    try:
        for split in ("train", "val", "test"):
            local, remote = read_split(demo["root"], "temp", split), read_split("memory://timeseries_url", "temp", split)
            assert np.array_equal(local.values, remote.values) and np.array_equal(local.times, remote.times)
            assert np.array_equal(local.stations, remote.stations)
        shapes = split_shapes("memory://timeseries_url", "temp")
        assert shapes["temp_global_hourly_train.npy"] == (demo["train"], 22, 1)
        assert shapes["stations_sorted.npy"] == (22, 3)
    finally:
        fs.rm("/timeseries_url", recursive=True)
