"""Public op ``tpswarp.warped_kl_div``: the paper's Eq. 3-4 in one pass."""
from __future__ import annotations

import torch

from .._backend import register_python_backend
from .._validation import check_warped_kl_div
from ..reference._tps_math import compute_dtype
from ..reference.warped_kl_div import warped_kl_div as reference_warped_kl_div
from ._common import gradient_or_none, reference_vjp
from .masked_kl_div import fake_input_grads, loss_shape


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
    """One-way consistency loss: KL between the TPS-warped teacher and the student.

    Equals ``masked_kl_div(student_logits, *tps_warp(teacher, src, params, size=(H, W)))``
    with the teacher warped bilinearly with zero padding and the loss taken over the valid
    pixels; logits are warped before the softmax when ``teacher_is_logits``.

    Args:
        student_logits: ``(B, C, H, W)`` predictions on the perturbed input.
        teacher: ``(B, C, Ht, Wt)`` clean-input predictions (probabilities or logits).
        src, params: the TPS warp of the perturbation (:func:`tps_solve`).
        reduction: ``"mean"`` over valid pixels (0 if none), ``"sum"`` or ``"none"`` ``(B, H, W)``.

    Returns:
        The loss, float32 (float64 for float64 inputs). Differentiable w.r.t.
        ``student_logits``, ``teacher``, ``src`` and ``params``.
    """
    check_warped_kl_div(student_logits, teacher, src, params, reduction)
    return torch.ops.tpswarp.warped_kl_div(
        student_logits, teacher, src, params, bool(teacher_is_logits), bool(align_corners), reduction
    )


@torch.library.register_fake("tpswarp::warped_kl_div")
def _fake(student_logits, teacher, src, params, teacher_is_logits=False, align_corners=False, reduction="mean",
          size=None):
    dtype = compute_dtype(student_logits, teacher, params)
    shape = loss_shape(student_logits, reduction)
    if size is not None and reduction == "none":
        shape = (student_logits.shape[0], *size)
    return student_logits.new_empty(shape, dtype=dtype)


@torch.library.register_fake("tpswarp::_warped_kl_div_backward")
def _fake_backward(grad_loss, student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction, size,
                   output_mask):
    return fake_input_grads((student_logits, teacher, src, params), output_mask)


def _setup_context(ctx, inputs, output):
    *tensors, teacher_is_logits, align_corners, reduction, size = inputs
    ctx.save_for_backward(*tensors)
    ctx.options = (teacher_is_logits, align_corners, reduction, size)


def _backward(ctx, grad_loss):
    needs = [bool(n) for n in ctx.needs_input_grad[:4]]
    grads = torch.ops.tpswarp._warped_kl_div_backward(grad_loss, *ctx.saved_tensors, *ctx.options, needs)
    return (*(gradient_or_none(g, n) for g, n in zip(grads, needs)), None, None, None, None)


torch.library.register_autograd("tpswarp::warped_kl_div", _backward, setup_context=_setup_context)


def _reference_forward(student_logits, teacher, src, params, teacher_is_logits=False, align_corners=False,
                       reduction="mean", size=None):
    if size is not None:
        raise NotImplementedError("warped_kl_div: `size` is not supported by this backend in this branch")
    return reference_warped_kl_div(student_logits, teacher, src, params, teacher_is_logits=teacher_is_logits,
                                   align_corners=align_corners, reduction=reduction)


def _reference_backward(grad_loss, student_logits, teacher, src, params, teacher_is_logits, align_corners,
                        reduction, size, output_mask):
    if size is not None:
        raise NotImplementedError("warped_kl_div: `size` is not supported by this backend in this branch")
    def loss(s, t, c, p):
        return _reference_forward(s, t, c, p, teacher_is_logits, align_corners, reduction)

    return reference_vjp(loss, (student_logits, teacher, src, params), grad_loss, output_mask)


register_python_backend("warped_kl_div", "reference", _reference_forward, _reference_backward)
