// CPU kernels of tpswarp::tps_solve and its backward: one small (n + 3) x (n + 3) system per batch
// item, built and solved in double with partial pivoting (tpswarp/tps_solve.h), items in parallel.
// Each item is independent, so the results do not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>
#include <type_traits>
#include <utility>
#include <vector>

#include "tpswarp/tps_args.h"
#include "tpswarp/tps_solve.h"

namespace tpswarp {
namespace {

constexpr const char* kOp = "tps_solve";

// src and dst in one dtype: when they differ both go to the compute dtype, which holds either
// exactly (half, bfloat16 < float32 < float64). The tensors are tiny.
std::pair<at::Tensor, at::Tensor> same_dtype(const at::Tensor& src, const at::Tensor& dst) {
  if (src.scalar_type() == dst.scalar_type()) return {src, dst};
  const auto ct = tps_compute_dtype({src.scalar_type(), dst.scalar_type()});
  return {src.to(ct), dst.to(ct)};
}

// Calls f(store, b, std::integral_constant<int, NMAX>) for every item b, in parallel, with the
// storage tier of n (the CUDA kernels' tiers): fixed arrays for n <= 4, else a workspace, on the stack
// for n <= 32 and on the heap beyond (one per chunk of items).
template <int NMAX, int R, typename F> void for_items_tier(int64_t B, int n, const F& f) {
  const int64_t N = n + 3;
  const int64_t grain = std::max<int64_t>(1, 8192 / (N * N * N));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    if constexpr (NMAX > 0) {
      TpsFixedStore<NMAX, R> st;
      for (int64_t b = begin; b < end; ++b) f(st, b, std::integral_constant<int, NMAX>{});
    } else {
      double stack_ws[tps_workspace_size(kTpsStackN, R)];
      std::vector<double> heap_ws(n <= kTpsStackN ? 0 : tps_workspace_size(n, R));
      TpsPtrStore<R> st(n <= kTpsStackN ? stack_ws : heap_ws.data(), n);
      for (int64_t b = begin; b < end; ++b) f(st, b, std::integral_constant<int, 0>{});
    }
  });
}

template <int R, typename F> void for_items(int64_t B, int n, const F& f) {
  if (n <= kTpsSmallN) {
    for_items_tier<kTpsSmallN + 3, R>(B, n, f);
  } else {
    for_items_tier<0, R>(B, n, f);
  }
}

at::Tensor tps_solve_cpu(const at::Tensor& src_in, const at::Tensor& dst_in, double reg, bool check_singular) {
  check_tps_solve_args(src_in, dst_in, reg, kOp);
  const auto out_dtype = tps_compute_dtype({src_in.scalar_type(), dst_in.scalar_type()});
  auto [src, dst] = same_dtype(src_in, dst_in);
  const int64_t B = src.size(0);
  const int n = static_cast<int>(src.size(1));
  auto params = at::empty({B, n + 3, 2}, src.options().dtype(out_dtype));
  if (B == 0) return params;
  std::vector<int8_t> status(B, kTpsRegular);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "tps_solve_cpu", [&] {
    using out_t = acc_t<scalar_t>;
    const scalar_t* sp = src.const_data_ptr<scalar_t>();
    const scalar_t* dp = dst.const_data_ptr<scalar_t>();
    out_t* pp = params.mutable_data_ptr<out_t>();
    const int64_t ssb = src.stride(0), ssi = src.stride(1), ssc = src.stride(2);
    const int64_t dsb = dst.stride(0), dsi = dst.stride(1), dsc = dst.stride(2);
    const int64_t psb = int64_t(n + 3) * 2;
    int8_t* st_out = status.data();
    for_items<2>(B, n, [&](auto& st, int64_t b, auto tier) {
      constexpr int NMAX = decltype(tier)::value;
      st_out[b] = static_cast<int8_t>(
          tps_solve_item<NMAX>(st, sp + b * ssb, ssi, ssc, dp + b * dsb, dsi, dsc, n, reg, pp + b * psb));
    });
  });
  if (check_singular) tps_raise_if_singular(status.data(), B);
  return params;
}

// grad_params: (B, n + 3, 2). `params` (the forward's output) is only checked: the backward
// re-solves in double, with grad_params as two more right-hand sides of the same elimination.
std::tuple<at::Tensor, at::Tensor> tps_solve_backward_cpu(const at::Tensor& grad_params, const at::Tensor& src_in,
                                                          const at::Tensor& dst_in, const at::Tensor& params,
                                                          double reg, std::array<bool, 2> output_mask) {
  check_tps_solve_args(src_in, dst_in, reg, "_tps_solve_backward");
  check_tps_params_args(src_in, grad_params, src_in.size(0), "_tps_solve_backward", "grad_params");
  check_tps_params_args(src_in, params, src_in.size(0), "_tps_solve_backward");
  const int64_t B = src_in.size(0);
  const int n = static_cast<int>(src_in.size(1));
  at::Tensor grad_src = output_mask[0] ? at::empty({B, n, 2}, src_in.options()) : at::empty({0}, src_in.options());
  at::Tensor grad_dst = output_mask[1] ? at::empty({B, n, 2}, dst_in.options()) : at::empty({0}, dst_in.options());
  if (B == 0 || !(output_mask[0] || output_mask[1])) return {grad_src, grad_dst};

  auto [src, dst] = same_dtype(src_in, dst_in);
  const auto work_dtype = src.scalar_type();
  // Gradients in the working dtype; cast to each input's dtype at the end if it differs.
  at::Tensor gs = output_mask[0] ? (work_dtype == grad_src.scalar_type() ? grad_src : at::empty({B, n, 2}, src.options()))
                                 : grad_src;
  at::Tensor gd = output_mask[1] ? (work_dtype == grad_dst.scalar_type() ? grad_dst : at::empty({B, n, 2}, src.options()))
                                 : grad_dst;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, work_dtype, "tps_solve_backward_cpu", [&] {
    using g_t = acc_t<scalar_t>;
    const auto gparams = grad_params.to(c10::CppTypeToScalarType<g_t>::value);  // no copy in the usual case
    const scalar_t* sp = src.const_data_ptr<scalar_t>();
    const scalar_t* dp = dst.const_data_ptr<scalar_t>();
    const g_t* gp = gparams.const_data_ptr<g_t>();
    scalar_t* gsp = output_mask[0] ? gs.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gdp = output_mask[1] ? gd.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t ssb = src.stride(0), ssi = src.stride(1), ssc = src.stride(2);
    const int64_t dsb = dst.stride(0), dsi = dst.stride(1), dsc = dst.stride(2);
    const int64_t gsb = gparams.stride(0), gsi = gparams.stride(1), gsc = gparams.stride(2);
    const int64_t osb = int64_t(n) * 2;
    for_items<4>(B, n, [&](auto& st, int64_t b, auto tier) {
      constexpr int NMAX = decltype(tier)::value;
      tps_solve_backward_item<NMAX>(st, sp + b * ssb, ssi, ssc, dp + b * dsb, dsi, dsc, gp + b * gsb, gsi, gsc, n, reg,
                                    gsp ? gsp + b * osb : nullptr, gdp ? gdp + b * osb : nullptr);
    });
  });
  if (output_mask[0] && !gs.is_same(grad_src)) grad_src.copy_(gs);
  if (output_mask[1] && !gd.is_same(grad_dst)) grad_dst.copy_(gd);
  return {grad_src, grad_dst};
}

}  // namespace

TORCH_LIBRARY_IMPL(tpswarp, CPU, m) {
  m.impl("tps_solve", &tps_solve_cpu);
  m.impl("_tps_solve_backward", &tps_solve_backward_cpu);
}

}  // namespace tpswarp
