// Gradients of a TPS map w.r.t. its control points and parameters, summed over many pixels on the
// GPU: each thread accumulates its pixels' terms in registers, then the block reduces once.
//
// The accumulators are an array of compile-time size (MAXN control points at most, every loop over
// [0, MAXN) with a guard i < n), so after unrolling every index is a constant and the array stays in
// registers: a runtime-indexed array goes to local memory (the CUDA warped_kl_div backward had a
// 280-byte stack frame that way), and a block reduction per control point per pixel (the CUDA
// tps_warp backward) costs two barriers per point for every 256 pixels. Used by the backward
// kernels of tps_warp and warped_kl_div (CUDA only: the CPU kernels accumulate per thread in memory).
#pragma once

#include <cstdint>
#include <type_traits>

#include "tpswarp/tps.h"

namespace tpswarp {

// The largest control-point count served by the register accumulators.
constexpr int kTpsGradMaxPoints = 16;

// Gradient of sum over pixels of <g, f(q)>: v = [d/d src (MAXN, 2) | d/d W (MAXN, 2) | d/d A (3, 2)].
template <typename acc, int MAXN> struct TpsGradRegs {
  static constexpr int kLen = 4 * MAXN + 6;
  acc v[kLen];

  __device__ __forceinline__ TpsGradRegs() {
#pragma unroll
    for (int k = 0; k < kLen; ++k) v[k] = acc(0);
  }

  // Adds the terms of one pixel (q, upstream gradient g w.r.t. f(q)); src (n, 2), params (n + 3, 2)
  // row-major as in tps.h, n <= MAXN. Returns d<g, f(q)>/dq.
  __device__ __forceinline__ Vec2<acc> add(acc qx, acc qy, const acc* src, const acc* params, int n, Vec2<acc> g) {
    acc gA[6];
    Vec2<acc> gq = tps_affine_backward<acc>(qx, qy, params + 2 * n, g, gA);
#pragma unroll
    for (int k = 0; k < 6; ++k) v[4 * MAXN + k] += gA[k];
#pragma unroll
    for (int i = 0; i < MAXN; ++i) {
      if (i < n) {
        const auto r = tps_radial_backward_fast<acc>(qx, qy, src[2 * i], src[2 * i + 1], params[2 * i],
                                                     params[2 * i + 1], g, gq);
        v[2 * i] += r.src_x;
        v[2 * i + 1] += r.src_y;
        v[2 * MAXN + 2 * i] += r.w_x;
        v[2 * MAXN + 2 * i + 1] += r.w_y;
      }
    }
    return gq;
  }

  // Sums v over the block in a fixed order (warp shuffle tree, then the warps in order: deterministic)
  // and writes the sums to row = [grad src (n, 2) | grad params (n + 3, 2)]. `shared` holds
  // (blockDim.x / 32) * kLen values; blockDim.x a multiple of 32, all threads of the block calling.
  __device__ __forceinline__ void store_block_sum(acc* shared, acc* row, int n) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
    for (int k = 0; k < kLen; ++k) {
      acc x = v[k];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
      if (lane == 0) shared[warp * kLen + k] = x;
    }
    __syncthreads();
    for (int k = threadIdx.x; k < kLen; k += blockDim.x) {
      acc total = 0;
      for (int w = 0; w < warps; ++w) total += shared[w * kLen + k];
      const int part = k < 2 * MAXN ? 0 : k < 4 * MAXN ? 1 : 2, i = part < 2 ? (k - 2 * MAXN * part) / 2 : 0;
      if (part == 2)
        row[4 * n + (k - 4 * MAXN)] = total;  // affine rows n..n+2 of params
      else if (i < n)
        row[2 * n * part + (k - 2 * MAXN * part)] = total;
    }
    __syncthreads();  // `shared` may be reused right after
  }
};

// f(std::integral_constant<int, MAXN>) for the smallest register tier (4: the paper's 2 x 2 grid, or 16)
// holding n control points; returns false (f not called) when n > kTpsGradMaxPoints.
template <typename F> inline bool dispatch_tps_grad_points(int64_t n, F&& f) {
  if (n <= 4) {
    f(std::integral_constant<int, 4>{});
  } else if (n <= kTpsGradMaxPoints) {
    f(std::integral_constant<int, kTpsGradMaxPoints>{});
  } else {
    return false;
  }
  return true;
}

}  // namespace tpswarp
