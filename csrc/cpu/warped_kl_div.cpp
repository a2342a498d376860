// CPU kernels of tpswarp::warped_kl_div and its backward: for each block of output pixels of
// one row, the TPS map, the validity test and the bilinear taps are computed on the fly and the
// warped teacher is gathered into a small on-stack buffer, so nothing of size B x C x H x W is
// created besides the gradients.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/upsample_bilinear2d.h>
#include <ATen/ops/upsample_bilinear2d_backward.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <type_traits>
#include <vector>

#include "tpswarp/cpu_kl_block.h"
#include "tpswarp/cpu_pair_gather.h"
#include "tpswarp/cpu_kl_resize.h"
#include "tpswarp/kl.h"
#include "tpswarp/kl_args.h"
#include "tpswarp/sampling.h"
#include "tpswarp/show.h"
#include "tpswarp/tps.h"
#include "tpswarp/tps_args.h"
#include "tpswarp/warped_kl.h"

// The float32 hot loops (TPS map of a block, gather of the warped teacher) in AVX2 clones
// (tpswarp/cpu_kl_block.h), compiled for vectorizable selects (tpswarp/common.h).
TPSWARP_NO_TRAPPING_MATH_BEGIN

namespace tpswarp {
namespace cpu {

// f(q) for the pixels (qx[p], qy), p < P, as tps_eval<float> computes it (same order of operations)
// but with the vectorizable logarithm of cpu_fastmath.h (about 1 ulp from std::log).
TPSWARP_CPU_CLONES void warped_tps_block(const float* src, const float* params, int64_t n, float qy, const float* qx,
                                         int64_t P, float* fx, float* fy) {
  const float a0x = params[2 * n], a0y = params[2 * n + 1];
  const float a1x = params[2 * n + 2], a1y = params[2 * n + 3];
  const float a2x = params[2 * n + 4], a2y = params[2 * n + 5];
  for (int64_t p = 0; p < P; ++p) {
    fx[p] = a0x + a1x * qx[p] + a2x * qy;
    fy[p] = a0y + a1y * qx[p] + a2y * qy;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float cx = src[2 * i], cy = src[2 * i + 1], wx = params[2 * i], wy = params[2 * i + 1];
    const float dy = qy - cy;
    for (int64_t p = 0; p < P; ++p) {
      const float dx = qx[p] - cx;
      const float r2 = dx * dx + dy * dy;
      const float phi = r2 > 0.f ? 0.5f * r2 * fast_log(r2) : 0.f;
      fx[p] += wx * phi;
      fy[p] += wy * phi;
    }
  }
}

// Adds the gradients of sum_p <(gx[p], gy[p]), f(qx[p], qy)> (f as warped_tps_block computes it,
// the terms of tps_eval_backward) w.r.t. src to grad[0, 2n) and w.r.t. params to grad[2n, 4n + 6):
// per-pixel terms in vectorized loops, sums in a fixed order (lane_sum8).
TPSWARP_CPU_CLONES void warped_tps_block_backward(const float* src, const float* params, int64_t n, float qy,
                                                  const float* qx, int64_t P, const float* gx, const float* gy,
                                                  float* grad) {
  float* grad_src = grad;
  float* grad_params = grad + 2 * n;
  alignas(64) float t0[kKLBlock], t1[kKLBlock], t2[kKLBlock], t3[kKLBlock];
  for (int64_t p = 0; p < P; ++p) {
    t0[p] = gx[p] * qx[p];
    t1[p] = gy[p] * qx[p];
  }
  const float sx = lane_sum8(gx, P), sy = lane_sum8(gy, P);
  grad_params[2 * n] += sx;
  grad_params[2 * n + 1] += sy;
  grad_params[2 * n + 2] += lane_sum8(t0, P);
  grad_params[2 * n + 3] += lane_sum8(t1, P);
  grad_params[2 * n + 4] += sx * qy;
  grad_params[2 * n + 5] += sy * qy;
  for (int64_t i = 0; i < n; ++i) {
    const float cx = src[2 * i], dy = qy - src[2 * i + 1], wx = params[2 * i], wy = params[2 * i + 1];
    for (int64_t p = 0; p < P; ++p) {
      const float dx = qx[p] - cx;
      const float r2 = dx * dx + dy * dy;
      const float lg = fast_log(r2);
      const float phi = r2 > 0.f ? 0.5f * r2 * lg : 0.f;
      // <g, W_i> * dphi/dr2 * 2 = <g, W_i> (log r2 + 1), 0 at r2 = 0
      const float k = r2 > 0.f ? (gx[p] * wx + gy[p] * wy) * (lg + 1.f) : 0.f;
      t0[p] = gx[p] * phi;
      t1[p] = gy[p] * phi;
      t2[p] = k * dx;
      t3[p] = k * dy;
    }
    grad_params[2 * i] += lane_sum8(t0, P);
    grad_params[2 * i + 1] += lane_sum8(t1, P);
    grad_src[2 * i] -= lane_sum8(t2, P);
    grad_src[2 * i + 1] -= lane_sum8(t3, P);
  }
}

// tbuf[c * ld + p] = the bilinear sample (fill 0) of class plane c (planes `cs` apart) at the taps
// (int32 offsets o.., weights w.., 0 for taps outside), as bilinear_combine computes it.
TPSWARP_CPU_CLONES void warped_gather_taps(const float* plane0, int64_t cs, int64_t C, int64_t P, const int32_t* o00,
                                           const int32_t* o10, const int32_t* o01, const int32_t* o11, const float* w00,
                                           const float* w10, const float* w01, const float* w11, float* tbuf,
                                           int64_t ld) {
  for (int64_t c = 0; c < C; ++c) {
    const float* plane = plane0 + c * cs;
    float* out = tbuf + c * ld;
    for (int64_t p = 0; p < P; ++p) {
      float v = w00[p] * plane[o00[p]];
      v += w10[p] * plane[o10[p]];
      v += w01[p] * plane[o01[p]];
      v += w11[p] * plane[o11[p]];
      out[p] = v + 0.f;
    }
  }
}

// Sample locations f = (fx[p], fy[p]) of a block on a teacher of Ht x Wt pixels (zero padding), in one
// vectorized loop: validity (1 / 0), the row-pair taps for a plane with row stride sh
// (tpswarp/cpu_pair_gather.h) and with kCoords the row-pair coefficients of d sample / d (px, py).
// (kAlignCorners a template parameter: a loop without branches, which vectorizes.)
template <bool kCoords, bool kAlignCorners>
TPSWARP_CPU_CLONES void warped_pair_taps(const float* fx, const float* fy, int64_t P, int64_t Ht, int64_t Wt,
                                         int32_t sh, float* valid, PairTaps<kKLBlock>& t, PairWeights<kKLBlock>& kx,
                                         PairWeights<kKLBlock>& ky) {
  const int32_t last = static_cast<int32_t>(Wt - 2);
  for (int64_t p = 0; p < P; ++p) {
    const float px = normalized_to_pixel(fx[p], Wt, kAlignCorners);
    const float py = normalized_to_pixel(fy[p], Ht, kAlignCorners);
    valid[p] = in_pixel_hull<float>(fx[p], fy[p], Ht, Wt, kAlignCorners) ? 1.f : 0.f;
    const auto tap = bilinear_tap<float>(px, py, Ht, Wt);
    const PairColumns pc = set_pair_tap(t, p, tap, sh, last);
    if constexpr (kCoords) {
      const auto k = bilinear_coord_coefs(tap);
      pair_weights(kx, p, pc, k.x00, k.x10, k.x01, k.x11);
      pair_weights(ky, p, pc, k.y00, k.y10, k.y01, k.y11);
    }
  }
}

#if TPSWARP_X86_MULTIVERSION
// Float32 teacher planes with unit stride along W (tpswarp/cpu_pair_gather.h): val[c * ld + p] =
// the bilinear sample (fill 0) of class plane c at the row-pair taps `t` of pixel p, and with
// kCoords also dx / dy [c * ld + p] = d val / d px and d val / d py from the same loads (`kx`, `ky`:
// bilinear_coord_coefs of each pixel's taps moved onto its row pairs).
template <bool kCoords>
TPSWARP_TARGET_AVX2 void warped_gather_pairs_avx2(const float* plane0, int64_t cs, int64_t C, int64_t P,
                                                  const PairTaps<kKLBlock>& t, const PairWeights<kKLBlock>& kx,
                                                  const PairWeights<kKLBlock>& ky, float* val, float* dx, float* dy,
                                                  int64_t ld) {
  if constexpr (!kCoords) {
    gather_pairs_avx2(plane0, C, cs, val, ld, P, t, 0.f);
  } else {
    const __m256i order = pair_lane_order();
    const __m256 zero = _mm256_setzero_ps();
    int64_t p = 0;
    for (; p + 8 <= P; p += 8) {
      const PairWeightsAvx2 w = load_pair_weights(t, p), wx = load_pair_weights(kx, p), wy = load_pair_weights(ky, p);
      const float* plane = plane0;
      for (int64_t c = 0; c < C; ++c, plane += cs) {
        __m256 vtr, vbr;
        const __m256 vtl = load_pairs(plane, t.ot + p, &vtr);
        const __m256 vbl = load_pairs(plane, t.ob + p, &vbr);
        const __m256 v = _mm256_add_ps(pair_combine(w, vtl, vtr, vbl, vbr, zero), zero);
        _mm256_storeu_ps(val + c * ld + p, _mm256_permutevar8x32_ps(v, order));
        _mm256_storeu_ps(dx + c * ld + p, _mm256_permutevar8x32_ps(pair_combine(wx, vtl, vtr, vbl, vbr, zero), order));
        _mm256_storeu_ps(dy + c * ld + p, _mm256_permutevar8x32_ps(pair_combine(wy, vtl, vtr, vbl, vbr, zero), order));
      }
    }
    for (; p < P; ++p) {
      for (int64_t c = 0; c < C; ++c) {
        const float* plane = plane0 + c * cs;
        const float vtl = plane[t.ot[p]], vtr = plane[t.ot[p] + 1], vbl = plane[t.ob[p]], vbr = plane[t.ob[p] + 1];
        val[c * ld + p] = bilinear_combine(plane, int64_t(t.ot[p]), int64_t(t.ot[p]) + 1, int64_t(t.ob[p]),
                                           int64_t(t.ob[p]) + 1, t.lt[p], t.rt[p], t.lb[p], t.rb[p], 0.f);
        dx[c * ld + p] = kx.lt[p] * vtl + kx.rt[p] * vtr + kx.lb[p] * vbl + kx.rb[p] * vbr;
        dy[c * ld + p] = ky.lt[p] * vtl + ky.rt[p] * vtr + ky.lb[p] * vbl + ky.rb[p] * vbr;
      }
    }
  }
}
#endif

}  // namespace cpu
}  // namespace tpswarp

TPSWARP_NO_TRAPPING_MATH_END

namespace tpswarp {
namespace {

constexpr const char* kOp = "warped_kl_div";
constexpr int64_t kBlock = cpu::kKLBlock;

struct Problem {
  // With size=(H, W): H, W = size and the teacher is warped as if resized to (Ht, Wt) = (H, W) first.
  int64_t B, C, H, W, Ht, Wt, n;
  bool logits, align_corners;
  Reduction reduction;
  at::ScalarType in_dtype, acc_dtype;
};

Problem make_problem(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& src,
                     const at::Tensor& params, bool teacher_is_logits, bool align_corners, c10::string_view reduction) {
  check_kl_tensor(student, "student_logits", kOp);
  check_kl_tensor(teacher, "teacher", kOp);
  TORCH_CHECK_VALUE(student.dim() == 4, kOp, ": `student_logits` must be 4-D (B, C, H, W), got ",
                    show(student.sizes()));
  TORCH_CHECK_VALUE(teacher.dim() == 4, kOp, ": `teacher` must be 4-D (B, C, H, W), got ", show(teacher.sizes()));
  TORCH_CHECK_VALUE(teacher.size(0) == student.size(0) && teacher.size(1) == student.size(1), kOp, ": `teacher` ",
                    show(teacher.sizes()), " and `student_logits` ", show(student.sizes()),
                    " must agree in batch size and classes");
  check_tps_params_args(src, params, student.size(0), kOp);
  check_same_device(student, "student_logits", teacher, "teacher", kOp);
  check_same_device(student, "student_logits", src, "src", kOp);
  Problem p;
  p.B = student.size(0);
  p.C = student.size(1);
  p.H = student.size(2);
  p.W = student.size(3);
  p.Ht = teacher.size(2);
  p.Wt = teacher.size(3);
  p.n = src.size(1);
  p.logits = teacher_is_logits;
  p.align_corners = align_corners;
  p.reduction = parse_reduction(reduction, kOp);
  const bool any_double = student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble ||
                          params.scalar_type() == at::kDouble;
  p.acc_dtype = any_double ? at::kDouble : at::kFloat;
  p.in_dtype = student.scalar_type() == teacher.scalar_type() ? student.scalar_type() : p.acc_dtype;
  return p;
}

// One block of up to kBlock output pixels (b, i, j0 .. j0 + P - 1): sample locations, validity
// and the warped teacher / student values gathered as [C][kBlock] in acc.
template <typename acc> struct Block {
  int64_t P;
  acc qx[kBlock], qy[kBlock];
  BilinearTap<acc> tap[kBlock];
  acc valid[kBlock];
};

// The row-pair form of a block's taps (float32 teacher planes with unit stride along W: use_pairs),
// and with `coords` the coefficients of the sample's derivatives w.r.t. its location.
struct PairBlock {
  cpu::PairTaps<kBlock> t;
  cpu::PairWeights<kBlock> kx, ky;
  int32_t sh;   // teacher row stride
  bool coords;  // kx, ky wanted (the backward of src / params)
};

// With `pairs` (float32 only), the taps are computed in row-pair form there (blk.tap is not set).
template <typename scalar_t, typename acc>
void locate_block(const Problem& pb, const acc* src_b, const acc* params_b, int64_t i, int64_t j0, Block<acc>& blk,
                  PairBlock* pairs = nullptr) {
  blk.P = std::min(kBlock, pb.W - j0);
  const acc qy = pixel_to_normalized<acc>(i, pb.H, pb.align_corners);
  acc fx[kBlock], fy[kBlock];
  if constexpr (std::is_same_v<acc, float>) {
    for (int64_t p = 0; p < blk.P; ++p) blk.qx[p] = pixel_to_normalized<acc>(j0 + p, pb.W, pb.align_corners);
    cpu::warped_tps_block(src_b, params_b, pb.n, qy, blk.qx, blk.P, fx, fy);
    if (pairs) {
      for (int64_t p = 0; p < blk.P; ++p) blk.qy[p] = qy;
      auto taps = [&](auto coords, auto align_corners) {
        cpu::warped_pair_taps<decltype(coords)::value, decltype(align_corners)::value>(
            fx, fy, blk.P, pb.Ht, pb.Wt, pairs->sh, blk.valid, pairs->t, pairs->kx, pairs->ky);
      };
      using yes = std::true_type;
      using no = std::false_type;
      if (pairs->coords)
        pb.align_corners ? taps(yes{}, yes{}) : taps(yes{}, no{});
      else
        pb.align_corners ? taps(no{}, yes{}) : taps(no{}, no{});
      return;
    }
  } else {
    for (int64_t p = 0; p < blk.P; ++p) {
      blk.qx[p] = pixel_to_normalized<acc>(j0 + p, pb.W, pb.align_corners);
      const auto g = tps_eval<acc>(blk.qx[p], qy, src_b, params_b, pb.n);
      fx[p] = g.x;
      fy[p] = g.y;
    }
  }
  for (int64_t p = 0; p < blk.P; ++p) {
    const Vec2<acc> g{fx[p], fy[p]};
    const acc px = normalized_to_pixel(g.x, pb.Wt, pb.align_corners);
    const acc py = normalized_to_pixel(g.y, pb.Ht, pb.align_corners);
    blk.qy[p] = qy;
    blk.valid[p] = in_pixel_hull<acc>(g.x, g.y, pb.Ht, pb.Wt, pb.align_corners) ? acc(1) : acc(0);
    blk.tap[p] = bilinear_tap<acc>(px, py, pb.Ht, pb.Wt);
  }
}

// True when the teacher's element offsets within one class plane fit int32 (the vectorized gather).
bool plane_offsets_fit_int32(const Problem& pb, const int64_t* ts) {
  const int64_t span = (pb.Ht - 1) * ts[2] + (pb.Wt - 1) * ts[3];
  return ts[2] >= 0 && ts[3] >= 0 && span < (int64_t(1) << 31);
}

// Gathers the block's student values into sbuf and its warped teacher into tbuf ([C][kBlock]).
// With dxbuf / dybuf (the backward of the TPS parameters), it may also store d tbuf / d (px, py)
// there, from the same loads, and then returns true (float32 teachers with unit stride along W
// on AVX2 machines); else the caller computes those itself.
// The row-pair path (PairBlock) serves float32 teachers with unit stride along W, int32 plane offsets
// and Wt >= 2 on AVX2 machines.
template <typename scalar_t, typename acc> bool use_pairs(const Problem& pb, const int64_t* ts) {
#if TPSWARP_X86_MULTIVERSION
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc, float>) {
    return plane_offsets_fit_int32(pb, ts) && ts[3] == 1 && pb.Wt >= 2 && cpu::cpu_has_avx2();
  }
#endif
  return false;
}

template <typename scalar_t, typename acc>
bool gather_block(const Problem& pb, const Block<acc>& blk, const scalar_t* student_b, const int64_t* ss,
                  const scalar_t* teacher_b, const int64_t* ts, int64_t i, int64_t j0, acc* sbuf, acc* tbuf,
                  acc* dxbuf = nullptr, acc* dybuf = nullptr, const PairBlock* pairs = nullptr, bool copy_s = true) {
  auto copy_student = [&] {
    if (!copy_s) return;
    for (int64_t c = 0; c < pb.C; ++c) {
      const scalar_t* row = student_b + c * ss[1] + i * ss[2] + j0 * ss[3];
      for (int64_t p = 0; p < blk.P; ++p) sbuf[c * kBlock + p] = static_cast<acc>(row[p * ss[3]]);
    }
  };
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc, float>) {
#if TPSWARP_X86_MULTIVERSION
    if (pairs) {
      cpu::prefetch_next_bottom_rows(teacher_b, pb.C, ts[1], ts[2], pairs->t.ob, blk.P);
      if (dxbuf && pairs->coords)
        cpu::warped_gather_pairs_avx2<true>(teacher_b, ts[1], pb.C, blk.P, pairs->t, pairs->kx, pairs->ky, tbuf, dxbuf,
                                            dybuf, kBlock);
      else
        cpu::warped_gather_pairs_avx2<false>(teacher_b, ts[1], pb.C, blk.P, pairs->t, pairs->kx, pairs->ky, tbuf,
                                             nullptr, nullptr, kBlock);
      copy_student();
      return dxbuf != nullptr && pairs->coords;
    }
#endif
    if (plane_offsets_fit_int32(pb, ts)) {
      int32_t o[4][kBlock];
      float w[4][kBlock];
      const int32_t sh = static_cast<int32_t>(ts[2]), sw = static_cast<int32_t>(ts[3]);
      for (int64_t p = 0; p < blk.P; ++p) {
        const auto& t = blk.tap[p];
        o[0][p] = t.y0 * sh + t.x0 * sw;
        o[1][p] = t.y0 * sh + t.x1 * sw;
        o[2][p] = t.y1 * sh + t.x0 * sw;
        o[3][p] = t.y1 * sh + t.x1 * sw;
        w[0][p] = t.w00;
        w[1][p] = t.w10;
        w[2][p] = t.w01;
        w[3][p] = t.w11;
      }
      cpu::warped_gather_taps(teacher_b, ts[1], pb.C, blk.P, o[0], o[1], o[2], o[3], w[0], w[1], w[2], w[3], tbuf,
                              kBlock);
      copy_student();
      return false;
    }
  }
  for (int64_t c = 0; c < pb.C; ++c) {
    const scalar_t* plane = teacher_b + c * ts[1];
    const scalar_t* row = student_b + c * ss[1] + i * ss[2] + j0 * ss[3];
    for (int64_t p = 0; p < blk.P; ++p) {
      tbuf[c * kBlock + p] = bilinear_sample<scalar_t, acc>(plane, ts[2], ts[3], blk.tap[p], acc(0));
      if (copy_s) sbuf[c * kBlock + p] = static_cast<acc>(row[p * ss[3]]);
    }
  }
  return false;
}

// size=(H, W): the student (B, C, hs, ws) and the teacher (B, C, ht, wt) read through the
// F.interpolate(bilinear, align_corners=False) taps (tpswarp/cpu_kl_resize.h); the warp samples the
// resized teacher (H, W), each of its four taps read through the resize taps.
template <typename acc> struct SizedAxes {
  cpu::ResizeAxis<acc> sy, sx, ty, tx;
};

template <typename acc> SizedAxes<acc> make_sized_axes(const Problem& pb, const at::Tensor& s, const at::Tensor& t) {
  return {cpu::make_resize_axis<acc>(s.size(2), pb.H), cpu::make_resize_axis<acc>(s.size(3), pb.W),
          cpu::make_resize_axis<acc>(t.size(2), pb.Ht), cpu::make_resize_axis<acc>(t.size(3), pb.Wt)};
}

template <typename scalar_t, typename acc>
void gather_block_sized(const Problem& pb, const Block<acc>& blk, const SizedAxes<acc>& ax, const scalar_t* student_b,
                        const std::array<int64_t, 4>& ss, const scalar_t* teacher_b, const std::array<int64_t, 4>& ts,
                        int64_t i, int64_t j0, acc* sbuf, acc* tbuf) {
  cpu::gather_resized<scalar_t, acc>(student_b, ss, pb.C, ax.sy.tap[i], ax.sx.tap.data() + j0, blk.P, sbuf);
  for (int64_t c = 0; c < pb.C; ++c) {
    const scalar_t* plane = teacher_b + c * ts[1];
    for (int64_t p = 0; p < blk.P; ++p) {
      const auto& tp = blk.tap[p];
      const auto &y0 = ax.ty.tap[tp.y0], &y1 = ax.ty.tap[tp.y1], &x0 = ax.tx.tap[tp.x0], &x1 = ax.tx.tap[tp.x1];
      // fill 0, in bilinear_combine's order
      acc v = tp.w00 * cpu::resize_sample<scalar_t, acc>(plane, ts[2], ts[3], y0, x0);
      v += tp.w10 * cpu::resize_sample<scalar_t, acc>(plane, ts[2], ts[3], y0, x1);
      v += tp.w01 * cpu::resize_sample<scalar_t, acc>(plane, ts[2], ts[3], y1, x0);
      v += tp.w11 * cpu::resize_sample<scalar_t, acc>(plane, ts[2], ts[3], y1, x1);
      tbuf[c * kBlock + p] = v;
    }
  }
}

// Per-pixel KL of a block into out[p]: student values s[c * scs + p] (the student tensor itself or
// a gathered copy), warped teacher tbuf[c * kBlock + p]; float uses the vectorized block math.
template <typename acc>
void block_kl(const Problem& pb, int64_t P, const acc* s, int64_t scs, const acc* tbuf, acc* out) {
  if constexpr (std::is_same_v<acc, float>) {
    cpu::KLBlockStats st;
    if (pb.logits)
      cpu::kl_block_stats<float, float, true>(s, scs, tbuf, kBlock, pb.C, P, st);
    else
      cpu::kl_block_stats<float, float, false>(s, scs, tbuf, kBlock, pb.C, P, st);
    for (int64_t p = 0; p < P; ++p) out[p] = st.kl[p];
  } else {
    const bool one_sweep = cpu::kl_one_sweep();
    for (int64_t p = 0; p < P; ++p) out[p] = kl_pixel<acc>(s + p, scs, tbuf + p, kBlock, pb.C, pb.logits, one_sweep).kl;
  }
}

// Gradients of scale[p] * KL_p w.r.t. the student values (into gs[c * gscs + p]) and the warped
// teacher values (into gtbuf[c * kBlock + p]); either output may be null (not wanted). With kl,
// also KL_p into kl[p] (as block_kl computes it).
template <typename acc>
void block_kl_grad(const Problem& pb, int64_t P, const acc* s, int64_t scs, const acc* tbuf, const acc* scale, acc* gs,
                   int64_t gscs, acc* gtbuf, acc* kl = nullptr) {
  if constexpr (std::is_same_v<acc, float>) {
    cpu::KLBlockStats st;
    if (pb.logits) {
      if (gtbuf || kl)  // the logits teacher's gradient needs the KL value
        cpu::kl_block_stats<float, float, true>(s, scs, tbuf, kBlock, pb.C, P, st);
      else
        cpu::kl_block_stats<float, float, true, false>(s, scs, tbuf, kBlock, pb.C, P, st);
      cpu::kl_block_grad<float, float, float, true>(s, scs, tbuf, kBlock, pb.C, P, st, scale, gs, gscs, gtbuf, kBlock);
    } else {
      if (kl)
        cpu::kl_block_stats<float, float, false>(s, scs, tbuf, kBlock, pb.C, P, st);
      else
        cpu::kl_block_stats<float, float, false, false>(s, scs, tbuf, kBlock, pb.C, P, st);
      cpu::kl_block_grad<float, float, float, false>(s, scs, tbuf, kBlock, pb.C, P, st, scale, gs, gscs, gtbuf, kBlock);
    }
    if (kl)
      for (int64_t p = 0; p < P; ++p) kl[p] = st.kl[p];
  } else {
    const bool one_sweep = cpu::kl_one_sweep();
    for (int64_t p = 0; p < P; ++p) {
      const auto st = kl_pixel<acc>(s + p, scs, tbuf + p, kBlock, pb.C, pb.logits, one_sweep);
      kl_pixel_grad<acc>(s + p, scs, tbuf + p, kBlock, pb.C, pb.logits, st, scale[p], gs ? gs + p : nullptr, gscs,
                         gtbuf ? gtbuf + p : nullptr, kBlock);
      if (kl) kl[p] = st.kl;
    }
  }
}

std::array<int64_t, 4> strides4(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// Per-pixel weighted KL (B, H*W) and validity weights (B, H*W), in acc.
// Task `task` of the (B, H, blocks of a row) decomposition: batch item, output row, first column.
std::array<int64_t, 3> block_of_task(const Problem& pb, int64_t task, int64_t blocks_per_row) {
  return {task / (pb.H * blocks_per_row), (task / blocks_per_row) % pb.H, (task % blocks_per_row) * kBlock};
}

template <typename scalar_t, typename acc>
void forward_pixels(const Problem& pb, const at::Tensor& s, const at::Tensor& t, const at::Tensor& src_acc,
                    const at::Tensor& params_acc, at::Tensor& kl, at::Tensor& weights,
                    const SizedAxes<acc>* sized = nullptr, const cpu::PixelStats<acc>* stats = nullptr) {
  const scalar_t* sp = s.const_data_ptr<scalar_t>();
  const scalar_t* tp = t.const_data_ptr<scalar_t>();
  const acc* srcp = src_acc.const_data_ptr<acc>();
  const acc* parp = params_acc.const_data_ptr<acc>();
  acc* klp = kl.mutable_data_ptr<acc>();
  acc* wp = weights.mutable_data_ptr<acc>();
  const auto ss = strides4(s), ts = strides4(t);
  const int64_t blocks_per_row = (pb.W + kBlock - 1) / kBlock;
  // The KL block math reads the student tensor in place when its pixels are adjacent.
  const bool s_direct = std::is_same_v<scalar_t, acc> && ss[3] == 1;
  at::parallel_for(0, pb.B * pb.H * blocks_per_row, 1, [&](int64_t begin, int64_t end) {
    Block<acc> blk;
    std::vector<acc> sbuf(pb.C * kBlock), tbuf(pb.C * kBlock);
    acc out[kBlock];
    auto pairs = std::make_unique<PairBlock>();
    pairs->sh = static_cast<int32_t>(ts[2]);
    pairs->coords = false;
    PairBlock* pp = !sized && use_pairs<scalar_t, acc>(pb, ts.data()) ? pairs.get() : nullptr;
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, i, j0] = block_of_task(pb, task, blocks_per_row);
      locate_block<scalar_t, acc>(pb, srcp + b * pb.n * 2, parp + b * (pb.n + 3) * 2, i, j0, blk, pp);
      const int64_t o = b * pb.H * pb.W + i * pb.W + j0;
      if (sized) {
        gather_block_sized<scalar_t, acc>(pb, blk, *sized, sp + b * ss[0], ss, tp + b * ts[0], ts, i, j0, sbuf.data(),
                                          tbuf.data());
        cpu::block_stats<acc>(pb.logits, pb.C, blk.P, sbuf.data(), tbuf.data(), out, stats, o);
      } else {
        gather_block<scalar_t, acc>(pb, blk, sp + b * ss[0], ss.data(), tp + b * ts[0], ts.data(), i, j0, sbuf.data(),
                                    tbuf.data(), nullptr, nullptr, pp, !s_direct);
        if (s_direct)
          block_kl<acc>(pb, blk.P, reinterpret_cast<const acc*>(sp) + b * ss[0] + i * ss[2] + j0, ss[1], tbuf.data(),
                        out);
        else
          block_kl<acc>(pb, blk.P, sbuf.data(), kBlock, tbuf.data(), out);
      }
      for (int64_t p = 0; p < blk.P; ++p) {
        wp[o + p] = blk.valid[p];
        klp[o + p] = blk.valid[p] != acc(0) ? out[p] : acc(0);
      }
    }
  });
}

// The validity weights alone (the mean's denominator of the backward): the TPS map and the hull
// test, no gather and no KL.
template <typename acc>
void valid_pixels(const Problem& pb, const at::Tensor& src_acc, const at::Tensor& params_acc, at::Tensor& weights) {
  const acc* srcp = src_acc.const_data_ptr<acc>();
  const acc* parp = params_acc.const_data_ptr<acc>();
  acc* wp = weights.mutable_data_ptr<acc>();
  const int64_t blocks_per_row = (pb.W + kBlock - 1) / kBlock;
  at::parallel_for(0, pb.B * pb.H * blocks_per_row, 16, [&](int64_t begin, int64_t end) {
    Block<acc> blk;
    // float32: the vectorized row-pair taps (their offsets are not used: any row stride will do)
    auto pairs = std::make_unique<PairBlock>();
    pairs->sh = 0;
    pairs->coords = false;
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, i, j0] = block_of_task(pb, task, blocks_per_row);
      locate_block<float, acc>(pb, srcp + b * pb.n * 2, parp + b * (pb.n + 3) * 2, i, j0, blk, pairs.get());
      const int64_t o = b * pb.H * pb.W + i * pb.W + j0;
      for (int64_t p = 0; p < blk.P; ++p) wp[o + p] = blk.valid[p];
    }
  });
}

// True when `size` is given and changes an input (else the full-resolution path serves it:
// F.interpolate to the input's own size is the identity).
bool uses_size(const at::Tensor& student, const at::Tensor& teacher, at::OptionalIntArrayRef size) {
  if (!size.has_value()) return false;
  cpu::check_kl_size(size, student, teacher, kOp);
  return !(student.sizes().slice(2) == *size && teacher.sizes().slice(2) == *size);
}

void set_size(Problem& pb, at::IntArrayRef size) {
  pb.H = pb.Ht = size[0];
  pb.W = pb.Wt = size[1];
}

at::Tensor warped_kl_div_cpu(const at::Tensor& student_logits, const at::Tensor& teacher, const at::Tensor& src,
                             const at::Tensor& params, bool teacher_is_logits, bool align_corners,
                             c10::string_view reduction, at::OptionalIntArrayRef size) {
  const bool sized = uses_size(student_logits, teacher, size);
  auto pb = make_problem(student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction);
  if (sized) set_size(pb, *size);
  auto kl = at::zeros({pb.B, pb.H * pb.W}, student_logits.options().dtype(pb.acc_dtype));
  auto weights = at::zeros({pb.B, pb.H * pb.W}, kl.options());
  if (kl.numel() > 0 && pb.C > 0 && pb.Ht > 0 && pb.Wt > 0) {
    auto s = student_logits.to(pb.in_dtype);
    auto t = teacher.to(pb.in_dtype);
    auto src_acc = src.to(pb.acc_dtype).contiguous();
    auto params_acc = params.to(pb.acc_dtype).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pb.in_dtype, "warped_kl_div_cpu", [&] {
      auto run = [&](auto acc_tag) {
        using acc = decltype(acc_tag);
        if (sized) {
          const auto axes = make_sized_axes<acc>(pb, s, t);
          forward_pixels<scalar_t, acc>(pb, s, t, src_acc, params_acc, kl, weights, &axes);
        } else {
          forward_pixels<scalar_t, acc>(pb, s, t, src_acc, params_acc, kl, weights);
        }
      };
      if (pb.acc_dtype == at::kDouble)
        run(double{});
      else
        run(float{});
    });
  }
  return kl_reduce(kl, weights, pb.reduction, {pb.B, pb.H, pb.W});
}

template <typename scalar_t, typename acc>
void backward_pixels(const Problem& pb, const at::Tensor& s, const at::Tensor& t, const at::Tensor& src_acc,
                     const at::Tensor& params_acc, const at::Tensor& weights, const at::Tensor& factor,
                     at::Tensor* grad_s, at::Tensor* grad_t_acc, at::Tensor* row_partials,
                     at::Tensor* kl_out = nullptr) {
  const scalar_t* sp = s.const_data_ptr<scalar_t>();
  const scalar_t* tp = t.const_data_ptr<scalar_t>();
  const acc* srcp = src_acc.const_data_ptr<acc>();
  const acc* parp = params_acc.const_data_ptr<acc>();
  const acc* wp = weights.const_data_ptr<acc>();
  const acc* fp = factor.const_data_ptr<acc>();
  const bool per_pixel_factor = factor.dim() != 0;
  const auto ss = strides4(s), ts = strides4(t);
  scalar_t* gsp = grad_s ? grad_s->mutable_data_ptr<scalar_t>() : nullptr;
  const auto gss = grad_s ? strides4(*grad_s) : std::array<int64_t, 4>{0, 0, 0, 0};
  acc* gtp = grad_t_acc ? grad_t_acc->mutable_data_ptr<acc>() : nullptr;  // contiguous (B, C, Ht, Wt)
  acc* rowp = row_partials ? row_partials->mutable_data_ptr<acc>() : nullptr;  // (B * H, 2n + 2(n + 3))
  acc* klp = kl_out ? kl_out->mutable_data_ptr<acc>() : nullptr;  // (B, H * W): the forward's per-pixel KL
  const int64_t n = pb.n, row_len = 2 * n + 2 * (n + 3);
  const acc sx = normalized_to_pixel_scale<acc>(pb.Wt, pb.align_corners);
  const acc sy = normalized_to_pixel_scale<acc>(pb.Ht, pb.align_corners);

  // One task = one output row (b, i): its parameter partials have a fixed owner, and with a
  // teacher gradient the tasks of one image run in order on one thread (deterministic scatter).
  // The row-pair path unless the teacher's gradient is wanted (its scatter reads blk.tap).
  const bool pair_path = gtp == nullptr && use_pairs<scalar_t, acc>(pb, ts.data());
  // The KL block math reads the student and writes its gradient in place when their pixels are adjacent.
  const bool s_direct = std::is_same_v<scalar_t, acc> && ss[3] == 1;
  const bool gs_direct = std::is_same_v<scalar_t, acc> && gsp != nullptr && gss[3] == 1;
  auto run_row = [&](int64_t b, int64_t i, Block<acc>& blk, PairBlock& pairs, acc* sbuf, acc* tbuf, acc* gsbuf,
                     acc* gtbuf, acc* dxbuf, acc* dybuf) {
    acc* part = rowp ? rowp + (b * pb.H + i) * row_len : nullptr;
    pairs.sh = static_cast<int32_t>(ts[2]);
    pairs.coords = part != nullptr;
    PairBlock* pp = pair_path ? &pairs : nullptr;
    acc scale[kBlock];
    for (int64_t j0 = 0; j0 < pb.W; j0 += kBlock) {
      locate_block<scalar_t, acc>(pb, srcp + b * n * 2, parp + b * (n + 3) * 2, i, j0, blk, pp);
      const bool have_coord_grads = gather_block<scalar_t, acc>(pb, blk, sp + b * ss[0], ss.data(), tp + b * ts[0],
                                                                ts.data(), i, j0, sbuf, tbuf, part ? dxbuf : nullptr,
                                                                part ? dybuf : nullptr, pp, !s_direct);
      const int64_t o = b * pb.H * pb.W + i * pb.W + j0;
      for (int64_t p = 0; p < blk.P; ++p) scale[p] = (per_pixel_factor ? fp[o + p] : fp[0]) * wp[o + p];
      const acc* s_blk = s_direct ? reinterpret_cast<const acc*>(sp) + b * ss[0] + i * ss[2] + j0 : sbuf;
      acc* gs_blk = gs_direct ? reinterpret_cast<acc*>(gsp) + b * gss[0] + i * gss[2] + j0 : (gsp ? gsbuf : nullptr);
      block_kl_grad<acc>(pb, blk.P, s_blk, s_direct ? ss[1] : kBlock, tbuf, scale, gs_blk, gs_direct ? gss[1] : kBlock,
                         gtp || part ? gtbuf : nullptr, klp ? klp + o : nullptr);
      if (klp)
        for (int64_t p = 0; p < blk.P; ++p) klp[o + p] = wp[o + p] != acc(0) ? klp[o + p] : acc(0);
      if (gsp && !gs_direct) {
        for (int64_t c = 0; c < pb.C; ++c) {
          scalar_t* dst = gsp + b * gss[0] + c * gss[1] + i * gss[2] + j0 * gss[3];
          for (int64_t p = 0; p < blk.P; ++p) dst[p * gss[3]] = static_cast<scalar_t>(gsbuf[c * kBlock + p]);
        }
      }
      if (gtp) {
        for (int64_t c = 0; c < pb.C; ++c) {
          acc* plane = gtp + (b * pb.C + c) * pb.Ht * pb.Wt;
          for (int64_t p = 0; p < blk.P; ++p)
            bilinear_scatter(blk.tap[p], pb.Wt, 1, gtbuf[c * kBlock + p], [&](int64_t off, acc v) { plane[off] += v; });
        }
      }
      if (part && have_coord_grads) {
        acc dpx[kBlock] = {}, dpy[kBlock] = {};
        for (int64_t c = 0; c < pb.C; ++c) {
          for (int64_t p = 0; p < blk.P; ++p) {
            dpx[p] += gtbuf[c * kBlock + p] * dxbuf[c * kBlock + p];
            dpy[p] += gtbuf[c * kBlock + p] * dybuf[c * kBlock + p];
          }
        }
        if constexpr (std::is_same_v<acc, float>) {
          float gx[kBlock], gy[kBlock];
          for (int64_t p = 0; p < blk.P; ++p) {
            gx[p] = scale[p] != 0.f ? dpx[p] * sx : 0.f;
            gy[p] = scale[p] != 0.f ? dpy[p] * sy : 0.f;
          }
          cpu::warped_tps_block_backward(srcp + b * n * 2, parp + b * (n + 3) * 2, n, blk.qy[0], blk.qx, blk.P, gx,
                                         gy, part);
        }
      } else if (part) {
        for (int64_t p = 0; p < blk.P; ++p) {
          if (scale[p] == acc(0)) continue;
          acc dpx = 0, dpy = 0;
          const BilinearTapPointers<scalar_t, acc> taps(tp + b * ts[0], ts[2], ts[3], blk.tap[p]);  // as the GPU reads it
          const auto k = bilinear_coord_coefs(blk.tap[p]);
          for (int64_t c = 0; c < pb.C; ++c) {
            const auto d = taps.coord_at(c * ts[1], k);
            dpx += gtbuf[c * kBlock + p] * d.x;
            dpy += gtbuf[c * kBlock + p] * d.y;
          }
          tps_eval_backward<acc>(blk.qx[p], blk.qy[p], srcp + b * n * 2, parp + b * (n + 3) * 2, n,
                                 Vec2<acc>{dpx * sx, dpy * sy}, part, part + 2 * n);
        }
      }
    }
  };

  auto with_buffers = [&](auto&& body) {
    Block<acc> blk;
    auto pairs = std::make_unique<PairBlock>();
    const int64_t coord = rowp ? pb.C * kBlock : 0;
    std::vector<acc> sbuf(pb.C * kBlock), tbuf(pb.C * kBlock), gsbuf(pb.C * kBlock), gtbuf(pb.C * kBlock);
    std::vector<acc> dxbuf(coord), dybuf(coord);
    body(blk, *pairs, sbuf.data(), tbuf.data(), gsbuf.data(), gtbuf.data(), dxbuf.data(), dybuf.data());
  };
  if (gtp) {
    at::parallel_for(0, pb.B, 1, [&](int64_t begin, int64_t end) {
      with_buffers([&](Block<acc>& blk, PairBlock& pr, acc* sb, acc* tb, acc* gsb, acc* gtb, acc* dxb, acc* dyb) {
        for (int64_t b = begin; b < end; ++b)
          for (int64_t i = 0; i < pb.H; ++i) run_row(b, i, blk, pr, sb, tb, gsb, gtb, dxb, dyb);
      });
    });
  } else {
    at::parallel_for(0, pb.B * pb.H, 1, [&](int64_t begin, int64_t end) {
      with_buffers([&](Block<acc>& blk, PairBlock& pr, acc* sb, acc* tb, acc* gsb, acc* gtb, acc* dxb, acc* dyb) {
        for (int64_t r = begin; r < end; ++r) run_row(r / pb.H, r % pb.H, blk, pr, sb, tb, gsb, gtb, dxb, dyb);
      });
    });
  }
}

// Backward with size=(H, W).
// - student (the main path): fused. Pass 1 stores per output pixel statistics and validity
//   (O(B H W)); pass 2 gathers each student input pixel's gradient from the output pixels that
//   read it (cpu::resize_gather_grad: disjoint input rows per task, no atomics, deterministic).
// - teacher / src / params (rare with size): COMPOSED, not fused, as the reference's VJP:
//   the inputs are resized with ATen's upsample_bilinear2d (what F.interpolate calls) in the compute
//   dtype, the full-resolution backward below gives the gradients of the resized teacher, src and
//   params, and upsample_bilinear2d_backward brings the teacher's back to its resolution. This
//   allocates B x C x H x W tensors (documented in tpswarp.warped_kl_div's docstring).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> warped_kl_div_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& student_logits, const at::Tensor& teacher, const at::Tensor& src,
    const at::Tensor& params, bool teacher_is_logits, bool align_corners, c10::string_view reduction,
    at::OptionalIntArrayRef size, std::array<bool, 4> output_mask);

at::Tensor resize_to(const at::Tensor& x, at::IntArrayRef size, at::ScalarType dtype) {
  auto y = x.to(dtype);
  if (y.sizes().slice(2) == size) return y;
  return at::upsample_bilinear2d(y, size, /*align_corners=*/false);
}

// The fused student gradient with size=(H, W) (pass 1 and pass 2 of sized_backward) for the upstream
// gradient grad_loss, into grad_s (B, C, hs, ws); pass 1 leaves the forward's per-pixel KL and
// validity weights in kl and weights (zeros (B, H * W) of the compute dtype on entry).
void sized_student_grad(const Problem& pb, const at::Tensor& grad_loss, const at::Tensor& student_logits,
                        const at::Tensor& teacher, const at::Tensor& src, const at::Tensor& params, at::Tensor& grad_s,
                        at::Tensor& kl, at::Tensor& weights) {
  const int64_t N = pb.H * pb.W;
  auto s = student_logits.to(pb.in_dtype);
  auto t = teacher.to(pb.in_dtype);
  auto src_acc = src.to(pb.acc_dtype).contiguous();
  auto params_acc = params.to(pb.acc_dtype).contiguous();
  auto stats = at::empty({4, pb.B * N}, kl.options());
  at::Tensor gs = grad_s.scalar_type() != pb.in_dtype ? at::empty_like(grad_s, grad_s.options().dtype(pb.in_dtype))
                                                      : grad_s;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pb.in_dtype, "warped_kl_div_backward_cpu_sized", [&] {
    auto run = [&](auto acc_tag) {
      using acc = decltype(acc_tag);
      const auto axes = make_sized_axes<acc>(pb, s, t);
      acc* base = stats.mutable_data_ptr<acc>();
      const cpu::PixelStats<acc> st{base, base + pb.B * N, base + 2 * pb.B * N, base + 3 * pb.B * N};
      // Pass 1: statistics and validity weights (the mean's denominator).
      forward_pixels<scalar_t, acc>(pb, s, t, src_acc, params_acc, kl, weights, &axes, &st);
      auto factor = kl_grad_factor(grad_loss, weights, pb.reduction, pb.B, N, pb.acc_dtype);
      const acc* fp = factor.const_data_ptr<acc>();
      const bool per_pixel_factor = factor.dim() != 0;
      const acc* wp = weights.const_data_ptr<acc>();
      const acc* srcp = src_acc.const_data_ptr<acc>();
      const acc* parp = params_acc.const_data_ptr<acc>();
      const scalar_t* sp = s.const_data_ptr<scalar_t>();
      const scalar_t* tp = t.const_data_ptr<scalar_t>();
      const auto ss = strides4(s), ts = strides4(t);
      // Pass 2: the gradient w.r.t. the resized student of output row r, gathered per student input row.
      auto row_grad = [&](int64_t b, int64_t r, acc* buf, acc* scratch) {
        Block<acc> blk;
        acc* sbuf = scratch;  // [C][kBlock] resized student
        acc* tbuf = sbuf + pb.C * kBlock;  // [C][kBlock] warped resized teacher
        acc scale[kBlock];
        for (int64_t j0 = 0; j0 < pb.W; j0 += kBlock) {
          locate_block<scalar_t, acc>(pb, srcp + b * pb.n * 2, parp + b * (pb.n + 3) * 2, r, j0, blk);
          gather_block_sized<scalar_t, acc>(pb, blk, axes, sp + b * ss[0], ss, tp + b * ts[0], ts, r, j0, sbuf, tbuf);
          const int64_t o = b * N + r * pb.W + j0;
          for (int64_t p = 0; p < blk.P; ++p) scale[p] = (per_pixel_factor ? fp[o + p] : fp[0]) * wp[o + p];
          cpu::block_grad_from_stats<acc>(pb.logits, pb.C, blk.P, sbuf, tbuf, st, o, scale, buf + j0, nullptr, pb.W);
        }
      };
      cpu::resize_gather_grad<acc, scalar_t>(pb.B, pb.C, axes.sy, axes.sx, gs.mutable_data_ptr<scalar_t>(), strides4(gs),
                                             2 * pb.C * kBlock, row_grad);
    };
    if (pb.acc_dtype == at::kDouble)
      run(double{});
    else
      run(float{});
  });
  if (!gs.is_same(grad_s)) grad_s.copy_(gs);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sized_backward(
    const at::Tensor& grad_loss, const at::Tensor& student_logits, const at::Tensor& teacher, const at::Tensor& src,
    const at::Tensor& params, bool teacher_is_logits, bool align_corners, c10::string_view reduction,
    at::IntArrayRef size, std::array<bool, 4> output_mask) {
  auto pb = make_problem(student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction);
  set_size(pb, size);
  auto placeholder = [](const at::Tensor& x) { return at::empty({0}, x.options()); };
  at::Tensor grad_s = output_mask[0] ? at::empty_like(student_logits) : placeholder(student_logits);
  at::Tensor grad_t = placeholder(teacher), grad_src = placeholder(src), grad_params = placeholder(params);
  const int64_t N = pb.H * pb.W;

  if (output_mask[1] || output_mask[2] || output_mask[3]) {  // composed (see above)
    auto s_up = resize_to(student_logits, size, pb.acc_dtype);
    auto t_up = resize_to(teacher, size, pb.acc_dtype);
    auto g = warped_kl_div_backward_cpu(grad_loss, s_up, t_up, src, params, teacher_is_logits, align_corners,
                                        reduction, std::nullopt, {false, output_mask[1], output_mask[2], output_mask[3]});
    if (output_mask[1]) {
      auto gt_up = std::get<1>(g);
      auto gt = teacher.sizes().slice(2) == size
                    ? gt_up
                    : at::upsample_bilinear2d_backward(gt_up, size, teacher.sizes(), /*align_corners=*/false);
      grad_t = at::empty_like(teacher);
      grad_t.copy_(gt);
    }
    grad_src = std::get<2>(g);
    grad_params = std::get<3>(g);
  }
  if (!output_mask[0]) return {grad_s, grad_t, grad_src, grad_params};
  if (pb.B * N == 0 || pb.C == 0) {
    grad_s.zero_();
    return {grad_s, grad_t, grad_src, grad_params};
  }
  auto kl = at::zeros({pb.B, N}, student_logits.options().dtype(pb.acc_dtype));
  auto weights = at::zeros({pb.B, N}, kl.options());
  sized_student_grad(pb, grad_loss, student_logits, teacher, src, params, grad_s, kl, weights);
  return {grad_s, grad_t, grad_src, grad_params};
}

// The full-resolution backward (backward_pixels) into the gradients output_mask asks for (grad_t, grad_src
// and grad_params zeros on entry); with kl_out, the same pass also stores the forward's per-pixel KL
// there ((B, H * W) of the compute dtype). Returns the validity weights (B, H * W).
at::Tensor full_backward(const Problem& pb, const at::Tensor& grad_loss, const at::Tensor& student_logits,
                         const at::Tensor& teacher, const at::Tensor& src, const at::Tensor& params,
                         std::array<bool, 4> output_mask, at::Tensor& grad_s, at::Tensor& grad_t, at::Tensor& grad_src,
                         at::Tensor& grad_params, at::Tensor* kl_out = nullptr) {
  const bool need_coords = output_mask[2] || output_mask[3];
  const int64_t N = pb.H * pb.W;
  auto s = student_logits.to(pb.in_dtype);
  auto t = teacher.to(pb.in_dtype);
  auto src_acc = src.to(pb.acc_dtype).contiguous();
  auto params_acc = params.to(pb.acc_dtype).contiguous();
  // The validity weights first (the mean's denominator), then the gradients.
  auto weights = at::empty({pb.B, N}, student_logits.options().dtype(pb.acc_dtype));
  if (pb.acc_dtype == at::kDouble)
    valid_pixels<double>(pb, src_acc, params_acc, weights);
  else
    valid_pixels<float>(pb, src_acc, params_acc, weights);
  auto factor = kl_grad_factor(grad_loss, weights, pb.reduction, pb.B, N, pb.acc_dtype);

  at::Tensor gs = output_mask[0] && grad_s.scalar_type() != pb.in_dtype
                      ? at::empty_like(grad_s, grad_s.options().dtype(pb.in_dtype))
                      : grad_s;
  at::Tensor gt_acc = output_mask[1] ? at::zeros({pb.B, pb.C, pb.Ht, pb.Wt}, weights.options()) : at::Tensor();
  at::Tensor partials =
      need_coords ? at::zeros({pb.B * pb.H, 2 * pb.n + 2 * (pb.n + 3)}, weights.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pb.in_dtype, "warped_kl_div_backward_cpu", [&] {
    auto run = [&](auto acc_tag) {
      using acc = decltype(acc_tag);
      backward_pixels<scalar_t, acc>(pb, s, t, src_acc, params_acc, weights, factor, output_mask[0] ? &gs : nullptr,
                                     output_mask[1] ? &gt_acc : nullptr, need_coords ? &partials : nullptr, kl_out);
    };
    if (pb.acc_dtype == at::kDouble)
      run(double{});
    else
      run(float{});
  });
  if (output_mask[0] && !gs.is_same(grad_s)) grad_s.copy_(gs);
  if (output_mask[1]) grad_t.copy_(gt_acc);
  if (need_coords) {
    // Rows summed in a fixed order (deterministic whatever the thread count).
    auto per_item = partials.view({pb.B, pb.H, -1}).sum(1);
    if (output_mask[2]) grad_src.copy_(per_item.narrow(1, 0, 2 * pb.n).view({pb.B, pb.n, 2}));
    if (output_mask[3]) grad_params.copy_(per_item.narrow(1, 2 * pb.n, 2 * (pb.n + 3)).view({pb.B, pb.n + 3, 2}));
  }
  return weights;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> warped_kl_div_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& student_logits, const at::Tensor& teacher, const at::Tensor& src,
    const at::Tensor& params, bool teacher_is_logits, bool align_corners, c10::string_view reduction,
    at::OptionalIntArrayRef size, std::array<bool, 4> output_mask) {
  if (uses_size(student_logits, teacher, size))
    return sized_backward(grad_loss, student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction,
                          *size, output_mask);
  const auto pb = make_problem(student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction);
  const bool need_coords = output_mask[2] || output_mask[3];
  auto placeholder = [](const at::Tensor& x) { return at::empty({0}, x.options()); };
  at::Tensor grad_s = output_mask[0] ? at::empty_like(student_logits) : placeholder(student_logits);
  at::Tensor grad_t = output_mask[1] ? at::zeros_like(teacher) : placeholder(teacher);
  at::Tensor grad_src = output_mask[2] ? at::zeros_like(src) : placeholder(src);
  at::Tensor grad_params = output_mask[3] ? at::zeros_like(params) : placeholder(params);
  const int64_t N = pb.H * pb.W;
  if (pb.B * N == 0 || pb.C == 0 || pb.Ht == 0 || pb.Wt == 0 || !(output_mask[0] || output_mask[1] || need_coords)) {
    if (output_mask[0]) grad_s.zero_();
    return {grad_s, grad_t, grad_src, grad_params};
  }
  full_backward(pb, grad_loss, student_logits, teacher, src, params, output_mask, grad_s, grad_t, grad_src,
                grad_params);
  return {grad_s, grad_t, grad_src, grad_params};
}

// tpswarp::_warped_kl_div_with_grad: the loss and its gradient w.r.t. student_logits for an upstream
// gradient of 1, from one pass over the inputs (the gather and statistics of the forward serve the
// gradient too). For reduction "mean" / "sum"; the Python autograd formula scales by the upstream gradient.
std::tuple<at::Tensor, at::Tensor> warped_kl_div_with_grad_cpu(const at::Tensor& student_logits,
                                                              const at::Tensor& teacher, const at::Tensor& src,
                                                              const at::Tensor& params, bool teacher_is_logits,
                                                              bool align_corners, c10::string_view reduction,
                                                              at::OptionalIntArrayRef size) {
  const bool sized = uses_size(student_logits, teacher, size);
  auto pb = make_problem(student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction);
  TORCH_CHECK_VALUE(pb.reduction != Reduction::None, "_warped_kl_div_with_grad: `reduction` must be 'mean' or 'sum', ",
                    "got 'none'");
  if (sized) set_size(pb, *size);
  auto kl = at::zeros({pb.B, pb.H * pb.W}, student_logits.options().dtype(pb.acc_dtype));
  auto weights = at::zeros({pb.B, pb.H * pb.W}, kl.options());
  auto grad_s = at::empty_like(student_logits);
  const auto one = at::ones({}, kl.options());
  if (kl.numel() == 0 || pb.C == 0 || pb.Ht == 0 || pb.Wt == 0) {
    grad_s.zero_();
  } else if (sized) {
    sized_student_grad(pb, one, student_logits, teacher, src, params, grad_s, kl, weights);
  } else {
    auto unused = at::empty({0}, kl.options());
    weights = full_backward(pb, one, student_logits, teacher, src, params, {true, false, false, false}, grad_s, unused,
                            unused, unused, &kl);
  }
  return {kl_reduce(kl, weights, pb.reduction, {pb.B, pb.H, pb.W}), grad_s};
}

// tpswarp::_warped_kl_div_with_stats and _warped_kl_div_backward_stats: the per-pixel code of the CUDA
// kernels (warp_pixel of tpswarp/warped_kl.h, one-sweep statistics, kl_stats_store / kl_stats_load),
// scalar, so that the CPU tests check the GPU's math. Not routed to on the CPU: the gradient in the
// forward (_warped_kl_div_with_grad) and the blocked kernels serve the CPU's calls.
WarpedKlGeometry twin_geometry(const Problem& pb) {
  return {pb.B, pb.C, pb.H, pb.W, pb.Ht, pb.Wt, pb.n, pb.logits, pb.align_corners};
}

std::tuple<at::Tensor, at::Tensor> warped_kl_div_with_stats_cpu(const at::Tensor& student_logits,
                                                                const at::Tensor& teacher, const at::Tensor& src,
                                                                const at::Tensor& params, bool teacher_is_logits,
                                                                bool align_corners, c10::string_view reduction) {
  const auto pb = make_problem(student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction);
  const int64_t N = pb.H * pb.W;
  auto kl = at::zeros({pb.B, N}, student_logits.options().dtype(pb.acc_dtype));
  auto stats = at::zeros({pb.B, kWarpedKlStats, N}, kl.options());
  if (kl.numel() > 0 && pb.C > 0 && pb.Ht > 0 && pb.Wt > 0) {
    auto s = student_logits.to(pb.in_dtype);
    auto t = teacher.to(pb.in_dtype);
    auto src_acc = src.to(pb.acc_dtype).contiguous();
    auto params_acc = params.to(pb.acc_dtype).contiguous();
    const auto g = twin_geometry(pb);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pb.in_dtype, "warped_kl_div_with_stats_cpu", [&] {
      auto run = [&](auto acc_tag) {
        using acc = decltype(acc_tag);
        const scalar_t* sp = s.const_data_ptr<scalar_t>();
        const scalar_t* tp = t.const_data_ptr<scalar_t>();
        const auto ss = strides4(s), ts = strides4(t);
        acc* klp = kl.mutable_data_ptr<acc>();
        acc* stp = stats.mutable_data_ptr<acc>();
        at::parallel_for(0, pb.B * N, std::max<int64_t>(1, 4096 / pb.C), [&](int64_t begin, int64_t end) {
          for (int64_t e = begin; e < end; ++e) {
            const int64_t b = e / N, k = e % N, i = k / pb.W, j = k % pb.W;
            const auto w = warp_pixel<acc>(g, src_acc.const_data_ptr<acc>() + b * pb.n * 2,
                                           params_acc.const_data_ptr<acc>() + b * (pb.n + 3) * 2, i, j);
            if (!w.valid) continue;  // loss, statistics and weight 0
            const scalar_t* spx = sp + b * ss[0] + i * ss[2] + j * ss[3];
            const BilinearTapPointers<scalar_t, acc> taps(tp + b * ts[0], ts[2], ts[3], w.tap);  // as the GPU reads it
            const auto st = kl_pixel_online_loaded<acc>(
                [&](int64_t c) { return static_cast<acc>(spx[c * ss[1]]); },
                [&](int64_t c) { return taps.at(c * ts[1]); }, pb.C, pb.logits);
            klp[e] = st.kl;
            acc* st_b = stp + b * kWarpedKlStats * N;
            kl_stats_store(st, pb.logits, st_b + k, N);
            st_b[kKlStats * N + k] = acc(1);
          }
        });
      };
      if (pb.acc_dtype == at::kDouble)
        run(double{});
      else
        run(float{});
    });
  }
  auto weights = stats.select(1, kKlStats);
  return {kl_reduce(kl, weights, pb.reduction, {pb.B, pb.H, pb.W}), stats};
}

at::Tensor warped_kl_div_backward_stats_cpu(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                                            const at::Tensor& teacher, const at::Tensor& src, const at::Tensor& params,
                                            const at::Tensor& stats, bool teacher_is_logits, bool align_corners,
                                            c10::string_view reduction) {
  const auto pb = make_problem(student_logits, teacher, src, params, teacher_is_logits, align_corners, reduction);
  const int64_t N = pb.H * pb.W;
  check_kl_stats(stats, pb.B, kWarpedKlStats, N, pb.acc_dtype, student_logits, kOp);
  at::Tensor grad_s = at::empty_like(student_logits);
  if (pb.B * N == 0 || pb.C == 0 || pb.Ht == 0 || pb.Wt == 0) return grad_s.zero_();
  auto factor = kl_grad_factor(grad_loss, stats.select(1, kKlStats), pb.reduction, pb.B, N, pb.acc_dtype);
  at::Tensor gs = grad_s.scalar_type() != pb.in_dtype ? at::empty_like(grad_s, grad_s.options().dtype(pb.in_dtype))
                                                      : grad_s;
  auto s = student_logits.to(pb.in_dtype);
  auto t = teacher.to(pb.in_dtype);
  auto src_acc = src.to(pb.acc_dtype).contiguous();
  auto params_acc = params.to(pb.acc_dtype).contiguous();
  const auto g = twin_geometry(pb);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pb.in_dtype, "warped_kl_div_backward_stats_cpu", [&] {
    auto run = [&](auto acc_tag) {
      using acc = decltype(acc_tag);
      const scalar_t* sp = s.const_data_ptr<scalar_t>();
      const scalar_t* tp = t.const_data_ptr<scalar_t>();
      const auto ss = strides4(s), ts = strides4(t), gss = strides4(gs);
      scalar_t* gp = gs.mutable_data_ptr<scalar_t>();
      const acc* fp = factor.const_data_ptr<acc>();
      const int64_t f_step = factor.dim() == 0 ? 0 : 1;
      const acc* stp = stats.const_data_ptr<acc>();
      at::parallel_for(0, pb.B * N, std::max<int64_t>(1, 4096 / pb.C), [&](int64_t begin, int64_t end) {
        for (int64_t e = begin; e < end; ++e) {
          const int64_t b = e / N, k = e % N, i = k / pb.W, j = k % pb.W;
          const acc* st_b = stp + b * kWarpedKlStats * N;
          const acc scale = fp[e * f_step] * st_b[kKlStats * N + k];
          scalar_t* gpx = gp + b * gss[0] + i * gss[2] + j * gss[3];
          if (scale == acc(0)) {
            for (int64_t c = 0; c < pb.C; ++c) gpx[c * gss[1]] = scalar_t(0);
            continue;
          }
          const auto w = warp_pixel<acc>(g, src_acc.const_data_ptr<acc>() + b * pb.n * 2,
                                         params_acc.const_data_ptr<acc>() + b * (pb.n + 3) * 2, i, j);
          const scalar_t* spx = sp + b * ss[0] + i * ss[2] + j * ss[3];
          const BilinearTapPointers<scalar_t, acc> taps(tp + b * ts[0], ts[2], ts[3], w.tap);
          kl_pixel_grad_loaded<acc>(
              [&](int64_t c) { return static_cast<acc>(spx[c * ss[1]]); }, [&](int64_t c) { return taps.at(c * ts[1]); },
              pb.C, pb.logits, kl_stats_load(st_b + k, N, pb.logits), scale, true,
              [&](int64_t c, acc v) { gpx[c * gss[1]] = static_cast<scalar_t>(v); }, false, [](int64_t, acc) {});
        }
      });
    };
    if (pb.acc_dtype == at::kDouble)
      run(double{});
    else
      run(float{});
  });
  if (!gs.is_same(grad_s)) grad_s.copy_(gs);
  return grad_s;
}

}  // namespace

TORCH_LIBRARY_IMPL(tpswarp, CPU, m) {
  m.impl("warped_kl_div", &warped_kl_div_cpu);
  m.impl("_warped_kl_div_backward", &warped_kl_div_backward_cpu);
  m.impl("_warped_kl_div_with_grad", &warped_kl_div_with_grad_cpu);
  m.impl("_warped_kl_div_with_stats", &warped_kl_div_with_stats_cpu);
  m.impl("_warped_kl_div_backward_stats", &warped_kl_div_backward_stats_cpu);
}

}  // namespace tpswarp
