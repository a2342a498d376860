// Host-side argument handling shared by the CPU and CUDA masked/warped KL kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/where.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>

#include "tpswarp/common.h"
#include "tpswarp/show.h"

namespace tpswarp {

inline Reduction parse_reduction(c10::string_view reduction, const char* op) {
  if (reduction == "mean") return Reduction::Mean;
  if (reduction == "sum") return Reduction::Sum;
  if (reduction == "none") return Reduction::None;
  TORCH_CHECK_VALUE(false, op, ": `reduction` must be one of ['mean', 'sum', 'none'], got '",
                    std::string(reduction), "'");
}

inline at::ScalarType kl_compute_dtype(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

inline void check_kl_tensor(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": `", name, "` must have a floating dtype, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() >= 2, op, ": `", name, "` must have shape (B, C, *spatial), got ", show(t.sizes()));
}

// (B, *spatial) or (B, 1, *spatial) mask -> (B, N) weights of the compute dtype, or undefined.
inline at::Tensor kl_weights(const std::optional<at::Tensor>& mask, const at::Tensor& student, at::ScalarType dtype,
                             const char* op) {
  if (!mask.has_value() || !mask->defined()) return at::Tensor();
  const auto& m = *mask;
  TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()), op,
                   ": `mask` must be bool or floating, got ", m.scalar_type());
  TORCH_CHECK(m.device() == student.device(), op, ": `mask` is on ", m.device(), " but `student_logits` is on ",
              student.device());
  const int64_t B = student.size(0);
  const int64_t N = student.numel() / std::max<int64_t>(1, B * student.size(1));
  auto spatial = student.sizes().slice(2);
  const bool plain = m.dim() == student.dim() - 1 && m.size(0) == B && m.sizes().slice(1) == spatial;
  const bool keep = m.dim() == student.dim() && m.size(0) == B && m.size(1) == 1 && m.sizes().slice(2) == spatial;
  TORCH_CHECK_VALUE(plain || keep, op,
                    ": `mask` must have shape (B, *spatial) or (B, 1, *spatial) for logits of shape ",
                    show(student.sizes()), ", got ", show(m.sizes()));
  return m.reshape({B, N}).to(dtype).contiguous();
}

// The size=None masked KL's operands: both inputs as (B, C, N) views in one dtype (channels_last kept
// without a copy), the (B, N) weights of the mask (undefined: all 1), the compute dtype.
struct KlOperands {
  int64_t B, C, N;  // N = 0 when B C = 0
  Reduction reduction;
  at::ScalarType dtype, in_dtype;
  at::Tensor s, t, weights;
};

// Student logits and teacher of the size=None masked KL: floating, (B, C, *spatial), same shape and device.
inline void check_kl_pair(const at::Tensor& student, const at::Tensor& teacher, const char* op) {
  check_kl_tensor(student, "student_logits", op);
  check_kl_tensor(teacher, "teacher", op);
  TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(), op, ": `teacher` ", show(teacher.sizes()),
                    " must have the shape of `student_logits` ", show(student.sizes()));
  TORCH_CHECK(student.device() == teacher.device(), op, ": `teacher` is on ", teacher.device(),
              " but `student_logits` is on ", student.device());
}

inline KlOperands kl_operands(const at::Tensor& student, const at::Tensor& teacher,
                              const std::optional<at::Tensor>& mask, c10::string_view reduction, const char* op) {
  check_kl_pair(student, teacher, op);
  KlOperands o;
  o.reduction = parse_reduction(reduction, op);
  o.dtype = kl_compute_dtype(student, teacher);
  o.B = student.size(0);
  o.C = student.size(1);
  o.N = o.B * o.C == 0 ? 0 : student.numel() / (o.B * o.C);
  o.in_dtype = student.scalar_type() == teacher.scalar_type() ? student.scalar_type() : o.dtype;
  o.s = student.to(o.in_dtype).reshape({o.B, o.C, o.N});
  o.t = teacher.to(o.in_dtype).reshape({o.B, o.C, o.N});
  o.weights = kl_weights(mask, student, o.dtype, op);
  return o;
}

// The factor each pixel's gradient is scaled by, before the mask weight: a 0-dim tensor for
// mean/sum (the mean's denominator stays on the device: no host sync), (B, N) for none.
inline at::Tensor kl_grad_factor(const at::Tensor& grad_loss, const at::Tensor& weights, Reduction reduction,
                                 int64_t B, int64_t N, at::ScalarType dtype) {
  auto g = grad_loss.to(dtype);
  if (reduction == Reduction::None) return g.reshape({B, N}).contiguous();
  if (reduction == Reduction::Sum) return g.reshape({}).contiguous();
  at::Tensor count = weights.defined() ? weights.sum() : at::scalar_tensor(double(B * N), g.options());
  auto safe = at::where(count.ne(0), count, at::scalar_tensor(1.0, g.options()));
  return g.reshape({}).div(safe).contiguous();
}

// Reduce the per-pixel (already weighted) losses `kl (B, N)`.
inline at::Tensor kl_reduce(const at::Tensor& kl, const at::Tensor& weights, Reduction reduction,
                            at::IntArrayRef out_shape) {
  if (reduction == Reduction::None) return kl.reshape(out_shape);
  auto total = kl.sum();
  if (reduction == Reduction::Sum) return total;
  at::Tensor count = weights.defined() ? weights.sum() : at::scalar_tensor(double(kl.numel()), kl.options());
  return total.div(at::where(count.ne(0), count, at::scalar_tensor(1.0, kl.options())));
}

// `stats` of `_<op>_with_stats`, handed back to `_<op>_backward_stats`: (B, K, N) of the compute dtype
// (K: kKlStats of kl.h, kWarpedKlStats of warped_kl.h), contiguous, on the logits' device.
inline void check_kl_stats(const at::Tensor& stats, int64_t B, int64_t K, int64_t N, at::ScalarType dtype,
                           const at::Tensor& student, const char* op) {
  TORCH_CHECK_VALUE(stats.dim() == 3 && stats.size(0) == B && stats.size(1) == K && stats.size(2) == N, op,
                    ": `stats` must have shape (", show(B), ", ", show(K), ", ", show(N),
                    ") (from the forward of these inputs), got ", show(stats.sizes()));
  TORCH_CHECK_TYPE(stats.scalar_type() == dtype, op, ": `stats` must be ", dtype, ", got ", stats.scalar_type());
  TORCH_CHECK(stats.device() == student.device(), op, ": `stats` is on ", stats.device(),
              " but `student_logits` is on ", student.device());
  TORCH_CHECK_VALUE(stats.is_contiguous(), op, ": `stats` must be contiguous");
}

inline std::vector<int64_t> kl_loss_shape(const at::Tensor& student) {
  std::vector<int64_t> shape{student.size(0)};
  for (int64_t d = 2; d < student.dim(); ++d) shape.push_back(student.size(d));
  return shape;
}

}  // namespace tpswarp
