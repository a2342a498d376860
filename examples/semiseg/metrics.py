"""Confusion matrix (bincount) and IoU, Cityscapes style: a class whose union is empty
(absent from the ground truth and never predicted) is left out of the mean; a class that
is predicted but absent from the ground truth counts with IoU 0 (``miou_gt`` leaves those
out too: the mean over the classes present in the ground truth)."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .labels import IGNORE_INDEX


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``(C, C)`` int64 counts, rows ground truth, columns prediction; ``target ==
    ignore_index`` (or any id outside ``[0, C)``) is skipped."""
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    t = target.reshape(-1).long()
    p = pred.reshape(-1).long()
    keep = (t != ignore_index) & (t >= 0) & (t < num_classes)
    idx = t[keep] * num_classes + p[keep].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def iou_from_confusion(cm: torch.Tensor) -> torch.Tensor:
    """Per-class IoU ``tp / (tp + fp + fn)``; NaN where the union is empty."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def summarize(cm: torch.Tensor, names: Optional[List[str]] = None) -> Dict[str, object]:
    iou = iou_from_confusion(cm)
    valid = ~torch.isnan(iou)
    miou = float(iou[valid].mean()) if valid.any() else float("nan")
    total = cm.sum()
    acc = float(cm.diag().sum().double() / total.double()) if total > 0 else float("nan")
    in_gt = cm.sum(1) > 0
    miou_gt = float(torch.nan_to_num(iou)[in_gt].mean()) if in_gt.any() else float("nan")
    names = names or [str(i) for i in range(cm.shape[0])]
    return {
        "miou": miou,
        "miou_gt": miou_gt,  # mean over the classes present in the ground truth only
        "pixel_acc": acc,
        "iou": {names[i]: (None if torch.isnan(iou[i]) else float(iou[i])) for i in range(cm.shape[0])},
        "classes_in_mean": int(valid.sum()),
    }
