// Schemas of tpswarp::photometric_jitter and its private backward (kept equal to tpswarp/_schemas.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(tpswarp, m) {
  m.def("photometric_jitter(Tensor image, Tensor brightness, Tensor saturation, Tensor hue, Tensor contrast, Tensor? permutation=None, bool clamp=False) -> Tensor");
  m.def("_photometric_jitter_backward(Tensor grad_out, Tensor image, Tensor brightness, Tensor saturation, Tensor hue, Tensor contrast, Tensor? permutation, bool clamp, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
