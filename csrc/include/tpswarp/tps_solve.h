// The TPS interpolation system of one batch item, its singularity test and its solve in double
// with partial pivoting; forward and backward. Shared by the CPU and CUDA kernels.
//
// System (N = n + 3):   L = [[K + reg I, P], [P^T, 0]],  K_ij = phi(|c_i - c_j|),  P_i = [1, x_i, y_i],
//                       L params = [dst; 0]                (params: (N, 2), rows W_0..W_{n-1}, A_0, A_1, A_2).
// Backward: L is symmetric, so grad_rhs = L^-T grad_params = L^-1 grad_params (one more solve with the
// same factorization: both right-hand sides go through one elimination), grad_dst = grad_rhs[:n],
// grad_L = -grad_rhs params^T, and grad_src from grad_L through K (phi'(r2) 2 (c_i - c_j), both
// K_ij and K_ji) and through P, P^T.
//
// Storage: the same code runs on two kinds of storage.
//  * TpsFixedStore<NMAX, R>: arrays of compile-time size NMAX >= n + 3. Every loop runs over the
//    compile-time range [0, NMAX) with a guard, so after full unrolling every index is a constant and
//    the CUDA compiler keeps the whole system in registers (no local memory): used for n <= 4
//    (NMAX = 7; forward: 194 registers, no stack, on sm_90). A tier NMAX = 11 (n <= 8) was tried and
//    dropped: 14 KB of register spills per thread and 4x the compile time.
//  * TpsPtrStore<R>: a caller-provided workspace of tps_workspace_size(n, R) doubles, for n > 4
//    (CPU: on the stack for n <= 32, on the heap beyond; CUDA: global memory). Loops then run over
//    their real range. Selected with NMAX = 0.
// The CPU kernels use the same tiers as the CUDA kernels, so the CPU tests cover both code paths.
#pragma once

#include <limits>

#include "tpswarp/common.h"
#include "tpswarp/tps.h"

namespace tpswarp {

// Status of one item; the values are also the bytes the kernels report per item.
constexpr int kTpsRegular = 0;
constexpr int kTpsCollinear = 1;   // points collinear (or all equal): the affine part is undetermined
constexpr int kTpsDuplicate = 2;   // two points coincide (reg == 0 only): the kernel block is singular
constexpr int kTpsZeroPivot = 3;   // not caught by the geometry, but the elimination met an exact zero pivot

// Relative thresholds of the geometric test, as in tpswarp/reference/tps_solve.py.
constexpr double kTpsCollinearRtol = 1e-12;
constexpr double kTpsDuplicateRtol = 1e-12;

// Tiers: largest n of each storage kind.
constexpr int kTpsSmallN = 4;    // TpsFixedStore<7, R> (registers on CUDA)
constexpr int kTpsStackN = 32;   // CPU: TpsPtrStore on a stack buffer; beyond: heap (CPU). CUDA: global memory for n > 4

TPSWARP_HOST_DEVICE constexpr int64_t tps_workspace_size(int64_t n, int64_t R) {
  return 2 * n + (n + 3) * (n + 3) + (n + 3) * R;
}

#if defined(__CUDACC__)
#define TPSWARP_SOLVE_INLINE __forceinline__
#else
#define TPSWARP_SOLVE_INLINE inline
#endif

#if defined(__CUDA_ARCH__)
// Fully unrolled for the fixed storage (constant trip count NMAX = 7, n <= 4); loops over a workspace
// have runtime trip counts and are left alone. Notes (nvcc 13, sm_90): `unroll (NMAX > 0 ? NMAX : 1)`
// is NOT honoured as a full unroll (the fixed store then lands in local memory, 616 bytes of stack);
// an NMAX = 11 tier (n <= 8) spilled 14 KB per thread and took minutes to compile, so it was dropped.
#define TPSWARP_SOLVE_UNROLL _Pragma("unroll")
#define TPSWARP_UNROLL_ALL _Pragma("unroll")
#elif defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
// Host: unrolling the fixed tier's guarded loops saves about a quarter of the time of a 7 x 7 solve.
#define TPSWARP_SOLVE_UNROLL _Pragma("GCC unroll 8")
#define TPSWARP_UNROLL_ALL _Pragma("GCC unroll 4")
#else
#define TPSWARP_SOLVE_UNROLL
#define TPSWARP_UNROLL_ALL
#endif

// for (i = lo; i < hi; ++i), written so that with NMAX > 0 the trip count is the constant NMAX and
// `i` a constant in each unrolled copy; with NMAX == 0 a plain loop. Always use braces for the body.
#define TPSWARP_SOLVE_FOR(i, lo, hi)                                                                  \
  TPSWARP_SOLVE_UNROLL for (int i = (NMAX > 0 ? 0 : (lo)); i < (NMAX > 0 ? NMAX : (hi)); ++i) if ((i) >= (lo) && (i) < (hi))
// for (i = hi - 1; i >= lo; --i), likewise.
#define TPSWARP_SOLVE_FOR_DOWN(i, lo, hi)                                                                 \
  TPSWARP_SOLVE_UNROLL for (int i = (NMAX > 0 ? NMAX : (hi)) - 1; i >= (NMAX > 0 ? 0 : (lo)); --i) if ((i) >= (lo) && (i) < (hi))

template <int NMAX, int R> struct TpsFixedStore {
  static_assert(NMAX >= 6, "TpsFixedStore needs room for n >= 3 points, N = n + 3");
  double px[NMAX], py[NMAX];
  double a[NMAX][NMAX];
  double b[NMAX][R];
  TPSWARP_HOST_DEVICE TPSWARP_SOLVE_INLINE double& x(int i) { return px[i]; }
  TPSWARP_HOST_DEVICE TPSWARP_SOLVE_INLINE double& y(int i) { return py[i]; }
  TPSWARP_HOST_DEVICE TPSWARP_SOLVE_INLINE double& A(int i, int j) { return a[i][j]; }
  TPSWARP_HOST_DEVICE TPSWARP_SOLVE_INLINE double& B(int i, int r) { return b[i][r]; }
};

template <int R> struct TpsPtrStore {
  double* px;
  double* py;
  double* a;
  double* b;
  int ld;
  // `ws` holds tps_workspace_size(n, R) doubles.
  TPSWARP_HOST_DEVICE TpsPtrStore(double* ws, int n)
      : px(ws), py(ws + n), a(ws + 2 * n), b(ws + 2 * n + (n + 3) * (n + 3)), ld(n + 3) {}
  TPSWARP_HOST_DEVICE TPSWARP_SOLVE_INLINE double& x(int i) { return px[i]; }
  TPSWARP_HOST_DEVICE TPSWARP_SOLVE_INLINE double& y(int i) { return py[i]; }
  TPSWARP_HOST_DEVICE TPSWARP_SOLVE_INLINE double& A(int i, int j) { return a[int64_t(i) * ld + j]; }
  TPSWARP_HOST_DEVICE TPSWARP_SOLVE_INLINE double& B(int i, int r) { return b[int64_t(i) * R + r]; }
};

template <typename T> TPSWARP_HOST_DEVICE TPSWARP_SOLVE_INLINE double tps_to_double(T v) {
  return static_cast<double>(static_cast<acc_t<T>>(v));
}
// double -> T through T's accumulation type (half and bfloat16 convert from float).
template <typename T> TPSWARP_HOST_DEVICE TPSWARP_SOLVE_INLINE T tps_from_double(double v) {
  return static_cast<T>(static_cast<acc_t<T>>(v));
}

// Element access used by the item functions below: plain typed pointers, or (CUDA) any type with
// overloads of tps_load / tps_store found by argument-dependent lookup (e.g. a runtime-typed pointer,
// so that one kernel instance serves every dtype).
template <typename T> TPSWARP_HOST_DEVICE TPSWARP_SOLVE_INLINE double tps_load(const T* p, int64_t i) {
  return tps_to_double(p[i]);
}
template <typename O> TPSWARP_HOST_DEVICE TPSWARP_SOLVE_INLINE void tps_store(O* p, int64_t i, double v) {
  p[i] = tps_from_double<O>(v);
}

TPSWARP_HOST_DEVICE TPSWARP_SOLVE_INLINE double tps_nan() { return std::numeric_limits<double>::quiet_NaN(); }

// Points (n, 2) read with strides (point stride si, coordinate stride sc), converted to double.
template <int NMAX, typename S, typename In>
TPSWARP_HOST_DEVICE TPSWARP_SOLVE_INLINE void tps_load_points(S& s, const In& src, int64_t si, int64_t sc, int n) {
  TPSWARP_SOLVE_FOR(i, 0, n) {
    s.x(i) = tps_load(src, i * si);
    s.y(i) = tps_load(src, i * si + sc);
  }
}

// The geometric singularity test of the reference (`singular_items`), on the loaded points:
//   centred covariance C (2x2); collinear  <=>  det C <= 1e-12 trace(C)^2  (whatever reg);
//   with reg == 0 also duplicate  <=>  min_{i != j} |c_i - c_j|^2 <= 1e-12 max(trace C, 1e-300).
// NaN coordinates make neither test true (as in the reference); the solve then gives NaN.
template <int NMAX, typename S>
TPSWARP_HOST_DEVICE TPSWARP_SOLVE_INLINE int tps_geometry_status(S& s, int n, double reg) {
  double mx = 0, my = 0;
  TPSWARP_SOLVE_FOR(i, 0, n) {
    mx += s.x(i);
    my += s.y(i);
  }
  mx /= n;
  my /= n;
  double c00 = 0, c11 = 0, c01 = 0;
  TPSWARP_SOLVE_FOR(i, 0, n) {
    const double cx = s.x(i) - mx, cy = s.y(i) - my;
    c00 += cx * cx;
    c11 += cy * cy;
    c01 += cx * cy;
  }
  const double det = c00 * c11 - c01 * c01;
  const double trace = c00 + c11;
  if (det <= kTpsCollinearRtol * trace * trace) return kTpsCollinear;
  if (reg == 0) {
    double dmin = 0;
    bool first = true, has_nan = false;
    TPSWARP_SOLVE_FOR(i, 0, n) {
      TPSWARP_SOLVE_FOR(j, i + 1, n) {
        const double dx = s.x(i) - s.x(j), dy = s.y(i) - s.y(j);
        const double d2 = dx * dx + dy * dy;
        has_nan = has_nan || d2 != d2;
        dmin = (first || d2 < dmin) ? d2 : dmin;
        first = false;
      }
    }
    // trace.clamp_min(1e-300), NaN propagating
    const double scale = trace != trace ? trace : (trace > 1e-300 ? trace : 1e-300);
    if (!has_nan && dmin <= kTpsDuplicateRtol * scale) return kTpsDuplicate;
  }
  return kTpsRegular;
}

// Fills A with the (n + 3) x (n + 3) system of the loaded points.
template <int NMAX, typename S>
TPSWARP_HOST_DEVICE TPSWARP_SOLVE_INLINE void tps_build_system(S& s, int n, double reg) {
  const int N = n + 3;
  TPSWARP_SOLVE_FOR(i, 0, n) {
    s.A(i, i) = reg;  // phi(0) = 0
    TPSWARP_SOLVE_FOR(j, i + 1, n) {
      const double dx = s.x(i) - s.x(j), dy = s.y(i) - s.y(j);
      const double phi = tps_phi<double>(dx * dx + dy * dy);
      s.A(i, j) = phi;
      s.A(j, i) = phi;
    }
    TPSWARP_SOLVE_FOR(j, n, N) {  // P and P^T: columns / rows n, n + 1, n + 2 are 1, x, y
      const double v = j == n ? 1.0 : (j == n + 1 ? s.x(i) : s.y(i));
      s.A(i, j) = v;
      s.A(j, i) = v;
    }
  }
  TPSWARP_SOLVE_FOR(i, n, N) {
    TPSWARP_SOLVE_FOR(j, n, N) { s.A(i, j) = 0.0; }
  }
}

// Solves A X = B in place (X overwrites B; A is destroyed) by Gaussian elimination with partial
// pivoting (row swaps applied to B). Returns false on an exactly zero pivot (B is then garbage).
template <int NMAX, int R, typename S>
TPSWARP_HOST_DEVICE TPSWARP_SOLVE_INLINE bool tps_lu_solve(S& s, int N) {
  TPSWARP_SOLVE_FOR(k, 0, N) {
    int p = k;
    double best = abs_(s.A(k, k));
    TPSWARP_SOLVE_FOR(i, k + 1, N) {
      const double v = abs_(s.A(i, k));
      if (v > best) {
        best = v;
        p = i;
      }
    }
    if (best == 0.0) return false;
    if constexpr (NMAX > 0) {
      // `p` is a runtime value: swap through predicated copies so that all indices stay constants.
      TPSWARP_SOLVE_FOR(i, k + 1, N) {
        if (i == p) {
          TPSWARP_SOLVE_FOR(j, k, N) {
            const double t = s.A(k, j);
            s.A(k, j) = s.A(i, j);
            s.A(i, j) = t;
          }
          TPSWARP_UNROLL_ALL for (int r = 0; r < R; ++r) {
            const double t = s.B(k, r);
            s.B(k, r) = s.B(i, r);
            s.B(i, r) = t;
          }
        }
      }
    } else if (p != k) {
      for (int j = k; j < N; ++j) {
        const double t = s.A(k, j);
        s.A(k, j) = s.A(p, j);
        s.A(p, j) = t;
      }
      for (int r = 0; r < R; ++r) {
        const double t = s.B(k, r);
        s.B(k, r) = s.B(p, r);
        s.B(p, r) = t;
      }
    }
    const double inv = 1.0 / s.A(k, k);
    TPSWARP_SOLVE_FOR(i, k + 1, N) {
      const double f = s.A(i, k) * inv;
      TPSWARP_SOLVE_FOR(j, k + 1, N) { s.A(i, j) -= f * s.A(k, j); }
      TPSWARP_UNROLL_ALL for (int r = 0; r < R; ++r) { s.B(i, r) -= f * s.B(k, r); }
    }
  }
  TPSWARP_SOLVE_FOR_DOWN(i, 0, N) {
    TPSWARP_UNROLL_ALL for (int r = 0; r < R; ++r) {
      double v = s.B(i, r);
      TPSWARP_SOLVE_FOR(j, i + 1, N) { v -= s.A(i, j) * s.B(j, r); }
      s.B(i, r) = v / s.A(i, i);
    }
  }
  return true;
}

// Loads the points and the right-hand side [dst; 0] into columns 0, 1 of B, tests the geometry and,
// if regular, solves. Returns the item's status; on success B[:, 0:2] holds params.
// R >= 2; columns 2.. of B must be filled by the caller before (they are solved along).
template <int NMAX, int R, typename S, typename In>
TPSWARP_HOST_DEVICE TPSWARP_SOLVE_INLINE int tps_solve_system(S& s, const In& src, int64_t ssi, int64_t ssc,
                                                             const In& dst, int64_t dsi, int64_t dsc, int n, double reg) {
  const int N = n + 3;
  tps_load_points<NMAX>(s, src, ssi, ssc, n);
  int status = tps_geometry_status<NMAX>(s, n, reg);
  if (status != kTpsRegular) return status;
  tps_build_system<NMAX>(s, n, reg);
  TPSWARP_SOLVE_FOR(i, 0, N) {
    s.B(i, 0) = i < n ? tps_load(dst, i * dsi) : 0.0;
    s.B(i, 1) = i < n ? tps_load(dst, i * dsi + dsc) : 0.0;
  }
  if (!tps_lu_solve<NMAX, R>(s, N)) status = kTpsZeroPivot;
  return status;
}

// Forward of one item: params (n + 3, 2) contiguous, NaN when the item is singular. Returns the status.
template <int NMAX, typename S, typename In, typename Out>
TPSWARP_HOST_DEVICE TPSWARP_SOLVE_INLINE int tps_solve_item(S& s, const In& src, int64_t ssi, int64_t ssc, const In& dst,
                                                           int64_t dsi, int64_t dsc, int n, double reg, const Out& params) {
  const int N = n + 3;
  const int status = tps_solve_system<NMAX, 2>(s, src, ssi, ssc, dst, dsi, dsc, n, reg);
  const bool ok = status == kTpsRegular;
  TPSWARP_SOLVE_FOR(i, 0, N) {
    tps_store(params, 2 * i, ok ? s.B(i, 0) : tps_nan());
    tps_store(params, 2 * i + 1, ok ? s.B(i, 1) : tps_nan());
  }
  return status;
}

// Backward of one item. `gp` is grad_params (n + 3, 2) read with strides (gsi, gsc). Writes
// grad_src, grad_dst ((n, 2) contiguous; either may be null, i.e. convert to false); NaN when the item
// is singular.
// params are recomputed in double from src and dst (the same elimination solves for grad_rhs).
template <int NMAX, typename S, typename In, typename GIn, typename Out>
TPSWARP_HOST_DEVICE TPSWARP_SOLVE_INLINE int tps_solve_backward_item(S& s, const In& src, int64_t ssi, int64_t ssc,
                                                                    const In& dst, int64_t dsi, int64_t dsc, const GIn& gp,
                                                                    int64_t gsi, int64_t gsc, int n, double reg,
                                                                    const Out& grad_src, const Out& grad_dst) {
  const int N = n + 3;
  TPSWARP_SOLVE_FOR(i, 0, N) {
    s.B(i, 2) = tps_load(gp, i * gsi);
    s.B(i, 3) = tps_load(gp, i * gsi + gsc);
  }
  const int status = tps_solve_system<NMAX, 4>(s, src, ssi, ssc, dst, dsi, dsc, n, reg);
  // B[:, 0:2] = params, B[:, 2:4] = grad_rhs.
  if (status != kTpsRegular) {
    TPSWARP_SOLVE_FOR(i, 0, n) {
      if (grad_src) {
        tps_store(grad_src, 2 * i, tps_nan());
        tps_store(grad_src, 2 * i + 1, tps_nan());
      }
      if (grad_dst) {
        tps_store(grad_dst, 2 * i, tps_nan());
        tps_store(grad_dst, 2 * i + 1, tps_nan());
      }
    }
    return status;
  }
  if (grad_dst) {
    TPSWARP_SOLVE_FOR(i, 0, n) {
      tps_store(grad_dst, 2 * i, s.B(i, 2));
      tps_store(grad_dst, 2 * i + 1, s.B(i, 3));
    }
  }
  if (grad_src) {
    // Rows n + 1 (x) and n + 2 (y) of params and grad_rhs, fetched with constant indices.
    double p1x = 0, p1y = 0, g1x = 0, g1y = 0, p2x = 0, p2y = 0, g2x = 0, g2y = 0;
    TPSWARP_SOLVE_FOR(a, n + 1, N) {
      if (a == n + 1) {
        p1x = s.B(a, 0); p1y = s.B(a, 1); g1x = s.B(a, 2); g1y = s.B(a, 3);
      } else {
        p2x = s.B(a, 0); p2y = s.B(a, 1); g2x = s.B(a, 2); g2y = s.B(a, 3);
      }
    }
    // A is free after the solve: its columns 0, 1 accumulate grad_src (constant indices in the fixed tier).
    TPSWARP_SOLVE_FOR(i, 0, n) {
      const double pix = s.B(i, 0), piy = s.B(i, 1), gix = s.B(i, 2), giy = s.B(i, 3);
      // through P (L[i][n+1] = x_i) and P^T (L[n+1][i] = x_i): G[i][n+1] + G[n+1][i], G = -grad_rhs params^T
      s.A(i, 0) = -(gix * p1x + giy * p1y) - (g1x * pix + g1y * piy);
      s.A(i, 1) = -(gix * p2x + giy * p2y) - (g2x * pix + g2y * piy);
    }
    // through K: K_ij = K_ji = phi(|c_i - c_j|^2) for each pair i < j, d r2 / d c_i = 2 (c_i - c_j) = -d r2 / d c_j
    TPSWARP_SOLVE_FOR(i, 0, n) {
      TPSWARP_SOLVE_FOR(j, i + 1, n) {
        const double dx = s.x(i) - s.x(j), dy = s.y(i) - s.y(j);
        const double d = tps_dphi_dr2<double>(dx * dx + dy * dy);
        // G[i][j] + G[j][i]
        const double gsym = -(s.B(i, 2) * s.B(j, 0) + s.B(i, 3) * s.B(j, 1)) - (s.B(j, 2) * s.B(i, 0) + s.B(j, 3) * s.B(i, 1));
        const double cx = 2.0 * d * gsym * dx, cy = 2.0 * d * gsym * dy;
        s.A(i, 0) += cx;
        s.A(i, 1) += cy;
        s.A(j, 0) -= cx;
        s.A(j, 1) -= cy;
      }
    }
    TPSWARP_SOLVE_FOR(i, 0, n) {
      tps_store(grad_src, 2 * i, s.A(i, 0));
      tps_store(grad_src, 2 * i + 1, s.A(i, 1));
    }
  }
  return status;
}

}  // namespace tpswarp
