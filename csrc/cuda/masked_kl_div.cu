// CUDA kernels of tpswarp::masked_kl_div and its backward: one thread per pixel, the shared
// per-pixel math of tpswarp/kl.h, the mean's denominator kept on the device (no host sync).
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

namespace tpswarp {
namespace {

constexpr const char* kOp = "masked_kl_div";
constexpr int kThreads = 256;

struct Strides3 {
  int64_t b, c, n;
};

Strides3 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

template <typename scalar_t, typename acc>
__global__ void kl_forward_kernel(const scalar_t* __restrict__ s, Strides3 ss, const scalar_t* __restrict__ t, Strides3 ts,
                                  const acc* __restrict__ w, acc* __restrict__ out, int64_t total, int64_t N, int64_t C,
                                  bool teacher_is_logits) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / N, n = i % N;
    const acc wi = w ? w[i] : acc(1);
    if (wi == acc(0)) {
      out[i] = 0;
      continue;
    }
    const auto st = kl_pixel<scalar_t>(s + b * ss.b + n * ss.n, ss.c, t + b * ts.b + n * ts.n, ts.c, C, teacher_is_logits);
    out[i] = wi * st.kl;
  }
}

template <typename scalar_t, typename acc>
__global__ void kl_backward_kernel(const scalar_t* __restrict__ s, Strides3 ss, const scalar_t* __restrict__ t, Strides3 ts,
                                   const acc* __restrict__ w, const acc* __restrict__ factor, int64_t f_step,
                                   scalar_t* gs, Strides3 gss, scalar_t* gt, Strides3 gts, int64_t total, int64_t N,
                                   int64_t C, bool teacher_is_logits) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / N, n = i % N;
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
    const auto st = kl_pixel<scalar_t>(si, ss.c, ti, ts.c, C, teacher_is_logits);
    kl_pixel_grad<scalar_t>(si, ss.c, ti, ts.c, C, teacher_is_logits, st, scale, gsi, gss.c, gti, gts.c);
  }
}

int blocks_for(int64_t total) {
  return static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535 * 8));
}

void check_inputs(const at::Tensor& student, const at::Tensor& teacher) {
  check_kl_tensor(student, "student_logits", kOp);
  check_kl_tensor(teacher, "teacher", kOp);
  TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(), kOp, ": `teacher` ", teacher.sizes(),
                    " must have the shape of `student_logits` ", student.sizes());
  TORCH_CHECK(student.device() == teacher.device(), kOp, ": `teacher` is on ", teacher.device(),
              " but `student_logits` is on ", student.device());
}

at::Tensor masked_kl_div_cuda(const at::Tensor& student_logits, const at::Tensor& teacher,
                              const std::optional<at::Tensor>& mask, bool teacher_is_logits,
                              c10::string_view reduction_name) {
  check_inputs(student_logits, teacher);
  c10::cuda::CUDAGuard guard(student_logits.device());
  const auto reduction = parse_reduction(reduction_name, kOp);
  const auto dtype = kl_compute_dtype(student_logits, teacher);
  const int64_t B = student_logits.size(0), C = student_logits.size(1);
  const int64_t N = B * C == 0 ? 0 : student_logits.numel() / (B * C);
  auto weights = kl_weights(mask, student_logits, dtype, kOp);
  const auto in_dtype = student_logits.scalar_type() == teacher.scalar_type() ? student_logits.scalar_type() : dtype;
  auto s = student_logits.to(in_dtype).reshape({B, C, N});
  auto t = teacher.to(in_dtype).reshape({B, C, N});
  auto kl = at::empty({B, N}, student_logits.options().dtype(dtype));
  const int64_t total = B * N;
  if (total > 0 && C > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in_dtype, "masked_kl_div_cuda", [&] {
      using acc = acc_t<scalar_t>;
      kl_forward_kernel<scalar_t, acc><<<blocks_for(total), kThreads, 0, stream>>>(
          s.const_data_ptr<scalar_t>(), strides_of(s), t.const_data_ptr<scalar_t>(), strides_of(t),
          weights.defined() ? weights.const_data_ptr<acc>() : nullptr, kl.mutable_data_ptr<acc>(), total, N, C,
          teacher_is_logits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    kl.zero_();
  }
  return kl_reduce(kl, weights, reduction, kl_loss_shape(student_logits));
}

std::tuple<at::Tensor, at::Tensor> masked_kl_div_backward_cuda(const at::Tensor& grad_loss,
                                                               const at::Tensor& student_logits,
                                                               const at::Tensor& teacher,
                                                               const std::optional<at::Tensor>& mask,
                                                               bool teacher_is_logits, c10::string_view reduction_name,
                                                               std::array<bool, 2> output_mask) {
  check_inputs(student_logits, teacher);
  c10::cuda::CUDAGuard guard(student_logits.device());
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
      kl_backward_kernel<scalar_t, acc><<<blocks_for(total), kThreads, 0, stream>>>(
          s.const_data_ptr<scalar_t>(), strides_of(s), t.const_data_ptr<scalar_t>(), strides_of(t),
          weights.defined() ? weights.const_data_ptr<acc>() : nullptr, factor.const_data_ptr<acc>(),
          factor.dim() == 0 ? 0 : 1, output_mask[0] ? gs3.mutable_data_ptr<scalar_t>() : nullptr,
          output_mask[0] ? strides_of(gs3) : none, output_mask[1] ? gt3.mutable_data_ptr<scalar_t>() : nullptr,
          output_mask[1] ? strides_of(gt3) : none, total, N, C, teacher_is_logits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    if (output_mask[0]) gs.zero_();
    if (output_mask[1]) gt.zero_();
  }
  if (output_mask[0] && !gs.is_same(grad_s)) grad_s.copy_(gs);
  if (output_mask[1] && !gt.is_same(grad_t)) grad_t.copy_(gt);
  return {grad_s, grad_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(tpswarp, CUDA, m) {
  m.impl("masked_kl_div", &masked_kl_div_cuda);
  m.impl("_masked_kl_div_backward", &masked_kl_div_backward_cuda);
}

}  // namespace tpswarp
