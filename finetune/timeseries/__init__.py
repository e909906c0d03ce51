"""Global temperature and wind forecasting: the authors' arrangement of UniRepLKNet as Corrformer's encoder (window
normalization, Corrformer's embedding as a one-channel map, the Multi-Correlation decoder), their recipe with early
stopping on validation MSE, MSE / MAE beside the persistence baseline; the Global Temp / Wind layout; a demo set
of statsmodels' series in generated stations.

Registered as task ``timeseries`` (``pyproject.toml`` entry point ``unireplknet.tasks``).
"""
from __future__ import annotations

from pretrain.registry import TaskSpec, register_task

from .config import TimeSeriesConfig, TimeSeriesRunConfig
from .presets import PRESETS


def _build(config: TimeSeriesRunConfig):
    from .task import Forecasting

    return Forecasting(config)


def _preflight(config: TimeSeriesRunConfig) -> None:
    from .task import preflight

    preflight(config)


def _write_demo_data(out: str, seed: int = 0, train_images: int | None = None, val_images: int | None = None) -> None:
    """``make-demo-data timeseries OUT``: ``--train-images`` sets the stations (44 by default), ``--val-images``
    the days (120)."""
    from .demo_data import write_demo

    sizes = {k: v for k, v in (("stations", train_images), ("days", val_images)) if v}
    write_demo(out, seed=seed, **sizes)


TASK = register_task(TaskSpec(
    name="timeseries",
    summary="global temperature / wind forecasting (Global Temp / Wind layout): UniRepLKNet as Corrformer's "
            "encoder, MSE / MAE beside persistence",
    config_class=TimeSeriesRunConfig,
    build=_build,
    presets=PRESETS,
    demo_preset="timeseries_demo",
    cluster_preset="timeseries_s_global_temp",
    path_keys=("timeseries.data_root",),
    metrics=("eval/mse", "eval/mae", "test/mse", "test/mae"),
    data_key="timeseries.data_root",
    pretrained_backbone=False,  # the authors train the encoder from scratch on one-channel embedding maps
    environment={"UNIREPLKNET_GLOBAL_ROOT": "timeseries.data_root"},
    real_data_overrides=("timeseries.generate_demo=false",),
    write_demo_data=_write_demo_data,
    preflight=_preflight,
    onnx_unsupported="the forecaster takes windows, time features and decoder time features (three tensors), not "
                     "an image tensor: export the encoder (python -m pretrain export) and run the rest in torch",
    smoke_overrides=("timeseries.d_ff=32", "train.global_batch_size=4", "train.micro_batch_size=4"),
))

__all__ = ["TASK", "TimeSeriesConfig", "TimeSeriesRunConfig"]
