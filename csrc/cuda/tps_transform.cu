// CUDA kernels of tpswarp::tps_transform and its backward: one thread per point, the TPS map of
// tpswarp/tps.h. The gradients w.r.t. src and params are reduced deterministically: each block sums its
// 256 points per control point (warp shuffles, then the warps in order) into a per-block partial, and a
// second kernel adds the partials of each batch item in a fixed order (in double). No atomics, no
// host synchronization.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>

#include "tpswarp/show.h"
#include "tpswarp/tps.h"
#include "tpswarp/tps_args.h"
#include "tpswarp/tps_solve.h"

namespace tpswarp {
namespace {

constexpr const char* kOp = "tps_transform";
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGridY = 65535;

struct Strides3 {
  int64_t b, m, c;
};
Strides3 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

template <typename T> __device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Block sum of NV values per thread, in a fixed order (warp tree, then warps in order). Thread t < NV
// gets the sum of value t. Every thread of the block must call it.
template <int NV, typename T> __device__ __forceinline__ T block_sum(const T (&v)[NV], T (*sh)[NV]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const T s = warp_sum(v[k]);
    if (lane == 0) sh[warp][k] = s;
  }
  __syncthreads();
  T total = 0;
  if (threadIdx.x < NV) {
    for (int w = 0; w < kWarps; ++w) total += sh[w][threadIdx.x];
  }
  __syncthreads();
  return total;
}

template <typename scalar_t, typename out_t>
__global__ void __launch_bounds__(kThreads) tps_transform_kernel(const scalar_t* __restrict__ points, Strides3 qs,
                                                                 const acc_t<scalar_t>* __restrict__ src,
                                                                 const acc_t<scalar_t>* __restrict__ params,
                                                                 out_t* __restrict__ out, int64_t B, int64_t m, int n) {
  using acc = acc_t<scalar_t>;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const acc* s = src + b * 2 * n;
    const acc* p = params + b * 2 * (n + 3);
    for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < m; j += int64_t(gridDim.x) * blockDim.x) {
      const scalar_t* q = points + b * qs.b + j * qs.m;
      const auto f = tps_eval<acc>(static_cast<acc>(q[0]), static_cast<acc>(q[qs.c]), s, p, n);
      out[2 * (b * m + j)] = static_cast<out_t>(f.x);
      out[2 * (b * m + j) + 1] = static_cast<out_t>(f.y);
    }
  }
}

// One thread per point (gridDim.x * kThreads >= m). partial: (B, gridDim.x, 4n + 6) in the layout
// [grad_src (n, 2) | grad_params (n + 3, 2)], or null when neither is needed.
template <typename scalar_t, typename g_t>
__global__ void __launch_bounds__(kThreads) tps_transform_backward_kernel(
    const scalar_t* __restrict__ points, Strides3 qs, const g_t* __restrict__ grad_out, Strides3 gos,
    const acc_t<scalar_t>* __restrict__ src, const acc_t<scalar_t>* __restrict__ params,
    scalar_t* __restrict__ grad_points, acc_t<scalar_t>* __restrict__ partial, int64_t B, int64_t m, int n) {
  using acc = acc_t<scalar_t>;
  __shared__ acc sh4[kWarps][4];
  __shared__ acc sh6[kWarps][6];
  const int64_t K = 4 * int64_t(n) + 6;
  const int64_t j = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  const bool active = j < m;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    acc qx = 0, qy = 0;
    Vec2<acc> g{0, 0};
    if (active) {
      const scalar_t* q = points + b * qs.b + j * qs.m;
      const g_t* go = grad_out + b * gos.b + j * gos.m;
      qx = static_cast<acc>(q[0]);
      qy = static_cast<acc>(q[qs.c]);
      g = {static_cast<acc>(go[0]), static_cast<acc>(go[gos.c])};
    }
    const acc* s = src + b * 2 * n;
    const acc* p = params + b * 2 * (n + 3);
    acc* part = partial ? partial + (b * gridDim.x + blockIdx.x) * K : nullptr;
    acc gA[6];
    Vec2<acc> d = tps_affine_backward<acc>(qx, qy, p + 2 * n, g, gA);
    for (int i = 0; i < n; ++i) {
      const auto r = tps_radial_backward<acc>(qx, qy, s[2 * i], s[2 * i + 1], p[2 * i], p[2 * i + 1], g, d);
      if (part) {  // uniform over the block
        const acc v[4] = {active ? r.src_x : acc(0), active ? r.src_y : acc(0), active ? r.w_x : acc(0),
                          active ? r.w_y : acc(0)};
        const acc t = block_sum<4>(v, sh4);
        if (threadIdx.x < 2) part[2 * i + threadIdx.x] = t;
        else if (threadIdx.x < 4) part[2 * n + 2 * i + (threadIdx.x - 2)] = t;
      }
    }
    if (part) {
      acc v[6];
#pragma unroll
      for (int k = 0; k < 6; ++k) v[k] = active ? gA[k] : acc(0);
      const acc t = block_sum<6>(v, sh6);
      if (threadIdx.x < 6) part[4 * n + threadIdx.x] = t;
    }
    if (grad_points && active) {
      grad_points[2 * (b * m + j)] = static_cast<scalar_t>(d.x);
      grad_points[2 * (b * m + j) + 1] = static_cast<scalar_t>(d.y);
    }
  }
}

// grid (4n + 6, min(B, 65535)): block (k, b) adds the nblk partials of value k of item b, in a fixed order.
template <typename acc>
__global__ void __launch_bounds__(kThreads) tps_transform_reduce_kernel(const acc* __restrict__ partial, int64_t nblk,
                                                                        int64_t B, int n, acc* __restrict__ grad_src,
                                                                        acc* __restrict__ grad_params) {
  __shared__ double sh[kWarps][1];
  const int64_t K = 4 * int64_t(n) + 6;
  const int64_t k = blockIdx.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    double v = 0;
    for (int64_t w = threadIdx.x; w < nblk; w += kThreads) v += static_cast<double>(partial[(b * nblk + w) * K + k]);
    const double vs[1] = {v};
    const double total = block_sum<1>(vs, sh);
    if (threadIdx.x == 0) {
      if (k < 2 * n) {
        if (grad_src) grad_src[b * 2 * n + k] = static_cast<acc>(total);
      } else if (grad_params) {
        grad_params[b * 2 * (n + 3) + (k - 2 * n)] = static_cast<acc>(total);
      }
    }
  }
}

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
  in.points = in.compute_dtype == at::kDouble ? points.to(at::kDouble) : points;
  in.src = src.to(in.compute_dtype).contiguous();
  in.params = params.to(in.compute_dtype).contiguous();
  TORCH_INTERNAL_ASSERT(in.out_dtype == in.points.scalar_type() || in.out_dtype == in.compute_dtype);
  return in;
}

dim3 grid_for(int64_t B, int64_t m) {
  const int64_t gx = std::min<int64_t>((m + kThreads - 1) / kThreads, 65535 * 4);
  return dim3(static_cast<unsigned>(std::max<int64_t>(gx, 1)), static_cast<unsigned>(std::min(B, kMaxGridY)));
}

at::Tensor tps_transform_cuda(const at::Tensor& points, const at::Tensor& src, const at::Tensor& params) {
  auto in = prepare(points, src, params, kOp);
  c10::cuda::CUDAGuard guard(points.device());
  const int64_t B = points.size(0), m = points.size(1);
  const int n = static_cast<int>(src.size(1));
  auto out = at::empty({B, m, 2}, points.options().dtype(in.out_dtype));
  if (out.numel() == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.points.scalar_type(), "tps_transform_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const auto launch = [&](auto* out_ptr) {
      using out_t = std::remove_pointer_t<decltype(out_ptr)>;
      tps_transform_kernel<scalar_t, out_t><<<grid_for(B, m), kThreads, 0, stream>>>(
          in.points.const_data_ptr<scalar_t>(), strides_of(in.points), in.src.const_data_ptr<acc>(),
          in.params.const_data_ptr<acc>(), out_ptr, B, m, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (in.out_dtype == in.points.scalar_type()) {
      launch(out.mutable_data_ptr<scalar_t>());
    } else {
      launch(out.mutable_data_ptr<acc>());
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tps_transform_backward_cuda(const at::Tensor& grad_out,
                                                                           const at::Tensor& points,
                                                                           const at::Tensor& src,
                                                                           const at::Tensor& params,
                                                                           std::array<bool, 3> output_mask) {
  const char* op = "_tps_transform_backward";
  auto in = prepare(points, src, params, op);
  c10::cuda::CUDAGuard guard(points.device());
  const int64_t B = points.size(0), m = points.size(1);
  const int n = static_cast<int>(src.size(1));
  check_tps_float(grad_out, "grad_out", op);
  TORCH_CHECK_VALUE(grad_out.dim() == 3 && grad_out.size(0) == B && grad_out.size(1) == m && grad_out.size(2) == 2, op,
                    ": `grad_out` must have shape ", show(points.sizes()), ", got ", show(grad_out.sizes()));
  check_same_device(points, "points", grad_out, "grad_out", op);

  at::Tensor grad_points = output_mask[0] ? at::empty({B, m, 2}, points.options()) : at::empty({0}, points.options());
  at::Tensor grad_src = output_mask[1] ? at::empty({B, n, 2}, src.options()) : at::empty({0}, src.options());
  at::Tensor grad_params = output_mask[2] ? at::empty({B, n + 3, 2}, params.options()) : at::empty({0}, params.options());
  if (!(output_mask[0] || output_mask[1] || output_mask[2]) || B == 0) return {grad_points, grad_src, grad_params};

  const auto cd = in.compute_dtype;
  at::Tensor gq, gs, gpar;  // in the working dtypes
  if (output_mask[0]) {
    gq = grad_points.scalar_type() == in.points.scalar_type() ? grad_points : at::empty({B, m, 2}, in.points.options());
  }
  if (output_mask[1]) gs = grad_src.scalar_type() == cd ? grad_src : at::empty({B, n, 2}, src.options().dtype(cd));
  if (output_mask[2]) {
    gpar = grad_params.scalar_type() == cd ? grad_params : at::empty({B, n + 3, 2}, params.options().dtype(cd));
  }
  const bool need_sp = output_mask[1] || output_mask[2];
  if (m == 0) {  // nothing to sum
    if (output_mask[1]) gs.zero_();
    if (output_mask[2]) gpar.zero_();
  } else {
    const auto go = grad_out.to(in.out_dtype);  // no copy in the usual case
    const int64_t nblk = (m + kThreads - 1) / kThreads;
    TORCH_CHECK(nblk <= int64_t(0x7fffffff), op, ": too many points, m = ", show(m));
    const dim3 grid(static_cast<unsigned>(nblk), static_cast<unsigned>(std::min(B, kMaxGridY)));
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.points.scalar_type(), "tps_transform_backward_cuda", [&] {
      using acc = acc_t<scalar_t>;
      at::Tensor partial = need_sp ? at::empty({B, nblk, 4 * n + 6}, in.src.options()) : at::Tensor();
      const auto launch = [&](const auto* go_ptr) {
        using g_t = std::remove_const_t<std::remove_pointer_t<decltype(go_ptr)>>;
        tps_transform_backward_kernel<scalar_t, g_t><<<grid, kThreads, 0, stream>>>(
            in.points.const_data_ptr<scalar_t>(), strides_of(in.points), go_ptr, strides_of(go),
            in.src.const_data_ptr<acc>(), in.params.const_data_ptr<acc>(),
            output_mask[0] ? gq.mutable_data_ptr<scalar_t>() : nullptr,
            need_sp ? partial.mutable_data_ptr<acc>() : nullptr, B, m, n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (in.out_dtype == in.points.scalar_type()) {
        launch(go.const_data_ptr<scalar_t>());
      } else {
        launch(go.const_data_ptr<acc>());
      }
      if (need_sp) {
        const dim3 rgrid(static_cast<unsigned>(4 * n + 6), static_cast<unsigned>(std::min(B, kMaxGridY)));
        tps_transform_reduce_kernel<acc><<<rgrid, kThreads, 0, stream>>>(
            partial.const_data_ptr<acc>(), nblk, B, n, output_mask[1] ? gs.mutable_data_ptr<acc>() : nullptr,
            output_mask[2] ? gpar.mutable_data_ptr<acc>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  if (output_mask[0] && !gq.is_same(grad_points)) grad_points.copy_(gq);
  if (output_mask[1] && !gs.is_same(grad_src)) grad_src.copy_(gs);
  if (output_mask[2] && !gpar.is_same(grad_params)) grad_params.copy_(gpar);
  return {grad_points, grad_src, grad_params};
}

}  // namespace

TORCH_LIBRARY_IMPL(tpswarp, CUDA, m) {
  m.impl("tps_transform", &tps_transform_cuda);
  m.impl("_tps_transform_backward", &tps_transform_backward_cuda);
}

}  // namespace tpswarp
