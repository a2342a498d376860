// Per-pixel warp of warped_kl_div (size=None), shared by the CUDA kernels and the CPU kernels of the
// statistics ops: the TPS map at output pixel (i, j), the pixel-centre hull test and the bilinear taps
// into the teacher, in the GPU's forms (tps_eval_fast, bilinear_tap_gpu_form), so that the CPU tests
// run them; and the layout of the statistics a forward keeps for the student's gradient.
#pragma once

#include "tpswarp/common.h"
#include "tpswarp/kl.h"
#include "tpswarp/sampling.h"
#include "tpswarp/tps.h"

namespace tpswarp {

struct WarpedKlGeometry {
  int64_t B, C, H, W, Ht, Wt, n;  // student (B, C, H, W), teacher (B, C, Ht, Wt), n control points
  bool logits, align_corners;
};

// Sample location, validity and taps of output pixel (i, j) of one item.
template <typename acc> struct PixelWarp {
  acc qx, qy;
  acc px, py;  // sample location in the teacher's pixel coordinates
  bool valid;
  BilinearTap<acc> tap;
};

// src_b (n, 2) and params_b (n + 3, 2) of the item, contiguous.
template <typename acc>
TPSWARP_HOST_DEVICE TPSWARP_INLINE PixelWarp<acc> warp_pixel(const WarpedKlGeometry& g, const acc* src_b,
                                                             const acc* params_b, int64_t i, int64_t j) {
  PixelWarp<acc> w;
  w.qx = pixel_to_normalized<acc>(j, g.W, g.align_corners);
  w.qy = pixel_to_normalized<acc>(i, g.H, g.align_corners);
  const auto f = tps_eval_fast<acc>(w.qx, w.qy, src_b, params_b, static_cast<int>(g.n));  // the GPU form
  w.px = normalized_to_pixel(f.x, g.Wt, g.align_corners);
  w.py = normalized_to_pixel(f.y, g.Ht, g.align_corners);
  w.valid = in_pixel_hull<acc>(f.x, f.y, g.Ht, g.Wt, g.align_corners);
  w.tap = bilinear_tap_gpu_form<acc>(w.px, w.py, g.Ht, g.Wt);
  return w;
}

// `_warped_kl_div_with_stats` keeps (B, kWarpedKlStats, H W): the kKlStats rows of kl_stats_store, then
// the validity weight (1 inside the teacher's pixel-centre hull, else 0; the mean's denominator).
constexpr int kWarpedKlStats = kKlStats + 1;

}  // namespace tpswarp
