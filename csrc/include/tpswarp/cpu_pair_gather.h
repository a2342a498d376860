// Bilinear gathers from float32 planes with unit stride along W through row pairs (CPU, AVX2),
// shared by tps_warp and warped_kl_div: the two taps of a row are read with one 64-bit load at
// columns (xb, xb + 1), xb = min(x0, W - 2). The four weights of bilinear_tap (tpswarp/sampling.h)
// are reassigned to those columns (a tap outside the image has weight 0 wherever it goes; two taps
// clamped onto one column read the same element), so that
//   out = fill + lt (v[ot] - fill) + rt (v[ot + 1] - fill) + lb (v[ob] - fill) + rb (v[ob + 1] - fill)
// is bilinear_combine of the same products; inside the image lt, rt, lb, rb are exactly w00, w10,
// w01, w11. Any other linear form of the four taps (the coefficients of d sample / d (px, py))
// is reassigned the same way (pair_weights).
#pragma once

#include <cstdint>

#include "tpswarp/cpu_features.h"  // TPSWARP_X86_MULTIVERSION, TPSWARP_TARGET_AVX2, cpu_has_avx2
#include "tpswarp/sampling.h"

namespace tpswarp {
namespace cpu {

// Weights of N pixels on their row pairs (structure of arrays).
template <int64_t N> struct PairWeights {
  alignas(64) float lt[N];
  alignas(64) float rt[N];
  alignas(64) float lb[N];
  alignas(64) float rb[N];
};

// Element offsets of the left column of the top (row y0) and bottom (row y1) pairs, and the weights.
template <int64_t N> struct PairTaps : PairWeights<N> {
  alignas(64) int32_t ot[N];
  alignas(64) int32_t ob[N];
};

// The left column xb of a tap's row pairs and whether its columns x0, x1 are xb (1) or xb + 1 (0),
// as floats (0/1 ints converted: the loops over these vectorize). `last` = W - 2.
struct PairColumns {
  int32_t xb;
  float x0_left, x1_left;
};

TPSWARP_INLINE PairColumns pair_columns(const BilinearTap<float>& tap, int32_t last) {
  const int32_t xb = tap.x0 < last ? tap.x0 : last;
  const int32_t l0 = tap.x0 == xb, l1 = tap.x1 == xb;
  return {xb, static_cast<float>(l0), static_cast<float>(l1)};
}

// Pixel j's coefficients (a00, a10, a01, a11) of the taps (x0, y0), (x1, y0), (x0, y1), (x1, y1)
// moved onto its row pairs.
template <int64_t N>
TPSWARP_INLINE void pair_weights(PairWeights<N>& w, int64_t j, const PairColumns& pc, float a00, float a10, float a01,
                                 float a11) {
  const float r0 = 1.f - pc.x0_left, r1 = 1.f - pc.x1_left;
  w.lt[j] = a00 * pc.x0_left + a10 * pc.x1_left;
  w.rt[j] = a00 * r0 + a10 * r1;
  w.lb[j] = a01 * pc.x0_left + a11 * pc.x1_left;
  w.rb[j] = a01 * r0 + a11 * r1;
}

// Pixel j's row-pair taps (offsets for a plane with row stride sh) and bilinear weights.
template <int64_t N>
TPSWARP_INLINE PairColumns set_pair_tap(PairTaps<N>& t, int64_t j, const BilinearTap<float>& tap, int32_t sh,
                                        int32_t last) {
  const PairColumns pc = pair_columns(tap, last);
  t.ot[j] = tap.y0 * sh + pc.xb;
  t.ob[j] = tap.y1 * sh + pc.xb;
  pair_weights(t, j, pc, tap.w00, tap.w10, tap.w01, tap.w11);
  return pc;
}

#if TPSWARP_X86_MULTIVERSION
// Prefetch, in planes [0, C) (`sc` apart), the pairs one image row (`sh`) below the bottom rows
// `ob` of len pixels (every 8th): where the bottom taps of the next output row usually are, and
// the rows that the hardware prefetcher cannot foresee (the top rows are the previous output row's
// bottom rows, already in cache). Prefetches do not fault: the addresses need not lie in the plane.
TPSWARP_INLINE void prefetch_next_bottom_rows(const float* img, int64_t C, int64_t sc, int64_t sh, const int32_t* ob,
                                              int64_t len) {
  const uintptr_t base = reinterpret_cast<uintptr_t>(img);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t j = 0; j < len; j += 8) {
      const int64_t off = (c * sc + ob[j] + sh) * static_cast<int64_t>(sizeof(float));
      _mm_prefetch(reinterpret_cast<const char*>(base + static_cast<uintptr_t>(off)), _MM_HINT_T0);
    }
  }
}

// The permutation of lanes that load_pairs produces (0, 1, 4, 5, 2, 3, 6, 7): its own inverse.
TPSWARP_AVX2_INLINE __m256i pair_lane_order() { return _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7); }

// Four row pairs (v[o], v[o + 1]) of eight pixels as (left, right) vectors, in the lane order
// of pair_lane_order (the order of _mm256_shuffle_ps over two 128-bit halves).
TPSWARP_AVX2_INLINE __m256 load_pairs(const float* p, const int32_t* o, __m256* right) {
  const __m128 a = _mm_castpd_ps(_mm_loadh_pd(_mm_load_sd(reinterpret_cast<const double*>(p + o[0])),
                                              reinterpret_cast<const double*>(p + o[1])));
  const __m128 b = _mm_castpd_ps(_mm_loadh_pd(_mm_load_sd(reinterpret_cast<const double*>(p + o[2])),
                                              reinterpret_cast<const double*>(p + o[3])));
  const __m128 c = _mm_castpd_ps(_mm_loadh_pd(_mm_load_sd(reinterpret_cast<const double*>(p + o[4])),
                                              reinterpret_cast<const double*>(p + o[5])));
  const __m128 d = _mm_castpd_ps(_mm_loadh_pd(_mm_load_sd(reinterpret_cast<const double*>(p + o[6])),
                                              reinterpret_cast<const double*>(p + o[7])));
  const __m256 lo = _mm256_set_m128(b, a), hi = _mm256_set_m128(d, c);
  *right = _mm256_shuffle_ps(lo, hi, 0xDD);
  return _mm256_shuffle_ps(lo, hi, 0x88);
}

// Weights of pixels j .. j + 7 in the lane order of load_pairs.
struct PairWeightsAvx2 {
  __m256 lt, rt, lb, rb;
};
template <int64_t N> TPSWARP_AVX2_INLINE PairWeightsAvx2 load_pair_weights(const PairWeights<N>& w, int64_t j) {
  const __m256i order = pair_lane_order();
  return {_mm256_permutevar8x32_ps(_mm256_loadu_ps(w.lt + j), order),
          _mm256_permutevar8x32_ps(_mm256_loadu_ps(w.rt + j), order),
          _mm256_permutevar8x32_ps(_mm256_loadu_ps(w.lb + j), order),
          _mm256_permutevar8x32_ps(_mm256_loadu_ps(w.rb + j), order)};
}

// lt (vtl - fill) + rt (vtr - fill) + lb (vbl - fill) + rb (vbr - fill), in bilinear_combine's order.
TPSWARP_AVX2_INLINE __m256 pair_combine(const PairWeightsAvx2& w, __m256 vtl, __m256 vtr, __m256 vbl,
                                               __m256 vbr, __m256 fill) {
  __m256 o = _mm256_mul_ps(w.lt, _mm256_sub_ps(vtl, fill));
  o = _mm256_fmadd_ps(w.rt, _mm256_sub_ps(vtr, fill), o);
  o = _mm256_fmadd_ps(w.lb, _mm256_sub_ps(vbl, fill), o);
  return _mm256_fmadd_ps(w.rb, _mm256_sub_ps(vbr, fill), o);
}

// out[c * osc + j] = the bilinear sample of plane c (planes `sc` apart) at the taps of pixel j < len.
template <int64_t N>
TPSWARP_TARGET_AVX2 void gather_pairs_avx2(const float* __restrict img, int64_t C, int64_t sc, float* __restrict out,
                                           int64_t osc, int64_t len, const PairTaps<N>& t, float fill) {
  const __m256i order = pair_lane_order();
  const __m256 f = _mm256_set1_ps(fill);
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    const PairWeightsAvx2 w = load_pair_weights(t, j);
    const float* plane = img;
    float* oc = out + j;
    for (int64_t c = 0; c < C; ++c, plane += sc, oc += osc) {
      __m256 vtr, vbr;
      const __m256 vtl = load_pairs(plane, t.ot + j, &vtr);
      const __m256 vbl = load_pairs(plane, t.ob + j, &vbr);
      _mm256_storeu_ps(oc, _mm256_permutevar8x32_ps(_mm256_add_ps(pair_combine(w, vtl, vtr, vbl, vbr, f), f), order));
    }
  }
  for (; j < len; ++j) {
    for (int64_t c = 0; c < C; ++c) {
      out[c * osc + j] = bilinear_combine(img + c * sc, int64_t(t.ot[j]), int64_t(t.ot[j]) + 1, int64_t(t.ob[j]),
                                          int64_t(t.ob[j]) + 1, t.lt[j], t.rt[j], t.lb[j], t.rb[j], fill);
    }
  }
}
#endif

}  // namespace cpu
}  // namespace tpswarp
