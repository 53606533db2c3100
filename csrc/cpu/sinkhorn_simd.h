// Vector building blocks of the CPU Sinkhorn kernel (cpu/sinkhorn.cpp), torch-free so that the
// floor microbenchmark (bench/sinkhorn_floor.cpp) times exactly the code the kernel runs.
//
// Everything is templated on the element type T and the vector width B in bytes (16: baseline
// x86-64, 32: AVX2+FMA, 64: AVX-512), written with GCC vector extensions and meant to be
// always-inlined into functions compiled for one instruction set (target attributes, chosen at
// run time). Expressions are written as a * b + c so that the compiler contracts them into FMAs
// (GCC does in its default gnu++ mode, Clang within one expression).
//
// Arithmetic is in base 2: the kernel pre-scales every log-domain quantity by log2(e), so that
// exp2 needs no multiplication in its range reduction (two of its FMA-pipe operations move to the
// add pipes, which are otherwise idle).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <algorithm>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DVGS_SINKHORN_X86 1
#define DVGS_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")))
#define DVGS_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define DVGS_SINKHORN_X86 0
#endif
#define DVGS_INLINE inline __attribute__((always_inline))

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // wide vectors only ever cross always_inline calls
#endif

namespace dvgs_fast {
namespace sinkhorn {
namespace simd {

// Points per panel: a column panel holds 16 points coordinate-major ([d][16]), one cache line of
// float per coordinate. Row chunks are 48 points (a multiple of 16 and of every micro-kernel
// height below), tiles are up to 8 panels (128 columns) wide.
constexpr int kW = 16;
constexpr int kTR = 48;
constexpr int kTP = 8;
constexpr int kTC = kW * kTP;

template <typename T, int B>
struct VT;
template <int B>
struct VT<float, B> {
  typedef float V __attribute__((vector_size(B)));
  typedef int32_t I __attribute__((vector_size(B)));
  typedef uint32_t U __attribute__((vector_size(B)));
  static constexpr int L = B / 4;
};
template <int B>
struct VT<double, B> {
  typedef double V __attribute__((vector_size(B)));
  typedef int64_t I __attribute__((vector_size(B)));
  typedef uint64_t U __attribute__((vector_size(B)));
  static constexpr int L = B / 8;
};

// Per-type constants, in log2 units.
template <typename T>
struct Consts;
template <>
struct Consts<float> {
  // Start of a running maximum and the offset of padding points: finite (no inf - inf), far below
  // anything a real point produces.
  static constexpr float kInit = -1e37f;
  static constexpr float kPad = -1e30f;
  // A block whose largest term is 2^kSkip below the running maximum is skipped: each of its terms
  // is < 2^-40 of the largest, so even 50,000 of them move a float32 sum by < 5e-8 (its rounding).
  static constexpr float kSkip = 40.0f;
  static constexpr float kLow = -125.0f;  // exp2 clamp: 2^k stays a normal number
};
template <>
struct Consts<double> {
  static constexpr double kInit = -1e300;
  static constexpr double kPad = -1e200;
  static constexpr double kSkip = 80.0;  // 2^-80 * 1e6 terms < 1e-18
  static constexpr double kLow = -1021.0;
};

template <typename V, typename S>
DVGS_INLINE V splat(S s) {
  using E = std::remove_cvref_t<decltype(V{}[0])>;
  return V{} + static_cast<E>(s);
}

DVGS_INLINE double exp2_scalar(double x) { return std::exp2(x); }

template <typename V>
DVGS_INLINE V vload(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));  // an unaligned vector load
  return v;
}
template <typename V>
DVGS_INLINE void vstore(void* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename V>
DVGS_INLINE V vmax(V a, V b) {
#if defined(__clang__)
  return __builtin_elementwise_max(a, b);
#else
  return a > b ? a : b;  // one vmaxps / vmaxpd
#endif
}

// True if any lane of a comparison mask is set.
template <typename I>
DVGS_INLINE bool any_lane(I m) {
  uint64_t w[sizeof(I) / 8];
  std::memcpy(w, &m, sizeof(I));
  uint64_t acc = 0;
  for (size_t i = 0; i < sizeof(I) / 8; ++i) acc |= w[i];
  return acc != 0;
}

template <typename T, typename V>
DVGS_INLINE T hmax(V v) {
  T m = v[0];
  for (size_t l = 1; l < sizeof(V) / sizeof(T); ++l) m = v[l] > m ? v[l] : m;
  return m;
}
template <typename V>
DVGS_INLINE double hsum(V v) {
  double s = 0;
  for (size_t l = 0; l < sizeof(V) / sizeof(v[0]); ++l) s += static_cast<double>(v[l]);
  return s;
}

// 2^x for x <= 0, branch-free. x = k + r with k = round(x) (the float addition of 1.5 * 2^mant
// rounds), 2^r on [-1/2, 1/2] by a near-minimax polynomial (float: degree 5, relative error
// 2.3e-7, below the rounding of the arguments themselves; double: degree 11, 2.2e-16), and 2^k
// added into the exponent bits. Arguments below kLow give 2^kLow (~1e-38 / 1e-307 of the largest
// term, which is always 2^0 here: negligible in every sum the kernel forms).
template <int B>
DVGS_INLINE typename VT<float, B>::V vexp2(typename VT<float, B>::V x) {
  using V = typename VT<float, B>::V;
  using U = typename VT<float, B>::U;
  x = vmax(x, splat<V>(Consts<float>::kLow));
  const V shifter = splat<V>(12582912.0f);  // 1.5 * 2^23
  const V t = x + shifter;
  const V r = x - (t - shifter);
  V p = splat<V>(1.3276466634124517e-03f);
  p = p * r + 9.675541892647743e-03f;
  p = p * r + 5.550713464617729e-02f;
  p = p * r + 2.4022120237350464e-01f;
  p = p * r + 6.931469440460205e-01f;
  p = p * r + 1.0000001192092896f;
  return (V)((U)p + ((U)t << 23));  // k sits in the low mantissa bits of t
}

template <int B>
DVGS_INLINE typename VT<double, B>::V vexp2(typename VT<double, B>::V x) {
  using V = typename VT<double, B>::V;
  using U = typename VT<double, B>::U;
  x = vmax(x, splat<V>(Consts<double>::kLow));
  const V shifter = splat<V>(6755399441055744.0);  // 1.5 * 2^52
  const V t = x + shifter;
  const V r = x - (t - shifter);
  V p = splat<V>(3.844459394443206e-10);
  p = p * r + 7.056808961790166e-09;
  p = p * r + 1.0182095687626633e-07;
  p = p * r + 1.3215536468772989e-06;
  p = p * r + 1.5252724152282571e-05;
  p = p * r + 1.540353024474691e-04;
  p = p * r + 1.333355815653646e-03;
  p = p * r + 9.618129107783178e-03;
  p = p * r + 5.5504108664780186e-02;
  p = p * r + 2.402265069590948e-01;
  p = p * r + 6.931471805599456e-01;
  p = p * r + 1.0;
  return (V)((U)p + ((U)t << 52));
}

// 1/sqrt(x) for x > 0: bit-trick seed and Newton steps (3 for float, 4 for double); plain
// arithmetic, so it vectorises without -fno-math-errno. Only p = 1 uses it.
template <int B>
DVGS_INLINE typename VT<float, B>::V vrsqrt(typename VT<float, B>::V x) {
  using V = typename VT<float, B>::V;
  using I = typename VT<float, B>::I;
  V y = (V)(0x5f3759df - ((I)x >> 1));
  const V hx = x * 0.5f;
  for (int it = 0; it < 3; ++it) y = y * (1.5f - hx * y * y);
  return y;
}
template <int B>
DVGS_INLINE typename VT<double, B>::V vrsqrt(typename VT<double, B>::V x) {
  using V = typename VT<double, B>::V;
  using I = typename VT<double, B>::I;
  V y = (V)(0x5fe6eb50c7b537a9LL - ((I)x >> 1));
  const V hx = x * 0.5;
  for (int it = 0; it < 4; ++it) y = y * (1.5 - hx * y * y);
  return y;
}

// ------------------------------------------------------------------------------------------
// The matrix-multiply micro-kernel: out[r][c] = sum_k x[r][k] * pan[k][c] for MR rows of x
// (row stride d) against one panel (16 points, [d][16]), out with row stride ldo. The MR x 16
// accumulators stay in registers (MR * 16 / L of them: 12 for AVX2 float with MR = 6, 12 for
// AVX-512 float with MR = 12); each k costs 16 / L vector loads and MR broadcasts for MR * 16 / L
// FMAs, so the loop runs at the FMA pipes' rate while its operands sit in L1/L2.
// ------------------------------------------------------------------------------------------
template <typename T, int B>
struct Micro;  // MR per (type, width): accumulators fill about 3/4 of the register file
template <>
struct Micro<float, 16> { static constexpr int MR = 3; };
template <>
struct Micro<double, 16> { static constexpr int MR = 1; };
template <>
struct Micro<float, 32> { static constexpr int MR = 6; };
template <>
struct Micro<double, 32> { static constexpr int MR = 3; };
template <>
struct Micro<float, 64> { static constexpr int MR = 12; };
template <>
struct Micro<double, 64> { static constexpr int MR = 12; };

template <typename T, int B, int MR>
DVGS_INLINE void dot_block(const T* __restrict x, int64_t d, const T* __restrict pan, T* __restrict out,
                           int64_t ldo) {
  using V = typename VT<T, B>::V;
  constexpr int L = VT<T, B>::L;
  constexpr int NV = kW / L;
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int64_t k = 0; k < d; ++k) {
    V yv[NV];
    for (int v = 0; v < NV; ++v) yv[v] = vload<V>(pan + k * kW + v * L);
    for (int r = 0; r < MR; ++r) {
      const T xs = x[r * d + k];
      for (int v = 0; v < NV; ++v) acc[r][v] = xs * yv[v] + acc[r][v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) vstore(out + r * ldo + v * L, acc[r][v]);
}

// S[kTR][nc] (row stride nc) = the dot products of the kTR rows at x (row stride d) with the
// panels pan[0 .. nc / 16) ([d][16] each, consecutive). Panel-outer: one panel is reused from L1
// by every row group.
template <typename T, int B>
DVGS_INLINE void dot_tile(const T* x, int64_t d, const T* pan, int nc, T* S) {
  constexpr int MR = Micro<T, B>::MR;
  static_assert(kTR % MR == 0, "the micro-kernel height must divide the chunk");
  for (int p = 0; p < nc / kW; ++p)
    for (int r = 0; r < kTR; r += MR) dot_block<T, B, MR>(x + r * d, d, pan + p * d * kW, S + r * nc + p * kW, nc);
}

// ------------------------------------------------------------------------------------------
// Log-sum-exp over one tile of pair terms, both directions. A term is a = h + c * S (log2
// units): for p = 2, S the dot products and c = log2(e) / eps; the point offsets h carry the
// weights, the potentials and the |p|^2 / (2 eps) parts (p = 1: S holds -|x - y|). Each
// direction takes two sweeps over the tile (L1/L2-resident): the maxima, then the sum of
// 2^(a - max), so every term costs one exp2 and the online state is rescaled once per tile.
// A row (column) lane group whose tile maximum lies kSkip (log2 units) below its running
// maximum skips the exp2 sweep: at small eps most of a row's tiles do.
// ------------------------------------------------------------------------------------------

// Row direction: rows [0, nr) of S[.][nc], column offsets hc[0, nc). State per row and lane
// (lane l sees columns l, l + L, ...): running maximum rm[r] and sum rs[r] of 2^(a - max), so a
// tile costs no horizontal reduction; finish_rows() folds the lanes once per pass.
template <typename T, int B>
DVGS_INLINE void lse_rows(const T* S, int nc, int nr, const T* hc, T c, typename VT<T, B>::V* rm,
                          typename VT<T, B>::V* rs) {
  using V = typename VT<T, B>::V;
  using I = typename VT<T, B>::I;
  constexpr int L = VT<T, B>::L;
  const V cv = splat<V>(c);
  for (int r = 0; r < nr; ++r) {
    const T* row = S + static_cast<int64_t>(r) * nc;
    V mx = splat<V>(Consts<T>::kInit);
    for (int j = 0; j < nc; j += L) mx = vmax(mx, vload<V>(row + j) * cv + vload<V>(hc + j));
    const V om = rm[r];
    if (!any_lane<I>(mx >= om - Consts<T>::kSkip)) continue;
    const V nm = vmax(om, mx);
    V acc = V{};
    for (int j = 0; j < nc; j += L) acc += vexp2<B>((vload<V>(row + j) * cv + vload<V>(hc + j)) - nm);
    rs[r] = rs[r] * vexp2<B>(om - nm) + acc;
    rm[r] = nm;
  }
}

// One (max, sum) per row from its lanes: m[r] = max of the lane maxima, s[r] = sum of the lane
// sums rescaled to it (in double).
template <typename T, int B>
DVGS_INLINE void finish_rows(int nr, const typename VT<T, B>::V* rm, const typename VT<T, B>::V* rs, T* m,
                             double* s) {
  using V = typename VT<T, B>::V;
  for (int r = 0; r < nr; ++r) {
    const T mx = hmax<T>(rm[r]);
    m[r] = mx;
    s[r] = hsum(rs[r] * vexp2<B>(rm[r] - splat<V>(mx)));
  }
}

// Merge n_groups partial column states (cm, cs: [n_groups][stride], as lse_cols leaves them),
// optionally with one more state per point (om: max, os: sum, e.g. its own row part), into
// lse2[j] = max + log2(sum) for j < n (log2 units).
template <typename T, int B>
DVGS_INLINE void merge_states(int64_t n, int64_t n_groups, int64_t stride, const T* cm, const T* cs, const T* om,
                              const double* os, double* lse2) {
  using V = typename VT<T, B>::V;
  constexpr int L = VT<T, B>::L;
  for (int64_t j0 = 0; j0 < n; j0 += L) {
    V mx = splat<V>(Consts<T>::kInit);
    for (int64_t g = 0; g < n_groups; ++g) mx = vmax(mx, vload<V>(cm + g * stride + j0));
    const int64_t nl = std::min<int64_t>(L, n - j0);
    T own_m[L];
    double own_s[L] = {};
    if (om != nullptr) {
      for (int64_t l = 0; l < nl; ++l) {
        own_m[l] = om[j0 + l];
        own_s[l] = os[j0 + l];
        if (own_m[l] > mx[l]) mx[l] = own_m[l];
      }
    }
    V tot = V{};
    for (int64_t g = 0; g < n_groups; ++g)
      tot += vload<V>(cs + g * stride + j0) * vexp2<B>(vload<V>(cm + g * stride + j0) - mx);
    for (int64_t l = 0; l < nl; ++l) {
      double t = static_cast<double>(tot[l]);
      if (om != nullptr) t += own_s[l] * exp2_scalar(static_cast<double>(own_m[l]) - static_cast<double>(mx[l]));
      lse2[j0 + l] = static_cast<double>(mx[l]) + std::log2(t);
    }
  }
}

// Column direction: columns [0, nc) of S over rows [0, nr) with row offsets hr[0, nr). State per
// column lane: running maximum cm and sum cs (T, rescaled per tile).
template <typename T, int B>
DVGS_INLINE void lse_cols(const T* S, int nc, int nr, const T* hr, T c, T* cm, T* cs) {
  using V = typename VT<T, B>::V;
  using I = typename VT<T, B>::I;
  constexpr int L = VT<T, B>::L;
  const V cv = splat<V>(c);
  for (int j = 0; j < nc; j += L) {
    V mx = splat<V>(Consts<T>::kInit);
    for (int r = 0; r < nr; ++r) mx = vmax(mx, vload<V>(S + static_cast<int64_t>(r) * nc + j) * cv + hr[r]);
    const V om = vload<V>(cm + j);
    if (!any_lane<I>(mx >= om - Consts<T>::kSkip)) continue;
    const V nm = vmax(om, mx);
    V acc = V{};
    for (int r = 0; r < nr; ++r) acc += vexp2<B>((vload<V>(S + static_cast<int64_t>(r) * nc + j) * cv + hr[r]) - nm);
    vstore(cs + j, vload<V>(cs + j) * vexp2<B>(om - nm) + acc);
    vstore(cm + j, nm);
  }
}

}  // namespace simd
}  // namespace sinkhorn
}  // namespace dvgs_fast
