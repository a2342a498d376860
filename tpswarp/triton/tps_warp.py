"""Triton kernels of ``tpswarp::tps_warp`` and its backward.

Forward: one program handles up to ``BLOCK`` output pixels of one row of one batch item: the TPS map
is evaluated per pixel (the grid is never materialized), then the image is sampled (bilinear or
nearest, padding zeros/border/reflection, ``fill`` outside) channel by channel through its strides.
The backward's programs take ``BLOCK`` consecutive pixels of an item's flattened output.

Backward:
- w.r.t. ``params`` and ``src``: per-pixel coordinate gradients through the bilinear weights,
  the padding remap and the TPS map (``tps.h``), summed per program into a partials buffer
  that torch reduces in a fixed order (deterministic, no atomics).
- w.r.t. ``image`` (a scatter): float atomics into a float32/float64 buffer. Under
  ``torch.use_deterministic_algorithms(True)`` the kernel instead writes each tap's
  contribution and target row, and ``index_add_`` (deterministic on CUDA in that mode) sums
  them: deterministic, at the cost of a ``(taps, B * Ho * Wo, C)`` buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import register_python_backend
from ._utils import (INTERPRET, acc_dtype, cast_to, deterministic, device_guard, empty_like_format, hull_tolerances,
                     in_hull, merged_pixels, next_pow2, normalized_to_pixel, pixel_offsets, pixel_to_normalized,
                     scatter_rows_deterministic, tl_dtype, tps_backward_partials, tps_eval, tps_param_grads)

# Output pixels per program, one per thread (4 warps): the gathers and the contiguous loads and stores
# then share one layout, with no layout conversion through shared memory (which 2 pixels per thread
# cost: 19 barriers in the sm_90 forward, benchmarks/kernel_resources.py).
BLOCK = 128 if not INTERPRET else 4096
_PADDING = {"zeros": 0, "border": 1, "reflection": 2}
_MODES = ("bilinear", "nearest")


@triton.jit
def _source_coord(u, size, PAD: tl.constexpr, ALIGN: tl.constexpr):
    """Padding remap of the pixel coordinate ``u`` (reference ``source_coordinates``) and its derivative."""
    hi = size - 1.0
    if PAD == 0:
        p = u
        d = tl.full(u.shape, 1.0, u.dtype)
    elif PAD == 1:
        p = tl.minimum(tl.maximum(u, 0.0), hi)
        d = tl.where((u > 0.0) & (u < hi), 1.0, 0.0)
    else:
        if ALIGN:
            lo = 0.0
            span = size - 1.0
        else:
            lo = -0.5
            span = size * 1.0
        ok = span > 0
        safe = tl.where(ok, span, 1.0)
        x = u - lo
        c = tl.abs(x)
        flips = tl.floor(c / safe)
        extra = c - flips * safe
        even = (flips - 2.0 * tl.floor(flips / 2.0)) == 0.0
        r = tl.where(ok, tl.where(even, extra + lo, safe - extra + lo), 0.0)
        sgn = tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0))
        dr = tl.where(ok, tl.where(even, sgn, -sgn), 0.0)
        p = tl.minimum(tl.maximum(r, 0.0), hi)
        d = tl.where((r > 0.0) & (r < hi), dr, 0.0)
    return p, d


@triton.jit
def _round_half_even(p):
    fl = tl.floor(p)
    diff = p - fl
    odd = (fl - 2.0 * tl.floor(fl / 2.0)) != 0.0
    return tl.where((diff > 0.5) | ((diff == 0.5) & odd), fl + 1.0, fl)


@triton.jit
def _coords(offs, b, Ho, Wo, H, W, src_ptr, par_ptr, n, ALIGN: tl.constexpr, ACC: tl.constexpr):
    """Output pixel -> normalized q -> f(q) -> raw pixel coordinates (px, py) in the input."""
    i = offs // Wo
    j = offs % Wo
    qx = pixel_to_normalized(j.to(ACC), Wo, ALIGN)
    qy = pixel_to_normalized(i.to(ACC), Ho, ALIGN)
    fx, fy = tps_eval(qx, qy, src_ptr + b * (2 * n), par_ptr + b * (2 * n + 6), n)
    px = normalized_to_pixel(fx, W, ALIGN)
    py = normalized_to_pixel(fy, H, ALIGN)
    return qx, qy, px, py


@triton.jit
def _tps_warp_fwd_kernel(
    img_ptr, src_ptr, par_ptr, out_ptr, valid_ptr, fill_ptr, hull_ptr,
    C, H, W, Ho, Wo, n,
    is_b, is_c, is_h, is_w, os_b, os_c, os_h, os_w,
    NEAREST: tl.constexpr, PAD: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
    ACC: tl.constexpr,
):
    # A program takes a ROWS x BLOCK tile of the output (grid: column blocks, row blocks, items; ROWS = 1
    # on the GPU up to 65535 rows; more under the interpreter, where each program costs Python calls):
    # rows and columns come from the program and lane indices, not from dividing a flat pixel index.
    b = tl.program_id(2).to(tl.int64)
    i = tl.program_id(1) * ROWS + tl.arange(0, ROWS)[:, None]
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)[None, :]
    pm = (i < Ho) & (j < Wo)
    qy = pixel_to_normalized(i.to(ACC), Ho, ALIGN)
    qx = tl.broadcast_to(pixel_to_normalized(j.to(ACC), Wo, ALIGN), (ROWS, BLOCK))
    fx, fy = tps_eval(qx, qy, src_ptr + b * (2 * n), par_ptr + b * (2 * n + 6), n)
    px_raw = normalized_to_pixel(fx, W, ALIGN)
    py_raw = normalized_to_pixel(fy, H, ALIGN)
    valid = in_hull(px_raw, py_raw, W, H, hull_ptr)
    tl.store(valid_ptr + (b * Ho + i) * Wo + j, valid, mask=pm)
    px, _ = _source_coord(px_raw, W, PAD, ALIGN)
    py, _ = _source_coord(py_raw, H, PAD, ALIGN)
    ib = img_ptr + b * is_b
    o_off = b * os_b + i.to(tl.int64) * os_h + j * os_w
    ty = out_ptr.dtype.element_ty
    if NEAREST:
        fx = _round_half_even(px)
        fy = _round_half_even(py)
        inside = pm & (fx >= 0.0) & (fx <= W - 1.0) & (fy >= 0.0) & (fy <= H - 1.0)
        t_off = tl.where(inside, fy, 0.0).to(tl.int32) * is_h + tl.where(inside, fx, 0.0).to(tl.int32) * is_w
        fill_v = tl.load(fill_ptr)
        for c in range(C):
            v = tl.load(ib + c * is_c + t_off, mask=inside, other=0)
            tl.store(out_ptr + o_off + c * os_c, tl.where(inside, v, fill_v).to(ty), mask=pm)
    else:
        fill = tl.load(fill_ptr)
        x0 = tl.floor(px)
        y0 = tl.floor(py)
        wx1 = px - x0
        wy1 = py - y0
        wx0 = 1.0 - wx1
        wy0 = 1.0 - wy1
        in_x0 = (x0 >= 0.0) & (x0 <= W - 1.0)
        in_x1 = (x0 + 1.0 >= 0.0) & (x0 + 1.0 <= W - 1.0)
        in_y0 = pm & (y0 >= 0.0) & (y0 <= H - 1.0)
        in_y1 = pm & (y0 + 1.0 >= 0.0) & (y0 + 1.0 <= H - 1.0)
        m00 = in_x0 & in_y0
        m10 = in_x1 & in_y0
        m01 = in_x0 & in_y1
        m11 = in_x1 & in_y1
        xi = tl.where(in_x0 | in_x1, x0, 0.0).to(tl.int32)
        yi = tl.where(in_y0 | in_y1, y0, 0.0).to(tl.int32)
        o00 = yi * is_h + xi * is_w
        w00 = tl.where(m00, wx0 * wy0, 0.0)
        w10 = tl.where(m10, wx1 * wy0, 0.0)
        w01 = tl.where(m01, wx0 * wy1, 0.0)
        w11 = tl.where(m11, wx1 * wy1, 0.0)
        # fill (1 - sum_k w_k) + sum_k w_k v_k: the reference's fill + sum_k w_k (v_k - fill) up to
        # rounding (exactly for fill = 0), with the fill term formed once per pixel
        rest = fill * (1.0 - ((w00 + w10) + (w01 + w11)))
        for c in range(C):
            cb = ib + c * is_c + o00
            v00 = tl.load(cb, mask=m00, other=0.0).to(ACC)
            v10 = tl.load(cb + is_w, mask=m10, other=0.0).to(ACC)
            v01 = tl.load(cb + is_h, mask=m01, other=0.0).to(ACC)
            v11 = tl.load(cb + is_h + is_w, mask=m11, other=0.0).to(ACC)
            acc = w00 * v00 + w10 * v10 + w01 * v01 + w11 * v11 + rest
            tl.store(out_ptr + o_off + c * os_c, cast_to(acc, ty), mask=pm)


@triton.jit
def _tps_warp_bwd_kernel(
    go_ptr, img_ptr, src_ptr, par_ptr, gi_ptr, part_ptr, ct_ptr, ci_ptr, fill_ptr,
    C, H, W, Ho, Wo, n,
    gs_b, gs_c, gs_h, gs_w, is_b, is_c, is_h, is_w, gis_b, gis_c, gis_h, gis_w,
    NEAREST: tl.constexpr, PAD: tl.constexpr, ALIGN: tl.constexpr,
    WANT_IMAGE: tl.constexpr, WANT_SRC: tl.constexpr, WANT_PARAMS: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK: tl.constexpr, ACC: tl.constexpr, MERGED: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    P = Ho * Wo
    pm = offs < P
    qx, qy, px_raw, py_raw = _coords(offs, b, Ho, Wo, H, W, src_ptr, par_ptr, n, ALIGN, ACC)
    px, dpx = _source_coord(px_raw, W, PAD, ALIGN)
    py, dpy = _source_coord(py_raw, H, PAD, ALIGN)
    g_off = b * gs_b + pixel_offsets(offs, Wo, gs_h, gs_w, MERGED)
    ib = img_ptr + b * is_b
    gib = gi_ptr + b * gis_b
    row = b * P + offs  # this pixel's row of the deterministic contribution buffers
    dropped = H * W * tl.num_programs(1)
    if NEAREST:
        fx = _round_half_even(px)
        fy = _round_half_even(py)
        inside = pm & (fx >= 0.0) & (fx <= W - 1.0) & (fy >= 0.0) & (fy <= H - 1.0)
        xi = tl.where(inside, fx, 0.0).to(tl.int32)
        yi = tl.where(inside, fy, 0.0).to(tl.int32)
        if DETERMINISTIC:
            tl.store(ci_ptr + row, tl.where(inside, b * H * W + yi * W + xi, dropped), mask=pm)
        for c in range(C):
            go = tl.load(go_ptr + g_off + c * gs_c, mask=pm, other=0.0).to(ACC)
            if DETERMINISTIC:
                tl.store(ct_ptr + row * C + c, tl.where(inside, go, 0.0), mask=pm)
            else:
                tl.atomic_add(gib + c * gis_c + yi * gis_h + xi * gis_w, go, mask=inside)
    else:
        fill = tl.load(fill_ptr)
        x0 = tl.floor(px)
        y0 = tl.floor(py)
        wx1 = px - x0
        wy1 = py - y0
        wx0 = 1.0 - wx1
        wy0 = 1.0 - wy1
        in_x0 = (x0 >= 0.0) & (x0 <= W - 1.0)
        in_x1 = (x0 + 1.0 >= 0.0) & (x0 + 1.0 <= W - 1.0)
        in_y0 = pm & (y0 >= 0.0) & (y0 <= H - 1.0)
        in_y1 = pm & (y0 + 1.0 >= 0.0) & (y0 + 1.0 <= H - 1.0)
        m00 = in_x0 & in_y0
        m10 = in_x1 & in_y0
        m01 = in_x0 & in_y1
        m11 = in_x1 & in_y1
        xi = tl.where(in_x0 | in_x1, x0, 0.0).to(tl.int32)
        yi = tl.where(in_y0 | in_y1, y0, 0.0).to(tl.int32)
        o00 = yi * is_h + xi * is_w
        g00 = yi * gis_h + xi * gis_w
        if DETERMINISTIC:
            base = b * H * W + yi * W + xi
            tl.store(ci_ptr + row, tl.where(m00, base, dropped), mask=pm)
            tl.store(ci_ptr + P * tl.num_programs(1) + row, tl.where(m10, base + 1, dropped), mask=pm)
            tl.store(ci_ptr + 2 * P * tl.num_programs(1) + row, tl.where(m01, base + W, dropped), mask=pm)
            tl.store(ci_ptr + 3 * P * tl.num_programs(1) + row, tl.where(m11, base + W + 1, dropped), mask=pm)
        w00 = tl.where(m00, wx0 * wy0, 0.0)
        w10 = tl.where(m10, wx1 * wy0, 0.0)
        w01 = tl.where(m01, wx0 * wy1, 0.0)
        w11 = tl.where(m11, wx1 * wy1, 0.0)
        gpx = tl.zeros((BLOCK,), ACC)
        gpy = tl.zeros((BLOCK,), ACC)
        for c in range(C):
            go = tl.load(go_ptr + g_off + c * gs_c, mask=pm, other=0.0).to(ACC)
            if WANT_SRC or WANT_PARAMS:
                cb = ib + c * is_c + o00
                v00 = tl.where(m00, tl.load(cb, mask=m00, other=0.0).to(ACC) - fill, 0.0)
                v10 = tl.where(m10, tl.load(cb + is_w, mask=m10, other=0.0).to(ACC) - fill, 0.0)
                v01 = tl.where(m01, tl.load(cb + is_h, mask=m01, other=0.0).to(ACC) - fill, 0.0)
                v11 = tl.where(m11, tl.load(cb + is_h + is_w, mask=m11, other=0.0).to(ACC) - fill, 0.0)
                gpx += go * (wy0 * (v10 - v00) + wy1 * (v11 - v01))
                gpy += go * (wx0 * (v01 - v00) + wx1 * (v11 - v10))
            if WANT_IMAGE:
                if DETERMINISTIC:
                    PT = P * tl.num_programs(1)
                    tl.store(ct_ptr + row * C + c, w00 * go, mask=pm)
                    tl.store(ct_ptr + (PT + row) * C + c, w10 * go, mask=pm)
                    tl.store(ct_ptr + (2 * PT + row) * C + c, w01 * go, mask=pm)
                    tl.store(ct_ptr + (3 * PT + row) * C + c, w11 * go, mask=pm)
                else:
                    gb = gib + c * gis_c + g00
                    tl.atomic_add(gb, w00 * go, mask=m00)
                    tl.atomic_add(gb + gis_w, w10 * go, mask=m10)
                    tl.atomic_add(gb + gis_h, w01 * go, mask=m01)
                    tl.atomic_add(gb + gis_h + gis_w, w11 * go, mask=m11)
        if WANT_SRC or WANT_PARAMS:
            # padding remap, then unnormalize: d pixel / d coord = (size - 1) / 2 or size / 2
            if ALIGN:
                sx = (W - 1.0) / 2.0
                sy = (H - 1.0) / 2.0
            else:
                sx = W / 2.0
                sy = H / 2.0
            gfx = tl.where(pm, gpx * dpx * sx, 0.0)
            gfy = tl.where(pm, gpy * dpy * sy, 0.0)
            nparts = 4 * n + 6
            out = part_ptr + (b * tl.num_programs(0) + pid) * nparts
            tps_backward_partials(gfx, gfy, qx, qy, src_ptr + b * (2 * n), par_ptr + b * (2 * n + 6), n, out,
                                  WANT_PARAMS, WANT_SRC)


def _check(image, src, params, mode, padding_mode, size=None):
    if image.dim() != 4:
        raise ValueError(f"tps_warp: `image` must be 4-D (B, C, H, W), got shape {tuple(image.shape)}")
    if mode not in _MODES:
        raise ValueError(f"tps_warp: `mode` must be one of {list(_MODES)}, got {mode!r}")
    if padding_mode not in _PADDING:
        raise ValueError(f"tps_warp: `padding_mode` must be one of {list(_PADDING)}, got {padding_mode!r}")
    if size is not None and (len(size) != 2 or any(int(v) <= 0 for v in size)):
        raise ValueError(f"tps_warp: `size` must be None or a pair of positive ints (H, W), got {list(size)}")
    if mode == "bilinear" and not image.is_floating_point():
        raise TypeError(f"tps_warp: `image` of dtype {image.dtype} needs mode='nearest'")
    n = src.shape[1]
    if src.dim() != 3 or params.shape != (src.shape[0], n + 3, 2) or src.shape[0] != image.shape[0]:
        raise ValueError(f"tps_warp: `src` {tuple(src.shape)} and `params` {tuple(params.shape)} must be (B, n, 2) "
                         f"and (B, n + 3, 2) with B = {image.shape[0]}")


def _setup(image, src, params, size):
    B, C, H, W = image.shape
    Ho, Wo = (int(size[0]), int(size[1])) if size is not None else (H, W)
    ct = acc_dtype(image, src, params) if image.is_floating_point() else acc_dtype(src, params)
    return B, C, H, W, Ho, Wo, ct, src.to(ct).contiguous(), params.to(ct).contiguous()


def tps_warp_forward(image, src, params, mode="bilinear", padding_mode="zeros", align_corners=False, fill=0.0,
                     size=None):
    _check(image, src, params, mode, padding_mode, size)
    B, C, H, W, Ho, Wo, ct, src_c, par_c = _setup(image, src, params, size)
    out = empty_like_format(image, (B, C, Ho, Wo))
    valid = torch.empty((B, 1, Ho, Wo), dtype=torch.bool, device=image.device)
    if B * Ho * Wo == 0:
        return out, valid
    if H * W == 0:  # nothing to sample: every tap is outside
        valid.zero_()
        return out.fill_(fill), valid
    nearest = mode == "nearest"
    fill_t = torch.full((1,), fill, dtype=image.dtype if nearest else ct, device=image.device)
    # tiles of one row of at most BLOCK pixels on the GPU, narrower for narrow outputs (a warp per 32
    # pixels), and as many rows as keep the row blocks within the grid's 65535; under the interpreter
    # about BLOCK pixels in as many rows as fit
    block = min(BLOCK, max(32, next_pow2(Wo)))
    rows = min(BLOCK // block, next_pow2(Ho)) if INTERPRET else next_pow2(triton.cdiv(Ho, 65535))
    with device_guard(image):
        _tps_warp_fwd_kernel[(triton.cdiv(Wo, block), triton.cdiv(Ho, rows), B)](
            image, src_c, par_c, out, valid, fill_t, hull_tolerances(H, W, ct, image.device),
            C, H, W, Ho, Wo, src.shape[1], *image.stride(), *out.stride(),
            NEAREST=nearest, PAD=_PADDING[padding_mode], ALIGN=bool(align_corners), BLOCK=block, ROWS=rows,
            ACC=tl_dtype(ct), num_warps=max(1, min(4, block // 32)),
        )
    return out, valid


def tps_warp_backward(grad_out, image, src, params, mode, padding_mode, align_corners, fill, size, output_mask):
    _check(image, src, params, mode, padding_mode, size)
    want_image, want_src, want_params = (bool(x) for x in output_mask)
    B, C, H, W, Ho, Wo, ct, src_c, par_c = _setup(image, src, params, size)
    nearest = mode == "nearest"
    if not image.is_floating_point():
        want_image = False  # integer label maps have no gradient
    want_coords = (want_src or want_params) and not nearest
    det = want_image and deterministic()
    P = Ho * Wo
    nprog = triton.cdiv(P, BLOCK) if P > 0 else 0
    n = src.shape[1]
    partials = torch.zeros((B, nprog if want_coords else 0, 4 * n + 6), dtype=ct, device=image.device)
    if want_image and not det:
        gbuf = empty_like_format(image, image.shape, dtype=ct).zero_()
    else:
        gbuf = partials
    taps = 1 if nearest else 4
    contrib = torch.empty((taps, B * P, C) if det else (0,), dtype=ct, device=image.device)
    rows = torch.empty((taps, B * P) if det else (0,), dtype=torch.int64, device=image.device)
    if B * P > 0 and H * W > 0 and (want_image or want_coords):
        with device_guard(image):
            _tps_warp_bwd_kernel[(nprog, B)](
                grad_out, image, src_c, par_c, gbuf, partials, contrib, rows,
                torch.full((1,), fill, dtype=ct, device=image.device),
                C, H, W, Ho, Wo, n, *grad_out.stride(), *image.stride(),
                *(gbuf.stride() if gbuf.dim() == 4 else (0, 0, 0, 0)),
                NEAREST=nearest, PAD=_PADDING[padding_mode], ALIGN=bool(align_corners),
                WANT_IMAGE=want_image, WANT_SRC=want_src and want_coords, WANT_PARAMS=want_params and want_coords,
                DETERMINISTIC=det, BLOCK=BLOCK, ACC=tl_dtype(ct), MERGED=merged_pixels(grad_out),
            )
    elif det:
        rows.fill_(B * H * W)
        contrib.zero_()
    if not output_mask[0]:
        g_image = image.new_empty(0)
    elif not image.is_floating_point():
        g_image = torch.zeros_like(image)
    else:
        g_image = empty_like_format(image, image.shape)
        if det:
            summed = scatter_rows_deterministic(rows.reshape(-1), contrib.reshape(-1, C), B * H * W)
            g_image.copy_(summed.reshape(B, H, W, C).permute(0, 3, 1, 2))
        elif gbuf.dtype == g_image.dtype and gbuf.stride() == g_image.stride():
            g_image = gbuf
        else:
            g_image.copy_(gbuf)
    if want_coords:
        g_src, g_params = tps_param_grads(partials, src, params, want_src, want_params)
    else:
        g_src = torch.zeros_like(src) if want_src else src.new_empty(0)
        g_params = torch.zeros_like(params) if want_params else params.new_empty(0)
    return g_image, g_src, g_params


register_python_backend("tps_warp", "triton", tps_warp_forward, tps_warp_backward)
