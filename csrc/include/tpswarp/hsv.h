// The HSV photometric jitter of one RGB pixel and its vector-Jacobian product, shared by the
// CPU and CUDA kernels of tpswarp::photometric_jitter.
//
// Forward, exactly the operations of tpswarp/reference/photometric_jitter.py (DESIGN.md):
//   v = max(r, g, b), mn = min(r, g, b), delta = v - mn
//   s = delta / v (0 where v == 0)
//   h = ((g - b) / delta        if r == v      (ties: r first, then g, else b)
//        2 + (b - r) / delta    elif g == v
//        4 + (r - g) / delta) / 6  mod 1  (0 where delta == 0)
//   v += brightness; s *= saturation; h = (h + hue) mod 1; v *= contrast
//   c_n = v - (v s) clamp(min(k, 4 - k), 0, 1),  k = (n + 6 h) mod 6,  n = 5, 3, 1 for r, g, b
//   out[c] = rgb[perm[c]]; optionally clamped to [0, 1].
// `x mod 1` is computed as x - floor(x): bit-identical to torch.remainder(x, 1) (fmod, then + 1
// for negative remainders: both round the same exact value once). `(n + 6 h) mod 6` with
// h in [0, 1] is x - 6 for x >= 6 (exact), as fmod.
//
// Backward: the vector-Jacobian product that autograd gives through the reference, derived by
// hand piecewise: torch.remainder has derivative 1; torch.clamp with scalar bounds passes the
// gradient where lo < x < hi (0 at the bounds themselves); torch.maximum / minimum split it 1/2, 1/2 on
// ties; torch.where sends it only to the selected branch (so nothing flows through s where
// v == 0, nor through h where delta == 0).
//
// All functions are branch-free (selects only) so that the CPU loops over them vectorize.
#pragma once

#include "tpswarp/common.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TPSWARP_HSV_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define TPSWARP_HSV_INLINE inline __attribute__((always_inline))
#else
#define TPSWARP_HSV_INLINE inline
#endif

namespace tpswarp {

template <typename acc> struct JitterParams {
  acc brightness, saturation, hue, contrast;
};

// torch.remainder(x, 1).
template <typename acc> TPSWARP_HSV_INLINE acc hsv_wrap_unit(acc x) { return x - floor_(x); }

// NaN-propagating clamp to [0, 1] (torch.clamp).
template <typename acc> TPSWARP_HSV_INLINE acc hsv_clamp01(acc x) {
  const bool lo = x < acc(0), hi = x > acc(1);
  return lo ? acc(0) : (hi ? acc(1) : x);
}

// torch.clamp(x, 0, 1)'s backward (scalar bounds) passes the gradient strictly inside:
// where 0 < x < 1, and not at 0 or 1 themselves (checked with torch 2.14: the gradient of
// clamp(x, 0, 1) is 0 at x = 0 and x = 1).
template <typename acc> TPSWARP_HSV_INLINE bool hsv_in01(acc x) {
  const bool lo = x > acc(0), hi = x < acc(1);
  return lo & hi;
}

// 1 where a > b, 1/2 where a == b, 0 else: the share of d max(a, b) that goes to a
// (torch.maximum's backward). hsv_min_share is torch.minimum's.
template <typename acc> TPSWARP_HSV_INLINE acc hsv_max_share(acc a, acc b) {
  const bool gt = a > b, eq = a == b;
  return gt ? acc(1) : (eq ? acc(0.5) : acc(0));
}
template <typename acc> TPSWARP_HSV_INLINE acc hsv_min_share(acc a, acc b) {
  const bool lt = a < b, eq = a == b;
  return lt ? acc(1) : (eq ? acc(0.5) : acc(0));
}

// Hexcone HSV, the reference's rgb_to_hsv, with the intermediates its backward needs.
// Every operation is evaluated unconditionally and combined by selects (nothing that may trap
// sits under a condition), so that compilers if-convert and vectorize loops over pixels.
template <typename acc> struct HSVState {
  acc rg, v;          // max(r, g), v = max(rg, b)
  acc rg_min, mn;     // min(r, g), mn = min(rg_min, b)
  acc delta;          // v - mn
  bool has_v, has_delta;
  acc vv;             // v where v != 0, else 1
  acc d;              // delta where delta != 0, else 1
  bool r_max, g_max;  // hue branch: r == v, else g == v, else b
  acc q;              // num / d
  acc h, s;           // hue in [0, 1], saturation
};

template <typename acc> TPSWARP_HSV_INLINE HSVState<acc> rgb_to_hsv_state(acc r, acc g, acc b) {
  HSVState<acc> st;
  const bool r_gt_g = r > g, r_lt_g = r < g;
  st.rg = r_gt_g ? r : g;
  st.rg_min = r_lt_g ? r : g;
  const bool rg_gt_b = st.rg > b, rgm_lt_b = st.rg_min < b;
  st.v = rg_gt_b ? st.rg : b;
  st.mn = rgm_lt_b ? st.rg_min : b;
  st.delta = st.v - st.mn;
  st.has_v = st.v != acc(0);
  st.has_delta = st.delta != acc(0);
  // Divisions take selected operands (0 / 1 where the reference's torch.where gives 0), so
  // that none of them sits under a condition.
  st.vv = st.has_v ? st.v : acc(1);
  st.s = (st.has_v ? st.delta : acc(0)) / st.vv;
  st.d = st.has_delta ? st.delta : acc(1);
  const bool r_is_v = r == st.v, g_is_v = g == st.v;
  st.r_max = r_is_v;
  st.g_max = !r_is_v & g_is_v;
  const acc num_r = g - b, num_g = b - r, num_b = r - g;
  const acc num = st.r_max ? num_r : (st.g_max ? num_g : num_b);
  const acc off = st.r_max ? acc(0) : (st.g_max ? acc(2) : acc(4));
  st.q = (st.has_delta ? num : acc(0)) / st.d;
  st.h = hsv_wrap_unit(((st.has_delta ? off : acc(0)) + st.q) / acc(6));  // 0 where delta == 0
  return st;
}

template <typename acc> struct HSV {
  acc h, s, v;
};

template <typename acc> TPSWARP_HSV_INLINE HSV<acc> rgb_to_hsv(acc r, acc g, acc b) {
  const HSVState<acc> st = rgb_to_hsv_state(r, g, b);
  return {st.h, st.s, st.v};
}

// The clamped hexcone weight of one channel: clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6.
template <typename acc> struct ChannelWeight {
  acc k, a, t, w;  // k, a = 4 - k, t = min(k, a), w = clamp(t, 0, 1)
};

template <typename acc> TPSWARP_HSV_INLINE ChannelWeight<acc> hsv_channel_weight(acc h, acc n) {
  ChannelWeight<acc> cw;
  const acc x = n + acc(6) * h;  // in [1, 11] for h in [0, 1]: fmod(x, 6) is x or x - 6, exactly
  const acc x6 = x - acc(6);
  const bool wrap = x >= acc(6);
  cw.k = wrap ? x6 : x;
  cw.a = acc(4) - cw.k;
  const bool k_lt_a = cw.k < cw.a;
  cw.t = k_lt_a ? cw.k : cw.a;
  cw.w = hsv_clamp01(cw.t);
  return cw;
}

// One channel of hsv_to_rgb: c = v - (v s) clamp(min(k, 4 - k), 0, 1).
template <typename acc> TPSWARP_HSV_INLINE acc hsv_channel(acc h, acc s, acc v, acc n) {
  return v - (v * s) * hsv_channel_weight(h, n).w;
}

// The jittered HSV of one pixel: v' = (v + brightness) contrast, s' = s saturation,
// h' = (h + hue) mod 1.
template <typename acc> struct JitteredHSV {
  acc h1, s1, v1, v2;  // h', s', v + brightness, v'
};

template <typename acc>
TPSWARP_HSV_INLINE JitteredHSV<acc> jitter_hsv(const HSVState<acc>& st, const JitterParams<acc>& p) {
  JitteredHSV<acc> j;
  j.v1 = st.v + p.brightness;
  j.s1 = st.s * p.saturation;
  j.h1 = hsv_wrap_unit(st.h + p.hue);
  j.v2 = j.v1 * p.contrast;
  return j;
}

// The jittered (unpermuted, unclamped) RGB of one pixel. A NaN channel makes all three NaN.
template <typename acc>
TPSWARP_HSV_INLINE void jitter_rgb(acc r, acc g, acc b, const JitterParams<acc>& p, acc& ro, acc& go, acc& bo) {
  const HSVState<acc> st = rgb_to_hsv_state(r, g, b);
  JitteredHSV<acc> j = jitter_hsv(st, p);
  // The max / min selects drop NaNs (torch.maximum propagates them): put them back.
  j.v2 += (r - r) + (g - g) + (b - b);
  ro = hsv_channel(j.h1, j.s1, j.v2, acc(5));
  go = hsv_channel(j.h1, j.s1, j.v2, acc(3));
  bo = hsv_channel(j.h1, j.s1, j.v2, acc(1));
}

// True when perm (3 entries) is a permutation of 0, 1, 2.
template <typename I> TPSWARP_HOST_DEVICE inline bool is_permutation3(I p0, I p1, I p2) {
  return p0 >= 0 && p0 <= 2 && p1 >= 0 && p1 <= 2 && p2 >= 0 && p2 <= 2 && p0 != p1 && p0 != p2 && p1 != p2;
}

// The whole per-pixel op: out[c] = clamp?(jitter(in)[perm[c]]). perm must be a permutation of
// 0, 1, 2 (checked by the caller); perm == nullptr is the identity.
template <typename acc, typename I>
TPSWARP_HOST_DEVICE inline void photometric_jitter_pixel(const acc in[3], const JitterParams<acc>& p, const I* perm,
                                                         bool clamp, acc out[3]) {
  acc rgb[3];
  jitter_rgb(in[0], in[1], in[2], p, rgb[0], rgb[1], rgb[2]);
  for (int c = 0; c < 3; ++c) {
    const acc x = perm ? rgb[perm[c]] : rgb[c];
    out[c] = clamp ? hsv_clamp01(x) : x;
  }
}

// Backward of one hsv_channel: given the gradient gc of c, accumulates into the gradients of
// v, s and h.
template <typename acc>
TPSWARP_HSV_INLINE void hsv_channel_vjp(acc h, acc s, acc v, acc n, acc gc, acc& gv, acc& gs, acc& gh) {
  const ChannelWeight<acc> cw = hsv_channel_weight(h, n);
  const acc m = v * s;
  // c = v - m * w
  const acc gm = -gc * cw.w;
  const acc gw = -gc * m;
  gv += gc + gm * s;
  gs += gm * v;
  // clamp passes where 0 < t < 1; minimum(k, 4 - k) splits ties (k == 2) half/half;
  // remainder has derivative 1; d k / d h = 6.
  const acc gt = hsv_in01(cw.t) ? gw : acc(0);
  const acc gk = gt * (hsv_min_share(cw.k, cw.a) - hsv_min_share(cw.a, cw.k));
  gh += acc(6) * gk;
}

// The gradients of <grad, jitter_rgb(r, g, b)> w.r.t. r, g, b and the four parameters.
// (gr, gg, gb) is the gradient of the unpermuted jittered RGB (the caller undoes the channel
// permutation); with `clamp`, it is masked where that RGB is not strictly inside (0, 1)
// (torch.clamp's backward is 0 at the bounds themselves).
template <typename acc> struct JitterVJP {
  acc r, g, b;                                // d / d input
  acc brightness, saturation, hue, contrast;  // d / d parameters (this pixel's share)
};

template <typename acc>
TPSWARP_HSV_INLINE JitterVJP<acc> jitter_rgb_vjp(acc r, acc g, acc b, const JitterParams<acc>& p, acc gr, acc gg,
                                                 acc gb, bool clamp) {
  const HSVState<acc> st = rgb_to_hsv_state(r, g, b);
  const JitteredHSV<acc> j = jitter_hsv(st, p);
  if (clamp) {
    const acc ro = hsv_channel(j.h1, j.s1, j.v2, acc(5));
    const acc go = hsv_channel(j.h1, j.s1, j.v2, acc(3));
    const acc bo = hsv_channel(j.h1, j.s1, j.v2, acc(1));
    gr = hsv_in01(ro) ? gr : acc(0);
    gg = hsv_in01(go) ? gg : acc(0);
    gb = hsv_in01(bo) ? gb : acc(0);
  }
  // ---- hsv_to_rgb
  acc gv2 = 0, gs1 = 0, gh1 = 0;
  hsv_channel_vjp(j.h1, j.s1, j.v2, acc(5), gr, gv2, gs1, gh1);
  hsv_channel_vjp(j.h1, j.s1, j.v2, acc(3), gg, gv2, gs1, gh1);
  hsv_channel_vjp(j.h1, j.s1, j.v2, acc(1), gb, gv2, gs1, gh1);
  // ---- the jitter: v2 = (v + brightness) contrast, s1 = s saturation, h1 = (h + hue) mod 1
  JitterVJP<acc> out;
  const acc gv1 = gv2 * p.contrast;
  out.contrast = gv2 * j.v1;
  out.hue = gh1;
  out.saturation = gs1 * st.s;
  out.brightness = gv1;
  const acc gs = gs1 * p.saturation;
  // ---- rgb_to_hsv (torch.where: nothing flows through h where delta == 0, nor s where v == 0)
  const acc gh_q = (st.has_delta ? gh1 : acc(0)) / acc(6);  // d / d q: h = ((off + q) / 6) mod 1
  const acc gnum = gh_q / st.d;                              // q = num / d
  acc gdelta = -gh_q * (st.q / st.d);
  const acc gs_v = st.has_v ? gs : acc(0);  // s = delta / vv
  gdelta += gs_v / st.vv;
  acc gv = gv1 - gs_v * (st.s / st.vv);
  gv += gdelta;  // delta = v - mn
  const acc gmn = -gdelta;
  // num = g - b (r branch), b - r (g branch), r - g (b branch)
  const acc ngnum = -gnum;
  acc dr = st.r_max ? acc(0) : (st.g_max ? ngnum : gnum);
  acc dg = st.r_max ? gnum : (st.g_max ? acc(0) : ngnum);
  acc db = st.r_max ? ngnum : (st.g_max ? gnum : acc(0));
  // v = maximum(maximum(r, g), b), mn = minimum(minimum(r, g), b)
  const acc g_rg = gv * hsv_max_share(st.rg, b);
  db += gv * hsv_max_share(b, st.rg);
  dr += g_rg * hsv_max_share(r, g);
  dg += g_rg * hsv_max_share(g, r);
  const acc g_rgm = gmn * hsv_min_share(st.rg_min, b);
  db += gmn * hsv_min_share(b, st.rg_min);
  dr += g_rgm * hsv_min_share(r, g);
  dg += g_rgm * hsv_min_share(g, r);
  out.r = dr;
  out.g = dg;
  out.b = db;
  return out;
}

}  // namespace tpswarp
