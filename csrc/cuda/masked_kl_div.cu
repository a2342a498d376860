// CUDA kernels of tpswarp::masked_kl_div and its backward: one thread per pixel, the shared
// per-pixel math of tpswarp/kl.h, the mean's denominator kept on the device (no host sync).
//
// size=None: for C <= 32 classes the kernels are instantiated for a compile-time bound MAX_C of
// 8, 16 or 32 and hold the student and teacher class vectors of a pixel in registers, loaded once
// with all loads in flight together (tpswarp/kl_regs.cuh, same arithmetic as kl.h); above 32
// classes the generic loaders of kl.h (MAX_C = 0). The register path is opt-in, TPSWARP_CUDA_KL_REGS=1
// (slower than the generic loaders on an H200 with 19 classes: see kl_regs.cuh).
//
// size=(H, W) (the contract in the `size=` docs of the op): student (B, C, hs, ws) and teacher
// (B, C, ht, wt) are read at each output pixel through the resize taps of tpswarp/upsample.h
// (tpswarp/kl_resize.cuh: F.interpolate bilinear, align_corners=False, in the compute dtype);
// the mask is at the output size. Forward: one thread per output pixel, nothing of size
// B x C x H x W allocated. Backward: pass 1, one thread per output pixel, stores the per-pixel
// KL statistics (O(B H W)); pass 2, one thread per low-resolution element of the student and/or
// the teacher, gathers the gradient over the output pixels that read it (linear_resize_readers
// in rows and columns), in a fixed order: deterministic, no atomics. Both the student and the
// teacher gradient are native.
//
// _masked_kl_div_with_stats / _backward_stats (size=None, the student's gradient alone): the forward
// kernel also stores each pixel's statistics (kl_stats_store of kl.h), the backward kernel reads them
// and sweeps the classes once.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>

#include "tpswarp/kl.h"
#include "tpswarp/kl_args.h"
#include "tpswarp/kl_regs.cuh"
#include "tpswarp/kl_resize.cuh"
#include "tpswarp/show.h"

namespace tpswarp {
namespace {

constexpr const char* kOp = "masked_kl_div";
constexpr int kThreads = 256;

struct Strides3 {
  int64_t b, c, n;
};

Strides3 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// MAX_C > 0: at most MAX_C classes, held in registers (kl_regs.cuh); MAX_C == 0: any C (kl.h loaders).
template <typename scalar_t, typename acc, int MAX_C>
__global__ void kl_forward_kernel(const scalar_t* __restrict__ s, Strides3 ss, const scalar_t* __restrict__ t, Strides3 ts,
                                  const acc* __restrict__ w, acc* __restrict__ out, acc* __restrict__ stats,
                                  int64_t total, int64_t N, int64_t C, bool teacher_is_logits) {
  const int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (n >= N) return;
  for (int64_t b = blockIdx.y; b * N < total; b += gridDim.y) {
    const int64_t i = b * N + n;
    const acc wi = w ? w[i] : acc(1);
    acc* sti = stats ? stats + b * kKlStats * N + n : nullptr;  // (B, kKlStats, N): kl.h's kl_stats_store
    if (wi == acc(0)) {
      out[i] = 0;
      if (sti) kl_stats_store(KLPixel<acc>{}, teacher_is_logits, sti, N);  // never read: the gradient is 0 there
      continue;
    }
    const scalar_t* si = s + b * ss.b + n * ss.n;
    const scalar_t* ti = t + b * ts.b + n * ts.n;
    KLPixel<acc> st;
    if constexpr (MAX_C == 0) {
      st = kl_pixel<scalar_t>(si, ss.c, ti, ts.c, C, teacher_is_logits, true);
    } else {
      acc sv[MAX_C], tv[MAX_C];
      kl_load_regs<MAX_C, acc>([&](int c) { return static_cast<acc>(si[c * ss.c]); },
                               [&](int c) { return static_cast<acc>(ti[c * ts.c]); }, int(C), sv, tv);
      st = kl_pixel_regs<MAX_C, acc>(sv, tv, int(C), teacher_is_logits);
    }
    out[i] = wi * st.kl;
    if (sti) kl_stats_store(st, teacher_is_logits, sti, N);
  }
}

// The student's gradient from the statistics the forward kept (`stats`, (B, kKlStats, N)): one sweep
// over the classes instead of the statistics sweep and the gradient sweep of kl_backward_kernel.
template <typename scalar_t, typename acc>
__global__ void kl_backward_from_stats_kernel(const scalar_t* __restrict__ s, Strides3 ss,
                                              const scalar_t* __restrict__ t, Strides3 ts,
                                              const acc* __restrict__ stats, const acc* __restrict__ w,
                                              const acc* __restrict__ factor, int64_t f_step, scalar_t* gs,
                                              Strides3 gss, int64_t total, int64_t N, int64_t C,
                                              bool teacher_is_logits) {
  const int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (n >= N) return;
  for (int64_t b = blockIdx.y; b * N < total; b += gridDim.y) {
    const int64_t i = b * N + n;
    const acc scale = factor[i * f_step] * (w ? w[i] : acc(1));
    scalar_t* gsi = gs + b * gss.b + n * gss.n;
    if (scale == acc(0)) {
      for (int64_t c = 0; c < C; ++c) gsi[c * gss.c] = scalar_t(0);
      continue;
    }
    const auto st = kl_stats_load(stats + b * kKlStats * N + n, N, teacher_is_logits);
    kl_pixel_grad<scalar_t>(s + b * ss.b + n * ss.n, ss.c, t + b * ts.b + n * ts.n, ts.c, C, teacher_is_logits, st,
                            scale, gsi, gss.c, static_cast<scalar_t*>(nullptr), 0);
  }
}

template <typename scalar_t, typename acc, int MAX_C>
__global__ void kl_backward_kernel(const scalar_t* __restrict__ s, Strides3 ss, const scalar_t* __restrict__ t, Strides3 ts,
                                   const acc* __restrict__ w, const acc* __restrict__ factor, int64_t f_step,
                                   scalar_t* gs, Strides3 gss, scalar_t* gt, Strides3 gts, int64_t total, int64_t N,
                                   int64_t C, bool teacher_is_logits) {
  const int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (n >= N) return;
  for (int64_t b = blockIdx.y; b * N < total; b += gridDim.y) {
    const int64_t i = b * N + n;
    const acc scale = factor[i * f_step] * (w ? w[i] : acc(1));
    scalar_t* gsi = gs ? gs + b * gss.b + n * gss.n : nullptr;
    scalar_t* gti = gt ? gt + b * gts.b + n * gts.n : nullptr;
    if (scale == acc(0)) {
      for (int64_t c = 0; c < C; ++c) {
        if (gsi) gsi[c * gss.c] = scalar_t(0);
        if (gti) gti[c * gts.c] = scalar_t(0);
      }
      continue;
    }
    const scalar_t* si = s + b * ss.b + n * ss.n;
    const scalar_t* ti = t + b * ts.b + n * ts.n;
    if constexpr (MAX_C == 0) {
      const auto st = kl_pixel<scalar_t>(si, ss.c, ti, ts.c, C, teacher_is_logits, true);
      kl_pixel_grad<scalar_t>(si, ss.c, ti, ts.c, C, teacher_is_logits, st, scale, gsi, gss.c, gti, gts.c);
    } else {
      acc sv[MAX_C], tv[MAX_C];
      kl_load_regs<MAX_C, acc>([&](int c) { return static_cast<acc>(si[c * ss.c]); },
                               [&](int c) { return static_cast<acc>(ti[c * ts.c]); }, int(C), sv, tv);
      const auto st = kl_pixel_regs<MAX_C, acc>(sv, tv, int(C), teacher_is_logits);
      kl_pixel_grad_regs<MAX_C, acc>(
          sv, tv, int(C), teacher_is_logits, st, scale, gsi != nullptr,
          [&](int c, acc g) { gsi[c * gss.c] = static_cast<scalar_t>(g); }, gti != nullptr,
          [&](int c, acc g) { gti[c * gts.c] = static_cast<scalar_t>(g); });
    }
  }
}

int blocks_for(int64_t total) {
  return static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535 * 8));
}

// Grid of the size=None kernels: x over the N pixels of an item, y over the batch (a loop beyond
// 65535 items), so that no thread divides by N.
dim3 pixel_grid(int64_t B, int64_t N) {
  return dim3(static_cast<unsigned>((N + kThreads - 1) / kThreads), static_cast<unsigned>(std::min<int64_t>(B, 65535)));
}

void check_inputs(const at::Tensor& student, const at::Tensor& teacher) { check_kl_pair(student, teacher, kOp); }

// ---------------------------------------------------------------------------------------------
// size=(H, W): student (B, C, hs, ws) and teacher (B, C, ht, wt) read through the resize taps of
// tpswarp/upsample.h at each output pixel (kl_resize.cuh), nothing of size B x C x H x W allocated.
// ---------------------------------------------------------------------------------------------
struct SizedGeom {
  int64_t B, C, H, W, hs, ws, ht, wt;
  bool logits;
};

using kl_resize::Strides4;
Strides4 strides4_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// Forward (out != null: the weighted per-pixel KL) and pass 1 of the backward (stats != null:
// the per-pixel statistics). Pixels of weight 0 are skipped (their stats are left unwritten:
// pass 2 skips them too, their scale being 0).
template <typename scalar_t, typename acc>
__global__ void kl_sized_forward_kernel(SizedGeom g, const scalar_t* __restrict__ s, Strides4 ss,
                                        const scalar_t* __restrict__ t, Strides4 ts, const acc* __restrict__ w,
                                        acc* __restrict__ out, kl_resize::PixelStats<acc>* __restrict__ stats) {
  const int64_t N = g.H * g.W, total = g.B * N;
  const acc s_sh = linear_resize_scale<acc>(g.hs, g.H), s_sw = linear_resize_scale<acc>(g.ws, g.W);
  const acc t_sh = linear_resize_scale<acc>(g.ht, g.H), t_sw = linear_resize_scale<acc>(g.wt, g.W);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / N, k = i % N, oy = k / g.W, ox = k % g.W;
    const acc wi = w ? w[i] : acc(1);
    if (wi == acc(0)) {
      if (out) out[i] = 0;
      continue;
    }
    const auto rs = kl_resize::tap2<acc>(oy, ox, g.hs, g.ws, s_sh, s_sw, ss.h, ss.w);
    const auto rt = kl_resize::tap2<acc>(oy, ox, g.ht, g.wt, t_sh, t_sw, ts.h, ts.w);
    const scalar_t* sb = s + b * ss.b;
    const scalar_t* tb = t + b * ts.b;
    const auto st = kl_pixel_online_loaded<acc>(
        [&](int64_t c) { return kl_resize::read<scalar_t, acc>(sb + c * ss.c, rs); },
        [&](int64_t c) { return kl_resize::read<scalar_t, acc>(tb + c * ts.c, rt); }, g.C, g.logits);
    if (out) out[i] = wi * st.kl;
    if (stats) stats[i].kl = st;
  }
}

// Pass 2 of the backward: one thread per element (b, c, y, x) of the low-resolution student
// (kTeacher = false) or teacher (kTeacher = true); it sums, over the output pixels that read the
// element (fixed order: deterministic, no atomics), the tap weight times the gradient of
// scale * KL w.r.t. the resized value there (kl_pixel_grad_loaded for the one class c).
template <typename scalar_t, typename acc, bool kTeacher>
__global__ void kl_sized_gather_kernel(SizedGeom g, const scalar_t* __restrict__ s, Strides4 ss,
                                       const scalar_t* __restrict__ t, Strides4 ts, const acc* __restrict__ w,
                                       const acc* __restrict__ factor, int64_t f_step,
                                       const kl_resize::PixelStats<acc>* __restrict__ stats, scalar_t* __restrict__ out,
                                       Strides4 os) {
  const int64_t N = g.H * g.W;
  const int64_t in_h = kTeacher ? g.ht : g.hs, in_w = kTeacher ? g.wt : g.ws;
  const int64_t plane = in_h * in_w, total = g.B * g.C * plane;
  const acc s_sh = linear_resize_scale<acc>(g.hs, g.H), s_sw = linear_resize_scale<acc>(g.ws, g.W);
  const acc t_sh = linear_resize_scale<acc>(g.ht, g.H), t_sw = linear_resize_scale<acc>(g.wt, g.W);
  const acc o_sh = kTeacher ? t_sh : s_sh, o_sw = kTeacher ? t_sw : s_sw;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t x = e % in_w, y = (e / in_w) % in_h, c = (e / plane) % g.C, b = e / (plane * g.C);
    const scalar_t* sp = s + b * ss.b + c * ss.c;
    const scalar_t* tp = t + b * ts.b + c * ts.c;
    acc sum = 0;
    kl_resize::for_each_reader<acc>(y, x, in_h, in_w, g.H, g.W, o_sh, o_sw, [&](int64_t oy, int64_t ox, acc weight) {
      const int64_t i = b * N + oy * g.W + ox;
      const acc scale = factor[i * f_step] * (w ? w[i] : acc(1));
      if (scale == acc(0)) return;
      const acc sv = kl_resize::read<scalar_t, acc>(sp, kl_resize::tap2<acc>(oy, ox, g.hs, g.ws, s_sh, s_sw, ss.h, ss.w));
      const acc tv = kl_resize::read<scalar_t, acc>(tp, kl_resize::tap2<acc>(oy, ox, g.ht, g.wt, t_sh, t_sw, ts.h, ts.w));
      acc grad = 0;
      kl_pixel_grad_loaded<acc>(
          [&](int64_t) { return sv; }, [&](int64_t) { return tv; }, 1, g.logits, stats[i].kl, scale, !kTeacher,
          [&](int64_t, acc v) { grad = v; }, kTeacher, [&](int64_t, acc v) { grad = v; });
      sum += weight * grad;
    });
    out[b * os.b + c * os.c + y * os.h + x * os.w] = static_cast<scalar_t>(sum);
  }
}

struct SizedInputs {
  SizedGeom g;
  at::ScalarType dtype, in_dtype;
  at::Tensor s, t, weights;
};

SizedInputs prepare_sized(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& mask,
                          bool teacher_is_logits, at::IntArrayRef size) {
  check_kl_tensor(student, "student_logits", kOp);
  check_kl_tensor(teacher, "teacher", kOp);
  TORCH_CHECK_VALUE(size.size() == 2 && size[0] > 0 && size[1] > 0, kOp,
                    ": `size` must be None or a pair of positive ints (H, W), got ", show(size));
  TORCH_CHECK_VALUE(student.dim() == 4 && teacher.dim() == 4, kOp,
                    ": with `size`, `student_logits` and `teacher` must be 4-D (B, C, H, W), got ",
                    show(student.sizes()), " and ", show(teacher.sizes()));
  TORCH_CHECK_VALUE(student.size(0) == teacher.size(0) && student.size(1) == teacher.size(1), kOp, ": `teacher` ",
                    show(teacher.sizes()), " and `student_logits` ", show(student.sizes()),
                    " must agree in batch size and classes");
  TORCH_CHECK_VALUE(student.size(2) > 0 && student.size(3) > 0 && teacher.size(2) > 0 && teacher.size(3) > 0, kOp,
                    ": with `size`, `student_logits` ", show(student.sizes()), " and `teacher` ", show(teacher.sizes()),
                    " must have nonzero height and width");
  TORCH_CHECK(student.device() == teacher.device(), kOp, ": `teacher` is on ", teacher.device(),
              " but `student_logits` is on ", student.device());
  SizedInputs p;
  const int64_t B = student.size(0), H = size[0], W = size[1];
  p.g = {B, student.size(1), H, W, student.size(2), student.size(3), teacher.size(2), teacher.size(3),
         teacher_is_logits};
  p.dtype = kl_compute_dtype(student, teacher);
  p.in_dtype = student.scalar_type() == teacher.scalar_type() ? student.scalar_type() : p.dtype;
  p.s = student.to(p.in_dtype);
  p.t = teacher.to(p.in_dtype);
  if (mask.has_value() && mask->defined()) {  // the mask is at the output size (B, H, W) / (B, 1, H, W)
    const auto& m = *mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()), kOp,
                     ": `mask` must be bool or floating, got ", m.scalar_type());
    TORCH_CHECK(m.device() == student.device(), kOp, ": `mask` is on ", m.device(), " but `student_logits` is on ",
                student.device());
    const bool plain = m.dim() == 3 && m.size(0) == B && m.size(1) == H && m.size(2) == W;
    const bool keep = m.dim() == 4 && m.size(0) == B && m.size(1) == 1 && m.size(2) == H && m.size(3) == W;
    TORCH_CHECK_VALUE(plain || keep, kOp, ": with `size` (", show(H), ", ", show(W),
                      "), `mask` must have shape (B, H, W) or (B, 1, H, W) at the output size, got ", show(m.sizes()));
    p.weights = m.reshape({B, H * W}).to(p.dtype).contiguous();
  }
  return p;
}

at::Tensor masked_kl_div_sized_cuda(const at::Tensor& student_logits, const at::Tensor& teacher,
                                    const std::optional<at::Tensor>& mask, bool teacher_is_logits,
                                    Reduction reduction, at::IntArrayRef size) {
  auto p = prepare_sized(student_logits, teacher, mask, teacher_is_logits, size);
  const auto& g = p.g;
  auto kl = at::empty({g.B, g.H * g.W}, student_logits.options().dtype(p.dtype));
  const int64_t total = g.B * g.H * g.W;
  if (total > 0 && g.C > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.in_dtype, "masked_kl_div_sized_cuda", [&] {
      using acc = acc_t<scalar_t>;
      kl_sized_forward_kernel<scalar_t, acc><<<blocks_for(total), kThreads, 0, stream>>>(
          g, p.s.const_data_ptr<scalar_t>(), strides4_of(p.s), p.t.const_data_ptr<scalar_t>(), strides4_of(p.t),
          p.weights.defined() ? p.weights.const_data_ptr<acc>() : nullptr, kl.mutable_data_ptr<acc>(), nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    kl.zero_();
  }
  return kl_reduce(kl, p.weights, reduction, {g.B, g.H, g.W});
}

std::tuple<at::Tensor, at::Tensor> masked_kl_div_sized_backward_cuda(const at::Tensor& grad_loss,
                                                                     const at::Tensor& student_logits,
                                                                     const at::Tensor& teacher,
                                                                     const std::optional<at::Tensor>& mask,
                                                                     bool teacher_is_logits, Reduction reduction,
                                                                     at::IntArrayRef size,
                                                                     std::array<bool, 2> output_mask) {
  auto p = prepare_sized(student_logits, teacher, mask, teacher_is_logits, size);
  const auto& g = p.g;
  const int64_t N = g.H * g.W, total = g.B * N;
  auto factor = kl_grad_factor(grad_loss, p.weights, reduction, g.B, N, p.dtype);
  at::Tensor grad_s = output_mask[0] ? at::empty_like(student_logits) : at::empty({0}, student_logits.options());
  at::Tensor grad_t = output_mask[1] ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  at::Tensor gs = output_mask[0] && grad_s.scalar_type() != p.in_dtype
                      ? at::empty_like(grad_s, grad_s.options().dtype(p.in_dtype))
                      : grad_s;
  at::Tensor gt = output_mask[1] && grad_t.scalar_type() != p.in_dtype
                      ? at::empty_like(grad_t, grad_t.options().dtype(p.in_dtype))
                      : grad_t;
  if ((output_mask[0] || output_mask[1]) && total > 0 && g.C > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.in_dtype, "masked_kl_div_sized_backward_cuda", [&] {
      using acc = acc_t<scalar_t>;
      using Stats = kl_resize::PixelStats<acc>;
      // pass 1: per output pixel statistics, O(B H W)
      auto stats_buf = at::empty({total, int64_t(sizeof(Stats) / sizeof(acc))}, student_logits.options().dtype(p.dtype));
      Stats* stats = reinterpret_cast<Stats*>(stats_buf.mutable_data_ptr<acc>());
      const scalar_t* s = p.s.const_data_ptr<scalar_t>();
      const scalar_t* t = p.t.const_data_ptr<scalar_t>();
      const acc* w = p.weights.defined() ? p.weights.const_data_ptr<acc>() : nullptr;
      const acc* f = factor.const_data_ptr<acc>();
      const int64_t f_step = factor.dim() == 0 ? 0 : 1;
      kl_sized_forward_kernel<scalar_t, acc><<<blocks_for(total), kThreads, 0, stream>>>(
          g, s, strides4_of(p.s), t, strides4_of(p.t), w, nullptr, stats);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // pass 2: gathers into the low-resolution inputs
      if (output_mask[0]) {
        kl_sized_gather_kernel<scalar_t, acc, false><<<blocks_for(gs.numel()), kThreads, 0, stream>>>(
            g, s, strides4_of(p.s), t, strides4_of(p.t), w, f, f_step, stats, gs.mutable_data_ptr<scalar_t>(),
            strides4_of(gs));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (output_mask[1]) {
        kl_sized_gather_kernel<scalar_t, acc, true><<<blocks_for(gt.numel()), kThreads, 0, stream>>>(
            g, s, strides4_of(p.s), t, strides4_of(p.t), w, f, f_step, stats, gt.mutable_data_ptr<scalar_t>(),
            strides4_of(gt));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  } else {
    if (output_mask[0]) gs.zero_();
    if (output_mask[1]) gt.zero_();
  }
  if (output_mask[0] && !gs.is_same(grad_s)) grad_s.copy_(gs);
  if (output_mask[1] && !gt.is_same(grad_t)) grad_t.copy_(gt);
  return {grad_s, grad_t};
}

// size=None forward: the loss, and with want_stats the statistics of kl_stats_store ((B, kKlStats, N)).
std::tuple<at::Tensor, at::Tensor> masked_forward(const at::Tensor& student_logits, const at::Tensor& teacher,
                                                  const std::optional<at::Tensor>& mask, bool teacher_is_logits,
                                                  c10::string_view reduction, bool want_stats) {
  const auto o = kl_operands(student_logits, teacher, mask, reduction, kOp);
  auto kl = at::empty({o.B, o.N}, student_logits.options().dtype(o.dtype));
  auto stats = at::empty({want_stats ? o.B : 0, kKlStats, o.N}, kl.options());
  const int64_t total = o.B * o.N;
  if (total > 0 && o.C > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.in_dtype, "masked_kl_div_cuda", [&] {
      using acc = acc_t<scalar_t>;
      dispatch_max_classes(o.C, [&](auto max_c) {
        kl_forward_kernel<scalar_t, acc, decltype(max_c)::value><<<pixel_grid(o.B, o.N), kThreads, 0, stream>>>(
            o.s.const_data_ptr<scalar_t>(), strides_of(o.s), o.t.const_data_ptr<scalar_t>(), strides_of(o.t),
            o.weights.defined() ? o.weights.const_data_ptr<acc>() : nullptr, kl.mutable_data_ptr<acc>(),
            want_stats ? stats.mutable_data_ptr<acc>() : nullptr, total, o.N, o.C, teacher_is_logits);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  } else {
    kl.zero_();
    stats.zero_();
  }
  return {kl_reduce(kl, o.weights, o.reduction, kl_loss_shape(student_logits)), stats};
}

at::Tensor masked_kl_div_cuda(const at::Tensor& student_logits, const at::Tensor& teacher,
                              const std::optional<at::Tensor>& mask, bool teacher_is_logits,
                              c10::string_view reduction_name, at::OptionalIntArrayRef size) {
  c10::cuda::CUDAGuard guard(student_logits.device());
  if (size.has_value()) {
    const auto reduction = parse_reduction(reduction_name, kOp);
    return masked_kl_div_sized_cuda(student_logits, teacher, mask, teacher_is_logits, reduction, *size);
  }
  return std::get<0>(masked_forward(student_logits, teacher, mask, teacher_is_logits, reduction_name, false));
}

std::tuple<at::Tensor, at::Tensor> masked_kl_div_with_stats_cuda(const at::Tensor& student_logits,
                                                                 const at::Tensor& teacher,
                                                                 const std::optional<at::Tensor>& mask,
                                                                 bool teacher_is_logits,
                                                                 c10::string_view reduction_name) {
  c10::cuda::CUDAGuard guard(student_logits.device());
  return masked_forward(student_logits, teacher, mask, teacher_is_logits, reduction_name, true);
}

std::tuple<at::Tensor, at::Tensor> masked_kl_div_backward_cuda(const at::Tensor& grad_loss,
                                                               const at::Tensor& student_logits,
                                                               const at::Tensor& teacher,
                                                               const std::optional<at::Tensor>& mask,
                                                               bool teacher_is_logits, c10::string_view reduction_name,
                                                               at::OptionalIntArrayRef size,
                                                               std::array<bool, 2> output_mask) {
  c10::cuda::CUDAGuard guard(student_logits.device());
  if (size.has_value()) {
    const auto reduction = parse_reduction(reduction_name, kOp);
    return masked_kl_div_sized_backward_cuda(grad_loss, student_logits, teacher, mask, teacher_is_logits, reduction,
                                             *size, output_mask);
  }
  check_inputs(student_logits, teacher);
  const auto reduction = parse_reduction(reduction_name, kOp);
  const auto dtype = kl_compute_dtype(student_logits, teacher);
  const int64_t B = student_logits.size(0), C = student_logits.size(1);
  const int64_t N = B * C == 0 ? 0 : student_logits.numel() / (B * C);
  auto weights = kl_weights(mask, student_logits, dtype, kOp);
  auto factor = kl_grad_factor(grad_loss, weights, reduction, B, N, dtype);
  const auto in_dtype = student_logits.scalar_type() == teacher.scalar_type() ? student_logits.scalar_type() : dtype;

  at::Tensor grad_s = output_mask[0] ? at::empty_like(student_logits) : at::empty({0}, student_logits.options());
  at::Tensor grad_t = output_mask[1] ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  at::Tensor gs = output_mask[0] && grad_s.scalar_type() != in_dtype ? at::empty_like(grad_s, grad_s.options().dtype(in_dtype)) : grad_s;
  at::Tensor gt = output_mask[1] && grad_t.scalar_type() != in_dtype ? at::empty_like(grad_t, grad_t.options().dtype(in_dtype)) : grad_t;
  const int64_t total = B * N;
  if ((output_mask[0] || output_mask[1]) && total > 0 && C > 0) {
    auto s = student_logits.to(in_dtype).reshape({B, C, N});
    auto t = teacher.to(in_dtype).reshape({B, C, N});
    auto gs3 = output_mask[0] ? gs.view({B, C, N}) : gs;
    auto gt3 = output_mask[1] ? gt.view({B, C, N}) : gt;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in_dtype, "masked_kl_div_backward_cuda", [&] {
      using acc = acc_t<scalar_t>;
      const Strides3 none{0, 0, 0};
      dispatch_max_classes(C, [&](auto max_c) {
        kl_backward_kernel<scalar_t, acc, decltype(max_c)::value><<<pixel_grid(B, N), kThreads, 0, stream>>>(
            s.const_data_ptr<scalar_t>(), strides_of(s), t.const_data_ptr<scalar_t>(), strides_of(t),
            weights.defined() ? weights.const_data_ptr<acc>() : nullptr, factor.const_data_ptr<acc>(),
            factor.dim() == 0 ? 0 : 1, output_mask[0] ? gs3.mutable_data_ptr<scalar_t>() : nullptr,
            output_mask[0] ? strides_of(gs3) : none, output_mask[1] ? gt3.mutable_data_ptr<scalar_t>() : nullptr,
            output_mask[1] ? strides_of(gt3) : none, total, N, C, teacher_is_logits);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  } else {
    if (output_mask[0]) gs.zero_();
    if (output_mask[1]) gt.zero_();
  }
  if (output_mask[0] && !gs.is_same(grad_s)) grad_s.copy_(gs);
  if (output_mask[1] && !gt.is_same(grad_t)) grad_t.copy_(gt);
  return {grad_s, grad_t};
}

at::Tensor masked_kl_div_backward_stats_cuda(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                                             const at::Tensor& teacher, const std::optional<at::Tensor>& mask,
                                             const at::Tensor& stats, bool teacher_is_logits,
                                             c10::string_view reduction_name) {
  c10::cuda::CUDAGuard guard(student_logits.device());
  const auto o = kl_operands(student_logits, teacher, mask, reduction_name, kOp);
  check_kl_stats(stats, o.B, kKlStats, o.N, o.dtype, student_logits, kOp);
  auto factor = kl_grad_factor(grad_loss, o.weights, o.reduction, o.B, o.N, o.dtype);
  at::Tensor grad_s = at::empty_like(student_logits);
  at::Tensor gs = grad_s.scalar_type() != o.in_dtype ? at::empty_like(grad_s, grad_s.options().dtype(o.in_dtype))
                                                     : grad_s;
  const int64_t total = o.B * o.N;
  if (total > 0 && o.C > 0) {
    auto gs3 = gs.view({o.B, o.C, o.N});
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.in_dtype, "masked_kl_div_backward_stats_cuda", [&] {
      using acc = acc_t<scalar_t>;
      kl_backward_from_stats_kernel<scalar_t, acc><<<pixel_grid(o.B, o.N), kThreads, 0, stream>>>(
          o.s.const_data_ptr<scalar_t>(), strides_of(o.s), o.t.const_data_ptr<scalar_t>(), strides_of(o.t),
          stats.const_data_ptr<acc>(), o.weights.defined() ? o.weights.const_data_ptr<acc>() : nullptr,
          factor.const_data_ptr<acc>(), factor.dim() == 0 ? 0 : 1, gs3.mutable_data_ptr<scalar_t>(),
          strides_of(gs3), total, o.N, o.C, teacher_is_logits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    gs.zero_();
  }
  if (!gs.is_same(grad_s)) grad_s.copy_(gs);
  return grad_s;
}

}  // namespace

TORCH_LIBRARY_IMPL(tpswarp, CUDA, m) {
  m.impl("masked_kl_div", &masked_kl_div_cuda);
  m.impl("_masked_kl_div_backward", &masked_kl_div_backward_cuda);
  m.impl("_masked_kl_div_with_stats", &masked_kl_div_with_stats_cuda);
  m.impl("_masked_kl_div_backward_stats", &masked_kl_div_backward_stats_cuda);
}

}  // namespace tpswarp
