"""Public op ``tpswarp.tps_warp``."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._backend import register_python_backend
from .._validation import check_tps_warp
from ..reference.tps_warp import tps_warp as reference_tps_warp
from ._common import empty_like_format, gradient_or_none, reference_vjp


def tps_warp(
    image: torch.Tensor,
    src: torch.Tensor,
    params: torch.Tensor,
    *,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
    fill: float = 0.0,
    size: Optional[Sequence[int]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward-warp ``image`` through the TPS map ``f`` (grid never materialized).

    ``out[b, :, i, j] = image[b]`` sampled at ``f_b(q_ij)``, ``q_ij`` the normalized
    coordinate of output pixel ``(i, j)``: ``grid_sample(image, grid)`` with
    ``grid[b, i, j] = f_b(q_ij)``.

    Args:
        image: ``(B, C, H, W)`` float (any of float16/bfloat16/float32/float64), or an
            integer label map with ``mode="nearest"``. channels_last is kept.
        src: ``(B, n, 2)`` control points; ``params``: ``(B, n + 3, 2)`` from :func:`tps_solve`.
        mode: ``"bilinear"`` or ``"nearest"`` (round half to even, as grid_sample).
        padding_mode: ``"zeros"`` (taps outside read ``fill``), ``"border"``, ``"reflection"``.
        align_corners: as in ``grid_sample``.
        fill: value outside the image with ``padding_mode="zeros"`` (e.g. 255 for labels).
        size: output ``(Ho, Wo)``; default the input size.

    Returns:
        ``(out (B, C, Ho, Wo), valid (B, 1, Ho, Wo) bool)``; ``valid`` is True where the
        sample location lies inside the input's pixel-centre hull, i.e. where warping an
        all-ones image bilinearly with zero padding gives 1. Differentiable w.r.t. float
        ``image`` and ``params`` (and ``src``). The gradient w.r.t. ``image`` on the GPU is a
        scatter with atomics; under ``torch.use_deterministic_algorithms(True)`` it is
        deterministic instead (each output pixel's tap contributions summed by ``index_add_``,
        which allocates 4 (1 in nearest mode) x the output's size in the compute dtype).
    """
    check_tps_warp(image, src, params, mode, padding_mode, fill, size)
    return torch.ops.tpswarp.tps_warp(
        image, src, params, mode, padding_mode, bool(align_corners), float(fill),
        None if size is None else [int(s) for s in size],
    )


@torch.library.register_fake("tpswarp::tps_warp")
def _fake(image, src, params, mode="bilinear", padding_mode="zeros", align_corners=False, fill=0.0, size=None):
    B, C, H, W = image.shape
    Ho, Wo = size if size is not None else (H, W)
    out = empty_like_format(image, (B, C, Ho, Wo))
    valid = image.new_empty((B, 1, Ho, Wo), dtype=torch.bool)
    return out, valid


@torch.library.register_fake("tpswarp::_tps_warp_backward")
def _fake_backward(grad_out, image, src, params, mode, padding_mode, align_corners, fill, size, output_mask):
    g_image = empty_like_format(image, image.shape) if output_mask[0] else image.new_empty(0)
    rest = tuple(x.new_empty(x.shape if need else (0,)) for x, need in zip((src, params), output_mask[1:]))
    return (g_image, *rest)


def _setup_context(ctx, inputs, output):
    image, src, params, *options = inputs
    ctx.save_for_backward(image, src, params)
    ctx.options = options


def _backward(ctx, grad_out, grad_valid):
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    grads = torch.ops.tpswarp._tps_warp_backward(grad_out, *ctx.saved_tensors, *ctx.options, needs)
    return (*(gradient_or_none(g, n) for g, n in zip(grads, needs)), None, None, None, None, None)


torch.library.register_autograd("tpswarp::tps_warp", _backward, setup_context=_setup_context)


def _reference_forward(image, src, params, mode="bilinear", padding_mode="zeros", align_corners=False,
                       fill=0.0, size=None):
    return reference_tps_warp(image, src, params, mode=mode, padding_mode=padding_mode,
                              align_corners=align_corners, fill=fill, size=size)


def _reference_backward(grad_out, image, src, params, mode, padding_mode, align_corners, fill, size, output_mask):
    def warped(i, s, p):
        return _reference_forward(i, s, p, mode, padding_mode, align_corners, fill, size)[0]

    g_image, g_src, g_params = reference_vjp(warped, (image, src, params), grad_out, output_mask)
    # the image gradient keeps the image's memory format, as the fake kernel promises
    return empty_like_format(image, g_image.shape).copy_(g_image) if output_mask[0] else g_image, g_src, g_params


register_python_backend("tps_warp", "reference", _reference_forward, _reference_backward)
