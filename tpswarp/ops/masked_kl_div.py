"""Public op ``tpswarp.masked_kl_div``."""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import register_python_backend
from .._validation import check_masked_kl_div, mask_to_weights
from ..reference.masked_kl_div import masked_kl_div as reference_masked_kl_div
from ..reference._tps_math import compute_dtype
from ._common import gradient_or_none, reference_vjp


def masked_kl_div(
    student_logits: torch.Tensor,
    teacher: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    teacher_is_logits: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Dense ``KL(p_t || softmax(student_logits))`` over the class dim, masked.

    Per pixel ``sum_c p_t,c (log p_t,c - log_softmax(s)_c)`` with ``0 log 0 = 0``.

    Args:
        student_logits: ``(B, C, *spatial)``.
        teacher: same shape: probabilities, or logits when ``teacher_is_logits``.
        mask: ``(B, *spatial)`` or ``(B, 1, *spatial)``, bool or float weights; None = all.
        reduction: ``"mean"``: ``sum(m * KL) / sum(m)``, 0 with zero gradient for an empty
            mask; ``"sum"``; ``"none"``: ``(B, *spatial)`` holding ``m * KL``.

    Returns:
        The loss, float32 (float64 if an input is float64); half inputs are computed in
        float32. Gradients flow to ``student_logits``, and to ``teacher`` when it requires
        grad. The backward recomputes the softmax instead of keeping it alive.
    """
    check_masked_kl_div(student_logits, teacher, mask, reduction)
    weights = mask_to_weights(mask, student_logits.shape[0], student_logits.shape[2:])
    return torch.ops.tpswarp.masked_kl_div(student_logits, teacher, weights, bool(teacher_is_logits), reduction)


def loss_shape(student_logits: torch.Tensor, reduction: str) -> tuple:
    return (student_logits.shape[0], *student_logits.shape[2:]) if reduction == "none" else ()


@torch.library.register_fake("tpswarp::masked_kl_div")
def _fake(student_logits, teacher, mask=None, teacher_is_logits=False, reduction="mean", size=None):
    shape = loss_shape(student_logits, reduction)
    if size is not None and reduction == "none":
        shape = (student_logits.shape[0], *size)
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


def _reference_forward(student_logits, teacher, mask=None, teacher_is_logits=False, reduction="mean", size=None):
    if size is not None:
        raise NotImplementedError("masked_kl_div: `size` is not supported by this backend in this branch")
    return reference_masked_kl_div(student_logits, teacher, mask, teacher_is_logits=teacher_is_logits, reduction=reduction)


def _reference_backward(grad_loss, student_logits, teacher, mask, teacher_is_logits, reduction, size, output_mask):
    if size is not None:
        raise NotImplementedError("masked_kl_div: `size` is not supported by this backend in this branch")
    def loss(s, t):
        return _reference_forward(s, t, mask, teacher_is_logits, reduction)

    return reference_vjp(loss, (student_logits, teacher), grad_loss, output_mask)


register_python_backend("masked_kl_div", "reference", _reference_forward, _reference_backward)
