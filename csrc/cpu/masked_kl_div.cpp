// CPU kernels of tpswarp::masked_kl_div and its backward: one pass over the logits, nothing
// of size B x C x N allocated besides the gradients.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "tpswarp/cpu_kl_block.h"
#include "tpswarp/kl.h"
#include "tpswarp/kl_args.h"

namespace tpswarp {
namespace {

constexpr const char* kOp = "masked_kl_div";

void check_inputs(const at::Tensor& student, const at::Tensor& teacher) {
  check_kl_tensor(student, "student_logits", kOp);
  check_kl_tensor(teacher, "teacher", kOp);
  TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(), kOp, ": `teacher` ", teacher.sizes(),
                    " must have the shape of `student_logits` ", student.sizes());
  TORCH_CHECK(student.device() == teacher.device(), kOp, ": `teacher` is on ", teacher.device(),
              " but `student_logits` is on ", student.device());
}

// The blocked (pixel-vectorized) path needs float accumulation and adjacent pixels.
bool use_blocked_path(at::ScalarType dtype, const std::vector<const at::Tensor*>& operands) {
  if (dtype == at::kDouble) return false;
  for (const auto* t : operands)
    if (t->size(2) > 1 && t->stride(2) != 1) return false;
  return true;
}

at::Tensor masked_kl_div_cpu(const at::Tensor& student_logits, const at::Tensor& teacher,
                             const std::optional<at::Tensor>& mask, bool teacher_is_logits,
                             c10::string_view reduction_name, at::OptionalIntArrayRef size) {
  TORCH_CHECK_NOT_IMPLEMENTED(!size.has_value(), kOp, ": `size` is not implemented by the CPU kernels of this branch");
  check_inputs(student_logits, teacher);
  const auto reduction = parse_reduction(reduction_name, kOp);
  const auto dtype = kl_compute_dtype(student_logits, teacher);
  const int64_t B = student_logits.size(0), C = student_logits.size(1);
  const int64_t N = B * C == 0 ? 0 : student_logits.numel() / (B * C);
  auto weights = kl_weights(mask, student_logits, dtype, kOp);
  // Both operands in one dtype; (B, C, N) views keep channels_last without a copy.
  const auto in_dtype = student_logits.scalar_type() == teacher.scalar_type() ? student_logits.scalar_type() : dtype;
  auto s = student_logits.to(in_dtype).reshape({B, C, N});
  auto t = teacher.to(in_dtype).reshape({B, C, N});
  auto kl = at::empty({B, N}, student_logits.options().dtype(dtype));
  if (kl.numel() > 0 && C > 0 && use_blocked_path(in_dtype, {&s, &t})) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in_dtype, "masked_kl_div_cpu_blocked", [&] {
      const scalar_t* sp = s.const_data_ptr<scalar_t>();
      const scalar_t* tp = t.const_data_ptr<scalar_t>();
      const float* wp = weights.defined() ? weights.const_data_ptr<float>() : nullptr;
      float* out = kl.mutable_data_ptr<float>();
      const int64_t blocks_per_row = (N + cpu::kKLBlock - 1) / cpu::kKLBlock;
      at::parallel_for(0, B * blocks_per_row, 1, [&](int64_t begin, int64_t end) {
        cpu::KLBlockStats st;
        for (int64_t blk = begin; blk < end; ++blk) {
          const int64_t b = blk / blocks_per_row, n0 = (blk % blocks_per_row) * cpu::kKLBlock;
          const int64_t P = std::min(cpu::kKLBlock, N - n0);
          const scalar_t* sb = sp + b * s.stride(0) + n0;
          const scalar_t* tb = tp + b * t.stride(0) + n0;
          if (teacher_is_logits)
            cpu::kl_block_stats<scalar_t, scalar_t, true>(sb, s.stride(1), tb, t.stride(1), C, P, st);
          else
            cpu::kl_block_stats<scalar_t, scalar_t, false>(sb, s.stride(1), tb, t.stride(1), C, P, st);
          float* o = out + b * N + n0;
          const float* w = wp ? wp + b * N + n0 : nullptr;
          for (int64_t p = 0; p < P; ++p) {
            const float wi = w ? w[p] : 1.f;
            o[p] = wi != 0.f ? wi * st.kl[p] : 0.f;
          }
        }
      });
    });
  } else if (kl.numel() > 0 && C > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in_dtype, "masked_kl_div_cpu", [&] {
      using acc = acc_t<scalar_t>;
      const scalar_t* sp = s.const_data_ptr<scalar_t>();
      const scalar_t* tp = t.const_data_ptr<scalar_t>();
      const acc* wp = weights.defined() ? weights.const_data_ptr<acc>() : nullptr;
      acc* out = kl.mutable_data_ptr<acc>();
      const int64_t sb = s.stride(0), sc = s.stride(1), sn = s.stride(2);
      const int64_t tb = t.stride(0), tc = t.stride(1), tn = t.stride(2);
      at::parallel_for(0, B * N, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t b = i / N, n = i % N;
          const acc w = wp ? wp[i] : acc(1);
          if (w == acc(0)) {
            out[i] = 0;
            continue;
          }
          const auto st = kl_pixel<scalar_t>(sp + b * sb + n * sn, sc, tp + b * tb + n * tn, tc, C, teacher_is_logits);
          out[i] = w * st.kl;
        }
      });
    });
  } else {
    kl.zero_();
  }
  return kl_reduce(kl, weights, reduction, kl_loss_shape(student_logits));
}

std::tuple<at::Tensor, at::Tensor> masked_kl_div_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                                                              const at::Tensor& teacher,
                                                              const std::optional<at::Tensor>& mask,
                                                              bool teacher_is_logits, c10::string_view reduction_name,
                                                              at::OptionalIntArrayRef size,
                                                              std::array<bool, 2> output_mask) {
  TORCH_CHECK_NOT_IMPLEMENTED(!size.has_value(), kOp, ": `size` is not implemented by the CPU kernels of this branch");
  check_inputs(student_logits, teacher);
  const auto reduction = parse_reduction(reduction_name, kOp);
  const auto dtype = kl_compute_dtype(student_logits, teacher);
  const int64_t B = student_logits.size(0), C = student_logits.size(1);
  const int64_t N = B * C == 0 ? 0 : student_logits.numel() / (B * C);
  auto weights = kl_weights(mask, student_logits, dtype, kOp);
  auto factor = kl_grad_factor(grad_loss, weights, reduction, B, N, dtype);

  at::Tensor grad_s = output_mask[0] ? at::empty_like(student_logits) : at::empty({0}, student_logits.options());
  at::Tensor grad_t = output_mask[1] ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  const auto in_dtype = student_logits.scalar_type() == teacher.scalar_type() ? student_logits.scalar_type() : dtype;
  // Gradients are computed in the common dtype, then cast to each input's dtype if needed.
  at::Tensor gs = output_mask[0] ? (grad_s.scalar_type() == in_dtype ? grad_s : at::empty_like(grad_s, grad_s.options().dtype(in_dtype))) : grad_s;
  at::Tensor gt = output_mask[1] ? (grad_t.scalar_type() == in_dtype ? grad_t : at::empty_like(grad_t, grad_t.options().dtype(in_dtype))) : grad_t;
  if ((output_mask[0] || output_mask[1]) && B * N > 0 && C > 0) {
    auto s = student_logits.to(in_dtype).reshape({B, C, N});
    auto t = teacher.to(in_dtype).reshape({B, C, N});
    auto gs3 = output_mask[0] ? gs.view({B, C, N}) : gs;
    auto gt3 = output_mask[1] ? gt.view({B, C, N}) : gt;
    std::vector<const at::Tensor*> operands{&s, &t};
    if (output_mask[0]) operands.push_back(&gs3);
    if (output_mask[1]) operands.push_back(&gt3);
    if (use_blocked_path(in_dtype, operands)) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in_dtype, "masked_kl_div_backward_cpu_blocked", [&] {
        const scalar_t* sp = s.const_data_ptr<scalar_t>();
        const scalar_t* tp = t.const_data_ptr<scalar_t>();
        const float* wp = weights.defined() ? weights.const_data_ptr<float>() : nullptr;
        const float* fp = factor.const_data_ptr<float>();
        const bool per_pixel_factor = factor.dim() != 0;
        scalar_t* gsp = output_mask[0] ? gs3.mutable_data_ptr<scalar_t>() : nullptr;
        scalar_t* gtp = output_mask[1] ? gt3.mutable_data_ptr<scalar_t>() : nullptr;
        const int64_t blocks_per_row = (N + cpu::kKLBlock - 1) / cpu::kKLBlock;
        at::parallel_for(0, B * blocks_per_row, 1, [&](int64_t begin, int64_t end) {
          cpu::KLBlockStats st;
          float scale[cpu::kKLBlock];
          for (int64_t blk = begin; blk < end; ++blk) {
            const int64_t b = blk / blocks_per_row, n0 = (blk % blocks_per_row) * cpu::kKLBlock;
            const int64_t P = std::min(cpu::kKLBlock, N - n0);
            const scalar_t* sb = sp + b * s.stride(0) + n0;
            const scalar_t* tb = tp + b * t.stride(0) + n0;
            for (int64_t p = 0; p < P; ++p)
              scale[p] = (per_pixel_factor ? fp[b * N + n0 + p] : fp[0]) * (wp ? wp[b * N + n0 + p] : 1.f);
            scalar_t* gsb = gsp ? gsp + b * gs3.stride(0) + n0 : nullptr;
            scalar_t* gtb = gtp ? gtp + b * gt3.stride(0) + n0 : nullptr;
            const int64_t gscs = gsp ? gs3.stride(1) : 0, gtcs = gtp ? gt3.stride(1) : 0;
            if (teacher_is_logits) {
              cpu::kl_block_stats<scalar_t, scalar_t, true>(sb, s.stride(1), tb, t.stride(1), C, P, st);
              cpu::kl_block_grad<scalar_t, scalar_t, scalar_t, true>(sb, s.stride(1), tb, t.stride(1), C, P, st, scale,
                                                                      gsb, gscs, gtb, gtcs);
            } else {
              cpu::kl_block_stats<scalar_t, scalar_t, false>(sb, s.stride(1), tb, t.stride(1), C, P, st);
              cpu::kl_block_grad<scalar_t, scalar_t, scalar_t, false>(sb, s.stride(1), tb, t.stride(1), C, P, st, scale,
                                                                       gsb, gscs, gtb, gtcs);
            }
          }
        });
      });
    } else AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in_dtype, "masked_kl_div_backward_cpu", [&] {
      using acc = acc_t<scalar_t>;
      const scalar_t* sp = s.const_data_ptr<scalar_t>();
      const scalar_t* tp = t.const_data_ptr<scalar_t>();
      const acc* wp = weights.defined() ? weights.const_data_ptr<acc>() : nullptr;
      const acc* fp = factor.const_data_ptr<acc>();
      const int64_t f_step = factor.dim() == 0 ? 0 : 1;
      scalar_t* gsp = output_mask[0] ? gs3.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* gtp = output_mask[1] ? gt3.mutable_data_ptr<scalar_t>() : nullptr;
      const int64_t sb = s.stride(0), sc = s.stride(1), sn = s.stride(2);
      const int64_t tb = t.stride(0), tc = t.stride(1), tn = t.stride(2);
      const int64_t gsb = gsp ? gs3.stride(0) : 0, gsc = gsp ? gs3.stride(1) : 0, gsn = gsp ? gs3.stride(2) : 0;
      const int64_t gtb = gtp ? gt3.stride(0) : 0, gtc = gtp ? gt3.stride(1) : 0, gtn = gtp ? gt3.stride(2) : 0;
      at::parallel_for(0, B * N, std::max<int64_t>(1, 2048 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t b = i / N, n = i % N;
          const acc scale = fp[i * f_step] * (wp ? wp[i] : acc(1));
          scalar_t* gsi = gsp ? gsp + b * gsb + n * gsn : nullptr;
          scalar_t* gti = gtp ? gtp + b * gtb + n * gtn : nullptr;
          if (scale == acc(0)) {  // masked out: exact zeros, whatever the logits
            for (int64_t c = 0; c < C; ++c) {
              if (gsi) gsi[c * gsc] = scalar_t(0);
              if (gti) gti[c * gtc] = scalar_t(0);
            }
            continue;
          }
          const scalar_t* si = sp + b * sb + n * sn;
          const scalar_t* ti = tp + b * tb + n * tn;
          const auto st = kl_pixel<scalar_t>(si, sc, ti, tc, C, teacher_is_logits);
          kl_pixel_grad<scalar_t>(si, sc, ti, tc, C, teacher_is_logits, st, scale, gsi, gsc, gti, gtc);
        }
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

}  // namespace

TORCH_LIBRARY_IMPL(tpswarp, CPU, m) {
  m.impl("masked_kl_div", &masked_kl_div_cpu);
  m.impl("_masked_kl_div_backward", &masked_kl_div_backward_cpu);
}

}  // namespace tpswarp
