"""A whole model's weights, from wherever users have them, for evaluation and export.

The source is a run directory (its latest complete checkpoint), a checkpoint folder of one, a ``python -m
pretrain export`` file, or an authors' released file: their classifiers (training or inference structure, bare
or ``{"model": ...}``) and their mmseg ADE20K files (mmcv container, whose keys are the product's: ``backbone.*``,
``decode_head.*``, ``auxiliary_head.*``). Files open with ``weights_only=True`` (numpy scalars of mmcv's ``meta``
allowed by an explicit list). The weights go into a model strictly: every key, every shape.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

__all__ = ["ModelWeights", "checkpoint_weights", "load_model_weights", "read_model_weights"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelWeights:
    """A state dict and where it came from: ``source`` (the checkpoint folder or the file) and ``step`` (the
    checkpoint's step; 0 for a file)."""

    state: dict[str, torch.Tensor]
    source: str
    step: int = 0


def checkpoint_weights(folder: str, ema: bool = False) -> dict[str, torch.Tensor]:
    """The model weights of a complete checkpoint folder (any ZeRO stage, any world size); ``ema``: with the
    EMA weights in place of the trained ones."""
    from . import checkpoint as ckpt
    from .ema import consolidate_ema

    state = ckpt.consolidated_state_dict(folder)
    if ema:
        ranks = ckpt.read_rank_states(folder)
        if ranks[0].get("ema") is None:
            raise ValueError(f"{folder} has no EMA weights (its run had train.ema_decay unset)")
        state.update(consolidate_ema([rank["ema"] for rank in ranks]))
    return state


def read_model_weights(source: str, ema: bool = False, checkpoint: str = "latest") -> ModelWeights:
    """The weights of a run directory or checkpoint folder (``ema``: the EMA weights; ``checkpoint``: latest or
    a folder), or of a weights file."""
    from unireplknet.checkpoint import WRAPPER_PREFIXES, read_state_dict

    from . import checkpoint as ckpt

    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, ckpt.MANIFEST_NAME)):  # a checkpoint folder itself
            folder = ckpt.find_checkpoint(os.path.dirname(os.path.abspath(source)), os.path.abspath(source))
        else:
            folder = ckpt.find_checkpoint(os.path.join(source, "checkpoints"), checkpoint)
        if folder is None:
            raise FileNotFoundError(f"{source}: no checkpoint under {os.path.join(source, 'checkpoints')}")
        return ModelWeights(checkpoint_weights(folder, ema), folder, ckpt.read_manifest(folder).step)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source}: no such run directory, checkpoint folder or weights file")
    if ema:
        raise ValueError(f"{source} is a weights file: EMA weights are chosen from a run directory's checkpoints "
                         "(export them with `python -m pretrain export RUN_DIR OUT --ema`)")
    return ModelWeights(read_state_dict(source, prefixes=WRAPPER_PREFIXES), source)


def _structure(keys) -> str:
    training = any(key.endswith(("origin_bn.running_var", "pwconv2.2.running_var")) for key in keys)
    return "training" if training else "inference"


def _backbones(model: nn.Module) -> list[nn.Module]:
    import unireplknet

    return [module for module in model.modules() if isinstance(module, unireplknet.UniRepLKNet)]


def load_model_weights(model: nn.Module, weights: ModelWeights, key_map: Callable[[dict], dict] | None = None) -> str:
    """Load ``weights`` into ``model`` strictly; returns the structure they were in. ``key_map`` renames an
    authors' released layout first (the task's ``released_key_map``). Weights in the inference structure first
    turn the model's UniRepLKNet into it (the authors' re-parameterized files). A classifier takes the authors'
    key variants (:func:`unireplknet.load_official`)."""
    import unireplknet

    if key_map is not None:
        weights = ModelWeights(key_map(weights.state), weights.source, weights.step)
    structure = _structure(weights.state)
    if structure == "inference" and _structure(model.state_dict()) == "training":
        for backbone in _backbones(model):
            backbone.reparameterize()
    if isinstance(model, unireplknet.UniRepLKNet) and not model.features_only:
        try:
            unireplknet.load_official(model, weights.state)
        except unireplknet.CheckpointMismatchError as error:
            raise ValueError(f"{weights.source} does not fit the model: {error}") from None
        return structure
    expected = model.state_dict()
    state = {k: v for k, v in weights.state.items() if not k.startswith("ema_")}  # mmdet's EMA hook's copies
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        def some(keys: list[str]) -> str:
            return (", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")) if keys else "none"

        raise ValueError(f"{weights.source} does not fit the {type(model).__name__}: missing {some(missing)}; "
                         f"unexpected {some(unexpected)}; wrong shape {some(wrong)}")
    model.load_state_dict(state, strict=True)
    _logger.info("loaded %s (%d tensors, %s structure)", weights.source, len(state), structure)
    return structure
