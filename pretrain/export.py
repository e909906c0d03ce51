"""``python -m pretrain export RUN_DIR OUT.pth``: one consolidated fp32 state dict from a ZeRO checkpoint."""
from __future__ import annotations

import dataclasses
import logging
import os


from . import checkpoint as ckpt
from .config import config_from_dict, validate
from .weights import checkpoint_weights
from .task import build_task

__all__ = ["REPARAM_TOLERANCE", "export_checkpoint", "reparameterized_model"]

REPARAM_TOLERANCE = 1e-8
"""Largest max|logit diff| / max|logit| (float64, random batch) accepted when exporting re-parameterized."""

_logger = logging.getLogger(__name__)


def export_checkpoint(run_dir: str, out_path: str, *, checkpoint: str = "latest", ema: bool = False,
                      reparameterize: bool = False, official: bool = False) -> dict:
    """Write the model weights of a run's checkpoint (any ZeRO stage, any world size) as one ``.pth``.

    ``ema``: the EMA weights (the run must have ``train.ema_decay``); ``reparameterize``: the
    inference structure, verified in float64 on a random batch before writing; ``official``: the authors' key layout (``unireplknet.export_official``),
    which their code and ``unireplknet.load_official`` read. The weights are loaded into a fresh
    model with strict key checks before writing. Returns a summary (checkpoint, keys, parameters).
    """
    import unireplknet
    from unireplknet.tools import atomic_save

    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    root = os.path.join(run_dir, "checkpoints")
    folder = ckpt.find_checkpoint(root, checkpoint)
    if folder is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet (nothing under {root}): train first, "
                                "or pass the run directory that holds checkpoints/")
    saved = ckpt.read_saved_config(folder)
    if saved is None:
        raise ckpt.CheckpointError(f"{folder} holds no {ckpt.CONFIG_NAME}: cannot tell which model it is")
    config = validate(config_from_dict(saved))
    state_dict = checkpoint_weights(folder, ema)

    config.model = dataclasses.replace(config.model, init_from="", grad_checkpointing=False)
    task = build_task(config)
    model = task.build_model()
    model.load_state_dict(state_dict, strict=True)
    if official and not (isinstance(model, unireplknet.UniRepLKNet) and not model.features_only):
        raise ValueError(f"--official writes a UniRepLKNet classifier in the authors' key layout; this run "
                         f"(task={config.task}) trains a {type(model).__name__}: export it without --official "
                         "(the whole model: backbone.* and the heads)")
    reparam_error = None
    if reparameterize:
        model.eval()
        model, reparam_error = reparameterized_model(model, task.input_shape())
        if reparam_error > REPARAM_TOLERANCE:
            raise RuntimeError(f"re-parameterization changed the outputs by {reparam_error:.3g} (relative, float64; "
                               f"tolerance {REPARAM_TOLERANCE:g}): not writing {out_path}")
    if official:
        out = unireplknet.export_official(model)
    else:
        out = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    atomic_save(out, out_path)
    summary = {"checkpoint": folder, "keys": len(out), "parameters": sum(p.numel() for p in model.parameters()),
               "ema": ema, "reparameterized": reparameterize, "reparam_max_rel_diff": reparam_error,
               "official": official}
    _logger.info("exported %s -> %s (%d keys)", folder, out_path, len(out))
    return summary


def reparameterized_model(model, input_shape: tuple[int, ...]):
    """``model`` with its UniRepLKNet (the model itself, or its backbone) in the inference structure, verified in
    float64 on a random batch of the task's input shape; and the relative difference of the backbone's outputs."""
    import unireplknet
    from unireplknet.tools import verify_reparameterization

    if isinstance(model, unireplknet.UniRepLKNet):
        deployed, error = verify_reparameterization(model, input_shape)
        return deployed.float(), error
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, unireplknet.UniRepLKNet)]
    if len(found) != 1:
        raise ValueError(f"--reparameterize: expected one UniRepLKNet in the {type(model).__name__}, found {len(found)}")
    name, backbone = found[0]
    deployed, error = verify_reparameterization(backbone, input_shape)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], deployed.float())
    return model, error
