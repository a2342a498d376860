"""Triton kernels of ``tpswarp::warped_kl_div`` and its backward: the paper's Eq. 3-4 in one pass.

Per student pixel: evaluate the TPS map, sample the teacher bilinearly (zero padding) at the
four taps for every class, and take the masked KL of ``masked_kl_div`` (the same device
functions: online statistics in one sweep over the classes, ``kl.h`` gradients) over the pixels
whose sample lies in the teacher's pixel-centre hull. As in ``masked_kl_div``, each thread owns its
pixels and sweeps the classes one at a time (no cross-thread reduction over classes). Nothing of
size ``B x C x H x W`` is allocated besides the gradients: the warped teacher lives only in
registers, in the compute dtype (float32 for half inputs, as the reference warps
``teacher.to(compute dtype)``).

Backward: one statistics sweep, then one gradient sweep over the classes. The student gradient
is written directly; the gradient w.r.t. the warped teacher is
scattered to the four taps of the teacher (float atomics; under
``torch.use_deterministic_algorithms(True)`` per-tap contributions summed by a deterministic
``index_add_`` instead, which does allocate ``4 x B*H*W x C``); the coordinate gradient goes
through the TPS map into per-program partials summed by torch (deterministic). The mean's
denominator (the number of valid pixels) is counted on the device: per-program counts summed
by torch, no host synchronization. ``warped_kl_div_with_stats`` / ``warped_kl_div_backward_stats``
(the student's gradient alone): the forward also stores each pixel's statistics and validity
(``STATS``), the backward reads them (``FROM_STATS``): one sweep, no counting pass.

With ``size=(H, W)`` (``warped_kl_div_size_forward`` / ``_backward``): the student and the
teacher are read through the bilinear resize taps (``_resize.py``), the warp samples the resized
teacher (4 warp taps x 4 resize taps); the student gradient is native (per-output-pixel statistics
and warp coordinates, then a deterministic gather per low-resolution pixel); the teacher, src and
params gradients compose through the reference VJP (``_composed_grads``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import register_python_backend
from ._utils import (INTERPRET, acc_dtype, cast_to, deterministic, device_guard, empty_like_format, hull_tolerances,
                     in_hull, merged_pixels, next_pow2, pixel_offsets, scatter_rows_deterministic, tl_dtype,
                     tps_backward_partials, tps_param_grads)
from ._resize import (reader_span, readers_begin, resize_scales, resize_tap, resize_weight, resized_tile,
                      resized_value)
from .masked_kl_div import (_finish, _load_stats, _online_first, _online_update, _pixel_grads, _store_stats,
                            _tile_grads)
from .tps_warp import _coords

# size=None: pixels per program (forward, backward) and warps: one pixel per thread, so the student's
# contiguous loads and the teacher's gathers share one layout (no conversion through shared memory).
PIXEL_BLOCK_FWD = 128 if not INTERPRET else 4096
PIXEL_BLOCK_BWD = 128 if not INTERPRET else 4096
PIXEL_WARPS = 4
# size=(H, W): output pixels per program of the forward / statistics kernel (one sweep over the
# classes, as without size); the student-gradient gather works on (classes x pixels) tiles, the
# classes in chunks of at most MAX_BLOCK_C (a grid axis).
SIZED_PIXEL_BLOCK = 128 if not INTERPRET else 4096
MAX_BLOCK_C = 64
TILE_ELEMS = 2048 if not INTERPRET else 16384
NUM_WARPS = 8  # the gather's (classes x pixels) tiles


@triton.jit
def _taps(px, py, Wt, Ht, valid):
    """Bilinear taps of the (raw, zero-padded) pixel coordinate: weights with the outside taps
    zeroed, tap masks, and the top-left tap's indices."""
    x0 = tl.floor(px)
    y0 = tl.floor(py)
    wx1 = px - x0
    wy1 = py - y0
    wx0 = 1.0 - wx1
    wy0 = 1.0 - wy1
    in_x0 = (x0 >= 0.0) & (x0 <= Wt - 1.0)
    in_x1 = (x0 + 1.0 >= 0.0) & (x0 + 1.0 <= Wt - 1.0)
    in_y0 = valid & (y0 >= 0.0) & (y0 <= Ht - 1.0)
    in_y1 = valid & (y0 + 1.0 >= 0.0) & (y0 + 1.0 <= Ht - 1.0)
    m00 = in_x0 & in_y0
    m10 = in_x1 & in_y0
    m01 = in_x0 & in_y1
    m11 = in_x1 & in_y1
    xi = tl.where(valid, x0, 0.0).to(tl.int32)
    yi = tl.where(valid, y0, 0.0).to(tl.int32)
    return wx0, wx1, wy0, wy1, m00, m10, m01, m11, xi, yi


@triton.jit
def _tap_weights(wx0, wx1, wy0, wy1, m00, m10, m01, m11):
    """The four bilinear weights, 0 for taps outside the teacher (zero padding)."""
    return (tl.where(m00, wx0 * wy0, 0.0), tl.where(m10, wx1 * wy0, 0.0), tl.where(m01, wx0 * wy1, 0.0),
            tl.where(m11, wx1 * wy1, 0.0))


@triton.jit
def _warped_teacher(t_ptrs, ts_h, ts_w, m00, m10, m01, m11, w00, w10, w01, w11, ACC: tl.constexpr):
    """One class of the warped teacher at each pixel (``t_ptrs``: its top-left taps), and the four taps."""
    v00 = tl.load(t_ptrs, mask=m00, other=0.0).to(ACC)
    v10 = tl.load(t_ptrs + ts_w, mask=m10, other=0.0).to(ACC)
    v01 = tl.load(t_ptrs + ts_h, mask=m01, other=0.0).to(ACC)
    v11 = tl.load(t_ptrs + ts_h + ts_w, mask=m11, other=0.0).to(ACC)
    return w00 * v00 + w10 * v10 + w01 * v01 + w11 * v11, v00, v10, v01, v11


@triton.jit
def _warped_online_stats(s_ptrs, ss_c, t_ptrs, ts_c, ts_h, ts_w, C, pm, valid, m00, m10, m01, m11,
                         w00, w10, w01, w11, TEACHER_LOGITS: tl.constexpr, ACC: tl.constexpr):
    """``_online_stats`` with the teacher warped: one sweep over the classes, 1 + 4 loads per class."""
    s = tl.load(s_ptrs, mask=pm, other=0.0).to(ACC)
    t, _, _, _, _ = _warped_teacher(t_ptrs, ts_h, ts_w, m00, m10, m01, m11, w00, w10, w01, w11, ACC)
    s_max, zs, t_max, zt, cross, p_log_p, p_sum = _online_first(s, t, TEACHER_LOGITS)
    for c in range(1, C):
        s = tl.load(s_ptrs + c * ss_c, mask=pm, other=0.0).to(ACC)
        t, _, _, _, _ = _warped_teacher(t_ptrs + c * ts_c, ts_h, ts_w, m00, m10, m01, m11, w00, w10, w01, w11, ACC)
        s_max, zs, t_max, zt, cross, p_log_p, p_sum = _online_update(s_max, zs, t_max, zt, cross, p_log_p, p_sum,
                                                                     s, t, TEACHER_LOGITS)
    log_zs, log_zt, kl, p_sum = _finish(zs, zt, cross, p_log_p, p_sum, valid, TEACHER_LOGITS)
    return s_max, log_zs, t_max, log_zt, kl, p_sum


@triton.jit
def _warped_kl_fwd_kernel(
    s_ptr, t_ptr, src_ptr, par_ptr, out_ptr, cnt_ptr, hull_ptr, st_ptr,
    C, H, W, Ht, Wt, n,
    ss_b, ss_c, ss_h, ss_w, ts_b, ts_c, ts_h, ts_w,
    TEACHER_LOGITS: tl.constexpr, REDUCE_NONE: tl.constexpr, COUNT_ONLY: tl.constexpr, STATS: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr, MERGED: tl.constexpr,
):
    """The loss (per pixel or per-program partials) and per-program counts of valid pixels; with
    ``STATS`` also the (B, 5, H W) statistics of the student's gradient (csrc/include/tpswarp/warped_kl.h)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    P = H * W
    pm = offs < P
    qx, qy, px, py = _coords(offs, b, H, W, Ht, Wt, src_ptr, par_ptr, n, ALIGN, ACC)
    valid = pm & in_hull(px, py, Wt, Ht, hull_ptr)
    part = b * tl.num_programs(0) + pid
    tl.store(cnt_ptr + part, tl.sum(valid.to(ACC), axis=0))
    if not COUNT_ONLY:
        wx0, wx1, wy0, wy1, m00, m10, m01, m11, xi, yi = _taps(px, py, Wt, Ht, valid)
        w00, w10, w01, w11 = _tap_weights(wx0, wx1, wy0, wy1, m00, m10, m01, m11)
        t_ptrs = t_ptr + b * ts_b + yi * ts_h + xi * ts_w
        s_ptrs = s_ptr + b * ss_b + pixel_offsets(offs, W, ss_h, ss_w, MERGED)
        s_max, log_zs, t_max, log_zt, kl, p_sum = _warped_online_stats(
            s_ptrs, ss_c, t_ptrs, ts_c, ts_h, ts_w, C, pm, valid, m00, m10, m01, m11, w00, w10, w01, w11,
            TEACHER_LOGITS, ACC)
        kl = tl.where(valid, kl, 0.0)
        if STATS:  # (B, 5, H W): the statistics, then the validity weight
            st = st_ptr + b * (5 * P) + offs
            _store_stats(st, P, s_max, log_zs, t_max, log_zt, p_sum, pm, TEACHER_LOGITS)
            tl.store(st + 4 * P, valid.to(ACC), mask=pm)
        if REDUCE_NONE:
            tl.store(out_ptr + b * P + offs, kl, mask=pm)
        else:
            tl.store(out_ptr + part, tl.sum(kl, axis=0))


@triton.jit
def _warped_kl_bwd_kernel(
    s_ptr, t_ptr, src_ptr, par_ptr, f_ptr, gs_ptr, gt_ptr, part_ptr, ct_ptr, ci_ptr, hull_ptr, st_ptr,
    C, H, W, Ht, Wt, n,
    ss_b, ss_c, ss_h, ss_w, ts_b, ts_c, ts_h, ts_w, gs_b, gs_c, gs_h, gs_w, gt_b, gt_c, gt_h, gt_w,
    TEACHER_LOGITS: tl.constexpr, FACTOR_PER_PIXEL: tl.constexpr, ALIGN: tl.constexpr,
    WANT_S: tl.constexpr, WANT_T: tl.constexpr, WANT_SRC: tl.constexpr, WANT_PARAMS: tl.constexpr,
    DETERMINISTIC: tl.constexpr, FROM_STATS: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr,
    MERGED: tl.constexpr,
):
    """The gradients; ``FROM_STATS``: the student's alone, from the forward's statistics at ``st_ptr``
    (one sweep over the classes instead of two)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    P = H * W
    PT = P * tl.num_programs(1)
    pm = offs < P
    qx, qy, px, py = _coords(offs, b, H, W, Ht, Wt, src_ptr, par_ptr, n, ALIGN, ACC)
    valid = pm & in_hull(px, py, Wt, Ht, hull_ptr)
    if FACTOR_PER_PIXEL:
        scale = tl.load(f_ptr + b * P + offs, mask=pm, other=0.0).to(ACC)
    else:
        scale = tl.full((BLOCK_P,), 1.0, ACC) * tl.load(f_ptr).to(ACC)
    scale = tl.where(valid, scale, 0.0)
    live = valid & (scale != 0)
    wx0, wx1, wy0, wy1, m00, m10, m01, m11, xi, yi = _taps(px, py, Wt, Ht, valid)
    w00, w10, w01, w11 = _tap_weights(wx0, wx1, wy0, wy1, m00, m10, m01, m11)
    row = b * P + offs
    if WANT_T and DETERMINISTIC:
        dropped = Ht * Wt * tl.num_programs(1)
        base = b * Ht * Wt + yi * Wt + xi
        tl.store(ci_ptr + row, tl.where(m00, base, dropped), mask=pm)
        tl.store(ci_ptr + PT + row, tl.where(m10, base + 1, dropped), mask=pm)
        tl.store(ci_ptr + 2 * PT + row, tl.where(m01, base + Wt, dropped), mask=pm)
        tl.store(ci_ptr + 3 * PT + row, tl.where(m11, base + Wt + 1, dropped), mask=pm)
    t_ptrs = t_ptr + b * ts_b + yi * ts_h + xi * ts_w
    s_ptrs = s_ptr + b * ss_b + pixel_offsets(offs, W, ss_h, ss_w, MERGED)
    gs_ptrs = gs_ptr + b * gs_b + pixel_offsets(offs, W, gs_h, gs_w, MERGED)
    gt_ptrs = gt_ptr + b * gt_b + yi * gt_h + xi * gt_w
    if FROM_STATS:
        s_max, log_zs, t_max, log_zt, kl, p_sum = _load_stats(st_ptr + b * (5 * P) + offs, P, pm, TEACHER_LOGITS)
    else:
        s_max, log_zs, t_max, log_zt, kl, p_sum = _warped_online_stats(
            s_ptrs, ss_c, t_ptrs, ts_c, ts_h, ts_w, C, pm, valid, m00, m10, m01, m11, w00, w10, w01, w11,
            TEACHER_LOGITS, ACC)
    gpx = tl.zeros((BLOCK_P,), ACC)
    gpy = tl.zeros((BLOCK_P,), ACC)
    for c in range(0, C):
        s = tl.load(s_ptrs + c * ss_c, mask=pm, other=0.0).to(ACC)
        t, v00, v10, v01, v11 = _warped_teacher(t_ptrs + c * ts_c, ts_h, ts_w, m00, m10, m01, m11,
                                                w00, w10, w01, w11, ACC)
        gs, gt = _pixel_grads(s, t, live, s_max, log_zs, t_max, log_zt, kl, p_sum, scale, TEACHER_LOGITS)
        if WANT_S:  # invalid pixels get exact zeros
            tl.store(gs_ptrs + c * gs_c, cast_to(gs, gs_ptr.dtype.element_ty), mask=pm)
        if WANT_T:
            if DETERMINISTIC:
                tl.store(ct_ptr + row * C + c, w00 * gt, mask=pm)
                tl.store(ct_ptr + (PT + row) * C + c, w10 * gt, mask=pm)
                tl.store(ct_ptr + (2 * PT + row) * C + c, w01 * gt, mask=pm)
                tl.store(ct_ptr + (3 * PT + row) * C + c, w11 * gt, mask=pm)
            else:
                g_ptrs = gt_ptrs + c * gt_c
                tl.atomic_add(g_ptrs, w00 * gt, mask=live & m00)
                tl.atomic_add(g_ptrs + gt_w, w10 * gt, mask=live & m10)
                tl.atomic_add(g_ptrs + gt_h, w01 * gt, mask=live & m01)
                tl.atomic_add(g_ptrs + gt_h + gt_w, w11 * gt, mask=live & m11)
        if WANT_SRC or WANT_PARAMS:
            gpx += gt * (wy0 * (v10 - v00) + wy1 * (v11 - v01))
            gpy += gt * (wx0 * (v01 - v00) + wx1 * (v11 - v10))
    if WANT_SRC or WANT_PARAMS:
        # zero padding: no remap; unnormalize: d pixel / d coord = (size - 1) / 2 or size / 2
        if ALIGN:
            sx = (Wt - 1.0) / 2.0
            sy = (Ht - 1.0) / 2.0
        else:
            sx = Wt / 2.0
            sy = Ht / 2.0
        gfx = tl.where(valid, gpx * sx, 0.0)
        gfy = tl.where(valid, gpy * sy, 0.0)
        out = part_ptr + (b * tl.num_programs(0) + pid) * (4 * n + 6)
        tps_backward_partials(gfx, gfy, qx, qy, src_ptr + b * (2 * n), par_ptr + b * (2 * n + 6), n, out,
                              WANT_PARAMS, WANT_SRC)


def _check(student, teacher, src, params, reduction):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"warped_kl_div: `reduction` must be one of ['mean', 'sum', 'none'], got {reduction!r}")
    if student.dim() != 4 or teacher.dim() != 4 or teacher.shape[:2] != student.shape[:2]:
        raise ValueError(f"warped_kl_div: `student_logits` {tuple(student.shape)} and `teacher` "
                         f"{tuple(teacher.shape)} must be (B, C, H, W) with the same B and C")
    n = src.shape[1]
    if src.dim() != 3 or params.shape != (src.shape[0], n + 3, 2) or src.shape[0] != student.shape[0]:
        raise ValueError(f"warped_kl_div: `src` {tuple(src.shape)} and `params` {tuple(params.shape)} must be "
                         f"(B, n, 2) and (B, n + 3, 2) with B = {student.shape[0]}")


def _class_block(C: int) -> int:
    """Classes per program of the ``size=`` gather kernel (a grid axis over class chunks)."""
    return min(next_pow2(max(C, 1)), MAX_BLOCK_C)


def _setup(student, teacher, src, params):
    ct = acc_dtype(student, teacher, src, params)
    return ct, src.to(ct).contiguous(), params.to(ct).contiguous()


def _mean_denominator(counts):
    count = counts.sum()
    return torch.where(count != 0, count, torch.ones_like(count))


def warped_kl_div_forward(student_logits, teacher, src, params, teacher_is_logits=False, align_corners=False,
                          reduction="mean", size=None):
    if size is not None:
        return warped_kl_div_size_forward(student_logits, teacher, src, params, teacher_is_logits, align_corners,
                                          reduction, size)
    return _forward(student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction, False)[0]


def warped_kl_div_with_stats(student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction):
    """``_warped_kl_div_with_stats``: the loss and the per-pixel statistics ``(B, 5, H W)`` of the
    student's gradient (``csrc/include/tpswarp/warped_kl.h``)."""
    return _forward(student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction, True)


def _forward(student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction, want_stats):
    _check(student_logits, teacher, src, params, reduction)
    ct, src_c, par_c = _setup(student_logits, teacher, src, params)
    B, C, H, W = student_logits.shape
    Ht, Wt = teacher.shape[2:]
    dev = student_logits.device
    stats = torch.zeros((B if want_stats else 0, 5, H * W), dtype=ct, device=dev)
    if B * H * W == 0 or C == 0 or Ht * Wt == 0:
        kl = torch.zeros((B, H, W), dtype=acc_dtype(student_logits, teacher, params), device=dev)
        return (kl if reduction == "none" else kl.sum()), stats
    nprog = triton.cdiv(H * W, PIXEL_BLOCK_FWD)
    reduce_none = reduction == "none"
    out = torch.empty((B, H * W) if reduce_none else (B, nprog), dtype=ct, device=dev)
    counts = torch.empty((B, nprog), dtype=ct, device=dev)
    with device_guard(student_logits):
        _warped_kl_fwd_kernel[(nprog, B)](
            student_logits, teacher, src_c, par_c, out, counts, hull_tolerances(Ht, Wt, ct, dev),
            stats if want_stats else counts,
            C, H, W, Ht, Wt, src.shape[1], *student_logits.stride(), *teacher.stride(),
            TEACHER_LOGITS=bool(teacher_is_logits), REDUCE_NONE=reduce_none, COUNT_ONLY=False, STATS=want_stats,
            ALIGN=bool(align_corners), BLOCK_P=PIXEL_BLOCK_FWD, ACC=tl_dtype(ct),
            MERGED=merged_pixels(student_logits), num_warps=PIXEL_WARPS,
        )
    if reduce_none:
        loss = out.reshape(B, H, W)
    else:
        total = out.sum()
        loss = total if reduction == "sum" else total / _mean_denominator(counts)
    return loss.to(acc_dtype(student_logits, teacher, params)), stats  # the fake kernel's dtype


def warped_kl_div_backward(grad_loss, student_logits, teacher, src, params, teacher_is_logits, align_corners,
                           reduction, size, output_mask):
    if size is not None:
        return warped_kl_div_size_backward(grad_loss, student_logits, teacher, src, params, teacher_is_logits,
                                           align_corners, reduction, size, output_mask)
    return _backward(grad_loss, student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction,
                     output_mask, None)


def warped_kl_div_backward_stats(grad_loss, student_logits, teacher, src, params, stats, teacher_is_logits,
                                 align_corners, reduction):
    """``_warped_kl_div_backward_stats``: the student's gradient from the forward's statistics."""
    B, _, H, W = student_logits.shape
    ct = acc_dtype(student_logits, teacher, src, params)
    if tuple(stats.shape) != (B, 5, H * W) or stats.dtype != ct or stats.device != student_logits.device:
        raise ValueError(f"warped_kl_div: `stats` must be {ct} of shape {(B, 5, H * W)} on {student_logits.device} "
                         f"(from the forward of these inputs), got {stats.dtype} {tuple(stats.shape)} on "
                         f"{stats.device}")
    return _backward(grad_loss, student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction,
                     (True, False, False, False), stats.contiguous())[0]


def _backward(grad_loss, student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction,
              output_mask, stats):
    """The gradients of ``output_mask``; with ``stats`` (the student's alone) read from the forward's statistics."""
    _check(student_logits, teacher, src, params, reduction)
    want_s, want_t, want_src, want_params = (bool(x) for x in output_mask)
    ct, src_c, par_c = _setup(student_logits, teacher, src, params)
    B, C, H, W = student_logits.shape
    Ht, Wt = teacher.shape[2:]
    n = src.shape[1]
    dev = student_logits.device
    grad_s = torch.empty_like(student_logits) if want_s else student_logits.new_empty(0)
    det = want_t and deterministic()
    empty = B * H * W == 0 or C == 0 or Ht * Wt == 0
    nprog = triton.cdiv(H * W, PIXEL_BLOCK_BWD) if H * W > 0 else 0
    gt_buf = empty_like_format(teacher, teacher.shape, dtype=ct).zero_() if want_t and not det else None
    partials = torch.zeros((B, nprog if (want_src or want_params) else 0, 4 * n + 6), dtype=ct, device=dev)
    contrib = torch.empty((4, B * H * W, C) if det else (0,), dtype=ct, device=dev)
    rows = torch.empty((4, B * H * W) if det else (0,), dtype=torch.int64, device=dev)
    if not empty and (want_s or want_t or want_src or want_params):
        hull = hull_tolerances(Ht, Wt, ct, dev)
        g = grad_loss.to(ct)
        if reduction == "none":
            factor = g.reshape(B, H * W).contiguous()
        elif reduction == "sum":
            factor = g.reshape(1).contiguous()
        elif stats is not None:  # the forward's validity weights
            factor = (g.reshape(()) / _mean_denominator(stats[:, 4])).reshape(1)
        else:
            counts = torch.empty((B, nprog), dtype=ct, device=dev)
            with device_guard(student_logits):
                _warped_kl_fwd_kernel[(nprog, B)](
                    student_logits, teacher, src_c, par_c, counts, counts, hull, counts,
                    C, H, W, Ht, Wt, n, *student_logits.stride(), *teacher.stride(),
                    TEACHER_LOGITS=bool(teacher_is_logits), REDUCE_NONE=False, COUNT_ONLY=True, STATS=False,
                    ALIGN=bool(align_corners), BLOCK_P=PIXEL_BLOCK_BWD, ACC=tl_dtype(ct),
                    MERGED=merged_pixels(student_logits), num_warps=PIXEL_WARPS,
                )
            factor = (g.reshape(()) / _mean_denominator(counts)).reshape(1)
        gs = grad_s if want_s else student_logits
        gt = gt_buf if gt_buf is not None else teacher
        with device_guard(student_logits):
            _warped_kl_bwd_kernel[(nprog, B)](
                student_logits, teacher, src_c, par_c, factor, grad_s if want_s else factor,
                gt_buf if gt_buf is not None else factor, partials, contrib, rows, hull,
                stats if stats is not None else factor,
                C, H, W, Ht, Wt, n, *student_logits.stride(), *teacher.stride(), *gs.stride(), *gt.stride(),
                TEACHER_LOGITS=bool(teacher_is_logits), FACTOR_PER_PIXEL=reduction == "none",
                ALIGN=bool(align_corners), WANT_S=want_s, WANT_T=want_t, WANT_SRC=want_src,
                WANT_PARAMS=want_params, DETERMINISTIC=det, FROM_STATS=stats is not None, BLOCK_P=PIXEL_BLOCK_BWD,
                ACC=tl_dtype(ct), MERGED=merged_pixels(student_logits, gs), num_warps=PIXEL_WARPS,
            )
    else:
        if want_s:
            grad_s.zero_()
        if det:
            rows.fill_(B * Ht * Wt)
            contrib.zero_()
    if not want_t:
        grad_t = teacher.new_empty(0)
    else:
        grad_t = empty_like_format(teacher, teacher.shape)
        if det:
            summed = scatter_rows_deterministic(rows.reshape(-1), contrib.reshape(-1, C), B * Ht * Wt)
            grad_t.copy_(summed.reshape(B, Ht, Wt, C).permute(0, 3, 1, 2))
        elif gt_buf.dtype == grad_t.dtype and gt_buf.stride() == grad_t.stride():
            grad_t = gt_buf
        else:
            grad_t.copy_(gt_buf)
    g_src, g_params = tps_param_grads(partials, src, params, want_src, want_params)
    return grad_s, grad_t, g_src, g_params


# ----------------------------------------------------------------------------------------
# size=(H, W): the student and the teacher resized to (H, W) through the bilinear taps of
# F.interpolate, then the teacher warped; the warped teacher's sample is a bilinear of bilinears
# (4 warp taps x 4 resize taps per class), nothing of size B x C x H x W is allocated.
# ----------------------------------------------------------------------------------------
# The backward's first pass writes N_STATS values per output pixel, rows of a (B, N_STATS, H*W)
# buffer: s_max, log_zs, t_max, log_zt, p_sum, scale (0 at invalid pixels), px, py.
N_STATS = 8


@triton.jit
def _resized_warped_teacher(p, cm, ts_h, ts_w, xi, yi, ht, wt, sc_ty, sc_tx, w00, w10, w01, w11,
                            m00, m10, m01, m11, ACC: tl.constexpr):
    """Warped teacher: the four warp taps (top-left ``xi, yi`` in the (H, W) grid of the resized
    teacher, weights ``w..``, masks ``m..``), each the bilinear resize of the low-resolution teacher.
    ``p``/``cm``: one class's plane and a pixel mask (pixel vectors), or a column of planes and of
    class masks (tiles; see ``resized_value``)."""
    a0, a1, la0, la1 = resize_tap(yi, ht, sc_ty)
    b0, b1, lb0, lb1 = resize_tap(yi + 1, ht, sc_ty)
    e0, e1, le0, le1 = resize_tap(xi, wt, sc_tx)
    f0, f1, lf0, lf1 = resize_tap(xi + 1, wt, sc_tx)
    v00 = resized_value(p, cm & m00, ts_h, ts_w, a0, a1, la0, la1, e0, e1, le0, le1, ACC)
    v10 = resized_value(p, cm & m10, ts_h, ts_w, a0, a1, la0, la1, f0, f1, lf0, lf1, ACC)
    v01 = resized_value(p, cm & m01, ts_h, ts_w, b0, b1, lb0, lb1, e0, e1, le0, le1, ACC)
    v11 = resized_value(p, cm & m11, ts_h, ts_w, b0, b1, lb0, lb1, f0, f1, lf0, lf1, ACC)
    return w00 * v00 + w10 * v10 + w01 * v01 + w11 * v11


@triton.jit
def _resized_warped_fwd_kernel(
    s_ptr, t_ptr, src_ptr, par_ptr, f_ptr, out_ptr, cnt_ptr, hull_ptr, sc_ptr,
    C, H, W, hs, ws, ht, wt, n,
    ss_b, ss_c, ss_h, ss_w, ts_b, ts_c, ts_h, ts_w,
    TEACHER_LOGITS: tl.constexpr, REDUCE_NONE: tl.constexpr, STATS: tl.constexpr, FACTOR_PER_PIXEL: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr,
):
    """Over output pixels: the loss (per pixel or per-program partials) and the valid counts, or
    with ``STATS`` the backward's first pass (per-pixel statistics, scale and warp coordinates).
    One sweep over the classes (online statistics, as ``_warped_online_stats``)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    P = H * W
    pm = offs < P
    # the resized teacher has the output's grid: warp from (H, W) to (H, W)
    qx, qy, px, py = _coords(offs, b, H, W, H, W, src_ptr, par_ptr, n, ALIGN, ACC)
    valid = pm & in_hull(px, py, W, H, hull_ptr)
    part = b * tl.num_programs(0) + pid
    tl.store(cnt_ptr + part, tl.sum(valid.to(ACC), axis=0))
    wx0, wx1, wy0, wy1, m00, m10, m01, m11, xi, yi = _taps(px, py, W, H, valid)
    w00, w10, w01, w11 = _tap_weights(wx0, wx1, wy0, wy1, m00, m10, m01, m11)
    sc_ty = tl.load(sc_ptr + 2)
    sc_tx = tl.load(sc_ptr + 3)
    sr0, sr1, slr0, slr1 = resize_tap(offs // W, hs, tl.load(sc_ptr))
    sq0, sq1, slq0, slq1 = resize_tap(offs % W, ws, tl.load(sc_ptr + 1))
    s_base = s_ptr + b * ss_b
    t_base = t_ptr + b * ts_b
    s = resized_value(s_base, valid, ss_h, ss_w, sr0, sr1, slr0, slr1, sq0, sq1, slq0, slq1, ACC)
    t = _resized_warped_teacher(t_base, valid, ts_h, ts_w, xi, yi, ht, wt, sc_ty, sc_tx, w00, w10, w01, w11,
                                m00, m10, m01, m11, ACC)
    s_max, zs, t_max, zt, cross, p_log_p, p_sum = _online_first(s, t, TEACHER_LOGITS)
    for c in range(1, C):
        s = resized_value(s_base + c * ss_c, valid, ss_h, ss_w, sr0, sr1, slr0, slr1, sq0, sq1, slq0, slq1, ACC)
        t = _resized_warped_teacher(t_base + c * ts_c, valid, ts_h, ts_w, xi, yi, ht, wt, sc_ty, sc_tx,
                                    w00, w10, w01, w11, m00, m10, m01, m11, ACC)
        s_max, zs, t_max, zt, cross, p_log_p, p_sum = _online_update(s_max, zs, t_max, zt, cross, p_log_p, p_sum,
                                                                     s, t, TEACHER_LOGITS)
    log_zs, log_zt, kl, p_sum = _finish(zs, zt, cross, p_log_p, p_sum, valid, TEACHER_LOGITS)
    s_max = tl.where(valid, s_max, 0.0)
    t_max = tl.where(valid, t_max, 0.0)
    if STATS:
        if FACTOR_PER_PIXEL:
            scale = tl.load(f_ptr + b * P + offs, mask=pm, other=0.0).to(ACC)
        else:
            scale = tl.full((BLOCK_P,), 1.0, ACC)
        scale = tl.where(valid, scale, 0.0)
        st = out_ptr + b * (8 * P) + offs
        tl.store(st, s_max, mask=pm)
        tl.store(st + P, log_zs, mask=pm)
        tl.store(st + 2 * P, t_max, mask=pm)
        tl.store(st + 3 * P, log_zt, mask=pm)
        tl.store(st + 4 * P, p_sum, mask=pm)
        tl.store(st + 5 * P, scale, mask=pm)
        tl.store(st + 6 * P, px, mask=pm)
        tl.store(st + 7 * P, py, mask=pm)
    else:
        kl = tl.where(valid, kl, 0.0)
        if REDUCE_NONE:
            tl.store(out_ptr + b * P + offs, kl, mask=pm)
        else:
            tl.store(out_ptr + part, tl.sum(kl, axis=0))


@triton.jit
def _resized_warped_gather_kernel(
    s_ptr, t_ptr, st_ptr, f_ptr, sc_ptr, g_ptr,
    C, H, W, hs, ws, ht, wt, RY, RX,
    ss_b, ss_c, ss_h, ss_w, ts_b, ts_c, ts_h, ts_w, g_b, g_c, g_h, g_w,
    TEACHER_LOGITS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr,
):
    """Backward's second pass: the student gradient for a (classes x low-resolution pixels) tile,
    each pixel summing ``weight * dKL/d(resized student)`` over the output pixels that read it
    (``RY x RX`` candidates, weight 0 for the others); the warped teacher is recomputed there
    from the stored warp coordinates. A gather in a fixed order: no atomics, deterministic."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    c0 = tl.program_id(2) * BLOCK_C
    P = H * W
    sc_sy = tl.load(sc_ptr)
    sc_sx = tl.load(sc_ptr + 1)
    sc_ty = tl.load(sc_ptr + 2)
    sc_tx = tl.load(sc_ptr + 3)
    offs = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = offs < hs * ws
    y = offs // ws
    x = offs % ws
    by = readers_begin(y, sc_sy)
    bx = readers_begin(x, sc_sx)
    offs_c = tl.arange(0, BLOCK_C)
    s_base = s_ptr + b * ss_b
    t_planes = t_ptr + b * ts_b + (c0 + offs_c)[:, None] * ts_c
    cm = (c0 + offs_c < C)[:, None]
    st = st_ptr + b * (8 * P)
    factor = tl.load(f_ptr).to(ACC)
    acc = tl.zeros((BLOCK_C, BLOCK_P), ACC)
    for ky in range(RY):
        Y = by + ky
        sr0, sr1, slr0, slr1 = resize_tap(Y, hs, sc_sy)
        wy = resize_weight(sr0, sr1, slr0, slr1, y)
        row_ok = pm & (Y < H) & (wy != 0)
        for kx in range(RX):
            X = bx + kx
            sq0, sq1, slq0, slq1 = resize_tap(X, ws, sc_sx)
            wx = resize_weight(sq0, sq1, slq0, slq1, x)
            ok = row_ok & (X < W) & (wx != 0)
            pix = Y * W + X
            scale = tl.load(st + 5 * P + pix, mask=ok, other=0.0)
            live = ok & (scale != 0)
            s_max = tl.load(st + pix, mask=live, other=0.0)
            log_zs = tl.load(st + P + pix, mask=live, other=0.0)
            t_max = tl.load(st + 2 * P + pix, mask=live, other=0.0)
            log_zt = tl.load(st + 3 * P + pix, mask=live, other=0.0)
            p_sum = tl.load(st + 4 * P + pix, mask=live, other=0.0)
            px = tl.load(st + 6 * P + pix, mask=live, other=0.0)
            py = tl.load(st + 7 * P + pix, mask=live, other=0.0)
            wx0, wx1, wy0, wy1, m00, m10, m01, m11, xi, yi = _taps(px, py, W, H, live)
            s, m = resized_tile(s_base, c0, offs_c, C, ss_c, ss_h, ss_w, sr0, sr1, slr0, slr1, sq0, sq1, slq0, slq1,
                                live, ACC)
            w00, w10, w01, w11 = _tap_weights(wx0, wx1, wy0, wy1, m00, m10, m01, m11)
            t = _resized_warped_teacher(t_planes, cm, ts_h, ts_w, xi, yi, ht, wt, sc_ty, sc_tx, w00, w10, w01, w11,
                                        m00, m10, m01, m11, ACC)
            gs, _ = _tile_grads(s, t, m, s_max, log_zs, t_max, log_zt, tl.zeros_like(s_max), p_sum, scale * factor,
                                TEACHER_LOGITS)
            acc += (wy * wx)[None, :] * gs
    cc = (c0 + offs_c)[:, None]
    g_off = y * g_h + x * g_w
    tl.store(g_ptr + b * g_b + cc * g_c + g_off[None, :], cast_to(acc, g_ptr.dtype.element_ty),
             mask=(cc < C) & pm[None, :])


def _check_size(student, teacher, size):
    if len(size) != 2 or any(int(v) <= 0 for v in size):
        raise ValueError(f"warped_kl_div: `size` must be 2 positive ints (H, W), got {list(size)}")
    if student.shape[0] * student.shape[1] > 0 and (student.shape[2:].numel() == 0 or teacher.shape[2:].numel() == 0):
        raise ValueError("warped_kl_div: `size` cannot resize an input with an empty spatial dim")


def _is_identity(student, teacher, size) -> bool:
    return tuple(student.shape[2:]) == tuple(teacher.shape[2:]) == tuple(int(v) for v in size)


def _size_setup(student, teacher, src, params, size):
    ct, src_c, par_c = _setup(student, teacher, src, params)
    H, W = (int(v) for v in size)
    hs, ws = student.shape[2:]
    ht, wt = teacher.shape[2:]
    scales = resize_scales((hs, ws, ht, wt), (H, W, H, W), ct, student.device)
    return ct, src_c, par_c, H, W, hs, ws, ht, wt, scales


def warped_kl_div_size_forward(student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction,
                               size):
    """``size=(H, W)``: ``warped_kl_div(resize(student), resize(teacher), ...)`` in one pass."""
    _check(student_logits, teacher, src, params, reduction)
    _check_size(student_logits, teacher, size)
    if _is_identity(student_logits, teacher, size):
        return warped_kl_div_forward(student_logits, teacher, src, params, teacher_is_logits, align_corners,
                                     reduction)
    ct, src_c, par_c, H, W, hs, ws, ht, wt, scales = _size_setup(student_logits, teacher, src, params, size)
    B, C = student_logits.shape[:2]
    dev = student_logits.device
    out_dtype = acc_dtype(student_logits, teacher, params)
    if B * H * W == 0 or C == 0:
        kl = torch.zeros((B, H, W), dtype=out_dtype, device=dev)
        return kl if reduction == "none" else kl.sum()
    nprog = triton.cdiv(H * W, SIZED_PIXEL_BLOCK)
    reduce_none = reduction == "none"
    out = torch.empty((B, H * W) if reduce_none else (B, nprog), dtype=ct, device=dev)
    counts = torch.empty((B, nprog), dtype=ct, device=dev)
    with device_guard(student_logits):
        _resized_warped_fwd_kernel[(nprog, B)](
            student_logits, teacher, src_c, par_c, out, out, counts, hull_tolerances(H, W, ct, dev), scales,
            C, H, W, hs, ws, ht, wt, src.shape[1], *student_logits.stride(), *teacher.stride(),
            TEACHER_LOGITS=bool(teacher_is_logits), REDUCE_NONE=reduce_none, STATS=False, FACTOR_PER_PIXEL=False,
            ALIGN=bool(align_corners), BLOCK_P=SIZED_PIXEL_BLOCK, ACC=tl_dtype(ct), num_warps=PIXEL_WARPS,
        )
    if reduce_none:
        loss = out.reshape(B, H, W)
    else:
        total = out.sum()
        loss = total if reduction == "sum" else total / _mean_denominator(counts)
    return loss.to(out_dtype)


def _composed_grads(grad_loss, student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction,
                    size, output_mask):
    """Gradients w.r.t. teacher / src / params with ``size``: NOT native. They compose through the
    reference VJP of ``reference.warped_kl_div(resize(student), resize(teacher), src, params)``
    (resize = F.interpolate bilinear in the compute dtype; the contract's definition of ``size``),
    which allocates the resized tensors. The student gradient (the main path) is native."""
    import torch.nn.functional as F

    from ..ops._common import reference_vjp
    from ..reference import warped_kl_div as reference_warped_kl_div
    from ..reference._tps_math import compute_dtype

    ct = compute_dtype(student_logits, teacher, params)
    hw = tuple(int(v) for v in size)

    def resize(x):
        x = x.to(ct)
        return x if tuple(x.shape[2:]) == hw else F.interpolate(x, size=hw, mode="bilinear", align_corners=False)

    def loss(s, t, c, p):
        return reference_warped_kl_div(resize(s), resize(t), c, p, teacher_is_logits=bool(teacher_is_logits),
                                       align_corners=bool(align_corners), reduction=reduction)

    return reference_vjp(loss, (student_logits, teacher, src, params), grad_loss, [False, *output_mask[1:]])


def warped_kl_div_size_backward(grad_loss, student_logits, teacher, src, params, teacher_is_logits, align_corners,
                                reduction, size, output_mask):
    """Gradients with ``size=(H, W)``. Student: native, pass 1 writes per-output-pixel statistics
    and warp coordinates (``8 x B x H x W``), pass 2 gathers each low-resolution student pixel's
    gradient over the output pixels that read it (deterministic, no atomics). Teacher, src and
    params: composed through the reference VJP (``_composed_grads``)."""
    _check(student_logits, teacher, src, params, reduction)
    _check_size(student_logits, teacher, size)
    if _is_identity(student_logits, teacher, size):
        return warped_kl_div_backward(grad_loss, student_logits, teacher, src, params, teacher_is_logits,
                                      align_corners, reduction, None, output_mask)
    want_s, want_t, want_src, want_params = (bool(x) for x in output_mask)
    grad_t, g_src, g_params = teacher.new_empty(0), src.new_empty(0), params.new_empty(0)
    if want_t or want_src or want_params:
        composed = _composed_grads(grad_loss, student_logits, teacher, src, params, teacher_is_logits,
                                   align_corners, reduction, size, output_mask)
        if want_t:  # the layout the fake kernel promises
            grad_t = empty_like_format(teacher, teacher.shape).copy_(composed[1])
        if want_src:
            g_src = composed[2].contiguous()
        if want_params:
            g_params = composed[3].contiguous()
    if not want_s:
        return student_logits.new_empty(0), grad_t, g_src, g_params
    grad_s = torch.empty_like(student_logits)
    ct, src_c, par_c, H, W, hs, ws, ht, wt, scales = _size_setup(student_logits, teacher, src, params, size)
    B, C = student_logits.shape[:2]
    dev = student_logits.device
    if B * H * W == 0 or C == 0:
        return grad_s.zero_(), grad_t, g_src, g_params
    block_c = _class_block(C)
    nprog = triton.cdiv(H * W, SIZED_PIXEL_BLOCK)
    g = grad_loss.to(ct)
    per_pixel = g.reshape(B, H * W).contiguous() if reduction == "none" else None
    stats = torch.empty((B, N_STATS, H * W), dtype=ct, device=dev)
    counts = torch.empty((B, nprog), dtype=ct, device=dev)
    with device_guard(student_logits):
        _resized_warped_fwd_kernel[(nprog, B)](
            student_logits, teacher, src_c, par_c, per_pixel if per_pixel is not None else stats, stats, counts,
            hull_tolerances(H, W, ct, dev), scales,
            C, H, W, hs, ws, ht, wt, src.shape[1], *student_logits.stride(), *teacher.stride(),
            TEACHER_LOGITS=bool(teacher_is_logits), REDUCE_NONE=False, STATS=True,
            FACTOR_PER_PIXEL=per_pixel is not None, ALIGN=bool(align_corners), BLOCK_P=SIZED_PIXEL_BLOCK,
            ACC=tl_dtype(ct), num_warps=PIXEL_WARPS,
        )
        if reduction == "none":
            factor = torch.ones(1, dtype=ct, device=dev)
        elif reduction == "sum":
            factor = g.reshape(1).contiguous()
        else:
            factor = (g.reshape(()) / _mean_denominator(counts)).reshape(1)
        bp = max(16, min(256, TILE_ELEMS // block_c // 4))
        _resized_warped_gather_kernel[(triton.cdiv(hs * ws, bp), B, triton.cdiv(C, block_c))](
            student_logits, teacher, stats, factor, scales, grad_s,
            C, H, W, hs, ws, ht, wt, reader_span(hs, H), reader_span(ws, W),
            *student_logits.stride(), *teacher.stride(), *grad_s.stride(),
            TEACHER_LOGITS=bool(teacher_is_logits), BLOCK_C=block_c, BLOCK_P=bp, ACC=tl_dtype(ct),
            num_warps=NUM_WARPS,
        )
    return grad_s, grad_t, g_src, g_params


register_python_backend("warped_kl_div", "triton", warped_kl_div_forward, warped_kl_div_backward,
                        {"_warped_kl_div_with_stats": warped_kl_div_with_stats,
                         "_warped_kl_div_backward_stats": warped_kl_div_backward_stats})
