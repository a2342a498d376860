// CPU kernels of tpswarp::masked_kl_div and its backward: one pass over the logits, nothing
// of size B x C x N allocated besides the gradients.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "tpswarp/cpu_kl_block.h"
#include "tpswarp/cpu_kl_resize.h"
#include "tpswarp/kl.h"
#include "tpswarp/kl_args.h"
#include "tpswarp/show.h"

namespace tpswarp {
namespace {

constexpr const char* kOp = "masked_kl_div";

void check_inputs(const at::Tensor& student, const at::Tensor& teacher) { check_kl_pair(student, teacher, kOp); }

// The blocked (pixel-vectorized) path needs float accumulation and adjacent pixels.
bool use_blocked_path(at::ScalarType dtype, const std::vector<const at::Tensor*>& operands) {
  if (dtype == at::kDouble) return false;
  for (const auto* t : operands)
    if (t->size(2) > 1 && t->stride(2) != 1) return false;
  return true;
}


// ---------------------------------------------------------------------------------------------
// size=(H, W): the student (B, C, hs, ws) and the teacher (B, C, ht, wt) are read through the
// F.interpolate(bilinear, align_corners=False) taps (tpswarp/cpu_kl_resize.h); the mask is at (H, W).
// ---------------------------------------------------------------------------------------------

// True when `size` leaves both inputs unchanged: the full-resolution kernels serve it (F.interpolate
// to the input's own size is the identity).
bool size_is_identity(const at::Tensor& student, const at::Tensor& teacher, at::OptionalIntArrayRef size) {
  cpu::check_kl_size(size, student, teacher, kOp);
  return student.sizes().slice(2) == *size && teacher.sizes().slice(2) == *size;
}

struct Sized {
  int64_t B, C, H, W;
  bool logits;
  at::ScalarType in_dtype, acc_dtype;
};

Sized make_sized(const at::Tensor& student, const at::Tensor& teacher, at::IntArrayRef size, bool teacher_is_logits) {
  check_kl_tensor(student, "student_logits", kOp);
  check_kl_tensor(teacher, "teacher", kOp);
  TORCH_CHECK(student.device() == teacher.device(), kOp, ": `teacher` is on ", teacher.device(),
              " but `student_logits` is on ", student.device());
  Sized z;
  z.B = student.size(0);
  z.C = student.size(1);
  z.H = size[0];
  z.W = size[1];
  z.logits = teacher_is_logits;
  z.acc_dtype = kl_compute_dtype(student, teacher);
  z.in_dtype = student.scalar_type() == teacher.scalar_type() ? student.scalar_type() : z.acc_dtype;
  return z;
}

// Mask (B, H, W) or (B, 1, H, W) at the output size -> (B, H * W) weights in the compute dtype, or undefined.
at::Tensor sized_weights(const std::optional<at::Tensor>& mask, const Sized& z, const at::Tensor& student) {
  if (!mask.has_value() || !mask->defined()) return at::Tensor();
  const auto& m = *mask;
  TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()), kOp,
                   ": `mask` must be bool or floating, got ", m.scalar_type());
  TORCH_CHECK(m.device() == student.device(), kOp, ": `mask` is on ", m.device(), " but `student_logits` is on ",
              student.device());
  const bool plain = m.dim() == 3 && m.size(0) == z.B && m.size(1) == z.H && m.size(2) == z.W;
  const bool keep = m.dim() == 4 && m.size(0) == z.B && m.size(1) == 1 && m.size(2) == z.H && m.size(3) == z.W;
  TORCH_CHECK_VALUE(plain || keep, kOp, ": `mask` must have shape (B, H, W) or (B, 1, H, W) at the output `size` (",
                    show(z.H), ", ", show(z.W), "), got ", show(m.sizes()));
  return m.reshape({z.B, z.H * z.W}).to(z.acc_dtype).contiguous();
}

template <typename scalar_t, typename acc> struct SizedKernel {
  const Sized& z;
  const scalar_t* sp;
  const scalar_t* tp;
  std::array<int64_t, 4> ss, ts;
  cpu::ResizeAxis<acc> sy, sx, ty, tx;  // student / teacher axes, resized to (H, W)

  SizedKernel(const Sized& z_, const at::Tensor& s, const at::Tensor& t)
      : z(z_), sp(s.const_data_ptr<scalar_t>()), tp(t.const_data_ptr<scalar_t>()), ss(cpu::strides4(s)),
        ts(cpu::strides4(t)), sy(cpu::make_resize_axis<acc>(s.size(2), z_.H)),
        sx(cpu::make_resize_axis<acc>(s.size(3), z_.W)), ty(cpu::make_resize_axis<acc>(t.size(2), z_.H)),
        tx(cpu::make_resize_axis<acc>(t.size(3), z_.W)) {}

  // Resized student / teacher values of output pixels (b, r, j0 .. j0 + P - 1).
  void gather(int64_t b, int64_t r, int64_t j0, int64_t P, acc* sbuf, acc* tbuf) const {
    cpu::gather_resized<scalar_t, acc>(sp + b * ss[0], ss, z.C, sy.tap[r], sx.tap.data() + j0, P, sbuf);
    cpu::gather_resized<scalar_t, acc>(tp + b * ts[0], ts, z.C, ty.tap[r], tx.tap.data() + j0, P, tbuf);
  }

  // Per-pixel KL (B, H * W), weighted by `wp` (nullable) when `out` is given; the statistics when `st` is.
  void stats(const acc* wp, acc* out, const cpu::PixelStats<acc>* st) const {
    const int64_t blocks_per_row = (z.W + cpu::kKLBlock - 1) / cpu::kKLBlock;
    at::parallel_for(0, z.B * z.H * blocks_per_row, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc> sbuf(z.C * cpu::kKLBlock), tbuf(z.C * cpu::kKLBlock);
      acc kl[cpu::kKLBlock];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / (z.H * blocks_per_row), r = (task / blocks_per_row) % z.H;
        const int64_t j0 = (task % blocks_per_row) * cpu::kKLBlock, P = std::min(cpu::kKLBlock, z.W - j0);
        const int64_t o = (b * z.H + r) * z.W + j0;
        gather(b, r, j0, P, sbuf.data(), tbuf.data());
        cpu::block_stats<acc>(z.logits, z.C, P, sbuf.data(), tbuf.data(), kl, st, o);
        if (out)
          for (int64_t p = 0; p < P; ++p) {
            const acc w = wp ? wp[o + p] : acc(1);
            out[o + p] = w != acc(0) ? w * kl[p] : acc(0);
          }
      }
    });
  }

  // Gradient of one input (student when `student`, else teacher) through its resize.
  void input_grad(bool student, const cpu::PixelStats<acc>& st, const acc* wp, const at::Tensor& factor,
                  at::Tensor& grad) const {
    const acc* fp = factor.const_data_ptr<acc>();
    const bool per_pixel_factor = factor.dim() != 0;
    auto row_grad = [&](int64_t b, int64_t r, acc* buf, acc* scratch) {
      acc* sb = scratch;                        // [C][kKLBlock] resized student
      acc* tb = scratch + z.C * cpu::kKLBlock;  // [C][kKLBlock] resized teacher
      acc scale[cpu::kKLBlock];
      for (int64_t j0 = 0; j0 < z.W; j0 += cpu::kKLBlock) {
        const int64_t P = std::min(cpu::kKLBlock, z.W - j0);
        const int64_t o = (b * z.H + r) * z.W + j0;
        for (int64_t p = 0; p < P; ++p)
          scale[p] = (per_pixel_factor ? fp[o + p] : fp[0]) * (wp ? wp[o + p] : acc(1));
        gather(b, r, j0, P, sb, tb);
        cpu::block_grad_from_stats<acc>(z.logits, z.C, P, sb, tb, st, o, scale,
                                        student ? buf + j0 : nullptr, student ? nullptr : buf + j0, z.W);
      }
    };
    cpu::resize_gather_grad<acc, scalar_t>(z.B, z.C, student ? sy : ty, student ? sx : tx,
                                           grad.mutable_data_ptr<scalar_t>(), cpu::strides4(grad),
                                           2 * z.C * cpu::kKLBlock, row_grad);
  }
};

at::Tensor sized_forward(const at::Tensor& student_logits, const at::Tensor& teacher,
                         const std::optional<at::Tensor>& mask, bool teacher_is_logits, c10::string_view reduction_name,
                         at::IntArrayRef size) {
  const auto z = make_sized(student_logits, teacher, size, teacher_is_logits);
  const auto reduction = parse_reduction(reduction_name, kOp);
  auto weights = sized_weights(mask, z, student_logits);
  auto kl = at::zeros({z.B, z.H * z.W}, student_logits.options().dtype(z.acc_dtype));
  if (kl.numel() > 0 && z.C > 0) {
    auto s = student_logits.to(z.in_dtype);
    auto t = teacher.to(z.in_dtype);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.in_dtype, "masked_kl_div_cpu_sized", [&] {
      using acc = acc_t<scalar_t>;
      SizedKernel<scalar_t, acc> k(z, s, t);
      k.stats(weights.defined() ? weights.const_data_ptr<acc>() : nullptr, kl.mutable_data_ptr<acc>(), nullptr);
    });
  }
  return kl_reduce(kl, weights, reduction, {z.B, z.H, z.W});
}

// The gradients output_mask asks for, with size, for the (B, H * W) weights (undefined: all 1); with
// kl_out ((B, H * W) of the compute dtype, zeros), pass 1 also stores the forward's weighted KL there.
std::tuple<at::Tensor, at::Tensor> sized_grads(const Sized& z, const at::Tensor& grad_loss,
                                               const at::Tensor& student_logits, const at::Tensor& teacher,
                                               const at::Tensor& weights, Reduction reduction,
                                               std::array<bool, 2> output_mask, at::Tensor* kl_out = nullptr) {
  const int64_t N = z.H * z.W;
  auto factor = kl_grad_factor(grad_loss, weights, reduction, z.B, N, z.acc_dtype);
  at::Tensor grad_s = output_mask[0] ? at::empty_like(student_logits) : at::empty({0}, student_logits.options());
  at::Tensor grad_t = output_mask[1] ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  auto in_dtype_like = [&](const at::Tensor& g, bool need) {
    return need && g.scalar_type() != z.in_dtype ? at::empty_like(g, g.options().dtype(z.in_dtype)) : g;
  };
  at::Tensor gs = in_dtype_like(grad_s, output_mask[0]);
  at::Tensor gt = in_dtype_like(grad_t, output_mask[1]);
  if ((output_mask[0] || output_mask[1]) && z.B * N > 0 && z.C > 0) {
    auto s = student_logits.to(z.in_dtype);
    auto t = teacher.to(z.in_dtype);
    // Pass 1: per output pixel statistics, O(B H W). Pass 2: per input pixel gathers.
    auto stats = at::empty({4, z.B * N}, student_logits.options().dtype(z.acc_dtype));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.in_dtype, "masked_kl_div_backward_cpu_sized", [&] {
      using acc = acc_t<scalar_t>;
      acc* base = stats.mutable_data_ptr<acc>();
      const cpu::PixelStats<acc> st{base, base + z.B * N, base + 2 * z.B * N, base + 3 * z.B * N};
      const acc* wp = weights.defined() ? weights.const_data_ptr<acc>() : nullptr;
      SizedKernel<scalar_t, acc> k(z, s, t);
      k.stats(wp, kl_out ? kl_out->mutable_data_ptr<acc>() : nullptr, &st);
      if (output_mask[0]) k.input_grad(true, st, wp, factor, gs);
      if (output_mask[1]) k.input_grad(false, st, wp, factor, gt);
    });
  } else {
    if (output_mask[0]) gs.zero_();
    if (output_mask[1]) gt.zero_();
  }
  if (output_mask[0] && !gs.is_same(grad_s)) grad_s.copy_(gs);
  if (output_mask[1] && !gt.is_same(grad_t)) grad_t.copy_(gt);
  return {grad_s, grad_t};
}

std::tuple<at::Tensor, at::Tensor> sized_backward(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                                                  const at::Tensor& teacher, const std::optional<at::Tensor>& mask,
                                                  bool teacher_is_logits, c10::string_view reduction_name,
                                                  at::IntArrayRef size, std::array<bool, 2> output_mask) {
  const auto z = make_sized(student_logits, teacher, size, teacher_is_logits);
  const auto reduction = parse_reduction(reduction_name, kOp);
  return sized_grads(z, grad_loss, student_logits, teacher, sized_weights(mask, z, student_logits), reduction,
                     output_mask);
}

at::Tensor masked_kl_div_cpu(const at::Tensor& student_logits, const at::Tensor& teacher,
                             const std::optional<at::Tensor>& mask, bool teacher_is_logits,
                             c10::string_view reduction_name, at::OptionalIntArrayRef size) {
  if (size.has_value() && !size_is_identity(student_logits, teacher, size))
    return sized_forward(student_logits, teacher, mask, teacher_is_logits, reduction_name, *size);
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
      const bool one_sweep = cpu::kl_one_sweep();
      at::parallel_for(0, B * N, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t b = i / N, n = i % N;
          const acc w = wp ? wp[i] : acc(1);
          if (w == acc(0)) {
            out[i] = 0;
            continue;
          }
          const auto st = kl_pixel<scalar_t>(sp + b * sb + n * sn, sc, tp + b * tb + n * tn, tc, C, teacher_is_logits,
                                            one_sweep);
          out[i] = w * st.kl;
        }
      });
    });
  } else {
    kl.zero_();
  }
  return kl_reduce(kl, weights, reduction, kl_loss_shape(student_logits));
}

// The full-resolution backward for the (B, N) weights (undefined: all 1); with kl_out ((B, N) of the
// compute dtype), the same pass also stores the forward's per-pixel weighted KL there.
std::tuple<at::Tensor, at::Tensor> full_backward(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                                                 const at::Tensor& teacher, const at::Tensor& weights,
                                                 bool teacher_is_logits, Reduction reduction,
                                                 std::array<bool, 2> output_mask, at::Tensor* kl_out = nullptr) {
  const auto dtype = kl_compute_dtype(student_logits, teacher);
  const int64_t B = student_logits.size(0), C = student_logits.size(1);
  const int64_t N = B * C == 0 ? 0 : student_logits.numel() / (B * C);
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
        float* klp = kl_out ? kl_out->mutable_data_ptr<float>() : nullptr;
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
              if (gtb || klp)  // the logits teacher's gradient needs the KL value
                cpu::kl_block_stats<scalar_t, scalar_t, true>(sb, s.stride(1), tb, t.stride(1), C, P, st);
              else
                cpu::kl_block_stats<scalar_t, scalar_t, true, false>(sb, s.stride(1), tb, t.stride(1), C, P, st);
              cpu::kl_block_grad<scalar_t, scalar_t, scalar_t, true>(sb, s.stride(1), tb, t.stride(1), C, P, st, scale,
                                                                      gsb, gscs, gtb, gtcs);
            } else {
              if (klp)
                cpu::kl_block_stats<scalar_t, scalar_t, false>(sb, s.stride(1), tb, t.stride(1), C, P, st);
              else
                cpu::kl_block_stats<scalar_t, scalar_t, false, false>(sb, s.stride(1), tb, t.stride(1), C, P, st);
              cpu::kl_block_grad<scalar_t, scalar_t, scalar_t, false>(sb, s.stride(1), tb, t.stride(1), C, P, st, scale,
                                                                       gsb, gscs, gtb, gtcs);
            }
            if (klp)  // as the forward weights it
              for (int64_t p = 0; p < P; ++p) {
                const float wi = wp ? wp[b * N + n0 + p] : 1.f;
                klp[b * N + n0 + p] = wi != 0.f ? wi * st.kl[p] : 0.f;
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
      acc* klp = kl_out ? kl_out->mutable_data_ptr<acc>() : nullptr;
      const bool one_sweep = cpu::kl_one_sweep();
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
            if (klp) klp[i] = 0;
            continue;
          }
          const scalar_t* si = sp + b * sb + n * sn;
          const scalar_t* ti = tp + b * tb + n * tn;
          const auto st = kl_pixel<scalar_t>(si, sc, ti, tc, C, teacher_is_logits, one_sweep);
          kl_pixel_grad<scalar_t>(si, sc, ti, tc, C, teacher_is_logits, st, scale, gsi, gsc, gti, gtc);
          if (klp) klp[i] = (wp ? wp[i] : acc(1)) * st.kl;
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

std::tuple<at::Tensor, at::Tensor> masked_kl_div_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                                                              const at::Tensor& teacher,
                                                              const std::optional<at::Tensor>& mask,
                                                              bool teacher_is_logits, c10::string_view reduction_name,
                                                              at::OptionalIntArrayRef size,
                                                              std::array<bool, 2> output_mask) {
  if (size.has_value() && !size_is_identity(student_logits, teacher, size))
    return sized_backward(grad_loss, student_logits, teacher, mask, teacher_is_logits, reduction_name, *size,
                          output_mask);
  check_inputs(student_logits, teacher);
  const auto reduction = parse_reduction(reduction_name, kOp);
  auto weights = kl_weights(mask, student_logits, kl_compute_dtype(student_logits, teacher), kOp);
  return full_backward(grad_loss, student_logits, teacher, weights, teacher_is_logits, reduction, output_mask);
}

// tpswarp::_masked_kl_div_with_grad: the loss and its gradient w.r.t. student_logits for an upstream
// gradient of 1, from one pass over the inputs (the statistics of the forward serve the gradient too).
// For reduction "mean" / "sum"; the Python autograd formula scales by the upstream gradient.
std::tuple<at::Tensor, at::Tensor> masked_kl_div_with_grad_cpu(const at::Tensor& student_logits,
                                                              const at::Tensor& teacher,
                                                              const std::optional<at::Tensor>& mask,
                                                              bool teacher_is_logits, c10::string_view reduction_name,
                                                              at::OptionalIntArrayRef size) {
  const bool sized = size.has_value() && !size_is_identity(student_logits, teacher, size);
  const auto reduction = parse_reduction(reduction_name, kOp);
  TORCH_CHECK_VALUE(reduction != Reduction::None, "_masked_kl_div_with_grad: `reduction` must be 'mean' or 'sum', ",
                    "got 'none'");
  if (!sized) {
    check_inputs(student_logits, teacher);
    const auto dtype = kl_compute_dtype(student_logits, teacher);
    auto weights = kl_weights(mask, student_logits, dtype, kOp);
    const int64_t B = student_logits.size(0), C = student_logits.size(1);
    auto kl = at::zeros({B, B * C == 0 ? 0 : student_logits.numel() / (B * C)}, student_logits.options().dtype(dtype));
    auto grads = full_backward(at::ones({}, kl.options()), student_logits, teacher, weights, teacher_is_logits,
                               reduction, {true, false}, &kl);
    return {kl_reduce(kl, weights, reduction, kl_loss_shape(student_logits)), std::get<0>(grads)};
  }
  const auto z = make_sized(student_logits, teacher, *size, teacher_is_logits);
  auto weights = sized_weights(mask, z, student_logits);
  auto kl = at::zeros({z.B, z.H * z.W}, student_logits.options().dtype(z.acc_dtype));
  auto grads = sized_grads(z, at::ones({}, kl.options()), student_logits, teacher, weights, reduction, {true, false},
                           &kl);
  return {kl_reduce(kl, weights, reduction, {z.B, z.H, z.W}), std::get<0>(grads)};
}

// tpswarp::_masked_kl_div_with_stats and _masked_kl_div_backward_stats: the per-pixel code of the CUDA
// kernels (one-sweep statistics, kl_stats_store / kl_stats_load of tpswarp/kl.h), scalar, so that the
// CPU tests check the GPU's math. Not routed to on the CPU: the gradient in the forward
// (_masked_kl_div_with_grad) and the blocked kernels serve the CPU's calls.
std::tuple<at::Tensor, at::Tensor> masked_kl_div_with_stats_cpu(const at::Tensor& student_logits,
                                                                const at::Tensor& teacher,
                                                                const std::optional<at::Tensor>& mask,
                                                                bool teacher_is_logits,
                                                                c10::string_view reduction_name) {
  const auto o = kl_operands(student_logits, teacher, mask, reduction_name, kOp);
  auto kl = at::zeros({o.B, o.N}, student_logits.options().dtype(o.dtype));
  auto stats = at::zeros({o.B, kKlStats, o.N}, kl.options());
  if (o.B * o.N > 0 && o.C > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.in_dtype, "masked_kl_div_with_stats_cpu", [&] {
      using acc = acc_t<scalar_t>;
      const scalar_t* sp = o.s.const_data_ptr<scalar_t>();
      const scalar_t* tp = o.t.const_data_ptr<scalar_t>();
      const acc* wp = o.weights.defined() ? o.weights.const_data_ptr<acc>() : nullptr;
      acc* out = kl.mutable_data_ptr<acc>();
      acc* stp = stats.mutable_data_ptr<acc>();
      at::parallel_for(0, o.B * o.N, std::max<int64_t>(1, 4096 / o.C), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t b = i / o.N, n = i % o.N;
          const acc w = wp ? wp[i] : acc(1);
          if (w == acc(0)) continue;  // loss and statistics 0 (the gradient is 0 there)
          const auto st = kl_pixel<scalar_t>(sp + b * o.s.stride(0) + n * o.s.stride(2), o.s.stride(1),
                                            tp + b * o.t.stride(0) + n * o.t.stride(2), o.t.stride(1), o.C,
                                            teacher_is_logits, true);
          out[i] = w * st.kl;
          kl_stats_store(st, teacher_is_logits, stp + b * kKlStats * o.N + n, o.N);
        }
      });
    });
  }
  return {kl_reduce(kl, o.weights, o.reduction, kl_loss_shape(student_logits)), stats};
}

at::Tensor masked_kl_div_backward_stats_cpu(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                                            const at::Tensor& teacher, const std::optional<at::Tensor>& mask,
                                            const at::Tensor& stats, bool teacher_is_logits,
                                            c10::string_view reduction_name) {
  const auto o = kl_operands(student_logits, teacher, mask, reduction_name, kOp);
  check_kl_stats(stats, o.B, kKlStats, o.N, o.dtype, student_logits, kOp);
  auto factor = kl_grad_factor(grad_loss, o.weights, o.reduction, o.B, o.N, o.dtype);
  at::Tensor grad_s = at::empty_like(student_logits);
  at::Tensor gs = grad_s.scalar_type() != o.in_dtype ? at::empty_like(grad_s, grad_s.options().dtype(o.in_dtype))
                                                     : grad_s;
  if (o.B * o.N > 0 && o.C > 0) {
    auto gs3 = gs.view({o.B, o.C, o.N});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.in_dtype, "masked_kl_div_backward_stats_cpu", [&] {
      using acc = acc_t<scalar_t>;
      const scalar_t* sp = o.s.const_data_ptr<scalar_t>();
      const scalar_t* tp = o.t.const_data_ptr<scalar_t>();
      const acc* wp = o.weights.defined() ? o.weights.const_data_ptr<acc>() : nullptr;
      const acc* fp = factor.const_data_ptr<acc>();
      const int64_t f_step = factor.dim() == 0 ? 0 : 1;
      const acc* stp = stats.const_data_ptr<acc>();
      scalar_t* gp = gs3.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, o.B * o.N, std::max<int64_t>(1, 4096 / o.C), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t b = i / o.N, n = i % o.N;
          const acc scale = fp[i * f_step] * (wp ? wp[i] : acc(1));
          scalar_t* gi = gp + b * gs3.stride(0) + n * gs3.stride(2);
          if (scale == acc(0)) {
            for (int64_t c = 0; c < o.C; ++c) gi[c * gs3.stride(1)] = scalar_t(0);
            continue;
          }
          const auto st = kl_stats_load(stp + b * kKlStats * o.N + n, o.N, teacher_is_logits);
          kl_pixel_grad<scalar_t>(sp + b * o.s.stride(0) + n * o.s.stride(2), o.s.stride(1),
                                  tp + b * o.t.stride(0) + n * o.t.stride(2), o.t.stride(1), o.C, teacher_is_logits,
                                  st, scale, gi, gs3.stride(1), static_cast<scalar_t*>(nullptr), 0);
        }
      });
    });
  } else {
    gs.zero_();
  }
  if (!gs.is_same(grad_s)) grad_s.copy_(gs);
  return grad_s;
}

}  // namespace

TORCH_LIBRARY_IMPL(tpswarp, CPU, m) {
  m.impl("masked_kl_div", &masked_kl_div_cpu);
  m.impl("_masked_kl_div_backward", &masked_kl_div_backward_cpu);
  m.impl("_masked_kl_div_with_grad", &masked_kl_div_with_grad_cpu);
  m.impl("_masked_kl_div_with_stats", &masked_kl_div_with_stats_cpu);
  m.impl("_masked_kl_div_backward_stats", &masked_kl_div_backward_stats_cpu);
}

}  // namespace tpswarp
