// CUDA kernels of tpswarp::photometric_jitter and its backward: one thread per pixel (VEC
// consecutive pixels with 16-byte loads when the layout allows), the per-pixel math of
// tpswarp/hsv.h shared with the CPU kernels.
//
// Layouts: NCHW planes and channels_last (interleaved) images with pixels at flat offsets get
// vectorized loads/stores (VEC = 16 bytes / element size) when the pixel count, the strides and
// the pointers allow; any other strides take the generic one-pixel-per-thread path.
//
// Backward: the image gradient is elementwise; the four parameter gradients are reduced per
// block (warp shuffles, then the warps in order) into a (B, blocks, 4) partial buffer, which a
// second kernel sums per image in a fixed order: deterministic, no atomics, no host sync.
//
// Permutation rows: the CPU kernels raise on a row that is not a permutation of 0, 1, 2. Here
// that check would need a device-to-host copy and a stream synchronization in every forward
// (and would break CUDA graph capture), so it is done on the device instead, without a sync:
// an image whose row is invalid gets NaN outputs (and NaN gradients) instead of an error, and
// nothing is ever read out of bounds. The Python wrapper's shape/dtype checks still apply.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <limits>

#include "tpswarp/hsv.h"
#include "tpswarp/show.h"

namespace tpswarp {
namespace {

constexpr const char* kOp = "photometric_jitter";
constexpr int kThreads = 256;
constexpr int kMaxGridY = 65535;

enum LayoutMode : int { kStrided = 0, kPlanar = 1, kInterleaved = 2 };

struct Strides4 {
  int64_t b, c, h, w;
};
Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

template <typename acc> struct ParamPtrs {
  const acc* brightness;
  const acc* saturation;
  const acc* hue;
  const acc* contrast;
  __device__ __forceinline__ JitterParams<acc> load(int64_t b) const {
    return {brightness[b], saturation[b], hue[b], contrast[b]};
  }
};

template <typename scalar_t, int VEC> struct alignas(sizeof(scalar_t) * VEC) AlignedVec {
  scalar_t v[VEC];
};

// The channel permutation of image b: false (and the identity) when the row is invalid.
__device__ __forceinline__ bool load_perm(const int64_t* perm, int64_t b, int p[3]) {
  if (perm == nullptr) {
    p[0] = 0, p[1] = 1, p[2] = 2;
    return true;
  }
  const int64_t p0 = perm[3 * b], p1 = perm[3 * b + 1], p2 = perm[3 * b + 2];
  const bool ok = is_permutation3(p0, p1, p2);
  p[0] = ok ? int(p0) : 0;
  p[1] = ok ? int(p1) : 1;
  p[2] = ok ? int(p2) : 2;
  return ok;
}

// a[i] for i in {0, 1, 2} without a dynamically indexed (local-memory) array.
template <typename acc> __device__ __forceinline__ acc select3(int i, acc a0, acc a1, acc a2) {
  return i == 0 ? a0 : (i == 1 ? a1 : a2);
}

// Offset of pixel p (row-major within the image) from the image's base.
template <int MODE> __device__ __forceinline__ int64_t pixel_offset(int64_t p, int64_t W, const Strides4& s) {
  if (MODE == kPlanar) return p;
  if (MODE == kInterleaved) return 3 * p;
  const int64_t y = p / W, x = p - y * W;
  return y * s.h + x * s.w;
}

// VEC pixels starting at p0 (VEC > 1 only for the flat layouts, with aligned addresses).
template <typename scalar_t, typename acc, int VEC, int MODE>
__device__ __forceinline__ void load_pixels(const scalar_t* base, const Strides4& s, int64_t p0, int64_t W,
                                            acc (&x)[3][VEC]) {
  if constexpr (VEC == 1) {
    const scalar_t* q = base + pixel_offset<MODE>(p0, W, s);
    const int64_t sc = MODE == kInterleaved ? 1 : s.c;
#pragma unroll
    for (int c = 0; c < 3; ++c) x[c][0] = static_cast<acc>(q[c * sc]);
  } else if constexpr (MODE == kPlanar) {
#pragma unroll
    for (int c = 0; c < 3; ++c) {
      const auto v = *reinterpret_cast<const AlignedVec<scalar_t, VEC>*>(base + c * s.c + p0);
#pragma unroll
      for (int j = 0; j < VEC; ++j) x[c][j] = static_cast<acc>(v.v[j]);
    }
  } else {
    static_assert(MODE == kInterleaved, "vector loads need a flat layout");
    const auto* q = reinterpret_cast<const AlignedVec<scalar_t, VEC>*>(base + 3 * p0);
#pragma unroll
    for (int part = 0; part < 3; ++part) {
      const auto v = q[part];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int e = part * VEC + j;  // element e of the 3 VEC interleaved values
        x[e % 3][e / 3] = static_cast<acc>(v.v[j]);
      }
    }
  }
}

template <typename scalar_t, typename acc, int VEC, int MODE>
__device__ __forceinline__ void store_pixels(scalar_t* base, const Strides4& s, int64_t p0, int64_t W,
                                             const acc (&x)[3][VEC]) {
  if constexpr (VEC == 1) {
    scalar_t* q = base + pixel_offset<MODE>(p0, W, s);
    const int64_t sc = MODE == kInterleaved ? 1 : s.c;
#pragma unroll
    for (int c = 0; c < 3; ++c) q[c * sc] = static_cast<scalar_t>(x[c][0]);
  } else if constexpr (MODE == kPlanar) {
#pragma unroll
    for (int c = 0; c < 3; ++c) {
      AlignedVec<scalar_t, VEC> v;
#pragma unroll
      for (int j = 0; j < VEC; ++j) v.v[j] = static_cast<scalar_t>(x[c][j]);
      *reinterpret_cast<AlignedVec<scalar_t, VEC>*>(base + c * s.c + p0) = v;
    }
  } else {
    static_assert(MODE == kInterleaved, "vector stores need a flat layout");
    auto* q = reinterpret_cast<AlignedVec<scalar_t, VEC>*>(base + 3 * p0);
#pragma unroll
    for (int part = 0; part < 3; ++part) {
      AlignedVec<scalar_t, VEC> v;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int e = part * VEC + j;
        v.v[j] = static_cast<scalar_t>(x[e % 3][e / 3]);
      }
      q[part] = v;
    }
  }
}

// ------------------------------------------------------------------------------------------
// forward
// ------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc, int VEC, int MODE>
__global__ void __launch_bounds__(kThreads) jitter_forward_kernel(const scalar_t* __restrict__ in, Strides4 si,
                                                                  scalar_t* __restrict__ out, Strides4 so,
                                                                  ParamPtrs<acc> params,
                                                                  const int64_t* __restrict__ perm, int64_t B,
                                                                  int64_t HW, int64_t W, bool clamp) {
  const int64_t p0 = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  if (p0 >= HW) return;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const JitterParams<acc> prm = params.load(b);
    int p[3];
    const bool ok = load_perm(perm, b, p);
    acc x[3][VEC];
    load_pixels<scalar_t, acc, VEC, MODE>(in + b * si.b, si, p0, W, x);
    acc y[3][VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc rgb[3];
      jitter_rgb(x[0][j], x[1][j], x[2][j], prm, rgb[0], rgb[1], rgb[2]);
#pragma unroll
      for (int c = 0; c < 3; ++c) {
        const acc v = select3(p[c], rgb[0], rgb[1], rgb[2]);
        y[c][j] = ok ? (clamp ? hsv_clamp01(v) : v) : std::numeric_limits<acc>::quiet_NaN();
      }
    }
    store_pixels<scalar_t, acc, VEC, MODE>(out + b * so.b, so, p0, W, y);
  }
}

// ------------------------------------------------------------------------------------------
// backward
// ------------------------------------------------------------------------------------------
template <typename acc> struct Acc4 {
  acc v[4];
};

// Deterministic sum over the block (fixed shuffle tree, then the warps in order); the result
// is valid in thread 0.
template <typename acc> __device__ __forceinline__ Acc4<acc> block_sum4(Acc4<acc> a) {
  __shared__ acc warp_sums[kThreads / 32][4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) a.v[k] += __shfl_down_sync(0xffffffffu, a.v[k], off);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < 4; ++k) warp_sums[warp][k] = a.v[k];
  }
  __syncthreads();
  Acc4<acc> total{};
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) {
#pragma unroll
      for (int k = 0; k < 4; ++k) total.v[k] += warp_sums[w][k];
    }
  }
  __syncthreads();  // warp_sums may be reused by the next call
  return total;
}

// grad_image (may be null) and, when `partials` is not null, the per-block sums of the
// parameter gradients: partials[(b * gridDim.x + blockIdx.x) * 4 + k].
template <typename scalar_t, typename acc, int VEC, int MODE>
__global__ void __launch_bounds__(kThreads) jitter_backward_kernel(
    const scalar_t* __restrict__ grad_out, Strides4 sg, const scalar_t* __restrict__ in, Strides4 si,
    scalar_t* __restrict__ grad_in, Strides4 sgi, ParamPtrs<acc> params, const int64_t* __restrict__ perm,
    acc* __restrict__ partials, int64_t B, int64_t HW, int64_t W, bool clamp) {
  const int64_t p0 = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  const bool active = p0 < HW;  // every thread stays for the block reduction
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    Acc4<acc> sums{};
    if (active) {
      const JitterParams<acc> prm = params.load(b);
      int p[3];
      const bool ok = load_perm(perm, b, p);
      acc x[3][VEC], go[3][VEC], g[3][VEC];
      load_pixels<scalar_t, acc, VEC, MODE>(in + b * si.b, si, p0, W, x);
      load_pixels<scalar_t, acc, VEC, MODE>(grad_out + b * sg.b, sg, p0, W, go);
      const acc nan = std::numeric_limits<acc>::quiet_NaN();
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        // out[c] = rgb[perm[c]]: the gradient of rgb[perm[c]] is grad_out[c]
        acc grgb[3];
#pragma unroll
        for (int k = 0; k < 3; ++k) grgb[k] = p[0] == k ? go[0][j] : (p[1] == k ? go[1][j] : go[2][j]);
        const auto d = jitter_rgb_vjp(x[0][j], x[1][j], x[2][j], prm, grgb[0], grgb[1], grgb[2], clamp);
        g[0][j] = ok ? d.r : nan;
        g[1][j] = ok ? d.g : nan;
        g[2][j] = ok ? d.b : nan;
        sums.v[0] += d.brightness;
        sums.v[1] += d.saturation;
        sums.v[2] += d.hue;
        sums.v[3] += d.contrast;
      }
      if (!ok) {
#pragma unroll
        for (int k = 0; k < 4; ++k) sums.v[k] = nan;
      }
      if (grad_in != nullptr) store_pixels<scalar_t, acc, VEC, MODE>(grad_in + b * sgi.b, sgi, p0, W, g);
    }
    if (partials != nullptr) {
      const Acc4<acc> total = block_sum4(sums);
      if (threadIdx.x == 0) {
        acc* dst = partials + (b * gridDim.x + blockIdx.x) * 4;
#pragma unroll
        for (int k = 0; k < 4; ++k) dst[k] = total.v[k];
      }
    }
  }
}

// out_k[b] = sum over blocks of partials[b, block, k], in a fixed order: thread t sums blocks
// t, t + kThreads, ... in turn, then block_sum4.
template <typename acc>
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const acc* __restrict__ partials, int64_t B,
                                                                int64_t blocks, acc* __restrict__ out0,
                                                                acc* __restrict__ out1, acc* __restrict__ out2,
                                                                acc* __restrict__ out3) {
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    Acc4<acc> s{};
    for (int64_t i = threadIdx.x; i < blocks; i += kThreads) {
      const acc* src = partials + (b * blocks + i) * 4;
#pragma unroll
      for (int k = 0; k < 4; ++k) s.v[k] += src[k];
    }
    const Acc4<acc> total = block_sum4(s);
    if (threadIdx.x == 0) {
      if (out0) out0[b] = total.v[0];
      if (out1) out1[b] = total.v[1];
      if (out2) out2[b] = total.v[2];
      if (out3) out3[b] = total.v[3];
    }
  }
}

// ------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------
void check_inputs(const at::Tensor& image, const at::Tensor& brightness, const at::Tensor& saturation,
                  const at::Tensor& hue, const at::Tensor& contrast, const std::optional<at::Tensor>& permutation) {
  TORCH_CHECK_TYPE(at::isFloatingType(image.scalar_type()), kOp, ": `image` must have a floating dtype, got ",
                   image.scalar_type());
  TORCH_CHECK_VALUE(image.dim() == 4 && image.size(1) == 3, kOp, ": `image` must have shape (B, 3, H, W) RGB, got ",
                    show(image.sizes()));
  const int64_t B = image.size(0);
  const std::array<std::pair<const char*, const at::Tensor*>, 4> params{
      {{"brightness", &brightness}, {"saturation", &saturation}, {"hue", &hue}, {"contrast", &contrast}}};
  for (const auto& [name, p] : params) {
    TORCH_CHECK_TYPE(at::isFloatingType(p->scalar_type()), kOp, ": `", name, "` must have a floating dtype, got ",
                     p->scalar_type());
    TORCH_CHECK_VALUE(p->dim() == 1 && p->size(0) == B, kOp, ": `", name, "` must have shape (B,) = (", show(B),
                      ",), one value per image, got ", show(p->sizes()));
    TORCH_CHECK(p->device() == image.device(), kOp, ": `", name, "` is on ", p->device(), " but `image` is on ",
                image.device());
  }
  if (permutation.has_value() && permutation->defined()) {
    const auto& perm = *permutation;
    TORCH_CHECK_TYPE(perm.scalar_type() == at::kLong, kOp, ": `permutation` must be int64, got ", perm.scalar_type());
    TORCH_CHECK_VALUE(perm.dim() == 2 && perm.size(0) == B && perm.size(1) == 3, kOp,
                      ": `permutation` must have shape (B, 3) = (", show(B), ", 3), got ", show(perm.sizes()));
    TORCH_CHECK(perm.device() == image.device(), kOp, ": `permutation` is on ", perm.device(), " but `image` is on ",
                image.device());
  }
}

at::MemoryFormat output_format(const at::Tensor& image) {
  return image.is_contiguous(at::MemoryFormat::ChannelsLast) && !image.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                                       : at::MemoryFormat::Contiguous;
}

// Pixels at flat offsets p (planes) or 3 p + c (interleaved) from each image's base.
bool is_planar(const at::Tensor& t) {
  return (t.size(3) == 1 || t.stride(3) == 1) && (t.size(2) == 1 || t.stride(2) == t.size(3));
}
bool is_interleaved(const at::Tensor& t) {
  return t.stride(1) == 1 && (t.size(3) == 1 || t.stride(3) == 3) && (t.size(2) == 1 || t.stride(2) == 3 * t.size(3));
}

// The common flat layout of `ts` (kStrided when none), and whether VEC-wide accesses are
// aligned for all of them.
template <int N> int common_mode(const std::array<const at::Tensor*, N>& ts) {
  bool planar = true, inter = true;
  for (const auto* t : ts) {
    if (t == nullptr) continue;
    planar = planar && is_planar(*t);
    inter = inter && is_interleaved(*t);
  }
  return planar ? kPlanar : (inter ? kInterleaved : kStrided);
}

template <int N> bool vector_ok(const std::array<const at::Tensor*, N>& ts, int mode, int vec, int64_t HW) {
  if (mode == kStrided || HW % vec != 0) return false;
  for (const auto* t : ts) {
    if (t == nullptr) continue;
    const auto addr = reinterpret_cast<uintptr_t>(t->const_data_ptr());
    if (addr % (vec * t->element_size()) != 0) return false;
    if (t->size(0) > 1 && t->stride(0) % vec != 0) return false;
    if (mode == kPlanar && t->stride(1) % vec != 0) return false;
  }
  return true;
}

template <typename acc> ParamPtrs<acc> param_ptrs(const std::array<at::Tensor, 4>& p) {
  return {p[0].const_data_ptr<acc>(), p[1].const_data_ptr<acc>(), p[2].const_data_ptr<acc>(),
          p[3].const_data_ptr<acc>()};
}

dim3 grid_for(int64_t HW, int vec, int64_t B) {
  const int64_t groups = (HW + vec - 1) / vec;
  const int64_t bx = (groups + kThreads - 1) / kThreads;
  TORCH_CHECK(bx <= std::numeric_limits<int>::max(), kOp, ": `image` has too many pixels per image (", show(HW), ")");
  return dim3(static_cast<unsigned>(bx), static_cast<unsigned>(std::min<int64_t>(B, kMaxGridY)));
}

// Launches KERNEL<scalar_t, acc, VEC, MODE> with the VEC / MODE chosen at run time.
#define TPSWARP_JITTER_LAUNCH(KERNEL, MODE_VALUE, USE_VEC, GRID_OF, ...)                               \
  do {                                                                                              \
    constexpr int kVec = 16 / sizeof(scalar_t) >= 1 ? 16 / sizeof(scalar_t) : 1;                    \
    auto stream = c10::cuda::getCurrentCUDAStream();                                                \
    if ((USE_VEC) && (MODE_VALUE) == kPlanar) {                                                     \
      KERNEL<scalar_t, acc, kVec, kPlanar><<<GRID_OF(kVec), kThreads, 0, stream>>>(__VA_ARGS__);    \
    } else if ((USE_VEC) && (MODE_VALUE) == kInterleaved) {                                         \
      KERNEL<scalar_t, acc, kVec, kInterleaved><<<GRID_OF(kVec), kThreads, 0, stream>>>(__VA_ARGS__); \
    } else if ((MODE_VALUE) == kPlanar) {                                                           \
      KERNEL<scalar_t, acc, 1, kPlanar><<<GRID_OF(1), kThreads, 0, stream>>>(__VA_ARGS__);          \
    } else if ((MODE_VALUE) == kInterleaved) {                                                      \
      KERNEL<scalar_t, acc, 1, kInterleaved><<<GRID_OF(1), kThreads, 0, stream>>>(__VA_ARGS__);     \
    } else {                                                                                        \
      KERNEL<scalar_t, acc, 1, kStrided><<<GRID_OF(1), kThreads, 0, stream>>>(__VA_ARGS__);         \
    }                                                                                               \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                 \
  } while (0)

std::array<at::Tensor, 4> params_in(at::ScalarType acc_dtype, const at::Tensor& brightness,
                                    const at::Tensor& saturation, const at::Tensor& hue, const at::Tensor& contrast) {
  return {brightness.to(acc_dtype).contiguous(), saturation.to(acc_dtype).contiguous(), hue.to(acc_dtype).contiguous(),
          contrast.to(acc_dtype).contiguous()};
}

const int64_t* perm_ptr(const std::optional<at::Tensor>& permutation, at::Tensor& holder) {
  if (!permutation.has_value() || !permutation->defined()) return nullptr;
  holder = permutation->contiguous();
  return holder.const_data_ptr<int64_t>();
}

at::Tensor photometric_jitter_cuda(const at::Tensor& image, const at::Tensor& brightness, const at::Tensor& saturation,
                                   const at::Tensor& hue, const at::Tensor& contrast,
                                   const std::optional<at::Tensor>& permutation, bool clamp) {
  check_inputs(image, brightness, saturation, hue, contrast, permutation);
  c10::cuda::CUDAGuard guard(image.device());
  auto out = at::empty(image.sizes(), image.options(), output_format(image));
  if (out.numel() == 0) return out;
  const int64_t B = image.size(0), H = image.size(2), W = image.size(3), HW = H * W;
  const auto acc_dtype = image.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto prm = params_in(acc_dtype, brightness, saturation, hue, contrast);
  at::Tensor perm_holder;
  const int64_t* perm = perm_ptr(permutation, perm_holder);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "photometric_jitter_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const std::array<const at::Tensor*, 2> ts{&image, &out};
    const int mode = common_mode<2>(ts);
    constexpr int vec = 16 / sizeof(scalar_t);
    const bool use_vec = vector_ok<2>(ts, mode, vec, HW);
    const auto grid_of = [&](int v) { return grid_for(HW, v, B); };
    TPSWARP_JITTER_LAUNCH(jitter_forward_kernel, mode, use_vec, grid_of, image.const_data_ptr<scalar_t>(),
                          strides_of(image), out.mutable_data_ptr<scalar_t>(), strides_of(out), param_ptrs<acc>(prm),
                          perm, B, HW, W, clamp);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> photometric_jitter_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& image, const at::Tensor& brightness, const at::Tensor& saturation,
    const at::Tensor& hue, const at::Tensor& contrast, const std::optional<at::Tensor>& permutation, bool clamp,
    std::array<bool, 5> output_mask) {
  check_inputs(image, brightness, saturation, hue, contrast, permutation);
  TORCH_CHECK_VALUE(grad_out.sizes() == image.sizes(), kOp, ": `grad_out` must have the shape of `image` ",
                    show(image.sizes()), ", got ", show(grad_out.sizes()));
  TORCH_CHECK(grad_out.device() == image.device(), kOp, ": `grad_out` is on ", grad_out.device(),
              " but `image` is on ", image.device());
  c10::cuda::CUDAGuard guard(image.device());
  const int64_t B = image.size(0), H = image.size(2), W = image.size(3), HW = H * W;
  const auto acc_dtype = image.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::array<const at::Tensor*, 4> param_tensors{&brightness, &saturation, &hue, &contrast};
  const bool want_image = output_mask[0];
  const bool want_params = output_mask[1] || output_mask[2] || output_mask[3] || output_mask[4];

  at::Tensor grad_image = want_image ? at::empty(image.sizes(), image.options(), output_format(image))
                                     : at::empty({0}, image.options());
  std::array<at::Tensor, 4> grads_acc;  // (B,) in the compute dtype, for the requested parameters
  for (int k = 0; k < 4; ++k) {
    grads_acc[k] = at::empty({output_mask[k + 1] ? B : 0}, image.options().dtype(acc_dtype));
  }

  if ((want_image || want_params) && B * HW > 0) {
    const auto go = grad_out.scalar_type() == image.scalar_type() ? grad_out : grad_out.to(image.scalar_type());
    const auto prm = params_in(acc_dtype, brightness, saturation, hue, contrast);
    at::Tensor perm_holder;
    const int64_t* perm = perm_ptr(permutation, perm_holder);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "photometric_jitter_backward_cuda",
                                    [&] {
      using acc = acc_t<scalar_t>;
      const std::array<const at::Tensor*, 3> ts{&go, &image, want_image ? &grad_image : nullptr};
      const int mode = common_mode<3>(ts);
      constexpr int vec = 16 / sizeof(scalar_t);
      const bool use_vec = vector_ok<3>(ts, mode, vec, HW);
      const int vec_used = use_vec ? vec : 1;
      const dim3 grid = grid_for(HW, vec_used, B);
      at::Tensor partials =
          at::empty({want_params ? B * int64_t(grid.x) * 4 : 0}, image.options().dtype(acc_dtype));
      const auto grid_of = [&](int v) { return grid_for(HW, v, B); };
      TPSWARP_JITTER_LAUNCH(jitter_backward_kernel, mode, use_vec, grid_of, go.const_data_ptr<scalar_t>(),
                            strides_of(go), image.const_data_ptr<scalar_t>(), strides_of(image),
                            want_image ? grad_image.mutable_data_ptr<scalar_t>() : nullptr,
                            want_image ? strides_of(grad_image) : Strides4{0, 0, 0, 0}, param_ptrs<acc>(prm), perm,
                            want_params ? partials.mutable_data_ptr<acc>() : nullptr, B, HW, W, clamp);
      if (want_params) {
        auto ptr = [&](int k) { return output_mask[k + 1] ? grads_acc[k].mutable_data_ptr<acc>() : nullptr; };
        const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(B, kMaxGridY));
        sum_partials_kernel<acc><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            partials.const_data_ptr<acc>(), B, int64_t(grid.x), ptr(0), ptr(1), ptr(2), ptr(3));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  } else {
    if (want_image) grad_image.zero_();
    for (int k = 0; k < 4; ++k) {
      if (output_mask[k + 1]) grads_acc[k].zero_();
    }
  }

  std::array<at::Tensor, 4> grads;
  for (int k = 0; k < 4; ++k) {
    const auto& p = *param_tensors[k];
    grads[k] = output_mask[k + 1] ? grads_acc[k].to(p.scalar_type()) : at::empty({0}, p.options());
  }
  return {grad_image, grads[0], grads[1], grads[2], grads[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(tpswarp, CUDA, m) {
  m.impl("photometric_jitter", &photometric_jitter_cuda);
  m.impl("_photometric_jitter_backward", &photometric_jitter_backward_cuda);
}

}  // namespace tpswarp
