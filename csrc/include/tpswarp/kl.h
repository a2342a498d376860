// Per-pixel KL(p_t || softmax(s)) and its gradients, over C classes read with a stride. The
// statistics take two sweeps over the classes (CPU) or one with running maxima (CUDA); extreme
// logits never overflow either way. The gradients take one more sweep.
#pragma once

#include "tpswarp/common.h"

namespace tpswarp {

// Statistics of one pixel that both the loss and its gradient need.
template <typename acc> struct KLPixel {
  acc s_max;     // max_c s_c
  acc log_zs;    // log sum_c exp(s_c - s_max)
  acc t_max;     // max_c t_c (teacher logits only)
  acc log_zt;    // log sum_c exp(t_c - t_max) (teacher logits only)
  acc kl;        // the divergence
  acc p_sum;     // sum_c p_c (1 for logits; the teacher's mass for probabilities)
};

// KL and the statistics from the sums of a pixel: zs = sum_c exp(s'_c), zt = sum_c exp(t'_c),
// cross = sum_c exp(t'_c) (t'_c - s'_c) (logits) or sum_c p_c s'_c (probabilities), p_log_p, p_sum
// (probabilities); primes: relative to s_max and t_max.
template <typename acc>
TPSWARP_HOST_DEVICE TPSWARP_INLINE KLPixel<acc> kl_finish(acc s_max, acc zs, acc t_max, acc zt, acc cross, acc p_log_p,
                                                          acc p_sum, bool teacher_is_logits) {
  KLPixel<acc> r;
  r.s_max = s_max;
  r.log_zs = log_(zs);
  if (teacher_is_logits) {
    r.t_max = t_max;
    r.log_zt = log_(zt);
    r.p_sum = 1;
    // sum_c p_c ((t'_c - log zt) - (s'_c - log zs))
    r.kl = cross / zt - r.log_zt + r.log_zs;
  } else {
    r.t_max = 0;
    r.log_zt = 0;
    r.p_sum = p_sum;
    // sum_c p_c log p_c - sum_c p_c (s'_c - log zs)
    r.kl = p_log_p - cross + r.log_zs * p_sum;
  }
  return r;
}

// `load_s(c)` and `load_t(c)` return the student logit and the teacher value (probability or
// logit) of class c in acc; the warped KL loads the teacher through a bilinear tap.
// Two sweeps over the classes (the maxima, then the shifted sums): the CPU's scalar paths, where the
// second sweep reads L1 and the short dependency chains of each sweep keep the core busy.
template <typename acc, typename LoadS, typename LoadT>
TPSWARP_HOST_DEVICE inline KLPixel<acc> kl_pixel_loaded(const LoadS& load_s, const LoadT& load_t, int64_t C,
                                                        bool teacher_is_logits) {
  acc s_max = load_s(0);
  acc t_max = load_t(0);
  for (int64_t c = 1; c < C; ++c) {
    s_max = max_(s_max, load_s(c));
    if (teacher_is_logits) t_max = max_(t_max, load_t(c));
  }
  acc zs = 0, zt = 0, cross = 0, p_log_p = 0, p_sum = 0;
  for (int64_t c = 0; c < C; ++c) {
    const acc sc = load_s(c) - s_max;
    zs += exp_gpu(sc);
    const acc tc = load_t(c);
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
  return kl_finish<acc>(s_max, zs, t_max, zt, cross, p_log_p, p_sum, teacher_is_logits);
}

// The same statistics in one sweep over the classes (the CUDA kernels: each class loaded once; many
// threads hide the longer dependency chain). The maxima are running maxima and every sum is kept
// relative to them (rescaled by exp(old max - new max) when a maximum grows), one exp per class and
// distribution; the finished sums equal the two-sweep ones up to rounding, and no exp overflows.
template <typename acc, typename LoadS, typename LoadT>
TPSWARP_HOST_DEVICE inline KLPixel<acc> kl_pixel_online_loaded(const LoadS& load_s, const LoadT& load_t, int64_t C,
                                                               bool teacher_is_logits) {
  acc s_max = load_s(0);
  const acc t0 = load_t(0);
  acc zs = 1, zt = 1, cross = 0, p_log_p = 0, p_sum = 0, t_max = 0;
  if (teacher_is_logits) {
    t_max = t0;
  } else {
    p_sum = t0;
    if (t0 > 0) p_log_p = t0 * log_(t0);
  }
  for (int64_t c = 1; c < C; ++c) {
    const acc sc = load_s(c);
    const acc tc = load_t(c);
    const bool s_up = sc > s_max;
    const acc s_new = s_up ? sc : s_max;
    const acc ds = s_new - s_max;
    const acc es = exp_gpu(s_up ? s_max - sc : sc - s_max);
    zs = s_up ? zs * es + acc(1) : zs + es;
    if (teacher_is_logits) {
      const bool t_up = tc > t_max;
      const acc t_new = t_up ? tc : t_max;
      const acc et = exp_gpu(t_up ? t_max - tc : tc - t_max);
      cross += ds * zt;  // earlier terms: s'_c re-referenced to the new student max
      if (t_up) {        // ... and t'_c to the new teacher max
        cross = et * (cross - (t_new - t_max) * zt);
        zt *= et;
      }
      const acc w = t_up ? acc(1) : et;
      cross += w * ((tc - t_new) - (sc - s_new));
      zt += w;
      t_max = t_new;
    } else {
      cross += tc * (sc - s_new) - ds * p_sum;
      p_sum += tc;
      if (tc > 0) p_log_p += tc * log_(tc);
    }
    s_max = s_new;
  }
  return kl_finish<acc>(s_max, zs, t_max, zt, cross, p_log_p, p_sum, teacher_is_logits);
}

// Gradients of scale * KL at one pixel, handed to store_s(c, g) / store_t(c, g).
// d/ds_c = q_c sum(p) - p_c;
// d/dp_c = log p_c + 1 - log q_c (probabilities; the p log p term contributes 0 at p_c = 0);
// d/dt_c = p_c ((log p_c - log q_c) - KL) (teacher logits).
template <typename acc, typename LoadS, typename LoadT, typename StoreS, typename StoreT>
TPSWARP_HOST_DEVICE inline void kl_pixel_grad_loaded(const LoadS& load_s, const LoadT& load_t, int64_t C,
                                                     bool teacher_is_logits, const KLPixel<acc>& st, acc scale,
                                                     bool want_s, const StoreS& store_s, bool want_t,
                                                     const StoreT& store_t) {
  for (int64_t c = 0; c < C; ++c) {
    const acc log_q = load_s(c) - st.s_max - st.log_zs;
    const acc q = exp_gpu(log_q);
    const acc tc = load_t(c);
    acc p, log_p;
    if (teacher_is_logits) {
      log_p = tc - st.t_max - st.log_zt;
      p = exp_gpu(log_p);
    } else {
      p = tc;
      log_p = tc > 0 ? log_(tc) : acc(0);
    }
    if (want_s) store_s(c, scale * (q * st.p_sum - p));
    if (want_t) {
      const acc g = teacher_is_logits ? p * ((log_p - log_q) - st.kl) : (tc > 0 ? log_p + acc(1) : acc(0)) - log_q;
      store_t(c, scale * g);
    }
  }
}

// The statistics the student's gradient needs, kept between a forward and its backward
// (`_masked_kl_div_with_stats`): kKlStats rows `stride` apart, s_max, log_zs, then t_max and log_zt
// (teacher logits) or p_sum and 0 (probabilities). The divergence itself is not kept: the teacher's
// gradient (which needs it) is not served from them.
constexpr int kKlStats = 4;

template <typename acc>
TPSWARP_HOST_DEVICE TPSWARP_INLINE void kl_stats_store(const KLPixel<acc>& st, bool teacher_is_logits, acc* out,
                                                       int64_t stride) {
  out[0] = st.s_max;
  out[stride] = st.log_zs;
  out[2 * stride] = teacher_is_logits ? st.t_max : st.p_sum;
  out[3 * stride] = teacher_is_logits ? st.log_zt : acc(0);
}

template <typename acc>
TPSWARP_HOST_DEVICE TPSWARP_INLINE KLPixel<acc> kl_stats_load(const acc* in, int64_t stride, bool teacher_is_logits) {
  KLPixel<acc> st;
  st.s_max = in[0];
  st.log_zs = in[stride];
  st.t_max = teacher_is_logits ? in[2 * stride] : acc(0);
  st.log_zt = teacher_is_logits ? in[3 * stride] : acc(0);
  st.p_sum = teacher_is_logits ? acc(1) : in[2 * stride];
  st.kl = 0;
  return st;
}

// Pointer forms: `s`, `t` point at class 0 of the pixel; `ss`, `ts` are the class strides.
// one_sweep: kl_pixel_online_loaded instead of kl_pixel_loaded.
template <typename scalar_t, typename acc = acc_t<scalar_t>>
TPSWARP_HOST_DEVICE inline KLPixel<acc> kl_pixel(const scalar_t* s, int64_t ss, const scalar_t* t, int64_t ts,
                                                 int64_t C, bool teacher_is_logits, bool one_sweep = false) {
  auto load_s = [&](int64_t c) { return static_cast<acc>(s[c * ss]); };
  auto load_t = [&](int64_t c) { return static_cast<acc>(t[c * ts]); };
  return one_sweep ? kl_pixel_online_loaded<acc>(load_s, load_t, C, teacher_is_logits)
                   : kl_pixel_loaded<acc>(load_s, load_t, C, teacher_is_logits);
}

// gs / gt may be null (not requested).
template <typename scalar_t, typename acc = acc_t<scalar_t>>
TPSWARP_HOST_DEVICE inline void kl_pixel_grad(const scalar_t* s, int64_t ss, const scalar_t* t, int64_t ts, int64_t C,
                                              bool teacher_is_logits, const KLPixel<acc>& st, acc scale,
                                              scalar_t* gs, int64_t gss, scalar_t* gt, int64_t gts) {
  kl_pixel_grad_loaded<acc>([&](int64_t c) { return static_cast<acc>(s[c * ss]); },
                            [&](int64_t c) { return static_cast<acc>(t[c * ts]); }, C, teacher_is_logits, st, scale,
                            gs != nullptr, [&](int64_t c, acc g) { gs[c * gss] = static_cast<scalar_t>(g); },
                            gt != nullptr, [&](int64_t c, acc g) { gt[c * gts] = static_cast<scalar_t>(g); });
}

}  // namespace tpswarp
