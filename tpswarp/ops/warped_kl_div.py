"""Public op ``tpswarp.warped_kl_div``: the paper's Eq. 3-4 in one pass."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._backend import register_python_backend
from .._validation import check_warped_kl_div
from ..reference._tps_math import compute_dtype
from ..reference.warped_kl_div import warped_kl_div as reference_warped_kl_div
from ._common import (gradient_in_forward, gradient_or_none, keep_layout, reference_vjp, register_gradient_in_forward,
                      statistics_in_forward)
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
    size: Optional[Sequence[int]] = None,
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
        size: ``(H, W)`` output size. ``student_logits (B, C, hs, ws)`` and ``teacher
            (B, C, ht, wt)`` (any resolutions) are read as if first resized to ``(H, W)`` by
            ``F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)`` in the
            compute dtype; the resized teacher is then warped to ``(H, W)`` and the loss taken
            there: ``warped_kl_div(interp(student), interp(teacher), src, params, ...)``.
            ``reduction="none"`` gives ``(B, H, W)``. The fused kernels read the inputs through
            the interpolation taps (no ``(B, C, H, W)`` tensor besides the input gradients).
            On every backend (C++ CPU, CUDA, Triton) the student gradient is fused
            (per-output-pixel statistics, then a deterministic gather per input pixel); the
            gradients to ``teacher``, ``src`` and ``params`` with ``size`` are composed (the
            inputs resized, the full-resolution backward, then the resize's backward), which
            allocates ``(B, C, H, W)`` tensors; on CUDA the teacher part uses atomics and
            raises under ``torch.use_deterministic_algorithms(True)``.

    With the C++ CPU kernels, when only ``student_logits`` requires a gradient (one-way
    consistency: teacher and warp without gradient) and ``reduction`` is ``"mean"`` or ``"sum"``,
    the forward also computes the student's gradient from the same pass over the inputs
    (``_warped_kl_div_with_grad``); the backward then only scales it by the upstream gradient.
    The gradient is allocated in the forward instead of the backward (while the teacher's
    prediction is usually still alive: the consistency step's peak can grow by up to its size), and a
    forward that is never differentiated pays for it. Not under ``torch.compile``. On CUDA (without
    ``size``) only with ``TPSWARP_CUDA_GRAD_IN_FORWARD=1`` (no faster there, measured on an H100).

    On CUDA (C++ and Triton kernels), in that one-way case without ``size`` (any ``reduction``), the
    forward instead keeps 5 values per pixel (the class maxima and log-normalizers, the validity
    weight: ``_warped_kl_div_with_stats``); the backward then sweeps the classes once instead of
    twice and skips the validity pass (``TPSWARP_KL_STATS=0`` turns it off).

    Returns:
        The loss, float32 (float64 for float64 inputs). Differentiable w.r.t.
        ``student_logits``, ``teacher``, ``src`` and ``params``.
    """
    check_warped_kl_div(student_logits, teacher, src, params, reduction, size)
    args = (student_logits, teacher, src, params, bool(teacher_is_logits), bool(align_corners), reduction,
            None if size is None else [int(s) for s in size])
    if gradient_in_forward("warped_kl_div", student_logits, (teacher, src, params), reduction, size):
        return torch.ops.tpswarp._warped_kl_div_with_grad(*args)[0]
    if statistics_in_forward("warped_kl_div", student_logits, (teacher, src, params), size):
        return torch.ops.tpswarp._warped_kl_div_with_stats(*args[:7])[0]
    return torch.ops.tpswarp.warped_kl_div(*args)


@torch.library.register_fake("tpswarp::warped_kl_div")
def _fake(student_logits, teacher, src, params, teacher_is_logits=False, align_corners=False, reduction="mean",
          size=None):
    dtype = compute_dtype(student_logits, teacher, params)
    return student_logits.new_empty(loss_shape(student_logits, reduction, size), dtype=dtype)


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


@torch.library.register_fake("tpswarp::_warped_kl_div_with_grad")
def _fake_with_grad(student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction, size):
    loss = _fake(student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction, size)
    return loss, torch.empty_like(student_logits)


register_gradient_in_forward("warped_kl_div", _setup_context, num_grads=4, num_inputs=8)


@torch.library.register_fake("tpswarp::_warped_kl_div_with_stats")
def _fake_with_stats(student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction):
    loss = _fake(student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction)
    B, _, H, W = student_logits.shape
    return loss, student_logits.new_empty((B, 5, H * W), dtype=loss.dtype)


@torch.library.register_fake("tpswarp::_warped_kl_div_backward_stats")
def _fake_backward_stats(grad_loss, student_logits, teacher, src, params, stats, teacher_is_logits, align_corners,
                         reduction):
    return torch.empty_like(student_logits)


def _setup_with_stats(ctx, inputs, output):
    student_logits, teacher, src, params, *options = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(student_logits, teacher, src, params, output[1])
    ctx.options = tuple(options)  # teacher_is_logits, align_corners, reduction


def _backward_with_stats(ctx, grad_loss, _):
    if grad_loss is None:  # the loss took no part in what is differentiated
        return (None,) * 7
    student_logits, teacher, src, params, stats = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:4]]
    grads = [None] * 4
    if needs[0]:
        grads[0] = torch.ops.tpswarp._warped_kl_div_backward_stats(grad_loss, student_logits, teacher, src, params,
                                                                   stats, *ctx.options)
    if any(needs[1:]):  # not routed here (these gradients need more than the statistics), but served
        others = torch.ops.tpswarp._warped_kl_div_backward(grad_loss, student_logits, teacher, src, params,
                                                           *ctx.options, None, [False, *needs[1:]])
        grads[1:] = [gradient_or_none(g, n) for g, n in zip(others[1:], needs[1:])]
    return (*grads, None, None, None)


torch.library.register_autograd("tpswarp::_warped_kl_div_with_stats", _backward_with_stats,
                                setup_context=_setup_with_stats)


def _reference_forward(student_logits, teacher, src, params, teacher_is_logits=False, align_corners=False,
                       reduction="mean", size=None):
    return reference_warped_kl_div(student_logits, teacher, src, params, teacher_is_logits=teacher_is_logits,
                                   align_corners=align_corners, reduction=reduction, size=size)


def _reference_backward(grad_loss, student_logits, teacher, src, params, teacher_is_logits, align_corners,
                        reduction, size, output_mask):
    def loss(s, t, c, p):
        return _reference_forward(s, t, c, p, teacher_is_logits, align_corners, reduction, size)

    tensors = (student_logits, teacher, src, params)
    grads = reference_vjp(loss, tensors, grad_loss, output_mask)
    return tuple(keep_layout(g, x, need) for g, x, need in zip(grads, tensors, output_mask))


register_python_backend("warped_kl_div", "reference", _reference_forward, _reference_backward)
