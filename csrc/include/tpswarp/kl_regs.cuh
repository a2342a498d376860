// CUDA-only: the per-pixel KL of tpswarp/kl.h for at most MAX_C classes (a compile-time bound),
// with the student and teacher class vectors loaded once into register arrays.
//
// The CUDA kernels' generic path (kl_pixel_online_loaded, then kl_pixel_grad_loaded: kl.h) sweeps
// the classes through its loaders once for the statistics and once more for the gradients: on the GPU
// each sweep is a chain of dependent loads per thread, and the second re-reads L2. Here all loads of
// a pixel are issued together (fully unrolled, independent), then the sweeps run on registers: the
// statistics in kl_pixel_loaded's two-sweep form (equal to the one-sweep ones up to rounding), the
// gradients, class by class and in the same order, those of kl_pixel_grad_loaded. Every loop runs to
// MAX_C with compile-time indices (a runtime index would move the arrays to local memory); classes
// c >= C are skipped by a warp-uniform predicate, so nothing is computed, loaded or stored for them.
#pragma once

#include <cstdlib>
#include <type_traits>

#include "tpswarp/kl.h"

namespace tpswarp {

// Fills s[c], t[c] for c < C from load_s(c), load_t(c) (0 for c >= C, never read).
template <int MAX_C, typename acc, typename LoadS, typename LoadT>
__device__ __forceinline__ void kl_load_regs(const LoadS& load_s, const LoadT& load_t, int C, acc (&s)[MAX_C],
                                             acc (&t)[MAX_C]) {
#pragma unroll
  for (int c = 0; c < MAX_C; ++c) {
    s[c] = c < C ? static_cast<acc>(load_s(c)) : acc(0);
    t[c] = c < C ? static_cast<acc>(load_t(c)) : acc(0);
  }
}

// kl_pixel_loaded on register arrays holding C >= 1 classes.
template <int MAX_C, typename acc>
__device__ __forceinline__ KLPixel<acc> kl_pixel_regs(const acc (&s)[MAX_C], const acc (&t)[MAX_C], int C,
                                                      bool teacher_is_logits) {
  acc s_max = s[0];
  acc t_max = t[0];
#pragma unroll
  for (int c = 1; c < MAX_C; ++c) {
    if (c < C) {
      s_max = max_(s_max, s[c]);
      if (teacher_is_logits) t_max = max_(t_max, t[c]);
    }
  }
  acc zs = 0, zt = 0, cross = 0, p_log_p = 0, p_sum = 0;
#pragma unroll
  for (int c = 0; c < MAX_C; ++c) {
    if (c < C) {
      const acc sc = s[c] - s_max;
      zs += exp_gpu(sc);
      const acc tc = t[c];
      if (teacher_is_logits) {
        const acc tsh = tc - t_max;
        const acc e = exp_gpu(tsh);
        zt += e;
        cross += e * (tsh - sc);
      } else {
        if (tc > 0) p_log_p += tc * log_(tc);
        cross += tc * sc;
        p_sum += tc;
      }
    }
  }
  return kl_finish<acc>(s_max, zs, t_max, zt, cross, p_log_p, p_sum, teacher_is_logits);
}

// kl_pixel_grad_loaded on register arrays: store_s(c, g) / store_t(c, g) for c < C only. The
// per-class formula is kl_pixel_grad_loaded's own, called for one class at a time.
template <int MAX_C, typename acc, typename StoreS, typename StoreT>
__device__ __forceinline__ void kl_pixel_grad_regs(const acc (&s)[MAX_C], const acc (&t)[MAX_C], int C,
                                                   bool teacher_is_logits, const KLPixel<acc>& st, acc scale,
                                                   bool want_s, const StoreS& store_s, bool want_t,
                                                   const StoreT& store_t) {
#pragma unroll
  for (int c = 0; c < MAX_C; ++c) {
    if (c < C) {
      const acc sc = s[c], tc = t[c];
      kl_pixel_grad_loaded<acc>(
          [&](int64_t) { return sc; }, [&](int64_t) { return tc; }, 1, teacher_is_logits, st, scale, want_s,
          [&](int64_t, acc g) { store_s(c, g); }, want_t, [&](int64_t, acc g) { store_t(c, g); });
    }
  }
}

// Host: whether the register path is enabled: only when the environment variable
// TPSWARP_CUDA_KL_REGS is "1" (read at each launch: an A/B switch for benchmarks). Off by default:
// on an H200 (19 classes, MAX_C = 32) it was slower than the generic loaders (masked forward
// 0.54 vs 0.38 ms, warped forward 1.76 vs 0.56 ms at 8 x 19 x 768 x 768;
// benchmarks/results/gpu/20261126T0155Z_ca32ef1_H200/).
inline bool kl_regs_enabled() {
  const char* v = std::getenv("TPSWARP_CUDA_KL_REGS");
  return v != nullptr && v[0] == '1' && v[1] == '\0';
}

// Host: calls f(std::integral_constant<int, MAX_C>) with the register bound for C classes: 8, 16
// or 32, or 0 (the generic loaders of kl.h) above 32 or with the register path disabled (the default).
template <typename F> inline void dispatch_max_classes(int64_t C, F&& f) {
  if (!kl_regs_enabled())
    f(std::integral_constant<int, 0>{});
  else if (C <= 8)
    f(std::integral_constant<int, 8>{});
  else if (C <= 16)
    f(std::integral_constant<int, 16>{});
  else if (C <= 32)
    f(std::integral_constant<int, 32>{});
  else
    f(std::integral_constant<int, 0>{});
}

}  // namespace tpswarp
