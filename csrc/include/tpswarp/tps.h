// Thin-plate spline evaluation at one point and its gradients, shared by CPU and CUDA kernels.
//
// f(q) = sum_i W_i phi(|q - c_i|) + A_0 + A_1 q_x + A_2 q_y,  phi(r) = r^2 log r = r2 log(r2) / 2.
// `src` is (n, 2) row-major (c_i), `params` is (n + 3, 2) row-major: rows 0..n-1 W, rows n..n+2 A.
#pragma once

#include "tpswarp/common.h"

namespace tpswarp {

// phi as a function of r2 = r^2, with phi(0) = 0.
template <typename acc> TPSWARP_HOST_DEVICE TPSWARP_INLINE acc tps_phi(acc r2) {
  return r2 > acc(0) ? acc(0.5) * r2 * log_(r2) : acc(0);
}

// d phi / d r2 = (log r2 + 1) / 2; its product with d r2 / dq = 2 (q - c) vanishes at r2 = 0,
// so 0 is returned there.
template <typename acc> TPSWARP_HOST_DEVICE TPSWARP_INLINE acc tps_dphi_dr2(acc r2) {
  return r2 > acc(0) ? acc(0.5) * (log_(r2) + acc(1)) : acc(0);
}

template <typename acc> struct Vec2 {
  acc x, y;
};

template <typename acc, typename P>
TPSWARP_HOST_DEVICE inline Vec2<acc> tps_eval(acc qx, acc qy, const P* src, const P* params, int64_t n) {
  acc fx = static_cast<acc>(params[2 * n]) + static_cast<acc>(params[2 * n + 2]) * qx +
           static_cast<acc>(params[2 * n + 4]) * qy;
  acc fy = static_cast<acc>(params[2 * n + 1]) + static_cast<acc>(params[2 * n + 3]) * qx +
           static_cast<acc>(params[2 * n + 5]) * qy;
  for (int64_t i = 0; i < n; ++i) {
    const acc dx = qx - static_cast<acc>(src[2 * i]);
    const acc dy = qy - static_cast<acc>(src[2 * i + 1]);
    const acc phi = tps_phi(dx * dx + dy * dy);
    fx += static_cast<acc>(params[2 * i]) * phi;
    fy += static_cast<acc>(params[2 * i + 1]) * phi;
  }
  return {fx, fy};
}

// Accumulates the gradients of <g, f(q)> into grad_src (n, 2), grad_params (n + 3, 2) and
// returns the gradient w.r.t. q. Either accumulator may be null.
template <typename acc, typename P>
TPSWARP_HOST_DEVICE inline Vec2<acc> tps_eval_backward(acc qx, acc qy, const P* src, const P* params, int64_t n,
                                                        Vec2<acc> g, acc* grad_src, acc* grad_params) {
  const acc a1x = static_cast<acc>(params[2 * n + 2]), a1y = static_cast<acc>(params[2 * n + 3]);
  const acc a2x = static_cast<acc>(params[2 * n + 4]), a2y = static_cast<acc>(params[2 * n + 5]);
  Vec2<acc> gq{g.x * a1x + g.y * a1y, g.x * a2x + g.y * a2y};
  if (grad_params) {
    grad_params[2 * n] += g.x;
    grad_params[2 * n + 1] += g.y;
    grad_params[2 * n + 2] += g.x * qx;
    grad_params[2 * n + 3] += g.y * qx;
    grad_params[2 * n + 4] += g.x * qy;
    grad_params[2 * n + 5] += g.y * qy;
  }
  for (int64_t i = 0; i < n; ++i) {
    const acc dx = qx - static_cast<acc>(src[2 * i]);
    const acc dy = qy - static_cast<acc>(src[2 * i + 1]);
    const acc r2 = dx * dx + dy * dy;
    if (grad_params) {
      const acc phi = tps_phi(r2);
      grad_params[2 * i] += g.x * phi;
      grad_params[2 * i + 1] += g.y * phi;
    }
    // <g, W_i> * dphi/dr2 * 2 (q - c_i)
    const acc k = acc(2) * (g.x * static_cast<acc>(params[2 * i]) + g.y * static_cast<acc>(params[2 * i + 1])) *
                  tps_dphi_dr2(r2);
    gq.x += k * dx;
    gq.y += k * dy;
    if (grad_src) {
      grad_src[2 * i] -= k * dx;
      grad_src[2 * i + 1] -= k * dy;
    }
  }
  return gq;
}

// ---------------------------------------------------------------------------------------------
// The GPU kernels' form (tps_warp, warped_kl_div): phi = r2 ln(r2) / 2 = (ln 2 / 2) r2 log2(r2), with
// log2 the hardware approximation on the device (tps_log2) and ln 2 / 2 applied once to the sum of
// the radial terms. The accurate logf took about 27 of the 54 instructions per control point and pixel
// of the CUDA tps_warp forward, which ncu found compute-bound (82% "Compute (SM) Throughput", 15% of
// DRAM bandwidth, on an H200). The approximation's error, <= 2^-22 absolute on log2 over [0.5, 2] and 2 ulp elsewhere,
// is multiplied by r2: it moves f by about 1e-7 sum_i |W_i| r2_i, the size of float32 rounding in the
// sum itself. On the host (the CPU twins of the GPU kernels, which test this form) log2 is std::log2.
// ---------------------------------------------------------------------------------------------

TPSWARP_HOST_DEVICE TPSWARP_INLINE float tps_log2(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));  // x >= FLT_MIN (tps_log2_r2): ftz changes nothing
  return y;
#else
  return std::log2(x);
#endif
}
TPSWARP_HOST_DEVICE TPSWARP_INLINE double tps_log2(double x) { return log2(x); }

template <typename acc> TPSWARP_HOST_DEVICE TPSWARP_INLINE acc tps_half_ln2() { return acc(0.34657359027997264); }

// log2(r2) made finite at r2 = 0 (r2 is clamped to the smallest normal number), so that r2 log2(r2) is 0
// there, as phi(0) = 0, without a select; below that bound r2 log2(r2) is under 1e-36 either way.
template <typename acc> TPSWARP_HOST_DEVICE TPSWARP_INLINE acc tps_log2_r2(acc r2) {
  const acc tiny = sizeof(acc) == 8 ? acc(2.2250738585072014e-308) : acc(1.1754943508222875e-38);
  return tps_log2(max_(r2, tiny));
}

// tps_eval in the GPU form above at K points (a GPU thread's pixels) in one pass over the control
// points, so that each point's coordinates and weights are loaded once; src (n, 2), params (n + 3, 2)
// row-major.
template <int K, typename acc, typename P>
TPSWARP_HOST_DEVICE inline void tps_eval_fast_points(const acc (&qx)[K], const acc (&qy)[K], const P* src,
                                                     const P* params, int n, Vec2<acc> (&f)[K]) {
  acc sx[K], sy[K];
  for (int k = 0; k < K; ++k) sx[k] = sy[k] = acc(0);
#ifdef __CUDA_ARCH__
#pragma unroll 4
#endif
  for (int i = 0; i < n; ++i) {
    const acc cx = static_cast<acc>(src[2 * i]), cy = static_cast<acc>(src[2 * i + 1]);
    const acc wx = static_cast<acc>(params[2 * i]), wy = static_cast<acc>(params[2 * i + 1]);
    for (int k = 0; k < K; ++k) {
      const acc dx = qx[k] - cx, dy = qy[k] - cy;
      const acc r2 = dx * dx + dy * dy;
      const acc t = r2 * tps_log2_r2(r2);
      sx[k] += wx * t;
      sy[k] += wy * t;
    }
  }
  const P* A = params + 2 * n;
  const acc a0x = static_cast<acc>(A[0]), a0y = static_cast<acc>(A[1]), a1x = static_cast<acc>(A[2]);
  const acc a1y = static_cast<acc>(A[3]), a2x = static_cast<acc>(A[4]), a2y = static_cast<acc>(A[5]);
  const acc h = tps_half_ln2<acc>();
  for (int k = 0; k < K; ++k) {
    f[k] = {a0x + a1x * qx[k] + a2x * qy[k] + h * sx[k], a0y + a1y * qx[k] + a2y * qy[k] + h * sy[k]};
  }
}

template <typename acc, typename P>
TPSWARP_HOST_DEVICE TPSWARP_INLINE Vec2<acc> tps_eval_fast(acc qx, acc qy, const P* src, const P* params, int n) {
  const acc x[1] = {qx}, y[1] = {qy};
  Vec2<acc> f[1];
  tps_eval_fast_points<1>(x, y, src, params, n, f);
  return f[0];
}

// Per-control-point pieces of the gradient of <g, f(q)> (tps_eval_backward above, split so that a
// GPU thread can reduce each control point's contribution across a block without per-thread arrays).
template <typename acc> struct TpsRadialGrad {
  acc src_x, src_y;  // d<g, f(q)> / d c_i
  acc w_x, w_y;      // d<g, f(q)> / d W_i
};

// Radial term W_i phi(|q - c_i|): returns its gradients w.r.t. c_i and W_i, adds its part of d/dq to gq.
template <typename acc>
TPSWARP_HOST_DEVICE inline TpsRadialGrad<acc> tps_radial_backward(acc qx, acc qy, acc cx, acc cy, acc wx, acc wy,
                                                                  Vec2<acc> g, Vec2<acc>& gq) {
  const acc dx = qx - cx, dy = qy - cy;
  const acc r2 = dx * dx + dy * dy;
  // tps_phi and tps_dphi_dr2 of tps.h with one logarithm: phi = r2 log(r2) / 2, dphi/dr2 = (log(r2) + 1) / 2.
  const acc lg = r2 > acc(0) ? log_(r2) : acc(0);
  const acc dphi = r2 > acc(0) ? acc(0.5) * (lg + acc(1)) : acc(0);
  const acc phi = acc(0.5) * r2 * lg;
  const acc k = acc(2) * (g.x * wx + g.y * wy) * dphi;
  gq.x += k * dx;
  gq.y += k * dy;
  return {-k * dx, -k * dy, g.x * phi, g.y * phi};
}

// tps_radial_backward in the GPU form (tps_eval_fast): phi = (ln 2 / 2) r2 log2(r2) and
// 2 dphi/dr2 = ln 2 log2(r2) + 1, finite at r2 = 0 where it multiplies dx = dy = 0.
template <typename acc>
TPSWARP_HOST_DEVICE inline TpsRadialGrad<acc> tps_radial_backward_fast(acc qx, acc qy, acc cx, acc cy, acc wx, acc wy,
                                                                       Vec2<acc> g, Vec2<acc>& gq) {
  const acc dx = qx - cx, dy = qy - cy;
  const acc r2 = dx * dx + dy * dy;
  const acc lg = tps_log2_r2(r2);
  const acc phi = tps_half_ln2<acc>() * (r2 * lg);
  const acc k = (g.x * wx + g.y * wy) * (acc(2) * tps_half_ln2<acc>() * lg + acc(1));
  gq.x += k * dx;
  gq.y += k * dy;
  return {-k * dx, -k * dy, g.x * phi, g.y * phi};
}

// Affine term A_0 + A_1 q_x + A_2 q_y, A = params rows n..n+2 ((3, 2) row-major): returns d/dq and
// writes the 6 gradients w.r.t. A (row-major) to gA.
template <typename acc>
TPSWARP_HOST_DEVICE inline Vec2<acc> tps_affine_backward(acc qx, acc qy, const acc* A, Vec2<acc> g, acc* gA) {
  gA[0] = g.x;
  gA[1] = g.y;
  gA[2] = g.x * qx;
  gA[3] = g.y * qx;
  gA[4] = g.x * qy;
  gA[5] = g.y * qy;
  return {g.x * A[2] + g.y * A[3], g.x * A[4] + g.y * A[5]};
}

// pixel_to_normalized's value without a division per pixel: with y = 1 / d (correctly rounded, the
// same for every pixel of the axis: the compiler hoists it out of pixel loops), q0 = a y is within an
// ulp of a / d and Markstein's correction fma(fma(-q0, d, a), y, q0) is the correctly rounded a / d.
// 3 instructions on the GPU instead of about 10 and a branch. tests/test_pixel_to_normalized.py
// compiles this header and checks every pixel of every axis up to 4096 pixels against the division
// (and, by a one-off run, up to 131072 and 4e8 random pairs up to 2^24: no difference). Used by the
// CUDA tps_warp forward's rows; the warped KL kernels keep the division (y held across their pixel
// loop took registers from kernels already at 128: 128 -> 142 for the TPS-gradient backward).
template <typename acc>
TPSWARP_HOST_DEVICE TPSWARP_INLINE acc pixel_to_normalized_gpu_form(int64_t i, int64_t size, bool align_corners) {
  if (align_corners && size <= 1) return acc(0);
  const acc d = static_cast<acc>(align_corners ? size - 1 : size);
  const acc a = acc(2) * acc(i) + (align_corners ? acc(0) : acc(1));  // rounded as the division form rounds it
  const acc y = acc(1) / d;
  const acc q0 = a * y;
  return fma_(fma_(-q0, d, a), y, q0) - acc(1);
}

// Normalized coordinate of output pixel i along an axis of `size` pixels (grid_sample convention).
template <typename acc>
TPSWARP_HOST_DEVICE TPSWARP_INLINE acc pixel_to_normalized(int64_t i, int64_t size, bool align_corners) {
  if (align_corners) return size > 1 ? acc(2) * acc(i) / acc(size - 1) - acc(1) : acc(0);
  return (acc(2) * acc(i) + acc(1)) / acc(size) - acc(1);
}

// Normalized coordinate -> pixel coordinate (grid_sample's unnormalize), and d pixel / d coord.
template <typename acc>
TPSWARP_HOST_DEVICE TPSWARP_INLINE acc normalized_to_pixel(acc coord, int64_t size, bool align_corners) {
  return align_corners ? (coord + acc(1)) / acc(2) * acc(size - 1) : ((coord + acc(1)) * acc(size) - acc(1)) / acc(2);
}
template <typename acc>
TPSWARP_HOST_DEVICE TPSWARP_INLINE acc normalized_to_pixel_scale(int64_t size, bool align_corners) {
  return align_corners ? acc(size - 1) / acc(2) : acc(size) / acc(2);
}

// Slack of the validity (pixel-centre hull) test in pixels, for coordinates computed in acc:
// 8 eps size (see hull_tolerance in tpswarp/reference/tps_warp.py).
template <typename acc> TPSWARP_HOST_DEVICE TPSWARP_INLINE acc pixel_hull_tolerance(int64_t size) {
  const acc eps = sizeof(acc) == 8 ? acc(2.220446049250313e-16) : acc(1.1920928955078125e-07);
  return acc(8) * eps * acc(size > 1 ? size : 1);
}

}  // namespace tpswarp
