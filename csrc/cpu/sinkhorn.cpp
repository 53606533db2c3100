// CPU kernels of the sinkhorn op: the soft-C-transform (softmin) and its barycentric gradient,
// computed on the fly, never storing an N x M cost matrix. Memory is O((N + M) d).
//
// One softmin row i is  -eps * LSE_j( h_j - C(x_i, y_j) / eps ).  For p = 2 the cost is expanded,
// C_ij / eps = (|x_i|^2 + |y_j|^2) / (2 eps) - x_i.y_j / eps, so the work per pair is one dot
// product plus one exp: the |y_j|^2 term is folded into h_j and the |x_i|^2 term leaves the LSE.
// The dot products are computed like a small GEMM: a group of R rows of x against a "panel" of
// W columns of y stored [d][W] (one vector load per k, R broadcasts), and the result goes
// straight into an online log-sum-exp kept per lane (W running maxima and sums per row), so no
// horizontal reduction happens inside the loop and each pair costs a single exp:
//   d = arg - m;  s = d > 0 ? s * exp(-d) + 1 : s + exp(d);  m = max(m, arg).
// Columns are walked in blocks that stay in L2 while all row groups of a chunk use them; chunks
// of rows run in parallel (at::parallel_for). Clouds are centred on their joint bounding box
// first (costs are translation-invariant; smaller |x| means less cancellation above).
//
// The Sinkhorn loop needs four softmins per iteration (x<-y, y<-x, x<-x, y<-y). Two fused passes
// (pair_group_impl) halve the dot products: x<-y and y<-x come from one evaluation of each pair
// (a row LSE and a column LSE at once), and x<-x / y<-y only visit the upper triangle of their
// symmetric cost. Per iteration that is N M + N^2 / 2 + M^2 / 2 dot products instead of
// (N + M)^2. The single-direction pass (lse_chunk_impl) serves the gradient.
//
// Vector code uses GCC vector extensions (64-byte vectors) and a polynomial exp, compiled three
// times: AVX-512, AVX2+FMA and baseline x86-64, chosen at run time (DVGS_FAST_CPU_ISA=avx512 |
// avx2 | generic forces a lower one, for testing).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "ops/sinkhorn.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors only ever cross always_inline calls
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DVGS_SINKHORN_X86 1
#define DVGS_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")))
#define DVGS_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define DVGS_SINKHORN_X86 0
#endif
#define DVGS_INLINE inline __attribute__((always_inline))

namespace dvgs_fast {
namespace sinkhorn {
namespace {

// ----------------------------------------------------------------------------------------
// 64-byte vectors and the element-wise maths the kernels need.
// ----------------------------------------------------------------------------------------
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  static constexpr int W = 16;
  // Running-max start and padding-column offset: finite, so no inf - inf can appear, and the
  // padding offset is far below anything a real column produces.
  static constexpr float kInit = -1e37f;
  static constexpr float kPad = -1e30f;
};
template <>
struct Vec<double> {
  typedef double V __attribute__((vector_size(64)));
  typedef int64_t I __attribute__((vector_size(64)));
  static constexpr int W = 8;
  static constexpr double kInit = -1e300;
  static constexpr double kPad = -1e200;
};
constexpr int kMaxW = 16;   // points per panel, float (double: 8); point arrays are padded to it
constexpr int kRB = 64;     // rows per parallel work item (multiple of every R below)
constexpr int64_t kBlockBytes = 192 * 1024;  // column block kept in L2 while a chunk's rows use it

template <typename V, typename S>
DVGS_INLINE V splat(S s) {
  return V{} + s;
}

// mask ? a : b lane-wise, with bit operations (GCC and Clang both accept these on their vector
// extensions, unlike a ternary with a vector condition).
template <typename V, typename I>
DVGS_INLINE V vselect(I mask, V a, V b) {
  return (V)(((I)a & mask) | ((I)b & ~mask));
}

// exp(x), branch-free: x = k ln2 + r (Cody-Waite), e^r by its Taylor polynomial (|r| <= ln2/2:
// degree 7 for float, 13 for double, both under one ulp of truncation error), 2^k built in the
// exponent bits. k is read from the bits of x log2(e) + 1.5 * 2^mant (the float rounding does
// the round-to-nearest). Inputs below the smallest normal result give exactly 0.
DVGS_INLINE Vec<float>::V vexp(Vec<float>::V x) {
  using V = Vec<float>::V;
  using I = Vec<float>::I;
  const I under = x < -87.0f;
  x = vselect(under, splat<V>(-87.0f), x);
  x = vselect<V, I>(x > 88.0f, splat<V>(88.0f), x);
  const V shifter = splat<V>(12582912.0f);  // 1.5 * 2^23
  const V t = x * 1.44269504088896341f + shifter;
  const V k = t - shifter;
  V r = x - k * 0.693145751953125f;
  r = r - k * 1.428606765330187045e-06f;
  V p = splat<V>(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const I ki = (I)t - (I)shifter;
  const V scale = (V)((ki + 127) << 23);
  const V res = p * scale;
  return (V)((I)res & ~under);
}

DVGS_INLINE Vec<double>::V vexp(Vec<double>::V x) {
  using V = Vec<double>::V;
  using I = Vec<double>::I;
  const I under = x < -708.0;
  x = vselect(under, splat<V>(-708.0), x);
  x = vselect<V, I>(x > 709.0, splat<V>(709.0), x);
  const V shifter = splat<V>(6755399441055744.0);  // 1.5 * 2^52
  const V t = x * 1.4426950408889634074 + shifter;
  const V k = t - shifter;
  V r = x - k * 6.93147180369123816490e-01;
  r = r - k * 1.90821492927058770002e-10;
  V p = splat<V>(1.0 / 6227020800.0);  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const I ki = (I)t - (I)shifter;
  const V scale = (V)((ki + 1023) << 52);
  const V res = p * scale;
  return (V)((I)res & ~under);
}

// 1/sqrt(x) for x > 0: bit-trick seed then Newton steps (3 for float, 4 for double) -- plain
// arithmetic, so it vectorises without -fno-math-errno. Only used by p = 1.
DVGS_INLINE Vec<float>::V vrsqrt(Vec<float>::V x) {
  using V = Vec<float>::V;
  using I = Vec<float>::I;
  V y = (V)(0x5f3759df - ((I)x >> 1));
  const V hx = x * 0.5f;
  for (int it = 0; it < 3; ++it) y = y * (1.5f - hx * y * y);
  return y;
}
DVGS_INLINE Vec<double>::V vrsqrt(Vec<double>::V x) {
  using V = Vec<double>::V;
  using I = Vec<double>::I;
  V y = (V)(0x5fe6eb50c7b537a9LL - ((I)x >> 1));
  const V hx = x * 0.5;
  for (int it = 0; it < 4; ++it) y = y * (1.5 - hx * y * y);
  return y;
}

// One step of the per-lane online log-sum-exp (one exp per element).
template <typename T>
DVGS_INLINE void lse_update(typename Vec<T>::V& m, typename Vec<T>::V& s, typename Vec<T>::V arg) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  const V diff = arg - m;
  const I gt = diff > T(0);
  const V e = vexp(vselect(gt, -diff, diff));
  s = vselect(gt, s * e + T(1), s + e);
  m = vselect(gt, arg, m);
}

// ----------------------------------------------------------------------------------------
// Kernels on one chunk of rows [lo, hi) of the "rows" cloud against every column.
// ----------------------------------------------------------------------------------------
template <typename T>
struct Ctx {
  int64_t d = 0;
  const T* rows = nullptr;    // centred rows cloud [n_pad][d]
  const T* rsq = nullptr;     // |row|^2 [n_pad]
  const T* panels = nullptr;  // columns cloud packed [n_panels][d][W]
  const T* csq = nullptr;     // |col|^2 [n_panels * W]
  const T* cols = nullptr;    // centred columns cloud [n_pad][d] (gradient pass)
  const T* hh = nullptr;      // per-column offset [n_panels * W]: see the file comment
  int64_t n_panels = 0;
  T inv_eps = 0;
};

// t[r] = -C(x_r, y_j) / eps for a group of R rows against one panel of W columns, up to the
// terms that only depend on one point (for p = 2 the dot product x.y / eps; the |x|^2 and |y|^2
// parts live in the per-point offsets). For p = 1 also hands back 1/dist (0 where geomloss's
// clamp at 1e-8 kills the gradient).
template <typename T, int P, int R>
DVGS_INLINE void panel_terms(const Ctx<T>& c, const T* xr, const T* rsq, int64_t pj, typename Vec<T>::V* t,
                             typename Vec<T>::V* inv_dist) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  constexpr int W = Vec<T>::W;
  const int64_t d = c.d;
  const T* pan = c.panels + pj * d * W;
  V acc[R];
  for (int r = 0; r < R; ++r) acc[r] = V{};
  for (int64_t k = 0; k < d; ++k) {
    const V yv = *reinterpret_cast<const V*>(pan + k * W);
    for (int r = 0; r < R; ++r) acc[r] += xr[r * d + k] * yv;
  }
  if constexpr (P == 2) {
    for (int r = 0; r < R; ++r) t[r] = acc[r] * c.inv_eps;
  } else {
    const V cs = *reinterpret_cast<const V*>(c.csq + pj * W);
    for (int r = 0; r < R; ++r) {
      const V sq = (cs + rsq[r]) - acc[r] * T(2);
      const I small = sq <= T(1e-8);  // geomloss: sqrt(clamp_min(sq, 1e-8))
      const V sqc = vselect(small, splat<V>(T(1e-8)), sq);
      const V rs = vrsqrt(sqc);
      t[r] = -(sqc * rs) * c.inv_eps;
      if (inv_dist) inv_dist[r] = (V)((I)rs & ~small);
    }
  }
}

// lse[i - lo] = LSE_j arg_ij for rows lo <= i < hi (hi - lo <= kRB, lo a multiple of R).
template <typename T, int P, int R>
DVGS_INLINE void lse_chunk_impl(const Ctx<T>& c, int64_t lo, int64_t hi, double* lse) {
  using V = typename Vec<T>::V;
  constexpr int W = Vec<T>::W;
  const int64_t d = c.d;
  const int64_t ng = (hi - lo + R - 1) / R;
  V ms[kRB], ss[kRB];
  for (int64_t i = 0; i < ng * R; ++i) {
    ms[i] = splat<V>(Vec<T>::kInit);
    ss[i] = V{};
  }
  const int64_t cb = std::max<int64_t>(1, kBlockBytes / (d * W * static_cast<int64_t>(sizeof(T))));
  for (int64_t pb = 0; pb < c.n_panels; pb += cb) {
    const int64_t pe = std::min(pb + cb, c.n_panels);
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t r0 = lo + g * R;
      const T* xr = c.rows + r0 * d;
      V m[R], s[R], t[R];
      for (int r = 0; r < R; ++r) {
        m[r] = ms[g * R + r];
        s[r] = ss[g * R + r];
      }
      for (int64_t pj = pb; pj < pe; ++pj) {
        panel_terms<T, P, R>(c, xr, c.rsq + r0, pj, t, nullptr);
        const V hv = *reinterpret_cast<const V*>(c.hh + pj * W);
        for (int r = 0; r < R; ++r) lse_update<T>(m[r], s[r], hv + t[r]);
      }
      for (int r = 0; r < R; ++r) {
        ms[g * R + r] = m[r];
        ss[g * R + r] = s[r];
      }
    }
  }
  for (int64_t i = 0; i < hi - lo; ++i) {  // combine the W lanes of each row, in double
    double mx = -std::numeric_limits<double>::infinity();
    for (int l = 0; l < W; ++l) mx = std::max(mx, static_cast<double>(ms[i][l]));
    double tot = 0;
    for (int l = 0; l < W; ++l) tot += static_cast<double>(ss[i][l]) * std::exp(static_cast<double>(ms[i][l]) - mx);
    lse[i] = mx + std::log(tot);
  }
}

// grad[i] = sum_j P_ij grad_1 C(x_i, y_j) with P_ij = exp(arg_ij - lse_i) (lse from the pass
// above): for p = 2, x_i - sum_j P_ij y_j; for p = 1, sum_j P_ij (x_i - y_j) / |x_i - y_j|.
// Normalised by sum_j P_ij (1 up to rounding). work: R * d scratch.
template <typename T, int P, int R>
DVGS_INLINE void grad_chunk_impl(const Ctx<T>& c, int64_t lo, int64_t hi, const double* lse, T* grad, T* work) {
  using V = typename Vec<T>::V;
  constexpr int W = Vec<T>::W;
  const int64_t d = c.d;
  const int64_t ng = (hi - lo + R - 1) / R;
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t r0 = lo + g * R;
    const T* xr = c.rows + r0 * d;
    V lr[R], S[R], A[R], t[R], invd[R];
    for (int r = 0; r < R; ++r) {
      lr[r] = splat<V>(static_cast<T>(r0 + r < hi ? lse[r0 + r - lo] : 0.0));
      S[r] = V{};
      A[r] = V{};
    }
    std::fill(work, work + R * d, T(0));
    for (int64_t pj = 0; pj < c.n_panels; ++pj) {
      panel_terms<T, P, R>(c, xr, c.rsq + r0, pj, t, P == 1 ? invd : nullptr);
      const V hv = *reinterpret_cast<const V*>(c.hh + pj * W);
      for (int r = 0; r < R; ++r) {
        const V w = vexp(hv + t[r] - lr[r]);
        S[r] += w;
        V wc = w;
        if constexpr (P == 1) {
          wc = w * invd[r];
          A[r] += wc;
        }
        T* acc = work + r * d;
        for (int l = 0; l < W; ++l) {
          const T wl = wc[l];
          if (wl == T(0)) continue;  // most far-away columns underflow to exactly 0
          const T* yj = c.cols + (pj * W + l) * d;
          for (int64_t k = 0; k < d; ++k) acc[k] += wl * yj[k];
        }
      }
    }
    for (int r = 0; r < R && r0 + r < hi; ++r) {
      double s = 0, a = 0;
      for (int l = 0; l < W; ++l) {
        s += static_cast<double>(S[r][l]);
        a += static_cast<double>(A[r][l]);
      }
      if constexpr (P == 2) a = s;
      const T inv_s = static_cast<T>(1.0 / s);
      const T as = static_cast<T>(a / s);
      const T* x = xr + r * d;
      const T* acc = work + r * d;
      T* out = grad + (r0 + r) * d;
      for (int64_t k = 0; k < d; ++k) out[k] = x[k] * as - acc[k] * inv_s;
    }
  }
}

// Both directions of one pass at once. Rows (chunks of kRB) against column panels, each pairwise
// term t computed once and used twice: for the row's LSE over columns (lane-wise online update
// as above) and for the column's LSE over rows (a per-panel running max and sum, updated once
// per group of R rows: R + 1 exps for R x W pairs).
//   cross (SELF = false): rows = one cloud, columns = the other; every pair is visited once.
//   self  (SELF = true):  rows = columns = one cloud; chunk k only visits panels from its own
//     first one on (costs are symmetric), the panels inside the chunk in the row direction only,
//     the later ones in both. A point's LSE is then its row part merged with its column part.
// Work is split into a fixed number of groups of chunks (chunk k in group k mod n_groups), each
// with its own column state, merged in group order afterwards: the result does not depend on
// the number of threads.
template <typename T>
struct PairCtx {
  Ctx<T> c;                 // rows / columns clouds, column offsets c.hh, 1/eps
  const T* hrow = nullptr;  // row offsets for the column direction [n_pad] (kPad past n_rows)
  int64_t n_rows = 0, n_groups = 1;
  T* colst = nullptr;       // [n_groups][n_panels][2][W]: running max, running sum per column lane
  double* row_m = nullptr;  // [n_rows] each row's (max, sum) over the columns it visited
  double* row_s = nullptr;
};

template <typename T, int P, int R, bool SELF>
DVGS_INLINE void pair_group_impl(const PairCtx<T>& q, int64_t grp) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  constexpr int W = Vec<T>::W;
  const Ctx<T>& c = q.c;
  const int64_t d = c.d, n = q.n_rows;
  const int64_t n_chunks = (n + kRB - 1) / kRB;
  V* colst = reinterpret_cast<V*>(q.colst) + grp * c.n_panels * 2;
  const int64_t cb = std::max<int64_t>(1, kBlockBytes / (d * W * static_cast<int64_t>(sizeof(T))));
  V ms[kRB], ss[kRB];
  for (int64_t ch = grp; ch < n_chunks; ch += q.n_groups) {
    const int64_t lo = ch * kRB, hi = std::min(n, lo + kRB);
    const int64_t ng = (hi - lo + R - 1) / R;
    for (int64_t i = 0; i < ng * R; ++i) {
      ms[i] = splat<V>(Vec<T>::kInit);
      ss[i] = V{};
    }
    const int64_t p0 = SELF ? lo / W : 0;
    const int64_t p_both = SELF ? std::min(c.n_panels, (hi + W - 1) / W) : 0;  // first two-way panel
    for (int64_t pb = p0; pb < c.n_panels; pb += cb) {
      const int64_t pe = std::min(pb + cb, c.n_panels);
      for (int64_t g = 0; g < ng; ++g) {
        const int64_t r0 = lo + g * R;
        const T* xr = c.rows + r0 * d;
        V m[R], s[R], t[R], hr[R];
        for (int r = 0; r < R; ++r) {
          m[r] = ms[g * R + r];
          s[r] = ss[g * R + r];
          hr[r] = splat<V>(q.hrow[r0 + r]);
        }
        for (int64_t pj = pb; pj < pe; ++pj) {
          panel_terms<T, P, R>(c, xr, c.rsq + r0, pj, t, nullptr);
          const V hv = *reinterpret_cast<const V*>(c.hh + pj * W);
          for (int r = 0; r < R; ++r) lse_update<T>(m[r], s[r], hv + t[r]);
          if (!SELF || pj >= p_both) {
            V ac[R];
            for (int r = 0; r < R; ++r) ac[r] = hr[r] + t[r];
            V mx = ac[0];
            for (int r = 1; r < R; ++r) mx = vselect<V, I>(ac[r] > mx, ac[r], mx);
            V& cm = colst[2 * pj];
            V& cs = colst[2 * pj + 1];
            const V mn = vselect<V, I>(mx > cm, mx, cm);
            V sum = cs * vexp(cm - mn);
            for (int r = 0; r < R; ++r) sum += vexp(ac[r] - mn);
            cs = sum;
            cm = mn;
          }
        }
        for (int r = 0; r < R; ++r) {
          ms[g * R + r] = m[r];
          ss[g * R + r] = s[r];
        }
      }
    }
    for (int64_t i = 0; i < hi - lo; ++i) {  // the W lanes of each row -> one (max, sum), in double
      double mx = -std::numeric_limits<double>::infinity();
      for (int l = 0; l < W; ++l) mx = std::max(mx, static_cast<double>(ms[i][l]));
      double tot = 0;
      for (int l = 0; l < W; ++l) tot += static_cast<double>(ss[i][l]) * std::exp(static_cast<double>(ms[i][l]) - mx);
      q.row_m[lo + i] = mx;
      q.row_s[lo + i] = tot;
    }
  }
}

// ----------------------------------------------------------------------------------------
// Instruction-set variants and the run-time choice between them.
// ----------------------------------------------------------------------------------------
template <typename T>
using LseFn = void (*)(const Ctx<T>&, int64_t, int64_t, double*);
template <typename T>
using GradFn = void (*)(const Ctx<T>&, int64_t, int64_t, const double*, T*, T*);
template <typename T>
using PairFn = void (*)(const PairCtx<T>&, int64_t);

template <typename T, int P, bool SELF>
void pair_generic(const PairCtx<T>& q, int64_t g) {
  pair_group_impl<T, P, 4, SELF>(q, g);
}

template <typename T, int P>
void lse_generic(const Ctx<T>& c, int64_t lo, int64_t hi, double* out) {
  lse_chunk_impl<T, P, 4>(c, lo, hi, out);
}
template <typename T, int P>
void grad_generic(const Ctx<T>& c, int64_t lo, int64_t hi, const double* lse, T* g, T* w) {
  grad_chunk_impl<T, P, 4>(c, lo, hi, lse, g, w);
}
#if DVGS_SINKHORN_X86
template <typename T, int P>
DVGS_TARGET_AVX2 void lse_avx2(const Ctx<T>& c, int64_t lo, int64_t hi, double* out) {
  lse_chunk_impl<T, P, 4>(c, lo, hi, out);
}
template <typename T, int P>
DVGS_TARGET_AVX2 void grad_avx2(const Ctx<T>& c, int64_t lo, int64_t hi, const double* lse, T* g, T* w) {
  grad_chunk_impl<T, P, 4>(c, lo, hi, lse, g, w);
}
template <typename T, int P, bool SELF>
DVGS_TARGET_AVX2 void pair_avx2(const PairCtx<T>& q, int64_t g) {
  pair_group_impl<T, P, 4, SELF>(q, g);
}
template <typename T, int P, bool SELF>
DVGS_TARGET_AVX512 void pair_avx512(const PairCtx<T>& q, int64_t g) {
  pair_group_impl<T, P, 8, SELF>(q, g);
}
template <typename T, int P>
DVGS_TARGET_AVX512 void lse_avx512(const Ctx<T>& c, int64_t lo, int64_t hi, double* out) {
  lse_chunk_impl<T, P, 8>(c, lo, hi, out);
}
template <typename T, int P>
DVGS_TARGET_AVX512 void grad_avx512(const Ctx<T>& c, int64_t lo, int64_t hi, const double* lse, T* g, T* w) {
  grad_chunk_impl<T, P, 8>(c, lo, hi, lse, g, w);
}
#endif

enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

Isa best_isa() {
  Isa isa = Isa::kGeneric;
#if DVGS_SINKHORN_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isa = Isa::kAvx2;
  if (isa == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    isa = Isa::kAvx512;
#endif
  const char* env = std::getenv("DVGS_FAST_CPU_ISA");  // read per call: lets tests compare variants
  if (env != nullptr && *env != '\0') {
    const std::string want(env);
    Isa cap = isa;
    if (want == "generic") cap = Isa::kGeneric;
    else if (want == "avx2") cap = Isa::kAvx2;
    if (static_cast<int>(cap) < static_cast<int>(isa)) isa = cap;
  }
  return isa;
}

template <typename T>
struct Kernels {
  LseFn<T> lse = nullptr;
  GradFn<T> grad = nullptr;
  PairFn<T> cross = nullptr, self = nullptr;
};

template <typename T, int P>
Kernels<T> pick_kernels(Isa isa) {
  Kernels<T> k{&lse_generic<T, P>, &grad_generic<T, P>, &pair_generic<T, P, false>, &pair_generic<T, P, true>};
#if DVGS_SINKHORN_X86
  if (isa == Isa::kAvx2)
    k = {&lse_avx2<T, P>, &grad_avx2<T, P>, &pair_avx2<T, P, false>, &pair_avx2<T, P, true>};
  else if (isa == Isa::kAvx512)
    k = {&lse_avx512<T, P>, &grad_avx512<T, P>, &pair_avx512<T, P, false>, &pair_avx512<T, P, true>};
#endif
  return k;
}

// ----------------------------------------------------------------------------------------
// The CPU engine: prepared (centred, padded, packed) clouds + the two passes.
// ----------------------------------------------------------------------------------------
int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// at::parallel_for over [0, n_tasks) only when the pass is big enough to pay for waking the
// thread pool (cost ~ pairs * (d + exp)); small passes -- LossVal's batches -- run inline.
template <typename F>
void parallel_tasks(int64_t n_tasks, int64_t total_pairs, int64_t d, const F& fn) {
  constexpr int64_t kMinParallelWork = int64_t(1) << 21;
  if (n_tasks <= 1 || total_pairs * (d + 16) < kMinParallelWork) {
    fn(0, n_tasks);
    return;
  }
  at::parallel_for(0, n_tasks, 1, fn);
}

template <typename T>
class CpuEngine final : public SoftminEngine<T> {
 public:
  CpuEngine(const at::Tensor& x, const at::Tensor& y, const at::Tensor& center, int64_t p) : p_(p) {
    d_ = x.size(1);
    prepare(kX, x, center);
    prepare(kY, y, center);
    const auto opts = x.options().dtype(c10::CppTypeToScalarType<T>::value);
    const int64_t max_pad = std::max(round_up(n_[kX], kMaxW), round_up(n_[kY], kMaxW));
    hh_ = at::empty({max_pad}, opts);
    hr_ = at::empty({max_pad}, opts);
    lse_.resize(static_cast<size_t>(std::max(n_[kX], n_[kY])));
    row_m_.resize(lse_.size());
    row_s_.resize(lse_.size());
    const Isa isa = best_isa();
    k_ = p_ == 2 ? pick_kernels<T, 2>(isa) : pick_kernels<T, 1>(isa);
  }

  int64_t size(Side s) const override { return n_[s]; }

  // Single direction (rows against cols); the loop uses the fused passes below.
  void softmin(Side rows, Side cols, const T* logw, const T* pot, double eps, const T* prev, T* out,
               bool track_residual) override {
    Ctx<T> c = context(rows, cols, eps);
    c.hh = offsets(hh_, cols, logw, pot, eps);
    const int64_t n = n_[rows];
    const int64_t n_chunks = (n + kRB - 1) / kRB;
    double* lse = lse_.data();
    const LseFn<T> fn = k_.lse;
    parallel_tasks(n_chunks, n * n_[cols], d_, [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch) {
        const int64_t lo = ch * kRB, hi = std::min(n, lo + kRB);
        fn(c, lo, hi, lse + lo);
      }
    });
    finish(rows, lse, eps, prev, out, track_residual);
  }

  void softmin_cross(const T* logw_x, const T* pot_x, const T* prev_x, T* out_x, const T* logw_y, const T* pot_y,
                     const T* prev_y, T* out_y, double eps, bool track_residual) override {
    // The larger cloud gives the rows: rows are what runs in parallel.
    if (n_[kY] > n_[kX]) {
      cross(kY, logw_y, pot_y, prev_y, out_y, kX, logw_x, pot_x, prev_x, out_x, eps, track_residual);
    } else {
      cross(kX, logw_x, pot_x, prev_x, out_x, kY, logw_y, pot_y, prev_y, out_y, eps, track_residual);
    }
  }

  void softmin_self(Side s, const T* logw, const T* pot, double eps, const T* prev, T* out,
                    bool track_residual) override {
    constexpr int W = Vec<T>::W;
    PairCtx<T> q;
    q.c = context(s, s, eps);
    q.c.hh = offsets(hh_, s, logw, pot, eps);
    q.hrow = q.c.hh;
    const int64_t n = n_[s];
    run_pairs(q, n, k_.self);
    // A point's LSE = its row part (later columns) merged with its column part (earlier rows).
    const V* colst = reinterpret_cast<const V*>(colst_.template data_ptr<T>());
    const int64_t np = q.c.n_panels, G = q.n_groups;
    double* lse = lse_.data();
    at::parallel_for(0, n, 4096, [&](int64_t lo, int64_t hi) {
      for (int64_t j = lo; j < hi; ++j) {
        const int64_t pj = j / W, l = j % W;
        double mx = row_m_[j];
        for (int64_t g = 0; g < G; ++g) mx = std::max(mx, static_cast<double>(colst[(g * np + pj) * 2][l]));
        double tot = row_s_[j] * std::exp(row_m_[j] - mx);
        for (int64_t g = 0; g < G; ++g)
          tot += static_cast<double>(colst[(g * np + pj) * 2 + 1][l]) *
                 std::exp(static_cast<double>(colst[(g * np + pj) * 2][l]) - mx);
        lse[j] = mx + std::log(tot);
      }
    });
    finish(s, lse, eps, prev, out, track_residual);
  }

  double take_residual() override {
    const double r = residual_;
    residual_ = 0;
    return r;
  }

  void softmin_grad(Side rows, Side cols, const T* logw, const T* pot, double eps, T* grad) override {
    Ctx<T> c = context(rows, cols, eps);
    c.hh = offsets(hh_, cols, logw, pot, eps);
    const int64_t n = n_[rows];
    const int64_t n_chunks = (n + kRB - 1) / kRB;
    double* lse = lse_.data();
    const LseFn<T> lfn = k_.lse;
    const GradFn<T> gfn = k_.grad;
    const int64_t d = d_;
    parallel_tasks(n_chunks, 2 * n * n_[cols], d, [&](int64_t c0, int64_t c1) {
      std::vector<T> work(static_cast<size_t>(8 * d));
      for (int64_t ch = c0; ch < c1; ++ch) {
        const int64_t lo = ch * kRB, hi = std::min(n, lo + kRB);
        lfn(c, lo, hi, lse + lo);
        gfn(c, lo, hi, lse + lo, grad, work.data());
      }
    });
  }

 private:
  using V = typename Vec<T>::V;

  void prepare(Side s, const at::Tensor& pts, const at::Tensor& center) {
    constexpr int W = Vec<T>::W;
    const int64_t n = pts.size(0), d = d_;
    n_[s] = n;
    const int64_t n_pad = round_up(n, kMaxW);
    n_panels_[s] = (n + W - 1) / W;
    const auto opts = pts.options();
    rows_[s] = at::zeros({n_pad, d}, opts);
    rows_[s].narrow(0, 0, n).copy_(pts - center);
    rsq_[s] = at::zeros({n_pad}, opts);  // n_pad >= n_panels * W: whole-vector loads stay inside
    rsq_[s].narrow(0, 0, n).copy_(rows_[s].narrow(0, 0, n).to(at::kDouble).square().sum(1));
    // panels[pj][k][l] = point pj * W + l, coordinate k
    panels_[s] = rows_[s].narrow(0, 0, n_panels_[s] * W).view({n_panels_[s], W, d}).transpose(1, 2).contiguous();
  }

  Ctx<T> context(Side rows, Side cols, double eps) const {
    Ctx<T> c;
    c.d = d_;
    c.rows = rows_[rows].template data_ptr<T>();
    c.rsq = rsq_[rows].template data_ptr<T>();
    c.panels = panels_[cols].template data_ptr<T>();
    c.csq = rsq_[cols].template data_ptr<T>();
    c.cols = rows_[cols].template data_ptr<T>();
    c.n_panels = n_panels_[cols];
    c.inv_eps = static_cast<T>(1.0 / eps);
    return c;
  }

  // Per-point offsets of cloud s: log w_j + pot_j / eps (- |p_j|^2 / (2 eps) for p = 2), in
  // double then rounded; kPad on the padding points so they never count.
  const T* offsets(at::Tensor& buf, Side s, const T* logw, const T* pot, double eps) const {
    T* h = buf.template data_ptr<T>();
    const T* sq = rsq_[s].template data_ptr<T>();
    const int64_t m = n_[s];
    const bool half_sq = p_ == 2;
    for (int64_t j = 0; j < m; ++j) {
      double v = static_cast<double>(logw[j]);
      if (pot != nullptr) v += static_cast<double>(pot[j]) / eps;
      if (half_sq) v -= 0.5 * static_cast<double>(sq[j]) / eps;
      h[j] = static_cast<T>(v);
    }
    for (int64_t j = m; j < buf.numel(); ++j) h[j] = Vec<T>::kPad;
    return h;
  }

  // Fused pass over row chunks in a fixed number of groups; fills row_m_/row_s_ and colst_.
  void run_pairs(PairCtx<T>& q, int64_t n_rows, PairFn<T> fn) {
    constexpr int W = Vec<T>::W;
    const int64_t n_chunks = (n_rows + kRB - 1) / kRB;
    q.n_rows = n_rows;
    q.n_groups = std::min<int64_t>(n_chunks, 16);
    const int64_t need = q.n_groups * q.c.n_panels * 2 * W;
    if (!colst_.defined() || colst_.numel() < need) colst_ = at::empty({need}, hh_.options());
    T* cs = colst_.template data_ptr<T>();
    for (int64_t i = 0; i < q.n_groups * q.c.n_panels; ++i) {
      std::fill(cs + (2 * i) * W, cs + (2 * i + 1) * W, Vec<T>::kInit);
      std::fill(cs + (2 * i + 1) * W, cs + (2 * i + 2) * W, T(0));
    }
    q.colst = cs;
    q.row_m = row_m_.data();
    q.row_s = row_s_.data();
    parallel_tasks(q.n_groups, n_rows * q.c.n_panels * W, d_, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) fn(q, g);
    });
  }

  void cross(Side rs, const T* logw_r, const T* pot_r, const T* prev_r, T* out_r, Side cs, const T* logw_c,
             const T* pot_c, const T* prev_c, T* out_c, double eps, bool track_residual) {
    constexpr int W = Vec<T>::W;
    PairCtx<T> q;
    q.c = context(rs, cs, eps);
    q.c.hh = offsets(hh_, cs, logw_c, pot_c, eps);  // rows' softmin runs over the columns' potential
    q.hrow = offsets(hr_, rs, logw_r, pot_r, eps);
    const int64_t n = n_[rs], m = n_[cs];
    run_pairs(q, n, k_.cross);
    double* lse = lse_.data();
    for (int64_t i = 0; i < n; ++i) lse[i] = row_m_[i] + std::log(row_s_[i]);
    finish(rs, lse, eps, prev_r, out_r, track_residual);
    const V* colst = reinterpret_cast<const V*>(colst_.template data_ptr<T>());
    const int64_t np = q.c.n_panels, G = q.n_groups;
    for (int64_t j = 0; j < m; ++j) {  // merge the groups' column states, in group order
      const int64_t pj = j / W, l = j % W;
      double mx = -std::numeric_limits<double>::infinity();
      for (int64_t g = 0; g < G; ++g) mx = std::max(mx, static_cast<double>(colst[(g * np + pj) * 2][l]));
      double tot = 0;
      for (int64_t g = 0; g < G; ++g)
        tot += static_cast<double>(colst[(g * np + pj) * 2 + 1][l]) *
               std::exp(static_cast<double>(colst[(g * np + pj) * 2][l]) - mx);
      lse[j] = mx + std::log(tot);
    }
    finish(cs, lse, eps, prev_c, out_c, track_residual);
  }

  // out = -eps * LSE (+ |p|^2 / 2 for p = 2: the row constant of the expanded cost), averaged
  // with prev when given (geomloss's symmetric update), tracking the largest change.
  void finish(Side s, const double* lse, double eps, const T* prev, T* out, bool track_residual) {
    const T* sq = rsq_[s].template data_ptr<T>();
    const bool half_sq = p_ == 2;
    double r = 0;
    for (int64_t i = 0, n = n_[s]; i < n; ++i) {
      const T nv = static_cast<T>(-eps * lse[i] + (half_sq ? 0.5 * static_cast<double>(sq[i]) : 0.0));
      if (prev != nullptr) {
        r = std::max(r, std::abs(static_cast<double>(nv) - static_cast<double>(prev[i])));
        out[i] = T(0.5) * (prev[i] + nv);
      } else {
        out[i] = nv;
      }
    }
    if (track_residual) residual_ = std::max(residual_, r);
  }

  int64_t p_, d_ = 0;
  int64_t n_[2] = {0, 0}, n_panels_[2] = {0, 0};
  at::Tensor rows_[2], rsq_[2], panels_[2], hh_, hr_, colst_;
  std::vector<double> lse_, row_m_, row_s_;
  double residual_ = 0;
  Kernels<T> k_;
};

Options make_options(double blur, int64_t p, double scaling, std::optional<double> diameter, bool debias,
                     std::optional<int64_t> max_iter, std::optional<double> tol) {
  Options o;
  o.blur = blur;
  o.p = p;
  o.scaling = scaling;
  o.diameter = diameter;
  o.debias = debias;
  o.max_iter = max_iter;
  o.tol = tol;
  return o;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& a, const at::Tensor& b, double blur, int64_t p,
    double scaling, std::optional<double> diameter, bool debias, std::optional<int64_t> max_iter,
    std::optional<double> tol) {
  const Options o = make_options(blur, p, scaling, diameter, debias, max_iter, tol);
  check_forward_inputs(x, y, a, b, o);
  auto [box_diam, center] = bounding_box(x, y);
  double diam = o.diameter.value_or(box_diam);
  if (!(diam > 0)) diam = o.blur;  // every point at one place: any start scale will do
  const std::vector<double> eps_list = epsilon_schedule(p, diam, blur, scaling);
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const at::Tensor la = log_weights(ac).contiguous(), lb = log_weights(bc).contiguous();
  ForwardResult r;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sinkhorn_cpu", [&] {
    CpuEngine<scalar_t> E(x, y, center, p);
    r = run_sinkhorn<scalar_t>(E, ac, bc, la, lb, eps_list, o);
  });
  return {r.cost, r.f, r.g, r.n_iter, r.state_x, r.state_y};
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_backward_cpu(const at::Tensor& wx, const at::Tensor& wy,
                                                         const at::Tensor& x, const at::Tensor& y,
                                                         const at::Tensor& a, const at::Tensor& b,
                                                         const at::Tensor& state_x, const at::Tensor& state_y,
                                                         double eps, int64_t p, bool debias, bool need_x,
                                                         bool need_y) {
  check_backward_inputs(wx, wy, x, y, a, b, state_x, state_y, eps, p);
  const at::Tensor la = log_weights(a.contiguous()).contiguous(), lb = log_weights(b.contiguous()).contiguous();
  const at::Tensor sx = state_x.contiguous(), sy = state_y.contiguous();
  at::Tensor gx = at::zeros_like(x, at::MemoryFormat::Contiguous), gy = at::zeros_like(y, at::MemoryFormat::Contiguous);
  if (!need_x && !need_y) return {gx, gy};
  const at::Tensor center = bounding_box(x, y).second;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sinkhorn_backward_cpu", [&] {
    using T = scalar_t;
    CpuEngine<T> E(x, y, center, p);
    const int64_t n = x.size(0), m = y.size(0);
    // d f_ba[i]/dx_i uses the softmin over y with g_ab (state_y[0]); d f_aa[i]/dx_i the one
    // over x with f_aa (state_x[1]); symmetrically for y.
    if (need_x) {
      at::Tensor G = at::empty_like(gx);
      E.softmin_grad(kX, kY, lb.data_ptr<T>(), sy.data_ptr<T>(), eps, G.data_ptr<T>());
      if (debias) {
        at::Tensor G2 = at::empty_like(gx);
        E.softmin_grad(kX, kX, la.data_ptr<T>(), sx.data_ptr<T>() + n, eps, G2.data_ptr<T>());
        G.sub_(G2);
      }
      gx = G.mul_(wx.unsqueeze(1));
    }
    if (need_y) {
      at::Tensor G = at::empty_like(gy);
      E.softmin_grad(kY, kX, la.data_ptr<T>(), sx.data_ptr<T>(), eps, G.data_ptr<T>());
      if (debias) {
        at::Tensor G2 = at::empty_like(gy);
        E.softmin_grad(kY, kY, lb.data_ptr<T>(), sy.data_ptr<T>() + m, eps, G2.data_ptr<T>());
        G.sub_(G2);
      }
      gy = G.mul_(wy.unsqueeze(1));
    }
  });
  return {gx, gy};
}

}  // namespace
}  // namespace sinkhorn

TORCH_LIBRARY_IMPL(dvgs_fast, CPU, m) {
  m.impl("sinkhorn", &sinkhorn::sinkhorn_cpu);
  m.impl("sinkhorn_backward", &sinkhorn::sinkhorn_backward_cpu);
}

}  // namespace dvgs_fast
