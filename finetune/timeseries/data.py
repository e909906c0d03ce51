"""Global Temp / Global Wind data for the time-series task (issue 22): the layout of Corrformer's release, read
safely, with the authors' windows, time features and moving-average decomposition.

Layout (``ROOT``, a local folder or any fsspec URL; ``VARIABLE`` = ``temp`` or ``wind``)::

    VARIABLE_global_hourly_{train,val,test}.npy   float (T, stations, features), no scaling; flattened to
                                                  (T, stations x features) as the authors' loader does
    data_time_{train,val,test}.npy                the T timestamps (datetime64, strings, or Python datetimes /
                                                  pandas Timestamps in an object array)
    stations_sorted.npy                           (stations, 3) positions

Numeric arrays open with ``allow_pickle=False``; an object array of timestamps is unpickled with an allow-list
(datetimes, Timestamps, strings, NumPy's array reconstruction), never an unrestricted pickle.

Windows (``data_provider/data_loader.py``): window ``i`` reads ``x = data[i : i + 48]`` and
``y = data[i + 24 : i + 72]`` (the last 24 inputs again, then the 24 to predict); ``T - 48 - 24 + 1`` windows.
Time features (``utils/timefeatures.py``, hourly): hour / 23, day of week / 6, (day of month - 1) / 30,
(day of year - 1) / 365, each minus 0.5.
"""
from __future__ import annotations

import io
import pickle
from dataclasses import dataclass

import numpy as np
import torch

from pretrain.config import ConfigError

__all__ = ["SeriesSplit", "decoder_inits", "group_stations", "load_times", "moving_average", "npy_header",
           "persistence_sums", "read_split", "read_stations", "time_features", "window", "window_count"]

SPLITS = ("train", "val", "test")
VARIABLES = ("temp", "wind")


def _filesystem(root: str):
    import fsspec

    return fsspec.core.url_to_fs(root)


class _TimestampUnpickler(pickle.Unpickler):
    """Unpickles an object array of timestamps: NumPy's array reconstruction, datetimes, pandas Timestamps and
    strings only."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("datetime", "datetime"), ("datetime", "date"),
               ("datetime", "timedelta"), ("datetime", "timezone"),
               ("pandas._libs.tslibs.timestamps", "_unpickle_timestamp"),
               ("pandas._libs.tslibs.timestamps", "Timestamp"), ("builtins", "str")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not a timestamp type")
        return super().find_class(module, name)


def npy_header(buffer: io.BytesIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) from a ``.npy`` file's header at the buffer's position; the buffer is left at
    the data."""
    version = np.lib.format.read_magic(buffer)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(buffer)


def load_times(data: bytes, where: str) -> np.ndarray:
    """The timestamps of a ``data_time_*.npy`` file as ``datetime64[ns]`` (T,); ``ValueError`` naming ``where``."""
    import pandas as pd

    buffer = io.BytesIO(data)
    try:
        shape, _, dtype = npy_header(buffer)
        if dtype.hasobject:
            values = _TimestampUnpickler(buffer).load()
        else:
            buffer.seek(0)
            values = np.load(buffer, allow_pickle=False)
        times = pd.to_datetime(np.asarray(values).reshape(-1)).to_numpy(dtype="datetime64[ns]")
    except Exception as error:  # noqa: BLE001 - any damage or unknown content: one message naming the file
        raise ValueError(f"{where}: expected an array of timestamps: {type(error).__name__}: {error}") from error
    if len(times) != int(np.prod(shape)):
        raise ValueError(f"{where}: {len(times)} timestamps for a header of shape {shape}")
    return times


@dataclass(frozen=True)
class SeriesSplit:
    """One split: ``values`` (T, D) float32 (D = stations x features), ``times`` (T,) datetime64[ns],
    ``stations`` (stations, 3) positions, ``features`` per station."""

    values: np.ndarray
    times: np.ndarray
    stations: np.ndarray
    features: int

    def __len__(self) -> int:
        return len(self.values)


def _read_bytes(fs, base: str, name: str) -> tuple[bytes, str]:
    path = f"{base}/{name}"
    if not fs.isfile(path):
        raise FileNotFoundError(f"{path}: missing; the Global Temp / Wind layout holds {name} "
                                "(VARIABLE_global_hourly_*.npy, data_time_*.npy, stations_sorted.npy)")
    with fs.open(path, "rb") as f:
        return f.read(), path


def _read_numeric(fs, base: str, name: str, dims: int) -> np.ndarray:
    data, path = _read_bytes(fs, base, name)
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"{path}: not a numeric .npy array: {type(error).__name__}: {error}") from error
    if array.ndim != dims or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{path}: expected a numeric array of {dims} dimensions, got {array.dtype} {array.shape}")
    return array


def read_stations(root: str) -> np.ndarray:
    """``stations_sorted.npy`` under ``root``: (stations, 3) float32 positions; errors name the file."""
    fs, base = _filesystem(root)
    base = base.rstrip("/")
    stations = _read_numeric(fs, base, "stations_sorted.npy", 2)
    if stations.shape[1] != 3:
        raise ValueError(f"{base}/stations_sorted.npy: shape {stations.shape}, expected (stations, 3)")
    return stations.astype(np.float32)


def read_split(root: str, variable: str, split: str) -> SeriesSplit:
    """``split`` of ``variable`` under ``root``; a missing file raises ``FileNotFoundError`` naming it, a damaged
    one (or lengths and station counts that disagree) ``ValueError`` naming it."""
    if variable not in VARIABLES:
        raise ConfigError("timeseries.variable", f"expected temp or wind, got {variable!r}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected train, val or test")
    fs, base = _filesystem(root)
    base = base.rstrip("/")
    values = _read_numeric(fs, base, f"{variable}_global_hourly_{split}.npy", 3)
    stations = read_stations(root)
    times = load_times(*_read_bytes(fs, base, f"data_time_{split}.npy"))
    length, count, features = values.shape
    if len(times) != length:
        raise ValueError(f"{base}/data_time_{split}.npy: {len(times)} timestamps for {length} rows of "
                         f"{variable}_global_hourly_{split}.npy")
    if len(stations) != count:
        raise ValueError(f"{base}/stations_sorted.npy: shape {stations.shape}, expected ({count}, 3) for the "
                         f"{count} stations of {variable}_global_hourly_{split}.npy")
    return SeriesSplit(values.reshape(length, count * features).astype(np.float32), times, stations, features)


def group_stations(stations: int, per_node: int) -> int:
    """The number of nodes of ``per_node`` stations; a count it does not divide raises ``ConfigError`` on
    ``timeseries.stations_per_node``."""
    if per_node <= 0 or stations % per_node:
        divisors = [d for d in range(1, min(stations, 64) + 1) if stations % d == 0]
        raise ConfigError("timeseries.stations_per_node", f"expected a divisor of the {stations} stations (e.g. "
                          f"{', '.join(map(str, divisors[-4:]))}), got {per_node}")
    return stations // per_node


def time_features(times: np.ndarray) -> np.ndarray:
    """(T, 4) float32: hour of day, day of week, day of month, day of year, each scaled to [-0.5, 0.5]."""
    import pandas as pd

    index = pd.DatetimeIndex(times)
    return np.stack([index.hour / 23.0 - 0.5, index.day_of_week / 6.0 - 0.5, (index.day - 1) / 30.0 - 0.5,
                     (index.day_of_year - 1) / 365.0 - 0.5], axis=1).astype(np.float32)


def window_count(length: int, inputs: int = 48, outputs: int = 24) -> int:
    """Windows of ``inputs`` + ``outputs`` steps in a series of ``length`` (``length - inputs - outputs + 1``)."""
    return max(length - inputs - outputs + 1, 0)


def window(array: np.ndarray, index: int, inputs: int = 48, label: int = 24,
           outputs: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Window ``index`` of a (T, ...) array: ``array[i : i + inputs]`` and ``array[i + inputs - label :
    i + inputs + outputs]``."""
    if not 0 <= index < window_count(len(array), inputs, outputs):
        count = window_count(len(array), inputs, outputs)
        raise IndexError(f"window {index} of a series of {len(array)} steps ({count} "
                         "windows)")
    return array[index:index + inputs], array[index + inputs - label:index + inputs + outputs]


def moving_average(x: torch.Tensor, kernel: int = 25) -> torch.Tensor:
    """Autoformer's trend of (B, T, D) series: the mean over ``kernel`` steps, the series padded with
    ``(kernel - 1) // 2`` copies of its first and last steps."""
    pad = (kernel - 1) // 2
    padded = torch.cat([x[:, :1].expand(-1, pad, -1), x, x[:, -1:].expand(-1, pad, -1)], dim=1)
    return torch.nn.functional.avg_pool1d(padded.transpose(1, 2), kernel, stride=1).transpose(1, 2)


def decoder_inits(x: torch.Tensor, label: int = 24, outputs: int = 24,
                  kernel: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's (seasonal, trend) inputs from the (B, T, D) window: the seasonal part (``x`` minus its
    :func:`moving_average`) of the last ``label`` steps then ``outputs`` zeros; the trend of the last ``label``
    steps then the window's mean repeated ``outputs`` times."""
    trend = moving_average(x, kernel)
    seasonal = x - trend
    mean = x.mean(dim=1, keepdim=True).expand(-1, outputs, -1)
    zeros = torch.zeros_like(mean)
    return torch.cat([seasonal[:, -label:], zeros], dim=1), torch.cat([trend[:, -label:], mean], dim=1)


def persistence_sums(split: SeriesSplit, inputs: int = 48, outputs: int = 24) -> dict[str, float]:
    """Squared- and absolute-error sums and the value count of the persistence forecast (every one of the next
    ``outputs`` steps = the last input step) over every window of ``split``: the baseline beside the model's."""
    values = split.values.astype(np.float64)
    count = window_count(len(values), inputs, outputs)
    squared = absolute = 0.0
    for i in range(count):
        last = values[i + inputs - 1]
        error = values[i + inputs:i + inputs + outputs] - last
        squared += float((error ** 2).sum())
        absolute += float(np.abs(error).sum())
    return {"squared": squared, "absolute": absolute, "count": float(count * outputs * values.shape[1])}
