"""The time-series demo set in the Global Temp / Wind layout (``python -m finetune make-demo-data timeseries OUT``,
issue 22 point 8): hourly stations made of real series that ship inside statsmodels (monthly El Nino sea-surface
temperatures, weekly Mauna Loa CO2, yearly sunspots: each interpolated to hours over the demo's span, as a
station's slow component) plus generated daily and yearly cycles and AR(1) noise, at random positions.
Train, val and test are consecutive spans of one series, in the stored units (no scaling)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

__all__ = ["real_components", "write_demo"]

_logger = logging.getLogger(__name__)


def real_components(hours: int) -> np.ndarray:
    """(hours, 3): statsmodels' El Nino (monthly, 1950-2010), CO2 (weekly, gaps interpolated) and sunspots (yearly),
    each standardized and stretched over ``hours`` by linear interpolation."""
    import statsmodels.api as sm

    elnino = sm.datasets.elnino.load_pandas().data.iloc[:, 1:].to_numpy(dtype=np.float64).reshape(-1)
    co2 = sm.datasets.co2.load_pandas().data["co2"].interpolate(limit_direction="both").to_numpy(dtype=np.float64)
    sunspots = sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(dtype=np.float64)
    columns = []
    for series in (elnino, co2, sunspots):
        series = (series - series.mean()) / series.std()
        columns.append(np.interp(np.linspace(0, len(series) - 1, hours), np.arange(len(series)), series))
    return np.stack(columns, axis=1)


def write_demo(out: str | os.PathLike, variable: str = "temp", stations: int = 44, days: int = 120,
               split: tuple[float, float] = (0.7, 0.1), seed: int = 0) -> dict:
    """Write ``stations`` hourly stations over ``days`` days under ``out`` (``VARIABLE_global_hourly_*.npy``,
    ``data_time_*.npy`` as datetime64, ``stations_sorted.npy``); ``split``: the train and val fractions (test:
    the rest). Returns ``{"root", "train", "val", "test"}`` (their lengths)."""
    rng = np.random.default_rng(seed)
    hours = days * 24
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    times = np.datetime64("2020-01-01T00:00") + np.arange(hours).astype("timedelta64[h]")
    positions = np.stack([rng.uniform(-90, 90, stations), rng.uniform(-180, 180, stations),
                          rng.uniform(0, 3000, stations)], axis=1)
    latitude = np.deg2rad(positions[:, 0])
    hour = np.arange(hours)[:, None]
    real = real_components(hours) @ rng.normal(0.0, 1.0, (3, stations))  # each station mixes the real series
    daily = (4 + 6 * np.cos(latitude)) * np.sin(2 * np.pi * (hour / 24 + positions[:, 1] / 360))
    yearly = -12 * np.sin(latitude) * np.cos(2 * np.pi * hour / (24 * 365.25))
    noise = np.zeros((hours, stations))
    for t in range(1, hours):  # AR(1), coefficient 0.9
        noise[t] = 0.9 * noise[t - 1] + rng.normal(0.0, 0.5, stations)
    base = 15 + 10 * np.cos(latitude) - positions[:, 2] / 300 if variable == "temp" else 5 + 2 * np.cos(latitude)
    series = base + daily + yearly + 2 * real + noise
    if variable == "wind":
        series = np.abs(series)
    values = (10 * series)[:, :, None].astype(np.float32)  # stored at 10x the physical units, as the release
    ends = np.cumsum([int(hours * split[0]), int(hours * split[1])])
    lengths = {}
    for name, part in zip(("train", "val", "test"), np.split(np.arange(hours), ends)):
        np.save(out / f"{variable}_global_hourly_{name}.npy", values[part])
        np.save(out / f"data_time_{name}.npy", times[part])
        lengths[name] = len(part)
    np.save(out / "stations_sorted.npy", positions.astype(np.float32))
    _logger.info("wrote %d demo stations over %d days to %s (%s)", stations, days, out, lengths)
    return {"root": str(out), **lengths}
