"""ONNX export of a model in the inference structure, checked against torch with onnxruntime.

``torch.onnx.export(dynamo=True)`` (torch.export, then onnxscript) writes the graph with a dynamic batch and,
for dense models, dynamic height and width; :func:`check_onnx` runs the file in onnxruntime on CPU and returns
the largest ``max|onnx - torch| / max|torch|`` over the given inputs and outputs. TensorRT builds an engine from
the file (``trtexec --onnx=FILE``); see README, "Deploy: ONNX and TensorRT".
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["OnnxExport", "export_onnx", "check_onnx", "OPSET"]

_logger = logging.getLogger(__name__)

OPSET = 18
"""The opset the files are written in (TensorRT 8.6+ and onnxruntime 1.16+ read it)."""


def _require(*modules: str) -> None:
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: pip install 'unireplknet-scale[onnx]'")


class _TupleOutputs(nn.Module):
    """A model returning a dict (the segmentor's ``{"logits": ...}``) as a tuple, in the dict's order."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...]):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(images)
        return tuple(outputs[key] for key in self.keys)


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote: the file, its input and output names, which input dims are dynamic."""

    path: str
    input_name: str
    output_names: tuple[str, ...]
    dynamic_dims: tuple[int, ...]


def _output_names(model: nn.Module, example: torch.Tensor) -> tuple[tuple[str, ...], nn.Module]:
    with torch.no_grad():
        outputs = model(example)
    if isinstance(outputs, torch.Tensor):
        return ("logits",), model
    if isinstance(outputs, dict) and all(isinstance(v, torch.Tensor) for v in outputs.values()):
        keys = tuple(outputs)
        return keys, _TupleOutputs(model, keys).eval()
    raise TypeError(f"ONNX export takes a model returning a tensor or a dict of tensors, not {type(outputs).__name__}")


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's INFO logs (one line per graph pass and deduplicated initializer) at WARNING meanwhile."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, *, dynamic_size: bool = False,
                input_name: str = "images", opset: int = OPSET) -> OnnxExport:
    """Write ``model`` (eval mode, float32, CPU) as ONNX to ``path``, atomically (a file over 2 GiB gets its
    weights in ``PATH.data`` beside it). The batch dimension is dynamic; ``dynamic_size`` makes the last two
    input dims (height and width) dynamic too."""
    _require("onnx", "onnxscript")
    path = os.fspath(path)
    model = model.eval().float().cpu()
    example = example.float().cpu()
    output_names, traced = _output_names(model, example)
    dims = {0: torch.export.Dim.DYNAMIC}  # the range torch.export derives from the model (a net may need 2+)
    if dynamic_size:
        dims[example.dim() - 2] = dims[example.dim() - 1] = torch.export.Dim.DYNAMIC
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=folder)
    try:
        with torch.no_grad(), _quiet_exporter(), contextlib.redirect_stdout(None):  # it prints its progress too
            program = torch.onnx.export(traced, (example,), dynamo=True, input_names=[input_name],
                                        output_names=list(output_names), dynamic_shapes=(dims,), opset_version=opset,
                                        verbose=False)
        staged = os.path.join(staging, os.path.basename(path))
        program.save(staged)
        for name in sorted(os.listdir(staging), key=lambda n: n == os.path.basename(path)):  # the graph last
            os.replace(os.path.join(staging, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _logger.info("wrote %s (input %s %s, dynamic dims %s; outputs %s)", path, input_name, tuple(example.shape),
                 sorted(dims), ", ".join(output_names))
    return OnnxExport(path, input_name, output_names, tuple(sorted(dims)))


def check_onnx(exported: OnnxExport, model: nn.Module, inputs: list[torch.Tensor]) -> float:
    """The largest ``max|onnx - torch| / max|torch|`` over ``inputs`` and every output, onnxruntime on CPU
    against ``model`` in float32."""
    _require("onnxruntime")
    import onnxruntime

    session = onnxruntime.InferenceSession(exported.path, providers=["CPUExecutionProvider"])
    model = model.eval().float().cpu()
    worst = 0.0
    for images in inputs:
        with torch.no_grad():
            expected = model(images.float())
        expected = (expected,) if isinstance(expected, torch.Tensor) else tuple(expected[k] for k in exported.output_names)
        actual = session.run(list(exported.output_names), {exported.input_name: images.float().numpy()})
        for name, want, got in zip(exported.output_names, expected, actual):
            if tuple(got.shape) != tuple(want.shape):
                raise AssertionError(f"{exported.path}: output {name} has shape {tuple(got.shape)} for input "
                                     f"{tuple(images.shape)}, torch gives {tuple(want.shape)}")
            scale = float(want.abs().max()) or 1.0
            worst = max(worst, float((torch.from_numpy(got) - want).abs().max()) / scale)
    return worst
