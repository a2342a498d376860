"""Public op ``tpswarp.tps_transform``."""
from __future__ import annotations

import torch

from .._backend import register_python_backend
from .._validation import check_tps_transform
from ..reference.tps_transform import tps_transform as reference_tps_transform
from ._common import gradient_or_none, reference_vjp


def tps_transform(points: torch.Tensor, src: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Evaluate the TPS map of :func:`tps_solve` at ``points``.

    Args:
        points: ``(B, m, 2)`` normalized coordinates.
        src: ``(B, n, 2)`` the control points the parameters were solved for.
        params: ``(B, n + 3, 2)`` from :func:`tps_solve`.

    Returns:
        ``(B, m, 2)`` in the promoted dtype of the inputs (computed in float32 at least).
        Differentiable w.r.t. all three inputs.
    """
    check_tps_transform(points, src, params)
    return torch.ops.tpswarp.tps_transform(points, src, params)


def _out_dtype(points, src, params):
    return torch.promote_types(torch.promote_types(points.dtype, src.dtype), params.dtype)


@torch.library.register_fake("tpswarp::tps_transform")
def _fake(points, src, params):
    return points.new_empty(points.shape, dtype=_out_dtype(points, src, params))


@torch.library.register_fake("tpswarp::_tps_transform_backward")
def _fake_backward(grad_out, points, src, params, output_mask):
    return tuple(x.new_empty(x.shape if need else (0,)) for x, need in zip((points, src, params), output_mask))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    grads = torch.ops.tpswarp._tps_transform_backward(grad_out, *ctx.saved_tensors, needs)
    return tuple(gradient_or_none(g, n) for g, n in zip(grads, needs))


torch.library.register_autograd("tpswarp::tps_transform", _backward, setup_context=_setup_context)


def _reference_backward(grad_out, points, src, params, output_mask):
    return reference_vjp(reference_tps_transform, (points, src, params), grad_out, output_mask)


register_python_backend("tps_transform", "reference", reference_tps_transform, _reference_backward)
