"""Triton kernels of ``tpswarp::warped_kl_div`` and its backward: the paper's Eq. 3-4 in one pass.

Per student pixel: evaluate the TPS map, sample the teacher bilinearly (zero padding) at the
four taps for every class, and take the masked KL of ``masked_kl_div`` (the same device
functions: max sweep, shifted sums, ``kl.h`` gradients) over the pixels whose sample lies in
the teacher's pixel-centre hull. Nothing of size ``B x C x H x W`` is allocated besides the
gradients: the warped teacher lives only in registers, in the compute dtype (float32 for half
inputs, as the reference warps ``teacher.to(compute dtype)``).

Backward: the student gradient is written directly; the gradient w.r.t. the warped teacher is
scattered to the four taps of the teacher (float atomics; under
``torch.use_deterministic_algorithms(True)`` per-tap contributions summed by a deterministic
``index_add_`` instead, which does allocate ``4 x B*H*W x C``); the coordinate gradient goes
through the TPS map into per-program partials summed by torch (deterministic). The mean's
denominator (the number of valid pixels) is counted on the device: per-program counts summed
by torch, no host synchronization.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import register_python_backend
from ._utils import (INTERPRET, acc_dtype, cast_to, deterministic, device_guard, empty_like_format, hull_tolerances,
                     in_hull, merged_pixels, next_pow2, pixel_offsets, scatter_rows_deterministic, tl_dtype,
                     tps_backward_partials, tps_param_grads)
from .masked_kl_div import _finish, _tile, _tile_grads, _tile_stats, _tile_sums
from .tps_warp import _coords

MAX_BLOCK_C = 64
TILE_ELEMS = 2048 if not INTERPRET else 16384
NUM_WARPS = 8  # six (classes x pixels) tiles live in the backward


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
def _teacher_tile(t_base, c0, offs_c, C, ts_c, ts_h, ts_w, t_off, valid, wx0, wx1, wy0, wy1,
                  m00, m10, m01, m11, ACC: tl.constexpr):
    """Warped teacher (classes x pixels) in the compute dtype, and the four tap tiles."""
    cc = c0 + offs_c
    cm = (cc < C)[:, None]
    p = t_base + cc[:, None] * ts_c + t_off[None, :]
    v00 = tl.load(p, mask=cm & m00[None, :], other=0.0).to(ACC)
    v10 = tl.load(p + ts_w, mask=cm & m10[None, :], other=0.0).to(ACC)
    v01 = tl.load(p + ts_h, mask=cm & m01[None, :], other=0.0).to(ACC)
    v11 = tl.load(p + ts_h + ts_w, mask=cm & m11[None, :], other=0.0).to(ACC)
    w00 = tl.where(m00, wx0 * wy0, 0.0)[None, :]
    w10 = tl.where(m10, wx1 * wy0, 0.0)[None, :]
    w01 = tl.where(m01, wx0 * wy1, 0.0)[None, :]
    w11 = tl.where(m11, wx1 * wy1, 0.0)[None, :]
    t = w00 * v00 + w10 * v10 + w01 * v01 + w11 * v11
    return t, cm & valid[None, :], v00, v10, v01, v11


@triton.jit
def _student_tile(s_base, c0, offs_c, C, ss_c, s_pix, pm, valid, ACC: tl.constexpr):
    """Student logits (classes x pixels), loaded for every pixel in range (contiguous pixels then
    vectorize); the returned mask keeps the valid ones."""
    s, m = _tile(s_base, c0, offs_c, C, ss_c, s_pix, pm, ACC)
    return s, m & valid[None, :]


@triton.jit
def _warped_chunked_stats(s_base, ss_c, s_pix, pm, t_base, ts_c, ts_h, ts_w, t_off, valid, C, offs_c,
                          wx0, wx1, wy0, wy1, m00, m10, m01, m11, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                          TEACHER_LOGITS: tl.constexpr, ACC: tl.constexpr):
    s_max = tl.full((BLOCK_P,), float("-inf"), ACC)
    t_max = tl.full((BLOCK_P,), float("-inf"), ACC)
    for c0 in range(0, C, BLOCK_C):
        s, m = _student_tile(s_base, c0, offs_c, C, ss_c, s_pix, pm, valid, ACC)
        s_max = tl.maximum(s_max, tl.max(tl.where(m, s, float("-inf")), axis=0))
        if TEACHER_LOGITS:
            t, _, _, _, _, _ = _teacher_tile(t_base, c0, offs_c, C, ts_c, ts_h, ts_w, t_off, valid,
                                             wx0, wx1, wy0, wy1, m00, m10, m01, m11, ACC)
            t_max = tl.maximum(t_max, tl.max(tl.where(m, t, float("-inf")), axis=0))
    s_max = tl.where(valid, s_max, 0.0)
    t_max = tl.where(valid, t_max, 0.0)
    zs = tl.zeros((BLOCK_P,), ACC)
    zt = tl.zeros((BLOCK_P,), ACC)
    cross = tl.zeros((BLOCK_P,), ACC)
    p_log_p = tl.zeros((BLOCK_P,), ACC)
    p_sum = tl.zeros((BLOCK_P,), ACC)
    for c0 in range(0, C, BLOCK_C):
        s, m = _student_tile(s_base, c0, offs_c, C, ss_c, s_pix, pm, valid, ACC)
        t, _, _, _, _, _ = _teacher_tile(t_base, c0, offs_c, C, ts_c, ts_h, ts_w, t_off, valid,
                                         wx0, wx1, wy0, wy1, m00, m10, m01, m11, ACC)
        a, b, c, d, e = _tile_sums(s, t, m, s_max, t_max, TEACHER_LOGITS)
        zs += a
        zt += b
        cross += c
        p_log_p += d
        p_sum += e
    log_zs, log_zt, kl, p_sum = _finish(zs, zt, cross, p_log_p, p_sum, valid, TEACHER_LOGITS)
    return s_max, log_zs, t_max, log_zt, kl, p_sum


@triton.jit
def _warped_kl_fwd_kernel(
    s_ptr, t_ptr, src_ptr, par_ptr, out_ptr, cnt_ptr, hull_ptr,
    C, H, W, Ht, Wt, n,
    ss_b, ss_c, ss_h, ss_w, ts_b, ts_c, ts_h, ts_w,
    TEACHER_LOGITS: tl.constexpr, REDUCE_NONE: tl.constexpr, COUNT_ONLY: tl.constexpr, ALIGN: tl.constexpr,
    SINGLE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr, MERGED: tl.constexpr,
):
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
        t_base = t_ptr + b * ts_b
        t_off = yi * ts_h + xi * ts_w
        s_base = s_ptr + b * ss_b
        s_pix = pixel_offsets(offs, W, ss_h, ss_w, MERGED)
        offs_c = tl.arange(0, BLOCK_C)
        if SINGLE:
            s, m = _student_tile(s_base, 0, offs_c, C, ss_c, s_pix, pm, valid, ACC)
            t, _, _, _, _, _ = _teacher_tile(t_base, 0, offs_c, C, ts_c, ts_h, ts_w, t_off, valid,
                                             wx0, wx1, wy0, wy1, m00, m10, m01, m11, ACC)
            s_max, log_zs, t_max, log_zt, kl, p_sum = _tile_stats(s, t, m, valid, TEACHER_LOGITS)
        else:
            s_max, log_zs, t_max, log_zt, kl, p_sum = _warped_chunked_stats(
                s_base, ss_c, s_pix, pm, t_base, ts_c, ts_h, ts_w, t_off, valid, C, offs_c,
                wx0, wx1, wy0, wy1, m00, m10, m01, m11, BLOCK_C, BLOCK_P, TEACHER_LOGITS, ACC)
        kl = tl.where(valid, kl, 0.0)
        if REDUCE_NONE:
            tl.store(out_ptr + b * P + offs, kl, mask=pm)
        else:
            tl.store(out_ptr + part, tl.sum(kl, axis=0))


@triton.jit
def _grad_chunk(s, t, m, v00, v10, v01, v11, s_max, log_zs, t_max, log_zt, kl, p_sum, scale, c0, offs_c, C,
                gs_base, gs_c, gs_pix, gt_base, gt_c, gt_h, gt_w, gt_off, ct_ptr, row, PT, pm,
                wx0, wx1, wy0, wy1, m00, m10, m01, m11, gpx, gpy,
                TEACHER_LOGITS: tl.constexpr, WANT_S: tl.constexpr, WANT_T: tl.constexpr,
                WANT_COORDS: tl.constexpr, DETERMINISTIC: tl.constexpr):
    gs, gt = _tile_grads(s, t, m, s_max, log_zs, t_max, log_zt, kl, p_sum, scale, TEACHER_LOGITS)
    cc = (c0 + offs_c)[:, None]
    if WANT_S:  # invalid pixels get exact zeros
        tl.store(gs_base + cc * gs_c + gs_pix[None, :], cast_to(gs, gs_base.dtype.element_ty),
                 mask=(cc < C) & pm[None, :])
    if WANT_T:
        w00 = tl.where(m00, wx0 * wy0, 0.0)[None, :]
        w10 = tl.where(m10, wx1 * wy0, 0.0)[None, :]
        w01 = tl.where(m01, wx0 * wy1, 0.0)[None, :]
        w11 = tl.where(m11, wx1 * wy1, 0.0)[None, :]
        if DETERMINISTIC:
            cm = (cc < C) & pm[None, :]
            r = row[None, :]
            tl.store(ct_ptr + r * C + cc, w00 * gt, mask=cm)
            tl.store(ct_ptr + (PT + r) * C + cc, w10 * gt, mask=cm)
            tl.store(ct_ptr + (2 * PT + r) * C + cc, w01 * gt, mask=cm)
            tl.store(ct_ptr + (3 * PT + r) * C + cc, w11 * gt, mask=cm)
        else:
            p = gt_base + cc * gt_c + gt_off[None, :]
            tl.atomic_add(p, w00 * gt, mask=m & m00[None, :])
            tl.atomic_add(p + gt_w, w10 * gt, mask=m & m10[None, :])
            tl.atomic_add(p + gt_h, w01 * gt, mask=m & m01[None, :])
            tl.atomic_add(p + gt_h + gt_w, w11 * gt, mask=m & m11[None, :])
    if WANT_COORDS:
        g = tl.where(m, gt, 0.0)
        gpx += tl.sum(g * (wy0[None, :] * (v10 - v00) + wy1[None, :] * (v11 - v01)), axis=0)
        gpy += tl.sum(g * (wx0[None, :] * (v01 - v00) + wx1[None, :] * (v11 - v10)), axis=0)
    return gpx, gpy


@triton.jit
def _warped_kl_bwd_kernel(
    s_ptr, t_ptr, src_ptr, par_ptr, f_ptr, gs_ptr, gt_ptr, part_ptr, ct_ptr, ci_ptr, hull_ptr,
    C, H, W, Ht, Wt, n,
    ss_b, ss_c, ss_h, ss_w, ts_b, ts_c, ts_h, ts_w, gs_b, gs_c, gs_h, gs_w, gt_b, gt_c, gt_h, gt_w,
    TEACHER_LOGITS: tl.constexpr, FACTOR_PER_PIXEL: tl.constexpr, ALIGN: tl.constexpr,
    WANT_S: tl.constexpr, WANT_T: tl.constexpr, WANT_SRC: tl.constexpr, WANT_PARAMS: tl.constexpr,
    DETERMINISTIC: tl.constexpr, SINGLE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ACC: tl.constexpr, MERGED: tl.constexpr,
):
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
    wx0, wx1, wy0, wy1, m00, m10, m01, m11, xi, yi = _taps(px, py, Wt, Ht, valid)
    row = b * P + offs
    if WANT_T and DETERMINISTIC:
        dropped = Ht * Wt * tl.num_programs(1)
        base = b * Ht * Wt + yi * Wt + xi
        tl.store(ci_ptr + row, tl.where(m00, base, dropped), mask=pm)
        tl.store(ci_ptr + PT + row, tl.where(m10, base + 1, dropped), mask=pm)
        tl.store(ci_ptr + 2 * PT + row, tl.where(m01, base + Wt, dropped), mask=pm)
        tl.store(ci_ptr + 3 * PT + row, tl.where(m11, base + Wt + 1, dropped), mask=pm)
    t_base = t_ptr + b * ts_b
    t_off = yi * ts_h + xi * ts_w
    s_base = s_ptr + b * ss_b
    s_pix = pixel_offsets(offs, W, ss_h, ss_w, MERGED)
    gs_base = gs_ptr + b * gs_b
    gs_pix = pixel_offsets(offs, W, gs_h, gs_w, MERGED)
    gt_base = gt_ptr + b * gt_b
    gt_off = yi * gt_h + xi * gt_w
    offs_c = tl.arange(0, BLOCK_C)
    gpx = tl.zeros((BLOCK_P,), ACC)
    gpy = tl.zeros((BLOCK_P,), ACC)
    WANT_COORDS: tl.constexpr = WANT_SRC or WANT_PARAMS
    if SINGLE:
        s, m = _student_tile(s_base, 0, offs_c, C, ss_c, s_pix, pm, valid, ACC)
        t, _, v00, v10, v01, v11 = _teacher_tile(t_base, 0, offs_c, C, ts_c, ts_h, ts_w, t_off, valid,
                                                 wx0, wx1, wy0, wy1, m00, m10, m01, m11, ACC)
        s_max, log_zs, t_max, log_zt, kl, p_sum = _tile_stats(s, t, m, valid, TEACHER_LOGITS)
        gpx, gpy = _grad_chunk(s, t, m, v00, v10, v01, v11, s_max, log_zs, t_max, log_zt, kl, p_sum, scale,
                               0, offs_c, C, gs_base, gs_c, gs_pix, gt_base, gt_c, gt_h, gt_w, gt_off, ct_ptr, row,
                               PT, pm, wx0, wx1, wy0, wy1, m00, m10, m01, m11, gpx, gpy,
                               TEACHER_LOGITS, WANT_S, WANT_T, WANT_COORDS, DETERMINISTIC)
    else:
        s_max, log_zs, t_max, log_zt, kl, p_sum = _warped_chunked_stats(
            s_base, ss_c, s_pix, pm, t_base, ts_c, ts_h, ts_w, t_off, valid, C, offs_c,
            wx0, wx1, wy0, wy1, m00, m10, m01, m11, BLOCK_C, BLOCK_P, TEACHER_LOGITS, ACC)
        for c0 in range(0, C, BLOCK_C):
            s, m = _student_tile(s_base, c0, offs_c, C, ss_c, s_pix, pm, valid, ACC)
            t, _, v00, v10, v01, v11 = _teacher_tile(t_base, c0, offs_c, C, ts_c, ts_h, ts_w, t_off, valid,
                                                     wx0, wx1, wy0, wy1, m00, m10, m01, m11, ACC)
            gpx, gpy = _grad_chunk(s, t, m, v00, v10, v01, v11, s_max, log_zs, t_max, log_zt, kl, p_sum, scale,
                                   c0, offs_c, C, gs_base, gs_c, gs_pix, gt_base, gt_c, gt_h, gt_w, gt_off, ct_ptr,
                                   row, PT, pm, wx0, wx1, wy0, wy1, m00, m10, m01, m11, gpx, gpy,
                                   TEACHER_LOGITS, WANT_S, WANT_T, WANT_COORDS, DETERMINISTIC)
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


def _blocks(C: int):
    block_c = min(next_pow2(max(C, 1)), MAX_BLOCK_C)
    block_p = max(16, min(256 if not INTERPRET else 4096, TILE_ELEMS // block_c))
    return block_c, block_p, C <= block_c


def _setup(student, teacher, src, params):
    ct = acc_dtype(student, teacher, src, params)
    return ct, src.to(ct).contiguous(), params.to(ct).contiguous()


def _mean_denominator(counts):
    count = counts.sum()
    return torch.where(count != 0, count, torch.ones_like(count))


def warped_kl_div_forward(student_logits, teacher, src, params, teacher_is_logits=False, align_corners=False,
                          reduction="mean", size=None):
    if size is not None:
        raise NotImplementedError("warped_kl_div: `size` is not supported by this backend in this branch")
    _check(student_logits, teacher, src, params, reduction)
    ct, src_c, par_c = _setup(student_logits, teacher, src, params)
    B, C, H, W = student_logits.shape
    Ht, Wt = teacher.shape[2:]
    dev = student_logits.device
    if B * H * W == 0 or C == 0 or Ht * Wt == 0:
        kl = torch.zeros((B, H, W), dtype=acc_dtype(student_logits, teacher, params), device=dev)
        return kl if reduction == "none" else kl.sum()
    block_c, block_p, single = _blocks(C)
    nprog = triton.cdiv(H * W, block_p)
    reduce_none = reduction == "none"
    out = torch.empty((B, H * W) if reduce_none else (B, nprog), dtype=ct, device=dev)
    counts = torch.empty((B, nprog), dtype=ct, device=dev)
    with device_guard(student_logits):
        _warped_kl_fwd_kernel[(nprog, B)](
            student_logits, teacher, src_c, par_c, out, counts, hull_tolerances(Ht, Wt, ct, dev),
            C, H, W, Ht, Wt, src.shape[1], *student_logits.stride(), *teacher.stride(),
            TEACHER_LOGITS=bool(teacher_is_logits), REDUCE_NONE=reduce_none, COUNT_ONLY=False,
            ALIGN=bool(align_corners), SINGLE=single, BLOCK_C=block_c, BLOCK_P=block_p, ACC=tl_dtype(ct),
            MERGED=merged_pixels(student_logits), num_warps=NUM_WARPS,
        )
    if reduce_none:
        loss = out.reshape(B, H, W)
    else:
        total = out.sum()
        loss = total if reduction == "sum" else total / _mean_denominator(counts)
    return loss.to(acc_dtype(student_logits, teacher, params))  # the fake kernel's dtype


def warped_kl_div_backward(grad_loss, student_logits, teacher, src, params, teacher_is_logits, align_corners,
                           reduction, size, output_mask):
    if size is not None:
        raise NotImplementedError("warped_kl_div: `size` is not supported by this backend in this branch")
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
    block_c, block_p, single = _blocks(C)
    nprog = triton.cdiv(H * W, block_p) if H * W > 0 else 0
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
        else:
            counts = torch.empty((B, nprog), dtype=ct, device=dev)
            with device_guard(student_logits):
                _warped_kl_fwd_kernel[(nprog, B)](
                    student_logits, teacher, src_c, par_c, counts, counts, hull,
                    C, H, W, Ht, Wt, n, *student_logits.stride(), *teacher.stride(),
                    TEACHER_LOGITS=bool(teacher_is_logits), REDUCE_NONE=False, COUNT_ONLY=True,
                    ALIGN=bool(align_corners), SINGLE=single, BLOCK_C=block_c, BLOCK_P=block_p, ACC=tl_dtype(ct),
                    MERGED=merged_pixels(student_logits), num_warps=NUM_WARPS,
                )
            factor = (g.reshape(()) / _mean_denominator(counts)).reshape(1)
        gs = grad_s if want_s else student_logits
        gt = gt_buf if gt_buf is not None else teacher
        with device_guard(student_logits):
            _warped_kl_bwd_kernel[(nprog, B)](
                student_logits, teacher, src_c, par_c, factor, grad_s if want_s else factor,
                gt_buf if gt_buf is not None else factor, partials, contrib, rows, hull,
                C, H, W, Ht, Wt, n, *student_logits.stride(), *teacher.stride(), *gs.stride(), *gt.stride(),
                TEACHER_LOGITS=bool(teacher_is_logits), FACTOR_PER_PIXEL=reduction == "none",
                ALIGN=bool(align_corners), WANT_S=want_s, WANT_T=want_t, WANT_SRC=want_src,
                WANT_PARAMS=want_params, DETERMINISTIC=det, SINGLE=single, BLOCK_C=block_c, BLOCK_P=block_p,
                ACC=tl_dtype(ct), MERGED=merged_pixels(student_logits, gs), num_warps=NUM_WARPS,
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


register_python_backend("warped_kl_div", "triton", warped_kl_div_forward, warped_kl_div_backward)
