"""Host-side helpers and shared ``@triton.jit`` device functions of the Triton kernels.

The device functions here mirror ``csrc/include/tpswarp/tps.h`` (TPS evaluation and its
backward at one point, pixel <-> normalized coordinates) so that ``tps_warp`` and
``warped_kl_div`` share one implementation, as the CPU and CUDA kernels share the header.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are computed in float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s device (Triton launches on the current CUDA device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def keeps_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def empty_like_format(t: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    """Empty tensor of ``shape`` that is channels_last exactly when ``t`` is (the reference's rule)."""
    fmt = torch.channels_last if keeps_channels_last(t) else torch.contiguous_format
    return torch.empty(tuple(shape), dtype=dtype or t.dtype, device=t.device, memory_format=fmt)


def as_4d(t: torch.Tensor) -> torch.Tensor:
    """View ``(B, C, *spatial)`` as ``(B, C, S1, S2)`` without copying where possible.

    2-D inputs become ``(B, C, 1, 1)``, 3-D ``(B, C, 1, L)``; 4-D are returned as they are
    (any strides); higher ranks merge the leading spatial dims (a copy only if the strides
    cannot be merged)."""
    if t.dim() == 2:
        return t[:, :, None, None]
    if t.dim() == 3:
        return t[:, :, None, :]
    if t.dim() == 4:
        return t
    B, C = t.shape[:2]
    return t.reshape(B, C, -1, t.shape[-1])


def strides4(t: torch.Tensor):
    return tuple(int(s) for s in t.stride())


def merged_pixels(*tensors: torch.Tensor) -> bool:
    """True when every 4-D ``(B, C, S1, S2)`` tensor addresses its pixels as ``n * stride(3)``
    (contiguous and channels_last layouts): the kernels then skip the div/mod of the pixel
    index and Triton sees contiguous (vectorizable) pixel offsets."""
    return all(t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3) for t in tensors)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def hull_tolerances(height: int, width: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``[tx, ty]``: slack of the validity (pixel-centre hull) test in pixels, 8 eps size
    (``hull_tolerance`` of the reference, ``pixel_hull_tolerance`` in tps.h), in ``dtype``."""
    eps = torch.finfo(dtype).eps
    out = torch.empty(2, dtype=dtype, device=device)  # filled on the device: no host-to-device copy, no sync
    out[0].fill_(8.0 * eps * max(width, 1))
    out[1].fill_(8.0 * eps * max(height, 1))
    return out


def deterministic() -> bool:
    return torch._C._get_deterministic_algorithms()


def scatter_rows_deterministic(index: torch.Tensor, values: torch.Tensor, rows: int) -> torch.Tensor:
    """Sum ``values (K, C)`` into ``rows`` rows by ``index (K,)`` (index == rows: dropped).

    ``index_add_`` is deterministic on CUDA under ``torch.use_deterministic_algorithms(True)``
    (and always on CPU); this replaces the atomics of the scatter kernels in that mode."""
    out = torch.zeros(rows + 1, values.shape[-1], dtype=values.dtype, device=values.device)
    out.index_add_(0, index, values)
    return out[:rows]


# ----------------------------------------------------------------------------------------
# device functions (tps.h)
# ----------------------------------------------------------------------------------------
# Triton's interpreter casts float32 -> bfloat16 by truncation; GPUs round to nearest even.
_EMULATE_BF16_RTNE = tl.constexpr(INTERPRET)


@triton.jit
def cast_to(x, ty: tl.constexpr):
    """``x`` cast to ``ty`` with round-to-nearest-even (emulated for bfloat16 under the interpreter)."""
    if _EMULATE_BF16_RTNE and ty == tl.bfloat16:
        x32 = x.to(tl.float32)
        bits = x32.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x32 != x32, x32.to(tl.bfloat16), y)
    else:
        return x.to(ty)


@triton.jit
def pixel_offsets(offs, S2, s_h, s_w, MERGED: tl.constexpr):
    """Memory offset of flat pixel index ``offs`` of a ``(S1, S2)`` plane with strides (s_h, s_w)."""
    if MERGED:
        return offs * s_w
    else:
        return (offs // S2) * s_h + (offs % S2) * s_w


@triton.jit
def pixel_to_normalized(i, size, ALIGN: tl.constexpr):
    """Normalized coordinate of pixel index ``i`` (float tensor) along an axis of ``size`` pixels."""
    if ALIGN:
        return tl.where(size > 1, 2.0 * i / tl.maximum(size - 1, 1) - 1.0, 0.0 * i)
    else:
        return (2.0 * i + 1.0) / size - 1.0


@triton.jit
def normalized_to_pixel(coord, size, ALIGN: tl.constexpr):
    """grid_sample's unnormalize."""
    if ALIGN:
        return (coord + 1.0) / 2.0 * (size - 1)
    else:
        return ((coord + 1.0) * size - 1.0) / 2.0


@triton.jit
def in_hull(px, py, W, H, hull_ptr):
    """The sample lies in the input's pixel-centre hull [0, W - 1] x [0, H - 1], up to the slack."""
    tx = tl.load(hull_ptr)
    ty = tl.load(hull_ptr + 1)
    return (px >= -tx) & (px <= (W - 1.0) + tx) & (py >= -ty) & (py <= (H - 1.0) + ty)


# The GPU form of tps.h (tps_eval_fast): phi = (ln 2 / 2) r2 log2(r2), log2 the hardware approximation
# (lg2.approx, libdevice.fast_log2f) for float32 on the GPU; the interpreter has no such function and
# computes log2 accurately (the tests there check the formula, the GPU tests the approximation).
_HARDWARE_LOG2 = tl.constexpr(not INTERPRET)
HALF_LN2 = tl.constexpr(0.34657359027997264)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def tps_log2_r2(r2):
    """log2(r2) with r2 clamped to the smallest normal float32: finite at r2 = 0, where r2 log2(r2) = 0."""
    x = tl.maximum(r2, 1.1754943508222875e-38)
    if _HARDWARE_LOG2 and r2.dtype == tl.float32:
        lg = libdevice.fast_log2f(x)
    else:
        lg = tl.log2(x)
    return lg


@triton.jit
def tps_eval(qx, qy, src_ptr, par_ptr, n):
    """f(q) for one batch item: ``src_ptr`` (n, 2) and ``par_ptr`` (n + 3, 2) row-major, accumulation dtype."""
    a0x = tl.load(par_ptr + 2 * n)
    a0y = tl.load(par_ptr + 2 * n + 1)
    a1x = tl.load(par_ptr + 2 * n + 2)
    a1y = tl.load(par_ptr + 2 * n + 3)
    a2x = tl.load(par_ptr + 2 * n + 4)
    a2y = tl.load(par_ptr + 2 * n + 5)
    rx = tl.zeros_like(qx)
    ry = tl.zeros_like(qx)
    for i in range(n):
        cx = tl.load(src_ptr + 2 * i)
        cy = tl.load(src_ptr + 2 * i + 1)
        dx = qx - cx
        dy = qy - cy
        r2 = dx * dx + dy * dy
        t = r2 * tps_log2_r2(r2)
        rx += t * tl.load(par_ptr + 2 * i)
        ry += t * tl.load(par_ptr + 2 * i + 1)
    fx = (a0x + qx * a1x + qy * a2x) + HALF_LN2 * rx
    fy = (a0y + qx * a1y + qy * a2y) + HALF_LN2 * ry
    return fx, fy


@triton.jit
def tps_backward_partials(gx, gy, qx, qy, src_ptr, par_ptr, n, out_ptr, WANT_PARAMS: tl.constexpr,
                          WANT_SRC: tl.constexpr):
    """Sum over this program's pixels of the gradients of <(gx, gy), f(q)> w.r.t. params and src.

    Stores ``2 (n + 3)`` params entries then ``2 n`` src entries at ``out_ptr`` (one row of the
    per-program partials buffer; entries not wanted are left unwritten). ``gx``/``gy`` must be
    0 on inactive lanes."""
    if WANT_PARAMS:
        tl.store(out_ptr + 2 * n, tl.sum(gx, axis=0))
        tl.store(out_ptr + 2 * n + 1, tl.sum(gy, axis=0))
        tl.store(out_ptr + 2 * n + 2, tl.sum(gx * qx, axis=0))
        tl.store(out_ptr + 2 * n + 3, tl.sum(gy * qx, axis=0))
        tl.store(out_ptr + 2 * n + 4, tl.sum(gx * qy, axis=0))
        tl.store(out_ptr + 2 * n + 5, tl.sum(gy * qy, axis=0))
    for i in range(n):
        cx = tl.load(src_ptr + 2 * i)
        cy = tl.load(src_ptr + 2 * i + 1)
        dx = qx - cx
        dy = qy - cy
        r2 = dx * dx + dy * dy
        lg = tps_log2_r2(r2)
        if WANT_PARAMS:
            phi = HALF_LN2 * (r2 * lg)
            tl.store(out_ptr + 2 * i, tl.sum(gx * phi, axis=0))
            tl.store(out_ptr + 2 * i + 1, tl.sum(gy * phi, axis=0))
        if WANT_SRC:
            wx = tl.load(par_ptr + 2 * i)
            wy = tl.load(par_ptr + 2 * i + 1)
            # <g, W_i> * dphi/dr2 * 2 = <g, W_i> (ln r2 + 1); finite at r2 = 0, where it multiplies dx = dy = 0
            k = (gx * wx + gy * wy) * (LN2 * lg + 1.0)
            tl.store(out_ptr + 2 * (n + 3) + 2 * i, -tl.sum(k * dx, axis=0))
            tl.store(out_ptr + 2 * (n + 3) + 2 * i + 1, -tl.sum(k * dy, axis=0))


def tps_param_grads(partials: torch.Tensor, src: torch.Tensor, params: torch.Tensor, want_src: bool,
                    want_params: bool):
    """Split the summed ``(B, nprog, 4n + 6)`` partials into ``(grad_src, grad_params)``.

    The sum over programs is a torch reduction in a fixed order (deterministic)."""
    B, n = src.shape[:2]
    total = partials.sum(dim=1)
    # contiguous, as the fake kernels promise (not views into the partials)
    g_params = (total[:, : 2 * (n + 3)].reshape(B, n + 3, 2).to(params.dtype).contiguous() if want_params
                else params.new_empty(0))
    g_src = total[:, 2 * (n + 3):].reshape(B, n, 2).to(src.dtype).contiguous() if want_src else src.new_empty(0)
    return g_src, g_params
