"""Reference warped KL: warp the teacher by the TPS map, then the masked KL over valid pixels."""
from __future__ import annotations

import torch

from .._validation import check_warped_kl_div
from .masked_kl_div import masked_kl_div
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
) -> torch.Tensor:
    """``masked_kl_div(student_logits, *tps_warp(teacher, src, params, size=student HxW))``.

    ``student_logits (B, C, H, W)``; ``teacher (B, C, Ht, Wt)`` probabilities or logits,
    warped bilinearly with zero padding to ``(H, W)``; the loss is taken over the valid pixels.
    """
    check_warped_kl_div(student_logits, teacher, src, params, reduction)
    H, W = student_logits.shape[2:]
    warped, valid = tps_warp(teacher, src, params, align_corners=align_corners, size=(H, W))
    return masked_kl_div(student_logits, warped, valid, teacher_is_logits=teacher_is_logits, reduction=reduction)
