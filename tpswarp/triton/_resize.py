"""Bilinear resize taps for the ``size=`` argument of the KL ops: ``csrc/include/tpswarp/upsample.h``
in Triton.

``F.interpolate(x, size, mode="bilinear", align_corners=False)`` along one axis: output index
``d`` reads input indices ``i0``/``i1`` with weights ``l0``/``l1`` (PyTorch's upsample_bilinear2d
without scale factors: ``scale = in / out`` in the compute dtype, source index
``max(0, scale * (d + 0.5) - 0.5)`` (a fused multiply-add, as PyTorch's compiled kernels), ``i1 = min(i0 + 1, in - 1)``, lambda clamped to [0, 1]).
The kernels read low-resolution logits through these taps, so the upsampled tensors are never
allocated. Their backward is a gather: each input index sums over the output indices that
read it, a contiguous range found from the taps themselves (no atomics, deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET

# PyTorch's kernels compute the source index ``scale * (d + 0.5) - 0.5`` with a fused multiply-add
# (nvcc and the CPU build contract it), which differs from the unfused result by up to a rounding,
# e.g. a weight of 1.5e-8 instead of 0 for 4 -> 12 pixels. The kernels use tl.fma; the interpreter
# computes tl.fma unfused, so there the float32 fma is emulated exactly in float64.
_EMULATE_FMA = tl.constexpr(INTERPRET)


def resize_scales(ins, outs, dtype: torch.dtype, device) -> torch.Tensor:
    """``[in_k / out_k]`` in ``dtype`` (the float32 scale is the correctly rounded quotient, as
    PyTorch's ``float(in) / out``), filled on the device: no host-to-device copy, no sync."""
    out = torch.empty(len(ins), dtype=dtype, device=device)
    for k, (i, o) in enumerate(zip(ins, outs)):
        out[k].fill_(float(i) / float(o))
    return out


def reader_span(in_size: int, out_size: int) -> int:
    """Iterations of the reader loop along an axis: a bound on how many output indices read one
    input index (``ceil(2 out / in)``) plus margins for the rounding of the range's start."""
    return max(1, min(int(out_size), -(-2 * int(out_size) // int(in_size)) + 3))


@triton.jit
def resize_tap(d, in_size, scale):
    """Taps ``(i0, i1, l0, l1)`` of output index ``d`` (int tensor) along an axis of ``in_size``
    input pixels; ``scale`` (a scalar in the compute dtype) is ``in_size / out_size``."""
    x = d.to(scale.dtype) + 0.5
    if _EMULATE_FMA and scale.dtype == tl.float32:
        # the product of two float32 is exact in float64: one rounding, as the fma
        src = (scale.to(tl.float64) * x.to(tl.float64) - 0.5).to(tl.float32)
    else:
        src = tl.fma(tl.broadcast_to(scale, x.shape), x, tl.full(x.shape, -0.5, x.dtype))
    src = tl.maximum(src, 0.0)
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)
    i1 = tl.where(i0 < in_size - 1, i0 + 1, i0)
    l1 = tl.minimum(tl.maximum(src - i0.to(src.dtype), 0.0), 1.0)
    return i0, i1, 1.0 - l1, l1


@triton.jit
def resize_weight(i0, i1, l0, l1, y):
    """Weight with which the output index of taps ``(i0, i1, l0, l1)`` reads input index ``y``."""
    return tl.where(i0 == y, l0, 0.0) + tl.where(i1 == y, l1, 0.0)


@triton.jit
def readers_begin(y, scale):
    """An output index at or before the first one whose taps read input index ``y``: reading
    needs a source index in [y - 1, y + 1), i.e. ``d >= (y - 0.5) / scale - 0.5``; one index of
    margin covers the rounding. Iterating ``reader_span`` indices from here covers every reader;
    the weights (``resize_weight``) are 0 for the others."""
    lower = (y.to(scale.dtype) - 0.5) / scale - 0.5
    return tl.maximum(tl.floor(lower).to(tl.int32) - 1, 0)


@triton.jit
def resized_value(p, mask, s_h, s_w, r0, r1, lr0, lr1, q0, q1, lq0, lq1, ACC: tl.constexpr):
    """The resized input in ``ACC`` at each output pixel, which reads rows ``r0/r1`` with weights
    ``lr0/lr1`` and columns ``q0/q1`` with ``lq0/lq1`` (upsample_bilinear2d's order of operations).
    ``p`` points at the plane: one class (a scalar pointer, pixel vectors out) or a column of
    classes (``(classes, 1)`` pointers, tiles out); ``mask`` what may be loaded, broadcast the same
    way. Taps of weight 0 are not loaded."""
    a0 = r0 * s_h
    a1 = r1 * s_h
    b0 = q0 * s_w
    b1 = q1 * s_w
    nr0 = lr0 != 0
    nr1 = lr1 != 0
    nq0 = lq0 != 0
    nq1 = lq1 != 0
    v00 = tl.load(p + (a0 + b0), mask=mask & (nr0 & nq0), other=0.0).to(ACC)
    v01 = tl.load(p + (a0 + b1), mask=mask & (nr0 & nq1), other=0.0).to(ACC)
    v10 = tl.load(p + (a1 + b0), mask=mask & (nr1 & nq0), other=0.0).to(ACC)
    v11 = tl.load(p + (a1 + b1), mask=mask & (nr1 & nq1), other=0.0).to(ACC)
    return lr0 * (lq0 * v00 + lq1 * v01) + lr1 * (lq0 * v10 + lq1 * v11)


@triton.jit
def resized_tile(base, c0, offs_c, C, s_c, s_h, s_w, r0, r1, lr0, lr1, q0, q1, lq0, lq1, pm, ACC: tl.constexpr):
    """(classes x pixels) tile of the resized input (``resized_value`` of classes ``c0 + offs_c``) and
    its mask."""
    cc = c0 + offs_c
    m = (cc < C)[:, None] & pm[None, :]
    return resized_value(base + cc[:, None] * s_c, m, s_h, s_w, r0, r1, lr0, lr1, q0, q1, lq0, lq1, ACC), m
