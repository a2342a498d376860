"""Public op ``tpswarp.masked_kl_div``."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .._backend import register_python_backend
from .._validation import check_masked_kl_div, mask_to_weights, output_spatial
from ..reference.masked_kl_div import masked_kl_div as reference_masked_kl_div
from ..reference._tps_math import compute_dtype
from ._common import (gradient_in_forward, gradient_or_none, keep_layout, reference_vjp, register_gradient_in_forward,
                      statistics_in_forward)


def masked_kl_div(
    student_logits: torch.Tensor,
    teacher: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    teacher_is_logits: bool = False,
    reduction: str = "mean",
    size: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Dense ``KL(p_t || softmax(student_logits))`` over the class dim, masked.

    Per pixel ``sum_c p_t,c (log p_t,c - log_softmax(s)_c)`` with ``0 log 0 = 0``.

    Args:
        student_logits: ``(B, C, *spatial)``; ``(B, C, hs, ws)`` with ``size``.
        teacher: same shape: probabilities, or logits when ``teacher_is_logits``. With
            ``size``, ``(B, C, ht, wt)`` at any resolution (it may differ from the student's).
        mask: ``(B, *spatial)`` or ``(B, 1, *spatial)``, bool or float weights; None = all.
            With ``size``, at the output size: ``(B, H, W)`` or ``(B, 1, H, W)``.
        reduction: ``"mean"``: ``sum(m * KL) / sum(m)``, 0 with zero gradient for an empty
            mask; ``"sum"``; ``"none"``: ``(B, *spatial)`` holding ``m * KL`` (``(B, H, W)``
            with ``size``).
        size: ``(H, W)`` output size, 2-D spatial inputs only. The student and the teacher are
            read as if first resized to it by ``F.interpolate(x, size=(H, W), mode="bilinear",
            align_corners=False)`` in the compute dtype (identity at their own size), then
            the loss above is taken at ``(H, W)``. The fused kernels read the low-resolution
            inputs through the interpolation taps: no ``(B, C, H, W)`` tensor is created
            besides the gradients of the inputs (which have the inputs' shapes). On every
            backend (C++ CPU, CUDA, Triton) both gradients (student, and teacher for two-way
            consistency) are fused: per-output-pixel statistics, then a deterministic gather
            per input pixel.

    On CUDA (C++ and Triton kernels), when only ``student_logits`` requires a gradient and ``size``
    is None (any ``reduction``), the forward also keeps 4 statistics per pixel (the class maxima and
    log-normalizers, ``_masked_kl_div_with_stats``): the backward then sweeps the classes once
    instead of twice (``TPSWARP_KL_STATS=0`` turns it off).

    With the C++ CPU kernels, when only ``student_logits`` requires a gradient (the teacher does
    not) and ``reduction`` is ``"mean"`` or ``"sum"``, the forward also computes the student's
    gradient from the same pass (``_masked_kl_div_with_grad``); the backward then only scales it
    by the upstream gradient. The gradient is allocated in the forward instead of the backward
    (while the teacher is usually still alive: the step's peak can grow by up to its size), and a
    forward that is never differentiated pays for it. Not under ``torch.compile``.

    Returns:
        The loss, float32 (float64 if an input is float64); half inputs are computed in
        float32. Gradients flow to ``student_logits``, and to ``teacher`` when it requires
        grad. The backward recomputes the softmax instead of keeping it alive.
    """
    check_masked_kl_div(student_logits, teacher, mask, reduction, size)
    weights = mask_to_weights(mask, student_logits.shape[0], output_spatial(student_logits, size))
    args = (student_logits, teacher, weights, bool(teacher_is_logits), reduction,
            None if size is None else [int(s) for s in size])
    if gradient_in_forward("masked_kl_div", student_logits, (teacher, weights), reduction):
        return torch.ops.tpswarp._masked_kl_div_with_grad(*args)[0]
    if statistics_in_forward("masked_kl_div", student_logits, (teacher, weights), size):
        return torch.ops.tpswarp._masked_kl_div_with_stats(*args[:5])[0]
    return torch.ops.tpswarp.masked_kl_div(*args)


def loss_shape(student_logits: torch.Tensor, reduction: str, size=None) -> tuple:
    """Shape of the loss: ``(B, *spatial)`` for ``reduction="none"`` (spatial = ``size`` if given), else ``()``."""
    if reduction != "none":
        return ()
    spatial = tuple(student_logits.shape[2:]) if size is None else tuple(size)
    return (student_logits.shape[0], *spatial)


@torch.library.register_fake("tpswarp::masked_kl_div")
def _fake(student_logits, teacher, mask=None, teacher_is_logits=False, reduction="mean", size=None):
    shape = loss_shape(student_logits, reduction, size)
    return student_logits.new_empty(shape, dtype=compute_dtype(student_logits, teacher))


def fake_input_grads(inputs, output_mask):
    # Gradients keep the input's layout (channels_last included), as the kernels return them.
    return tuple(torch.empty_like(x) if need else x.new_empty(0) for x, need in zip(inputs, output_mask))


@torch.library.register_fake("tpswarp::_masked_kl_div_backward")
def _fake_backward(grad_loss, student_logits, teacher, mask, teacher_is_logits, reduction, size, output_mask):
    return fake_input_grads((student_logits, teacher), output_mask)


def _setup_context(ctx, inputs, output):
    student_logits, teacher, mask, teacher_is_logits, reduction, size = inputs
    ctx.save_for_backward(student_logits, teacher, mask)
    ctx.options = (teacher_is_logits, reduction, size)


def _backward(ctx, grad_loss):
    needs = [bool(n) for n in ctx.needs_input_grad[:2]]
    grads = torch.ops.tpswarp._masked_kl_div_backward(grad_loss, *ctx.saved_tensors, *ctx.options, needs)
    return (*(gradient_or_none(g, n) for g, n in zip(grads, needs)), None, None, None, None)


torch.library.register_autograd("tpswarp::masked_kl_div", _backward, setup_context=_setup_context)


@torch.library.register_fake("tpswarp::_masked_kl_div_with_grad")
def _fake_with_grad(student_logits, teacher, mask, teacher_is_logits, reduction, size):
    return _fake(student_logits, teacher, mask, teacher_is_logits, reduction, size), torch.empty_like(student_logits)


register_gradient_in_forward("masked_kl_div", _setup_context, num_grads=2, num_inputs=6)


def _stats_shape(student_logits: torch.Tensor) -> tuple:
    """``(B, 4, N)``: N pixels per item (0 when there are no classes, as in the kernels)."""
    B, C = student_logits.shape[:2]
    N = 0 if B * C == 0 else math.prod(student_logits.shape[2:])
    return (B, 4, N)


@torch.library.register_fake("tpswarp::_masked_kl_div_with_stats")
def _fake_with_stats(student_logits, teacher, mask, teacher_is_logits, reduction):
    loss = _fake(student_logits, teacher, mask, teacher_is_logits, reduction)
    return loss, student_logits.new_empty(_stats_shape(student_logits), dtype=loss.dtype)


@torch.library.register_fake("tpswarp::_masked_kl_div_backward_stats")
def _fake_backward_stats(grad_loss, student_logits, teacher, mask, stats, teacher_is_logits, reduction):
    return torch.empty_like(student_logits)


def _setup_with_stats(ctx, inputs, output):
    student_logits, teacher, mask, teacher_is_logits, reduction = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(student_logits, teacher, mask, output[1])
    ctx.options = (teacher_is_logits, reduction)


def _backward_with_stats(ctx, grad_loss, _):
    if grad_loss is None:  # the loss took no part in what is differentiated
        return (None,) * 5
    student_logits, teacher, mask, stats = ctx.saved_tensors
    grad_s = grad_t = None
    if ctx.needs_input_grad[0]:
        grad_s = torch.ops.tpswarp._masked_kl_div_backward_stats(grad_loss, student_logits, teacher, mask, stats,
                                                                 *ctx.options)
    if ctx.needs_input_grad[1]:  # not routed here (the teacher's gradient needs the divergence), but served
        grad_t = torch.ops.tpswarp._masked_kl_div_backward(grad_loss, student_logits, teacher, mask, *ctx.options,
                                                           None, [False, True])[1]
    return grad_s, grad_t, None, None, None


torch.library.register_autograd("tpswarp::_masked_kl_div_with_stats", _backward_with_stats,
                                setup_context=_setup_with_stats)


def _reference_forward(student_logits, teacher, mask=None, teacher_is_logits=False, reduction="mean", size=None):
    return reference_masked_kl_div(student_logits, teacher, mask, teacher_is_logits=teacher_is_logits,
                                   reduction=reduction, size=size)


def _reference_backward(grad_loss, student_logits, teacher, mask, teacher_is_logits, reduction, size, output_mask):
    def loss(s, t):
        return _reference_forward(s, t, mask, teacher_is_logits, reduction, size)

    grads = reference_vjp(loss, (student_logits, teacher), grad_loss, output_mask)
    return tuple(keep_layout(g, x, need) for g, x, need in zip(grads, (student_logits, teacher), output_mask))


register_python_backend("masked_kl_div", "reference", _reference_forward, _reference_backward)
