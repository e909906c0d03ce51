"""Semantic segmentation metrics with mmseg ``IoUMetric`` semantics (mIoU, mAcc, aAcc).

Per class, the intersection, union, predicted and label pixel areas are summed over the whole
dataset (pixels labelled ``ignore_index`` dropped), then

- ``IoU_c = I_c / U_c`` and ``Acc_c = I_c / label_c``;
- ``mIoU`` = mean of IoU over classes with ``U_c > 0``, ``mAcc`` = mean of Acc over classes with
  ``label_c > 0`` (mmseg's ``nanmean`` of 0/0 = NaN);
- ``aAcc = sum I / sum label``.

All reported in percent, like mmseg (which also rounds to 2 decimals for its table; we do not
round). Per-class entries ``IoU.<name>`` / ``Acc.<name>`` are left out of the result where they
are undefined (0/0: a class neither labelled nor predicted has no IoU; a class never labelled has
no Acc), so they are all finite floats. ``mIoU``/``mAcc``/``aAcc`` are NaN only when nothing at
all was counted.

A class that is predicted but never labelled has IoU 0 and counts in mIoU (its union is
non-zero) but not in mAcc, exactly as in mmseg.
"""
from __future__ import annotations

from typing import Sequence

import torch

from pretrain.distributed import WorldInfo, all_reduce_sum

__all__ = ["SegmentationEvaluator"]

_INTERSECT, _UNION, _PRED, _LABEL = range(4)


class SegmentationEvaluator:
    """Accumulates per-class areas over a dataset and reduces them over ranks once in :meth:`compute`.

    Args:
        num_classes: number of classes C (labels and predictions in ``0..C-1``).
        ignore_index: label value whose pixels are not counted (255 after ``reduce_zero_label``).
        class_names: names for the per-class entries (default ``"0"``, ``"1"``, ...).
        device: where the 4 x C float64 state lives: the device the collective needs (CUDA for
            NCCL) and where ``update`` moves its inputs.

    Attributes:
        samples: images added on this rank (an (H, W) pair is one, an (N, H, W) pair N).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None,
                 device: str | torch.device = "cpu"):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names for num_classes={num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class index (num_classes={num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(num_classes))
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._areas = torch.zeros(4, self.num_classes, dtype=torch.float64, device=self.device)
        self.samples = 0

    @property
    def state(self) -> torch.Tensor:
        """A copy of this rank's 4 x C float64 areas: rows intersection, union, predicted, label."""
        return self._areas.clone()

    def load_state(self, state: torch.Tensor) -> None:
        """Replace the accumulated areas with ``state`` (a tensor from :attr:`state`); ``samples`` stays."""
        if tuple(state.shape) != (4, self.num_classes):
            raise ValueError(f"state must have shape (4, {self.num_classes}), got {tuple(state.shape)}")
        self._areas = state.to(device=self.device, dtype=torch.float64).clone()

    @property
    def pixels(self) -> int:
        """Labelled (non-ignored) pixels counted on this rank."""
        return int(self._areas[_LABEL].sum().item())

    @torch.no_grad()
    def update(self, predictions: torch.Tensor | Sequence[torch.Tensor],
               labels: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Add a batch: integer ``predictions`` and ``labels`` of shape (N, H, W) or (H, W), or lists
        of (H, W) tensors of different sizes (pairwise equal)."""
        if isinstance(predictions, torch.Tensor) and isinstance(labels, torch.Tensor):
            pairs = [(predictions, labels)]
        else:
            predictions, labels = list(predictions), list(labels)
            if len(predictions) != len(labels):
                raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
            pairs = list(zip(predictions, labels))
        for prediction, label in pairs:
            self._add(prediction, label)
            self.samples += label.shape[0] if label.ndim == 3 else 1

    def _add(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        if prediction.shape != label.shape:
            raise ValueError(f"prediction shape {tuple(prediction.shape)} != label shape {tuple(label.shape)}")
        if prediction.is_floating_point() or label.is_floating_point():
            raise TypeError("predictions and labels must be integer class maps (argmax the logits first)")
        c = self.num_classes
        label = label.to(self.device, torch.int64).reshape(-1)
        prediction = prediction.to(self.device, torch.int64).reshape(-1)
        keep = label != self.ignore_index
        label, prediction = label[keep], prediction[keep]
        if label.numel() == 0:
            return
        for what, values in (("label", label), ("prediction", prediction)):
            low, high = int(values.min()), int(values.max())
            if low < 0 or high >= c:
                raise ValueError(
                    f"{what} values must be in 0..{c - 1} (or ignore_index={self.ignore_index} for labels), "
                    f"got range {low}..{high}")
        confusion = torch.bincount(label * c + prediction, minlength=c * c).reshape(c, c).to(torch.float64)
        intersect = confusion.diagonal()
        label_area = confusion.sum(dim=1)
        pred_area = confusion.sum(dim=0)
        self._areas[_INTERSECT] += intersect
        self._areas[_UNION] += label_area + pred_area - intersect
        self._areas[_PRED] += pred_area
        self._areas[_LABEL] += label_area

    @torch.no_grad()
    def compute(self, world: WorldInfo | None = None) -> dict[str, float]:
        """Sum the areas over ranks (one ``all_reduce``; every rank must call this) and return
        ``mIoU``, ``mAcc``, ``aAcc`` (percent), ``IoU.<name>`` / ``Acc.<name>`` where defined,
        ``pixels`` (labelled pixels over all ranks) and ``samples`` (images over all ranks: the trainer
        compares it with the images of the eval set). The local state is left as it was.

        ``world`` is only checked: with ``world_size > 1`` the default process group must exist,
        otherwise each rank would silently report its own shard.
        """
        if world is not None and world.world_size > 1:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    f"compute() with world_size={world.world_size} needs an initialized process group")
        local = torch.cat([self._areas.flatten(), self._areas.new_tensor([self.samples])])
        reduced = all_reduce_sum(local).cpu()
        intersect, union, _, label_area = reduced[:-1].reshape(4, self.num_classes)
        iou_defined = union > 0
        acc_defined = label_area > 0
        iou = intersect / union.clamp_min(1)
        acc = intersect / label_area.clamp_min(1)
        total = label_area.sum()
        results = {
            "mIoU": 100.0 * iou[iou_defined].mean().item() if iou_defined.any() else float("nan"),
            "mAcc": 100.0 * acc[acc_defined].mean().item() if acc_defined.any() else float("nan"),
            "aAcc": 100.0 * (intersect.sum() / total).item() if total > 0 else float("nan"),
        }
        for index, name in enumerate(self.class_names):
            if iou_defined[index]:
                results[f"IoU.{name}"] = 100.0 * iou[index].item()
            if acc_defined[index]:
                results[f"Acc.{name}"] = 100.0 * acc[index].item()
        results["pixels"] = float(total.item())
        results["samples"] = float(reduced[-1].item())
        return results
