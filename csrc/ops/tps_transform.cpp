// Schemas of tpswarp::tps_transform and its private backward (kept equal to tpswarp/_schemas.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(tpswarp, m) {
  m.def("tps_transform(Tensor points, Tensor src, Tensor params) -> Tensor");
  m.def("_tps_transform_backward(Tensor grad_out, Tensor points, Tensor src, Tensor params, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}
