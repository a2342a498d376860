// CUDA-only helpers of the `size=` path of the masked/warped KL kernels (csrc/cuda/*_kl_div.cu):
// a low-resolution (B, C, h, w) input is read at output pixel (oy, ox) of an (H, W) grid as if it
// had been resized by F.interpolate(mode="bilinear", align_corners=False), through the taps of
// tpswarp/upsample.h; the backward gathers, for one low-resolution element, the output pixels
// that read it (linear_resize_readers in rows and columns), so that no B x C x H x W tensor is
// allocated and no atomics are used.
#pragma once

#include "tpswarp/kl.h"
#include "tpswarp/upsample.h"

namespace tpswarp {
namespace kl_resize {

struct Strides4 {
  int64_t b, c, h, w;
};

// The 2 x 2 taps of one output pixel into an input plane with strides (sh, sw).
template <typename acc> struct Tap2 {
  int64_t o00, o01, o10, o11;  // element offsets of (y0, x0), (y0, x1), (y1, x0), (y1, x1)
  acc ly0, ly1, lx0, lx1;      // row and column weights
};

template <typename acc>
__device__ __forceinline__ Tap2<acc> tap2(const LinearTap<acc>& ty, const LinearTap<acc>& tx, int64_t sh, int64_t sw) {
  Tap2<acc> r;
  r.o00 = ty.i0 * sh + tx.i0 * sw;
  r.o01 = ty.i0 * sh + tx.i1 * sw;
  r.o10 = ty.i1 * sh + tx.i0 * sw;
  r.o11 = ty.i1 * sh + tx.i1 * sw;
  r.ly0 = ty.l0;
  r.ly1 = ty.l1;
  r.lx0 = tx.l0;
  r.lx1 = tx.l1;
  return r;
}

// Taps of output pixel (oy, ox) into an (in_h, in_w) plane; scale_h / scale_w from linear_resize_scale.
template <typename acc>
__device__ __forceinline__ Tap2<acc> tap2(int64_t oy, int64_t ox, int64_t in_h, int64_t in_w, acc scale_h,
                                          acc scale_w, int64_t sh, int64_t sw) {
  return tap2<acc>(linear_resize_tap<acc>(oy, in_h, scale_h), linear_resize_tap<acc>(ox, in_w, scale_w), sh, sw);
}

// The resized value, in upsample_bilinear2d's order of operations.
template <typename scalar_t, typename acc>
__device__ __forceinline__ acc read(const scalar_t* __restrict__ plane, const Tap2<acc>& r) {
  return r.ly0 * (r.lx0 * static_cast<acc>(plane[r.o00]) + r.lx1 * static_cast<acc>(plane[r.o01])) +
         r.ly1 * (r.lx0 * static_cast<acc>(plane[r.o10]) + r.lx1 * static_cast<acc>(plane[r.o11]));
}

// Per output pixel state written by pass 1 of a backward and read by pass 2: the KL statistics
// and (warped KL only) the sample location in the resized teacher's pixel coordinates.
template <typename acc> struct PixelStats {
  KLPixel<acc> kl;
  acc px, py;
};
static_assert(sizeof(PixelStats<float>) == 8 * sizeof(float), "PixelStats<float> is stored as 8 floats");
static_assert(sizeof(PixelStats<double>) == 8 * sizeof(double), "PixelStats<double> is stored as 8 doubles");

// Calls f(oy, ox, weight) for every output pixel (oy, ox) of the (H, W) grid whose resize taps
// read input element (y, x) of an (in_h, in_w) plane, weight = the product of the row and column
// tap weights with which it reads it (both taps counted when they coincide at the last index,
// as upsample_bilinear2d's backward adds them). Rows outer, columns inner: a fixed order.
template <typename acc, typename F>
__device__ __forceinline__ void for_each_reader(int64_t y, int64_t x, int64_t in_h, int64_t in_w, int64_t H, int64_t W,
                                                acc scale_h, acc scale_w, F&& f) {
  const auto rows = linear_resize_readers<acc>(y, in_h, H, scale_h);
  const auto cols = linear_resize_readers<acc>(x, in_w, W, scale_w);
  for (int64_t oy = rows.begin; oy < rows.end; ++oy) {
    const acc wy = linear_resize_weight<acc>(linear_resize_tap<acc>(oy, in_h, scale_h), y);
    for (int64_t ox = cols.begin; ox < cols.end; ++ox) {
      const acc wx = linear_resize_weight<acc>(linear_resize_tap<acc>(ox, in_w, scale_w), x);
      f(oy, ox, wy * wx);
    }
  }
}

}  // namespace kl_resize
}  // namespace tpswarp
