// CPU side of the `size=` argument of masked_kl_div / warped_kl_div: logits at a lower (or any)
// resolution are read through the F.interpolate(mode="bilinear", align_corners=False) taps of
// tpswarp/upsample.h as if they had been resized to the output size (H, W) first, and the
// gradient of a resized input is gathered per input pixel from the output pixels that read it
// (deterministic, no atomics). Nothing of size B x C x H x W is allocated: the backward keeps
// O(B H W) per-pixel statistics and per-thread buffers of a few output rows.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/OptionalArrayRef.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include "tpswarp/cpu_kl_block.h"
#include "tpswarp/kl.h"
#include "tpswarp/show.h"
#include "tpswarp/upsample.h"

namespace tpswarp {
namespace cpu {

// Host checks of `size` shared by both ops (the Python wrappers check the same first).
inline void check_kl_size(at::OptionalIntArrayRef size, const at::Tensor& student, const at::Tensor& teacher,
                          const char* op) {
  TORCH_CHECK_VALUE(size->size() == 2 && (*size)[0] > 0 && (*size)[1] > 0, op,
                    ": `size` must be None or two positive ints (H, W), got ", show(*size));
  TORCH_CHECK_VALUE(student.dim() == 4 && teacher.dim() == 4, op,
                    ": `size` needs 4-D (B, C, H, W) inputs (2-D spatial only), got `student_logits` ",
                    show(student.sizes()), " and `teacher` ", show(teacher.sizes()));
  TORCH_CHECK_VALUE(teacher.size(0) == student.size(0) && teacher.size(1) == student.size(1), op, ": `teacher` ",
                    show(teacher.sizes()), " and `student_logits` ", show(student.sizes()),
                    " must agree in batch size and classes");
  TORCH_CHECK_VALUE(student.size(2) > 0 && student.size(3) > 0, op,
                    ": `student_logits` must have a non-empty spatial size to be resized to `size`, got ",
                    show(student.sizes()));
  TORCH_CHECK_VALUE(teacher.size(2) > 0 && teacher.size(3) > 0, op,
                    ": `teacher` must have a non-empty spatial size to be resized to `size`, got ",
                    show(teacher.sizes()));
}

// The taps of one axis resized from `in` to `out`: per output index its two input taps, per input
// index the output range that reads it and the weights of those readers (flattened).
template <typename acc> struct ResizeAxis {
  int64_t in = 0, out = 0;
  std::vector<LinearTap<acc>> tap;    // [out]
  std::vector<int64_t> begin, end;    // [in]: readers [begin, end)
  std::vector<int64_t> woff;          // [in + 1]: offsets into w
  std::vector<acc> w;                 // weight of reader begin + k of input index y at woff[y] + k
};

template <typename acc> ResizeAxis<acc> make_resize_axis(int64_t in, int64_t out) {
  ResizeAxis<acc> a;
  a.in = in;
  a.out = out;
  const acc scale = linear_resize_scale<acc>(in, out);
  a.tap.resize(out);
  for (int64_t d = 0; d < out; ++d) a.tap[d] = linear_resize_tap<acc>(d, in, scale);
  a.begin.resize(in);
  a.end.resize(in);
  a.woff.assign(in + 1, 0);
  for (int64_t y = 0; y < in; ++y) {
    const auto r = linear_resize_readers<acc>(y, in, out, scale);
    a.begin[y] = r.begin;
    a.end[y] = r.end;
    a.woff[y + 1] = a.woff[y] + (r.end - r.begin);
    for (int64_t d = r.begin; d < r.end; ++d) a.w.push_back(linear_resize_weight<acc>(a.tap[d], y));
  }
  return a;
}

// Value at the resized position (ty, tx) of one channel plane with strides (sh, sw), in acc:
// the row taps outside, the column taps inside, as upsample_bilinear2d.
template <typename scalar_t, typename acc>
inline acc resize_sample(const scalar_t* plane, int64_t sh, int64_t sw, const LinearTap<acc>& ty,
                         const LinearTap<acc>& tx) {
  const scalar_t* r0 = plane + ty.i0 * sh;
  const scalar_t* r1 = plane + ty.i1 * sh;
  const acc a = tx.l0 * static_cast<acc>(r0[tx.i0 * sw]) + tx.l1 * static_cast<acc>(r0[tx.i1 * sw]);
  const acc b = tx.l0 * static_cast<acc>(r1[tx.i0 * sw]) + tx.l1 * static_cast<acc>(r1[tx.i1 * sw]);
  return ty.l0 * a + ty.l1 * b;
}

// The resized values of output pixels (row ty, columns tx[0..P)) of image `img` (strides st[4],
// already offset to the batch item) into buf[c * kKLBlock + p].
template <typename scalar_t, typename acc>
inline void gather_resized(const scalar_t* img, const std::array<int64_t, 4>& st, int64_t C, const LinearTap<acc>& ty,
                           const LinearTap<acc>* tx, int64_t P, acc* buf) {
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* plane = img + c * st[1];
    acc* out = buf + c * kKLBlock;
    for (int64_t p = 0; p < P; ++p) out[p] = resize_sample<scalar_t, acc>(plane, st[2], st[3], ty, tx[p]);
  }
}

// Per-pixel statistics of the output pixels kept between the two passes of the backward, (B * H * W) each.
template <typename acc> struct PixelStats {
  acc* lse_s;  // s_max + log_zs
  acc* lse_t;  // t_max + log_zt (teacher logits), else 0
  acc* p_sum;
  acc* kl;
};

// KL statistics of a gathered block (sbuf / tbuf as [C][kKLBlock]): kl[p] always, and the
// per-pixel statistics at `st + o` when `st` is non-null.
template <typename acc>
inline void block_stats(bool logits, int64_t C, int64_t P, const acc* sbuf, const acc* tbuf, acc* kl,
                        const PixelStats<acc>* st, int64_t o) {
  if constexpr (std::is_same_v<acc, float>) {
    KLBlockStats b;
    if (logits)
      kl_block_stats<float, float, true>(sbuf, kKLBlock, tbuf, kKLBlock, C, P, b);
    else
      kl_block_stats<float, float, false>(sbuf, kKLBlock, tbuf, kKLBlock, C, P, b);
    for (int64_t p = 0; p < P; ++p) {
      kl[p] = b.kl[p];
      if (st) {
        st->lse_s[o + p] = b.s_max[p] + b.log_zs[p];
        st->lse_t[o + p] = logits ? b.t_max[p] + b.log_zt[p] : 0.f;
        st->p_sum[o + p] = b.p_sum[p];
        st->kl[o + p] = b.kl[p];
      }
    }
  } else {
    const bool one_sweep = kl_one_sweep();
    for (int64_t p = 0; p < P; ++p) {
      const auto r = kl_pixel<acc>(sbuf + p, kKLBlock, tbuf + p, kKLBlock, C, logits, one_sweep);
      kl[p] = r.kl;
      if (st) {
        st->lse_s[o + p] = r.s_max + r.log_zs;
        st->lse_t[o + p] = logits ? r.t_max + r.log_zt : acc(0);
        st->p_sum[o + p] = r.p_sum;
        st->kl[o + p] = r.kl;
      }
    }
  }
}

// Gradients of scale[p] * KL_p w.r.t. the gathered (resized) student / teacher values of a block,
// from the stored statistics at `st + o`: written to gs / gt (either may be null) at
// gs[c * ld + p]. scale 0 writes exact zeros.
template <typename acc>
inline void block_grad_from_stats(bool logits, int64_t C, int64_t P, const acc* sbuf, const acc* tbuf,
                                  const PixelStats<acc>& st, int64_t o, const acc* scale, acc* gs, acc* gt,
                                  int64_t ld) {
  if constexpr (std::is_same_v<acc, float>) {
    KLBlockStats b;
    for (int64_t p = 0; p < P; ++p) {
      b.s_max[p] = st.lse_s[o + p];
      b.log_zs[p] = 0.f;
      b.t_max[p] = st.lse_t[o + p];
      b.log_zt[p] = 0.f;
      b.p_sum[p] = st.p_sum[o + p];
      b.kl[p] = st.kl[o + p];
    }
    if (logits)
      kl_block_grad<float, float, float, true>(sbuf, kKLBlock, tbuf, kKLBlock, C, P, b, scale, gs, ld, gt, ld);
    else
      kl_block_grad<float, float, float, false>(sbuf, kKLBlock, tbuf, kKLBlock, C, P, b, scale, gs, ld, gt, ld);
  } else {
    for (int64_t p = 0; p < P; ++p) {
      acc* gsp = gs ? gs + p : nullptr;
      acc* gtp = gt ? gt + p : nullptr;
      if (scale[p] == acc(0)) {  // masked out: exact zeros, whatever the logits
        for (int64_t c = 0; c < C; ++c) {
          if (gsp) gsp[c * ld] = acc(0);
          if (gtp) gtp[c * ld] = acc(0);
        }
        continue;
      }
      KLPixel<acc> r;
      r.s_max = st.lse_s[o + p];
      r.log_zs = 0;
      r.t_max = st.lse_t[o + p];
      r.log_zt = 0;
      r.p_sum = st.p_sum[o + p];
      r.kl = st.kl[o + p];
      kl_pixel_grad<acc>(sbuf + p, kKLBlock, tbuf + p, kKLBlock, C, logits, r, scale[p], gsp, ld, gtp, ld);
    }
  }
}

// Gradient of a resized input (B, C, ay.in, ax.in), written to `grad` (strides gst, dtype G):
// row_grad(b, r, buf, scratch) fills buf[c * W + j] with the gradient w.r.t. the resized value of
// output pixel (b, c, r, j), W = ax.out; `scratch` is a per-thread buffer of `scratch_size` acc.
//
// Parallel over disjoint input rows (no atomics). Each output row is gathered along the columns
// once, hrow[c][x] = sum_j wx(j, x) g[c][j] over the readers j of column x, and kept in a small
// per-thread ring while the next input rows (consecutive tasks of a thread) still read it; an
// input row then sums wy(r, y) hrow_r over its reader rows r in increasing order. hrow_r does not
// depend on which thread computed it, so the result is the same whatever the thread count.
template <typename acc, typename G, typename RowGrad>
void resize_gather_grad(int64_t B, int64_t C, const ResizeAxis<acc>& ay, const ResizeAxis<acc>& ax, G* grad,
                        const std::array<int64_t, 4>& gst, int64_t scratch_size, const RowGrad& row_grad) {
  const int64_t W = ax.out, win = ax.in;
  int64_t ring = 1;  // the longest reader range of an input row
  for (int64_t y = 0; y < ay.in; ++y) ring = std::max(ring, ay.end[y] - ay.begin[y]);
  at::parallel_for(0, B * ay.in, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> rowbuf(C * W), accum(C * win), scratch(scratch_size), hrows(ring * C * win);
    int64_t cached_b = -1, cached_end = 0;  // hrow of rows [.., cached_end) of item cached_b are in the ring
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / ay.in, y = task % ay.in;
      const int64_t rb = ay.begin[y], re = ay.end[y];
      if (b != cached_b) {
        cached_b = b;
        cached_end = rb;
      }
      for (int64_t r = std::max(cached_end, rb); r < re; ++r) {  // rows not gathered yet
        row_grad(b, r, rowbuf.data(), scratch.data());
        acc* h = hrows.data() + (r % ring) * C * win;
        for (int64_t c = 0; c < C; ++c) {
          const acc* g = rowbuf.data() + c * W;
          for (int64_t x = 0; x < win; ++x) {
            const acc* wx = ax.w.data() + ax.woff[x];
            acc sum = 0;
            for (int64_t k = 0, ox = ax.begin[x]; ox < ax.end[x]; ++k, ++ox) sum += wx[k] * g[ox];
            h[c * win + x] = sum;
          }
        }
      }
      cached_end = std::max(cached_end, re);
      std::fill(accum.begin(), accum.end(), acc(0));
      for (int64_t r = rb; r < re; ++r) {
        const acc wy = ay.w[ay.woff[y] + (r - rb)];
        if (wy == acc(0)) continue;
        const acc* h = hrows.data() + (r % ring) * C * win;
        for (int64_t i = 0; i < C * win; ++i) accum[i] += wy * h[i];
      }
      G* out = grad + b * gst[0] + y * gst[2];
      for (int64_t c = 0; c < C; ++c)
        for (int64_t x = 0; x < win; ++x) out[c * gst[1] + x * gst[3]] = static_cast<G>(accum[c * win + x]);
    }
  });
}

inline std::array<int64_t, 4> strides4(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

}  // namespace cpu
}  // namespace tpswarp
