// Host-side argument checks and helpers shared by the CPU and CUDA tps_solve / tps_transform kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cmath>
#include <string>
#include <vector>

#include "tpswarp/show.h"
#include "tpswarp/tps_solve.h"

namespace tpswarp {

inline bool is_tps_float(at::ScalarType d) {
  return d == at::kHalf || d == at::kBFloat16 || d == at::kFloat || d == at::kDouble;
}

inline void check_tps_float(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK_TYPE(is_tps_float(t.scalar_type()), op, ": `", name,
                   "` must have a floating dtype (float16, bfloat16, float32, float64), got ", t.scalar_type());
}

inline void check_tps_points(const at::Tensor& t, const char* name, const char* op) {
  check_tps_float(t, name, op);
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(2) == 2, op, ": `", name, "` must have shape (B, n, 2), got ",
                    show(t.sizes()));
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                              const char* op) {
  TORCH_CHECK(a.device() == b.device(), op, ": `", b_name, "` is on ", b.device(), " but `", a_name, "` is on ",
              a.device(), "; all tensor arguments must be on the same device");
}

inline void check_tps_solve_args(const at::Tensor& src, const at::Tensor& dst, double reg, const char* op) {
  check_tps_points(src, "src", op);
  check_tps_points(dst, "dst", op);
  TORCH_CHECK_VALUE(src.sizes() == dst.sizes(), op, ": `src` ", show(src.sizes()), " and `dst` ", show(dst.sizes()),
                    " must have the same shape");
  TORCH_CHECK_VALUE(src.size(1) >= 3, op, ": need at least 3 control points, `src` has n=", show(src.size(1)));
  TORCH_CHECK_VALUE(src.size(1) <= (int64_t(1) << 20), op, ": `src` has n=", show(src.size(1)),
                    " control points; at most 2^20 are supported");
  check_same_device(src, "src", dst, "dst", op);
  TORCH_CHECK_VALUE(reg >= 0.0, op, ": `reg` must be a non-negative number, got ", show(reg));
}

inline void check_tps_params_args(const at::Tensor& src, const at::Tensor& params, int64_t batch, const char* op,
                                  const char* name = "params") {
  check_tps_points(src, "src", op);
  check_tps_float(params, name, op);
  const int64_t n = src.size(1);
  TORCH_CHECK_VALUE(params.dim() == 3 && params.size(1) == n + 3 && params.size(2) == 2, op, ": `", name,
                    "` must have shape (B, n + 3, 2) = (", show(src.size(0)), ", ", show(n + 3), ", 2) for `src` ",
                    show(src.sizes()), ", got ", show(params.sizes()));
  TORCH_CHECK_VALUE(src.size(0) == batch, op, ": batch size mismatch: `src` has ", show(src.size(0)),
                    " items, expected ", show(batch));
  TORCH_CHECK_VALUE(params.size(0) == batch, op, ": batch size mismatch: `", name, "` has ", show(params.size(0)),
                    " items, expected ", show(batch));
  check_same_device(src, "src", params, name, op);
}

// float64 if either is float64, else float32 (the reference's compute_dtype).
inline at::ScalarType tps_compute_dtype(std::initializer_list<at::ScalarType> dtypes) {
  for (auto d : dtypes) {
    if (d == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

inline std::string tps_item_list(const std::vector<int64_t>& items) {
  std::string s = "[";
  for (size_t i = 0; i < items.size() && i < 8; ++i) s += (i ? ", " : "") + show(items[i]);
  return s + "]";
}

// Raises ValueError for the singular items of a batch, as the reference's raise_if_singular does
// (collinear items first, then duplicate points), plus items that hit an exact zero pivot.
inline void tps_raise_if_singular(const int8_t* status, int64_t B) {
  std::vector<int64_t> collinear, duplicate, pivot;
  for (int64_t b = 0; b < B; ++b) {
    if (status[b] == kTpsCollinear) collinear.push_back(b);
    if (status[b] == kTpsDuplicate) duplicate.push_back(b);
    if (status[b] == kTpsZeroPivot) pivot.push_back(b);
  }
  TORCH_CHECK_VALUE(collinear.empty(), "tps_solve: singular system: the control points `src` of batch item(s) ",
                    tps_item_list(collinear),
                    " are collinear (or coincide), so the affine part is undetermined; `reg` cannot fix this");
  TORCH_CHECK_VALUE(duplicate.empty(), "tps_solve: singular system: batch item(s) ", tps_item_list(duplicate),
                    " have duplicate control points in `src`; remove them or pass reg > 0 for a smoothing spline");
  TORCH_CHECK_VALUE(pivot.empty(), "tps_solve: singular system: the TPS system of batch item(s) ",
                    tps_item_list(pivot), " is numerically singular (zero pivot in the elimination)");
}

}  // namespace tpswarp
