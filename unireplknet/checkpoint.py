"""Checkpoint interoperability with the authors' released files.

The released ``.pth`` files are plain state dicts, sometimes wrapped as ``{"model": state_dict}``,
in the training structure (``*_in22k_pretrain.pth`` and most ImageNet-1K files) or the inference
structure. Module names in :mod:`unireplknet.model` follow the release, so the official key
layout is this package's own layout; the loader only unwraps, renames the few keys that differ
between the authors' two ways of building the inference structure, and checks every key and shape.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping

import torch
import torch.nn as nn

from .model import DilatedReparamBlock, UniRepLKNet

__all__ = ["CheckpointMismatchError", "load_official", "export_official", "read_state_dict", "load_pretrained",
           "released_file_globals"]

_logger = logging.getLogger(__name__)

_WRAPPER_KEYS = ("model", "state_dict", "module", "model_ema")
_PREFIXES = ("module.", "_orig_mod.", "backbone.")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""What DistributedDataParallel and torch.compile put before every key: what a whole model's file loses."""


class CheckpointMismatchError(RuntimeError):
    """Keys or shapes of a checkpoint do not match the model; the message lists them."""


def released_file_globals() -> list:
    """What the authors' mmcv containers pickle besides tensors, for ``torch.load(weights_only=True)``: mmcv
    stores numpy scalars in ``meta`` (``hook_msgs.best_score`` with ``save_best``). Allowed: numpy's scalar
    constructor under its numpy 1 and numpy 2 names, ``np.dtype`` and the numeric dtype classes; nothing that
    runs code, no arrays, no other type."""
    import numpy as np

    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    dtype_classes = {type(np.dtype(code)) for code in "?bhilqBHILQefdgFDG"}
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype,
            *sorted(dtype_classes, key=lambda cls: cls.__name__)]


def read_state_dict(path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                    prefixes: tuple[str, ...] = _PREFIXES) -> dict[str, torch.Tensor]:
    """Read a state dict from a file (``weights_only=True``, numpy scalars allowed: :func:`released_file_globals`)
    or a mapping, unwrapping ``{"model": ...}`` and mmcv's ``{"meta": ..., "state_dict": ...}``, and taking
    ``prefixes`` off the keys (the default reads a backbone out of a whole model: ``backbone.`` goes too)."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        try:
            with torch.serialization.safe_globals(released_file_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # EOFError, UnpicklingError, RuntimeError (zip reader), ...
            raise CheckpointMismatchError(
                f"{path} is not a PyTorch checkpoint that loads with weights_only=True "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no message'})") from None
        source = path
    else:
        obj, source = path_or_state_dict, "<state dict>"
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"{source}: expected a state dict (a mapping), got {type(obj).__name__}")
    for key in _WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    state_dict = {}
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointMismatchError(f"{source}: entry {name!r} is a {type(value).__name__}, expected a tensor")
        for prefix in prefixes:
            if name.startswith(prefix):
                name = name[len(prefix):]
        state_dict[name] = value
    return state_dict


def _rename_to_model(state_dict: dict[str, torch.Tensor], model: UniRepLKNet) -> dict[str, torch.Tensor]:
    """Map inference-structure LarK keys written flat (``dwconv.*``) to ``dwconv.lk_origin.*``.

    The authors' code (``deploy=True`` constructor and ``reparameterize()``) keeps LarK weights
    under ``dwconv.lk_origin``; files flattened to ``dwconv.*`` are accepted as well.
    """
    large_kernel_blocks = {
        name[: -len(".dwconv")] for name, module in model.named_modules()
        if name.endswith(".dwconv") and isinstance(module, DilatedReparamBlock)
    }
    renamed = {}
    for name, value in state_dict.items():
        match = re.match(r"^(stages\.\d+\.\d+)\.dwconv\.(weight|bias)$", name)
        if match and match.group(1) in large_kernel_blocks:
            name = f"{match.group(1)}.dwconv.lk_origin.{match.group(2)}"
        renamed[name] = value
    return renamed


def _structure(keys) -> str:
    training = any(k.endswith(("origin_bn.running_var", "pwconv2.2.running_var")) for k in keys)
    return "training" if training else "inference"


def load_official(
        model: UniRepLKNet,
        path_or_state_dict: str | os.PathLike | Mapping[str, Any],
        ignore_head: bool = False,
) -> UniRepLKNet:
    """Load an official UniRepLKNet checkpoint into ``model`` with strict key and shape checks.

    Accepts a path or a state dict, bare or wrapped in ``{"model": ...}``, in the training or the
    inference structure (the model must be built in the same structure: build with
    ``deploy=False``, load, then ``model.reparameterize()`` to get the inference structure from a
    training checkpoint). ``ignore_head=True`` keeps the model's own classifier (a 22K checkpoint
    into a 1K model). A ``features_only`` model takes a classification checkpoint: the head and
    final norm are dropped and the per-stage norms keep their initial values.
    """
    state_dict = _rename_to_model(read_state_dict(path_or_state_dict), model)
    expected = model.state_dict()
    source_structure, model_structure = _structure(state_dict), _structure(expected)
    if source_structure != model_structure:
        hint = ("build the model with deploy=False, load, then call model.reparameterize()"
                if source_structure == "training" else
                "build the model with deploy=True (or call model.reparameterize() before loading)")
        raise CheckpointMismatchError(
            f"checkpoint is in the {source_structure} structure but the model is in the {model_structure} "
            f"structure: {hint}")

    optional_missing: set[str] = set()
    if getattr(model, "features_only", False):
        state_dict = {k: v for k, v in state_dict.items() if not re.match(r"^(norm|head)\.", k)}
        if not any(re.match(r"^norm\d\.", k) for k in state_dict):
            optional_missing = {k for k in expected if re.match(r"^norm\d\.", k)}
    elif ignore_head:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        optional_missing = {k for k in expected if k.startswith("head.")}

    missing = sorted(set(expected) - set(state_dict) - optional_missing)
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state_dict) & set(expected) if state_dict[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        lines = ["checkpoint does not match the model"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape)):
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines.extend(f"  {item}" for item in items)
        if any(k.startswith("head.") for k in wrong_shape) and not ignore_head:
            lines.append("the classifier differs: pass ignore_head=True to keep the model's own head")
        raise CheckpointMismatchError("\n".join(lines))

    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name in state_dict:
                tensor.copy_(state_dict[name].to(dtype=tensor.dtype))
    if optional_missing:
        _logger.info("kept %d model entries the checkpoint has no counterpart for: %s",
                     len(optional_missing), ", ".join(sorted(optional_missing)))
    return model


def export_official(model: nn.Module, inference_keys: str = "deploy") -> dict[str, torch.Tensor]:
    """The model's weights in the official key layout (CPU tensors), loadable by the authors' code.

    ``inference_keys`` names re-parameterized large-kernel blocks (kernel >= 7). ``"deploy"``
    (default): ``dwconv.lk_origin.weight`` / ``dwconv.lk_origin.bias``, what the authors' model
    built with ``deploy=True`` expects (it keeps a ``DilatedReparamBlock`` for every kernel >= 7,
    plain ``dwconv.*`` only for kernels 3 and 5) and what their ``reparameterize()`` leaves.
    ``"flat"``: ``dwconv.weight`` / ``dwconv.bias`` for every block, for tools that flatten the
    block. :func:`load_official` reads both. Training-structure weights are the same either way.
    """
    if inference_keys not in ("deploy", "flat"):
        raise ValueError(f"inference_keys must be 'deploy' or 'flat', got {inference_keys!r}")
    state_dict = {}
    for name, value in model.state_dict().items():
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        state_dict[name] = value.detach().to("cpu").clone()
    if inference_keys == "flat":
        training_blocks = {k.split(".dwconv.")[0] for k in state_dict if k.endswith(".dwconv.origin_bn.running_var")}
        renamed = {}
        for name, value in state_dict.items():
            match = re.match(r"^(stages\.\d+\.\d+)\.dwconv\.lk_origin\.(weight|bias)$", name)
            if match and match.group(1) not in training_blocks:
                name = f"{match.group(1)}.dwconv.{match.group(2)}"
            renamed[name] = value
        state_dict = renamed
    return state_dict


def load_pretrained(model: UniRepLKNet) -> UniRepLKNet:
    """Load the weights named by ``model.pretrained_cfg``: a local ``file`` or the Hugging Face hub file."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    path = cfg.get("file")
    if not path:
        repo, filename = cfg.get("hf_hub_id"), cfg.get("hf_hub_filename")
        if not repo or not filename:
            raise RuntimeError(
                f"no pretrained weights are known for {cfg.get('architecture')}.{cfg.get('tag')}: "
                "pass pretrained_cfg_overlay=dict(file=PATH) or use pretrained=False")
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo, filename)
    ignore_head = not model.features_only and model.num_classes != cfg.get("num_classes", model.num_classes)
    _logger.info("loading pretrained weights from %s%s", path, " (classifier left at init)" if ignore_head else "")
    return load_official(model, path, ignore_head=ignore_head)
