"""Reference warped KL: warp the teacher by the TPS map, then the masked KL over valid pixels."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._validation import check_warped_kl_div
from ._tps_math import compute_dtype
from .masked_kl_div import masked_kl_div, resize
from .tps_warp import tps_warp


def warped_kl_div(
    student_logits: torch.Tensor,
    teacher: torch.Tensor,
    src: torch.Tensor,
    params: torch.Tensor,
    *,
    teacher_is_logits: bool = False,
    align_corners: bool = False,
    reduction: str = "mean",
    size: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """``masked_kl_div(student_logits, *tps_warp(teacher, src, params, size=student HxW))``.

    ``student_logits (B, C, H, W)``; ``teacher (B, C, Ht, Wt)`` probabilities or logits,
    warped bilinearly with zero padding to ``(H, W)``; the loss is taken over the valid pixels.

    With ``size=(H, W)``: ``student_logits (B, C, hs, ws)`` and ``teacher (B, C, ht, wt)`` are
    first resized to ``(H, W)`` (``F.interpolate(mode="bilinear", align_corners=False)`` in the
    compute dtype), then the above: the resized teacher is warped to ``(H, W)``.
    """
    check_warped_kl_div(student_logits, teacher, src, params, reduction, size)
    # Warp in the compute dtype (float32 for half inputs): a half-precision warped teacher would
    # round the values and overflow its gradient (e.g. -log q ~ 1e5 > 65504 in float16).
    ct = compute_dtype(student_logits, teacher, params)
    if size is not None:
        student_logits = resize(student_logits, size, ct)
    teacher = resize(teacher, size, ct)
    H, W = student_logits.shape[2:]
    warped, valid = tps_warp(teacher, src, params, align_corners=align_corners, size=(H, W))
    return masked_kl_div(student_logits, warped, valid, teacher_is_logits=teacher_is_logits, reduction=reduction)
