// Host-side argument handling shared by the CPU and CUDA tps_warp kernels.
#pragma once

#include <ATen/Dispatch_v2.h>
#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/OptionalArrayRef.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "tpswarp/sampling.h"
#include "tpswarp/tps_args.h"
#include "tpswarp/show.h"

namespace tpswarp {

inline Interp parse_interp(c10::string_view mode, const char* op) {
  if (mode == "bilinear") return Interp::Bilinear;
  if (mode == "nearest") return Interp::Nearest;
  TORCH_CHECK_VALUE(false, op, ": `mode` must be one of ['bilinear', 'nearest'], got '", std::string(mode), "'");
}

inline Padding parse_padding(c10::string_view padding_mode, const char* op) {
  if (padding_mode == "zeros") return Padding::Zeros;
  if (padding_mode == "border") return Padding::Border;
  if (padding_mode == "reflection") return Padding::Reflection;
  TORCH_CHECK_VALUE(false, op, ": `padding_mode` must be one of ['zeros', 'border', 'reflection'], got '",
                    std::string(padding_mode), "'");
}

// Parsed options and sizes of one tps_warp call.
struct WarpConfig {
  Interp mode;
  Padding padding;
  bool align_corners;
  double fill;
  int64_t B, C, H, W;  // input
  int64_t Ho, Wo;      // output
  int64_t n;           // control points
};

inline WarpConfig warp_config(const at::Tensor& image, const at::Tensor& src, const at::Tensor& params,
                              c10::string_view mode, c10::string_view padding_mode, bool align_corners, double fill,
                              at::OptionalIntArrayRef size, const char* op) {
  TORCH_CHECK_VALUE(image.dim() == 4, op, ": `image` must be 4-D (B, C, H, W), got shape ", show(image.sizes()));
  WarpConfig cfg;
  cfg.mode = parse_interp(mode, op);
  cfg.padding = parse_padding(padding_mode, op);
  cfg.align_corners = align_corners;
  cfg.fill = fill;
  const auto dtype = image.scalar_type();
  const bool is_float = dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble;
  if (!is_float) {
    TORCH_CHECK_TYPE(cfg.mode == Interp::Nearest && at::isIntegralType(dtype, /*includeBool=*/false), op,
                     ": `image` of dtype ", dtype,
                     " needs mode='nearest' and an integer dtype; bilinear sampling takes float16, bfloat16, "
                     "float32 or float64");
  }
  cfg.B = image.size(0);
  cfg.C = image.size(1);
  cfg.H = image.size(2);
  cfg.W = image.size(3);
  check_tps_params_args(src, params, cfg.B, op);
  check_same_device(image, "image", src, "src", op);
  check_same_device(image, "image", params, "params", op);
  cfg.n = src.size(1);
  if (size.has_value()) {
    const auto s = *size;
    TORCH_CHECK_VALUE(s.size() == 2 && s[0] > 0 && s[1] > 0, op,
                      ": `size` must be None or a pair of positive ints (H, W), got ", show(s));
    cfg.Ho = s[0];
    cfg.Wo = s[1];
  } else {
    cfg.Ho = cfg.H;
    cfg.Wo = cfg.W;
  }
  constexpr int64_t kMaxSide = int64_t(1) << 24;  // tap indices are int, and exact in float
  TORCH_CHECK_VALUE(cfg.H <= kMaxSide && cfg.W <= kMaxSide, op, ": `image` height and width must be at most 2^24, got ",
                    show(image.sizes()));
  TORCH_CHECK_VALUE(cfg.B * cfg.Ho * cfg.Wo == 0 || cfg.C == 0 || (cfg.H > 0 && cfg.W > 0), op,
                    ": `image` has zero height or width (shape ", show(image.sizes()), "): there is nothing to sample");
  return cfg;
}

// Coordinates (and float images) are computed in float64 if any floating input is float64, else in float32.
inline at::ScalarType warp_compute_dtype(const at::Tensor& image, const at::Tensor& src, const at::Tensor& params) {
  const auto img = at::isFloatingType(image.scalar_type()) ? image.scalar_type() : at::kFloat;
  return tps_compute_dtype({img, src.scalar_type(), params.scalar_type()});
}

// Outputs follow a channels_last image (that is not also plain contiguous); else contiguous.
inline at::MemoryFormat warp_memory_format(const at::Tensor& image) {
  return image.dim() == 4 && image.is_contiguous(at::MemoryFormat::ChannelsLast) && !image.is_contiguous()
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// `fill` converted to the image dtype (an error if it does not fit, as torch.full_like), as raw
// bits: nearest sampling copies elements without looking at their type.
inline uint64_t warp_fill_bits(double fill, at::ScalarType dtype) {
  uint64_t bits = 0;
  AT_DISPATCH_V2(dtype, "tps_warp_fill", AT_WRAP([&] {
    const scalar_t v = at::Scalar(fill).to<scalar_t>();
    std::memcpy(&bits, &v, sizeof(scalar_t));
  }), AT_EXPAND(AT_ALL_TYPES), at::kHalf, at::kBFloat16, AT_EXPAND(AT_BAREBONES_UNSIGNED_TYPES));
  return bits;
}

struct Strides4 {
  int64_t b, c, h, w;
};

inline Strides4 strides4(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// Number of TPS coordinate-gradient values per batch item: grad src (2n), then grad params (2n + 6).
inline int64_t tps_grad_width(int64_t n) { return 2 * n + 2 * (n + 3); }

}  // namespace tpswarp
