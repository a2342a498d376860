"""Triton kernels of ``tpswarp::photometric_jitter`` and its backward.

Per pixel, in DESIGN.md's order: hexcone HSV, ``v += brightness``, ``s *= saturation``,
``h = (h + hue) mod 1``, ``v *= contrast``, back to RGB with
``c_n = v - v s clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6h) mod 6``, the channel
permutation, optional clamp. Computed in float32 for half inputs (float64 for float64).

The backward is the exact chain rule of the reference, including PyTorch's conventions at
ties and bounds (so the gradients equal autograd through ``tpswarp.reference`` everywhere):
``maximum``/``minimum`` split the gradient evenly between equal arguments, ``clamp`` passes
it only strictly inside its bounds, ``where`` routes it to the selected branch.
The gradients w.r.t. the four per-image parameters are reduced per program (one program
covers pixels of one image) into a partials buffer that torch sums in a fixed order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import register_python_backend
from ._utils import (INTERPRET, acc_dtype, cast_to, device_guard, empty_like_format, merged_pixels, pixel_offsets,
                     tl_dtype)

BLOCK = 1024 if not INTERPRET else 4096  # forward: 8 pixels per thread
BLOCK_BWD = 512 if not INTERPRET else 4096  # backward (many live values per pixel): 2 per thread, 8 warps


@triton.jit
def _rem(x, m):
    """torch.remainder(x, m) for m > 0 (exact: x - m * floor(x / m))."""
    return x - m * tl.floor(x / m)


@triton.jit
def _rgb_to_hsv(r, g, b):
    v = tl.maximum(tl.maximum(r, g), b)
    mn = tl.minimum(tl.minimum(r, g), b)
    delta = v - mn
    has_v = v != 0
    s = tl.where(has_v, delta / tl.where(has_v, v, 1.0), 0.0)
    has_d = delta != 0
    d = tl.where(has_d, delta, 1.0)
    h = tl.where(r == v, (g - b) / d, tl.where(g == v, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = tl.where(has_d, _rem(h / 6.0, 1.0), 0.0)
    return h, s, v


@triton.jit
def _hsv_channel(h, s, v, n: tl.constexpr):
    k = _rem(n + 6.0 * h, 6.0)
    f = tl.minimum(tl.maximum(tl.minimum(k, 4.0 - k), 0.0), 1.0)
    return v - v * s * f


@triton.jit
def _hsv_channel_backward(gc, h, s, v, n: tl.constexpr):
    """Gradients (dv, ds, dh) of c_n = v - (v s) clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6."""
    k = _rem(n + 6.0 * h, 6.0)
    mk = tl.minimum(k, 4.0 - k)
    f = tl.minimum(tl.maximum(mk, 0.0), 1.0)
    dv = gc * (1.0 - s * f)
    ds = -gc * v * f
    dmk = tl.where((mk > 0.0) & (mk < 1.0), -gc * (v * s), 0.0)
    dk = tl.where(k < 4.0 - k, dmk, tl.where(k > 4.0 - k, -dmk, 0.0))
    return dv, ds, 6.0 * dk


@triton.jit
def _select3(i, a, b, c):
    return tl.where(i == 0, a, tl.where(i == 1, b, c))


@triton.jit
def _share(a, c, LARGER: tl.constexpr):
    """Share of the gradient of max(a, c) (LARGER) or min(a, c) that goes to ``a``."""
    if LARGER:
        return tl.where(a > c, 1.0, tl.where(a == c, 0.5, 0.0))
    else:
        return tl.where(a < c, 1.0, tl.where(a == c, 0.5, 0.0))


@triton.jit
def _load_params(b, bright_ptr, sat_ptr, hue_ptr, con_ptr, perm_ptr, HAS_PERM: tl.constexpr, ACC: tl.constexpr):
    bright = tl.load(bright_ptr + b).to(ACC)
    sat = tl.load(sat_ptr + b).to(ACC)
    hue = tl.load(hue_ptr + b).to(ACC)
    con = tl.load(con_ptr + b).to(ACC)
    if HAS_PERM:
        p0 = tl.load(perm_ptr + 3 * b)
        p1 = tl.load(perm_ptr + 3 * b + 1)
        p2 = tl.load(perm_ptr + 3 * b + 2)
        # an invalid row (checked without a host sync) gives NaN outputs and gradients, as the CUDA kernel
        in_range = (p0 >= 0) & (p0 <= 2) & (p1 >= 0) & (p1 <= 2) & (p2 >= 0) & (p2 <= 2)
        ok = in_range & (p0 != p1) & (p0 != p2) & (p1 != p2)
        p0 = tl.where(ok, p0, 0)
        p1 = tl.where(ok, p1, 1)
        p2 = tl.where(ok, p2, 2)
        bad = tl.where(ok, 0.0, float("nan")).to(ACC)
    else:
        p0 = 0
        p1 = 1
        p2 = 2
        bad = 0.0
    return bright, sat, hue, con, p0, p1, p2, bad


@triton.jit
def _jitter_fwd_kernel(
    x_ptr, out_ptr, bright_ptr, sat_ptr, hue_ptr, con_ptr, perm_ptr,
    HW, W,
    xs_b, xs_c, xs_h, xs_w, os_b, os_c, os_h, os_w,
    HAS_PERM: tl.constexpr, CLAMP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr, MERGED: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < HW
    xp = x_ptr + b * xs_b + pixel_offsets(offs, W, xs_h, xs_w, MERGED)
    r = tl.load(xp, mask=m, other=0.0).to(ACC)
    g = tl.load(xp + xs_c, mask=m, other=0.0).to(ACC)
    bl = tl.load(xp + 2 * xs_c, mask=m, other=0.0).to(ACC)
    bright, sat, hue, con, p0, p1, p2, bad = _load_params(b, bright_ptr, sat_ptr, hue_ptr, con_ptr, perm_ptr,
                                                          HAS_PERM, ACC)
    h, s, v = _rgb_to_hsv(r, g, bl)
    v = v + bright
    s = s * sat
    h = _rem(h + hue, 1.0)
    v = v * con
    c0 = _hsv_channel(h, s, v, 5)
    c1 = _hsv_channel(h, s, v, 3)
    c2 = _hsv_channel(h, s, v, 1)
    o0 = _select3(p0, c0, c1, c2)
    o1 = _select3(p1, c0, c1, c2)
    o2 = _select3(p2, c0, c1, c2)
    if CLAMP:
        o0 = tl.minimum(tl.maximum(o0, 0.0), 1.0)
        o1 = tl.minimum(tl.maximum(o1, 0.0), 1.0)
        o2 = tl.minimum(tl.maximum(o2, 0.0), 1.0)
    o0 += bad
    o1 += bad
    o2 += bad
    op = out_ptr + b * os_b + pixel_offsets(offs, W, os_h, os_w, MERGED)
    ty = out_ptr.dtype.element_ty
    tl.store(op, cast_to(o0, ty), mask=m)
    tl.store(op + os_c, cast_to(o1, ty), mask=m)
    tl.store(op + 2 * os_c, cast_to(o2, ty), mask=m)


@triton.jit
def _jitter_bwd_kernel(
    go_ptr, x_ptr, gx_ptr, part_ptr, bright_ptr, sat_ptr, hue_ptr, con_ptr, perm_ptr,
    HW, W,
    gs_b, gs_c, gs_h, gs_w, xs_b, xs_c, xs_h, xs_w, gxs_b, gxs_c, gxs_h, gxs_w,
    HAS_PERM: tl.constexpr, CLAMP: tl.constexpr, WANT_IMAGE: tl.constexpr, WANT_PARAMS: tl.constexpr,
    BLOCK: tl.constexpr, ACC: tl.constexpr, MERGED: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < HW
    xp = x_ptr + b * xs_b + pixel_offsets(offs, W, xs_h, xs_w, MERGED)
    r = tl.load(xp, mask=m, other=0.0).to(ACC)
    g = tl.load(xp + xs_c, mask=m, other=0.0).to(ACC)
    bl = tl.load(xp + 2 * xs_c, mask=m, other=0.0).to(ACC)
    gp = go_ptr + b * gs_b + pixel_offsets(offs, W, gs_h, gs_w, MERGED)
    go0 = tl.load(gp, mask=m, other=0.0).to(ACC)
    go1 = tl.load(gp + gs_c, mask=m, other=0.0).to(ACC)
    go2 = tl.load(gp + 2 * gs_c, mask=m, other=0.0).to(ACC)
    bright, sat, hue, con, p0, p1, p2, bad = _load_params(b, bright_ptr, sat_ptr, hue_ptr, con_ptr, perm_ptr,
                                                          HAS_PERM, ACC)
    # forward, keeping what the backward needs
    h0, s0, v0 = _rgb_to_hsv(r, g, bl)
    vb = v0 + bright
    V = vb * con
    S = s0 * sat
    H = _rem(h0 + hue, 1.0)
    if CLAMP:
        c0 = _hsv_channel(H, S, V, 5)
        c1 = _hsv_channel(H, S, V, 3)
        c2 = _hsv_channel(H, S, V, 1)
        o0 = _select3(p0, c0, c1, c2)
        o1 = _select3(p1, c0, c1, c2)
        o2 = _select3(p2, c0, c1, c2)
        go0 = tl.where((o0 > 0.0) & (o0 < 1.0), go0, 0.0)
        go1 = tl.where((o1 > 0.0) & (o1 < 1.0), go1, 0.0)
        go2 = tl.where((o2 > 0.0) & (o2 < 1.0), go2, 0.0)
    # undo the permutation: out[j] = c[p_j]
    gc0 = tl.where(p0 == 0, go0, 0.0) + tl.where(p1 == 0, go1, 0.0) + tl.where(p2 == 0, go2, 0.0)
    gc1 = tl.where(p0 == 1, go0, 0.0) + tl.where(p1 == 1, go1, 0.0) + tl.where(p2 == 1, go2, 0.0)
    gc2 = tl.where(p0 == 2, go0, 0.0) + tl.where(p1 == 2, go1, 0.0) + tl.where(p2 == 2, go2, 0.0)
    dV0, dS0, dH0 = _hsv_channel_backward(gc0, H, S, V, 5)
    dV1, dS1, dH1 = _hsv_channel_backward(gc1, H, S, V, 3)
    dV2, dS2, dH2 = _hsv_channel_backward(gc2, H, S, V, 1)
    dV = dV0 + dV1 + dV2 + bad
    dS = dS0 + dS1 + dS2 + bad
    dH = dH0 + dH1 + dH2 + bad
    if WANT_PARAMS:
        dV = tl.where(m, dV, 0.0)
        dS = tl.where(m, dS, 0.0)
        dH = tl.where(m, dH, 0.0)
        pp = part_ptr + (b * tl.num_programs(0) + pid) * 4
        tl.store(pp, tl.sum(dV * con, axis=0))      # brightness
        tl.store(pp + 1, tl.sum(dS * s0, axis=0))   # saturation
        tl.store(pp + 2, tl.sum(dH, axis=0))        # hue
        tl.store(pp + 3, tl.sum(dV * vb, axis=0))   # contrast
    if WANT_IMAGE:
        dv = dV * con
        ds = dS * sat
        dh = dH
        # rgb_to_hsv backward
        v = tl.maximum(tl.maximum(r, g), bl)
        m1 = tl.maximum(r, g)
        n1 = tl.minimum(r, g)
        mn = tl.minimum(n1, bl)
        delta = v - mn
        has_v = v != 0
        has_d = delta != 0
        d = tl.where(has_d, delta, 1.0)
        is_r = r == v
        is_g = g == v
        num = tl.where(is_r, g - bl, tl.where(is_g, bl - r, r - g))
        dh0 = tl.where(has_d, dh / 6.0, 0.0)
        dnum = dh0 / d
        ddelta = tl.where(has_d, -dh0 * ((num / d) / d), 0.0)
        dr = tl.where(is_r, 0.0, tl.where(is_g, -dnum, dnum))
        dg = tl.where(is_r, dnum, tl.where(is_g, 0.0, -dnum))
        db = tl.where(is_r, -dnum, tl.where(is_g, dnum, 0.0))
        vs = tl.where(has_v, v, 1.0)
        ddelta += tl.where(has_v, ds / vs, 0.0)
        dv += tl.where(has_v, -ds * ((delta / vs) / vs), 0.0)
        dv += ddelta
        dmn = -ddelta
        dm1 = dv * _share(m1, bl, True)
        db += dv * _share(bl, m1, True)
        dr += dm1 * _share(r, g, True)
        dg += dm1 * _share(g, r, True)
        dn1 = dmn * _share(n1, bl, False)
        db += dmn * _share(bl, n1, False)
        dr += dn1 * _share(r, g, False)
        dg += dn1 * _share(g, r, False)
        gq = gx_ptr + b * gxs_b + pixel_offsets(offs, W, gxs_h, gxs_w, MERGED)
        ty = gx_ptr.dtype.element_ty
        tl.store(gq, cast_to(dr, ty), mask=m)
        tl.store(gq + gxs_c, cast_to(dg, ty), mask=m)
        tl.store(gq + 2 * gxs_c, cast_to(db, ty), mask=m)


def _check(image):
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"photometric_jitter: `image` must have shape (B, 3, H, W) RGB, got {tuple(image.shape)}")


def _perm(permutation, image):
    if permutation is None:
        return image
    if not permutation.is_cuda:
        # CPU tensors (the interpreter): reading the rows costs nothing, so raise like the CPU kernels.
        # On the GPU an invalid row gives NaN (no host sync), like the CUDA kernels.
        ok = torch.sort(permutation, dim=1).values == torch.arange(3, device=permutation.device)
        bad = (~ok.all(dim=1)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"photometric_jitter: `permutation` rows must be permutations of (0, 1, 2); "
                             f"row {bad[0]} is {permutation[bad[0]].tolist()}")
    return permutation.contiguous()


def photometric_jitter_forward(image, brightness, saturation, hue, contrast, permutation=None, clamp=False):
    _check(image)
    B, _, H, W = image.shape
    out = empty_like_format(image, image.shape)
    if out.numel() == 0:
        return out
    ct = acc_dtype(image)
    with device_guard(image):
        _jitter_fwd_kernel[(triton.cdiv(H * W, BLOCK), B)](
            image, out, brightness.contiguous(), saturation.contiguous(), hue.contiguous(), contrast.contiguous(),
            _perm(permutation, image), H * W, W, *image.stride(), *out.stride(),
            HAS_PERM=permutation is not None, CLAMP=bool(clamp), BLOCK=BLOCK, ACC=tl_dtype(ct),
            MERGED=merged_pixels(image, out), num_warps=4,
        )
    return out


def photometric_jitter_backward(grad_out, image, brightness, saturation, hue, contrast, permutation, clamp,
                                output_mask):
    _check(image)
    want_image = bool(output_mask[0])
    want = [bool(x) for x in output_mask[1:5]]
    params = (brightness, saturation, hue, contrast)
    g_image = empty_like_format(image, image.shape) if want_image else image.new_empty(0)
    B, _, H, W = image.shape
    if not (want_image or any(want)):
        return (g_image, *(p.new_empty(0) for p in params))
    ct = acc_dtype(image)
    nprog = triton.cdiv(H * W, BLOCK_BWD) if H * W > 0 else 0
    partials = torch.zeros((B, nprog, 4), dtype=ct, device=image.device)
    if B * H * W > 0:
        with device_guard(image):
            _jitter_bwd_kernel[(nprog, B)](
                grad_out, image, g_image if want_image else image, partials,
                brightness.contiguous(), saturation.contiguous(), hue.contiguous(), contrast.contiguous(),
                _perm(permutation, image), H * W, W, *grad_out.stride(), *image.stride(),
                *(g_image.stride() if want_image else image.stride()),
                HAS_PERM=permutation is not None, CLAMP=bool(clamp), WANT_IMAGE=want_image,
                WANT_PARAMS=any(want), BLOCK=BLOCK_BWD, ACC=tl_dtype(ct),
                MERGED=merged_pixels(grad_out, image, g_image if want_image else image), num_warps=8,
            )
    sums = partials.sum(dim=1)  # (B, 4), a fixed-order torch reduction
    grads = tuple(sums[:, i].to(p.dtype).contiguous() if need else p.new_empty(0)
                  for i, (p, need) in enumerate(zip(params, want)))
    return (g_image, *grads)


register_python_backend("photometric_jitter", "triton", photometric_jitter_forward, photometric_jitter_backward)
