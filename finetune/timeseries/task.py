"""Global temperature / wind forecasting as a ``pretrain.task.Task``: the authors' forecaster (UniRepLKNet as
Corrformer's encoder), MSE loss, MSE and MAE over all stations and forecast hours beside the persistence
baseline's."""
from __future__ import annotations

import io
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import ConfigError
from pretrain.distributed import WorldInfo, world_info_from_env
from pretrain.task import SumsEvaluator, TaskBase

from .config import TimeSeriesRunConfig
from .data import SPLITS, group_stations, npy_header, read_split, read_stations
from .loaders import EvalLoader, TrainLoader, Windows, WindowSet
from .plots import forecast_plot

__all__ = ["Forecasting", "preflight", "split_shapes"]

PREVIEWS = 4
"""Forecast-vs-truth plots per evaluation (TensorBoard ``eval/predictions``)."""


class Forecasting(TaskBase):
    """Global Temp / Wind (or the generated stations in their layout) on the one trainer."""

    throughput_unit = "windows"
    config: TimeSeriesRunConfig

    def __init__(self, config: TimeSeriesRunConfig):
        super().__init__(config)
        self._splits: dict[str, WindowSet] = {}

    @property
    def section(self):
        return self.config.timeseries

    def _root(self, world: WorldInfo) -> str:
        section = self.section
        if section.generate_demo:
            from .demo_data import write_demo

            self.generate_once(section.data_root, lambda: write_demo(
                section.data_root, section.variable, stations=section.demo_stations, seed=self.config.train.seed),
                world, "time-series demo set")
        return section.data_root

    def _windows(self, split: str, world: WorldInfo) -> WindowSet:
        if split not in self._splits:
            section = self.section
            root = self._root(world)
            series = read_split(root, section.variable, split)
            where = f"{root.rstrip('/')}/{section.variable}_global_hourly_{split}.npy"
            self._splits[split] = WindowSet(series, section.inputs, section.label, section.horizon, where)
        return self._splits[split]

    def build_model(self) -> nn.Module:
        from finetune.backbone import build_headless_backbone

        from .model import Forecaster

        section = self.section
        encoder = build_headless_backbone(self.config.model, in_chans=1)
        positions = read_stations(self._root(world_info_from_env()))  # not parameters: read with the data, as theirs
        nodes = group_stations(len(positions), section.stations_per_node)
        if math.prod(section.node_tree) != nodes:
            raise ConfigError("timeseries.node_tree", f"expected factors of the {nodes} nodes, got "
                              f"{tuple(section.node_tree)}")
        return Forecaster(encoder, positions, nodes, section.node_tree, d_model=section.d_model, heads=section.heads,
                          d_ff=section.d_ff, label=section.label, horizon=section.horizon,
                          moving_avg=section.moving_avg, dropout=section.dropout, tcn_layers=section.tcn_layers,
                          decoder_layers=section.decoder_layers)

    def build_train_loader(self, world: WorldInfo) -> TrainLoader:
        return TrainLoader(self._windows("train", world), self.section.data_root,
                           batch_size=self.config.train.micro_batch_size, rank=world.rank,
                           world_size=world.world_size, num_workers=self.config.loader.num_workers,
                           seed=self.config.train.seed)

    def _eval_loader(self, split: str, world: WorldInfo) -> EvalLoader:
        return EvalLoader(self._windows(split, world), batch_size=self.config.train.micro_batch_size,
                          rank=world.rank, world_size=world.world_size, num_workers=self.config.loader.num_workers)

    def build_eval_loader(self, world: WorldInfo) -> EvalLoader:
        """The validation split (early stopping and the best weights are chosen on it)."""
        return self._eval_loader("val", world)

    def build_test_loader(self, world: WorldInfo) -> EvalLoader:
        """The test split, scored once the run completes (with the best validation weights)."""
        return self._eval_loader("test", world)

    def prepare_batch(self, batch, device: torch.device):
        return batch[0].to(device), batch[1].to(device, non_blocking=True)

    def training_losses(self, model: nn.Module, inputs: Windows, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        forecast = model(inputs.x, inputs.x_marks, inputs.y_marks).float()
        return {"loss": F.mse_loss(forecast, targets.float())}

    def build_evaluator(self, device: torch.device) -> SumsEvaluator:
        names = ("squared", "absolute", "persistence_squared", "persistence_absolute", "values", "windows")

        def sums(outputs, targets):
            forecast, last = outputs
            error = forecast.double() - targets.double()
            persistence = last.double()[:, None, :] - targets.double()
            return {"squared": error.square().sum(), "absolute": error.abs().sum(),
                    "persistence_squared": persistence.square().sum(), "persistence_absolute": persistence.abs().sum(),
                    "values": torch.tensor(float(targets.numel()), device=targets.device),
                    "windows": torch.tensor(float(len(targets)), device=targets.device)}

        def results(totals: dict[str, float]) -> dict[str, float]:
            values = max(totals["values"], 1.0)
            return {"mse": totals["squared"] / values, "mae": totals["absolute"] / values,
                    "persistence_mse": totals["persistence_squared"] / values,
                    "persistence_mae": totals["persistence_absolute"] / values, "samples": totals["windows"]}

        evaluator = SumsEvaluator(names, sums, results, device)
        evaluator.previews = []  # the trainer shows them in TensorBoard (eval/predictions)
        return evaluator

    def evaluation_step(self, model: nn.Module, inputs: Windows, targets: torch.Tensor, evaluator) -> None:
        forecast = model(inputs.x, inputs.x_marks, inputs.y_marks).float()
        evaluator.update((forecast, inputs.x[:, -1]), targets)
        for i in range(min(len(targets), PREVIEWS - len(evaluator.previews))):
            evaluator.previews.append(forecast_plot(inputs.x[i, :, 0], targets[i, :, 0], forecast[i, :, 0]))

    def input_shape(self) -> tuple[int, ...]:
        """The encoder's input: one node's embedded window as a one-channel map."""
        side = math.isqrt(self.section.inputs * self.section.d_model)
        return (1, side, side)

    def dummy_input(self, device: torch.device):
        return None  # ZeRO-3 is refused for this task (config validation)

    def synthetic_batch(self, device: torch.device, generator: torch.Generator):
        """Random windows over the training split's stations, random time features."""
        section, batch = self.section, self.config.train.micro_batch_size
        columns = len(read_stations(self._root(world_info_from_env())))
        decoder = section.label + section.horizon
        inputs = Windows(torch.randn(batch, section.inputs, columns, generator=generator),
                         torch.rand(batch, section.inputs, 4, generator=generator) - 0.5,
                         torch.rand(batch, decoder, 4, generator=generator) - 0.5)
        return inputs.to(device), torch.randn(batch, section.horizon, columns, generator=generator).to(device)

    def preview(self, inputs) -> torch.Tensor | None:
        """The first station's input hours of up to 8 training windows, as line plots."""
        return torch.stack([forecast_plot(x[:, 0]) for x in inputs.x[:8].detach().float().cpu()])


def split_shapes(root: str, variable: str) -> dict[str, tuple[int, ...]]:
    """The shapes of the layout's arrays from their headers alone (nothing else is read): the three splits'
    ``VARIABLE_global_hourly_*.npy`` and ``stations_sorted.npy``. ``FileNotFoundError`` / ``ValueError`` naming
    the file."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(root)
    base = base.rstrip("/")
    shapes = {}
    for name in (*(f"{variable}_global_hourly_{s}.npy" for s in SPLITS), "stations_sorted.npy"):
        path = f"{base}/{name}"
        if not fs.isfile(path):
            raise FileNotFoundError(f"{path}: missing (the Global Temp / Wind layout)")
        with fs.open(path, "rb") as f:
            head = io.BytesIO(f.read(1 << 16))
        try:
            shapes[name] = npy_header(head)[0]
        except Exception as error:  # noqa: BLE001 - any damage: one message naming the file
            raise ValueError(f"{path}: not a .npy array: {type(error).__name__}: {error}") from error
    return shapes


def preflight(config: TimeSeriesRunConfig) -> None:
    """Before any worker starts: the layout is under ``timeseries.data_root`` (unless the demo set is generated
    there), one value per station, the stations split into nodes of ``timeseries.stations_per_node`` whose count
    ``timeseries.node_tree`` factors. Raises ``ConfigError`` naming the key."""
    section = config.timeseries
    if section.generate_demo:
        stations = section.demo_stations
    else:
        try:
            shapes = split_shapes(section.data_root, section.variable)
        except (FileNotFoundError, ValueError, OSError) as error:
            raise ConfigError("timeseries.data_root", str(error)) from None
        stations = shapes["stations_sorted.npy"][0]
        for split in SPLITS:
            name = f"{section.variable}_global_hourly_{split}.npy"
            shape = shapes[name]
            if len(shape) != 3 or shape[1:] != (stations, 1):
                raise ConfigError("timeseries.data_root", f"{section.data_root}/{name}: shape {shape}, expected "
                                  f"(hours, {stations}, 1): one value per station of stations_sorted.npy")
            if shape[0] < section.inputs + section.horizon:
                raise ConfigError("timeseries.data_root", f"{section.data_root}/{name}: {shape[0]} hours, fewer than "
                                  f"one window ({section.inputs} + {section.horizon})")
    nodes = group_stations(stations, section.stations_per_node)
    if math.prod(section.node_tree) != nodes:
        raise ConfigError("timeseries.node_tree", f"expected factors of the {nodes} nodes ({stations} stations / "
                          f"{section.stations_per_node}), got {tuple(section.node_tree)} (product "
                          f"{math.prod(section.node_tree)})")
