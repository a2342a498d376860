// CUDA kernels of tpswarp::tps_solve and its backward: one thread per batch item, the shared solve of
// tpswarp/tps_solve.h in double. For n <= 4 the whole system lives in registers (fixed arrays, fully
// unrolled loops); beyond, each item gets a workspace in global memory.
// No host synchronization, except reading one "any singular" flag (pinned host memory the kernel
// writes) when check_singular is true.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <utility>

#include "tpswarp/tps_args.h"
#include "tpswarp/tps_solve.h"

namespace tpswarp {
namespace {

constexpr const char* kOp = "tps_solve";
// Small blocks: 4096 items make 64 blocks of 64 threads, spread over the SMs (the work is latency bound).
constexpr int kThreads = 64;

struct Strides3 {
  int64_t b, i, c;
};
Strides3 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Runtime-typed pointers: one kernel instance per storage tier serves every dtype (the solve itself
// is in double; only the few loads and stores depend on the dtype). Templating the kernels on the
// dtype as well multiplied the compile time of the fully unrolled solves by four.
enum Kind : int { kHalfKind = 0, kBFloat16Kind = 1, kFloatKind = 2, kDoubleKind = 3 };

int kind_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return kHalfKind;
    case at::kBFloat16: return kBFloat16Kind;
    case at::kFloat: return kFloatKind;
    case at::kDouble: return kDoubleKind;
    default: TORCH_CHECK(false, "tps_solve: unsupported dtype ", t);
  }
}

__host__ __device__ __forceinline__ int64_t kind_size(int kind) { return kind <= kBFloat16Kind ? 2 : (kind == kFloatKind ? 4 : 8); }

struct AnyIn {
  const char* p;
  int kind;
  __device__ __forceinline__ AnyIn offset(int64_t i) const { return {p + i * kind_size(kind), kind}; }
};
struct AnyOut {
  char* p;
  int kind;
  __device__ __forceinline__ AnyOut offset(int64_t i) const { return {p ? p + i * kind_size(kind) : nullptr, kind}; }
  __device__ __forceinline__ explicit operator bool() const { return p != nullptr; }
};

// Found by argument-dependent lookup from the item functions of tpswarp/tps_solve.h.
__device__ __forceinline__ double tps_load(const AnyIn& a, int64_t i) {
  switch (a.kind) {
    case kHalfKind: return static_cast<float>(reinterpret_cast<const c10::Half*>(a.p)[i]);
    case kBFloat16Kind: return static_cast<float>(reinterpret_cast<const c10::BFloat16*>(a.p)[i]);
    case kFloatKind: return reinterpret_cast<const float*>(a.p)[i];
    default: return reinterpret_cast<const double*>(a.p)[i];
  }
}
__device__ __forceinline__ void tps_store(const AnyOut& a, int64_t i, double v) {
  switch (a.kind) {
    case kHalfKind: reinterpret_cast<c10::Half*>(a.p)[i] = c10::Half(static_cast<float>(v)); break;
    case kBFloat16Kind: reinterpret_cast<c10::BFloat16*>(a.p)[i] = c10::BFloat16(static_cast<float>(v)); break;
    case kFloatKind: reinterpret_cast<float*>(a.p)[i] = static_cast<float>(v); break;
    default: reinterpret_cast<double*>(a.p)[i] = v;
  }
}

AnyIn any_in(const at::Tensor& t) { return {static_cast<const char*>(t.const_data_ptr()), kind_of(t.scalar_type())}; }
AnyOut any_out(at::Tensor& t) { return {static_cast<char*>(t.mutable_data_ptr()), kind_of(t.scalar_type())}; }
AnyOut no_out() { return {nullptr, kDoubleKind}; }

template <int NMAX>
__global__ void __launch_bounds__(kThreads)
    tps_solve_kernel(AnyIn src, Strides3 ss, AnyIn dst, Strides3 ds, AnyOut params, int8_t* __restrict__ status,
                     volatile int* any_singular, int64_t B, int n, double reg, double* __restrict__ workspace) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= B) return;
  const AnyOut out = params.offset(b * int64_t(n + 3) * 2);
  int st;
  if constexpr (NMAX > 0) {
    TpsFixedStore<NMAX, 2> store;
    st = tps_solve_item<NMAX>(store, src.offset(b * ss.b), ss.i, ss.c, dst.offset(b * ds.b), ds.i, ds.c, n, reg, out);
  } else {
    TpsPtrStore<2> store(workspace + b * tps_workspace_size(n, 2), n);
    st = tps_solve_item<0>(store, src.offset(b * ss.b), ss.i, ss.c, dst.offset(b * ds.b), ds.i, ds.c, n, reg, out);
  }
  if (status) {
    status[b] = static_cast<int8_t>(st);
    if (st != kTpsRegular) *any_singular = 1;  // pinned host memory; every writer stores the same value
  }
}

template <int NMAX>
__global__ void __launch_bounds__(kThreads) tps_solve_backward_kernel(AnyIn src, Strides3 ss, AnyIn dst, Strides3 ds,
                                                                      AnyIn grad_params, Strides3 gs, AnyOut grad_src,
                                                                      AnyOut grad_dst, int64_t B, int n, double reg,
                                                                      double* __restrict__ workspace) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= B) return;
  const int64_t o = b * int64_t(n) * 2;
  if constexpr (NMAX > 0) {
    TpsFixedStore<NMAX, 4> store;
    tps_solve_backward_item<NMAX>(store, src.offset(b * ss.b), ss.i, ss.c, dst.offset(b * ds.b), ds.i, ds.c,
                                  grad_params.offset(b * gs.b), gs.i, gs.c, n, reg, grad_src.offset(o),
                                  grad_dst.offset(o));
  } else {
    TpsPtrStore<4> store(workspace + b * tps_workspace_size(n, 4), n);
    tps_solve_backward_item<0>(store, src.offset(b * ss.b), ss.i, ss.c, dst.offset(b * ds.b), ds.i, ds.c,
                               grad_params.offset(b * gs.b), gs.i, gs.c, n, reg, grad_src.offset(o), grad_dst.offset(o));
  }
}

int blocks_for(int64_t B) { return static_cast<int>((B + kThreads - 1) / kThreads); }

// Launches `launch(NMAX_tag, workspace)` with the storage tier of n.
template <int R, typename F> void with_tier(const at::Tensor& like, int64_t B, int n, const F& launch) {
  if (n <= kTpsSmallN) {
    launch(std::integral_constant<int, kTpsSmallN + 3>{}, static_cast<double*>(nullptr));
  } else {
    at::Tensor ws = at::empty({B, tps_workspace_size(n, R)}, like.options().dtype(at::kDouble));
    launch(std::integral_constant<int, 0>{}, static_cast<double*>(ws.data_ptr()));
  }
}

at::Tensor tps_solve_cuda(const at::Tensor& src_in, const at::Tensor& dst_in, double reg, bool check_singular) {
  check_tps_solve_args(src_in, dst_in, reg, kOp);
  c10::cuda::CUDAGuard guard(src_in.device());
  const auto out_dtype = tps_compute_dtype({src_in.scalar_type(), dst_in.scalar_type()});
  // src and dst are read with their own dtypes and strides: no copies.
  const at::Tensor& src = src_in;
  const at::Tensor& dst = dst_in;
  const int64_t B = src.size(0);
  const int n = static_cast<int>(src.size(1));
  auto params = at::empty({B, n + 3, 2}, src.options().dtype(out_dtype));
  if (B == 0) return params;
  // check_singular: the kernel writes the "any singular" flag straight into pinned host memory (mapped
  // into the device's address space), so the check costs one stream synchronization and no memset or
  // copy on the stream (each a launch on the path of a latency-bound op).
  at::Tensor status, flag;
  int* flag_device = nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (check_singular) {
    status = at::empty({B}, src.options().dtype(at::kChar));
    flag = at::empty({1}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
    *flag.mutable_data_ptr<int>() = 0;
    void* mapped = nullptr;  // the same address with unified addressing (every 64-bit platform)
    C10_CUDA_CHECK(cudaHostGetDevicePointer(&mapped, flag.mutable_data_ptr<int>(), 0));
    flag_device = static_cast<int*>(mapped);
  }
  with_tier<2>(src, B, n, [&](auto tier, double* ws) {
    constexpr int NMAX = decltype(tier)::value;
    tps_solve_kernel<NMAX><<<blocks_for(B), kThreads, 0, stream>>>(
        any_in(src), strides_of(src), any_in(dst), strides_of(dst), any_out(params),
        check_singular ? status.mutable_data_ptr<int8_t>() : nullptr,
        flag_device, B, n, reg, ws);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (check_singular) {
    // The one host synchronization, asked for by check_singular=True; the per-item status is copied
    // only to name the singular items.
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
    if (*static_cast<volatile const int*>(flag.const_data_ptr<int>()) != 0) {
      const auto host = status.cpu();
      tps_raise_if_singular(host.const_data_ptr<int8_t>(), B);
    }
  }
  return params;
}

std::tuple<at::Tensor, at::Tensor> tps_solve_backward_cuda(const at::Tensor& grad_params, const at::Tensor& src_in,
                                                           const at::Tensor& dst_in, const at::Tensor& params,
                                                           double reg, std::array<bool, 2> output_mask) {
  const char* op = "_tps_solve_backward";
  check_tps_solve_args(src_in, dst_in, reg, op);
  check_tps_params_args(src_in, grad_params, src_in.size(0), op, "grad_params");
  check_tps_params_args(src_in, params, src_in.size(0), op);
  c10::cuda::CUDAGuard guard(src_in.device());
  const int64_t B = src_in.size(0);
  const int n = static_cast<int>(src_in.size(1));
  at::Tensor grad_src = output_mask[0] ? at::empty({B, n, 2}, src_in.options()) : at::empty({0}, src_in.options());
  at::Tensor grad_dst = output_mask[1] ? at::empty({B, n, 2}, dst_in.options()) : at::empty({0}, dst_in.options());
  if (B == 0 || !(output_mask[0] || output_mask[1])) return {grad_src, grad_dst};

  const at::Tensor& src = src_in;
  const at::Tensor& dst = dst_in;
  auto stream = c10::cuda::getCurrentCUDAStream();
  // grad_params in the output dtype of the forward (no copy in the usual case).
  const auto gparams = grad_params.to(tps_compute_dtype({src.scalar_type(), dst.scalar_type()}));
  with_tier<4>(src, B, n, [&](auto tier, double* ws) {
    constexpr int NMAX = decltype(tier)::value;
    tps_solve_backward_kernel<NMAX><<<blocks_for(B), kThreads, 0, stream>>>(
        any_in(src), strides_of(src), any_in(dst), strides_of(dst), any_in(gparams), strides_of(gparams),
        output_mask[0] ? any_out(grad_src) : no_out(), output_mask[1] ? any_out(grad_dst) : no_out(), B, n, reg, ws);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_src, grad_dst};
}

}  // namespace

TORCH_LIBRARY_IMPL(tpswarp, CUDA, m) {
  m.impl("tps_solve", &tps_solve_cuda);
  m.impl("_tps_solve_backward", &tps_solve_backward_cuda);
}

}  // namespace tpswarp
