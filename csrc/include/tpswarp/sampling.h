// Per-pixel image sampling shared by the CPU and CUDA warp kernels (tps_warp, warped_kl_div):
// grid_sample's coordinate conventions, padding modes (zeros / border / reflection), the
// bilinear tap with its validity, `fill` for taps outside the image, nearest with round half
// to even, and the backward of the bilinear tap w.r.t. the image and the sample coordinate.
//
// It follows tpswarp/reference/tps_warp.py operation by operation (the spec), including the
// derivatives autograd gives there: the clip of border/reflection has derivative 0 at and beyond
// its bounds (torch.clamp's backward), the reflection's |.| has derivative 0 at its kink.
//
// Conditions are combined with `&`, not `&&`, and both sides of a select are computed first, so
// that CPU loops over these functions have no control flow and vectorize.
//
// Tap indices are `int` (32 bit): the host code checks H, W <= 2^24 (exact in float too). Callers form element offsets
// in int64 from them (`y * stride_h + x * stride_w`), so any strides work.
#pragma once

#include "tpswarp/common.h"
#include "tpswarp/tps.h"  // Vec2, pixel_to_normalized, normalized_to_pixel(_scale)

// The functions here are TPSWARP_INLINE (tpswarp/common.h): they sit in the CPU kernels' inner loops.

namespace tpswarp {

// The order matches the strings "bilinear"/"nearest" and "zeros"/"border"/"reflection".
enum class Interp : int { Bilinear = 0, Nearest = 1 };
enum class Padding : int { Zeros = 0, Border = 1, Reflection = 2 };

// Reflects `coord` into [low2 / 2, high2 / 2] (grid_sample's reflect_coordinates, written as the
// reference writes it). `*grad` (if non-null) receives d result / d coord: +1, -1, or 0 at the kink.
template <typename acc>
TPSWARP_HOST_DEVICE TPSWARP_INLINE acc reflect_coordinate(acc coord, int64_t low2, int64_t high2, acc* grad) {
  if (low2 == high2) {
    if (grad) *grad = acc(0);
    return acc(0);
  }
  const acc lo = acc(low2) / acc(2);
  const acc span = acc(high2 - low2) / acc(2);
  const acc d = coord - lo;
  const acc c = abs_(d);
  const acc flips = floor_(c / span);
  const acc extra = c - flips * span;
  const bool even = flips - acc(2) * floor_(flips / acc(2)) == acc(0);  // torch.remainder(flips, 2) == 0
  if (grad) {
    const acc sign = d > acc(0) ? acc(1) : (d < acc(0) ? acc(-1) : acc(0));
    *grad = even ? sign : -sign;
  }
  // both branches computed before the select: keeps CPU loops over this branch-free (vectorizable)
  const acc straight = extra + lo;
  const acc mirrored = span - extra + lo;
  return even ? straight : mirrored;
}

// Clips to [0, size - 1]; d/dcoord is 1 strictly inside, 0 at and beyond the bounds (torch.clamp).
template <typename acc>
TPSWARP_HOST_DEVICE TPSWARP_INLINE acc clip_coordinate(acc coord, int64_t size, acc* grad) {
  const acc hi = acc(size - 1);
  if (grad) *grad = ((coord > acc(0)) & (coord < hi)) ? *grad : acc(0);
  return clamp_(coord, acc(0), hi);
}

// Pixel coordinate (after the padding mode's remapping) of the normalized sample coordinate
// `coord` along an axis of `size` pixels. `*grad` (if non-null) receives d pixel / d coord.
template <typename acc>
TPSWARP_HOST_DEVICE TPSWARP_INLINE acc source_coordinate(acc coord, int64_t size, Padding padding, bool align_corners,
                                                 acc* grad = nullptr) {
  acc p = normalized_to_pixel(coord, size, align_corners);
  if (grad) *grad = normalized_to_pixel_scale<acc>(size, align_corners);
  if (padding == Padding::Border) {
    p = clip_coordinate(p, size, grad);
  } else if (padding == Padding::Reflection) {
    acc g_reflect = acc(1);
    p = align_corners ? reflect_coordinate(p, 0, 2 * (size - 1), grad ? &g_reflect : nullptr)
                      : reflect_coordinate(p, -1, 2 * size - 1, grad ? &g_reflect : nullptr);
    if (grad) *grad *= g_reflect;
    p = clip_coordinate(p, size, grad);
  }
  return p;
}

// The paper's validity mask: the (unpadded) sample location lies in the pixel-centre hull, up
// to the rounding slack pixel_hull_tolerance (tps.h; hull_tolerance in the reference).
template <typename acc>
TPSWARP_HOST_DEVICE TPSWARP_INLINE bool in_pixel_hull(acc gx, acc gy, int64_t height, int64_t width, bool align_corners) {
  const acc px = normalized_to_pixel(gx, width, align_corners);
  const acc py = normalized_to_pixel(gy, height, align_corners);
  const acc tx = pixel_hull_tolerance<acc>(width), ty = pixel_hull_tolerance<acc>(height);
  return (px >= -tx) & (px <= acc(width - 1) + tx) & (py >= -ty) & (py <= acc(height - 1) + ty);
}

// floor(v) as an int, for v well inside the int range (callers clamp first). Written without
// floorf, which the CPU loops could not vectorize.
template <typename acc> TPSWARP_HOST_DEVICE TPSWARP_INLINE int floor_to_int(acc v) {
  const int i = static_cast<int>(v);  // truncation toward zero
  return i - static_cast<int>(static_cast<acc>(i) > v);
}

// The four taps of a bilinear sample at pixel coordinate (px, py):
// out = fill + w00 (v[y0, x0] - fill) + w10 (v[y0, x1] - fill) + w01 (v[y1, x0] - fill) + w11 (v[y1, x1] - fill)
// where a tap outside the image has weight 0 (it reads `fill`). Indices are clamped into the image
// (a tap outside still reads a valid address, with weight 0, as the reference's gather does).
template <typename acc> struct BilinearTap {
  int x0, x1, y0, y1;           // tap columns / rows, clamped into the image
  acc w00, w10, w01, w11;       // tap weights, 0 for taps outside the image
  acc wx1, wy1;                 // fractional parts px - floor(px), py - floor(py)
  int in00, in10, in01, in11;   // 1 if the tap is inside the image, else 0 (ints: CPU loops vectorize)
};

// A location outside [-1, size] has its four taps outside the image (all weights 0) whatever its
// fraction, so the taps clamp it to [-2, size + 1] first; that keeps the int conversion defined (NaN
// goes to -2: all taps outside, as in the reference). Tap indices are clamped into the image last.
template <typename acc> TPSWARP_HOST_DEVICE TPSWARP_INLINE void clamp_tap_indices(BilinearTap<acc>& t, int x0, int y0,
                                                                                 int w, int h) {
  t.x0 = clamp_(x0, 0, w - 1);
  t.x1 = clamp_(x0 + 1, 0, w - 1);
  t.y0 = clamp_(y0, 0, h - 1);
  t.y1 = clamp_(y0 + 1, 0, h - 1);
}

// bilinear_tap as the GPU computes it: the same values in fewer GPU instructions (floor is one
// instruction there, an inside test one unsigned compare, and a weight is selected to 0 rather than
// multiplied by its 0/1 mask; all factors are finite and >= 0, so the products are the same). The
// GPU kernels get it through bilinear_tap; warp_pixel calls it directly, so that the CPU kernels of
// the statistics ops test it on every machine.
template <typename acc>
TPSWARP_HOST_DEVICE TPSWARP_INLINE BilinearTap<acc> bilinear_tap_gpu_form(acc px, acc py, int64_t height, int64_t width) {
  BilinearTap<acc> t;
  const int w = static_cast<int>(width), h = static_cast<int>(height);
  const acc cx = clamp_(px, acc(-2), acc(w + 1)), cy = clamp_(py, acc(-2), acc(h + 1));
  const acc fx = floor_(cx), fy = floor_(cy);
  const int x0 = static_cast<int>(fx), y0 = static_cast<int>(fy);
  t.wx1 = cx - fx;
  t.wy1 = cy - fy;
  const acc wx0 = acc(1) - t.wx1, wy0 = acc(1) - t.wy1;
  const bool ix0 = unsigned(x0) < unsigned(w), ix1 = unsigned(x0 + 1) < unsigned(w);
  const bool iy0 = unsigned(y0) < unsigned(h), iy1 = unsigned(y0 + 1) < unsigned(h);
  t.in00 = ix0 & iy0;
  t.in10 = ix1 & iy0;
  t.in01 = ix0 & iy1;
  t.in11 = ix1 & iy1;
  const acc mx0 = ix0 ? wx0 : acc(0), mx1 = ix1 ? t.wx1 : acc(0);
  const acc my0 = iy0 ? wy0 : acc(0), my1 = iy1 ? t.wy1 : acc(0);
  t.w00 = mx0 * my0;
  t.w10 = mx1 * my0;
  t.w01 = mx0 * my1;
  t.w11 = mx1 * my1;
  clamp_tap_indices(t, x0, y0, w, h);
  return t;
}

template <typename acc>
TPSWARP_HOST_DEVICE TPSWARP_INLINE BilinearTap<acc> bilinear_tap(acc px, acc py, int64_t height, int64_t width) {
#ifdef __CUDA_ARCH__
  return bilinear_tap_gpu_form(px, py, height, width);
#else
  BilinearTap<acc> t;
  const int w = static_cast<int>(width), h = static_cast<int>(height);
  const acc cx = clamp_(px, acc(-2), acc(w + 1)), cy = clamp_(py, acc(-2), acc(h + 1));
  const int x0 = floor_to_int(cx), y0 = floor_to_int(cy);
  const int x1 = x0 + 1, y1 = y0 + 1;
  t.wx1 = cx - static_cast<acc>(x0);
  t.wy1 = cy - static_cast<acc>(y0);
  const acc wx0 = acc(1) - t.wx1, wy0 = acc(1) - t.wy1;
  // 0/1 ints, not bools, and weights multiplied by the mask rather than selected: this keeps the
  // CPU loops branch-free (cx, cy are finite, so no 0 * inf can occur).
  const int ix0 = (x0 >= 0) & (x0 < w), ix1 = (x1 >= 0) & (x1 < w);
  const int iy0 = (y0 >= 0) & (y0 < h), iy1 = (y1 >= 0) & (y1 < h);
  const int in00 = ix0 & iy0, in10 = ix1 & iy0, in01 = ix0 & iy1, in11 = ix1 & iy1;
  t.in00 = in00;
  t.in10 = in10;
  t.in01 = in01;
  t.in11 = in11;
  t.w00 = wx0 * wy0 * static_cast<acc>(in00);
  t.w10 = t.wx1 * wy0 * static_cast<acc>(in10);
  t.w01 = wx0 * t.wy1 * static_cast<acc>(in01);
  t.w11 = t.wx1 * t.wy1 * static_cast<acc>(in11);
  clamp_tap_indices(t, x0, y0, w, h);
  return t;
#endif
}

// The bilinear interpolation of one channel from its four tap values (element offsets o.. into
// `plane`) and weights: fill + sum_k w_k (v_k - fill), in the reference's order.
template <typename scalar_t, typename acc>
TPSWARP_HOST_DEVICE TPSWARP_INLINE acc bilinear_combine(const scalar_t* plane, int64_t o00, int64_t o10, int64_t o01,
                                                         int64_t o11, acc w00, acc w10, acc w01, acc w11, acc fill) {
  acc out = w00 * (static_cast<acc>(plane[o00]) - fill);
  out += w10 * (static_cast<acc>(plane[o10]) - fill);
  out += w01 * (static_cast<acc>(plane[o01]) - fill);
  out += w11 * (static_cast<acc>(plane[o11]) - fill);
  return out + fill;
}

// Bilinear sample of one channel plane with strides (sh, sw), computed in `acc`.
template <typename scalar_t, typename acc>
TPSWARP_HOST_DEVICE TPSWARP_INLINE acc bilinear_sample(const scalar_t* plane, int64_t sh, int64_t sw, const BilinearTap<acc>& t,
                                               acc fill) {
  return bilinear_combine(plane, t.y0 * sh + t.x0 * sw, t.y0 * sh + t.x1 * sw, t.y1 * sh + t.x0 * sw,
                          t.y1 * sh + t.x1 * sw, t.w00, t.w10, t.w01, t.w11, fill);
}

// d bilinear_sample / d px and d / d py are linear in the four (v_k - fill):
//   d/dpx = x00 (v00 - fill) + x10 (v10 - fill) + x01 (v01 - fill) + x11 (v11 - fill), same for y,
// with w00 = wx0 wy0, w10 = wx1 wy0, w01 = wx0 wy1, w11 = wx1 wy1, d wx1 / d px = 1 = -d wx0 / d px,
// and 0 for the taps outside the image.
template <typename acc> struct BilinearCoordCoefs {
  acc x00, x10, x01, x11;
  acc y00, y10, y01, y11;
};

template <typename acc>
TPSWARP_HOST_DEVICE TPSWARP_INLINE BilinearCoordCoefs<acc> bilinear_coord_coefs(const BilinearTap<acc>& t) {
  const acc wx0 = acc(1) - t.wx1, wy0 = acc(1) - t.wy1;
  const acc m00 = static_cast<acc>(t.in00), m10 = static_cast<acc>(t.in10);
  const acc m01 = static_cast<acc>(t.in01), m11 = static_cast<acc>(t.in11);
  BilinearCoordCoefs<acc> k;
  k.x00 = -wy0 * m00;
  k.x10 = wy0 * m10;
  k.x01 = -t.wy1 * m01;
  k.x11 = t.wy1 * m11;
  k.y00 = -wx0 * m00;
  k.y10 = -t.wx1 * m10;
  k.y01 = wx0 * m01;
  k.y11 = t.wx1 * m11;
  return k;
}

// (d/dpx, d/dpy) from the four tap values (minus fill) and the coefficients above.
template <typename acc>
TPSWARP_HOST_DEVICE TPSWARP_INLINE Vec2<acc> bilinear_coord_dot(const BilinearCoordCoefs<acc>& k, acc v00, acc v10, acc v01,
                                                                acc v11) {
  return {k.x00 * v00 + k.x10 * v10 + k.x01 * v01 + k.x11 * v11, k.y00 * v00 + k.y10 * v10 + k.y01 * v01 + k.y11 * v11};
}

// (d/dpx, d/dpy) of one channel from its tap offsets o.. into `plane` and the coefficients above.
template <typename scalar_t, typename acc>
TPSWARP_HOST_DEVICE TPSWARP_INLINE Vec2<acc> bilinear_coord_combine(const scalar_t* plane, int64_t o00, int64_t o10,
                                                                    int64_t o01, int64_t o11,
                                                                    const BilinearCoordCoefs<acc>& k, acc fill) {
  return bilinear_coord_dot(k, static_cast<acc>(plane[o00]) - fill, static_cast<acc>(plane[o10]) - fill,
                            static_cast<acc>(plane[o01]) - fill, static_cast<acc>(plane[o11]) - fill);
}

// d bilinear_sample / d (px, py) times the upstream gradient `g`, for one channel plane.
template <typename scalar_t, typename acc>
TPSWARP_HOST_DEVICE TPSWARP_INLINE Vec2<acc> bilinear_sample_coord_grad(const scalar_t* plane, int64_t sh, int64_t sw,
                                                                        const BilinearTap<acc>& t, acc fill, acc g) {
  const auto d = bilinear_coord_combine(plane, t.y0 * sh + t.x0 * sw, t.y0 * sh + t.x1 * sw, t.y1 * sh + t.x0 * sw,
                                        t.y1 * sh + t.x1 * sw, bilinear_coord_coefs(t), fill);
  return {g * d.x, g * d.y};
}

// A bilinear tap as four pointers into channel 0 of an image (strides sh, sw), formed once per pixel:
// the tap offsets are not recomputed per channel. Walk the channels with value() and advance(stride_c),
// or read channel c with at(c * stride_c). On the GPU a tap's address then costs 2 instructions per
// channel (a 64-bit add), against 4 for bilinear_sample; at() gets there where the compiler forms the
// channel offset once as a uniform value (the warped KL class loops), not always (the tps_warp forward
// walks). The value is sum_k w_k v_k, which equals bilinear_combine with fill 0 (except that it keeps the
// sign of a -0 sum); a caller with a fill adds fill (1 - sum_k w_k) itself (rest_weight).
template <typename scalar_t, typename acc> struct BilinearTapPointers {
  const scalar_t *p00, *p10, *p01, *p11;
  acc w00, w10, w01, w11;

  TPSWARP_HOST_DEVICE TPSWARP_INLINE BilinearTapPointers(const scalar_t* image, int64_t sh, int64_t sw,
                                                         const BilinearTap<acc>& t)
      : p00(image + (t.y0 * sh + t.x0 * sw)), p10(image + (t.y0 * sh + t.x1 * sw)),
        p01(image + (t.y1 * sh + t.x0 * sw)), p11(image + (t.y1 * sh + t.x1 * sw)),
        w00(t.w00), w10(t.w10), w01(t.w01), w11(t.w11) {}
  // The same with 32-bit offset arithmetic, for a plane whose offsets fit: the caller checks
  // (H - 1) sh + (W - 1) sw <= INT_MAX (plane_offsets_fit_int). On the GPU, half the instructions.
  TPSWARP_HOST_DEVICE TPSWARP_INLINE BilinearTapPointers(const scalar_t* image, int sh, int sw, const BilinearTap<acc>& t)
      : p00(image + (t.y0 * sh + t.x0 * sw)), p10(image + (t.y0 * sh + t.x1 * sw)),
        p01(image + (t.y1 * sh + t.x0 * sw)), p11(image + (t.y1 * sh + t.x1 * sw)),
        w00(t.w00), w10(t.w10), w01(t.w01), w11(t.w11) {}

  TPSWARP_HOST_DEVICE TPSWARP_INLINE acc at(int64_t off) const {
    return w00 * static_cast<acc>(p00[off]) + w10 * static_cast<acc>(p10[off]) + w01 * static_cast<acc>(p01[off]) +
           w11 * static_cast<acc>(p11[off]);
  }
  TPSWARP_HOST_DEVICE TPSWARP_INLINE acc value() const { return at(0); }
  TPSWARP_HOST_DEVICE TPSWARP_INLINE void advance(int64_t stride) {
    p00 += stride;
    p10 += stride;
    p01 += stride;
    p11 += stride;
  }
  // (d/dpx, d/dpy) of at(off), from bilinear_coord_coefs of the tap (bilinear_coord_combine, fill 0).
  TPSWARP_HOST_DEVICE TPSWARP_INLINE Vec2<acc> coord_at(int64_t off, const BilinearCoordCoefs<acc>& k) const {
    return bilinear_coord_dot(k, static_cast<acc>(p00[off]), static_cast<acc>(p10[off]), static_cast<acc>(p01[off]),
                              static_cast<acc>(p11[off]));
  }
  // 1 - sum_k w_k: the weight of `fill` (0 where all four taps are inside the image, up to rounding).
  TPSWARP_HOST_DEVICE TPSWARP_INLINE acc rest_weight() const { return acc(1) - ((w00 + w10) + (w01 + w11)); }
};

// Whether every element offset y sh + x sw of a height x width plane fits in an int (strides >= 0).
inline bool plane_offsets_fit_int(int64_t height, int64_t width, int64_t sh, int64_t sw) {
  const int64_t kMax = 2147483647;
  return sh <= kMax && sw <= kMax && (height - 1) * sh + (width - 1) * sw <= kMax;
}

// Image-gradient scatter of one channel: calls add(offset, g * w) for each tap inside the image,
// offset = y * sh + x * sw. `add` is a plain += on the CPU, an atomicAdd on the GPU.
template <typename acc, typename Add>
TPSWARP_HOST_DEVICE TPSWARP_INLINE void bilinear_scatter(const BilinearTap<acc>& t, int64_t sh, int64_t sw, acc g, Add&& add) {
  if (t.in00) add(t.y0 * sh + t.x0 * sw, g * t.w00);
  if (t.in10) add(t.y0 * sh + t.x1 * sw, g * t.w10);
  if (t.in01) add(t.y1 * sh + t.x0 * sw, g * t.w01);
  if (t.in11) add(t.y1 * sh + t.x1 * sw, g * t.w11);
}

// Nearest tap: round half to even (as torch.round and grid_sample's nearbyint); outside the image
// the output is `fill`.
struct NearestTap {
  int x, y;    // clamped into the image
  int inside;  // 1 if the rounded location lies in the image, else 0 (an int: CPU loops vectorize)
};

// Round half to even, as an int, for v well inside the int range (callers clamp first).
template <typename acc> TPSWARP_HOST_DEVICE TPSWARP_INLINE int round_half_even_to_int(acc v) {
  const int f = floor_to_int(v);
  const acc d = v - static_cast<acc>(f);
  const int above = d > acc(0.5), tie = d == acc(0.5);
  return f + (above | (tie & f & 1));
}

template <typename acc>
TPSWARP_HOST_DEVICE TPSWARP_INLINE NearestTap nearest_tap(acc px, acc py, int64_t height, int64_t width) {
  const int w = static_cast<int>(width), h = static_cast<int>(height);
  // Outside [-2, size + 1] the rounded location is outside the image either way (NaN -> -2: outside).
  const acc cx = clamp_(px, acc(-2), acc(w + 1)), cy = clamp_(py, acc(-2), acc(h + 1));
  const int rx = round_half_even_to_int(cx), ry = round_half_even_to_int(cy);
  NearestTap t;
  t.inside = (rx >= 0) & (rx < w) & (ry >= 0) & (ry < h);
  t.x = clamp_(rx, 0, w - 1);
  t.y = clamp_(ry, 0, h - 1);
  return t;
}

}  // namespace tpswarp
