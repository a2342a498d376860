// CPU kernels of tpswarp::tps_warp and its backward.
//
// The sampling grid is never materialized: output rows are processed in chunks of kChunk
// columns; for each chunk f(q) is evaluated into a small buffer, the taps are computed
// (tpswarp/sampling.h) into structure-of-arrays buffers, then all channels are gathered (or, in
// the backward, the coordinate gradient is gathered and the image gradient scattered).
//
// Speed: the TPS evaluation (n logarithms per pixel), the tap computation and the gathers are
// loops the compiler vectorizes; they are compiled twice, for the baseline ISA and for AVX2+FMA
// (function target attributes), and the AVX2 version is picked at run time (TPSWARP_NO_AVX2=1
// forces the baseline, for tests). In float32 the logarithm is a branch-free Cephes polynomial
// (about 1 ulp) so that those loops vectorize, and the logarithms of the forward evaluation are
// reused by the TPS backward; in float64 the per-pixel functions of tpswarp/tps.h are used as they
// are (the math of the CUDA kernels). float32 NCHW images read the two taps of a row with one
// 64-bit load (AVX2 intrinsics), and their backward adds the image gradient of a row's two taps
// with one 64-bit read-modify-write (two neighbouring pixels' four taps with one 128-bit one where
// they lie within 4 columns); the rows one below the chunk's bottom taps are prefetched
// (where the next output row reads). The vectorized paths index an image plane with int32
// offsets; planes larger than 2^31 elements go one pixel at a time with int64 offsets.
//
// Determinism (results independent of the number of threads and identical between runs):
// - the image gradient is a scatter-add; each element is owned by one task (a batch item, or a
//   batch item and a group of channels) that adds the contributions of the output rows in order
//   (within a row: chunk by chunk; row pairs: pixel pairs in kPairStride interleaved passes;
//   otherwise tap by tap, equal consecutive offsets summed first), so the order of the additions
//   does not depend on the threads;
// - the gradients w.r.t. `src` and `params` are summed per output row (a fixed block, fixed
//   8-lane partial sums) into a (B * Ho, P) buffer, then over the rows in order (in float64).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "tpswarp/cpu_fastmath.h"  // cpu::lane_sum8, cpu::log_reduced
#include "tpswarp/cpu_features.h"
#include "tpswarp/cpu_pair_gather.h"
#include "tpswarp/sampling.h"
#include "tpswarp/show.h"
#include "tpswarp/tps.h"
#include "tpswarp/warp_args.h"

namespace tpswarp {
namespace {

constexpr const char* kOp = "tps_warp";
constexpr int64_t kChunk = 128;  // output columns per inner block

// ---------------------------------------------------------------------------------------------
// Vectorizable building blocks
// ---------------------------------------------------------------------------------------------

// log(x) for a normal float x > 0, branch-free (no tiny-input scaling, unlike cpu::fast_log), so that
// loops over it vectorize under the default -ftrapping-math (no arithmetic inside a conditional).
C10_ALWAYS_INLINE float log_normal(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const int32_t mant = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &mant, sizeof(m));
  const int32_t small = m < 0.707106781186547524f;  // then use 2m - 1, exponent - 1
  const float e = static_cast<float>(((bits >> 23) & 0xff) - 126 - small);
  return cpu::log_reduced(m + m * static_cast<float>(small) - 1.0f, e);
}

// log(r2 + FLT_MIN): finite at r2 = 0 (where it is multiplied by 0), exact elsewhere up to rounding.
C10_ALWAYS_INLINE float log_r2(float r2) { return log_normal(r2 + 1.17549435e-38f); }

// Per-call constants of the coordinate computation.
template <typename acc> struct Geometry {
  int64_t H, W, Ho, Wo, n;
  int64_t sh, sw;  // image strides along H and W (tap offsets)
  Padding padding;
  bool align_corners;
  const acc* qx;      // (Wo,) normalized output column coordinates
  const acc* src;     // (B, n, 2) contiguous
  const acc* params;  // (B, n + 3, 2) contiguous
};

// f(q) at the columns [j0, j0 + len) of the output row with normalized coordinate qy. With
// kSaveLogs (float32), log(r2) of control point i and column j is kept in logs[i * kChunk + j]
// for tps_row_backward_impl.
template <typename acc, bool kSaveLogs>
C10_ALWAYS_INLINE void tps_row_impl(const Geometry<acc>& g, int64_t b, acc qy, int64_t j0, int64_t len,
                                    acc* __restrict fx, acc* __restrict fy, acc* __restrict logs) {
  const int64_t n = g.n;
  const acc* s = g.src + b * 2 * n;
  const acc* p = g.params + b * 2 * (n + 3);
  const acc* __restrict qx = g.qx + j0;
  if constexpr (std::is_same_v<acc, float>) {
    const float a0x = p[2 * n], a0y = p[2 * n + 1], a1x = p[2 * n + 2], a1y = p[2 * n + 3];
    const float a2x = p[2 * n + 4], a2y = p[2 * n + 5];
    for (int64_t j = 0; j < len; ++j) {
      fx[j] = a0x + a1x * qx[j] + a2x * qy;
      fy[j] = a0y + a1y * qx[j] + a2y * qy;
    }
    for (int64_t i = 0; i < n; ++i) {
      const float cx = s[2 * i], dy = qy - s[2 * i + 1], wx = p[2 * i], wy = p[2 * i + 1];
      const float dy2 = dy * dy;
      for (int64_t j = 0; j < len; ++j) {
        const float dx = qx[j] - cx;
        const float r2 = dx * dx + dy2;
        const float lg = log_r2(r2);
        if constexpr (kSaveLogs) logs[i * kChunk + j] = lg;
        const float phi = 0.5f * r2 * lg;
        fx[j] += wx * phi;
        fy[j] += wy * phi;
      }
    }
  } else {
    for (int64_t j = 0; j < len; ++j) {
      const auto f = tps_eval<acc>(qx[j], qy, s, p, n);
      fx[j] = f.x;
      fy[j] = f.y;
    }
  }
}

// Adds the gradients of sum_j <(gfx_j, gfy_j), f(q_j)> w.r.t. src and params to `grad`
// (grad src (2n), then grad params (2n + 6)), for the columns [j0, j0 + len) of one output row.
// float32: `logs` from tps_row_impl<float, true> of the same columns.
template <typename acc>
C10_ALWAYS_INLINE void tps_row_backward_impl(const Geometry<acc>& g, int64_t b, acc qy, int64_t j0, int64_t len,
                                             const acc* __restrict gfx, const acc* __restrict gfy,
                                             const acc* __restrict logs, acc* __restrict grad) {
  const int64_t n = g.n;
  const acc* s = g.src + b * 2 * n;
  const acc* p = g.params + b * 2 * (n + 3);
  const acc* __restrict qx = g.qx + j0;
  acc* grad_src = grad;
  acc* grad_params = grad + 2 * n;
  if constexpr (std::is_same_v<acc, float>) {
    // Per-column terms in a vectorized loop, then sums in a fixed order (cpu::lane_sum8).
    alignas(64) float t0[kChunk], t1[kChunk];
    for (int64_t j = 0; j < len; ++j) {
      t0[j] = gfx[j] * qx[j];
      t1[j] = gfy[j] * qx[j];
    }
    const float sx = cpu::lane_sum8(gfx, len), sy = cpu::lane_sum8(gfy, len);
    grad_params[2 * n] += sx;
    grad_params[2 * n + 1] += sy;
    grad_params[2 * n + 2] += cpu::lane_sum8(t0, len);
    grad_params[2 * n + 3] += cpu::lane_sum8(t1, len);
    grad_params[2 * n + 4] += sx * qy;
    grad_params[2 * n + 5] += sy * qy;
    for (int64_t i = 0; i < n; ++i) {
      const float cx = s[2 * i], dy = qy - s[2 * i + 1], wx = p[2 * i], wy = p[2 * i + 1];
      const float dy2 = dy * dy;
      const float* __restrict lgs = logs + i * kChunk;
      // The four sums in 8 lanes each, in cpu::lane_sum8's order, without storing the terms.
      float s0[8] = {}, s1[8] = {}, s2[8] = {}, s3[8] = {};
      const auto add = [&](int64_t j, int l) {
        const float dx = qx[j] - cx;
        const float r2 = dx * dx + dy2;
        const float phi = 0.5f * r2 * lgs[j];
        // <g, W_i> * dphi/dr2 * 2 = <g, W_i> (log r2 + 1); multiplied by (q - c_i), 0 at r2 = 0
        const float k = (gfx[j] * wx + gfy[j] * wy) * (lgs[j] + 1.0f);
        s0[l] += gfx[j] * phi;
        s1[l] += gfy[j] * phi;
        s2[l] += k * dx;
        s3[l] += k * dy;
      };
      int64_t j = 0;
      for (; j + 8 <= len; j += 8) {
        for (int l = 0; l < 8; ++l) add(j + l, l);
      }
      for (int l = 0; j < len; ++j, ++l) add(j, l);
      grad_params[2 * i] += cpu::lane_fold8(s0);
      grad_params[2 * i + 1] += cpu::lane_fold8(s1);
      grad_src[2 * i] -= cpu::lane_fold8(s2);
      grad_src[2 * i + 1] -= cpu::lane_fold8(s3);
    }
  } else {
    for (int64_t j = 0; j < len; ++j) {
      tps_eval_backward<acc>(qx[j], qy, s, p, n, Vec2<acc>{gfx[j], gfy[j]}, grad_src, grad_params);
    }
  }
}

// Taps of a chunk of output pixels, structure of arrays: element offsets into an image plane
// (strides sh, sw) and weights (bilinear), or offset and inside flag (nearest).
template <typename acc> struct TapChunk {
  alignas(64) int32_t o00[kChunk];
  alignas(64) int32_t o10[kChunk];
  alignas(64) int32_t o01[kChunk];
  alignas(64) int32_t o11[kChunk];
  alignas(64) acc w00[kChunk];
  alignas(64) acc w10[kChunk];
  alignas(64) acc w01[kChunk];
  alignas(64) acc w11[kChunk];
};

struct NearestChunk {
  alignas(64) int32_t offset[kChunk];
  alignas(64) int32_t inside[kChunk];
};

// kPadding and kAlignCorners are template parameters so that these loops have no branch and
// vectorize (the reflection's floor does not: that padding mode runs scalar).
template <typename acc, Padding kPadding, bool kAlignCorners>
C10_ALWAYS_INLINE void bilinear_taps_impl(const Geometry<acc>& g, const acc* __restrict fx, const acc* __restrict fy,
                                          int64_t len, bool* __restrict valid, TapChunk<acc>& t) {
  const int64_t H = g.H, W = g.W;
  const int32_t sh = static_cast<int32_t>(g.sh), sw = static_cast<int32_t>(g.sw);  // offsets fit int32 (checked)
  for (int64_t j = 0; j < len; ++j) {
    valid[j] = in_pixel_hull(fx[j], fy[j], H, W, kAlignCorners);
    const acc px = source_coordinate(fx[j], W, kPadding, kAlignCorners);
    const acc py = source_coordinate(fy[j], H, kPadding, kAlignCorners);
    const auto tap = bilinear_tap(px, py, H, W);
    t.o00[j] = tap.y0 * sh + tap.x0 * sw;
    t.o10[j] = tap.y0 * sh + tap.x1 * sw;
    t.o01[j] = tap.y1 * sh + tap.x0 * sw;
    t.o11[j] = tap.y1 * sh + tap.x1 * sw;
    t.w00[j] = tap.w00;
    t.w10[j] = tap.w10;
    t.w01[j] = tap.w01;
    t.w11[j] = tap.w11;
  }
}

template <typename acc, Padding kPadding, bool kAlignCorners>
C10_ALWAYS_INLINE void nearest_taps_impl(const Geometry<acc>& g, const acc* __restrict fx, const acc* __restrict fy,
                                         int64_t len, bool* __restrict valid, NearestChunk& t) {
  const int64_t H = g.H, W = g.W;
  const int32_t sh = static_cast<int32_t>(g.sh), sw = static_cast<int32_t>(g.sw);  // offsets fit int32 (checked)
  for (int64_t j = 0; j < len; ++j) {
    valid[j] = in_pixel_hull(fx[j], fy[j], H, W, kAlignCorners);
    const acc px = source_coordinate(fx[j], W, kPadding, kAlignCorners);
    const acc py = source_coordinate(fy[j], H, kPadding, kAlignCorners);
    const NearestTap tap = nearest_tap(px, py, H, W);
    t.offset[j] = tap.y * sh + tap.x * sw;
    t.inside[j] = tap.inside;
  }
}

// out[c, j] for the chunk's pixels j and all channels, from the taps (bilinear_combine of sampling.h).
template <typename scalar_t, typename acc>
C10_ALWAYS_INLINE void gather_bilinear_impl(const scalar_t* __restrict img, int64_t C, int64_t sc,
                                            scalar_t* __restrict out, int64_t osc, int64_t osw, int64_t len,
                                            const TapChunk<acc>& t, acc fill) {
  if (sc == 1 && C > 1) {  // channels_last: the C values of a tap are contiguous
    for (int64_t j = 0; j < len; ++j) {
      for (int64_t c = 0; c < C; ++c) {
        out[j * osw + c * osc] = static_cast<scalar_t>(
            bilinear_combine(img + c, t.o00[j], t.o10[j], t.o01[j], t.o11[j], t.w00[j], t.w10[j], t.w01[j], t.w11[j], fill));
      }
    }
  } else if (osw == 1) {
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* plane = img + c * sc;
      scalar_t* oc = out + c * osc;
      for (int64_t j = 0; j < len; ++j) {
        oc[j] = static_cast<scalar_t>(
            bilinear_combine(plane, t.o00[j], t.o10[j], t.o01[j], t.o11[j], t.w00[j], t.w10[j], t.w01[j], t.w11[j], fill));
      }
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* plane = img + c * sc;
      scalar_t* oc = out + c * osc;
      for (int64_t j = 0; j < len; ++j) {
        oc[j * osw] = static_cast<scalar_t>(
            bilinear_combine(plane, t.o00[j], t.o10[j], t.o01[j], t.o11[j], t.w00[j], t.w10[j], t.w01[j], t.w11[j], fill));
      }
    }
  }
}

// Row-pair taps (float32 images with unit stride along W, W >= 2, AVX2): tpswarp/cpu_pair_gather.h.
using PairChunk = cpu::PairTaps<kChunk>;

template <Padding kPadding, bool kAlignCorners>
C10_ALWAYS_INLINE void pair_taps_impl(const Geometry<float>& g, const float* __restrict fx, const float* __restrict fy,
                                      int64_t len, bool* __restrict valid, PairChunk& __restrict t) {
  const int64_t H = g.H, W = g.W;
  const int32_t sh = static_cast<int32_t>(g.sh), last = static_cast<int32_t>(W - 2);
  for (int64_t j = 0; j < len; ++j) {
    valid[j] = in_pixel_hull(fx[j], fy[j], H, W, kAlignCorners);
    const float px = source_coordinate(fx[j], W, kPadding, kAlignCorners);
    const float py = source_coordinate(fy[j], H, kPadding, kAlignCorners);
    cpu::set_pair_tap(t, j, bilinear_tap(px, py, H, W), sh, last);
  }
}

#if TPSWARP_X86_MULTIVERSION
template <Padding kPadding, bool kAlignCorners>
TPSWARP_TARGET_AVX2 void pair_taps_avx2(const Geometry<float>& g, const float* fx, const float* fy, int64_t len,
                                        bool* valid, PairChunk& t) {
  pair_taps_impl<kPadding, kAlignCorners>(g, fx, fy, len, valid, t);
}

using PairTapsFn = void (*)(const Geometry<float>&, const float*, const float*, int64_t, bool*, PairChunk&);

PairTapsFn pair_taps_kernel(Padding padding, bool align_corners) {
  switch (padding) {
    case Padding::Border: return align_corners ? &pair_taps_avx2<Padding::Border, true> : &pair_taps_avx2<Padding::Border, false>;
    case Padding::Reflection:
      return align_corners ? &pair_taps_avx2<Padding::Reflection, true> : &pair_taps_avx2<Padding::Reflection, false>;
    default: return align_corners ? &pair_taps_avx2<Padding::Zeros, true> : &pair_taps_avx2<Padding::Zeros, false>;
  }
}
// Backward row-pair taps of a chunk: the pair offsets and bilinear weights (the image-gradient
// scatter), the coefficients of d sample / d (px, py) moved onto the same pairs, and
// d (px, py) / d f (padding mode).
struct PairBackwardChunk : PairChunk {
  cpu::PairWeights<kChunk> dx, dy;
  alignas(64) float dpx[kChunk];
  alignas(64) float dpy[kChunk];
  alignas(64) int32_t xb[kChunk];  // the pairs' left column
};

template <Padding kPadding, bool kAlignCorners>
C10_ALWAYS_INLINE void pair_backward_taps_impl(const Geometry<float>& g, const float* __restrict fx,
                                               const float* __restrict fy, int64_t len,
                                               PairBackwardChunk& __restrict t) {
  const int64_t H = g.H, W = g.W;
  const int32_t sh = static_cast<int32_t>(g.sh), last = static_cast<int32_t>(W - 2);
  for (int64_t j = 0; j < len; ++j) {
    float dpx = 0, dpy = 0;
    const float px = source_coordinate(fx[j], W, kPadding, kAlignCorners, &dpx);
    const float py = source_coordinate(fy[j], H, kPadding, kAlignCorners, &dpy);
    const auto tap = bilinear_tap(px, py, H, W);
    const cpu::PairColumns pc = cpu::set_pair_tap(t, j, tap, sh, last);
    t.xb[j] = pc.xb;
    const auto k = bilinear_coord_coefs(tap);
    cpu::pair_weights(t.dx, j, pc, k.x00, k.x10, k.x01, k.x11);
    cpu::pair_weights(t.dy, j, pc, k.y00, k.y10, k.y01, k.y11);
    t.dpx[j] = dpx;
    t.dpy[j] = dpy;
  }
}

template <Padding kPadding, bool kAlignCorners>
TPSWARP_TARGET_AVX2 void pair_backward_taps_avx2(const Geometry<float>& g, const float* fx, const float* fy,
                                                 int64_t len, PairBackwardChunk& t) {
  pair_backward_taps_impl<kPadding, kAlignCorners>(g, fx, fy, len, t);
}

using PairBackwardTapsFn = void (*)(const Geometry<float>&, const float*, const float*, int64_t, PairBackwardChunk&);

PairBackwardTapsFn pair_backward_taps_kernel(Padding padding, bool align_corners) {
  switch (padding) {
    case Padding::Border:
      return align_corners ? &pair_backward_taps_avx2<Padding::Border, true>
                           : &pair_backward_taps_avx2<Padding::Border, false>;
    case Padding::Reflection:
      return align_corners ? &pair_backward_taps_avx2<Padding::Reflection, true>
                           : &pair_backward_taps_avx2<Padding::Reflection, false>;
    default:
      return align_corners ? &pair_backward_taps_avx2<Padding::Zeros, true>
                           : &pair_backward_taps_avx2<Padding::Zeros, false>;
  }
}

// lt (vtl - fill) + rt (vtr - fill) + lb (vbl - fill) + rb (vbr - fill) of one pixel (scalar tails).
C10_ALWAYS_INLINE float pair_form(const cpu::PairWeights<kChunk>& w, int64_t j, const float* plane, int32_t ot,
                                  int32_t ob, float fill) {
  return w.lt[j] * (plane[ot] - fill) + w.rt[j] * (plane[ot + 1] - fill) + w.lb[j] * (plane[ob] - fill) +
         w.rb[j] * (plane[ob + 1] - fill);
}

// gf = d <grad_out, out> / d f(q) for the chunk's pixels (coord_grad_impl through row pairs):
// per pixel, the sum over the channels (in order) of g_c * d sample_c / d (px, py), times
// d (px, py) / d f. `go` has unit stride along W.
TPSWARP_TARGET_AVX2 void pair_coord_grad_avx2(const float* __restrict img, int64_t C, int64_t sc,
                                              const float* __restrict go, int64_t gsc, int64_t len,
                                              const PairBackwardChunk& t, float fill, float* __restrict gfx,
                                              float* __restrict gfy) {
  const __m256i order = cpu::pair_lane_order();
  const __m256 f = _mm256_set1_ps(fill);
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    const cpu::PairWeightsAvx2 wx = cpu::load_pair_weights(t.dx, j), wy = cpu::load_pair_weights(t.dy, j);
    __m256 sx = _mm256_setzero_ps(), sy = _mm256_setzero_ps();
    const float* plane = img;
    const float* gc = go + j;
    for (int64_t c = 0; c < C; ++c, plane += sc, gc += gsc) {
      __m256 vtr, vbr;
      const __m256 vtl = cpu::load_pairs(plane, t.ot + j, &vtr);
      const __m256 vbl = cpu::load_pairs(plane, t.ob + j, &vbr);
      const __m256 g = _mm256_permutevar8x32_ps(_mm256_loadu_ps(gc), order);
      sx = _mm256_fmadd_ps(g, cpu::pair_combine(wx, vtl, vtr, vbl, vbr, f), sx);
      sy = _mm256_fmadd_ps(g, cpu::pair_combine(wy, vtl, vtr, vbl, vbr, f), sy);
    }
    _mm256_storeu_ps(gfx + j, _mm256_mul_ps(_mm256_permutevar8x32_ps(sx, order), _mm256_loadu_ps(t.dpx + j)));
    _mm256_storeu_ps(gfy + j, _mm256_mul_ps(_mm256_permutevar8x32_ps(sy, order), _mm256_loadu_ps(t.dpy + j)));
  }
  for (; j < len; ++j) {
    float sx = 0, sy = 0;
    for (int64_t c = 0; c < C; ++c) {
      const float* plane = img + c * sc;
      const float g = go[c * gsc + j];
      sx += g * pair_form(t.dx, j, plane, t.ot[j], t.ob[j], fill);
      sy += g * pair_form(t.dy, j, plane, t.ot[j], t.ob[j], fill);
    }
    gfx[j] = sx * t.dpx[j];
    gfy[j] = sy * t.dpy[j];
  }
}

// Image-gradient scatter of the chunk's pixels for channels [c0, c1) through row pairs: per pixel
// and channel, two 64-bit read-modify-writes (g * (lt, rt) at ot, g * (lb, rb) at ob) instead of
// four scalar ones; and for two neighbouring pixels (j, j + 1) whose pairs lie in the same rows
// within the 4 columns from pixel j's (the usual case), one 128-bit read-modify-write per row for
// both (pixel j + 1's weights shifted onto its columns). Neighbouring windows overlap, and a load
// that partly overlaps a store still in flight cannot be forwarded and stalls, so the pixel pairs go
// in kPairStride interleaved passes (units s, s + kPairStride, ...). The order is fixed:
// deterministic. Taps outside the image have weight 0 (and a valid, clamped offset). `go` has unit
// stride along W; `last4` = W - 4 (a window starting further right would leave its row).
constexpr int64_t kPairStride = 4;

TPSWARP_AVX2_INLINE void scatter_one_pair(float* gi, int64_t c0, int64_t c1, int64_t gisc, const float* go,
                                          int64_t gsc, const PairChunk& t, int64_t j) {
  const __m128 wt = _mm_setr_ps(t.lt[j], t.rt[j], 0.f, 0.f), wb = _mm_setr_ps(t.lb[j], t.rb[j], 0.f, 0.f);
  for (int64_t c = c0; c < c1; ++c) {
    const __m128 g = _mm_set1_ps(go[c * gsc + j]);
    double* top = reinterpret_cast<double*>(gi + c * gisc + t.ot[j]);
    _mm_store_sd(top, _mm_castps_pd(_mm_fmadd_ps(g, wt, _mm_castpd_ps(_mm_load_sd(top)))));
    double* bottom = reinterpret_cast<double*>(gi + c * gisc + t.ob[j]);
    _mm_store_sd(bottom, _mm_castps_pd(_mm_fmadd_ps(g, wb, _mm_castpd_ps(_mm_load_sd(bottom)))));
  }
}

TPSWARP_TARGET_AVX2 void scatter_pairs_avx2(float* gi, int64_t c0, int64_t c1, int64_t gisc, const float* go,
                                            int64_t gsc, int64_t len, const PairBackwardChunk& t, int32_t last4) {
  // (lt, rt, 0, 0) moved right by d = 0, 1, 2 columns (index 2 reads a 0), and the lanes of each
  // pixel's pair: the products are masked to them, so that a non-finite g reaches no other column
  // through g * 0
  alignas(16) static constexpr int32_t kShift[3][4] = {{0, 1, 2, 2}, {2, 0, 1, 2}, {2, 2, 0, 1}};
  alignas(16) static constexpr int32_t kLanes[3][4] = {{-1, -1, 0, 0}, {0, -1, -1, 0}, {0, 0, -1, -1}};
  const __m128 lanes_j = _mm_castsi128_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(kLanes[0])));
  const int64_t units = len / 2;
  for (int64_t s = 0; s < kPairStride; ++s) {
    for (int64_t u = s; u < units; u += kPairStride) {
      const int64_t j = 2 * u, k = j + 1;
      const int32_t dt = t.ot[k] - t.ot[j], db = t.ob[k] - t.ob[j];
      if (dt == db && dt >= 0 && dt <= 2 && t.xb[j] <= last4) {
        const __m128i shift = _mm_load_si128(reinterpret_cast<const __m128i*>(kShift[dt]));
        const __m128 lanes_k = _mm_castsi128_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(kLanes[dt])));
        const __m128 at = _mm_setr_ps(t.lt[j], t.rt[j], 0.f, 0.f), ab = _mm_setr_ps(t.lb[j], t.rb[j], 0.f, 0.f);
        const __m128 bt = _mm_permutevar_ps(_mm_setr_ps(t.lt[k], t.rt[k], 0.f, 0.f), shift);
        const __m128 bb = _mm_permutevar_ps(_mm_setr_ps(t.lb[k], t.rb[k], 0.f, 0.f), shift);
        for (int64_t c = c0; c < c1; ++c) {
          const __m128 gj = _mm_set1_ps(go[c * gsc + j]), gk = _mm_set1_ps(go[c * gsc + k]);
          float* top = gi + c * gisc + t.ot[j];
          const __m128 vt =
              _mm_add_ps(_mm_and_ps(lanes_j, _mm_mul_ps(gj, at)), _mm_and_ps(lanes_k, _mm_mul_ps(gk, bt)));
          _mm_storeu_ps(top, _mm_add_ps(_mm_loadu_ps(top), vt));
          float* bottom = gi + c * gisc + t.ob[j];
          const __m128 vb =
              _mm_add_ps(_mm_and_ps(lanes_j, _mm_mul_ps(gj, ab)), _mm_and_ps(lanes_k, _mm_mul_ps(gk, bb)));
          _mm_storeu_ps(bottom, _mm_add_ps(_mm_loadu_ps(bottom), vb));
        }
      } else {
        scatter_one_pair(gi, c0, c1, gisc, go, gsc, t, j);
        scatter_one_pair(gi, c0, c1, gisc, go, gsc, t, k);
      }
    }
  }
  if (len % 2) scatter_one_pair(gi, c0, c1, gisc, go, gsc, t, len - 1);
}
#endif

// Backward taps of a chunk (structure of arrays): tap offsets into the image plane and into the
// image-gradient plane, the tap weights (scatter), the coefficients of d sample / d (px, py)
// (bilinear_coord_coefs), d pixel / d normalized coordinate (padding mode), and the per-pixel
// sums over the channels of g_c * d sample_c / d (px, py).
template <typename acc> struct BackwardChunk {
  alignas(64) int32_t o00[kChunk];
  alignas(64) int32_t o10[kChunk];
  alignas(64) int32_t o01[kChunk];
  alignas(64) int32_t o11[kChunk];
  alignas(64) int32_t g00[kChunk];
  alignas(64) int32_t g10[kChunk];
  alignas(64) int32_t g01[kChunk];
  alignas(64) int32_t g11[kChunk];
  alignas(64) acc w00[kChunk];
  alignas(64) acc w10[kChunk];
  alignas(64) acc w01[kChunk];
  alignas(64) acc w11[kChunk];
  alignas(64) acc x00[kChunk];
  alignas(64) acc x10[kChunk];
  alignas(64) acc x01[kChunk];
  alignas(64) acc x11[kChunk];
  alignas(64) acc y00[kChunk];
  alignas(64) acc y10[kChunk];
  alignas(64) acc y01[kChunk];
  alignas(64) acc y11[kChunk];
  alignas(64) acc dpx[kChunk];
  alignas(64) acc dpy[kChunk];
  alignas(64) acc sx[kChunk];
  alignas(64) acc sy[kChunk];
};

template <typename acc, Padding kPadding, bool kAlignCorners>
C10_ALWAYS_INLINE void backward_taps_impl(const Geometry<acc>& g, int32_t gsh, int32_t gsw, const acc* __restrict fx,
                                          const acc* __restrict fy, int64_t len, BackwardChunk<acc>& __restrict t) {
  const int64_t H = g.H, W = g.W;
  const int32_t sh = static_cast<int32_t>(g.sh), sw = static_cast<int32_t>(g.sw);  // offsets fit int32 (checked)
  for (int64_t j = 0; j < len; ++j) {
    acc dpx = 0, dpy = 0;
    const acc px = source_coordinate(fx[j], W, kPadding, kAlignCorners, &dpx);
    const acc py = source_coordinate(fy[j], H, kPadding, kAlignCorners, &dpy);
    const auto tap = bilinear_tap(px, py, H, W);
    const auto k = bilinear_coord_coefs(tap);
    t.o00[j] = tap.y0 * sh + tap.x0 * sw;
    t.o10[j] = tap.y0 * sh + tap.x1 * sw;
    t.o01[j] = tap.y1 * sh + tap.x0 * sw;
    t.o11[j] = tap.y1 * sh + tap.x1 * sw;
    t.g00[j] = tap.y0 * gsh + tap.x0 * gsw;
    t.g10[j] = tap.y0 * gsh + tap.x1 * gsw;
    t.g01[j] = tap.y1 * gsh + tap.x0 * gsw;
    t.g11[j] = tap.y1 * gsh + tap.x1 * gsw;
    t.w00[j] = tap.w00;
    t.w10[j] = tap.w10;
    t.w01[j] = tap.w01;
    t.w11[j] = tap.w11;
    t.x00[j] = k.x00;
    t.x10[j] = k.x10;
    t.x01[j] = k.x01;
    t.x11[j] = k.x11;
    t.y00[j] = k.y00;
    t.y10[j] = k.y10;
    t.y01[j] = k.y01;
    t.y11[j] = k.y11;
    t.dpx[j] = dpx;
    t.dpy[j] = dpy;
    t.sx[j] = 0;
    t.sy[j] = 0;
  }
}

// gf = d <grad_out, out> / d f(q) for the chunk's pixels: sum over the channels (in order) of
// g_c * d sample_c / d (px, py), times d (px, py) / d f(q).
template <typename scalar_t, typename acc>
C10_ALWAYS_INLINE void coord_grad_impl(const scalar_t* __restrict img, int64_t C, int64_t sc,
                                       const scalar_t* __restrict go, int64_t gsc, int64_t gsw, int64_t len,
                                       BackwardChunk<acc>& __restrict t, acc fill, acc* __restrict gfx,
                                       acc* __restrict gfy) {
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* plane = img + c * sc;
    const scalar_t* gc = go + c * gsc;
    for (int64_t j = 0; j < len; ++j) {
      const BilinearCoordCoefs<acc> k{t.x00[j], t.x10[j], t.x01[j], t.x11[j], t.y00[j], t.y10[j], t.y01[j], t.y11[j]};
      const auto d = bilinear_coord_combine(plane, t.o00[j], t.o10[j], t.o01[j], t.o11[j], k, fill);
      const acc g = static_cast<acc>(gc[j * gsw]);
      t.sx[j] += g * d.x;
      t.sy[j] += g * d.y;
    }
  }
  for (int64_t j = 0; j < len; ++j) {
    gfx[j] = t.sx[j] * t.dpx[j];
    gfy[j] = t.sy[j] * t.dpy[j];
  }
}

// gp[offset[j]] += value[j] for j < len, in order; a run of equal offsets (neighbouring output
// pixels in the same input cell) is summed in a register first, so that consecutive additions do
// not wait on each other through memory.
template <typename acc>
C10_ALWAYS_INLINE void scatter_runs(acc* gp, const int32_t* __restrict offset, const acc* __restrict value, int64_t len) {
  if (len == 0) return;
  int32_t at = offset[0];
  acc run = value[0];
  for (int64_t j = 1; j < len; ++j) {
    if (offset[j] == at) {
      run += value[j];
    } else {
      gp[at] += run;
      at = offset[j];
      run = value[j];
    }
  }
  gp[at] += run;
}

// Image-gradient scatter of the chunk's pixels for channels [c0, c1). One tap at a time over the
// chunk: consecutive additions then mostly hit different elements (pixel j's tap 00 and pixel
// j + 1's tap 00 are neighbours), instead of waiting on each other through memory (pixel j's tap
// 10 is often pixel j + 1's tap 00). The order is fixed: deterministic. Taps outside the image
// have weight 0 (and a valid, clamped offset).
template <typename scalar_t, typename acc>
void scatter_chunk(acc* gi, int64_t c0, int64_t c1, int64_t gisc, const scalar_t* go, int64_t gsc, int64_t gsw,
                   int64_t len, const BackwardChunk<acc>& t, acc* g) {
  for (int64_t c = c0; c < c1; ++c) {
    acc* gp = gi + c * gisc;
    const scalar_t* gc = go + c * gsc;
    acc* __restrict v00 = g;  // the four contributions g_j * w_k[j], computed first (vectorized)
    acc* __restrict v10 = g + kChunk;
    acc* __restrict v01 = g + 2 * kChunk;
    acc* __restrict v11 = g + 3 * kChunk;
    for (int64_t j = 0; j < len; ++j) {
      const acc gj = static_cast<acc>(gc[j * gsw]);
      v00[j] = gj * t.w00[j];
      v10[j] = gj * t.w10[j];
      v01[j] = gj * t.w01[j];
      v11[j] = gj * t.w11[j];
    }
    scatter_runs(gp, t.g00, v00, len);
    scatter_runs(gp, t.g10, v10, len);
    scatter_runs(gp, t.g01, v01, len);
    scatter_runs(gp, t.g11, v11, len);
  }
}

// The two ISA versions of each vectorized block (separate functions, each small enough for the
// compiler to inline everything in it), and the run-time choice between them.
template <typename acc> void tps_row_base(const Geometry<acc>& g, int64_t b, acc qy, int64_t j0, int64_t len, acc* fx, acc* fy) {
  tps_row_impl<acc, false>(g, b, qy, j0, len, fx, fy, nullptr);
}
template <typename acc> void tps_row_logs_base(const Geometry<acc>& g, int64_t b, acc qy, int64_t j0, int64_t len,
                                               acc* fx, acc* fy, acc* logs) {
  tps_row_impl<acc, true>(g, b, qy, j0, len, fx, fy, logs);
}
template <typename acc> void tps_row_backward_base(const Geometry<acc>& g, int64_t b, acc qy, int64_t j0, int64_t len,
                                                   const acc* gfx, const acc* gfy, const acc* logs, acc* grad) {
  tps_row_backward_impl(g, b, qy, j0, len, gfx, gfy, logs, grad);
}
template <typename acc, Padding kPadding, bool kAlignCorners>
void bilinear_taps_base(const Geometry<acc>& g, const acc* fx, const acc* fy, int64_t len, bool* valid, TapChunk<acc>& t) {
  bilinear_taps_impl<acc, kPadding, kAlignCorners>(g, fx, fy, len, valid, t);
}
template <typename acc, Padding kPadding, bool kAlignCorners>
void nearest_taps_base(const Geometry<acc>& g, const acc* fx, const acc* fy, int64_t len, bool* valid, NearestChunk& t) {
  nearest_taps_impl<acc, kPadding, kAlignCorners>(g, fx, fy, len, valid, t);
}
template <typename scalar_t, typename acc>
void gather_bilinear_base(const scalar_t* img, int64_t C, int64_t sc, scalar_t* out, int64_t osc, int64_t osw,
                          int64_t len, const TapChunk<acc>& t, acc fill) {
  gather_bilinear_impl(img, C, sc, out, osc, osw, len, t, fill);
}
template <typename acc, Padding kPadding, bool kAlignCorners>
void backward_taps_base(const Geometry<acc>& g, int32_t gsh, int32_t gsw, const acc* fx, const acc* fy, int64_t len,
                        BackwardChunk<acc>& t) {
  backward_taps_impl<acc, kPadding, kAlignCorners>(g, gsh, gsw, fx, fy, len, t);
}
template <typename scalar_t, typename acc>
void coord_grad_base(const scalar_t* img, int64_t C, int64_t sc, const scalar_t* go, int64_t gsc, int64_t gsw,
                     int64_t len, BackwardChunk<acc>& t, acc fill, acc* gfx, acc* gfy) {
  coord_grad_impl(img, C, sc, go, gsc, gsw, len, t, fill, gfx, gfy);
}
#if TPSWARP_X86_MULTIVERSION
template <typename acc> TPSWARP_TARGET_AVX2 void tps_row_avx2(const Geometry<acc>& g, int64_t b, acc qy, int64_t j0,
                                                              int64_t len, acc* fx, acc* fy) {
  tps_row_impl<acc, false>(g, b, qy, j0, len, fx, fy, nullptr);
}
template <typename acc> TPSWARP_TARGET_AVX2 void tps_row_logs_avx2(const Geometry<acc>& g, int64_t b, acc qy,
                                                                   int64_t j0, int64_t len, acc* fx, acc* fy,
                                                                   acc* logs) {
  tps_row_impl<acc, true>(g, b, qy, j0, len, fx, fy, logs);
}
template <typename acc> TPSWARP_TARGET_AVX2 void tps_row_backward_avx2(const Geometry<acc>& g, int64_t b, acc qy,
                                                                       int64_t j0, int64_t len, const acc* gfx,
                                                                       const acc* gfy, const acc* logs, acc* grad) {
  tps_row_backward_impl(g, b, qy, j0, len, gfx, gfy, logs, grad);
}
template <typename acc, Padding kPadding, bool kAlignCorners>
TPSWARP_TARGET_AVX2 void bilinear_taps_avx2(const Geometry<acc>& g, const acc* fx, const acc* fy, int64_t len,
                                            bool* valid, TapChunk<acc>& t) {
  bilinear_taps_impl<acc, kPadding, kAlignCorners>(g, fx, fy, len, valid, t);
}
template <typename acc, Padding kPadding, bool kAlignCorners>
TPSWARP_TARGET_AVX2 void nearest_taps_avx2(const Geometry<acc>& g, const acc* fx, const acc* fy, int64_t len,
                                           bool* valid, NearestChunk& t) {
  nearest_taps_impl<acc, kPadding, kAlignCorners>(g, fx, fy, len, valid, t);
}
template <typename scalar_t, typename acc>
TPSWARP_TARGET_AVX2 void gather_bilinear_avx2(const scalar_t* img, int64_t C, int64_t sc, scalar_t* out, int64_t osc,
                                              int64_t osw, int64_t len, const TapChunk<acc>& t, acc fill) {
  gather_bilinear_impl(img, C, sc, out, osc, osw, len, t, fill);
}
template <typename acc, Padding kPadding, bool kAlignCorners>
TPSWARP_TARGET_AVX2 void backward_taps_avx2(const Geometry<acc>& g, int32_t gsh, int32_t gsw, const acc* fx,
                                            const acc* fy, int64_t len, BackwardChunk<acc>& t) {
  backward_taps_impl<acc, kPadding, kAlignCorners>(g, gsh, gsw, fx, fy, len, t);
}
template <typename scalar_t, typename acc>
TPSWARP_TARGET_AVX2 void coord_grad_avx2(const scalar_t* img, int64_t C, int64_t sc, const scalar_t* go, int64_t gsc,
                                         int64_t gsw, int64_t len, BackwardChunk<acc>& t, acc fill, acc* gfx,
                                         acc* gfy) {
  coord_grad_impl(img, C, sc, go, gsc, gsw, len, t, fill, gfx, gfy);
}
#endif

using cpu::cpu_has_avx2;

template <typename acc> struct RowKernels {
  void (*tps_row)(const Geometry<acc>&, int64_t, acc, int64_t, int64_t, acc*, acc*);
  void (*tps_row_logs)(const Geometry<acc>&, int64_t, acc, int64_t, int64_t, acc*, acc*, acc*);
  void (*tps_row_backward)(const Geometry<acc>&, int64_t, acc, int64_t, int64_t, const acc*, const acc*, const acc*,
                           acc*);
  void (*bilinear_taps)(const Geometry<acc>&, const acc*, const acc*, int64_t, bool*, TapChunk<acc>&);
  void (*nearest_taps)(const Geometry<acc>&, const acc*, const acc*, int64_t, bool*, NearestChunk&);
  void (*backward_taps)(const Geometry<acc>&, int32_t, int32_t, const acc*, const acc*, int64_t, BackwardChunk<acc>&);
};

template <typename acc, bool kAvx2, Padding kPadding, bool kAlignCorners> RowKernels<acc> row_kernels_for() {
#if TPSWARP_X86_MULTIVERSION
  if (kAvx2) {
    return {&tps_row_avx2<acc>, &tps_row_logs_avx2<acc>, &tps_row_backward_avx2<acc>, &bilinear_taps_avx2<acc, kPadding, kAlignCorners>,
            &nearest_taps_avx2<acc, kPadding, kAlignCorners>, &backward_taps_avx2<acc, kPadding, kAlignCorners>};
  }
#endif
  return {&tps_row_base<acc>, &tps_row_logs_base<acc>, &tps_row_backward_base<acc>, &bilinear_taps_base<acc, kPadding, kAlignCorners>,
          &nearest_taps_base<acc, kPadding, kAlignCorners>, &backward_taps_base<acc, kPadding, kAlignCorners>};
}

template <typename acc, bool kAvx2, Padding kPadding> RowKernels<acc> row_kernels_padding(bool align_corners) {
  return align_corners ? row_kernels_for<acc, kAvx2, kPadding, true>() : row_kernels_for<acc, kAvx2, kPadding, false>();
}

template <typename acc, bool kAvx2> RowKernels<acc> row_kernels_isa(Padding padding, bool align_corners) {
  switch (padding) {
    case Padding::Border: return row_kernels_padding<acc, kAvx2, Padding::Border>(align_corners);
    case Padding::Reflection: return row_kernels_padding<acc, kAvx2, Padding::Reflection>(align_corners);
    default: return row_kernels_padding<acc, kAvx2, Padding::Zeros>(align_corners);
  }
}

// The vectorized row kernels for this CPU (AVX2+FMA or the baseline ISA), padding mode and align_corners.
template <typename acc> RowKernels<acc> row_kernels(Padding padding, bool align_corners) {
  return cpu_has_avx2() ? row_kernels_isa<acc, true>(padding, align_corners)
                        : row_kernels_isa<acc, false>(padding, align_corners);
}

template <typename scalar_t, typename acc> auto coord_grad_kernel() {
#if TPSWARP_X86_MULTIVERSION
  if (cpu_has_avx2()) return &coord_grad_avx2<scalar_t, acc>;
#endif
  return &coord_grad_base<scalar_t, acc>;
}

template <typename scalar_t, typename acc> auto gather_bilinear_kernel() {
#if TPSWARP_X86_MULTIVERSION
  if (cpu_has_avx2()) return &gather_bilinear_avx2<scalar_t, acc>;
#endif
  return &gather_bilinear_base<scalar_t, acc>;
}

// ---------------------------------------------------------------------------------------------
// Host helpers
// ---------------------------------------------------------------------------------------------

struct Prepared {
  at::Tensor src, params;  // compute dtype, contiguous
  at::Tensor qx;           // (Wo,) compute dtype
};

Prepared prepare(const at::Tensor& src, const at::Tensor& params, at::ScalarType ct, const WarpConfig& cfg) {
  Prepared p;
  p.src = src.to(ct).contiguous();
  p.params = params.to(ct).contiguous();
  p.qx = at::empty({cfg.Wo}, src.options().dtype(ct));
  AT_DISPATCH_FLOATING_TYPES(ct, "tps_warp_qx", [&] {
    scalar_t* q = p.qx.mutable_data_ptr<scalar_t>();
    for (int64_t j = 0; j < cfg.Wo; ++j) q[j] = pixel_to_normalized<scalar_t>(j, cfg.Wo, cfg.align_corners);
  });
  return p;
}

template <typename acc> Geometry<acc> geometry(const WarpConfig& cfg, const Prepared& p, const at::Tensor& image) {
  return {cfg.H, cfg.W, cfg.Ho, cfg.Wo, cfg.n, image.stride(2), image.stride(3), cfg.padding, cfg.align_corners,
          p.qx.const_data_ptr<acc>(), p.src.const_data_ptr<acc>(), p.params.const_data_ptr<acc>()};
}


template <typename F> void dispatch_compute(at::ScalarType ct, F&& f) {
  if (ct == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

// The vectorized paths index an image plane with int32 element offsets (y * stride_h + x * stride_w).
bool plane_offsets_fit_int32(const at::Tensor& image) {
  const int64_t extent = (image.size(2) - 1) * image.stride(2) + (image.size(3) - 1) * image.stride(3);
  return extent <= std::numeric_limits<int32_t>::max();
}

int64_t rows_grain(int64_t Wo, int64_t C) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, Wo * (C + 8)));
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc>
void forward_bilinear(const WarpConfig& cfg, const Geometry<acc>& geo, const at::Tensor& image, at::Tensor& out,
                      at::Tensor& valid) {
  const auto kernels = row_kernels<acc>(cfg.padding, cfg.align_corners);
  const auto gather = gather_bilinear_kernel<scalar_t, acc>();
  const scalar_t* img = image.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  bool* v = valid.mutable_data_ptr<bool>();
  const Strides4 is = strides4(image), os = strides4(out);
  const int64_t C = cfg.C, Ho = cfg.Ho, Wo = cfg.Wo;
  const acc fill = static_cast<acc>(cfg.fill);
  const bool fast = plane_offsets_fit_int32(image);
#if TPSWARP_X86_MULTIVERSION
  // float32, unit stride along W (NCHW), W >= 2, AVX2: row-pair loads
  constexpr bool kFloat = std::is_same_v<scalar_t, float> && std::is_same_v<acc, float>;
  const bool pairs = kFloat && fast && cpu_has_avx2() && is.w == 1 && os.w == 1 && cfg.W >= 2;
  const auto pair_taps = pair_taps_kernel(cfg.padding, cfg.align_corners);
#endif
  at::parallel_for(0, cfg.B * Ho, rows_grain(Wo, C), [&](int64_t begin, int64_t end) {
    std::vector<acc> buf(2 * kChunk);
    acc* fx = buf.data();
    acc* fy = fx + kChunk;
    auto taps = std::make_unique<TapChunk<acc>>();
#if TPSWARP_X86_MULTIVERSION
    auto pair_chunk = std::make_unique<PairChunk>();
#endif
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / Ho, i = r % Ho;
      const acc qy = pixel_to_normalized<acc>(i, Ho, cfg.align_corners);
      for (int64_t j0 = 0; j0 < Wo; j0 += kChunk) {
        const int64_t len = std::min(kChunk, Wo - j0);
        kernels.tps_row(geo, b, qy, j0, len, fx, fy);
        bool* vr = v + r * Wo + j0;
        const scalar_t* img_b = img + b * is.b;
        scalar_t* o_row = o + b * os.b + i * os.h + j0 * os.w;
#if TPSWARP_X86_MULTIVERSION
        if constexpr (kFloat) {
          if (pairs) {
            pair_taps(geo, fx, fy, len, vr, *pair_chunk);
            cpu::prefetch_next_bottom_rows(img_b, C, is.c, is.h, pair_chunk->ob, len);
            cpu::gather_pairs_avx2(img_b, C, is.c, o_row, os.c, len, *pair_chunk, fill);
            continue;
          }
        }
#endif
        if (fast) {
          kernels.bilinear_taps(geo, fx, fy, len, vr, *taps);
          gather(img_b, C, is.c, o_row, os.c, os.w, len, *taps, fill);
          continue;
        }
        for (int64_t j = 0; j < len; ++j) {  // int64 offsets: one pixel at a time
          vr[j] = in_pixel_hull(fx[j], fy[j], cfg.H, cfg.W, cfg.align_corners);
          const acc px = source_coordinate(fx[j], cfg.W, cfg.padding, cfg.align_corners);
          const acc py = source_coordinate(fy[j], cfg.H, cfg.padding, cfg.align_corners);
          const auto tap = bilinear_tap(px, py, cfg.H, cfg.W);
          for (int64_t c = 0; c < C; ++c) {
            o_row[j * os.w + c * os.c] = static_cast<scalar_t>(bilinear_sample(img_b + c * is.c, is.h, is.w, tap, fill));
          }
        }
      }
    }
  });
}

template <typename raw_t, typename acc>
void forward_nearest(const WarpConfig& cfg, const Geometry<acc>& geo, const at::Tensor& image, at::Tensor& out,
                     at::Tensor& valid, uint64_t fill_raw) {
  const auto kernels = row_kernels<acc>(cfg.padding, cfg.align_corners);
  const raw_t* img = static_cast<const raw_t*>(image.const_data_ptr());
  raw_t* o = static_cast<raw_t*>(out.mutable_data_ptr());
  bool* v = valid.mutable_data_ptr<bool>();
  const Strides4 is = strides4(image), os = strides4(out);
  const int64_t C = cfg.C, Ho = cfg.Ho, Wo = cfg.Wo;
  raw_t fill;
  std::memcpy(&fill, &fill_raw, sizeof(raw_t));
  const bool fast = plane_offsets_fit_int32(image);
  at::parallel_for(0, cfg.B * Ho, rows_grain(Wo, C), [&](int64_t begin, int64_t end) {
    std::vector<acc> buf(2 * kChunk);
    acc* fx = buf.data();
    acc* fy = fx + kChunk;
    auto taps = std::make_unique<NearestChunk>();
    const NearestChunk& t = *taps;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / Ho, i = r % Ho;
      const acc qy = pixel_to_normalized<acc>(i, Ho, cfg.align_corners);
      for (int64_t j0 = 0; j0 < Wo; j0 += kChunk) {
        const int64_t len = std::min(kChunk, Wo - j0);
        kernels.tps_row(geo, b, qy, j0, len, fx, fy);
        bool* vr = v + r * Wo + j0;
        const raw_t* img_b = img + b * is.b;
        raw_t* o_row = o + b * os.b + i * os.h + j0 * os.w;
        if (fast) {
          kernels.nearest_taps(geo, fx, fy, len, vr, *taps);
          for (int64_t c = 0; c < C; ++c) {
            const raw_t* plane = img_b + c * is.c;
            raw_t* oc = o_row + c * os.c;
            for (int64_t j = 0; j < len; ++j) oc[j * os.w] = t.inside[j] ? plane[t.offset[j]] : fill;
          }
          continue;
        }
        for (int64_t j = 0; j < len; ++j) {  // int64 offsets: one pixel at a time
          vr[j] = in_pixel_hull(fx[j], fy[j], cfg.H, cfg.W, cfg.align_corners);
          const acc px = source_coordinate(fx[j], cfg.W, cfg.padding, cfg.align_corners);
          const acc py = source_coordinate(fy[j], cfg.H, cfg.padding, cfg.align_corners);
          const NearestTap tap = nearest_tap(px, py, cfg.H, cfg.W);
          const raw_t* px_in = img_b + tap.y * is.h + tap.x * is.w;
          for (int64_t c = 0; c < C; ++c) o_row[j * os.w + c * os.c] = tap.inside ? px_in[c * is.c] : fill;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> tps_warp_cpu(const at::Tensor& image, const at::Tensor& src, const at::Tensor& params,
                                                c10::string_view mode, c10::string_view padding_mode, bool align_corners,
                                                double fill, at::OptionalIntArrayRef size) {
  const WarpConfig cfg = warp_config(image, src, params, mode, padding_mode, align_corners, fill, size, kOp);
  const auto ct = warp_compute_dtype(image, src, params);
  auto out = at::empty({cfg.B, cfg.C, cfg.Ho, cfg.Wo}, image.options().memory_format(warp_memory_format(image)));
  auto valid = at::empty({cfg.B, 1, cfg.Ho, cfg.Wo}, image.options().dtype(at::kBool));
  if (valid.numel() == 0) return {out, valid};
  const uint64_t fill_raw = cfg.mode == Interp::Nearest ? warp_fill_bits(fill, image.scalar_type()) : 0;
  const Prepared prep = prepare(src, params, ct, cfg);
  // With C == 0 there is nothing to sample but `valid` is still computed (as a 0-channel copy).
  dispatch_compute(ct, [&](auto zero) {
    using acc = decltype(zero);
    const auto geo = geometry<acc>(cfg, prep, image);
    if (cfg.mode == Interp::Bilinear) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "tps_warp_cpu", [&] {
        forward_bilinear<scalar_t, acc>(cfg, geo, image, out, valid);
      });
    } else {
      switch (image.element_size()) {
        case 1: forward_nearest<uint8_t, acc>(cfg, geo, image, out, valid, fill_raw); break;
        case 2: forward_nearest<uint16_t, acc>(cfg, geo, image, out, valid, fill_raw); break;
        case 4: forward_nearest<uint32_t, acc>(cfg, geo, image, out, valid, fill_raw); break;
        case 8: forward_nearest<uint64_t, acc>(cfg, geo, image, out, valid, fill_raw); break;
        default: TORCH_CHECK_TYPE(false, kOp, ": unsupported `image` dtype ", image.scalar_type());
      }
    }
  });
  return {out, valid};
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc> struct BackwardArgs {
  const WarpConfig* cfg;
  Geometry<acc> geo;
  RowKernels<acc> kernels;
  decltype(coord_grad_kernel<scalar_t, acc>()) coord_grad;
  bool fast;  // int32 plane offsets (image and image gradient): the vectorized path
  bool pairs;  // float32, AVX2, unit stride along W, the image gradient laid out as the image: row pairs
  bool zero_rows;  // the image gradient is zeroed row by row just ahead of the scatter (zero_rows_upto)
#if TPSWARP_X86_MULTIVERSION
  PairBackwardTapsFn pair_taps;
#endif
  const scalar_t* image;
  Strides4 is;
  const scalar_t* grad_out;
  Strides4 gs;
  acc* grad_image;  // null when not requested; compute dtype, strides gis
  Strides4 gis;
  acc* partials;    // (B * Ho, P) row partial sums of the TPS gradients; null when not requested
  int64_t P;
  acc fill;
};

// Per-task buffers of the backward.
template <typename acc> struct BackwardWork {
  alignas(64) acc fx[kChunk];
  alignas(64) acc fy[kChunk];
  alignas(64) acc gfx[kChunk];
  alignas(64) acc gfy[kChunk];
  alignas(64) acc g[4 * kChunk];  // scatter scratch
  BackwardChunk<acc> taps;
#if TPSWARP_X86_MULTIVERSION
  PairBackwardChunk pair_taps;
#endif
  std::vector<acc> logs;  // (n, kChunk): log r2 of the TPS evaluation, reused by its backward

  int64_t zeroed = 0;     // rows [0, zeroed) of the task's image-gradient planes are zero (zero_rows)

  explicit BackwardWork(int64_t n) : logs(n * kChunk) {}
};

// Zeroing of the image gradient just ahead of the row-pair scatter (dense NCHW planes of rows of
// `row_len` elements): rows [zeroed, rows) of planes [c0, c1) are cleared when the scatter first
// needs one of them, so that they are still in cache when it adds to them, instead of in a
// separate pass over the whole gradient before it. Any order of the taps' rows is fine: a row is
// cleared once, before its first addition; the task clears the rest at its end.
template <typename acc>
void zero_rows_upto(acc* gi_b, int64_t c0, int64_t c1, int64_t gisc, int64_t row_len, int64_t rows, int64_t& zeroed) {
  if (rows <= zeroed) return;
  for (int64_t c = c0; c < c1; ++c) {
    std::memset(gi_b + c * gisc + zeroed * row_len, 0, static_cast<size_t>((rows - zeroed) * row_len) * sizeof(acc));
  }
  zeroed = rows;
}

// The columns [j0, j0 + len) of one output row, one pixel at a time (nearest, or int64 offsets).
template <typename scalar_t, typename acc>
void backward_pixels(const BackwardArgs<scalar_t, acc>& a, const scalar_t* img_b, const scalar_t* go_row, acc* gi_b,
                     int64_t c0, int64_t c1, bool scatter, bool coord, int64_t len, BackwardWork<acc>& w) {
  const WarpConfig& cfg = *a.cfg;
  const int64_t H = cfg.H, W = cfg.W, C = cfg.C;
  const bool ac = cfg.align_corners;
  for (int64_t j = 0; j < len; ++j) {
    const scalar_t* go = go_row + j * a.gs.w;
    if (cfg.mode == Interp::Nearest) {
      const acc px = source_coordinate(w.fx[j], W, cfg.padding, ac);
      const acc py = source_coordinate(w.fy[j], H, cfg.padding, ac);
      const NearestTap tap = nearest_tap(px, py, H, W);
      if (scatter && tap.inside) {
        acc* gp = gi_b + tap.y * a.gis.h + tap.x * a.gis.w;
        for (int64_t c = c0; c < c1; ++c) gp[c * a.gis.c] += static_cast<acc>(go[c * a.gs.c]);
      }
      continue;
    }
    acc dpx = 0, dpy = 0;
    const acc px = source_coordinate(w.fx[j], W, cfg.padding, ac, &dpx);
    const acc py = source_coordinate(w.fy[j], H, cfg.padding, ac, &dpy);
    const auto tap = bilinear_tap(px, py, H, W);
    if (coord) {
      acc gpx = 0, gpy = 0;
      for (int64_t c = 0; c < C; ++c) {
        const auto d = bilinear_sample_coord_grad(img_b + c * a.is.c, a.is.h, a.is.w, tap, a.fill,
                                                  static_cast<acc>(go[c * a.gs.c]));
        gpx += d.x;
        gpy += d.y;
      }
      w.gfx[j] = gpx * dpx;
      w.gfy[j] = gpy * dpy;
    }
    if (scatter) {
      for (int64_t c = c0; c < c1; ++c) {
        acc* gp = gi_b + c * a.gis.c;
        bilinear_scatter(tap, a.gis.h, a.gis.w, static_cast<acc>(go[c * a.gs.c]),
                         [gp](int64_t off, acc value) { gp[off] += value; });
      }
    }
  }
}

// One output row: the image-gradient scatter for channels [c0, c1) (if `scatter`), and the row's
// partial sums of the TPS gradients (if `coord`). Each part is identical whichever caller runs it.
template <typename scalar_t, typename acc>
void backward_row(const BackwardArgs<scalar_t, acc>& a, int64_t b, int64_t i, int64_t c0, int64_t c1, bool scatter,
                  bool coord, BackwardWork<acc>& w) {
  const WarpConfig& cfg = *a.cfg;
  const int64_t C = cfg.C, Wo = cfg.Wo;
  const acc qy = pixel_to_normalized<acc>(i, cfg.Ho, cfg.align_corners);
  acc* part = coord ? a.partials + (b * cfg.Ho + i) * a.P : nullptr;
  if (part) std::fill(part, part + a.P, acc(0));
  const scalar_t* img_b = a.image + b * a.is.b;
  acc* gi_b = scatter ? a.grad_image + b * a.gis.b : nullptr;
  const bool vectorized = a.fast && cfg.mode == Interp::Bilinear;
  for (int64_t j0 = 0; j0 < Wo; j0 += kChunk) {
    const int64_t len = std::min(kChunk, Wo - j0);
    const scalar_t* go = a.grad_out + b * a.gs.b + i * a.gs.h + j0 * a.gs.w;
    if (coord) {
      a.kernels.tps_row_logs(a.geo, b, qy, j0, len, w.fx, w.fy, w.logs.data());
    } else {
      a.kernels.tps_row(a.geo, b, qy, j0, len, w.fx, w.fy);
    }
#if TPSWARP_X86_MULTIVERSION
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc, float>) {
      if (a.pairs) {
        a.pair_taps(a.geo, w.fx, w.fy, len, w.pair_taps);
        if (coord) cpu::prefetch_next_bottom_rows(img_b, C, a.is.c, a.is.h, w.pair_taps.ob, len);
        if (scatter) {
          cpu::prefetch_next_bottom_rows(gi_b + c0 * a.gis.c, c1 - c0, a.gis.c, a.gis.h, w.pair_taps.ob, len);
        }
        if (coord) pair_coord_grad_avx2(img_b, C, a.is.c, go, a.gs.c, len, w.pair_taps, a.fill, w.gfx, w.gfy);
        if (scatter && a.zero_rows) {
          int32_t deepest = 0;  // the largest bottom-row offset (a top row is never below its bottom row)
          for (int64_t j = 0; j < len; ++j) deepest = std::max(deepest, w.pair_taps.ob[j]);
          zero_rows_upto(gi_b, c0, c1, a.gis.c, a.gis.h, deepest / a.gis.h + 1, w.zeroed);
        }
        if (scatter) {
          scatter_pairs_avx2(gi_b, c0, c1, a.gis.c, go, a.gs.c, len, w.pair_taps, static_cast<int32_t>(cfg.W - 4));
        }
        if (coord) a.kernels.tps_row_backward(a.geo, b, qy, j0, len, w.gfx, w.gfy, w.logs.data(), part);
        continue;
      }
    }
#endif
    if (vectorized) {
      a.kernels.backward_taps(a.geo, static_cast<int32_t>(a.gis.h), static_cast<int32_t>(a.gis.w), w.fx, w.fy, len,
                              w.taps);
      if (coord) a.coord_grad(img_b, C, a.is.c, go, a.gs.c, a.gs.w, len, w.taps, a.fill, w.gfx, w.gfy);
      if (scatter) scatter_chunk(gi_b, c0, c1, a.gis.c, go, a.gs.c, a.gs.w, len, w.taps, w.g);
    } else {
      backward_pixels(a, img_b, go, gi_b, c0, c1, scatter, coord, len, w);
    }
    if (coord) a.kernels.tps_row_backward(a.geo, b, qy, j0, len, w.gfx, w.gfy, w.logs.data(), part);
  }
}

template <typename scalar_t, typename acc>
void backward_impl(const BackwardArgs<scalar_t, acc>& a, bool need_image, bool need_coord) {
  const WarpConfig& cfg = *a.cfg;
  const int64_t B = cfg.B, C = cfg.C, Ho = cfg.Ho;
  const int64_t threads = std::max<int>(1, at::get_num_threads());
  // Channel groups of the image scatter: enough tasks for the threads when the batch is small.
  // (Any grouping gives the same sums: each element is still summed over the pixels in order.)
  const int64_t groups = need_image && B < threads ? std::min<int64_t>(std::max<int64_t>(C, 1), (threads + B - 1) / B) : 1;
  if (need_image && groups == 1) {
    // One task per batch item: scatter and (if needed) the TPS gradients in one sweep.
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      auto w = std::make_unique<BackwardWork<acc>>(cfg.n);
      for (int64_t b = begin; b < end; ++b) {
        w->zeroed = 0;
        for (int64_t i = 0; i < Ho; ++i) backward_row(a, b, i, 0, C, true, need_coord, *w);
        if (a.zero_rows) zero_rows_upto(a.grad_image + b * a.gis.b, 0, C, a.gis.c, a.gis.h, cfg.H, w->zeroed);
      }
    });
    return;
  }
  if (need_coord) {
    at::parallel_for(0, B * Ho, rows_grain(cfg.Wo, C), [&](int64_t begin, int64_t end) {
      auto w = std::make_unique<BackwardWork<acc>>(cfg.n);
      for (int64_t r = begin; r < end; ++r) backward_row(a, r / Ho, r % Ho, 0, 0, false, true, *w);
    });
  }
  if (need_image) {
    const int64_t per = (C + groups - 1) / groups;
    at::parallel_for(0, B * groups, 1, [&](int64_t begin, int64_t end) {
      auto w = std::make_unique<BackwardWork<acc>>(cfg.n);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / groups, c0 = (task % groups) * per, c1 = std::min(C, c0 + per);
        w->zeroed = 0;
        for (int64_t i = 0; i < Ho && c0 < c1; ++i) backward_row(a, b, i, c0, c1, true, false, *w);
        if (a.zero_rows) zero_rows_upto(a.grad_image + b * a.gis.b, c0, c1, a.gis.c, a.gis.h, cfg.H, w->zeroed);
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tps_warp_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& image, const at::Tensor& src, const at::Tensor& params,
    c10::string_view mode, c10::string_view padding_mode, bool align_corners, double fill,
    at::OptionalIntArrayRef size, std::array<bool, 3> output_mask) {
  const WarpConfig cfg = warp_config(image, src, params, mode, padding_mode, align_corners, fill, size, kOp);
  TORCH_CHECK_VALUE(grad_out_in.dim() == 4 && grad_out_in.size(0) == cfg.B && grad_out_in.size(1) == cfg.C &&
                        grad_out_in.size(2) == cfg.Ho && grad_out_in.size(3) == cfg.Wo,
                    kOp, ": `grad_out` must have shape (", show(cfg.B), ", ", show(cfg.C), ", ", show(cfg.Ho), ", ",
                    show(cfg.Wo), "), got ", show(grad_out_in.sizes()));
  TORCH_CHECK_TYPE(!output_mask[0] || at::isFloatingType(image.scalar_type()), kOp,
                   ": no gradient w.r.t. an `image` of dtype ", image.scalar_type());
  const auto ct = warp_compute_dtype(image, src, params);
  const auto fmt = warp_memory_format(image);
  const bool need_image = output_mask[0];
  const bool need_tps = output_mask[1] || output_mask[2];
  const bool need_coord = need_tps && cfg.mode == Interp::Bilinear;  // nearest: zero TPS gradients

  at::Tensor grad_acc;  // the image gradient in the compute dtype; zeroed below, or row by row (zero_rows)
  if (need_image) grad_acc = at::empty(image.sizes(), image.options().dtype(ct), fmt);
  at::Tensor partials;
  const int64_t P = tps_grad_width(cfg.n);
  if (need_coord) partials = at::empty({cfg.B * cfg.Ho, P}, src.options().dtype(ct));

  const bool work = cfg.B * cfg.Ho * cfg.Wo > 0 && cfg.C > 0 && (need_image || need_coord);
  if (need_image && !work) grad_acc.zero_();
  if (work) {
    const auto grad_out = grad_out_in.scalar_type() == image.scalar_type() ? grad_out_in : grad_out_in.to(image.scalar_type());
    const Prepared prep = prepare(src, params, ct, cfg);
    dispatch_compute(ct, [&](auto zero) {
      using acc = decltype(zero);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "tps_warp_backward_cpu", [&] {
        BackwardArgs<scalar_t, acc> a;
        a.cfg = &cfg;
        a.geo = geometry<acc>(cfg, prep, image);
        a.kernels = row_kernels<acc>(cfg.padding, cfg.align_corners);
        a.coord_grad = coord_grad_kernel<scalar_t, acc>();
        a.fast = plane_offsets_fit_int32(image) && (!need_image || plane_offsets_fit_int32(grad_acc));
        a.pairs = false;
#if TPSWARP_X86_MULTIVERSION
        a.pairs = std::is_same_v<scalar_t, float> && std::is_same_v<acc, float> && a.fast && cpu_has_avx2() &&
                  cfg.mode == Interp::Bilinear && cfg.W >= 2 && image.stride(3) == 1 && grad_out.stride(3) == 1 &&
                  (!need_image || (grad_acc.stride(3) == 1 && grad_acc.stride(2) == image.stride(2)));
        a.pair_taps = pair_backward_taps_kernel(cfg.padding, cfg.align_corners);
#endif
        a.zero_rows = need_image && a.pairs && grad_acc.stride(2) == cfg.W && grad_acc.stride(1) == cfg.H * cfg.W;
        if (need_image && !a.zero_rows) grad_acc.zero_();
        a.image = image.const_data_ptr<scalar_t>();
        a.is = strides4(image);
        a.grad_out = grad_out.const_data_ptr<scalar_t>();
        a.gs = strides4(grad_out);
        a.grad_image = need_image ? grad_acc.mutable_data_ptr<acc>() : nullptr;
        a.gis = need_image ? strides4(grad_acc) : Strides4{0, 0, 0, 0};
        a.partials = need_coord ? partials.mutable_data_ptr<acc>() : nullptr;
        a.P = P;
        a.fill = static_cast<acc>(fill);
        backward_impl(a, need_image, need_coord);
      });
    });
  }

  at::Tensor grad_image = at::empty({0}, image.options());
  if (need_image) grad_image = grad_acc.scalar_type() == image.scalar_type() ? grad_acc : grad_acc.to(image.scalar_type(), false, false, at::MemoryFormat::Preserve);

  at::Tensor grad_src = at::empty({0}, src.options()), grad_params = at::empty({0}, params.options());
  if (need_tps) {
    // Sum of the row partials, in row order (float64 accumulation), per batch item.
    auto total = at::zeros({cfg.B, P}, src.options().dtype(ct));
    if (need_coord && work) {
      AT_DISPATCH_FLOATING_TYPES(ct, "tps_warp_backward_reduce", [&] {
        const scalar_t* part = partials.const_data_ptr<scalar_t>();
        scalar_t* t = total.mutable_data_ptr<scalar_t>();
        const int64_t Ho = cfg.Ho;
        at::parallel_for(0, cfg.B, 1, [&](int64_t begin, int64_t end) {
          std::vector<double> sum(P);
          for (int64_t b = begin; b < end; ++b) {
            std::fill(sum.begin(), sum.end(), 0.0);
            for (int64_t i = 0; i < Ho; ++i) {
              const scalar_t* row = part + (b * Ho + i) * P;
              for (int64_t k = 0; k < P; ++k) sum[k] += static_cast<double>(row[k]);
            }
            for (int64_t k = 0; k < P; ++k) t[b * P + k] = static_cast<scalar_t>(sum[k]);
          }
        });
      });
    }
    const int64_t n = cfg.n;
    if (output_mask[1]) grad_src = total.narrow(1, 0, 2 * n).reshape({cfg.B, n, 2}).to(src.scalar_type()).contiguous();
    if (output_mask[2]) {
      grad_params = total.narrow(1, 2 * n, 2 * (n + 3)).reshape({cfg.B, n + 3, 2}).to(params.scalar_type()).contiguous();
    }
  }
  return {grad_image, grad_src, grad_params};
}

}  // namespace

TORCH_LIBRARY_IMPL(tpswarp, CPU, m) {
  m.impl("tps_warp", &tps_warp_cpu);
  m.impl("_tps_warp_backward", &tps_warp_backward_cpu);
}

}  // namespace tpswarp
