// The per-pixel KL of tpswarp/kl.h evaluated for a block of up to kKLBlock consecutive pixels
// whose classes are `cs` elements apart and whose pixels are adjacent (unit stride): the
// inner loops run over pixels and auto-vectorize (CPU only, float accumulation).
#pragma once

#include <cstdint>
#include <cstdlib>

#include "tpswarp/common.h"
#include "tpswarp/cpu_fastmath.h"

TPSWARP_NO_TRAPPING_MATH_BEGIN  // vectorizable selects (tpswarp/common.h)

namespace tpswarp {
namespace cpu {

constexpr int64_t kKLBlock = 64;

// TPSWARP_KL_ONE_SWEEP=1: the scalar KL paths (float64, strided layouts) take the one-sweep statistics
// of the CUDA kernels (kl_pixel_online_loaded) instead of their two sweeps (slower here, measured),
// so that tests run on the CPU the per-pixel code the GPU runs. Read once.
inline bool kl_one_sweep() {
  static const bool on = [] {
    const char* v = std::getenv("TPSWARP_KL_ONE_SWEEP");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return on;
}

// x86-64 builds get an AVX2+FMA clone chosen at load time by CPU features; other targets the
// plain code. (Not "arch=haswell": that clone is chosen by CPU model, so AMD and newer Intel
// processors ran the baseline clone.) The AVX2 clone may contract a * b + c into an FMA, so its
// results can differ from the baseline clone's in the last bits; each clone is deterministic.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#if __GNUC__ >= 12
#define TPSWARP_CPU_CLONES __attribute__((noinline, target_clones("arch=x86-64-v3", "default")))
#else
#define TPSWARP_CPU_CLONES __attribute__((noinline, target_clones("avx2", "default")))
#endif
#else
#define TPSWARP_CPU_CLONES
#endif

struct KLBlockStats {
  float s_max[kKLBlock], log_zs[kKLBlock], t_max[kKLBlock], log_zt[kKLBlock], kl[kKLBlock], p_sum[kKLBlock];
};

// Per-pixel statistics of a block: the student's max and log-sum-exp, the teacher's (logits) or its
// mass p_sum (probabilities), and with kLoss the KL itself. Without kLoss (a backward that needs
// no KL value: the student's gradient, or a probability teacher's) st.kl is 0 and the terms only
// the KL needs are skipped: for probability teachers the p log p sum, a logarithm per element.
template <typename S, typename T, bool kLogits, bool kLoss = true>
TPSWARP_CPU_CLONES void kl_block_stats(const S* s, int64_t scs, const T* t, int64_t tcs, int64_t C, int64_t P, KLBlockStats& st) {
  float zs[kKLBlock], zt[kKLBlock], cross[kKLBlock], plogp[kKLBlock], psum[kKLBlock];
  for (int64_t p = 0; p < P; ++p) {
    st.s_max[p] = static_cast<float>(s[p]);
    st.t_max[p] = static_cast<float>(t[p]);
    zs[p] = zt[p] = cross[p] = plogp[p] = psum[p] = 0.f;
  }
  for (int64_t c = 1; c < C; ++c) {
    const S* sc = s + c * scs;
    const T* tc = t + c * tcs;
#pragma omp simd
    for (int64_t p = 0; p < P; ++p) {
      const float v = static_cast<float>(sc[p]);
      st.s_max[p] = v > st.s_max[p] ? v : st.s_max[p];
      if (kLogits) {
        const float u = static_cast<float>(tc[p]);
        st.t_max[p] = u > st.t_max[p] ? u : st.t_max[p];
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    const S* sc = s + c * scs;
    const T* tc = t + c * tcs;
#pragma omp simd
    for (int64_t p = 0; p < P; ++p) {
      const float sv = static_cast<float>(sc[p]) - st.s_max[p];
      zs[p] += fast_exp(sv);
      const float tv = static_cast<float>(tc[p]);
      if (kLogits) {
        const float tsh = tv - st.t_max[p];
        const float e = fast_exp(tsh);
        zt[p] += e;
        if (kLoss) cross[p] += e * (tsh - sv);
      } else {
        if (kLoss) {
          const float pl = tv * fast_log(tv);
          plogp[p] += tv > 0.f ? pl : 0.f;
          cross[p] += tv * sv;
        }
        psum[p] += tv;
      }
    }
  }
#pragma omp simd
  for (int64_t p = 0; p < P; ++p) {
    st.log_zs[p] = fast_log(zs[p]);
    if (kLogits) {
      st.log_zt[p] = fast_log(zt[p]);
      st.p_sum[p] = 1.f;
      st.kl[p] = kLoss ? cross[p] / zt[p] - st.log_zt[p] + st.log_zs[p] : 0.f;
    } else {
      st.log_zt[p] = 0.f;
      st.p_sum[p] = psum[p];
      st.kl[p] = kLoss ? plogp[p] - cross[p] + st.log_zs[p] * psum[p] : 0.f;
    }
  }
}

// Gradients of scale[p] * KL_p (see kl_pixel_grad in tpswarp/kl.h). gs / gt may be null;
// they are written with unit pixel stride and class strides gscs / gtcs. scale 0 writes 0.
// kGradT: whether gt is written (the teacher's gradient costs a logarithm per element).
template <typename S, typename T, typename G, bool kLogits, bool kGradT>
TPSWARP_FORCE_INLINE void kl_block_grad_impl(const S* s, int64_t scs, const T* t, int64_t tcs, int64_t C, int64_t P,
                                             const KLBlockStats& st, const float* scale, G* gs, int64_t gscs, G* gt,
                                             int64_t gtcs) {
  for (int64_t c = 0; c < C; ++c) {
    const S* sc = s + c * scs;
    const T* tc = t + c * tcs;
    G* gsc = gs ? gs + c * gscs : nullptr;
    G* gtc = kGradT ? gt + c * gtcs : nullptr;
    float gsv[kKLBlock], gtv[kKLBlock];
#pragma omp simd
    for (int64_t p = 0; p < P; ++p) {
      const float log_q = static_cast<float>(sc[p]) - st.s_max[p] - st.log_zs[p];
      const float q = fast_exp(log_q);
      const float tv = static_cast<float>(tc[p]);
      const float k = scale[p];
      float pr;
      if (kLogits) {
        const float log_p = tv - st.t_max[p] - st.log_zt[p];
        pr = fast_exp(log_p);
        if (kGradT) gtv[p] = k != 0.f ? k * (pr * ((log_p - log_q) - st.kl[p])) : 0.f;
      } else {
        pr = tv;
        if (kGradT) gtv[p] = k != 0.f ? k * ((tv > 0.f ? fast_log(tv) + 1.f : 0.f) - log_q) : 0.f;
      }
      gsv[p] = k != 0.f ? k * (q * st.p_sum[p] - pr) : 0.f;
    }
    if (gsc)
      for (int64_t p = 0; p < P; ++p) gsc[p] = static_cast<G>(gsv[p]);
    if (kGradT)
      for (int64_t p = 0; p < P; ++p) gtc[p] = static_cast<G>(gtv[p]);
  }
}

template <typename S, typename T, typename G, bool kLogits>
TPSWARP_CPU_CLONES void kl_block_grad(const S* s, int64_t scs, const T* t, int64_t tcs, int64_t C, int64_t P,
                                      const KLBlockStats& st, const float* scale, G* gs, int64_t gscs, G* gt,
                                      int64_t gtcs) {
  if (gt)
    kl_block_grad_impl<S, T, G, kLogits, true>(s, scs, t, tcs, C, P, st, scale, gs, gscs, gt, gtcs);
  else
    kl_block_grad_impl<S, T, G, kLogits, false>(s, scs, t, tcs, C, P, st, scale, gs, gscs, gt, gtcs);
}

}  // namespace cpu
}  // namespace tpswarp

TPSWARP_NO_TRAPPING_MATH_END
