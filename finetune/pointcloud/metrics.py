"""The authors' point-cloud metrics (``Point/tool/test.py``): ``oa``, the percent of samples classified right, and
``macc``, the mean over classes of each class's recall (scikit-learn's ``balanced_accuracy_score``: the classes
present among the labels), from per-class sums that add up over batches and ranks."""
from __future__ import annotations

import torch

__all__ = ["class_sums", "oa_macc"]


def class_sums(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """Per-class counts of a batch: ``correct`` (num_classes,) samples of each class predicted right, ``count``
    (num_classes,) samples of each class."""
    right = (logits.argmax(dim=-1) == labels).to(torch.float64)
    count = torch.zeros(num_classes, dtype=torch.float64, device=labels.device)
    correct = torch.zeros_like(count)
    count.index_add_(0, labels, torch.ones_like(right))
    correct.index_add_(0, labels, right)
    return {"correct": correct, "count": count}


def oa_macc(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """``oa`` and ``macc`` in percent and ``samples`` from :func:`class_sums` added up."""
    correct, count = sums["correct"].double(), sums["count"].double()
    present = count > 0
    total = float(count.sum())
    return {"oa": 100.0 * float(correct.sum()) / max(total, 1.0),
            "macc": 100.0 * float((correct[present] / count[present]).mean()) if present.any() else 0.0,
            "samples": total}
