// CUDA kernels of tpswarp::warped_kl_div and its backward: one thread per output pixel computes
// the TPS map, the validity test and the bilinear taps, and loads the warped teacher on the fly
// inside the KL of tpswarp/kl.h (nothing of size B x C x H x W besides the gradients).
// Gradients of the TPS parameters: per-block partials (fixed decomposition) summed with
// at::sum, deterministic. The teacher gradient is a scatter with atomics: with
// deterministic algorithms requested it raises instead.
//
// size=None performance: the backward gets the validity weights (the mean's denominator) from a
// validity-only kernel (TPS map + hull test, no class loop) instead of rerunning the forward; the
// src/params accumulators (registers, tpswarp/tps_grad_regs.cuh; a capped grid so that each thread
// sums many pixels before its block's one reduction) exist only in the instantiation that needs
// them; for C <= 32 classes (float accumulation, no src/params gradient) the student and warped
// teacher class vectors of a pixel are loaded once into registers (tpswarp/kl_regs.cuh,
// MAX_C = 8/16/32, same arithmetic as kl.h) when TPSWARP_CUDA_KL_REGS=1 (opt-in: slower than the
// generic loaders on an H200 with 19 classes, see kl_regs.cuh); otherwise the kl.h loaders.
//
// size=(H, W): the student (B, C, hs, ws) is read at each output pixel through the resize taps of
// tpswarp/upsample.h (tpswarp/kl_resize.cuh); the teacher (B, C, ht, wt) is resized to (H, W) and
// warped: the warp's bilinear tap into the virtual resized teacher, each of its four pixels read
// through the resize taps (16 loads per class); validity and the loss live on the (H, W) grid.
// Forward: nothing of size B x C x H x W allocated. Student gradient: pass 1 per output pixel
// (validity, KL statistics, sample location: O(B H W)); pass 2 one thread per low-resolution
// student element gathering over the output pixels that read it (linear_resize_readers in rows
// and columns; fixed order, deterministic, no atomics). Teacher/src/params gradients with size:
// by composition inside this file (upsample_bilinear2d of both inputs to B x C x H x W, the
// size=None backward, upsample_bilinear2d_backward for the teacher): exact, but it allocates the
// full-resolution inputs and the teacher part is not deterministic (atomics, as size=None).
//
// _warped_kl_div_with_stats / _backward_stats (size=None, the student's gradient alone): the forward
// kernel also stores each pixel's KL statistics and validity weight (tpswarp/warped_kl.h); the
// backward kernel reads them: one sweep over the classes, no validity pass.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/upsample_bilinear2d.h>
#include <ATen/ops/upsample_bilinear2d_backward.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <limits>

#include "tpswarp/kl.h"
#include "tpswarp/kl_args.h"
#include "tpswarp/kl_regs.cuh"
#include "tpswarp/kl_resize.cuh"
#include "tpswarp/sampling.h"
#include "tpswarp/show.h"
#include "tpswarp/tps.h"
#include "tpswarp/tps_args.h"
#include "tpswarp/tps_grad_regs.cuh"
#include "tpswarp/warped_kl.h"

namespace tpswarp {
namespace {

constexpr const char* kOp = "warped_kl_div";
constexpr int kThreads = 256;

struct Strides4 {
  int64_t b, c, h, w;
};
Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

using Geometry = WarpedKlGeometry;  // tpswarp/warped_kl.h, with warp_pixel

// Register path (kl_regs.cuh) for at most MAX_C classes, float accumulation of float/half/bfloat16
// inputs only (double arrays spill); MAX_C == 0: any C through the loaders of kl.h.
template <typename scalar_t, typename acc>
constexpr bool kRegs = std::is_same<acc, float>::value && !std::is_same<scalar_t, double>::value;

template <typename scalar_t, typename acc, int MAX_C>
__global__ void warped_kl_forward_kernel(Geometry g, const scalar_t* __restrict__ s, Strides4 ss,
                                         const scalar_t* __restrict__ t, Strides4 ts, const acc* __restrict__ src,
                                         const acc* __restrict__ params, acc* __restrict__ kl,
                                         acc* __restrict__ weights, acc* __restrict__ stats) {
  const int64_t N = g.H * g.W;
  const int64_t b = blockIdx.y;
  const int npix = static_cast<int>(N), Wi = static_cast<int>(g.W);  // 32-bit: see check_pixel_count
  acc* stats_b = stats ? stats + b * kWarpedKlStats * N : nullptr;  // (B, kWarpedKlStats, N) of warped_kl.h
  for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < npix; k += gridDim.x * blockDim.x) {
    const int i = k / Wi, j = k - i * Wi;
    const auto w = warp_pixel<acc>(g, src + b * g.n * 2, params + b * (g.n + 3) * 2, i, j);
    weights[b * N + k] = w.valid ? acc(1) : acc(0);
    if (stats_b) stats_b[kKlStats * N + k] = w.valid ? acc(1) : acc(0);
    if (!w.valid) {
      kl[b * N + k] = 0;
      if (stats_b) kl_stats_store(KLPixel<acc>{}, g.logits, stats_b + k, N);  // never read: weight 0
      continue;
    }
    const scalar_t* sp = s + b * ss.b + i * ss.h + j * ss.w;
    const BilinearTapPointers<scalar_t, acc> taps(t + b * ts.b, ts.h, ts.w, w.tap);
    auto load_s = [&](int64_t c) { return static_cast<acc>(sp[c * ss.c]); };
    auto load_t = [&](int64_t c) { return taps.at(c * ts.c); };
    KLPixel<acc> st;
    if constexpr (MAX_C == 0) {
      st = kl_pixel_online_loaded<acc>(load_s, load_t, g.C, g.logits);
    } else {
      acc sv[MAX_C], tv[MAX_C];
      kl_load_regs<MAX_C, acc>(load_s, load_t, int(g.C), sv, tv);
      st = kl_pixel_regs<MAX_C, acc>(sv, tv, int(g.C), g.logits);
    }
    kl[b * N + k] = st.kl;
    if (stats_b) kl_stats_store(st, g.logits, stats_b + k, N);
  }
}

// The student's gradient from the statistics the forward kept (`stats`, (B, kWarpedKlStats, N)): the
// validity weight and the KL statistics are read, not recomputed; one sweep over the classes.
template <typename scalar_t, typename acc>
__global__ void __launch_bounds__(kThreads)
    warped_kl_backward_from_stats_kernel(Geometry g, const scalar_t* __restrict__ s, Strides4 ss,
                                         const scalar_t* __restrict__ t, Strides4 ts, const acc* __restrict__ src,
                                         const acc* __restrict__ params, const acc* __restrict__ stats,
                                         const acc* __restrict__ factor, int64_t f_step, scalar_t* __restrict__ gs,
                                         Strides4 gss) {
  const int64_t N = g.H * g.W;
  const int64_t b = blockIdx.y;
  const acc* stats_b = stats + b * kWarpedKlStats * N;
  const int npix = static_cast<int>(N), Wi = static_cast<int>(g.W);  // 32-bit: see check_pixel_count
  for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < npix; k += gridDim.x * blockDim.x) {
    const int i = k / Wi, j = k - i * Wi;
    const acc scale = factor[(b * N + k) * f_step] * stats_b[kKlStats * N + k];
    scalar_t* gsp = gs + b * gss.b + i * gss.h + j * gss.w;
    if (scale == acc(0)) {
      for (int64_t c = 0; c < g.C; ++c) gsp[c * gss.c] = scalar_t(0);
      continue;
    }
    const auto w = warp_pixel<acc>(g, src + b * g.n * 2, params + b * (g.n + 3) * 2, i, j);
    const auto st = kl_stats_load(stats_b + k, N, g.logits);
    const scalar_t* sp = s + b * ss.b + i * ss.h + j * ss.w;
    const BilinearTapPointers<scalar_t, acc> taps(t + b * ts.b, ts.h, ts.w, w.tap);
    kl_pixel_grad_loaded<acc>(
        [&](int64_t c) { return static_cast<acc>(sp[c * ss.c]); }, [&](int64_t c) { return taps.at(c * ts.c); }, g.C,
        g.logits, st, scale, true, [&](int64_t c, acc v) { gsp[c * gss.c] = static_cast<scalar_t>(v); }, false,
        [](int64_t, acc) {});
  }
}

// Validity weights only (the backward's mean denominator): warp_pixel's TPS map and hull test,
// without the class loop (the taps it also computes are unused and optimized away).
template <typename acc>
__global__ void warped_validity_kernel(Geometry g, const acc* __restrict__ src, const acc* __restrict__ params,
                                       acc* __restrict__ weights) {
  const int64_t N = g.H * g.W;
  const int64_t b = blockIdx.y;
  const int npix = static_cast<int>(N), Wi = static_cast<int>(g.W);  // 32-bit: see check_pixel_count
  for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < npix; k += gridDim.x * blockDim.x) {
    const int i = k / Wi, j = k - i * Wi;
    const auto w = warp_pixel<acc>(g, src + b * g.n * 2, params + b * (g.n + 3) * 2, i, j);
    weights[b * N + k] = w.valid ? acc(1) : acc(0);
  }
}

// NPTS > 0: the src/params gradient is requested, for at most NPTS control points (register
// accumulators of tps_grad_regs.cuh over the thread's pixels, one block reduction into this block's
// partial row); it always uses the generic class loop (MAX_C == 0): its accumulators already take
// the registers. kl_out (nullable, (B, H * W)): each pixel's KL as the forward computes it, 0 where
// scale is 0.
// The student-only float instantiation is held to 3 blocks per SM (<= 85 registers): with exp_gpu the
// compiler unrolls its class loop further and took 98 registers (20 resident warps), against 58 before.
template <typename scalar_t, typename acc, int MAX_C, int NPTS>
__global__ void __launch_bounds__(kThreads, NPTS == 0 && MAX_C == 0 && std::is_same<acc, float>::value ? 3 : 1)
    warped_kl_backward_kernel(Geometry g, const scalar_t* __restrict__ s, Strides4 ss, const scalar_t* __restrict__ t,
                              Strides4 ts, const acc* __restrict__ src, const acc* __restrict__ params,
                              const acc* __restrict__ weights, const acc* __restrict__ factor, int64_t f_step,
                              scalar_t* gs, Strides4 gss, acc* gt, acc* partials, acc* kl_out) {
  constexpr bool kCoords = NPTS > 0;
  const int64_t N = g.H * g.W;
  const int64_t b = blockIdx.y;
  const int n = static_cast<int>(g.n);
  const acc* src_b = src + b * n * 2;
  const acc* params_b = params + b * (n + 3) * 2;
  const acc sx = normalized_to_pixel_scale<acc>(g.Wt, g.align_corners);
  const acc sy = normalized_to_pixel_scale<acc>(g.Ht, g.align_corners);
  TpsGradRegs<acc, kCoords ? NPTS : 1> tps_grads;

  const int npix = static_cast<int>(N), Wi = static_cast<int>(g.W);  // 32-bit: see check_pixel_count
  for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < npix; k += gridDim.x * blockDim.x) {
    const int i = k / Wi, j = k - i * Wi;
    const acc scale = factor[(b * N + k) * f_step] * weights[b * N + k];
    scalar_t* gsp = gs ? gs + b * gss.b + i * gss.h + j * gss.w : nullptr;
    if (scale == acc(0)) {
      if (gsp)
        for (int64_t c = 0; c < g.C; ++c) gsp[c * gss.c] = scalar_t(0);
      if (kl_out) kl_out[b * N + k] = 0;
      continue;
    }
    const auto w = warp_pixel<acc>(g, src_b, params_b, i, j);
    const scalar_t* sp = s + b * ss.b + i * ss.h + j * ss.w;
    const BilinearTapPointers<scalar_t, acc> taps(t + b * ts.b, ts.h, ts.w, w.tap);
    auto load_s = [&](int64_t c) { return static_cast<acc>(sp[c * ss.c]); };
    auto load_t = [&](int64_t c) { return taps.at(c * ts.c); };
    [[maybe_unused]] const auto coefs = bilinear_coord_coefs(w.tap);  // for the coordinate gradient (kCoords)
    acc dpx = 0, dpy = 0;
    acc* gt_b = gt ? gt + b * g.C * g.Ht * g.Wt : nullptr;
    auto store_s = [&](int64_t c, acc v) { gsp[c * gss.c] = static_cast<scalar_t>(v); };
    auto store_t = [&](int64_t c, acc v) {
      if (gt_b) {
        acc* plane = gt_b + c * g.Ht * g.Wt;
        bilinear_scatter(w.tap, g.Wt, 1, v, [&](int64_t off, acc x) { atomicAdd(plane + off, x); });
      }
      if constexpr (kCoords) {
        const auto d = taps.coord_at(c * ts.c, coefs);
        dpx += v * d.x;
        dpy += v * d.y;
      }
    };
    const bool want_t = gt_b != nullptr || kCoords;
    if constexpr (MAX_C == 0) {
      const auto st = kl_pixel_online_loaded<acc>(load_s, load_t, g.C, g.logits);
      if (kl_out) kl_out[b * N + k] = st.kl;
      kl_pixel_grad_loaded<acc>(load_s, load_t, g.C, g.logits, st, scale, gsp != nullptr, store_s, want_t, store_t);
    } else {
      acc sv[MAX_C], tv[MAX_C];
      kl_load_regs<MAX_C, acc>(load_s, load_t, int(g.C), sv, tv);
      const auto st = kl_pixel_regs<MAX_C, acc>(sv, tv, int(g.C), g.logits);
      if (kl_out) kl_out[b * N + k] = st.kl;
      kl_pixel_grad_regs<MAX_C, acc>(sv, tv, int(g.C), g.logits, st, scale, gsp != nullptr, store_s, want_t, store_t);
    }
    if constexpr (kCoords) tps_grads.add(w.qx, w.qy, src_b, params_b, n, Vec2<acc>{dpx * sx, dpy * sy});
  }

  if constexpr (kCoords) {
    __shared__ acc shared[(kThreads / 32) * TpsGradRegs<acc, NPTS>::kLen];
    tps_grads.store_block_sum(shared, partials + (b * gridDim.x + blockIdx.x) * (4 * int64_t(n) + 6), n);
  }
}

// The kernels index the pixels of an item with 32-bit arithmetic (a 64-bit division costs tens of
// instructions per pixel): H W plus the threads of a grid must stay below 2^31.
void check_pixel_count(int64_t H, int64_t W) {
  TORCH_CHECK_VALUE(H * W <= std::numeric_limits<int>::max() - (int64_t(1) << 20), kOp, ": output too large (", show(H),
                    " x ", show(W), " pixels per item; the CUDA kernels index pixels in 32 bits)");
}

struct Prepared {
  Geometry g;
  Reduction reduction;
  at::ScalarType in_dtype, acc_dtype;
  at::Tensor s, t, src, params;
};

Prepared prepare(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& src, const at::Tensor& params,
                 bool teacher_is_logits, bool align_corners, c10::string_view reduction) {
  check_kl_tensor(student, "student_logits", kOp);
  check_kl_tensor(teacher, "teacher", kOp);
  TORCH_CHECK_VALUE(student.dim() == 4, kOp, ": `student_logits` must be 4-D (B, C, H, W), got ",
                    show(student.sizes()));
  TORCH_CHECK_VALUE(teacher.dim() == 4, kOp, ": `teacher` must be 4-D (B, C, H, W), got ", show(teacher.sizes()));
  TORCH_CHECK_VALUE(teacher.size(0) == student.size(0) && teacher.size(1) == student.size(1), kOp, ": `teacher` ",
                    show(teacher.sizes()), " and `student_logits` ", show(student.sizes()),
                    " must agree in batch size and classes");
  check_tps_params_args(src, params, student.size(0), kOp);
  check_same_device(student, "student_logits", teacher, "teacher", kOp);
  check_same_device(student, "student_logits", src, "src", kOp);
  TORCH_CHECK_VALUE(student.size(0) <= 65535, kOp, ": the CUDA kernels support at most 65535 batch items, got ",
                    show(student.size(0)));
  Prepared p;
  p.g = {student.size(0), student.size(1), student.size(2), student.size(3), teacher.size(2), teacher.size(3),
         src.size(1), teacher_is_logits, align_corners};
  p.reduction = parse_reduction(reduction, kOp);
  check_pixel_count(p.g.H, p.g.W);
  const bool any_double = student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble ||
                          params.scalar_type() == at::kDouble;
  p.acc_dtype = any_double ? at::kDouble : at::kFloat;
  p.in_dtype = student.scalar_type() == teacher.scalar_type() ? student.scalar_type() : p.acc_dtype;
  p.s = student.to(p.in_dtype);
  p.t = teacher.to(p.in_dtype);
  p.src = src.to(p.acc_dtype).contiguous();
  p.params = params.to(p.acc_dtype).contiguous();
  return p;
}

dim3 grid_for(int64_t N, int64_t B) {
  return dim3(static_cast<unsigned>(std::min<int64_t>((N + kThreads - 1) / kThreads, 1024)), static_cast<unsigned>(B));
}

// The backward with src/params gradients: about kCoordBlocks blocks in all (a few waves), so that each
// thread sums many pixels before its block's one reduction. Depends on the shape only: deterministic.
constexpr int64_t kCoordBlocks = 2048;
dim3 coord_grid_for(int64_t N, int64_t B) {
  const int64_t per_item = std::max<int64_t>(1, std::min<int64_t>((N + kThreads - 1) / kThreads, kCoordBlocks / B));
  return dim3(static_cast<unsigned>(per_item), static_cast<unsigned>(B));
}

void launch_forward(const Prepared& p, at::Tensor& kl, at::Tensor& weights, at::Tensor* stats = nullptr) {
  const int64_t N = p.g.H * p.g.W;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.in_dtype, "warped_kl_div_cuda", [&] {
    auto run = [&](auto acc_tag) {
      using acc = decltype(acc_tag);
      dispatch_max_classes(kRegs<scalar_t, acc> ? p.g.C : INT64_MAX, [&](auto max_c) {
        constexpr int MAX_C = kRegs<scalar_t, acc> ? decltype(max_c)::value : 0;
        warped_kl_forward_kernel<scalar_t, acc, MAX_C><<<grid_for(N, p.g.B), kThreads, 0, stream>>>(
            p.g, p.s.const_data_ptr<scalar_t>(), strides_of(p.s), p.t.const_data_ptr<scalar_t>(), strides_of(p.t),
            p.src.const_data_ptr<acc>(), p.params.const_data_ptr<acc>(), kl.mutable_data_ptr<acc>(),
            weights.mutable_data_ptr<acc>(), stats ? stats->mutable_data_ptr<acc>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    if (p.acc_dtype == at::kDouble)
      run(double{});
    else
      run(float{});
  });
}

void launch_validity(const Prepared& p, at::Tensor& weights) {
  const int64_t N = p.g.H * p.g.W;
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto run = [&](auto acc_tag) {
    using acc = decltype(acc_tag);
    warped_validity_kernel<acc><<<grid_for(N, p.g.B), kThreads, 0, stream>>>(
        p.g, p.src.const_data_ptr<acc>(), p.params.const_data_ptr<acc>(), weights.mutable_data_ptr<acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (p.acc_dtype == at::kDouble)
    run(double{});
  else
    run(float{});
}

at::Tensor warped_kl_div_impl(const at::Tensor& student_logits, const at::Tensor& teacher, const at::Tensor& src,
                              const at::Tensor& params, bool teacher_is_logits, bool align_corners,
                              c10::string_view reduction) {
  auto p = prepare(student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction);
  auto kl = at::zeros({p.g.B, p.g.H * p.g.W}, student_logits.options().dtype(p.acc_dtype));
  auto weights = at::zeros_like(kl);
  if (kl.numel() > 0 && p.g.C > 0 && p.g.Ht > 0 && p.g.Wt > 0) launch_forward(p, kl, weights);
  return kl_reduce(kl, weights, p.reduction, {p.g.B, p.g.H, p.g.W});
}

// tpswarp::_warped_kl_div_with_stats: the loss, and the statistics of the student's gradient
// ((B, kWarpedKlStats, H W) of the compute dtype, tpswarp/warped_kl.h).
std::tuple<at::Tensor, at::Tensor> warped_kl_div_with_stats_cuda(const at::Tensor& student_logits,
                                                                 const at::Tensor& teacher, const at::Tensor& src,
                                                                 const at::Tensor& params, bool teacher_is_logits,
                                                                 bool align_corners, c10::string_view reduction) {
  c10::cuda::CUDAGuard guard(student_logits.device());
  auto p = prepare(student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction);
  auto kl = at::zeros({p.g.B, p.g.H * p.g.W}, student_logits.options().dtype(p.acc_dtype));
  auto weights = at::zeros_like(kl);
  auto stats = at::zeros({p.g.B, kWarpedKlStats, p.g.H * p.g.W}, kl.options());
  if (kl.numel() > 0 && p.g.C > 0 && p.g.Ht > 0 && p.g.Wt > 0) launch_forward(p, kl, weights, &stats);
  return {kl_reduce(kl, weights, p.reduction, {p.g.B, p.g.H, p.g.W}), stats};
}

// tpswarp::_warped_kl_div_backward_stats: the student's gradient from those statistics.
at::Tensor warped_kl_div_backward_stats_cuda(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                                             const at::Tensor& teacher, const at::Tensor& src, const at::Tensor& params,
                                             const at::Tensor& stats, bool teacher_is_logits, bool align_corners,
                                             c10::string_view reduction) {
  c10::cuda::CUDAGuard guard(student_logits.device());
  auto p = prepare(student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction);
  const int64_t N = p.g.H * p.g.W;
  check_kl_stats(stats, p.g.B, kWarpedKlStats, N, p.acc_dtype, student_logits, kOp);
  at::Tensor grad_s = at::empty_like(student_logits);
  if (p.g.B * N == 0 || p.g.C == 0 || p.g.Ht == 0 || p.g.Wt == 0) return grad_s.zero_();
  auto factor = kl_grad_factor(grad_loss, stats.select(1, kKlStats), p.reduction, p.g.B, N, p.acc_dtype);
  at::Tensor gs = grad_s.scalar_type() != p.in_dtype ? at::empty_like(grad_s, grad_s.options().dtype(p.in_dtype))
                                                     : grad_s;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.in_dtype, "warped_kl_div_backward_stats_cuda", [&] {
    auto run = [&](auto acc_tag) {
      using acc = decltype(acc_tag);
      warped_kl_backward_from_stats_kernel<scalar_t, acc><<<grid_for(N, p.g.B), kThreads, 0, stream>>>(
          p.g, p.s.const_data_ptr<scalar_t>(), strides_of(p.s), p.t.const_data_ptr<scalar_t>(), strides_of(p.t),
          p.src.const_data_ptr<acc>(), p.params.const_data_ptr<acc>(), stats.const_data_ptr<acc>(),
          factor.const_data_ptr<acc>(), factor.dim() == 0 ? 0 : 1, gs.mutable_data_ptr<scalar_t>(), strides_of(gs));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (p.acc_dtype == at::kDouble)
      run(double{});
    else
      run(float{});
  });
  if (!gs.is_same(grad_s)) grad_s.copy_(gs);
  return grad_s;
}

// With kl_out and weights_out, the pass also gives each pixel's KL as the forward computes it and the
// validity weights ((B, H * W) of the compute dtype; the loss is kl_reduce of the two).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> warped_kl_div_backward_impl(
    const at::Tensor& grad_loss, const at::Tensor& student_logits, const at::Tensor& teacher, const at::Tensor& src,
    const at::Tensor& params, bool teacher_is_logits, bool align_corners, c10::string_view reduction,
    std::array<bool, 4> output_mask, at::Tensor* kl_out = nullptr, at::Tensor* weights_out = nullptr) {
  auto p = prepare(student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction);
  const bool need_coords = output_mask[2] || output_mask[3];
  TORCH_CHECK_VALUE(!need_coords || p.g.n <= kTpsGradMaxPoints, kOp,
                    ": the CUDA backward to `src`/`params` supports at most ", show(kTpsGradMaxPoints),
                    " control points, got n=", show(p.g.n), "; use the reference backend for more");
  if (output_mask[1]) {
    at::globalContext().alertNotDeterministic(
        "warped_kl_div_backward_cuda (teacher gradient; the Triton backend's is deterministic in this mode: "
        "tpswarp.use_backend('triton'))");
  }
  auto placeholder = [](const at::Tensor& x) { return at::empty({0}, x.options()); };
  at::Tensor grad_s = output_mask[0] ? at::empty_like(student_logits) : placeholder(student_logits);
  at::Tensor grad_t = output_mask[1] ? at::zeros_like(teacher) : placeholder(teacher);
  at::Tensor grad_src = output_mask[2] ? at::zeros_like(src) : placeholder(src);
  at::Tensor grad_params = output_mask[3] ? at::zeros_like(params) : placeholder(params);
  const int64_t N = p.g.H * p.g.W;
  if (p.g.B * N == 0 || p.g.C == 0 || p.g.Ht == 0 || p.g.Wt == 0 ||
      !(output_mask[0] || output_mask[1] || need_coords)) {
    if (output_mask[0]) grad_s.zero_();
    if (kl_out) *kl_out = at::zeros({p.g.B, N}, student_logits.options().dtype(p.acc_dtype));
    if (weights_out) *weights_out = at::zeros({p.g.B, N}, student_logits.options().dtype(p.acc_dtype));
    return {grad_s, grad_t, grad_src, grad_params};
  }
  auto weights = at::zeros({p.g.B, N}, student_logits.options().dtype(p.acc_dtype));
  launch_validity(p, weights);  // the validity weights: the mean's denominator, on the device
  if (weights_out) *weights_out = weights;
  if (kl_out) *kl_out = at::empty({p.g.B, N}, weights.options());  // the kernel writes every pixel
  auto factor = kl_grad_factor(grad_loss, weights, p.reduction, p.g.B, N, p.acc_dtype);
  at::Tensor gs = output_mask[0] && grad_s.scalar_type() != p.in_dtype
                      ? at::empty_like(grad_s, grad_s.options().dtype(p.in_dtype))
                      : grad_s;
  at::Tensor gt_acc = output_mask[1] ? at::zeros({p.g.B, p.g.C, p.g.Ht, p.g.Wt}, weights.options()) : at::Tensor();
  const dim3 grid = need_coords ? coord_grid_for(N, p.g.B) : grid_for(N, p.g.B);
  const int64_t row_len = 2 * p.g.n + 2 * (p.g.n + 3);
  at::Tensor partials = need_coords ? at::empty({p.g.B, int64_t(grid.x), row_len}, weights.options()) : at::Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.in_dtype, "warped_kl_div_backward_cuda", [&] {
    auto run = [&](auto acc_tag) {
      using acc = decltype(acc_tag);
      auto launch = [&](auto max_c, auto points) {
        constexpr int NPTS = decltype(points)::value;
        constexpr int MAX_C = kRegs<scalar_t, acc> && NPTS == 0 ? decltype(max_c)::value : 0;
        warped_kl_backward_kernel<scalar_t, acc, MAX_C, NPTS><<<grid, kThreads, 0, stream>>>(
            p.g, p.s.const_data_ptr<scalar_t>(), strides_of(p.s), p.t.const_data_ptr<scalar_t>(), strides_of(p.t),
            p.src.const_data_ptr<acc>(), p.params.const_data_ptr<acc>(), weights.const_data_ptr<acc>(),
            factor.const_data_ptr<acc>(), factor.dim() == 0 ? 0 : 1,
            output_mask[0] ? gs.mutable_data_ptr<scalar_t>() : nullptr,
            output_mask[0] ? strides_of(gs) : Strides4{0, 0, 0, 0},
            output_mask[1] ? gt_acc.mutable_data_ptr<acc>() : nullptr,
            need_coords ? partials.mutable_data_ptr<acc>() : nullptr,
            kl_out ? kl_out->mutable_data_ptr<acc>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (need_coords) {
        dispatch_tps_grad_points(p.g.n, [&](auto points) { launch(std::integral_constant<int, 0>{}, points); });
      } else {
        dispatch_max_classes(kRegs<scalar_t, acc> ? p.g.C : INT64_MAX,
                             [&](auto max_c) { launch(max_c, std::integral_constant<int, 0>{}); });
      }
    };
    if (p.acc_dtype == at::kDouble)
      run(double{});
    else
      run(float{});
  });
  if (output_mask[0] && !gs.is_same(grad_s)) grad_s.copy_(gs);
  if (output_mask[1]) grad_t.copy_(gt_acc);
  if (need_coords) {
    auto per_item = partials.sum(1);
    if (output_mask[2]) grad_src.copy_(per_item.narrow(1, 0, 2 * p.g.n).view({p.g.B, p.g.n, 2}));
    if (output_mask[3]) grad_params.copy_(per_item.narrow(1, 2 * p.g.n, 2 * (p.g.n + 3)).view({p.g.B, p.g.n + 3, 2}));
  }
  return {grad_s, grad_t, grad_src, grad_params};
}

// ---------------------------------------------------------------------------------------------
// size=(H, W): the student (B, C, hs, ws) is read through the resize taps of tpswarp/upsample.h at
// each output pixel; the teacher (B, C, ht, wt) is resized to (H, W) and warped, i.e. the warp's
// bilinear tap into the (virtual) resized teacher, each of its four pixels read through the resize
// taps (bilinear of bilinear, 16 loads per class). In the Geometry, H, W and Ht, Wt are all the
// output size; SizedDims holds the input sizes. Nothing of size B x C x H x W is allocated on the
// forward and student-gradient paths.
// ---------------------------------------------------------------------------------------------
struct SizedDims {
  int64_t hs, ws, ht, wt;
};

template <typename acc> struct VirtualTap {
  BilinearTap<acc> tap;              // the warp's tap into the resized (g.Ht, g.Wt) teacher
  LinearTap<acc> ry0, ry1, cx0, cx1;  // resize taps of its rows tap.y0, tap.y1 and columns tap.x0, tap.x1
};

template <typename acc>
__device__ __forceinline__ VirtualTap<acc> virtual_tap(acc px, acc py, const Geometry& g, const SizedDims& d, acc t_sh,
                                                       acc t_sw) {
  VirtualTap<acc> v;
  v.tap = bilinear_tap<acc>(px, py, g.Ht, g.Wt);
  v.ry0 = linear_resize_tap<acc>(v.tap.y0, d.ht, t_sh);
  v.ry1 = linear_resize_tap<acc>(v.tap.y1, d.ht, t_sh);
  v.cx0 = linear_resize_tap<acc>(v.tap.x0, d.wt, t_sw);
  v.cx1 = linear_resize_tap<acc>(v.tap.x1, d.wt, t_sw);
  return v;
}

// The warped resized teacher of one class plane: bilinear_combine (fill 0) of the four resized values.
template <typename scalar_t, typename acc>
__device__ __forceinline__ acc virtual_read(const scalar_t* __restrict__ plane, const VirtualTap<acc>& v, int64_t sh,
                                            int64_t sw) {
  const acc v00 = kl_resize::read<scalar_t, acc>(plane, kl_resize::tap2<acc>(v.ry0, v.cx0, sh, sw));  // (y0, x0)
  const acc v10 = kl_resize::read<scalar_t, acc>(plane, kl_resize::tap2<acc>(v.ry0, v.cx1, sh, sw));  // (y0, x1)
  const acc v01 = kl_resize::read<scalar_t, acc>(plane, kl_resize::tap2<acc>(v.ry1, v.cx0, sh, sw));  // (y1, x0)
  const acc v11 = kl_resize::read<scalar_t, acc>(plane, kl_resize::tap2<acc>(v.ry1, v.cx1, sh, sw));  // (y1, x1)
  acc out = v.tap.w00 * v00;
  out += v.tap.w10 * v10;
  out += v.tap.w01 * v01;
  out += v.tap.w11 * v11;
  return out;
}

// Forward (kl != null), validity weights (always), and pass 1 of the backward (stats != null).
template <typename scalar_t, typename acc>
__global__ void warped_kl_sized_forward_kernel(Geometry g, SizedDims d, const scalar_t* __restrict__ s, Strides4 ss,
                                               const scalar_t* __restrict__ t, Strides4 ts,
                                               const acc* __restrict__ src, const acc* __restrict__ params,
                                               acc* __restrict__ kl, acc* __restrict__ weights,
                                               kl_resize::PixelStats<acc>* __restrict__ stats) {
  const int64_t N = g.H * g.W;
  const int64_t b = blockIdx.y;
  const acc s_sh = linear_resize_scale<acc>(d.hs, g.H), s_sw = linear_resize_scale<acc>(d.ws, g.W);
  const acc t_sh = linear_resize_scale<acc>(d.ht, g.Ht), t_sw = linear_resize_scale<acc>(d.wt, g.Wt);
  const int npix = static_cast<int>(N), Wi = static_cast<int>(g.W);  // 32-bit: see check_pixel_count
  for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < npix; k += gridDim.x * blockDim.x) {
    const int i = k / Wi, j = k - i * Wi;
    const auto w = warp_pixel<acc>(g, src + b * g.n * 2, params + b * (g.n + 3) * 2, i, j);
    weights[b * N + k] = w.valid ? acc(1) : acc(0);
    if (!w.valid) {
      if (kl) kl[b * N + k] = 0;
      continue;
    }
    const auto rs = kl_resize::tap2<acc>(i, j, d.hs, d.ws, s_sh, s_sw, ss.h, ss.w);
    const auto vt = virtual_tap<acc>(w.px, w.py, g, d, t_sh, t_sw);
    const scalar_t* sb = s + b * ss.b;
    const scalar_t* tb = t + b * ts.b;
    const auto st = kl_pixel_online_loaded<acc>(
        [&](int64_t c) { return kl_resize::read<scalar_t, acc>(sb + c * ss.c, rs); },
        [&](int64_t c) { return virtual_read<scalar_t, acc>(tb + c * ts.c, vt, ts.h, ts.w); }, g.C, g.logits);
    if (kl) kl[b * N + k] = st.kl;
    if (stats) {
      stats[b * N + k].kl = st;
      stats[b * N + k].px = w.px;
      stats[b * N + k].py = w.py;
    }
  }
}

// Pass 2 of the student backward: one thread per low-resolution student element (b, c, y, x),
// summing over the output pixels that read it (fixed order: deterministic, no atomics) the tap
// weight times d(scale * KL)/d(resized student) there. Invalid pixels have weight 0 (skipped).
template <typename scalar_t, typename acc>
__global__ void warped_kl_sized_gather_kernel(Geometry g, SizedDims d, const scalar_t* __restrict__ s, Strides4 ss,
                                              const scalar_t* __restrict__ t, Strides4 ts,
                                              const acc* __restrict__ weights, const acc* __restrict__ factor,
                                              int64_t f_step, const kl_resize::PixelStats<acc>* __restrict__ stats,
                                              scalar_t* __restrict__ out, Strides4 os) {
  const int64_t N = g.H * g.W;
  const int64_t plane = d.hs * d.ws, total = g.B * g.C * plane;
  const acc s_sh = linear_resize_scale<acc>(d.hs, g.H), s_sw = linear_resize_scale<acc>(d.ws, g.W);
  const acc t_sh = linear_resize_scale<acc>(d.ht, g.Ht), t_sw = linear_resize_scale<acc>(d.wt, g.Wt);
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t x = e % d.ws, y = (e / d.ws) % d.hs, c = (e / plane) % g.C, b = e / (plane * g.C);
    const scalar_t* sp = s + b * ss.b + c * ss.c;
    const scalar_t* tp = t + b * ts.b + c * ts.c;
    acc sum = 0;
    kl_resize::for_each_reader<acc>(y, x, d.hs, d.ws, g.H, g.W, s_sh, s_sw, [&](int64_t oy, int64_t ox, acc weight) {
      const int64_t i = b * N + oy * g.W + ox;
      const acc scale = factor[i * f_step] * weights[i];
      if (scale == acc(0)) return;
      const acc sv = kl_resize::read<scalar_t, acc>(sp, kl_resize::tap2<acc>(oy, ox, d.hs, d.ws, s_sh, s_sw, ss.h, ss.w));
      const acc tv = virtual_read<scalar_t, acc>(tp, virtual_tap<acc>(stats[i].px, stats[i].py, g, d, t_sh, t_sw), ts.h,
                                                 ts.w);
      acc grad = 0;
      kl_pixel_grad_loaded<acc>(
          [&](int64_t) { return sv; }, [&](int64_t) { return tv; }, 1, g.logits, stats[i].kl, scale, true,
          [&](int64_t, acc v) { grad = v; }, false, [&](int64_t, acc) {});
      sum += weight * grad;
    });
    out[b * os.b + c * os.c + y * os.h + x * os.w] = static_cast<scalar_t>(sum);
  }
}

struct SizedPrepared {
  Prepared p;
  SizedDims d;
};

SizedPrepared prepare_sized(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& src,
                            const at::Tensor& params, bool teacher_is_logits, bool align_corners,
                            c10::string_view reduction, at::IntArrayRef size) {
  TORCH_CHECK_VALUE(size.size() == 2 && size[0] > 0 && size[1] > 0, kOp,
                    ": `size` must be None or a pair of positive ints (H, W), got ", show(size));
  TORCH_CHECK_VALUE(size[0] <= (int64_t(1) << 24) && size[1] <= (int64_t(1) << 24), kOp,
                    ": `size` must be at most 2^24 in each dimension, got ", show(size));
  SizedPrepared r;
  r.p = prepare(student, teacher, src, params, teacher_is_logits, align_corners, reduction);
  r.d = {student.size(2), student.size(3), teacher.size(2), teacher.size(3)};
  TORCH_CHECK_VALUE(r.d.hs > 0 && r.d.ws > 0 && r.d.ht > 0 && r.d.wt > 0, kOp, ": with `size`, `student_logits` ",
                    show(student.sizes()), " and `teacher` ", show(teacher.sizes()),
                    " must have nonzero height and width");
  // the loss lives on the (H, W) grid, and the warp reads the teacher resized to (H, W)
  r.p.g.H = r.p.g.Ht = size[0];
  r.p.g.W = r.p.g.Wt = size[1];
  check_pixel_count(r.p.g.H, r.p.g.W);
  return r;
}

// kl and stats may be undefined (not written); weights (B, H W) always written.
void launch_sized_forward(const SizedPrepared& sp, at::Tensor& kl, at::Tensor& weights, at::Tensor& stats) {
  const auto& p = sp.p;
  const int64_t N = p.g.H * p.g.W;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.in_dtype, "warped_kl_div_sized_cuda", [&] {
    auto run = [&](auto acc_tag) {
      using acc = decltype(acc_tag);
      warped_kl_sized_forward_kernel<scalar_t, acc><<<grid_for(N, p.g.B), kThreads, 0, stream>>>(
          p.g, sp.d, p.s.const_data_ptr<scalar_t>(), strides_of(p.s), p.t.const_data_ptr<scalar_t>(), strides_of(p.t),
          p.src.const_data_ptr<acc>(), p.params.const_data_ptr<acc>(),
          kl.defined() ? kl.mutable_data_ptr<acc>() : nullptr, weights.mutable_data_ptr<acc>(),
          stats.defined() ? reinterpret_cast<kl_resize::PixelStats<acc>*>(stats.mutable_data_ptr<acc>()) : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (p.acc_dtype == at::kDouble)
      run(double{});
    else
      run(float{});
  });
}

at::Tensor warped_kl_div_sized_cuda(const at::Tensor& student_logits, const at::Tensor& teacher, const at::Tensor& src,
                                    const at::Tensor& params, bool teacher_is_logits, bool align_corners,
                                    c10::string_view reduction, at::IntArrayRef size) {
  const auto sp = prepare_sized(student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction, size);
  const auto& g = sp.p.g;
  auto kl = at::zeros({g.B, g.H * g.W}, student_logits.options().dtype(sp.p.acc_dtype));
  auto weights = at::zeros_like(kl);
  at::Tensor no_stats;
  if (kl.numel() > 0 && g.C > 0) launch_sized_forward(sp, kl, weights, no_stats);
  return kl_reduce(kl, weights, sp.p.reduction, {g.B, g.H, g.W});
}

// Student gradient: the two passes above. Teacher / src / params gradients: by composition
// (the teacher and student resized with upsample_bilinear2d into B x C x H x W tensors, the
// size=None backward, then upsample_bilinear2d_backward for the teacher): a rare path, exact
// but neither allocation-free nor (teacher: atomics) deterministic.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> warped_kl_div_sized_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& student_logits, const at::Tensor& teacher, const at::Tensor& src,
    const at::Tensor& params, bool teacher_is_logits, bool align_corners, c10::string_view reduction,
    at::IntArrayRef size, std::array<bool, 4> output_mask) {
  const auto sp = prepare_sized(student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction, size);
  const auto& p = sp.p;
  const auto& g = p.g;
  auto placeholder = [](const at::Tensor& x) { return at::empty({0}, x.options()); };
  at::Tensor grad_s = output_mask[0] ? at::empty_like(student_logits) : placeholder(student_logits);
  at::Tensor grad_t = output_mask[1] ? at::zeros_like(teacher) : placeholder(teacher);
  at::Tensor grad_src = output_mask[2] ? at::zeros_like(src) : placeholder(src);
  at::Tensor grad_params = output_mask[3] ? at::zeros_like(params) : placeholder(params);
  const int64_t N = g.H * g.W;
  if (g.B * N == 0 || g.C == 0) {
    if (output_mask[0]) grad_s.zero_();
    return {grad_s, grad_t, grad_src, grad_params};
  }
  if (output_mask[1] || output_mask[2] || output_mask[3]) {
    const std::array<int64_t, 2> out_hw{g.H, g.W};
    const at::IntArrayRef out_size(out_hw);
    auto s_up = at::upsample_bilinear2d(p.s.to(p.acc_dtype), out_size, false, std::nullopt, std::nullopt);
    auto t_up = at::upsample_bilinear2d(p.t.to(p.acc_dtype), out_size, false, std::nullopt, std::nullopt);
    auto composed = warped_kl_div_backward_impl(grad_loss, s_up, t_up, src, params, teacher_is_logits, align_corners,
                                                reduction, {false, output_mask[1], output_mask[2], output_mask[3]});
    if (output_mask[1])
      grad_t.copy_(at::upsample_bilinear2d_backward(std::get<1>(composed), out_size, p.t.sizes(), false, std::nullopt,
                                                    std::nullopt));
    if (output_mask[2]) grad_src.copy_(std::get<2>(composed));
    if (output_mask[3]) grad_params.copy_(std::get<3>(composed));
  }
  if (output_mask[0]) {
    auto weights = at::zeros({g.B, N}, student_logits.options().dtype(p.acc_dtype));
    const int64_t stats_len = p.acc_dtype == at::kDouble ? int64_t(sizeof(kl_resize::PixelStats<double>) / sizeof(double))
                                                         : int64_t(sizeof(kl_resize::PixelStats<float>) / sizeof(float));
    auto stats = at::empty({g.B * N, stats_len}, weights.options());
    at::Tensor no_kl;
    launch_sized_forward(sp, no_kl, weights, stats);  // pass 1: validity weights and per-pixel statistics
    auto factor = kl_grad_factor(grad_loss, weights, p.reduction, g.B, N, p.acc_dtype);
    at::Tensor gs = grad_s.scalar_type() != p.in_dtype ? at::empty_like(grad_s, grad_s.options().dtype(p.in_dtype))
                                                       : grad_s;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.in_dtype, "warped_kl_div_sized_backward_cuda", [&] {
      auto run = [&](auto acc_tag) {
        using acc = decltype(acc_tag);
        const int64_t total = gs.numel();
        const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535 * 8));
        warped_kl_sized_gather_kernel<scalar_t, acc><<<blocks, kThreads, 0, stream>>>(
            g, sp.d, p.s.const_data_ptr<scalar_t>(), strides_of(p.s), p.t.const_data_ptr<scalar_t>(), strides_of(p.t),
            weights.const_data_ptr<acc>(), factor.const_data_ptr<acc>(), factor.dim() == 0 ? 0 : 1,
            reinterpret_cast<const kl_resize::PixelStats<acc>*>(stats.const_data_ptr<acc>()),
            gs.mutable_data_ptr<scalar_t>(), strides_of(gs));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (p.acc_dtype == at::kDouble)
        run(double{});
      else
        run(float{});
    });
    if (!gs.is_same(grad_s)) grad_s.copy_(gs);
  }
  return {grad_s, grad_t, grad_src, grad_params};
}

at::Tensor warped_kl_div_cuda(const at::Tensor& student_logits, const at::Tensor& teacher, const at::Tensor& src,
                              const at::Tensor& params, bool teacher_is_logits, bool align_corners,
                              c10::string_view reduction, at::OptionalIntArrayRef size) {
  c10::cuda::CUDAGuard guard(student_logits.device());
  if (size.has_value())
    return warped_kl_div_sized_cuda(student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction,
                                    *size);
  return warped_kl_div_impl(student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> warped_kl_div_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& student_logits, const at::Tensor& teacher, const at::Tensor& src,
    const at::Tensor& params, bool teacher_is_logits, bool align_corners, c10::string_view reduction,
    at::OptionalIntArrayRef size, std::array<bool, 4> output_mask) {
  c10::cuda::CUDAGuard guard(student_logits.device());
  if (size.has_value())
    return warped_kl_div_sized_backward_cuda(grad_loss, student_logits, teacher, src, params, teacher_is_logits,
                                             align_corners, reduction, *size, output_mask);
  return warped_kl_div_backward_impl(grad_loss, student_logits, teacher, src, params, teacher_is_logits, align_corners,
                                     reduction, output_mask);
}

// tpswarp::_warped_kl_div_with_grad (full resolution only): the loss and d loss / d student_logits for
// an upstream gradient of 1 from the backward kernel's one pass (it also stores each pixel's KL).
std::tuple<at::Tensor, at::Tensor> warped_kl_div_with_grad_cuda(const at::Tensor& student_logits,
                                                               const at::Tensor& teacher, const at::Tensor& src,
                                                               const at::Tensor& params, bool teacher_is_logits,
                                                               bool align_corners, c10::string_view reduction,
                                                               at::OptionalIntArrayRef size) {
  c10::cuda::CUDAGuard guard(student_logits.device());
  TORCH_CHECK_VALUE(!size.has_value(), "_warped_kl_div_with_grad: `size` is not supported on CUDA; use "
                    "warped_kl_div (its backward is fused)");
  const auto red = parse_reduction(reduction, kOp);
  TORCH_CHECK_VALUE(red != Reduction::None, "_warped_kl_div_with_grad: `reduction` must be 'mean' or 'sum', ",
                    "got 'none'");
  at::Tensor kl, weights;
  auto grads = warped_kl_div_backward_impl(at::ones({}, student_logits.options().dtype(at::kFloat)), student_logits,
                                           teacher, src, params, teacher_is_logits, align_corners, reduction,
                                           {true, false, false, false}, &kl, &weights);
  return {kl_reduce(kl, weights, red, {student_logits.size(0), student_logits.size(2), student_logits.size(3)}),
          std::get<0>(grads)};
}

}  // namespace

TORCH_LIBRARY_IMPL(tpswarp, CUDA, m) {
  m.impl("warped_kl_div", &warped_kl_div_cuda);
  m.impl("_warped_kl_div_backward", &warped_kl_div_backward_cuda);
  m.impl("_warped_kl_div_with_grad", &warped_kl_div_with_grad_cuda);
  m.impl("_warped_kl_div_with_stats", &warped_kl_div_with_stats_cuda);
  m.impl("_warped_kl_div_backward_stats", &warped_kl_div_backward_stats_cuda);
}

}  // namespace tpswarp
