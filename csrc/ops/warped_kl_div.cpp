// Schemas of tpswarp::warped_kl_div, its private backward, its private loss-and-gradient form, its
// private loss-and-statistics form and the backward from those statistics
// (kept equal to tpswarp/_schemas.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(tpswarp, m) {
  m.def("warped_kl_div(Tensor student_logits, Tensor teacher, Tensor src, Tensor params, bool teacher_is_logits=False, bool align_corners=False, str reduction=\"mean\", int[]? size=None) -> Tensor");
  m.def("_warped_kl_div_backward(Tensor grad_loss, Tensor student_logits, Tensor teacher, Tensor src, Tensor params, bool teacher_is_logits, bool align_corners, str reduction, int[]? size, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("_warped_kl_div_with_grad(Tensor student_logits, Tensor teacher, Tensor src, Tensor params, bool teacher_is_logits, bool align_corners, str reduction, int[]? size) -> (Tensor, Tensor)");
  m.def("_warped_kl_div_with_stats(Tensor student_logits, Tensor teacher, Tensor src, Tensor params, bool teacher_is_logits, bool align_corners, str reduction) -> (Tensor, Tensor)");
  m.def("_warped_kl_div_backward_stats(Tensor grad_loss, Tensor student_logits, Tensor teacher, Tensor src, Tensor params, Tensor stats, bool teacher_is_logits, bool align_corners, str reduction) -> Tensor");
}
