// Schemas of tpswarp::masked_kl_div, its private backward and its private loss-and-gradient form, its
// private loss-and-statistics form and the backward from those statistics
// (kept equal to tpswarp/_schemas.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(tpswarp, m) {
  m.def("masked_kl_div(Tensor student_logits, Tensor teacher, Tensor? mask=None, bool teacher_is_logits=False, str reduction=\"mean\", int[]? size=None) -> Tensor");
  m.def("_masked_kl_div_backward(Tensor grad_loss, Tensor student_logits, Tensor teacher, Tensor? mask, bool teacher_is_logits, str reduction, int[]? size, bool[2] output_mask) -> (Tensor, Tensor)");
  m.def("_masked_kl_div_with_grad(Tensor student_logits, Tensor teacher, Tensor? mask, bool teacher_is_logits, str reduction, int[]? size) -> (Tensor, Tensor)");
  m.def("_masked_kl_div_with_stats(Tensor student_logits, Tensor teacher, Tensor? mask, bool teacher_is_logits, str reduction) -> (Tensor, Tensor)");
  m.def("_masked_kl_div_backward_stats(Tensor grad_loss, Tensor student_logits, Tensor teacher, Tensor? mask, Tensor stats, bool teacher_is_logits, str reduction) -> Tensor");
}
