"""UniRepLKNet backbone: model, re-parameterization, official-checkpoint import/export, timm registration.

``import unireplknet`` registers ``unireplknet_a`` ... ``unireplknet_xl`` with timm, so
``timm.create_model("unireplknet_xl", num_classes=21841)`` works.
"""
from .checkpoint import CheckpointMismatchError, export_official, load_official, read_state_dict
from .model import (
    VARIANTS,
    DilatedReparamBlock,
    UniRepLKNet,
    UniRepLKNetBlock,
    reparameterize_model,
)

__all__ = [
    "VARIANTS",
    "CheckpointMismatchError",
    "DilatedReparamBlock",
    "UniRepLKNet",
    "UniRepLKNetBlock",
    "export_official",
    "load_official",
    "read_state_dict",
    "reparameterize_model",
]
