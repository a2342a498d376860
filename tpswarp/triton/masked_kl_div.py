"""Triton kernels of ``tpswarp::masked_kl_div`` and ``tpswarp::_masked_kl_div_backward``.

The per-pixel math is ``csrc/include/tpswarp/kl.h``: sums shifted by the class maxima
(``sum exp(s - s_max)``, the cross term, ``sum p log p``, ``sum p``); the
gradients are ``d/ds = q sum(p) - p`` and, for the teacher, ``log p + 1 - log q``
(probabilities, 0 log 0 = 0) or ``p ((log p - log q) - KL)`` (logits).

size=None: one program handles ``PIXEL_BLOCK`` pixels of one batch item, each thread a few
neighbouring pixels, and sweeps the classes one at a time (one vector load per class and input):
the statistics are accumulated online in one sweep (running maxima; each sum rescaled when a
maximum grows, one exp per class), the backward adds one gradient sweep. Everything per pixel
stays in the thread that owns the pixel: no cross-thread reduction over classes, any ``C``.
Inputs are read through their strides (channels_last / non-contiguous without copies);
half inputs are accumulated in float32, float64 in float64. Mean and sum reductions write one
partial per program and are summed by torch in a fixed order (deterministic); the mean's
denominator stays on the device. ``masked_kl_div_with_stats`` / ``masked_kl_div_backward_stats``
(the student's gradient alone): the forward also stores each pixel's statistics (``STATS``), the
backward reads them (``FROM_STATS``) and sweeps the classes once.

With ``size=(H, W)`` (``masked_kl_div_size_forward`` / ``_backward``): the low-resolution student
and teacher are read through the bilinear resize taps (``_resize.py``), the statistics in one sweep
over the classes as above; both gradients are native (the gather on (classes x pixels) tiles):
per-output-pixel statistics, then a deterministic gather per low-resolution input pixel.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._backend import register_python_backend
from ._resize import (reader_span, readers_begin, resize_scales, resize_tap, resize_weight, resized_tile,
                      resized_value)
from ._utils import (INTERPRET, acc_dtype, as_4d, cast_to, device_guard, merged_pixels, next_pow2, pixel_offsets,
                     strides4, tl_dtype)

# size=None: pixels per program (each thread owns PIXEL_BLOCK / (32 PIXEL_WARPS) neighbouring pixels,
# loaded as one vector per class) and warps per program.
PIXEL_BLOCK = 512 if not INTERPRET else 4096
PIXEL_WARPS = 4
# size=(H, W): output pixels per program of the statistics kernels (one per thread: the
# resize taps are gathers).
SIZED_PIXEL_BLOCK = 128 if not INTERPRET else 4096
# size=(H, W) gathers: at most MAX_BLOCK_C classes per program (a grid axis over class chunks), on
# (classes x pixels) tiles of TILE_ELEMS elements. Tests lower it to exercise several chunks.
MAX_BLOCK_C = 64
# Elements of one (classes x pixels) tile.
TILE_ELEMS = 2048 if not INTERPRET else 16384
NUM_WARPS = 4


@triton.jit
def _finish(zs, zt, cross, p_log_p, p_sum, pmask, TEACHER_LOGITS: tl.constexpr):
    """(log_zs, log_zt, kl, p_sum) from the shifted sums (kl.h's kl_pixel)."""
    log_zs = tl.log(tl.where(pmask, zs, 1.0))
    if TEACHER_LOGITS:
        zt = tl.where(pmask, zt, 1.0)
        log_zt = tl.log(zt)
        kl = cross / zt - log_zt + log_zs
        p_sum = tl.full(zs.shape, 1.0, zs.dtype)
    else:
        log_zt = tl.zeros_like(zs)
        kl = p_log_p - cross + log_zs * p_sum
    return log_zs, log_zt, kl, p_sum


@triton.jit
def _online_first(s, t, TEACHER_LOGITS: tl.constexpr):
    """Online statistics after class 0 (``s``, ``t``: that class at each pixel):
    (s_max, zs, t_max, zt, cross, p_log_p, p_sum), sums relative to the running maxima."""
    one = tl.full(s.shape, 1.0, s.dtype)
    zero = tl.zeros_like(s)
    if TEACHER_LOGITS:
        return s, one, t, one, zero, zero, zero
    else:
        positive = t > 0
        return s, one, zero, zero, zero, tl.where(positive, t * tl.log(tl.where(positive, t, 1.0)), 0.0), t


@triton.jit
def _online_update(s_max, zs, t_max, zt, cross, p_log_p, p_sum, s, t, TEACHER_LOGITS: tl.constexpr):
    """Adds one class to the online statistics: one exp per distribution and class (the larger of the
    running max and the new value is the new reference); ``cross`` is kept relative to the running
    maxima (``sum exp(t'_c) (t'_c - s'_c)`` for logits, ``sum p_c s'_c`` for probabilities), so the
    finished values are those of a max sweep followed by shifted sums."""
    s_new = tl.maximum(s_max, s)
    ds = s_new - s_max
    es = tl.exp(-tl.abs(s - s_max))
    zs = tl.where(s > s_max, zs * es + 1.0, zs + es)
    if TEACHER_LOGITS:
        t_new = tl.maximum(t_max, t)
        up = t > t_max
        et = tl.exp(-tl.abs(t - t_max))
        cross = cross + ds * zt  # earlier terms: s'_c re-referenced to the new student max
        cross = tl.where(up, et * (cross - (t_new - t_max) * zt), cross)  # ... and t'_c to the new teacher max
        zt = tl.where(up, zt * et, zt)
        w = tl.where(up, 1.0, et)
        cross += w * ((t - t_new) - (s - s_new))
        zt += w
        t_max = t_new
    else:
        cross += t * (s - s_new) - ds * p_sum
        p_sum += t
        positive = t > 0
        p_log_p += tl.where(positive, t * tl.log(tl.where(positive, t, 1.0)), 0.0)
    return s_new, zs, t_max, zt, cross, p_log_p, p_sum


@triton.jit
def _online_stats(s_ptrs, ss_c, t_ptrs, ts_c, C, pmask, TEACHER_LOGITS: tl.constexpr, ACC: tl.constexpr):
    """(s_max, log_zs, t_max, log_zt, kl, p_sum) of the pixels at ``s_ptrs`` / ``t_ptrs`` (class 0;
    class c at ``+ c * stride``) in one sweep over the classes."""
    s = tl.load(s_ptrs, mask=pmask, other=0.0).to(ACC)
    t = tl.load(t_ptrs, mask=pmask, other=0.0).to(ACC)
    s_max, zs, t_max, zt, cross, p_log_p, p_sum = _online_first(s, t, TEACHER_LOGITS)
    for c in range(1, C):
        s = tl.load(s_ptrs + c * ss_c, mask=pmask, other=0.0).to(ACC)
        t = tl.load(t_ptrs + c * ts_c, mask=pmask, other=0.0).to(ACC)
        s_max, zs, t_max, zt, cross, p_log_p, p_sum = _online_update(s_max, zs, t_max, zt, cross, p_log_p, p_sum,
                                                                     s, t, TEACHER_LOGITS)
    log_zs, log_zt, kl, p_sum = _finish(zs, zt, cross, p_log_p, p_sum, pmask, TEACHER_LOGITS)
    return s_max, log_zs, t_max, log_zt, kl, p_sum


@triton.jit
def _pixel_grads(s, t, live, s_max, log_zs, t_max, log_zt, kl, p_sum, scale, TEACHER_LOGITS: tl.constexpr):
    """scale * dKL/ds and scale * dKL/dt (kl.h's kl_pixel_grad), 0 where not ``live``; the statistics
    broadcast against ``s`` and ``t``."""
    log_q = tl.where(live, s - s_max - log_zs, 0.0)
    q = tl.exp(log_q)
    if TEACHER_LOGITS:
        log_p = tl.where(live, t - t_max - log_zt, 0.0)
        p = tl.exp(log_p)
        gt = p * ((log_p - log_q) - kl)
    else:
        p = t
        positive = t > 0
        log_p = tl.log(tl.where(positive, t, 1.0))
        gt = tl.where(positive, log_p + 1.0, 0.0) - log_q
    gs = q * p_sum - p
    return tl.where(live, scale * gs, 0.0), tl.where(live, scale * gt, 0.0)


@triton.jit
def _tile_grads(s, t, m, s_max, log_zs, t_max, log_zt, kl, p_sum, scale, TEACHER_LOGITS: tl.constexpr):
    """``_pixel_grads`` of a (classes x pixels) tile; 0 on lanes outside ``m``."""
    live = m & (scale != 0)[None, :]
    return _pixel_grads(s, t, live, s_max[None, :], log_zs[None, :], t_max[None, :], log_zt[None, :], kl[None, :],
                        p_sum[None, :], scale[None, :], TEACHER_LOGITS)


@triton.jit
def _store_stats(st, stride, s_max, log_zs, t_max, log_zt, p_sum, m, TEACHER_LOGITS: tl.constexpr):
    """The statistics of the student's gradient at ``st``, rows ``stride`` apart (kl.h's kl_stats_store)."""
    tl.store(st, s_max, mask=m)
    tl.store(st + stride, log_zs, mask=m)
    if TEACHER_LOGITS:
        tl.store(st + 2 * stride, t_max, mask=m)
        tl.store(st + 3 * stride, log_zt, mask=m)
    else:
        tl.store(st + 2 * stride, p_sum, mask=m)
        tl.store(st + 3 * stride, tl.zeros_like(p_sum), mask=m)


@triton.jit
def _load_stats(st, stride, m, TEACHER_LOGITS: tl.constexpr):
    """(s_max, log_zs, t_max, log_zt, kl, p_sum) stored by ``_store_stats`` (kl = 0: not kept)."""
    s_max = tl.load(st, mask=m, other=0.0)
    log_zs = tl.load(st + stride, mask=m, other=0.0)
    zero = tl.zeros_like(s_max)
    if TEACHER_LOGITS:
        t_max = tl.load(st + 2 * stride, mask=m, other=0.0)
        log_zt = tl.load(st + 3 * stride, mask=m, other=0.0)
        p_sum = tl.full(s_max.shape, 1.0, s_max.dtype)
    else:
        t_max = zero
        log_zt = zero
        p_sum = tl.load(st + 2 * stride, mask=m, other=0.0)
    return s_max, log_zs, t_max, log_zt, zero, p_sum


@triton.jit
def _masked_kl_fwd_kernel(
    s_ptr, t_ptr, w_ptr, out_ptr, st_ptr,
    C, N, S2,
    ss_b, ss_c, ss_h, ss_w, ts_b, ts_c, ts_h, ts_w,
    TEACHER_LOGITS: tl.constexpr, HAS_W: tl.constexpr, REDUCE_NONE: tl.constexpr, STATS: tl.constexpr,
    BLOCK_P: tl.constexpr, ACC: tl.constexpr, MERGED: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs < N
    s_ptrs = s_ptr + b * ss_b + pixel_offsets(offs, S2, ss_h, ss_w, MERGED)
    t_ptrs = t_ptr + b * ts_b + pixel_offsets(offs, S2, ts_h, ts_w, MERGED)
    s_max, log_zs, t_max, log_zt, kl, p_sum = _online_stats(s_ptrs, ss_c, t_ptrs, ts_c, C, pmask, TEACHER_LOGITS,
                                                            ACC)
    if STATS:  # (B, 4, N)
        _store_stats(st_ptr + b * (4 * N) + offs, N, s_max, log_zs, t_max, log_zt, p_sum, pmask, TEACHER_LOGITS)
    if HAS_W:
        wt = tl.load(w_ptr + b * N + offs, mask=pmask, other=0.0)
        kl = tl.where(wt != 0, kl * wt, 0.0)
    kl = tl.where(pmask, kl, 0.0)
    if REDUCE_NONE:
        tl.store(out_ptr + b * N + offs, kl, mask=pmask)
    else:
        tl.store(out_ptr + b * tl.num_programs(0) + pid, tl.sum(kl, axis=0))


@triton.jit
def _masked_kl_bwd_kernel(
    s_ptr, t_ptr, w_ptr, f_ptr, gs_ptr, gt_ptr, st_ptr,
    C, N, S2,
    ss_b, ss_c, ss_h, ss_w, ts_b, ts_c, ts_h, ts_w,
    gs_b, gs_c, gs_h, gs_w, gt_b, gt_c, gt_h, gt_w,
    TEACHER_LOGITS: tl.constexpr, HAS_W: tl.constexpr, FACTOR_PER_PIXEL: tl.constexpr,
    WANT_S: tl.constexpr, WANT_T: tl.constexpr, FROM_STATS: tl.constexpr, BLOCK_P: tl.constexpr,
    ACC: tl.constexpr, MERGED: tl.constexpr,
):
    """The gradients; ``FROM_STATS``: the student's alone, from the forward's statistics at ``st_ptr``
    (one sweep over the classes instead of two)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs < N
    s_ptrs = s_ptr + b * ss_b + pixel_offsets(offs, S2, ss_h, ss_w, MERGED)
    t_ptrs = t_ptr + b * ts_b + pixel_offsets(offs, S2, ts_h, ts_w, MERGED)
    if FACTOR_PER_PIXEL:
        scale = tl.load(f_ptr + b * N + offs, mask=pmask, other=0.0).to(ACC)
    else:
        scale = tl.full((BLOCK_P,), 1.0, ACC) * tl.load(f_ptr).to(ACC)
    if HAS_W:
        scale = scale * tl.load(w_ptr + b * N + offs, mask=pmask, other=0.0)
    scale = tl.where(pmask, scale, 0.0)
    live = pmask & (scale != 0)
    gs_ptrs = gs_ptr + b * gs_b + pixel_offsets(offs, S2, gs_h, gs_w, MERGED)
    gt_ptrs = gt_ptr + b * gt_b + pixel_offsets(offs, S2, gt_h, gt_w, MERGED)
    if FROM_STATS:
        s_max, log_zs, t_max, log_zt, kl, p_sum = _load_stats(st_ptr + b * (4 * N) + offs, N, pmask, TEACHER_LOGITS)
    else:
        s_max, log_zs, t_max, log_zt, kl, p_sum = _online_stats(s_ptrs, ss_c, t_ptrs, ts_c, C, pmask,
                                                                TEACHER_LOGITS, ACC)
    for c in range(0, C):
        s = tl.load(s_ptrs + c * ss_c, mask=pmask, other=0.0).to(ACC)
        t = tl.load(t_ptrs + c * ts_c, mask=pmask, other=0.0).to(ACC)
        gs, gt = _pixel_grads(s, t, live, s_max, log_zs, t_max, log_zt, kl, p_sum, scale, TEACHER_LOGITS)
        if WANT_S:
            tl.store(gs_ptrs + c * gs_c, cast_to(gs, gs_ptr.dtype.element_ty), mask=pmask)
        if WANT_T:
            tl.store(gt_ptrs + c * gt_c, cast_to(gt, gt_ptr.dtype.element_ty), mask=pmask)


def _class_block(C: int) -> int:
    """Classes per program of the ``size=`` gather kernels (a grid axis over class chunks)."""
    return min(next_pow2(max(C, 1)), MAX_BLOCK_C)


def _weights(mask, student, ct):
    if mask is None:
        return None
    B = student.shape[0]
    if mask.dim() == student.dim():
        mask = mask.squeeze(1)
    return mask.to(ct).reshape(B, -1).contiguous()


def _check(student, teacher, reduction):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"masked_kl_div: `reduction` must be one of ['mean', 'sum', 'none'], got {reduction!r}")
    if student.dim() < 2:
        raise ValueError("masked_kl_div: `student_logits` must have shape (B, C, *spatial), "
                         f"got {tuple(student.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(f"masked_kl_div: `teacher` {tuple(teacher.shape)} must have the shape of "
                         f"`student_logits` {tuple(student.shape)}")


def _reduce(kl_or_partials, weights, reduction, numel, ct):
    total = kl_or_partials.sum()
    if reduction == "sum":
        return total
    count = weights.sum() if weights is not None else torch.full((), float(numel), dtype=ct, device=total.device)
    return total / torch.where(count != 0, count, torch.ones_like(count))


def masked_kl_div_forward(student_logits, teacher, mask=None, teacher_is_logits=False, reduction="mean", size=None):
    if size is not None:
        return masked_kl_div_size_forward(student_logits, teacher, mask, teacher_is_logits, reduction, size)
    return _forward(student_logits, teacher, mask, teacher_is_logits, reduction, False)[0]


def masked_kl_div_with_stats(student_logits, teacher, mask, teacher_is_logits, reduction):
    """``_masked_kl_div_with_stats``: the loss and the per-pixel statistics ``(B, 4, N)`` of the
    student's gradient (kl.h's ``kl_stats_store``)."""
    return _forward(student_logits, teacher, mask, teacher_is_logits, reduction, True)


def _forward(student_logits, teacher, mask, teacher_is_logits, reduction, want_stats):
    _check(student_logits, teacher, reduction)
    ct = acc_dtype(student_logits, teacher)
    B, C = student_logits.shape[:2]
    spatial = tuple(student_logits.shape[2:])
    N = math.prod(spatial)
    weights = _weights(mask, student_logits, ct)
    dev = student_logits.device
    stats = torch.zeros((B if want_stats else 0, 4, 0 if B * C == 0 else N), dtype=ct, device=dev)
    if B * N == 0 or C == 0:
        kl = torch.zeros((B, *spatial), dtype=ct, device=dev)
        return (kl if reduction == "none" else _reduce(kl, weights, reduction, B * N, ct)), stats
    s4, t4 = as_4d(student_logits), as_4d(teacher)
    nprog = triton.cdiv(N, PIXEL_BLOCK)
    reduce_none = reduction == "none"
    out = torch.empty((B, N) if reduce_none else (B, nprog), dtype=ct, device=dev)
    with device_guard(student_logits):
        _masked_kl_fwd_kernel[(nprog, B)](
            s4, t4, weights if weights is not None else out, out, stats if want_stats else out,
            C, N, s4.shape[3], *strides4(s4), *strides4(t4),
            TEACHER_LOGITS=bool(teacher_is_logits), HAS_W=weights is not None, REDUCE_NONE=reduce_none,
            STATS=want_stats, BLOCK_P=PIXEL_BLOCK, ACC=tl_dtype(ct), MERGED=merged_pixels(s4, t4),
            num_warps=PIXEL_WARPS,
        )
    if reduce_none:
        return out.reshape(B, *spatial), stats
    return _reduce(out, weights, reduction, B * N, ct), stats


def _grad_buffer(x: torch.Tensor, needed: bool) -> torch.Tensor:
    if not needed:
        return x.new_empty(0)
    # as_4d must be a view of the buffer: dense layouts of rank <= 4 keep their strides.
    return torch.empty_like(x) if x.dim() <= 4 else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def masked_kl_div_backward(grad_loss, student_logits, teacher, mask, teacher_is_logits, reduction, size,
                           output_mask):
    if size is not None:
        return masked_kl_div_size_backward(grad_loss, student_logits, teacher, mask, teacher_is_logits, reduction,
                                           size, output_mask)
    return _backward(grad_loss, student_logits, teacher, mask, teacher_is_logits, reduction, output_mask, None)


def masked_kl_div_backward_stats(grad_loss, student_logits, teacher, mask, stats, teacher_is_logits, reduction):
    """``_masked_kl_div_backward_stats``: the student's gradient from the forward's statistics."""
    B, C = student_logits.shape[:2]
    N = 0 if B * C == 0 else math.prod(student_logits.shape[2:])
    ct = acc_dtype(student_logits, teacher)
    if tuple(stats.shape) != (B, 4, N) or stats.dtype != ct or stats.device != student_logits.device:
        raise ValueError(f"masked_kl_div: `stats` must be {ct} of shape {(B, 4, N)} on {student_logits.device} "
                         f"(from the forward of these inputs), got {stats.dtype} {tuple(stats.shape)} on "
                         f"{stats.device}")
    return _backward(grad_loss, student_logits, teacher, mask, teacher_is_logits, reduction, (True, False),
                     stats.contiguous())[0]


def _backward(grad_loss, student_logits, teacher, mask, teacher_is_logits, reduction, output_mask, stats):
    _check(student_logits, teacher, reduction)
    want_s, want_t = bool(output_mask[0]), bool(output_mask[1])
    grad_s = _grad_buffer(student_logits, want_s)
    grad_t = _grad_buffer(teacher, want_t)
    if not (want_s or want_t):
        return grad_s, grad_t
    ct = acc_dtype(student_logits, teacher)
    B, C = student_logits.shape[:2]
    N = math.prod(student_logits.shape[2:])
    if B * N == 0 or C == 0:
        return grad_s.zero_(), grad_t.zero_()
    weights = _weights(mask, student_logits, ct)
    g = grad_loss.to(ct)
    if reduction == "none":
        factor = g.reshape(B, N).contiguous()
    elif reduction == "sum":
        factor = g.reshape(1).contiguous()
    else:
        count = weights.sum() if weights is not None else torch.full((), float(B * N), dtype=ct, device=g.device)
        factor = (g.reshape(()) / torch.where(count != 0, count, torch.ones_like(count))).reshape(1)
    s4, t4 = as_4d(student_logits), as_4d(teacher)
    gs4 = as_4d(grad_s) if want_s else s4
    gt4 = as_4d(grad_t) if want_t else t4
    with device_guard(student_logits):
        _masked_kl_bwd_kernel[(triton.cdiv(N, PIXEL_BLOCK), B)](
            s4, t4, weights if weights is not None else factor, factor,
            gs4 if want_s else factor, gt4 if want_t else factor, stats if stats is not None else factor,
            C, N, s4.shape[3], *strides4(s4), *strides4(t4), *strides4(gs4), *strides4(gt4),
            TEACHER_LOGITS=bool(teacher_is_logits), HAS_W=weights is not None,
            FACTOR_PER_PIXEL=reduction == "none", WANT_S=want_s, WANT_T=want_t, FROM_STATS=stats is not None,
            BLOCK_P=PIXEL_BLOCK, ACC=tl_dtype(ct), MERGED=merged_pixels(s4, t4, gs4, gt4), num_warps=PIXEL_WARPS,
        )
    return grad_s, grad_t


# ----------------------------------------------------------------------------------------
# size=(H, W): student and teacher read through the bilinear taps of F.interpolate
# ----------------------------------------------------------------------------------------
# The backward's first pass writes N_STATS values per output pixel, rows of a (B, N_STATS, H*W)
# buffer: s_max, log_zs, t_max, log_zt, kl, p_sum, scale (mask weight x per-pixel upstream gradient).
N_STATS = 7


@triton.jit
def _resized_stats(s_base, ss_c, ss_h, ss_w, t_base, ts_c, ts_h, ts_w, Y, X, pm, C, hs, ws, ht, wt, sc_ptr,
                   TEACHER_LOGITS: tl.constexpr, ACC: tl.constexpr):
    """Per-output-pixel (s_max, log_zs, t_max, log_zt, kl, p_sum) of the resized student and teacher
    at output rows ``Y`` and columns ``X``: one sweep over the classes, as ``_online_stats``."""
    sr0, sr1, slr0, slr1 = resize_tap(Y, hs, tl.load(sc_ptr))
    sq0, sq1, slq0, slq1 = resize_tap(X, ws, tl.load(sc_ptr + 1))
    tr0, tr1, tlr0, tlr1 = resize_tap(Y, ht, tl.load(sc_ptr + 2))
    tq0, tq1, tlq0, tlq1 = resize_tap(X, wt, tl.load(sc_ptr + 3))
    s = resized_value(s_base, pm, ss_h, ss_w, sr0, sr1, slr0, slr1, sq0, sq1, slq0, slq1, ACC)
    t = resized_value(t_base, pm, ts_h, ts_w, tr0, tr1, tlr0, tlr1, tq0, tq1, tlq0, tlq1, ACC)
    s_max, zs, t_max, zt, cross, p_log_p, p_sum = _online_first(s, t, TEACHER_LOGITS)
    for c in range(1, C):
        s = resized_value(s_base + c * ss_c, pm, ss_h, ss_w, sr0, sr1, slr0, slr1, sq0, sq1, slq0, slq1, ACC)
        t = resized_value(t_base + c * ts_c, pm, ts_h, ts_w, tr0, tr1, tlr0, tlr1, tq0, tq1, tlq0, tlq1, ACC)
        s_max, zs, t_max, zt, cross, p_log_p, p_sum = _online_update(s_max, zs, t_max, zt, cross, p_log_p, p_sum,
                                                                     s, t, TEACHER_LOGITS)
    log_zs, log_zt, kl, p_sum = _finish(zs, zt, cross, p_log_p, p_sum, pm, TEACHER_LOGITS)
    return s_max, log_zs, t_max, log_zt, kl, p_sum


@triton.jit
def _resized_kl_fwd_kernel(
    s_ptr, t_ptr, w_ptr, f_ptr, out_ptr, sc_ptr,
    C, H, W, hs, ws, ht, wt,
    ss_b, ss_c, ss_h, ss_w, ts_b, ts_c, ts_h, ts_w,
    TEACHER_LOGITS: tl.constexpr, HAS_W: tl.constexpr, REDUCE_NONE: tl.constexpr, STATS: tl.constexpr,
    FACTOR_PER_PIXEL: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr,
):
    """Forward over output pixels: the loss (``STATS=False``: per pixel or per-program partials),
    or the backward's first pass (``STATS=True``): the statistics of every output pixel, with
    ``scale`` = mask weight (times the upstream gradient of that pixel for ``reduction="none"``)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    N = H * W
    offs = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = offs < N
    Y = offs // W
    X = offs % W
    s_max, log_zs, t_max, log_zt, kl, p_sum = _resized_stats(
        s_ptr + b * ss_b, ss_c, ss_h, ss_w, t_ptr + b * ts_b, ts_c, ts_h, ts_w, Y, X, pm, C, hs, ws, ht, wt, sc_ptr,
        TEACHER_LOGITS, ACC)
    if STATS:
        if FACTOR_PER_PIXEL:
            scale = tl.load(f_ptr + b * N + offs, mask=pm, other=0.0).to(ACC)
        else:
            scale = tl.full((BLOCK_P,), 1.0, ACC)
        if HAS_W:
            scale = scale * tl.load(w_ptr + b * N + offs, mask=pm, other=0.0)
        scale = tl.where(pm, scale, 0.0)
        st = out_ptr + b * (7 * N) + offs
        tl.store(st + 0 * N, s_max, mask=pm)
        tl.store(st + 1 * N, log_zs, mask=pm)
        tl.store(st + 2 * N, t_max, mask=pm)
        tl.store(st + 3 * N, log_zt, mask=pm)
        tl.store(st + 4 * N, kl, mask=pm)
        tl.store(st + 5 * N, p_sum, mask=pm)
        tl.store(st + 6 * N, scale, mask=pm)
    else:
        if HAS_W:
            wt_ = tl.load(w_ptr + b * N + offs, mask=pm, other=0.0)
            kl = tl.where(wt_ != 0, kl * wt_, 0.0)
        kl = tl.where(pm, kl, 0.0)
        if REDUCE_NONE:
            tl.store(out_ptr + b * N + offs, kl, mask=pm)
        else:
            tl.store(out_ptr + b * tl.num_programs(0) + pid, tl.sum(kl, axis=0))


@triton.jit
def _resized_kl_gather_kernel(
    s_ptr, t_ptr, st_ptr, f_ptr, sc_ptr, g_ptr,
    C, H, W, hs, ws, ht, wt, RY, RX,
    ss_b, ss_c, ss_h, ss_w, ts_b, ts_c, ts_h, ts_w, g_b, g_c, g_h, g_w,
    TEACHER_LOGITS: tl.constexpr, TARGET_TEACHER: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ACC: tl.constexpr,
):
    """Backward's second pass: the gradient of one low-resolution input (the student, or the
    teacher with ``TARGET_TEACHER``) for a (classes x input pixels) tile. Each input pixel sums
    ``weight * dKL/d(resized input)`` over the output pixels that read it (``RY x RX`` candidates
    from ``readers_begin``, weight 0 for the others), recomputing the resized logits there from
    the pass-1 statistics: a gather in a fixed order, no atomics, deterministic."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    c0 = tl.program_id(2) * BLOCK_C
    N = H * W
    sc_sy = tl.load(sc_ptr)
    sc_sx = tl.load(sc_ptr + 1)
    sc_ty = tl.load(sc_ptr + 2)
    sc_tx = tl.load(sc_ptr + 3)
    if TARGET_TEACHER:
        hg = ht
        wg = wt
        sc_gy = sc_ty
        sc_gx = sc_tx
    else:
        hg = hs
        wg = ws
        sc_gy = sc_sy
        sc_gx = sc_sx
    offs = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = offs < hg * wg
    y = offs // wg
    x = offs % wg
    by = readers_begin(y, sc_gy)
    bx = readers_begin(x, sc_gx)
    offs_c = tl.arange(0, BLOCK_C)
    s_base = s_ptr + b * ss_b
    t_base = t_ptr + b * ts_b
    st = st_ptr + b * (7 * N)
    factor = tl.load(f_ptr).to(ACC)
    acc = tl.zeros((BLOCK_C, BLOCK_P), ACC)
    for ky in range(RY):
        Y = by + ky
        sr0, sr1, slr0, slr1 = resize_tap(Y, hs, sc_sy)
        tr0, tr1, tlr0, tlr1 = resize_tap(Y, ht, sc_ty)
        if TARGET_TEACHER:
            wy = resize_weight(tr0, tr1, tlr0, tlr1, y)
        else:
            wy = resize_weight(sr0, sr1, slr0, slr1, y)
        row_ok = pm & (Y < H) & (wy != 0)
        for kx in range(RX):
            X = bx + kx
            sq0, sq1, slq0, slq1 = resize_tap(X, ws, sc_sx)
            tq0, tq1, tlq0, tlq1 = resize_tap(X, wt, sc_tx)
            if TARGET_TEACHER:
                wx = resize_weight(tq0, tq1, tlq0, tlq1, x)
            else:
                wx = resize_weight(sq0, sq1, slq0, slq1, x)
            ok = row_ok & (X < W) & (wx != 0)
            pix = Y * W + X
            scale = tl.load(st + 6 * N + pix, mask=ok, other=0.0)
            live = ok & (scale != 0)
            s_max = tl.load(st + pix, mask=live, other=0.0)
            log_zs = tl.load(st + N + pix, mask=live, other=0.0)
            t_max = tl.load(st + 2 * N + pix, mask=live, other=0.0)
            log_zt = tl.load(st + 3 * N + pix, mask=live, other=0.0)
            kl = tl.load(st + 4 * N + pix, mask=live, other=0.0)
            p_sum = tl.load(st + 5 * N + pix, mask=live, other=0.0)
            s, m = resized_tile(s_base, c0, offs_c, C, ss_c, ss_h, ss_w, sr0, sr1, slr0, slr1, sq0, sq1, slq0, slq1,
                                live, ACC)
            t, _ = resized_tile(t_base, c0, offs_c, C, ts_c, ts_h, ts_w, tr0, tr1, tlr0, tlr1, tq0, tq1, tlq0, tlq1,
                                live, ACC)
            gs, gt = _tile_grads(s, t, m, s_max, log_zs, t_max, log_zt, kl, p_sum, scale * factor, TEACHER_LOGITS)
            w = (wy * wx)[None, :]
            if TARGET_TEACHER:
                acc += w * gt
            else:
                acc += w * gs
    cc = (c0 + offs_c)[:, None]
    g_off = y * g_h + x * g_w
    tl.store(g_ptr + b * g_b + cc * g_c + g_off[None, :], cast_to(acc, g_ptr.dtype.element_ty),
             mask=(cc < C) & pm[None, :])


def _size_hw(size):
    H, W = (int(v) for v in size)
    return H, W


def _check_size(student, teacher, reduction, size):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"masked_kl_div: `reduction` must be one of ['mean', 'sum', 'none'], got {reduction!r}")
    if len(size) != 2 or any(int(v) <= 0 for v in size):
        raise ValueError(f"masked_kl_div: `size` must be 2 positive ints (H, W), got {list(size)}")
    if student.dim() != 4 or teacher.dim() != 4 or teacher.shape[:2] != student.shape[:2]:
        raise ValueError(f"masked_kl_div: `size` needs 4-D (B, C, H, W) `student_logits` {tuple(student.shape)} and "
                         f"`teacher` {tuple(teacher.shape)} with the same B and C")
    if student.shape[0] * student.shape[1] > 0 and (student.shape[2:].numel() == 0 or teacher.shape[2:].numel() == 0):
        raise ValueError("masked_kl_div: `size` cannot resize an input with an empty spatial dim")


def _is_identity(student, teacher, size) -> bool:
    return tuple(student.shape[2:]) == tuple(teacher.shape[2:]) == tuple(size)


def _check_size_mask(mask, student, size):
    """The mask is at the output size (the kernels index it by output pixel)."""
    if mask is None:
        return
    B = student.shape[0]
    H, W = _size_hw(size)
    if tuple(mask.shape) not in ((B, H, W), (B, 1, H, W)):
        raise ValueError(f"masked_kl_div: `mask` must have shape (B, H, W) = {(B, H, W)} or (B, 1, H, W) at the "
                         f"output size `size`, got {tuple(mask.shape)}")


def _resized_launch_args(student, teacher, size, ct):
    H, W = _size_hw(size)
    hs, ws = student.shape[2:]
    ht, wt = teacher.shape[2:]
    scales = resize_scales((hs, ws, ht, wt), (H, W, H, W), ct, student.device)
    return H, W, hs, ws, ht, wt, scales


def masked_kl_div_size_forward(student_logits, teacher, mask, teacher_is_logits, reduction, size):
    """``size=(H, W)``: the masked KL of the student and teacher resized to (H, W), read through
    the bilinear taps (nothing of size B x C x H x W is allocated)."""
    _check_size(student_logits, teacher, reduction, size)
    _check_size_mask(mask, student_logits, size)
    if _is_identity(student_logits, teacher, size):
        return masked_kl_div_forward(student_logits, teacher, mask, teacher_is_logits, reduction)
    ct = acc_dtype(student_logits, teacher)
    B, C = student_logits.shape[:2]
    H, W, hs, ws, ht, wt, scales = _resized_launch_args(student_logits, teacher, size, ct)
    N = H * W
    weights = _weights(mask, student_logits, ct)
    dev = student_logits.device
    if B * N == 0 or C == 0:
        kl = torch.zeros((B, H, W), dtype=ct, device=dev)
        return kl if reduction == "none" else _reduce(kl, weights, reduction, B * N, ct)
    nprog = triton.cdiv(N, SIZED_PIXEL_BLOCK)
    reduce_none = reduction == "none"
    out = torch.empty((B, N) if reduce_none else (B, nprog), dtype=ct, device=dev)
    with device_guard(student_logits):
        _resized_kl_fwd_kernel[(nprog, B)](
            student_logits, teacher, weights if weights is not None else out, out, out, scales,
            C, H, W, hs, ws, ht, wt, *strides4(student_logits), *strides4(teacher),
            TEACHER_LOGITS=bool(teacher_is_logits), HAS_W=weights is not None, REDUCE_NONE=reduce_none, STATS=False,
            FACTOR_PER_PIXEL=False, BLOCK_P=SIZED_PIXEL_BLOCK, ACC=tl_dtype(ct), num_warps=PIXEL_WARPS,
        )
    if reduce_none:
        return out.reshape(B, H, W)
    return _reduce(out, weights, reduction, B * N, ct)


def masked_kl_div_size_backward(grad_loss, student_logits, teacher, mask, teacher_is_logits, reduction, size,
                                output_mask):
    """Gradients with ``size=(H, W)``, both native: pass 1 writes per-output-pixel statistics
    (``7 x B x H x W``), pass 2 gathers each low-resolution input pixel's gradient over the
    output pixels that read it (deterministic)."""
    _check_size(student_logits, teacher, reduction, size)
    _check_size_mask(mask, student_logits, size)
    if _is_identity(student_logits, teacher, size):
        return masked_kl_div_backward(grad_loss, student_logits, teacher, mask, teacher_is_logits, reduction, None,
                                      output_mask)
    want_s, want_t = bool(output_mask[0]), bool(output_mask[1])
    grad_s = torch.empty_like(student_logits) if want_s else student_logits.new_empty(0)
    grad_t = torch.empty_like(teacher) if want_t else teacher.new_empty(0)
    if not (want_s or want_t):
        return grad_s, grad_t
    ct = acc_dtype(student_logits, teacher)
    B, C = student_logits.shape[:2]
    H, W, hs, ws, ht, wt, scales = _resized_launch_args(student_logits, teacher, size, ct)
    N = H * W
    if B * N == 0 or C == 0:
        return grad_s.zero_(), grad_t.zero_()
    dev = student_logits.device
    weights = _weights(mask, student_logits, ct)
    g = grad_loss.to(ct)
    per_pixel = None
    if reduction == "none":
        per_pixel = g.reshape(B, N).contiguous()
        factor = torch.ones(1, dtype=ct, device=dev)
    elif reduction == "sum":
        factor = g.reshape(1).contiguous()
    else:
        count = weights.sum() if weights is not None else torch.full((), float(B * N), dtype=ct, device=dev)
        factor = (g.reshape(()) / torch.where(count != 0, count, torch.ones_like(count))).reshape(1)
    stats = torch.empty((B, N_STATS, N), dtype=ct, device=dev)
    block_c = _class_block(C)
    logits = bool(teacher_is_logits)
    with device_guard(student_logits):
        _resized_kl_fwd_kernel[(triton.cdiv(N, SIZED_PIXEL_BLOCK), B)](
            student_logits, teacher, weights if weights is not None else stats,
            per_pixel if per_pixel is not None else stats, stats, scales,
            C, H, W, hs, ws, ht, wt, *strides4(student_logits), *strides4(teacher),
            TEACHER_LOGITS=logits, HAS_W=weights is not None, REDUCE_NONE=False, STATS=True,
            FACTOR_PER_PIXEL=per_pixel is not None, BLOCK_P=SIZED_PIXEL_BLOCK, ACC=tl_dtype(ct),
            num_warps=PIXEL_WARPS,
        )
        for target, grad, (h, w) in ((False, grad_s, (hs, ws)), (True, grad_t, (ht, wt))):
            if grad.numel() == 0:
                continue
            bp = max(16, min(256, TILE_ELEMS // block_c // 4))
            _resized_kl_gather_kernel[(triton.cdiv(h * w, bp), B, triton.cdiv(C, block_c))](
                student_logits, teacher, stats, factor, scales, grad,
                C, H, W, hs, ws, ht, wt, reader_span(h, H), reader_span(w, W),
                *strides4(student_logits), *strides4(teacher), *strides4(grad),
                TEACHER_LOGITS=logits, TARGET_TEACHER=target, BLOCK_C=block_c, BLOCK_P=bp, ACC=tl_dtype(ct),
                num_warps=NUM_WARPS,
            )
    return grad_s, grad_t


register_python_backend("masked_kl_div", "triton", masked_kl_div_forward, masked_kl_div_backward,
                        {"_masked_kl_div_with_stats": masked_kl_div_with_stats,
                         "_masked_kl_div_backward_stats": masked_kl_div_backward_stats})
