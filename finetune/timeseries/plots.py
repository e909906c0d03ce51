"""Line plots for TensorBoard, drawn into tensors (no plotting library): a station's input hours, and after them
the truth and the forecast."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["forecast_plot"]

HISTORY = (0.35, 0.35, 0.35)
TRUTH = (0.0, 0.6, 0.0)
FORECAST = (0.85, 0.1, 0.1)


def forecast_plot(history: torch.Tensor, truth: torch.Tensor | None = None, forecast: torch.Tensor | None = None,
                  height: int = 96, width: int = 288) -> torch.Tensor:
    """A (3, height, width) image in [0, 1]: ``history`` (L,) in grey, then ``truth`` (H,) in green and
    ``forecast`` (H,) in red, each joined to the last input hour; the value axis spans all three."""
    series = [history.detach().double().cpu()]
    series += [s.detach().double().cpu() for s in (truth, forecast) if s is not None]
    low, high = min(float(s.min()) for s in series), max(float(s.max()) for s in series)
    margin = max(high - low, 1e-6) * 0.05
    low, high = low - margin, high + margin
    hours = len(series[0]) + (len(series[1]) if len(series) > 1 else 0)
    image = torch.ones(3, height, width)
    start = len(series[0]) - 1
    if len(series) > 1:  # where the forecast begins
        image[:, :, round(start / max(hours - 1, 1) * (width - 1))] = 0.85

    def draw(values: torch.Tensor, first: int, colour: tuple[float, float, float]) -> None:
        hours_of = np.arange(len(values)) + first
        dense = np.linspace(hours_of[0], hours_of[-1], max((len(values) - 1) * 8, 1) + 1)
        level = np.interp(dense, hours_of, values.numpy())
        cols = np.rint(dense / max(hours - 1, 1) * (width - 1)).astype(np.int64)
        rows = np.rint((high - level) / (high - low) * (height - 1)).astype(np.int64)
        image[:, torch.from_numpy(rows), torch.from_numpy(cols)] = torch.tensor(colour)[:, None]

    draw(series[0], 0, HISTORY)
    joined = series[0][-1:]
    for values, colour in zip(series[1:], (TRUTH, FORECAST)):
        draw(torch.cat([joined, values]), start, colour)
    return image
