// Branch-free float exp/log written so that loops over them auto-vectorize (CPU only).
// Cephes-style range reduction and polynomials; about 1 ulp on the ranges used by the kernels.
//
// Always inlined: GCC does not inline a plain inline function into a caller compiled for another
// -march (the AVX2 clones of tpswarp/cpu_kl_block.h), so the vector loops called these one element
// at a time through the PLT, 10-20x slower than the vectorized code.
#pragma once

#include <cstdint>
#include <cstring>

#include "tpswarp/common.h"

#if defined(__GNUC__) || defined(__clang__)
#define TPSWARP_FORCE_INLINE inline __attribute__((always_inline))
#else
#define TPSWARP_FORCE_INLINE inline
#endif

TPSWARP_NO_TRAPPING_MATH_BEGIN  // vectorizable selects (tpswarp/common.h)

namespace tpswarp {
namespace cpu {

TPSWARP_FORCE_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}

TPSWARP_FORCE_INLINE int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return i;
}

// exp(x); inputs below -87.3 give ~1e-38 instead of a denormal or 0 (negligible in sums).
TPSWARP_FORCE_INLINE float fast_exp(float x) {
  x = x < -87.33654f ? -87.33654f : (x > 88.37626f ? 88.37626f : x);
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  return p * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
}

// log(2^e (1 + f)) for f in [sqrt(1/2) - 1, sqrt(2) - 1): the Cephes logf polynomial (the range
// reduction that gives f and e is the caller's).
TPSWARP_FORCE_INLINE float log_reduced(float f, float e) {
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return f + y + 0.693359375f * e;
}

// log(x) for x > 0 (denormals handled); x <= 0 is the caller's business (gives garbage).
TPSWARP_FORCE_INLINE float fast_log(float x) {
  const bool tiny = x < 1.17549435e-38f;
  x = tiny ? x * 8388608.0f : x;  // 2^23
  const int32_t bits = float_to_bits(x);
  float e = static_cast<float>((bits >> 23) - 127) - (tiny ? 23.0f : 0.0f);
  float m = bits_to_float((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1.0f : e;
  return log_reduced(m - 1.0f, e);
}

// The sum of 8 partial sums, in a fixed tree.
TPSWARP_FORCE_INLINE float lane_fold8(const float* s) {
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// sum_j x[j] in a fixed order (8 partial sums, then a fixed tree): vectorizes without
// reassociation, and the result does not depend on the ISA's vector width.
TPSWARP_FORCE_INLINE float lane_sum8(const float* __restrict x, int64_t len) {
  float s[8] = {};
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    for (int l = 0; l < 8; ++l) s[l] += x[j + l];
  }
  for (int l = 0; j < len; ++j, ++l) s[l] += x[j];
  return lane_fold8(s);
}

}  // namespace cpu
}  // namespace tpswarp

TPSWARP_NO_TRAPPING_MATH_END
