// CUDA kernels of tpswarp::tps_warp and its backward: the sample grid computed on the fly (never
// stored) with the GPU form of the TPS of tpswarp/tps.h (tps_eval_fast: hardware log2), sampled with
// tpswarp/sampling.h (the math the CPU kernels and tests use). Forward: two output pixels per thread
// (for_each_forward_pixel); backward: one pixel at a time, each thread striding over several.
//
// Backward:
// - image gradient: scatter-add with atomicAdd into a buffer of the compute dtype. The order of
//   the atomic additions varies between runs, so this part is NOT deterministic; under
//   torch.use_deterministic_algorithms(True) each output pixel writes its taps' rows and
//   contributions instead (image_grad_slots_kernel, 4 x B x Ho x Wo x C values) and at::index_add_
//   (deterministic in that mode) sums them.
// - src / params gradients: deterministic. Each thread sums its pixels' terms in registers
//   (tpswarp/tps_grad_regs.cuh, n <= 16 control points; the grid is capped so that a thread has
//   several pixels), each block reduces its threads with a fixed tree (warp shuffles, then the warps
//   in order) into a partial buffer (B, blocks, P), which at::sum reduces over the blocks.
//   More than 16 control points: one pixel per thread and a block reduction per control point.
//   No host synchronization.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "tpswarp/sampling.h"
#include "tpswarp/show.h"
#include "tpswarp/tps.h"
#include "tpswarp/tps_grad_regs.cuh"
#include "tpswarp/warp_args.h"

namespace tpswarp {
namespace {

constexpr const char* kOp = "tps_warp";
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStrideBlocks = 2048;  // blocks of the backward kernel in all, about (see tps_warp_backward_cuda)

template <typename acc> struct GeoArgs {
  int64_t B, C, H, W, Ho, Wo, n;
  Padding padding;
  bool align_corners;
  const acc* src;     // (B, n, 2) contiguous
  const acc* params;  // (B, n + 3, 2) contiguous
};

template <typename acc> GeoArgs<acc> geo_args(const WarpConfig& cfg, const at::Tensor& src, const at::Tensor& params) {
  return {cfg.B, cfg.C, cfg.H, cfg.W, cfg.Ho, cfg.Wo, cfg.n, cfg.padding, cfg.align_corners,
          src.const_data_ptr<acc>(), params.const_data_ptr<acc>()};
}

// Forward: blocks of kTileW x kTileH threads; a thread computes ROWS pixels of one output column,
// kTileH rows apart, with one pass over the control points (tps_eval_fast_points: each point loaded
// once for them all). Grid (ceil(Wo / kTileW), min(ceil(Ho / (kTileH ROWS)), 65535), min(B, 65535)),
// the last two striding. Rows and columns are 32-bit (the host checks Ho Wo <= INT_MAX); a 1-D grid's
// p / Wo cost ~25 instructions per pixel. body(b, i, j, f) handles pixel (i, j) of item b, TPS value f.
// ROWS is 2 (the bilinear kernel: 1 with TPSWARP_CUDA_WARP_ROWS=1, an A/B switch for benchmarks).
constexpr int kTileW = 32, kTileH = 8;

inline int forward_rows() {
  const char* v = std::getenv("TPSWARP_CUDA_WARP_ROWS");  // read at each launch
  return v != nullptr && v[0] == '1' && v[1] == '\0' ? 1 : 2;
}

template <int ROWS, typename acc, typename Body>
__device__ __forceinline__ void for_each_forward_pixel(const GeoArgs<acc>& g, Body&& body) {
  constexpr int kBlockRows = kTileH * ROWS;
  const int Ho = static_cast<int>(g.Ho), n = static_cast<int>(g.n);
  const int j = blockIdx.x * kTileW + threadIdx.x;
  if (j >= g.Wo) return;
  acc qx[ROWS], qy[ROWS];
  const acc qxj = pixel_to_normalized_gpu_form<acc>(j, g.Wo, g.align_corners);
  for (int64_t b = blockIdx.z; b < g.B; b += gridDim.z) {
    const acc* src = g.src + b * 2 * g.n;
    const acc* params = g.params + b * 2 * (g.n + 3);
    for (int64_t i0 = blockIdx.y * kBlockRows + threadIdx.y; i0 < Ho; i0 += int64_t(gridDim.y) * kBlockRows) {
#pragma unroll
      for (int k = 0; k < ROWS; ++k) {
        qx[k] = qxj;  // rows past the end repeat the last one, and are skipped below
        qy[k] = pixel_to_normalized_gpu_form<acc>(min_<int64_t>(i0 + k * kTileH, Ho - 1), g.Ho, g.align_corners);
      }
      Vec2<acc> f[ROWS];
      tps_eval_fast_points<ROWS>(qx, qy, src, params, n, f);
#pragma unroll
      for (int k = 0; k < ROWS; ++k) {
        if (i0 + k * kTileH < Ho) body(b, static_cast<int>(i0 + k * kTileH), j, f[k]);
      }
    }
  }
}

dim3 forward_grid(const WarpConfig& cfg, int rows) {
  const int64_t block_rows = kTileH * rows;
  return dim3(static_cast<unsigned>((cfg.Wo + kTileW - 1) / kTileW),
              static_cast<unsigned>(std::min<int64_t>((cfg.Ho + block_rows - 1) / block_rows, 65535)),
              static_cast<unsigned>(std::min<int64_t>(cfg.B, 65535)));
}

template <typename scalar_t, typename acc, int ROWS>
__global__ void __launch_bounds__(kTileW * kTileH)
    forward_bilinear_kernel(GeoArgs<acc> g, const scalar_t* __restrict__ image, Strides4 is, scalar_t* __restrict__ out,
                            Strides4 os, bool* __restrict__ valid, acc fill, bool plane32) {
  for_each_forward_pixel<ROWS>(g, [&](int64_t b, int i, int j, Vec2<acc> f) {
    valid[(b * g.Ho + i) * g.Wo + j] = in_pixel_hull(f.x, f.y, g.H, g.W, g.align_corners);
    const acc px = source_coordinate(f.x, g.W, g.padding, g.align_corners);
    const acc py = source_coordinate(f.y, g.H, g.padding, g.align_corners);
    const auto tap = bilinear_tap(px, py, g.H, g.W);
    // fill (1 - sum_k w_k) + sum_k w_k v_k: bilinear_combine's fill + sum_k w_k (v_k - fill), up to
    // rounding (exactly for fill = 0), with the fill term formed once per pixel.
    const scalar_t* img = image + b * is.b;
    auto taps = plane32 ? BilinearTapPointers<scalar_t, acc>(img, static_cast<int>(is.h), static_cast<int>(is.w), tap)
                        : BilinearTapPointers<scalar_t, acc>(img, is.h, is.w, tap);
    const acc rest = fill * taps.rest_weight();
    scalar_t* o = out + b * os.b + i * os.h + j * os.w;
    for (int64_t c = 0; c < g.C; ++c, taps.advance(is.c), o += os.c) *o = static_cast<scalar_t>(taps.value() + rest);
  });
}

// Nearest sampling copies elements: raw_t is an unsigned type of the image's element size. Grid as above.
template <typename raw_t, typename acc>
__global__ void __launch_bounds__(kTileW * kTileH)
    forward_nearest_kernel(GeoArgs<acc> g, const raw_t* __restrict__ image, Strides4 is, raw_t* __restrict__ out,
                           Strides4 os, bool* __restrict__ valid, raw_t fill) {
  for_each_forward_pixel<2>(g, [&](int64_t b, int i, int j, Vec2<acc> f) {
    valid[(b * g.Ho + i) * g.Wo + j] = in_pixel_hull(f.x, f.y, g.H, g.W, g.align_corners);
    const acc px = source_coordinate(f.x, g.W, g.padding, g.align_corners);
    const acc py = source_coordinate(f.y, g.H, g.padding, g.align_corners);
    const NearestTap tap = nearest_tap(px, py, g.H, g.W);
    const raw_t* img = image + b * is.b + tap.y * is.h + tap.x * is.w;
    raw_t* o = out + b * os.b + i * os.h + j * os.w;
    for (int64_t c = 0; c < g.C; ++c) o[c * os.c] = tap.inside ? img[c * is.c] : fill;
  });
}

// The image gradient under torch.use_deterministic_algorithms(True): instead of the atomics of
// pixel_backward, output pixel p of item b writes the image rows its taps read (rows[k][b Ho Wo + p]:
// b H W + y W + x, or B H W for a tap outside the image) and their contributions (contrib[k][b Ho Wo +
// p][c] = w_k grad_out[b, c, p]), k < 4 taps (1 in nearest mode); at::index_add_, deterministic in that
// mode, sums them per image pixel. Grid as backward_kernel's.
template <typename scalar_t, typename acc>
__global__ void __launch_bounds__(kThreads)
    image_grad_slots_kernel(GeoArgs<acc> g, Interp mode, const scalar_t* __restrict__ grad_out, Strides4 gs,
                            int64_t* __restrict__ rows, acc* __restrict__ contrib) {
  const int npix = static_cast<int>(g.Ho * g.Wo), Wo = static_cast<int>(g.Wo);
  const int64_t slots = g.B * g.Ho * g.Wo, dropped = g.B * g.H * g.W, n = g.n;
  for (int64_t b = blockIdx.y; b < g.B; b += gridDim.y) {
    const int64_t base = b * g.H * g.W;
    for (int p = blockIdx.x * kThreads + threadIdx.x; p < npix; p += gridDim.x * kThreads) {
      const int i = p / Wo, j = p - i * Wo;
      const acc qx = pixel_to_normalized<acc>(j, g.Wo, g.align_corners);
      const acc qy = pixel_to_normalized<acc>(i, g.Ho, g.align_corners);
      const auto f = tps_eval_fast<acc>(qx, qy, g.src + b * 2 * n, g.params + b * 2 * (n + 3), static_cast<int>(n));
      const acc px = source_coordinate(f.x, g.W, g.padding, g.align_corners);
      const acc py = source_coordinate(f.y, g.H, g.padding, g.align_corners);
      const scalar_t* go = grad_out + b * gs.b + i * gs.h + j * gs.w;
      const int64_t slot = b * npix + p;
      if (mode == Interp::Nearest) {
        const NearestTap tap = nearest_tap(px, py, g.H, g.W);
        rows[slot] = tap.inside ? base + tap.y * g.W + tap.x : dropped;
        acc* cp = contrib + slot * g.C;
        for (int64_t c = 0; c < g.C; ++c) cp[c] = tap.inside ? static_cast<acc>(go[c * gs.c]) : acc(0);
        continue;
      }
      const auto tap = bilinear_tap(px, py, g.H, g.W);
      const int64_t r[4] = {tap.in00 ? base + tap.y0 * g.W + tap.x0 : dropped,
                            tap.in10 ? base + tap.y0 * g.W + tap.x1 : dropped,
                            tap.in01 ? base + tap.y1 * g.W + tap.x0 : dropped,
                            tap.in11 ? base + tap.y1 * g.W + tap.x1 : dropped};
      const acc w[4] = {tap.w00, tap.w10, tap.w01, tap.w11};
#pragma unroll
      for (int k = 0; k < 4; ++k) rows[k * slots + slot] = r[k];
      for (int64_t c = 0; c < g.C; ++c) {
        const acc gc = static_cast<acc>(go[c * gs.c]);
#pragma unroll
        for (int k = 0; k < 4; ++k) contrib[(k * slots + slot) * g.C + c] = gc * w[k];
      }
    }
  }
}

// Sum of K values over the block (fixed tree: deterministic); the result is valid in thread 0.
// `shared` holds kWarps * K values; the block must be kThreads threads, all of them calling.
template <typename acc, int K> __device__ inline void block_sum(acc (&v)[K], acc* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) shared[warp * K + k] = v[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      acc s = shared[k];
      for (int w = 1; w < kWarps; ++w) s += shared[w * K + k];
      v[k] = s;
    }
  }
  __syncthreads();  // `shared` may be reused right after
}

// One output pixel p of item b: scatters its image gradient (grad_image non-null) and returns the
// gradient w.r.t. its TPS value f(q) (zero unless want_coord, which requires bilinear mode).
template <typename scalar_t, typename acc>
__device__ __forceinline__ Vec2<acc> pixel_backward(const GeoArgs<acc>& g, Interp mode,
                                                    const scalar_t* __restrict__ image, const Strides4& is,
                                                    const scalar_t* __restrict__ grad_out, const Strides4& gs,
                                                    acc* grad_image, const Strides4& gis, bool want_coord, acc fill,
                                                    int64_t b, int64_t i, int64_t j, acc qx, acc qy) {
  const int64_t n = g.n;
  const auto f = tps_eval_fast<acc>(qx, qy, g.src + b * 2 * n, g.params + b * 2 * (n + 3), static_cast<int>(n));
  const scalar_t* go = grad_out + b * gs.b + i * gs.h + j * gs.w;
  if (mode == Interp::Nearest) {
    if (grad_image) {
      const acc px = source_coordinate(f.x, g.W, g.padding, g.align_corners);
      const acc py = source_coordinate(f.y, g.H, g.padding, g.align_corners);
      const NearestTap tap = nearest_tap(px, py, g.H, g.W);
      if (tap.inside) {
        acc* gp = grad_image + b * gis.b + tap.y * gis.h + tap.x * gis.w;
        for (int64_t c = 0; c < g.C; ++c) atomicAdd(gp + c * gis.c, static_cast<acc>(go[c * gs.c]));
      }
    }
    return {acc(0), acc(0)};
  }
  acc dpx = 0, dpy = 0;
  const acc px = source_coordinate(f.x, g.W, g.padding, g.align_corners, &dpx);
  const acc py = source_coordinate(f.y, g.H, g.padding, g.align_corners, &dpy);
  const auto tap = bilinear_tap(px, py, g.H, g.W);
  const scalar_t* img = image + b * is.b;
  acc gpx = 0, gpy = 0;
  for (int64_t c = 0; c < g.C; ++c) {
    const acc gc = static_cast<acc>(go[c * gs.c]);
    if (want_coord) {
      const auto d = bilinear_sample_coord_grad(img + c * is.c, is.h, is.w, tap, fill, gc);
      gpx += d.x;
      gpy += d.y;
    }
    if (grad_image) {
      acc* gp = grad_image + b * gis.b + c * gis.c;
      bilinear_scatter(tap, gis.h, gis.w, gc, [gp](int64_t off, acc value) { atomicAdd(gp + off, value); });
    }
  }
  return {gpx * dpx, gpy * dpy};
}

// grid (blocks per batch item, min(B, 65535)), kThreads threads, each thread striding over the
// item's pixels. `grad_image` (compute dtype, strides gis) is null when not requested. NPTS > 0:
// the TPS gradients of at most NPTS control points are requested (bilinear mode), summed in
// registers over the thread's pixels and reduced once per block into `partials` (B, gridDim.x, P).
template <typename scalar_t, typename acc, int NPTS>
__global__ void __launch_bounds__(kThreads) backward_kernel(GeoArgs<acc> g, Interp mode, const scalar_t* __restrict__ image,
                                                            Strides4 is, const scalar_t* __restrict__ grad_out, Strides4 gs,
                                                            acc* grad_image, Strides4 gis, acc* __restrict__ partials,
                                                            int64_t P, acc fill) {
  const int npix = static_cast<int>(g.Ho * g.Wo), Wo = static_cast<int>(g.Wo), n = static_cast<int>(g.n);
  for (int64_t b = blockIdx.y; b < g.B; b += gridDim.y) {
    TpsGradRegs<acc, (NPTS > 0 ? NPTS : 1)> tps_grads;
    for (int p = blockIdx.x * kThreads + threadIdx.x; p < npix; p += gridDim.x * kThreads) {
      const int i = p / Wo, j = p - i * Wo;
      const acc qx = pixel_to_normalized<acc>(j, g.Wo, g.align_corners);
      const acc qy = pixel_to_normalized<acc>(i, g.Ho, g.align_corners);
      const auto gf = pixel_backward<scalar_t, acc>(g, mode, image, is, grad_out, gs, grad_image, gis, NPTS > 0, fill,
                                                    b, i, j, qx, qy);
      if constexpr (NPTS > 0) tps_grads.add(qx, qy, g.src + b * 2 * n, g.params + b * 2 * (n + 3), n, gf);
    }
    if constexpr (NPTS > 0) {
      __shared__ acc shared[kWarps * TpsGradRegs<acc, NPTS>::kLen];
      tps_grads.store_block_sum(shared, partials + (b * gridDim.x + blockIdx.x) * P, n);
    }
  }
}

// The TPS gradients for more than kTpsGradMaxPoints control points: one pixel per thread, a block
// reduction per control point (grid: one block per kThreads pixels of an item).
template <typename scalar_t, typename acc>
__global__ void __launch_bounds__(kThreads)
    backward_many_points_kernel(GeoArgs<acc> g, Interp mode, const scalar_t* __restrict__ image, Strides4 is,
                                const scalar_t* __restrict__ grad_out, Strides4 gs, acc* grad_image, Strides4 gis,
                                acc* __restrict__ partials, int64_t P, acc fill) {
  __shared__ acc shared[kWarps * 6];
  const int64_t npix = g.Ho * g.Wo, n = g.n;
  const int64_t p = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  const bool active = p < npix;
  const int64_t i = active ? p / g.Wo : 0, j = active ? p % g.Wo : 0;
  const acc qx = pixel_to_normalized<acc>(j, g.Wo, g.align_corners);
  const acc qy = pixel_to_normalized<acc>(i, g.Ho, g.align_corners);
  for (int64_t b = blockIdx.y; b < g.B; b += gridDim.y) {
    const acc* src = g.src + b * 2 * n;
    const acc* params = g.params + b * 2 * (n + 3);
    Vec2<acc> gf{acc(0), acc(0)};
    if (active)
      gf = pixel_backward<scalar_t, acc>(g, mode, image, is, grad_out, gs, grad_image, gis, true, fill, b, i, j, qx,
                                         qy);
    const acc gfx = gf.x, gfy = gf.y;
    acc* part = partials + (b * gridDim.x + blockIdx.x) * P;  // grad src [0, 2n), grad params [2n, P)
    {
      acc v[6] = {gfx, gfy, gfx * qx, gfy * qx, gfx * qy, gfy * qy};
      block_sum(v, shared);
      if (threadIdx.x == 0) {
        for (int k = 0; k < 6; ++k) part[2 * n + 2 * n + k] = v[k];
      }
    }
    for (int64_t c = 0; c < n; ++c) {
      Vec2<acc> unused{acc(0), acc(0)};
      const auto r = tps_radial_backward_fast<acc>(qx, qy, src[2 * c], src[2 * c + 1], params[2 * c],
                                                   params[2 * c + 1], gf, unused);
      acc v[4] = {r.w_x, r.w_y, r.src_x, r.src_y};
      block_sum(v, shared);
      if (threadIdx.x == 0) {
        part[2 * n + 2 * c] = v[0];
        part[2 * n + 2 * c + 1] = v[1];
        part[2 * c] = v[2];
        part[2 * c + 1] = v[3];
      }
    }
  }
}

template <typename F> void dispatch_compute(at::ScalarType ct, F&& f) {
  if (ct == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

std::tuple<at::Tensor, at::Tensor> tps_warp_cuda(const at::Tensor& image, const at::Tensor& src, const at::Tensor& params,
                                                 c10::string_view mode, c10::string_view padding_mode,
                                                 bool align_corners, double fill, at::OptionalIntArrayRef size) {
  const WarpConfig cfg = warp_config(image, src, params, mode, padding_mode, align_corners, fill, size, kOp);
  c10::cuda::CUDAGuard guard(image.device());
  const auto ct = warp_compute_dtype(image, src, params);
  auto out = at::empty({cfg.B, cfg.C, cfg.Ho, cfg.Wo}, image.options().memory_format(warp_memory_format(image)));
  auto valid = at::empty({cfg.B, 1, cfg.Ho, cfg.Wo}, image.options().dtype(at::kBool));
  const int64_t total = valid.numel();
  if (total == 0) return {out, valid};
  TORCH_CHECK_VALUE(cfg.Ho * cfg.Wo <= std::numeric_limits<int>::max(), kOp, ": output too large (", show(cfg.Ho),
                    " x ", show(cfg.Wo), " pixels per image; the CUDA kernels index pixels in 32 bits)");
  const uint64_t fill_raw = cfg.mode == Interp::Nearest ? warp_fill_bits(fill, image.scalar_type()) : 0;
  const int rows = cfg.mode == Interp::Bilinear ? forward_rows() : 2;
  const dim3 grid = forward_grid(cfg, rows), block(kTileW, kTileH);
  const auto s = src.to(ct).contiguous();
  const auto p = params.to(ct).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const Strides4 is = strides4(image), os = strides4(out);
  dispatch_compute(ct, [&](auto zero) {
    using acc = decltype(zero);
    const auto g = geo_args<acc>(cfg, s, p);
    if (cfg.mode == Interp::Bilinear) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "tps_warp_cuda", [&] {
        auto kernel = rows == 1 ? forward_bilinear_kernel<scalar_t, acc, 1>
                                : forward_bilinear_kernel<scalar_t, acc, 2>;
        kernel<<<grid, block, 0, stream>>>(g, image.const_data_ptr<scalar_t>(), is, out.mutable_data_ptr<scalar_t>(),
                                           os, valid.mutable_data_ptr<bool>(), static_cast<acc>(fill),
                                           plane_offsets_fit_int(cfg.H, cfg.W, is.h, is.w));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      auto launch = [&](auto raw_zero) {
        using raw_t = decltype(raw_zero);
        raw_t fill_value;
        std::memcpy(&fill_value, &fill_raw, sizeof(raw_t));
        forward_nearest_kernel<raw_t, acc><<<grid, block, 0, stream>>>(
            g, static_cast<const raw_t*>(image.const_data_ptr()), is, static_cast<raw_t*>(out.mutable_data_ptr()), os,
            valid.mutable_data_ptr<bool>(), fill_value);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      switch (image.element_size()) {
        case 1: launch(uint8_t{}); break;
        case 2: launch(uint16_t{}); break;
        case 4: launch(uint32_t{}); break;
        case 8: launch(uint64_t{}); break;
        default: TORCH_CHECK_TYPE(false, kOp, ": unsupported `image` dtype ", image.scalar_type());
      }
    }
  });
  return {out, valid};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tps_warp_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& image, const at::Tensor& src, const at::Tensor& params,
    c10::string_view mode, c10::string_view padding_mode, bool align_corners, double fill,
    at::OptionalIntArrayRef size, std::array<bool, 3> output_mask) {
  const WarpConfig cfg = warp_config(image, src, params, mode, padding_mode, align_corners, fill, size, kOp);
  c10::cuda::CUDAGuard guard(image.device());
  TORCH_CHECK_VALUE(grad_out_in.dim() == 4 && grad_out_in.size(0) == cfg.B && grad_out_in.size(1) == cfg.C &&
                        grad_out_in.size(2) == cfg.Ho && grad_out_in.size(3) == cfg.Wo,
                    kOp, ": `grad_out` must have shape (", show(cfg.B), ", ", show(cfg.C), ", ", show(cfg.Ho), ", ",
                    show(cfg.Wo), "), got ", show(grad_out_in.sizes()));
  TORCH_CHECK(grad_out_in.device() == image.device(), kOp, ": `grad_out` is on ", grad_out_in.device(),
              " but `image` is on ", image.device());
  TORCH_CHECK_TYPE(!output_mask[0] || at::isFloatingType(image.scalar_type()), kOp,
                   ": no gradient w.r.t. an `image` of dtype ", image.scalar_type());
  const bool need_image = output_mask[0];
  const bool need_tps = output_mask[1] || output_mask[2];
  const bool need_coord = need_tps && cfg.mode == Interp::Bilinear;  // nearest: zero TPS gradients
  // The image gradient is a scatter: with atomicAdd (its summation order varies between runs), or under
  // torch.use_deterministic_algorithms(True) through image_grad_slots_kernel and at::index_add_.
  const bool slot_image = need_image && at::globalContext().deterministicAlgorithms();
  const auto ct = warp_compute_dtype(image, src, params);
  const auto fmt = warp_memory_format(image);
  const int64_t P = tps_grad_width(cfg.n);
  const int64_t npix = cfg.Ho * cfg.Wo;
  const bool many_points = need_coord && cfg.n > kTpsGradMaxPoints;
  // Blocks per item: one per kThreads pixels for the many-points kernel; else about kStrideBlocks in all,
  // each thread striding over several pixels (depends on the shape only: deterministic partials).
  const int64_t pixel_blocks = (npix + kThreads - 1) / kThreads;
  const int64_t blocks = many_points ? pixel_blocks
                                     : std::max<int64_t>(1, std::min<int64_t>(pixel_blocks, kStrideBlocks / cfg.B));

  at::Tensor grad_acc;
  if (need_image) grad_acc = at::empty(image.sizes(), image.options().dtype(ct), fmt).zero_();
  at::Tensor total;
  if (need_tps) total = at::zeros({cfg.B, P}, src.options().dtype(ct));

  at::Tensor slot_rows, slot_contrib;  // slot_image: (taps, B Ho Wo) image rows, (taps, B Ho Wo, C) contributions
  const bool work = cfg.B * npix > 0 && cfg.C > 0 && (need_image || need_coord);
  if (work) {
    TORCH_CHECK_VALUE(npix <= std::numeric_limits<int>::max() - int64_t(kStrideBlocks) * kThreads, kOp,
                      ": output too large (", show(cfg.Ho), " x ", show(cfg.Wo),
                      " pixels per image; the CUDA kernels index pixels in 32 bits)");
    const auto grad_out = grad_out_in.scalar_type() == image.scalar_type() ? grad_out_in : grad_out_in.to(image.scalar_type());
    const auto s = src.to(ct).contiguous();
    const auto p = params.to(ct).contiguous();
    at::Tensor partials;
    if (need_coord) partials = at::empty({cfg.B, blocks, P}, src.options().dtype(ct));
    auto stream = c10::cuda::getCurrentCUDAStream();
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(std::min<int64_t>(cfg.B, 65535)));
    dispatch_compute(ct, [&](auto zero) {
      using acc = decltype(zero);
      const auto g = geo_args<acc>(cfg, s, p);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "tps_warp_backward_cuda", [&] {
        const bool atomic_image = need_image && !slot_image;
        auto launch = [&](auto kernel) {
          kernel<<<grid, kThreads, 0, stream>>>(
              g, cfg.mode, image.const_data_ptr<scalar_t>(), strides4(image), grad_out.const_data_ptr<scalar_t>(),
              strides4(grad_out), atomic_image ? grad_acc.mutable_data_ptr<acc>() : nullptr,
              atomic_image ? strides4(grad_acc) : Strides4{0, 0, 0, 0},
              need_coord ? partials.mutable_data_ptr<acc>() : nullptr, P, static_cast<acc>(fill));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if (slot_image) {
          const int64_t taps = cfg.mode == Interp::Bilinear ? 4 : 1;
          slot_rows = at::empty({taps, cfg.B * npix}, src.options().dtype(at::kLong));
          slot_contrib = at::empty({taps, cfg.B * npix, cfg.C}, src.options().dtype(ct));
          image_grad_slots_kernel<scalar_t, acc><<<grid, kThreads, 0, stream>>>(
              g, cfg.mode, grad_out.const_data_ptr<scalar_t>(), strides4(grad_out),
              slot_rows.mutable_data_ptr<int64_t>(), slot_contrib.mutable_data_ptr<acc>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if (!need_coord) {
          if (atomic_image) launch(backward_kernel<scalar_t, acc, 0>);
        } else if (many_points) {
          launch(backward_many_points_kernel<scalar_t, acc>);
        } else {
          dispatch_tps_grad_points(cfg.n, [&](auto points) {
            launch(backward_kernel<scalar_t, acc, decltype(points)::value>);
          });
        }
      });
    });
    if (need_coord) total = partials.sum(1);  // a fixed reduction of the blocks' rows (no atomics)
    if (slot_image) {
      const int64_t rows = cfg.B * cfg.H * cfg.W;
      auto summed = at::zeros({rows + 1, cfg.C}, slot_contrib.options());
      summed.index_add_(0, slot_rows.view({-1}), slot_contrib.view({-1, cfg.C}));  // deterministic in this mode
      grad_acc.copy_(summed.narrow(0, 0, rows).view({cfg.B, cfg.H, cfg.W, cfg.C}).permute({0, 3, 1, 2}));
    }
  }

  at::Tensor grad_image = at::empty({0}, image.options());
  if (need_image) grad_image = grad_acc.scalar_type() == image.scalar_type() ? grad_acc : grad_acc.to(image.scalar_type(), false, false, at::MemoryFormat::Preserve);
  at::Tensor grad_src = at::empty({0}, src.options()), grad_params = at::empty({0}, params.options());
  const int64_t n = cfg.n;
  if (output_mask[1]) grad_src = total.narrow(1, 0, 2 * n).reshape({cfg.B, n, 2}).to(src.scalar_type()).contiguous();
  if (output_mask[2]) {
    grad_params = total.narrow(1, 2 * n, 2 * (n + 3)).reshape({cfg.B, n + 3, 2}).to(params.scalar_type()).contiguous();
  }
  return {grad_image, grad_src, grad_params};
}

}  // namespace

TORCH_LIBRARY_IMPL(tpswarp, CUDA, m) {
  m.impl("tps_warp", &tps_warp_cuda);
  m.impl("_tps_warp_backward", &tps_warp_backward_cuda);
}

}  // namespace tpswarp
