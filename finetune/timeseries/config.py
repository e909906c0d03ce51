"""The time-series task's run config: the core :class:`~pretrain.config.Config` with the ``timeseries`` section."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from pretrain.config import Config, ConfigError, positive

__all__ = ["TimeSeriesConfig", "TimeSeriesRunConfig", "encoder_tokens_count"]


def _downsampled(side: int) -> int:
    """The side of UniRepLKNet's last-stage map: the stem's two and three stages' stride-2 convolutions (k3, p1)."""
    for _ in range(5):
        side = (side + 1) // 2
    return side


def encoder_tokens_count(inputs: int, d_model: int, channels: int) -> tuple[int, float]:
    """(the map's side, the decoder tokens the encoder's last-stage map of ``channels`` makes: C h w / d_model)."""
    side = math.isqrt(inputs * d_model)
    last = _downsampled(side)
    return side, channels * last * last / d_model


@dataclass(kw_only=True, slots=True)
class TimeSeriesConfig:
    """``task=timeseries``: Global Temp / Wind forecasting with UniRepLKNet as Corrformer's encoder."""

    data_root: str = ""
    """The Global Temp / Wind layout (``{temp,wind}_global_hourly_{train,val,test}.npy``, ``data_time_*.npy``,
    ``stations_sorted.npy``); a local path or an fsspec URL."""
    generate_demo: bool = False
    """Write the demo set (statsmodels' series in generated stations) under ``data_root`` first."""
    demo_stations: int = 44
    """Stations of the generated demo set."""
    variable: str = "temp"
    """``temp`` or ``wind``: which files under ``data_root``."""
    stations_per_node: int = 11
    """Stations grouped into one node (the authors' 11: 3,850 stations = 350 nodes); must divide the stations."""
    node_tree: tuple[int, ...] = (7, 50)
    """The nodes factored into the cross-correlation's levels (the authors' 7 x 50); its product must equal the
    nodes."""
    inputs: int = 48
    """Input hours (the authors' ``seq_len``); ``inputs x d_model`` must be a square (the encoder's map)."""
    label: int = 24
    """Known hours the decoder starts from (``label_len``): the last ``label`` inputs."""
    horizon: int = 24
    """Hours forecast (``pred_len``)."""
    d_model: int = 768
    """Embedding width (the encoder's map is ``sqrt(inputs x d_model)`` square: 192 for 48 x 768)."""
    heads: int = 16
    """Heads of the decoder's correlations."""
    d_ff: int = 2048
    """The decoder's feed-forward width."""
    moving_avg: int = 25
    """The moving average of the seasonal/trend decomposition (odd)."""
    dropout: float = 0.05
    """Dropout of the embeddings and the decoder."""
    tcn_layers: int = 1
    """Causal-convolution blocks of the cross-correlation's fusion (the authors' ``dec_tcn_layers``)."""
    decoder_layers: int = 1
    """Decoder layers (the authors' ``d_layers``)."""

    def validate(self) -> None:
        if not self.data_root:
            raise ConfigError("data_root", "expected the Global Temp / Wind folder (or URL), or a folder for the "
                              "generated demo set with timeseries.generate_demo=true")
        if self.variable not in ("temp", "wind"):
            raise ConfigError("variable", f"expected temp or wind, got {self.variable!r}")
        for key in ("demo_stations", "stations_per_node", "inputs", "label", "horizon", "d_model", "heads", "d_ff",
                    "tcn_layers", "decoder_layers"):
            positive(key, getattr(self, key))
        if not self.node_tree or min(self.node_tree) <= 0:
            raise ConfigError("node_tree", f"expected positive integers, got {self.node_tree}")
        if self.label > self.inputs:
            raise ConfigError("label", f"expected at most timeseries.inputs ({self.inputs}), got {self.label}")
        side = math.isqrt(self.inputs * self.d_model)
        if side * side != self.inputs * self.d_model:
            raise ConfigError("d_model", f"expected inputs x d_model to be a square (the encoder's map), got "
                              f"{self.inputs} x {self.d_model}")
        if self.d_model % self.heads:
            raise ConfigError("heads", f"expected a divisor of timeseries.d_model ({self.d_model}), got {self.heads}")
        if self.moving_avg % 2 == 0:
            raise ConfigError("moving_avg", f"expected an odd window, got {self.moving_avg}")
        if not 0 <= self.dropout < 1:
            raise ConfigError("dropout", f"expected in [0, 1), got {self.dropout}")


@dataclass(kw_only=True, slots=True)
class TimeSeriesRunConfig(Config):
    """A forecasting run: windows of all stations, UniRepLKNet on each node's embedded window as a one-channel map,
    the Multi-Correlation decoder. ``model.num_classes`` is unused (the forecaster has no classifier)."""

    task: str = "timeseries"
    timeseries: TimeSeriesConfig = field(default_factory=TimeSeriesConfig)

    def validate(self) -> None:
        Config.validate(self)
        section = self.timeseries
        if self.model.in_chans != 1:
            raise ConfigError("model.in_chans", f"expected 1 (the embedded window is a one-channel map), got "
                              f"{self.model.in_chans}")
        if self.model.dims is not None:
            channels = self.model.dims[-1]
        else:
            import unireplknet

            variant = self.model.name[len("unireplknet_"):]
            if variant not in unireplknet.VARIANTS:
                raise ConfigError("model.name", f"expected unireplknet_ and one of {', '.join(unireplknet.VARIANTS)}")
            channels = unireplknet.VARIANTS[variant][1][-1]
        side, tokens = encoder_tokens_count(section.inputs, section.d_model, channels)
        if tokens != int(tokens):
            raise ConfigError("timeseries.d_model", f"the encoder's last map ({channels} x {_downsampled(side)} x "
                              f"{_downsampled(side)} from the {side} x {side} input) does not split into tokens of "
                              f"{section.d_model}")
        if self.train.zero_stage == 3:
            raise ConfigError("train.zero_stage", "expected 0, 1 or 2: the time-series task does not run ZeRO-3 (the "
                              "authors' model trains one window per GPU, 132 M parameters: ZeRO-1/2 suffice)")
