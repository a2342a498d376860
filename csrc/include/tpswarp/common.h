// Macros and small math helpers shared by the CPU and CUDA kernels.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TPSWARP_HOST_DEVICE __host__ __device__
#else
#define TPSWARP_HOST_DEVICE
#endif

// Forced inlining of the small per-pixel functions: the CPU kernels' inner loops are compiled with
// other options than these headers' default (function-level target attributes, target clones, the
// no-trapping-math region below), and GCC does not inline a plain `inline` function across such a
// difference: the call stays in the loop and stops its vectorization.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define TPSWARP_INLINE __forceinline__
#elif defined(__GNUC__)
#define TPSWARP_INLINE inline __attribute__((always_inline))
#else
#define TPSWARP_INLINE inline
#endif

// Code between TPSWARP_NO_TRAPPING_MATH_BEGIN and TPSWARP_NO_TRAPPING_MATH_END (CPU only) is
// compiled by GCC without -ftrapping-math: its loops vectorize only if GCC may evaluate both sides
// of a select, which the default forbids for arithmetic that "may trap". Nothing in tpswarp reads
// the floating-point exception flags, and the option changes no value (it enables no reassociation).
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define TPSWARP_NO_TRAPPING_MATH_BEGIN _Pragma("GCC push_options") _Pragma("GCC optimize(\"no-trapping-math\")")
#define TPSWARP_NO_TRAPPING_MATH_END _Pragma("GCC pop_options")
#else
#define TPSWARP_NO_TRAPPING_MATH_BEGIN
#define TPSWARP_NO_TRAPPING_MATH_END
#endif

namespace tpswarp {

// Accumulation type: float for float/half/bfloat16, double for double.
template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };
template <typename T> using acc_t = typename acc_type<T>::type;

TPSWARP_HOST_DEVICE TPSWARP_INLINE float exp_(float x) { return expf(x); }
TPSWARP_HOST_DEVICE TPSWARP_INLINE double exp_(double x) { return exp(x); }
// exp in the GPU's KL kernels (kl.h, kl_regs.cuh): on the device ex2.approx.ftz.f32 of x log2(e), as
// Triton compiles tl.exp (without ftz): 2 instructions instead of about 9 for expf, relative error about
// 2^-22 plus |x| 2^-24 (the rounding of x log2(e)). The KL kernels take exp of arguments <= 0 only
// (shifted by a maximum), where a result below 1e-9 is negligible beside the maximum's exp(0) = 1, and
// ftz's flushing of results below 2^-126 to 0 changes no sum. On the host, expf.
TPSWARP_HOST_DEVICE TPSWARP_INLINE float exp_gpu(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.44269504088896341f));
  return y;
#else
  return expf(x);
#endif
}
TPSWARP_HOST_DEVICE TPSWARP_INLINE double exp_gpu(double x) { return exp(x); }
TPSWARP_HOST_DEVICE TPSWARP_INLINE float log_(float x) { return logf(x); }
TPSWARP_HOST_DEVICE TPSWARP_INLINE double log_(double x) { return log(x); }
TPSWARP_HOST_DEVICE TPSWARP_INLINE float fma_(float a, float b, float c) { return fmaf(a, b, c); }
TPSWARP_HOST_DEVICE TPSWARP_INLINE double fma_(double a, double b, double c) { return fma(a, b, c); }
TPSWARP_HOST_DEVICE TPSWARP_INLINE float floor_(float x) { return floorf(x); }
TPSWARP_HOST_DEVICE TPSWARP_INLINE double floor_(double x) { return floor(x); }
TPSWARP_HOST_DEVICE TPSWARP_INLINE float abs_(float x) { return fabsf(x); }
TPSWARP_HOST_DEVICE TPSWARP_INLINE double abs_(double x) { return fabs(x); }
TPSWARP_HOST_DEVICE TPSWARP_INLINE float nearbyint_(float x) { return nearbyintf(x); }
TPSWARP_HOST_DEVICE TPSWARP_INLINE double nearbyint_(double x) { return nearbyint(x); }

template <typename T> TPSWARP_HOST_DEVICE TPSWARP_INLINE T max_(T a, T b) { return a > b ? a : b; }
template <typename T> TPSWARP_HOST_DEVICE TPSWARP_INLINE T min_(T a, T b) { return a < b ? a : b; }
template <typename T> TPSWARP_HOST_DEVICE TPSWARP_INLINE T clamp_(T x, T lo, T hi) { return min_(max_(x, lo), hi); }

// Reductions of the loss ops; the order matches the schema's `reduction` strings.
enum class Reduction : int { None = 0, Mean = 1, Sum = 2 };

}  // namespace tpswarp
