// Bilinear resampling of F.interpolate(mode="bilinear", align_corners=False) along one axis, for
// the `size=` argument of the KL ops: logits at a lower resolution are read through these taps
// as if they had been upsampled first, and the backward gathers each input pixel's gradient
// from the contiguous range of output pixels that read it (deterministic, no atomics).
#pragma once

#include "tpswarp/common.h"

namespace tpswarp {

// The two input indices and weights that output index `d` of an axis of `out_size` reads from
// an input axis of `in_size`; i0 == i1 at the last input index. Same arithmetic as PyTorch's
// upsample_bilinear2d without scale factors: scale = in / out in acc, source index
// max(0, scale * (d + 0.5) - 0.5) (one rounding, see resize_fma), lambda clamped to [0, 1].
template <typename acc> struct LinearTap {
  int64_t i0, i1;
  acc l0, l1;
};

template <typename acc>
TPSWARP_HOST_DEVICE inline acc linear_resize_scale(int64_t in_size, int64_t out_size) {
  return static_cast<acc>(in_size) / static_cast<acc>(out_size);
}

// scale * x - 0.5 with one rounding: PyTorch's kernels compute the source index as
// `scale * (d + 0.5) - 0.5`, which the compiler contracts to a fused multiply-add (the AVX2/AVX512
// CPU kernels and nvcc do); without the fma a weight can differ by an ulp (e.g. 4 -> 12, d = 1:
// 1.5e-8 instead of 0), which matters where a resized probability is 0 (its log).
TPSWARP_HOST_DEVICE inline float resize_fma(float a, float b, float c) { return fmaf(a, b, c); }
TPSWARP_HOST_DEVICE inline double resize_fma(double a, double b, double c) { return fma(a, b, c); }

template <typename acc>
TPSWARP_HOST_DEVICE inline LinearTap<acc> linear_resize_tap(int64_t d, int64_t in_size, acc scale) {
  acc src = resize_fma(scale, static_cast<acc>(d) + acc(0.5), acc(-0.5));
  if (src < acc(0)) src = acc(0);
  int64_t i0 = static_cast<int64_t>(src);
  if (i0 > in_size - 1) i0 = in_size - 1;
  const int64_t i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  acc l1 = src - static_cast<acc>(i0);
  l1 = clamp_(l1, acc(0), acc(1));
  return {i0, i1, acc(1) - l1, l1};
}

// Weight with which output index d reads input index y (0 when it does not read it).
template <typename acc> TPSWARP_HOST_DEVICE inline acc linear_resize_weight(const LinearTap<acc>& t, int64_t y) {
  return (t.i0 == y ? t.l0 : acc(0)) + (t.i1 == y ? t.l1 : acc(0));
}

// Output indices [begin, end) whose taps read input index y. The source index grows with d,
// so the range is contiguous; it is found from an estimate and corrected with the taps
// themselves, so that it agrees with linear_resize_tap bit for bit.
template <typename acc> struct IndexRange {
  int64_t begin, end;
};

template <typename acc>
TPSWARP_HOST_DEVICE inline IndexRange<acc> linear_resize_readers(int64_t y, int64_t in_size, int64_t out_size,
                                                                 acc scale) {
  auto reads = [&](int64_t d) {
    const auto t = linear_resize_tap<acc>(d, in_size, scale);
    return t.i0 == y || t.i1 == y;
  };
  auto before = [&](int64_t d) {  // every tap of d lies below y
    const auto t = linear_resize_tap<acc>(d, in_size, scale);
    return t.i1 < y;
  };
  // Output d reads y when y - 1 < src(d) < y + 1 (or at the clamped ends); estimate d from
  // src = scale * (d + 0.5) - 0.5 and widen by one on each side, then correct.
  int64_t b = static_cast<int64_t>(floor_((static_cast<acc>(y) - acc(1) + acc(0.5)) / scale - acc(0.5))) - 1;
  b = clamp_<int64_t>(b, 0, out_size);
  while (b > 0 && !before(b - 1)) --b;
  while (b < out_size && before(b)) ++b;
  int64_t e = b;
  while (e < out_size && reads(e)) ++e;
  return {b, e};
}

}  // namespace tpswarp
