"""Reference masked dense KL divergence KL(teacher || softmax(student))."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .._validation import check_masked_kl_div, mask_to_weights


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def resize(x: torch.Tensor, size: Optional[Sequence[int]], dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``, resized to ``size`` as ``F.interpolate(mode="bilinear", align_corners=False)``
    (the ``size=`` argument of the KL ops); unchanged when ``size`` is None or already the size."""
    x = x.to(dtype)
    if size is None or tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)


def pixel_kl(student_logits: torch.Tensor, teacher: torch.Tensor, teacher_is_logits: bool) -> torch.Tensor:
    """Per-pixel KL over dim 1, computed in float32 at least: (B, C, *S) -> (B, *S)."""
    ct = _compute_dtype(student_logits, teacher)
    log_q = torch.log_softmax(student_logits.to(ct), dim=1)
    if teacher_is_logits:
        log_p = torch.log_softmax(teacher.to(ct), dim=1)
        return (log_p.exp() * (log_p - log_q)).sum(1)
    p = teacher.to(ct)
    # p log p with 0 log 0 = 0 and derivative 0 at p = 0 (xlogy's would be NaN there).
    positive = p > 0
    p_log_p = torch.where(positive, p * torch.log(torch.where(positive, p, torch.ones_like(p))), torch.zeros_like(p))
    return (p_log_p - p * log_q).sum(1)


def reduce_loss(kl: torch.Tensor, weights: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    """Apply mask weights (B, *S) to per-pixel ``kl`` and reduce; the mean of an empty mask is 0."""
    if weights is not None:
        w = weights.to(kl.dtype)
        kl = torch.where(w != 0, kl * w, torch.zeros_like(kl))
    if reduction == "none":
        return kl
    total = kl.sum()
    if reduction == "sum":
        return total
    count = weights.to(kl.dtype).sum() if weights is not None else torch.tensor(kl.numel(), dtype=kl.dtype, device=kl.device)
    return total / torch.where(count != 0, count, torch.ones_like(count))


def masked_kl_div(
    student_logits: torch.Tensor,
    teacher: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    teacher_is_logits: bool = False,
    reduction: str = "mean",
    size: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Masked ``KL(p_t || softmax(student_logits))`` over dim 1.

    Args:
        student_logits: ``(B, C, *spatial)``; ``(B, C, hs, ws)`` with ``size``.
        teacher: same shape; probabilities, or logits when ``teacher_is_logits``. With ``size``,
            ``(B, C, ht, wt)``: any resolution.
        mask: ``(B, *spatial)`` or ``(B, 1, *spatial)``, bool or float weights; None = all valid.
            With ``size``, at the output size ``(B, H, W)`` / ``(B, 1, H, W)``.
        reduction: ``"mean"`` = ``sum(m * KL) / sum(m)`` (0 for an empty mask), ``"sum"``,
            or ``"none"`` giving ``(B, *spatial)`` with ``m * KL`` (``(B, H, W)`` with ``size``).
        size: ``(H, W)``: the student and the teacher are first resized to it in the compute
            dtype, as ``F.interpolate(x, size, mode="bilinear", align_corners=False)``.

    Returns a float32 loss for half inputs, float64 for float64 inputs, else float32.
    """
    check_masked_kl_div(student_logits, teacher, mask, reduction, size)
    if size is not None:
        ct = _compute_dtype(student_logits, teacher)
        student_logits, teacher = resize(student_logits, size, ct), resize(teacher, size, ct)
    weights = mask_to_weights(mask, student_logits.shape[0], student_logits.shape[2:])
    return reduce_loss(pixel_kl(student_logits, teacher, teacher_is_logits), weights, reduction)
