// Schemas of tpswarp::tps_solve and its private backward (kept equal to tpswarp/_schemas.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(tpswarp, m) {
  m.def("tps_solve(Tensor src, Tensor dst, float reg=0., bool check_singular=True) -> Tensor");
  m.def("_tps_solve_backward(Tensor grad_params, Tensor src, Tensor dst, Tensor params, float reg, bool[2] output_mask) -> (Tensor, Tensor)");
}
