// CPU kernels of tpswarp::photometric_jitter and its backward: one pass over the image, the
// per-pixel math of tpswarp/hsv.h.
//
// Work decomposition (fixed, independent of the thread count): each image's H x W pixels, in
// row-major order, are cut into chunks of kChunk pixels; one work item is one (image, chunk).
// An item loads its pixels (any strides: NCHW planes, channels_last interleaved, or arbitrary
// views; half/bfloat16 converted to float32) into small local arrays, runs a branch-free loop
// over them that the compiler vectorizes (an AVX2 copy of that loop is chosen at run time on
// x86 CPUs that have it), and stores the result with the output's strides.
//
// Backward: the image gradient is elementwise; the four parameter gradients are reduced per
// item into a partial buffer (16 lanes per chunk, then one double per item), and the partials
// of each image are summed in item order: the same bits whatever the number of threads.
//
// Permutation rows are validated here (reading the small (B, 3) tensor): the Python wrapper
// checks shapes and dtypes only.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "tpswarp/cpu_features.h"
#include "tpswarp/show.h"

// The loops over the per-pixel math vectorize only if GCC may evaluate both sides of a select
// (divisions "may trap" under the default -ftrapping-math, and GCC turns a division of selected
// operands back into a conditional one). Nothing here reads the floating-point exception
// flags, and no value changes (no reassociation, no contraction). The pragma covers hsv.h and
// the chunk loops below, up to the matching pop_options.
#if defined(__GNUC__) && !defined(__clang__)
#define TPSWARP_JITTER_PRAGMA 1
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif
#include "tpswarp/hsv.h"

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__AVX2__)
#define TPSWARP_JITTER_AVX2_CLONE 1
#endif

namespace tpswarp {
namespace {

constexpr const char* kOp = "photometric_jitter";
constexpr int64_t kChunk = 256;  // pixels per work item (local arrays stay in L1)
constexpr int kLanes = 16;       // independent partial sums per chunk (vectorizable reduction)

// ------------------------------------------------------------------------------------------
// argument checks
// ------------------------------------------------------------------------------------------
void check_inputs(const at::Tensor& image, const at::Tensor& brightness, const at::Tensor& saturation,
                  const at::Tensor& hue, const at::Tensor& contrast, const std::optional<at::Tensor>& permutation) {
  TORCH_CHECK_TYPE(at::isFloatingType(image.scalar_type()), kOp, ": `image` must have a floating dtype, got ",
                   image.scalar_type());
  TORCH_CHECK_VALUE(image.dim() == 4 && image.size(1) == 3, kOp, ": `image` must have shape (B, 3, H, W) RGB, got ",
                    show(image.sizes()));
  const int64_t B = image.size(0);
  const std::array<std::pair<const char*, const at::Tensor*>, 4> params{
      {{"brightness", &brightness}, {"saturation", &saturation}, {"hue", &hue}, {"contrast", &contrast}}};
  for (const auto& [name, p] : params) {
    TORCH_CHECK_TYPE(at::isFloatingType(p->scalar_type()), kOp, ": `", name, "` must have a floating dtype, got ",
                     p->scalar_type());
    TORCH_CHECK_VALUE(p->dim() == 1 && p->size(0) == B, kOp, ": `", name, "` must have shape (B,) = (", show(B),
                      ",), one value per image, got ", show(p->sizes()));
    TORCH_CHECK(p->device() == image.device(), kOp, ": `", name, "` is on ", p->device(), " but `image` is on ",
                image.device());
  }
  if (permutation.has_value() && permutation->defined()) {
    const auto& perm = *permutation;
    TORCH_CHECK_TYPE(perm.scalar_type() == at::kLong, kOp, ": `permutation` must be int64, got ", perm.scalar_type());
    TORCH_CHECK_VALUE(perm.dim() == 2 && perm.size(0) == B && perm.size(1) == 3, kOp,
                      ": `permutation` must have shape (B, 3) = (", show(B), ", 3), got ", show(perm.sizes()));
    TORCH_CHECK(perm.device() == image.device(), kOp, ": `permutation` is on ", perm.device(), " but `image` is on ",
                image.device());
  }
}

// (B, 3) int32 rows, validated; empty when there is no permutation.
std::vector<std::array<int, 3>> read_permutation(const std::optional<at::Tensor>& permutation) {
  std::vector<std::array<int, 3>> rows;
  if (!permutation.has_value() || !permutation->defined()) return rows;
  const auto perm = permutation->contiguous();
  const int64_t* p = perm.const_data_ptr<int64_t>();
  rows.resize(perm.size(0));
  for (int64_t b = 0; b < perm.size(0); ++b) {
    const int64_t p0 = p[3 * b], p1 = p[3 * b + 1], p2 = p[3 * b + 2];
    TORCH_CHECK_VALUE(is_permutation3(p0, p1, p2), kOp, ": `permutation` rows must be permutations of (0, 1, 2); row ",
                      show(b), " is [", show(p0), ", ", show(p1), ", ", show(p2), "]");
    rows[b] = {int(p0), int(p1), int(p2)};
  }
  return rows;
}

template <typename acc> std::vector<JitterParams<acc>> read_params(const at::Tensor& brightness,
                                                                   const at::Tensor& saturation, const at::Tensor& hue,
                                                                   const at::Tensor& contrast) {
  const auto dtype = c10::CppTypeToScalarType<acc>::value;
  const auto bb = brightness.to(dtype).contiguous(), ss = saturation.to(dtype).contiguous();
  const auto hh = hue.to(dtype).contiguous(), cc = contrast.to(dtype).contiguous();
  std::vector<JitterParams<acc>> out(bb.numel());
  const acc* pb = bb.template const_data_ptr<acc>();
  const acc* ps = ss.template const_data_ptr<acc>();
  const acc* ph = hh.template const_data_ptr<acc>();
  const acc* pc = cc.template const_data_ptr<acc>();
  for (int64_t b = 0; b < bb.numel(); ++b) out[b] = JitterParams<acc>{pb[b], ps[b], ph[b], pc[b]};
  return out;
}

// The output (and image-gradient) memory format of the reference: channels_last when the
// image is channels_last (and not also plain contiguous), else contiguous.
at::MemoryFormat output_format(const at::Tensor& image) {
  return image.is_contiguous(at::MemoryFormat::ChannelsLast) && !image.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                                       : at::MemoryFormat::Contiguous;
}

struct Strides4 {
  int64_t b, c, h, w;
};
Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// ------------------------------------------------------------------------------------------
// strided chunk loads / stores: the chunk [p0, p0 + n) of an image's row-major pixels,
// walked as row segments; unit-stride planes and channels_last rows get their own loops.
// ------------------------------------------------------------------------------------------
template <typename F> inline void for_each_segment(int64_t p0, int64_t n, int64_t W, const F& f) {
  int64_t p = p0;
  const int64_t end = p0 + n;
  while (p < end) {
    const int64_t y = p / W, x = p % W;
    const int64_t len = std::min(W - x, end - p);
    f(y, x, len, p - p0);
    p += len;
  }
}

template <typename scalar_t, typename acc>
inline void load3(const scalar_t* base, const Strides4& s, int64_t p0, int64_t n, int64_t W, acc* c0, acc* c1, acc* c2) {
  for_each_segment(p0, n, W, [&](int64_t y, int64_t x, int64_t len, int64_t o) {
    const scalar_t* row = base + y * s.h + x * s.w;
    const scalar_t* r0 = row;
    const scalar_t* r1 = row + s.c;
    const scalar_t* r2 = row + 2 * s.c;
    acc* d0 = c0 + o;
    acc* d1 = c1 + o;
    acc* d2 = c2 + o;
    if (s.w == 1) {
      for (int64_t i = 0; i < len; ++i) d0[i] = static_cast<acc>(r0[i]);
      for (int64_t i = 0; i < len; ++i) d1[i] = static_cast<acc>(r1[i]);
      for (int64_t i = 0; i < len; ++i) d2[i] = static_cast<acc>(r2[i]);
    } else if (s.w == 3 && s.c == 1) {
      for (int64_t i = 0; i < len; ++i) {
        d0[i] = static_cast<acc>(row[3 * i]);
        d1[i] = static_cast<acc>(row[3 * i + 1]);
        d2[i] = static_cast<acc>(row[3 * i + 2]);
      }
    } else {
      const int64_t sw = s.w;
      for (int64_t i = 0; i < len; ++i) {
        d0[i] = static_cast<acc>(r0[i * sw]);
        d1[i] = static_cast<acc>(r1[i * sw]);
        d2[i] = static_cast<acc>(r2[i * sw]);
      }
    }
  });
}

template <typename scalar_t, typename acc>
inline void store3(scalar_t* base, const Strides4& s, int64_t p0, int64_t n, int64_t W, const acc* c0, const acc* c1,
                   const acc* c2) {
  for_each_segment(p0, n, W, [&](int64_t y, int64_t x, int64_t len, int64_t o) {
    scalar_t* row = base + y * s.h + x * s.w;
    scalar_t* r0 = row;
    scalar_t* r1 = row + s.c;
    scalar_t* r2 = row + 2 * s.c;
    const acc* s0 = c0 + o;
    const acc* s1 = c1 + o;
    const acc* s2 = c2 + o;
    if (s.w == 1) {
      for (int64_t i = 0; i < len; ++i) r0[i] = static_cast<scalar_t>(s0[i]);
      for (int64_t i = 0; i < len; ++i) r1[i] = static_cast<scalar_t>(s1[i]);
      for (int64_t i = 0; i < len; ++i) r2[i] = static_cast<scalar_t>(s2[i]);
    } else if (s.w == 3 && s.c == 1) {
      for (int64_t i = 0; i < len; ++i) {
        row[3 * i] = static_cast<scalar_t>(s0[i]);
        row[3 * i + 1] = static_cast<scalar_t>(s1[i]);
        row[3 * i + 2] = static_cast<scalar_t>(s2[i]);
      }
    } else {
      const int64_t sw = s.w;
      for (int64_t i = 0; i < len; ++i) {
        r0[i * sw] = static_cast<scalar_t>(s0[i]);
        r1[i * sw] = static_cast<scalar_t>(s1[i]);
        r2[i * sw] = static_cast<scalar_t>(s2[i]);
      }
    }
  });
}

// ------------------------------------------------------------------------------------------
// the vectorizable per-chunk loops (in place on the local arrays)
// ------------------------------------------------------------------------------------------
template <typename acc>
TPSWARP_HSV_INLINE void forward_chunk_impl(acc* __restrict__ R, acc* __restrict__ G, acc* __restrict__ Bl, int64_t n,
                                           JitterParams<acc> p, bool clamp) {
  if (clamp) {
    for (int64_t i = 0; i < n; ++i) {
      acc ro, go, bo;
      jitter_rgb(R[i], G[i], Bl[i], p, ro, go, bo);
      R[i] = hsv_clamp01(ro);
      G[i] = hsv_clamp01(go);
      Bl[i] = hsv_clamp01(bo);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      acc ro, go, bo;
      jitter_rgb(R[i], G[i], Bl[i], p, ro, go, bo);
      R[i] = ro;
      G[i] = go;
      Bl[i] = bo;
    }
  }
}

// In: R, G, Bl the input pixels, GR, GG, GB the gradient of the unpermuted jittered RGB.
// Out: GR, GG, GB the image gradient; P[0..3] the per-pixel parameter gradients.
template <typename acc>
TPSWARP_HSV_INLINE void backward_chunk_impl(const acc* __restrict__ R, const acc* __restrict__ G,
                                            const acc* __restrict__ Bl, acc* __restrict__ GR, acc* __restrict__ GG,
                                            acc* __restrict__ GB, acc* __restrict__ P0, acc* __restrict__ P1,
                                            acc* __restrict__ P2, acc* __restrict__ P3, int64_t n, JitterParams<acc> p,
                                            bool clamp) {
  if (clamp) {
    for (int64_t i = 0; i < n; ++i) {
      const auto g = jitter_rgb_vjp(R[i], G[i], Bl[i], p, GR[i], GG[i], GB[i], true);
      GR[i] = g.r;
      GG[i] = g.g;
      GB[i] = g.b;
      P0[i] = g.brightness;
      P1[i] = g.saturation;
      P2[i] = g.hue;
      P3[i] = g.contrast;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const auto g = jitter_rgb_vjp(R[i], G[i], Bl[i], p, GR[i], GG[i], GB[i], false);
      GR[i] = g.r;
      GG[i] = g.g;
      GB[i] = g.b;
      P0[i] = g.brightness;
      P1[i] = g.saturation;
      P2[i] = g.hue;
      P3[i] = g.contrast;
    }
  }
}

template <typename acc>
void forward_chunk_default(acc* R, acc* G, acc* Bl, int64_t n, JitterParams<acc> p, bool clamp) {
  forward_chunk_impl(R, G, Bl, n, p, clamp);
}
template <typename acc>
void backward_chunk_default(const acc* R, const acc* G, const acc* Bl, acc* GR, acc* GG, acc* GB, acc* P0, acc* P1,
                            acc* P2, acc* P3, int64_t n, JitterParams<acc> p, bool clamp) {
  backward_chunk_impl(R, G, Bl, GR, GG, GB, P0, P1, P2, P3, n, p, clamp);
}

#ifdef TPSWARP_JITTER_AVX2_CLONE
// The same loops compiled for AVX2 (8 floats per instruction, vroundps for floor), chosen at
// run time; the default build targets the x86-64 baseline (SSE2).
template <typename acc>
__attribute__((target("avx2"))) void forward_chunk_avx2(acc* R, acc* G, acc* Bl, int64_t n, JitterParams<acc> p,
                                                        bool clamp) {
  forward_chunk_impl(R, G, Bl, n, p, clamp);
}
template <typename acc>
__attribute__((target("avx2"))) void backward_chunk_avx2(const acc* R, const acc* G, const acc* Bl, acc* GR, acc* GG,
                                                         acc* GB, acc* P0, acc* P1, acc* P2, acc* P3, int64_t n,
                                                         JitterParams<acc> p, bool clamp) {
  backward_chunk_impl(R, G, Bl, GR, GG, GB, P0, P1, P2, P3, n, p, clamp);
}
using cpu::cpu_has_avx2;  // tpswarp/cpu_features.h (TPSWARP_NO_AVX2=1 forces the default version)
#endif

#ifdef TPSWARP_JITTER_PRAGMA
#pragma GCC pop_options
#endif

template <typename acc> using ForwardChunkFn = void (*)(acc*, acc*, acc*, int64_t, JitterParams<acc>, bool);
template <typename acc>
using BackwardChunkFn = void (*)(const acc*, const acc*, const acc*, acc*, acc*, acc*, acc*, acc*, acc*, acc*, int64_t,
                                 JitterParams<acc>, bool);

template <typename acc> ForwardChunkFn<acc> forward_chunk_fn() {
#ifdef TPSWARP_JITTER_AVX2_CLONE
  if (cpu_has_avx2()) return &forward_chunk_avx2<acc>;
#endif
  return &forward_chunk_default<acc>;
}
template <typename acc> BackwardChunkFn<acc> backward_chunk_fn() {
#ifdef TPSWARP_JITTER_AVX2_CLONE
  if (cpu_has_avx2()) return &backward_chunk_avx2<acc>;
#endif
  return &backward_chunk_default<acc>;
}

// Sum of x[0..n) with kLanes independent accumulators (vectorizes without reassociation;
// a fixed order, so deterministic), then the lanes in order, in double.
template <typename acc> inline double lane_sum(const acc* x, int64_t n) {
  acc lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] += x[i + j];
  }
  for (int j = 0; i + j < n; ++j) lanes[j] += x[i + j];
  double total = 0;
  for (int j = 0; j < kLanes; ++j) total += static_cast<double>(lanes[j]);
  return total;
}

int64_t grain_items() { return std::max<int64_t>(1, 8192 / kChunk); }

// ------------------------------------------------------------------------------------------
// the ops
// ------------------------------------------------------------------------------------------
at::Tensor photometric_jitter_cpu(const at::Tensor& image, const at::Tensor& brightness, const at::Tensor& saturation,
                                  const at::Tensor& hue, const at::Tensor& contrast,
                                  const std::optional<at::Tensor>& permutation, bool clamp) {
  check_inputs(image, brightness, saturation, hue, contrast, permutation);
  const auto perm = read_permutation(permutation);
  auto out = at::empty(image.sizes(), image.options(), output_format(image));
  const int64_t B = image.size(0), H = image.size(2), W = image.size(3);
  const int64_t HW = H * W;
  if (out.numel() == 0) return out;
  const int64_t chunks = (HW + kChunk - 1) / kChunk;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "photometric_jitter_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const auto params = read_params<acc>(brightness, saturation, hue, contrast);
    const auto fn = forward_chunk_fn<acc>();
    const scalar_t* in = image.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const Strides4 si = strides_of(image), so = strides_of(out);
    at::parallel_for(0, B * chunks, grain_items(), [&](int64_t begin, int64_t end) {
      alignas(64) acc buf[3][kChunk];
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / chunks, p0 = (item % chunks) * kChunk;
        const int64_t n = std::min(kChunk, HW - p0);
        load3(in + b * si.b, si, p0, n, W, buf[0], buf[1], buf[2]);
        fn(buf[0], buf[1], buf[2], n, params[b], clamp);
        const int c0 = perm.empty() ? 0 : perm[b][0], c1 = perm.empty() ? 1 : perm[b][1],
                  c2 = perm.empty() ? 2 : perm[b][2];
        store3(o + b * so.b, so, p0, n, W, buf[c0], buf[c1], buf[c2]);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> photometric_jitter_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& image, const at::Tensor& brightness, const at::Tensor& saturation,
    const at::Tensor& hue, const at::Tensor& contrast, const std::optional<at::Tensor>& permutation, bool clamp,
    std::array<bool, 5> output_mask) {
  check_inputs(image, brightness, saturation, hue, contrast, permutation);
  TORCH_CHECK_VALUE(grad_out.sizes() == image.sizes(), kOp, ": `grad_out` must have the shape of `image` ",
                    show(image.sizes()), ", got ", show(grad_out.sizes()));
  TORCH_CHECK(grad_out.device() == image.device(), kOp, ": `grad_out` is on ", grad_out.device(),
              " but `image` is on ", image.device());
  const auto perm = read_permutation(permutation);
  const int64_t B = image.size(0), H = image.size(2), W = image.size(3);
  const int64_t HW = H * W;
  const std::array<const at::Tensor*, 4> param_tensors{&brightness, &saturation, &hue, &contrast};
  const bool want_image = output_mask[0];
  const bool want_params = output_mask[1] || output_mask[2] || output_mask[3] || output_mask[4];

  at::Tensor grad_image = want_image ? at::empty(image.sizes(), image.options(), output_format(image))
                                     : at::empty({0}, image.options());
  // Per-image parameter gradients in double, [k * B + b], cast to each parameter's dtype at the end.
  std::vector<double> grad_params(want_params ? 4 * B : 0, 0.0);

  if ((want_image || want_params) && B * HW > 0) {
    // grad_out in the image's dtype (the reference's autograd casts it to the compute dtype).
    const auto go = grad_out.scalar_type() == image.scalar_type() ? grad_out : grad_out.to(image.scalar_type());
    const int64_t chunks = (HW + kChunk - 1) / kChunk;
    const int64_t items = B * chunks;
    std::vector<double> partials(want_params ? items * 4 : 0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "photometric_jitter_backward_cpu", [&] {
      using acc = acc_t<scalar_t>;
      const auto params = read_params<acc>(brightness, saturation, hue, contrast);
      const auto fn = backward_chunk_fn<acc>();
      const scalar_t* in = image.const_data_ptr<scalar_t>();
      const scalar_t* gop = go.const_data_ptr<scalar_t>();
      scalar_t* gi = want_image ? grad_image.mutable_data_ptr<scalar_t>() : nullptr;
      const Strides4 si = strides_of(image), sg = strides_of(go);
      const Strides4 sgi = want_image ? strides_of(grad_image) : Strides4{0, 0, 0, 0};
      double* part = want_params ? partials.data() : nullptr;
      at::parallel_for(0, items, grain_items(), [&](int64_t begin, int64_t end) {
        alignas(64) acc x[3][kChunk];
        alignas(64) acc g[3][kChunk];
        alignas(64) acc pg[4][kChunk];
        for (int64_t item = begin; item < end; ++item) {
          const int64_t b = item / chunks, p0 = (item % chunks) * kChunk;
          const int64_t n = std::min(kChunk, HW - p0);
          load3(in + b * si.b, si, p0, n, W, x[0], x[1], x[2]);
          // out[c] = rgb[perm[c]]: the gradient of rgb[perm[c]] is grad_out[c].
          const int c0 = perm.empty() ? 0 : perm[b][0], c1 = perm.empty() ? 1 : perm[b][1],
                    c2 = perm.empty() ? 2 : perm[b][2];
          load3(gop + b * sg.b, sg, p0, n, W, g[c0], g[c1], g[c2]);
          fn(x[0], x[1], x[2], g[0], g[1], g[2], pg[0], pg[1], pg[2], pg[3], n, params[b], clamp);
          if (gi) store3(gi + b * sgi.b, sgi, p0, n, W, g[0], g[1], g[2]);
          if (part) {
            for (int k = 0; k < 4; ++k) part[item * 4 + k] = lane_sum(pg[k], n);
          }
        }
      });
    });
    if (want_params) {
      double* gp = grad_params.data();
      for (int64_t b = 0; b < B; ++b) {
        for (int k = 0; k < 4; ++k) {
          double total = 0;
          for (int64_t c = 0; c < chunks; ++c) total += partials[(b * chunks + c) * 4 + k];
          gp[k * B + b] = total;
        }
      }
    }
  } else if (want_image) {
    grad_image.zero_();
  }

  std::array<at::Tensor, 4> grads;
  for (int k = 0; k < 4; ++k) {
    const auto& p = *param_tensors[k];
    if (!output_mask[k + 1]) {
      grads[k] = at::empty({0}, p.options());
    } else {
      auto g = at::empty({B}, p.options().dtype(at::kDouble));
      std::copy(grad_params.begin() + k * B, grad_params.begin() + (k + 1) * B, g.mutable_data_ptr<double>());
      // Rounded to the compute dtype first, as the reference's float32 sums are.
      const auto compute = image.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      grads[k] = g.to(compute).to(p.scalar_type());
    }
  }
  return {grad_image, grads[0], grads[1], grads[2], grads[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(tpswarp, CPU, m) {
  m.impl("photometric_jitter", &photometric_jitter_cpu);
  m.impl("_photometric_jitter_backward", &photometric_jitter_backward_cpu);
}

}  // namespace tpswarp
