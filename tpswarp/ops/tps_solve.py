"""Public op ``tpswarp.tps_solve``."""
from __future__ import annotations

import torch

from .._backend import register_python_backend
from .._validation import check_tps_solve
from ..reference.tps_solve import tps_solve as reference_tps_solve
from ..reference._tps_math import compute_dtype
from ._common import gradient_or_none, reference_vjp


def tps_solve(src: torch.Tensor, dst: torch.Tensor, *, reg: float = 0.0, check_singular: bool = True) -> torch.Tensor:
    """Solve for the thin-plate spline ``f`` with ``f(src_i) = dst_i``.

    ``f(q) = sum_i W_i phi(|q - src_i|) + A^T [1, q_x, q_y]``, ``phi(r) = r^2 log r``.

    Args:
        src: ``(B, n, 2)`` control points in normalized coordinates, ``n >= 3``.
        dst: ``(B, n, 2)`` their images under ``f``.
        reg: ``>= 0``; adds ``reg * I`` to the kernel block (a smoothing spline that no
            longer interpolates exactly; allows duplicate points).
        check_singular: raise ``ValueError`` when a system is singular (collinear or, with
            ``reg = 0``, duplicate points). Reads the points on the host (a sync on GPU).

    Returns:
        ``(B, n + 3, 2)``: radial weights ``W`` in rows ``0..n-1``, affine coefficients of
        ``[1, x, y]`` in rows ``n..n+2``. Solved in float64 with pivoting; returned in
        float64 for float64 inputs and float32 otherwise (half inputs included).
        Differentiable w.r.t. ``src`` and ``dst``.
    """
    check_tps_solve(src, dst, reg)
    return torch.ops.tpswarp.tps_solve(src, dst, float(reg), bool(check_singular))


@torch.library.register_fake("tpswarp::tps_solve")
def _fake(src, dst, reg=0.0, check_singular=True):
    B, n, _ = src.shape
    return src.new_empty((B, n + 3, 2), dtype=compute_dtype(src, dst))


@torch.library.register_fake("tpswarp::_tps_solve_backward")
def _fake_backward(grad_params, src, dst, params, reg, output_mask):
    return tuple(x.new_empty(x.shape if need else (0,)) for x, need in zip((src, dst), output_mask))


def _setup_context(ctx, inputs, output):
    src, dst, reg, _ = inputs
    ctx.save_for_backward(src, dst, output)
    ctx.reg = reg


def _backward(ctx, grad_params):
    src, dst, params = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:2]]
    g_src, g_dst = torch.ops.tpswarp._tps_solve_backward(grad_params, src, dst, params, ctx.reg, needs)
    return gradient_or_none(g_src, needs[0]), gradient_or_none(g_dst, needs[1]), None, None


torch.library.register_autograd("tpswarp::tps_solve", _backward, setup_context=_setup_context)


def _reference_forward(src, dst, reg=0.0, check_singular=True):
    return reference_tps_solve(src, dst, reg=reg, check_singular=check_singular)


def _reference_backward(grad_params, src, dst, params, reg, output_mask):
    fn = lambda s, d: reference_tps_solve(s, d, reg=reg, check_singular=False)  # noqa: E731
    # contiguous: linalg.solve's backward yields column-major gradients, the fake kernel promises contiguous
    return tuple(g.contiguous() for g in reference_vjp(fn, (src, dst), grad_params, output_mask))


register_python_backend("tps_solve", "reference", _reference_forward, _reference_backward)
