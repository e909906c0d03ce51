"""The authors' released COCO files (mmdet 2.28 Cascade Mask R-CNN) in the product's key names.

The map (``../shared/spec/finetune.md``, "The authors' released COCO and ADE20K files"): the backbone keys are
the product's; mmdet's FPN, RPN head, cascade box heads (a ConvModule's ``conv``/``bn`` become the product's
``Sequential`` indices 3j and 3j+1) and mask heads are renamed; the ``ema_*`` copies mmdet's EMA hook leaves are
dropped (the main keys hold the EMA weights). Shapes are the same in both (81 classes, background last, class
order by ascending category id; anchors ratio-major).
"""
from __future__ import annotations

import re

import torch

__all__ = ["mmdet_to_product"]

_RENAMES = (
    (re.compile(r"^neck\.lateral_convs\.(\d+)\.conv\."), r"neck.inner_blocks.\1.0."),
    (re.compile(r"^neck\.fpn_convs\.(\d+)\.conv\."), r"neck.layer_blocks.\1.0."),
    (re.compile(r"^rpn_head\.rpn_conv\."), "rpn.head.conv.0.0."),
    (re.compile(r"^rpn_head\.rpn_cls\."), "rpn.head.cls_logits."),
    (re.compile(r"^rpn_head\.rpn_reg\."), "rpn.head.bbox_pred."),
    (re.compile(r"^roi_head\.bbox_head\.(\d+)\.shared_fcs\.0\."), r"box_heads.\1.shared_fc."),
    (re.compile(r"^roi_head\.bbox_head\.(\d+)\.(fc_cls|fc_reg)\."), r"box_heads.\1.\2."),
    (re.compile(r"^roi_head\.mask_head\.(\d+)\.convs\.(\d+)\.conv\."), r"mask_heads.\1.convs.\2.0."),
    (re.compile(r"^roi_head\.mask_head\.(\d+)\.upsample\."), r"mask_heads.\1.predictor.conv5_mask."),
    (re.compile(r"^roi_head\.mask_head\.(\d+)\.conv_logits\."), r"mask_heads.\1.predictor.mask_fcn_logits."),
)
_SHARED_CONV = re.compile(r"^roi_head\.bbox_head\.(\d+)\.shared_convs\.(\d+)\.(conv|bn)\.(.+)$")


def _product_key(key: str) -> str:
    match = _SHARED_CONV.match(key)
    if match:
        stage, index, part, rest = match.groups()
        return f"box_heads.{stage}.shared_convs.{3 * int(index) + (part == 'bn')}.{rest}"
    for pattern, replacement in _RENAMES:
        if pattern.match(key):
            return pattern.sub(replacement, key, count=1)
    return key


def mmdet_to_product(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An authors' COCO state dict in the product's names (``ema_*`` dropped); keys already in the product's
    names, and any the map does not know, pass unchanged (a strict load then names the latter)."""
    return {_product_key(key): value for key, value in state.items() if not key.startswith("ema_")}
