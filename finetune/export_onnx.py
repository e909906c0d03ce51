"""``python -m finetune export-onnx RUN_OR_FILE OUT.onnx``: a fine-tuned model as ONNX, checked with onnxruntime.

RUN_OR_FILE is a run directory (its latest checkpoint, or ``--checkpoint``; ``--ema`` for the EMA weights; the
model is rebuilt from the run's saved config) or a file of the whole model's weights in the product's layout,
which is the authors' mmseg layout (``backbone.*``, ``decode_head.*``, ``auxiliary_head.*``: their released
ADE20K files, mmcv container included), with ``--config`` naming the preset it was built with. The backbone is
re-parameterized (inference structure, verified in float64), the graph exported with a dynamic batch and, for
dense tasks, dynamic height and width, and the file run in onnxruntime against torch before it is kept.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import torch

__all__ = ["ONNX_TOLERANCE", "export_task_onnx", "load_model"]

_logger = logging.getLogger(__name__)

ONNX_TOLERANCE = 1e-4
"""Largest accepted ``max|onnx - torch| / max|torch|`` (float32 both sides, different kernels)."""


def load_model(source: str, *, config_name: str | None = None, overrides: list[str] | tuple[str, ...] = (),
               checkpoint: str = "latest", ema: bool = False):
    """(config, model in eval mode) from a run directory or a whole-model weights file (``config_name`` then
    names its preset or JSON config; ``overrides`` apply to it)."""
    from pretrain.config import ConfigError, load_config
    from pretrain.registry import get_task
    from pretrain.task import build_task
    from pretrain.weights import load_model_weights, read_model_weights

    from .predict import load_run_model

    if os.path.isdir(source):
        return load_run_model(source, checkpoint, ema)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source}: no such run directory or weights file")
    if not config_name:
        raise ConfigError("--config", f"{source} is a weights file: name the preset (or JSON config) its model was "
                                      "built with, e.g. --config ade20k_t_upernet_512_160k")
    config = load_config(config_name, ["model.init_from=", *overrides])
    config.model = dataclasses.replace(config.model, grad_checkpointing=False)
    model = build_task(config).build_model()
    load_model_weights(model, read_model_weights(source), get_task(config.task).released_key_map)
    return config, model.eval()


def _check_inputs(shape: tuple[int, ...], dynamic_size: bool, generator: torch.Generator) -> list[torch.Tensor]:
    """A batch of 2 at the export shape and, with dynamic sizes, a batch of 1 at another height and width."""
    inputs = [torch.randn(2, *shape, generator=generator)]
    if dynamic_size:
        *channels, height, width = shape
        inputs.append(torch.randn(1, *channels, height + 32, max(32, width - 32) + 5, generator=generator))
    return inputs


def export_task_onnx(source: str, out: str, *, config_name: str | None = None, overrides=(), checkpoint: str = "latest",
                     ema: bool = False, dynamic_size: bool | None = None,
                     tolerance: float = ONNX_TOLERANCE) -> dict:
    """Export the model of ``source`` to ``out`` (see the module docstring); returns a summary. ``dynamic_size``
    defaults to the task's dense flag (segmentation: any height and width). The file is removed again when
    onnxruntime's outputs differ from torch's by more than ``tolerance``."""
    from pretrain.export import REPARAM_TOLERANCE, reparameterized_model
    from pretrain.registry import get_task
    from pretrain.task import build_task
    from unireplknet.onnx_export import check_onnx, export_onnx

    config, model = load_model(source, config_name=config_name, overrides=overrides, checkpoint=checkpoint, ema=ema)
    spec = get_task(config.task)
    if spec.onnx_unsupported:
        raise ValueError(f"task {config.task} has no ONNX export: {spec.onnx_unsupported}")
    shape = tuple(build_task(config).input_shape())
    dynamic_size = spec.onnx_dynamic_size if dynamic_size is None else dynamic_size
    model, reparam_error = reparameterized_model(model.eval(), shape)
    if reparam_error > REPARAM_TOLERANCE:
        raise RuntimeError(f"re-parameterization changed the outputs by {reparam_error:.3g} (relative, float64)")
    model = model.float().eval()
    generator = torch.Generator().manual_seed(0)
    exported = export_onnx(model, torch.randn(1, *shape, generator=generator), out, dynamic_size=dynamic_size)
    error = check_onnx(exported, model, _check_inputs(shape, dynamic_size, generator))
    if error > tolerance:
        for name in (out, out + ".data"):
            if os.path.exists(name):
                os.remove(name)
        raise RuntimeError(f"onnxruntime's outputs differ from torch's by {error:.3g} (relative) > {tolerance:g}: "
                           f"{out} removed")
    return {"onnx": out, "task": config.task, "input": exported.input_name, "outputs": list(exported.output_names),
            "input_shape": [None, *shape], "dynamic_dims": list(exported.dynamic_dims),
            "max_rel_diff": error, "reparam_max_rel_diff": reparam_error}
