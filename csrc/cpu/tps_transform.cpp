// CPU kernels of tpswarp::tps_transform and its backward: the TPS map of tpswarp/tps.h at each point.
// The gradients w.r.t. src and params are sums over the m points: each batch item's points are cut
// into fixed chunks of kChunk points, each chunk sums into its own partial buffer, and the partials
// are added in chunk order (in double). The result does not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "tpswarp/show.h"
#include "tpswarp/tps.h"
#include "tpswarp/tps_args.h"
#include "tpswarp/tps_solve.h"

namespace tpswarp {
namespace {

constexpr const char* kOp = "tps_transform";
constexpr int64_t kChunk = 256;  // points per partial sum of the parameter gradients

struct TransformInputs {
  at::Tensor points;  // the caller's points, or a float64 copy when the compute dtype is float64
  at::Tensor src;     // (B, n, 2) contiguous, compute dtype
  at::Tensor params;  // (B, n + 3, 2) contiguous, compute dtype
  at::ScalarType compute_dtype;
  at::ScalarType out_dtype;
};

TransformInputs prepare(const at::Tensor& points, const at::Tensor& src, const at::Tensor& params, const char* op) {
  check_tps_points(points, "points", op);
  check_tps_params_args(src, params, points.size(0), op);
  check_same_device(points, "points", src, "src", op);
  TransformInputs in;
  in.compute_dtype = tps_compute_dtype({points.scalar_type(), src.scalar_type(), params.scalar_type()});
  in.out_dtype = c10::promoteTypes(c10::promoteTypes(points.scalar_type(), src.scalar_type()), params.scalar_type());
  // Mixed float64 inputs: the points go to float64 too (the only case where they are copied).
  in.points = in.compute_dtype == at::kDouble ? points.to(at::kDouble) : points;
  in.src = src.to(in.compute_dtype).contiguous();
  in.params = params.to(in.compute_dtype).contiguous();
  // The output dtype is either the points' dtype or the compute dtype (see the dispatch below).
  TORCH_INTERNAL_ASSERT(in.out_dtype == in.points.scalar_type() || in.out_dtype == in.compute_dtype);
  return in;
}

template <typename scalar_t, typename out_t>
void transform_forward(const TransformInputs& in, at::Tensor& out) {
  using acc = acc_t<scalar_t>;
  const int64_t B = in.points.size(0), m = in.points.size(1), n = in.src.size(1);
  const scalar_t* qp = in.points.const_data_ptr<scalar_t>();
  const int64_t qsb = in.points.stride(0), qsm = in.points.stride(1), qsc = in.points.stride(2);
  const acc* sp = in.src.const_data_ptr<acc>();
  const acc* pp = in.params.const_data_ptr<acc>();
  out_t* op = out.mutable_data_ptr<out_t>();
  const int64_t grain = std::max<int64_t>(64, 8192 / (n + 1));
  at::parallel_for(0, B * m, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / m, j = i % m;
      const scalar_t* q = qp + b * qsb + j * qsm;
      const auto f = tps_eval<acc>(static_cast<acc>(q[0]), static_cast<acc>(q[qsc]), sp + b * 2 * n,
                                   pp + b * 2 * (n + 3), n);
      op[2 * i] = static_cast<out_t>(f.x);
      op[2 * i + 1] = static_cast<out_t>(f.y);
    }
  });
}

at::Tensor tps_transform_cpu(const at::Tensor& points, const at::Tensor& src, const at::Tensor& params) {
  auto in = prepare(points, src, params, kOp);
  const int64_t B = points.size(0), m = points.size(1);
  auto out = at::empty({B, m, 2}, points.options().dtype(in.out_dtype));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.points.scalar_type(), "tps_transform_cpu", [&] {
    if (in.out_dtype == in.points.scalar_type()) {
      transform_forward<scalar_t, scalar_t>(in, out);
    } else {
      transform_forward<scalar_t, acc_t<scalar_t>>(in, out);
    }
  });
  return out;
}

// grad_out has the output dtype g_t. Writes grad_points (working dtype, contiguous, or undefined) and the
// parameter gradients in the compute dtype (gs: (B, n, 2), gpar: (B, n + 3, 2), or undefined).
template <typename scalar_t, typename g_t>
void transform_backward(const TransformInputs& in, const at::Tensor& grad_out, at::Tensor& gq, at::Tensor& gs,
                        at::Tensor& gpar) {
  using acc = acc_t<scalar_t>;
  const int64_t B = in.points.size(0), m = in.points.size(1), n = in.src.size(1);
  const int64_t K = 4 * n + 6;  // [grad_src (n, 2) | grad_params (n + 3, 2)]
  const bool need_sp = gs.defined() || gpar.defined();
  const int64_t nchunks = (m + kChunk - 1) / kChunk;
  const scalar_t* qp = in.points.const_data_ptr<scalar_t>();
  const int64_t qsb = in.points.stride(0), qsm = in.points.stride(1), qsc = in.points.stride(2);
  const g_t* gop = grad_out.const_data_ptr<g_t>();
  const int64_t gsb = grad_out.stride(0), gsm = grad_out.stride(1), gsc = grad_out.stride(2);
  const acc* sp = in.src.const_data_ptr<acc>();
  const acc* pp = in.params.const_data_ptr<acc>();
  scalar_t* gqp = gq.defined() ? gq.mutable_data_ptr<scalar_t>() : nullptr;
  std::vector<acc> partial(need_sp ? B * nchunks * K : 0);

  at::parallel_for(0, B * nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nchunks, c = t % nchunks;
      acc* part = need_sp ? partial.data() + t * K : nullptr;
      if (part) std::fill(part, part + K, acc(0));
      const acc* s = sp + b * 2 * n;
      const acc* p = pp + b * 2 * (n + 3);
      const int64_t j_end = std::min(m, (c + 1) * kChunk);
      for (int64_t j = c * kChunk; j < j_end; ++j) {
        const scalar_t* q = qp + b * qsb + j * qsm;
        const g_t* go = gop + b * gsb + j * gsm;
        const acc qx = static_cast<acc>(q[0]), qy = static_cast<acc>(q[qsc]);
        const Vec2<acc> g{static_cast<acc>(go[0]), static_cast<acc>(go[gsc])};
        acc gA[6];
        Vec2<acc> d = tps_affine_backward<acc>(qx, qy, p + 2 * n, g, gA);
        for (int64_t i = 0; i < n; ++i) {
          const auto r = tps_radial_backward<acc>(qx, qy, s[2 * i], s[2 * i + 1], p[2 * i], p[2 * i + 1], g, d);
          if (part) {
            part[2 * i] += r.src_x;
            part[2 * i + 1] += r.src_y;
            part[2 * n + 2 * i] += r.w_x;
            part[2 * n + 2 * i + 1] += r.w_y;
          }
        }
        if (part) {
          for (int k = 0; k < 6; ++k) part[4 * n + k] += gA[k];
        }
        if (gqp) {
          gqp[2 * (b * m + j)] = static_cast<scalar_t>(d.x);
          gqp[2 * (b * m + j) + 1] = static_cast<scalar_t>(d.y);
        }
      }
    }
  });

  if (!need_sp) return;
  acc* gsp = gs.defined() ? gs.mutable_data_ptr<acc>() : nullptr;
  acc* gpp = gpar.defined() ? gpar.mutable_data_ptr<acc>() : nullptr;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t k = 0; k < K; ++k) {
        double total = 0;
        for (int64_t c = 0; c < nchunks; ++c) total += static_cast<double>(partial[(b * nchunks + c) * K + k]);
        if (k < 2 * n) {
          if (gsp) gsp[b * 2 * n + k] = static_cast<acc>(total);
        } else if (gpp) {
          gpp[b * 2 * (n + 3) + (k - 2 * n)] = static_cast<acc>(total);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tps_transform_backward_cpu(const at::Tensor& grad_out,
                                                                          const at::Tensor& points,
                                                                          const at::Tensor& src,
                                                                          const at::Tensor& params,
                                                                          std::array<bool, 3> output_mask) {
  const char* op = "_tps_transform_backward";
  auto in = prepare(points, src, params, op);
  const int64_t B = points.size(0), m = points.size(1), n = src.size(1);
  check_tps_float(grad_out, "grad_out", op);
  TORCH_CHECK_VALUE(grad_out.dim() == 3 && grad_out.size(0) == B && grad_out.size(1) == m && grad_out.size(2) == 2, op,
                    ": `grad_out` must have shape ", show(points.sizes()), ", got ", show(grad_out.sizes()));
  check_same_device(points, "points", grad_out, "grad_out", op);

  at::Tensor grad_points = output_mask[0] ? at::empty({B, m, 2}, points.options()) : at::empty({0}, points.options());
  at::Tensor grad_src = output_mask[1] ? at::empty({B, n, 2}, src.options()) : at::empty({0}, src.options());
  at::Tensor grad_params = output_mask[2] ? at::empty({B, n + 3, 2}, params.options()) : at::empty({0}, params.options());
  if (!(output_mask[0] || output_mask[1] || output_mask[2])) return {grad_points, grad_src, grad_params};

  const auto cd = in.compute_dtype;
  at::Tensor gq, gs, gpar;  // in the working dtypes
  if (output_mask[0]) {
    gq = grad_points.scalar_type() == in.points.scalar_type() ? grad_points : at::empty({B, m, 2}, in.points.options());
  }
  if (output_mask[1]) gs = grad_src.scalar_type() == cd ? grad_src : at::empty({B, n, 2}, src.options().dtype(cd));
  if (output_mask[2]) {
    gpar = grad_params.scalar_type() == cd ? grad_params : at::empty({B, n + 3, 2}, params.options().dtype(cd));
  }
  const auto go = grad_out.to(in.out_dtype);  // no copy in the usual case
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.points.scalar_type(), "tps_transform_backward_cpu", [&] {
    if (in.out_dtype == in.points.scalar_type()) {
      transform_backward<scalar_t, scalar_t>(in, go, gq, gs, gpar);
    } else {
      transform_backward<scalar_t, acc_t<scalar_t>>(in, go, gq, gs, gpar);
    }
  });
  if (output_mask[0] && !gq.is_same(grad_points)) grad_points.copy_(gq);
  if (output_mask[1] && !gs.is_same(grad_src)) grad_src.copy_(gs);
  if (output_mask[2] && !gpar.is_same(grad_params)) grad_params.copy_(gpar);
  return {grad_points, grad_src, grad_params};
}

}  // namespace

TORCH_LIBRARY_IMPL(tpswarp, CPU, m) {
  m.impl("tps_transform", &tps_transform_cpu);
  m.impl("_tps_transform_backward", &tps_transform_backward_cpu);
}

}  // namespace tpswarp
