// Schemas of tpswarp::tps_warp and its private backward (kept equal to tpswarp/_schemas.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(tpswarp, m) {
  m.def("tps_warp(Tensor image, Tensor src, Tensor params, str mode=\"bilinear\", str padding_mode=\"zeros\", bool align_corners=False, float fill=0., int[]? size=None) -> (Tensor, Tensor)");
  m.def("_tps_warp_backward(Tensor grad_out, Tensor image, Tensor src, Tensor params, str mode, str padding_mode, bool align_corners, float fill, int[]? size, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}
