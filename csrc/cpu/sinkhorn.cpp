// CPU engine of the sinkhorn op: the soft-C-transform (softmin) and its barycentric gradient,
// with the pairwise costs computed tile by tile, never as an N x M matrix (memory O((N + M) d)).
//
// One softmin row i is  -eps * LSE_j( h_j - C(x_i, y_j) / eps ).  For p = 2 the cost is expanded,
// C_ij / eps = (|x_i|^2 + |y_j|^2) / (2 eps) - x_i.y_j / eps: the |y_j|^2 term is folded into the
// column offset h_j, the |x_i|^2 term leaves the LSE, and what remains per pair is a dot product.
// Rows are walked in chunks of 48 points, columns in tiles of up to 128 points; for each tile:
//   1. S = X_chunk Y_tile^T by a register-blocked matrix-multiply micro-kernel (cpu/sinkhorn_simd.h:
//      MR rows x 16 columns of accumulators, FMA-bound), into an L1/L2-resident buffer;
//   2. the rows' online log-sum-exp over the tile (max sweep, then one exp2 per pair), and for the
//      fused passes also the columns' (each dot product serves both directions);
//   3. rows or columns whose tile maximum is 2^40 (float; 2^80 double) below their running maximum
//      skip the exp2 sweep: at the small temperatures of the end of the schedule, most do.
// All log-domain quantities are pre-scaled by log2(e) (exp2 is cheaper than exp). Clouds are
// centred on their joint bounding box first (costs are translation-invariant; smaller |x| means
// less cancellation in |x|^2 + |y|^2 - 2 x.y).
//
// Per Sinkhorn iteration the loop needs four softmins (x<-y, y<-x, x<-x, y<-y). Two fused passes
// serve them: x<-y and y<-x from one evaluation of each pair, and x<-x / y<-y from the upper
// triangle of their symmetric cost only: N M + N^2 / 2 + M^2 / 2 dot products per iteration.
//
// Small problems (LossVal: a batch of 128 against a few thousand targets, d up to ~1000): when
// every tile of a call fits in a memory budget (DVGS_FAST_SINKHORN_CACHE_MB, default 64 MB) and
// d >= 16, the first pass keeps its tiles of dot products and later passes reuse them. That trades
// the O(N + M) memory bound for d times fewer flops per later pass, only where the memory is small.
//
// Vector code is compiled three times: AVX-512, AVX2+FMA and baseline x86-64, chosen at run time
// (DVGS_FAST_CPU_ISA=avx512 | avx2 | generic forces a lower one, for tests and benchmarks).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/sinkhorn_simd.h"
#include "ops/sinkhorn.h"

namespace dvgs_fast {
namespace sinkhorn {
namespace {

using simd::kTC;
using simd::kTP;
using simd::kTR;
using simd::kW;

constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.69314718055994530942;

// ----------------------------------------------------------------------------------------
// One pass: every row chunk against the column panels it needs.
//   kCross: rows = one cloud, columns = the other; every pair once, both directions.
//   kSelf:  rows = columns = one cloud; chunk k only visits panels from its own first one on
//           (costs are symmetric): the panels inside the chunk in the row direction only, the
//           later ones in both. A point's LSE is then its row part merged with its column part.
//   kRows:  the row direction only (the gradient's first sweep).
// Chunks are dealt to a fixed number of groups (chunk k to group k mod n_groups), each with its
// own column state, merged in group order afterwards: results do not depend on the thread count.
// ----------------------------------------------------------------------------------------
enum class Kind { kCross, kSelf, kRows };

template <typename T>
struct Pass {
  Kind kind = Kind::kCross;
  int64_t d = 0, n_rows = 0, n_chunks = 0, n_panels = 0, n_groups = 1;
  const T* rows = nullptr;    // centred rows cloud [n_chunks * 48][d] (zero padding)
  const T* rsq = nullptr;     // |row|^2, padded
  const T* panels = nullptr;  // centred columns cloud packed [n_panels][d][16]
  const T* csq = nullptr;     // |col|^2 [n_panels * 16]
  const T* hc = nullptr;      // column offsets (log2 units) [n_panels * 16], kPad on padding
  const T* hr = nullptr;      // row offsets for the column direction [n_chunks * 48]
  T c = 0;                    // log2(e) / eps
  T* cache = nullptr;         // kept dot-product tiles, or null
  const int64_t* cache_off = nullptr;  // per chunk: where its tiles start in cache
  bool cache_ready = false;   // tiles already computed by an earlier pass
  T* row_m = nullptr;         // [n_rows] running max (log2 units) of each row's terms
  double* row_s = nullptr;    // [n_rows] sum of 2^(term - max)
  T* col_m = nullptr;         // [n_groups][n_panels * 16]
  T* col_s = nullptr;
};

// p = 1: S[r][j] (dot products) -> -|x_r - y_j| (geomloss's sqrt(clamp_min(sq, 1e-8))), into out.
template <typename T, int B>
DVGS_INLINE void to_neg_dist(const T* S, int nc, const T* rsq, const T* csq, T* out) {
  using V = typename simd::VT<T, B>::V;
  constexpr int L = simd::VT<T, B>::L;
  const V lo = simd::splat<V>(T(1e-8));
  for (int r = 0; r < kTR; ++r)
    for (int j = 0; j < nc; j += L) {
      const int64_t o = static_cast<int64_t>(r) * nc + j;
      V sq = (simd::vload<V>(csq + j) + rsq[r]) - simd::vload<V>(S + o) * T(2);
      sq = simd::vmax(sq, lo);
      simd::vstore(out + o, -(sq * simd::vrsqrt<B>(sq)));
    }
}

// One tile of a chunk: panels [t0, t1) against the chunk's rows (not a lambda: a lambda would
// be compiled apart from the target-attributed caller, for the baseline instruction set).
template <typename T, int B, int P>
DVGS_INLINE void tile_pass(const Pass<T>& q, int64_t lo, int nr, int64_t pb, T* cached, int64_t t0, int64_t t1,
                           bool both, typename simd::VT<T, B>::V* rm, typename simd::VT<T, B>::V* rs, T* col_m,
                           T* col_s, T* buf) {
  const int nc = static_cast<int>((t1 - t0) * kW);
  T* S = buf;
  if (cached != nullptr) S = cached + (t0 - pb) * kW * kTR;
  if (cached == nullptr || !q.cache_ready) simd::dot_tile<T, B>(q.rows + lo * q.d, q.d, q.panels + t0 * q.d * kW, nc, S);
  if constexpr (P == 1) {
    to_neg_dist<T, B>(S, nc, q.rsq + lo, q.csq + t0 * kW, buf);
    S = buf;
  }
  simd::lse_rows<T, B>(S, nc, nr, q.hc + t0 * kW, q.c, rm, rs);
  if (both) simd::lse_cols<T, B>(S, nc, nr, q.hr + lo, q.c, col_m + t0 * kW, col_s + t0 * kW);
}

template <typename T, int B, int P>
DVGS_INLINE void chunk_pass(const Pass<T>& q, int64_t ch, T* col_m, T* col_s, T* buf) {
  const int64_t lo = ch * kTR, hi = std::min(q.n_rows, lo + kTR);
  const int nr = static_cast<int>(hi - lo);
  using V = typename simd::VT<T, B>::V;
  V rm[kTR], rs[kTR];
  for (int r = 0; r < kTR; ++r) {
    rm[r] = simd::splat<V>(simd::Consts<T>::kInit);
    rs[r] = V{};
  }
  int64_t pb = 0, pboth = 0;  // panels [pb, pboth): row direction only (the self pass's diagonal)
  if (q.kind == Kind::kSelf) {
    pb = lo / kW;
    pboth = std::min(q.n_panels, (hi + kW - 1) / kW);
  }
  T* cached = q.cache != nullptr ? q.cache + q.cache_off[ch] : nullptr;
  if (pboth > pb) tile_pass<T, B, P>(q, lo, nr, pb, cached, pb, pboth, false, rm, rs, col_m, col_s, buf);
  const bool both = q.kind != Kind::kRows;
  for (int64_t t0 = std::max(pb, pboth); t0 < q.n_panels; t0 += kTP)
    tile_pass<T, B, P>(q, lo, nr, pb, cached, t0, std::min(q.n_panels, t0 + kTP), both, rm, rs, col_m, col_s, buf);
  simd::finish_rows<T, B>(nr, rm, rs, q.row_m + lo, q.row_s + lo);
}

template <typename T, int B, int P>
DVGS_INLINE void group_pass(const Pass<T>& q, int64_t g) {
  alignas(64) T buf[kTR * kTC];
  const int64_t mp = q.n_panels * kW;
  T* cm = q.col_m != nullptr ? q.col_m + g * mp : nullptr;
  T* cs = q.col_s != nullptr ? q.col_s + g * mp : nullptr;
  if (q.kind != Kind::kRows) {
    std::fill(cm, cm + mp, simd::Consts<T>::kInit);
    std::fill(cs, cs + mp, T(0));
  }
  for (int64_t ch = g; ch < q.n_chunks; ch += q.n_groups) chunk_pass<T, B, P>(q, ch, cm, cs, buf);
}

// ----------------------------------------------------------------------------------------
// Gradient of one softmin with respect to its row points, for one chunk of rows:
//   grad[i] = sum_j P_ij grad_1 C(x_i, y_j),  P_ij = 2^(a_ij - lse_i)  (lse from a kRows pass)
// for p = 2, x_i - sum_j P_ij y_j; for p = 1, sum_j P_ij (x_i - y_j) / |x_i - y_j|. Normalised by
// sum_j P_ij (1 up to rounding). Weights below 2^-kSkip (at most a 2^-40 share each) are left out
// of the weighted sum of the y_j: at the final temperature almost all are.
// ----------------------------------------------------------------------------------------
template <typename T>
struct GradPass {
  Pass<T> p;                // rows / panels / hc / c of the softmin
  const T* cols = nullptr;  // centred columns cloud, row-major [.][d]
  const T* lse = nullptr;   // [n_rows] row LSE (log2 units)
  T* grad = nullptr;        // [n_rows][d]
};

template <typename T, int B, int P>
DVGS_INLINE void grad_chunk(const GradPass<T>& g, int64_t ch, T* buf, T* acc) {
  using V = typename simd::VT<T, B>::V;
  constexpr int L = simd::VT<T, B>::L;
  const Pass<T>& q = g.p;
  const int64_t d = q.d, lo = ch * kTR, hi = std::min(q.n_rows, lo + kTR);
  const int nr = static_cast<int>(hi - lo);
  const T* x = q.rows + lo * d;
  std::fill(acc, acc + kTR * d, T(0));
  double S[kTR] = {}, A[kTR] = {};
  alignas(64) T w[kTC];
  const T tiny = static_cast<T>(std::exp2(-static_cast<double>(simd::Consts<T>::kSkip)));
  const V cv = simd::splat<V>(q.c);
  for (int64_t t0 = 0; t0 < q.n_panels; t0 += kTP) {
    const int64_t t1 = std::min(q.n_panels, t0 + kTP);
    const int nc = static_cast<int>((t1 - t0) * kW);
    simd::dot_tile<T, B>(x, d, q.panels + t0 * d * kW, nc, buf);
    if constexpr (P == 1) to_neg_dist<T, B>(buf, nc, q.rsq + lo, q.csq + t0 * kW, buf);
    const T* hc = q.hc + t0 * kW;
    for (int r = 0; r < nr; ++r) {
      const T* row = buf + static_cast<int64_t>(r) * nc;
      const V lv = simd::splat<V>(g.lse[lo + r]);
      V sv = V{};
      for (int j = 0; j < nc; j += L) {
        const V wv = simd::vexp2<B>((simd::vload<V>(row + j) * cv + simd::vload<V>(hc + j)) - lv);
        sv += wv;
        simd::vstore(w + j, wv);
      }
      S[r] += simd::hsum(sv);
      T* ar = acc + r * d;
      for (int j = 0; j < nc; ++j) {
        if (!(w[j] > tiny)) continue;
        T wj = w[j];
        if constexpr (P == 1) {
          const T dist = -row[j];
          wj = dist > T(1.0001e-4) ? wj / dist : T(0);  // clamped (sq <= 1e-8): no gradient
          A[r] += static_cast<double>(wj);
        }
        const T* yj = g.cols + (t0 * kW + j) * d;
        for (int64_t k = 0; k < d; ++k) ar[k] += wj * yj[k];
      }
    }
  }
  for (int r = 0; r < nr; ++r) {
    const double a = P == 2 ? S[r] : A[r];
    const T inv_s = static_cast<T>(1.0 / S[r]);
    const T as = static_cast<T>(a / S[r]);
    const T* xr = x + r * d;
    const T* ar = acc + r * d;
    T* out = g.grad + (lo + r) * d;
    for (int64_t k = 0; k < d; ++k) out[k] = xr[k] * as - ar[k] * inv_s;
  }
}

template <typename T, int B, int P>
DVGS_INLINE void grad_range(const GradPass<T>& g, int64_t c0, int64_t c1) {
  alignas(64) T buf[kTR * kTC];
  std::vector<T> acc(static_cast<size_t>(kTR * g.p.d));
  for (int64_t ch = c0; ch < c1; ++ch) grad_chunk<T, B, P>(g, ch, buf, acc.data());
}

// ----------------------------------------------------------------------------------------
// Instruction-set variants and the run-time choice between them.
// ----------------------------------------------------------------------------------------
template <typename T>
using GroupFn = void (*)(const Pass<T>&, int64_t);
template <typename T>
using GradFn = void (*)(const GradPass<T>&, int64_t, int64_t);
template <typename T>
using MergeFn = void (*)(int64_t, int64_t, int64_t, const T*, const T*, const T*, const double*, double*);

template <typename T, int P>
void group_generic(const Pass<T>& q, int64_t g) {
  group_pass<T, 16, P>(q, g);
}
template <typename T, int P>
void grad_generic(const GradPass<T>& q, int64_t c0, int64_t c1) {
  grad_range<T, 16, P>(q, c0, c1);
}
template <typename T>
void merge_generic(int64_t n, int64_t G, int64_t st, const T* cm, const T* cs, const T* om, const double* os,
                   double* out) {
  simd::merge_states<T, 16>(n, G, st, cm, cs, om, os, out);
}
#if DVGS_SINKHORN_X86
template <typename T, int P>
DVGS_TARGET_AVX2 void group_avx2(const Pass<T>& q, int64_t g) {
  group_pass<T, 32, P>(q, g);
}
template <typename T, int P>
DVGS_TARGET_AVX2 void grad_avx2(const GradPass<T>& q, int64_t c0, int64_t c1) {
  grad_range<T, 32, P>(q, c0, c1);
}
template <typename T>
DVGS_TARGET_AVX2 void merge_avx2(int64_t n, int64_t G, int64_t st, const T* cm, const T* cs, const T* om,
                                 const double* os, double* out) {
  simd::merge_states<T, 32>(n, G, st, cm, cs, om, os, out);
}
template <typename T, int P>
DVGS_TARGET_AVX512 void group_avx512(const Pass<T>& q, int64_t g) {
  group_pass<T, 64, P>(q, g);
}
template <typename T, int P>
DVGS_TARGET_AVX512 void grad_avx512(const GradPass<T>& q, int64_t c0, int64_t c1) {
  grad_range<T, 64, P>(q, c0, c1);
}
template <typename T>
DVGS_TARGET_AVX512 void merge_avx512(int64_t n, int64_t G, int64_t st, const T* cm, const T* cs, const T* om,
                                     const double* os, double* out) {
  simd::merge_states<T, 64>(n, G, st, cm, cs, om, os, out);
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
  GroupFn<T> group = nullptr;
  GradFn<T> grad = nullptr;
  MergeFn<T> merge = nullptr;
};

template <typename T, int P>
Kernels<T> pick_kernels(Isa isa) {
  Kernels<T> k{&group_generic<T, P>, &grad_generic<T, P>, &merge_generic<T>};
#if DVGS_SINKHORN_X86
  if (isa == Isa::kAvx2) k = {&group_avx2<T, P>, &grad_avx2<T, P>, &merge_avx2<T>};
  else if (isa == Isa::kAvx512) k = {&group_avx512<T, P>, &grad_avx512<T, P>, &merge_avx512<T>};
#endif
  return k;
}

// Bytes of dot-product tiles a call may keep (see the file comment); read per call.
int64_t cache_budget_bytes() {
  const char* env = std::getenv("DVGS_FAST_SINKHORN_CACHE_MB");
  double mb = 64.0;
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    const double v = std::strtod(env, &end);
    if (end != env && v >= 0) mb = v;
  }
  return static_cast<int64_t>(mb * 1024.0 * 1024.0);
}
// Below this many features recomputing a dot product costs about what re-reading it from memory
// does (bench/bench_sinkhorn.py measures both paths), so the cache is not worth its memory.
constexpr int64_t kCacheMinD = 16;

// at::parallel_for over [0, n_tasks) only when the pass is big enough to pay for waking the
// thread pool (cost ~ pairs * (d + exp)); small passes -- LossVal's batches -- run inline.
template <typename F>
void parallel_tasks(int64_t n_tasks, int64_t total_pairs, int64_t d, const F& fn) {
  constexpr int64_t kMinParallelWork = int64_t(1) << 21;
  if (n_tasks <= 1 || total_pairs * (d + 16) < kMinParallelWork || at::get_num_threads() <= 1) {
    fn(0, n_tasks);
    return;
  }
  at::parallel_for(0, n_tasks, 1, fn);
}

// ----------------------------------------------------------------------------------------
// The CPU engine: prepared (centred, padded, packed) clouds + the passes.
// ----------------------------------------------------------------------------------------
template <typename T>
class CpuEngine final : public SoftminEngine<T> {
 public:
  static constexpr bool kCentres = true;

  CpuEngine(const at::Tensor& x, const at::Tensor& y, const at::Tensor& center, int64_t p) : p_(p) {
    d_ = x.size(1);
    prepare(kX, x, center);
    prepare(kY, y, center);
    const auto opts = x.options().dtype(c10::CppTypeToScalarType<T>::value);
    const int64_t max_pad = std::max(n_chunks_[kX], n_chunks_[kY]) * kTR;
    hh_ = at::empty({max_pad}, opts);
    hr_ = at::empty({max_pad}, opts);
    lse_.resize(static_cast<size_t>(max_pad));
    row_m_.resize(static_cast<size_t>(max_pad));
    row_s_.resize(static_cast<size_t>(max_pad));
    const Isa isa = best_isa();
    k_ = p_ == 2 ? pick_kernels<T, 2>(isa) : pick_kernels<T, 1>(isa);
    // The cross pass puts the larger cloud on the rows: rows are what runs in parallel.
    cross_rows_ = n_[kY] > n_[kX] ? kY : kX;
    const Side cr = cross_rows_, cc = other(cr);
    const int64_t elems = n_chunks_[cr] * n_panels_[cc] * kW * kTR + self_cache_elems(kX) + self_cache_elems(kY);
    use_cache_ = d_ >= kCacheMinD && elems * static_cast<int64_t>(sizeof(T)) <= cache_budget_bytes();
  }

  int64_t size(Side s) const override { return n_[s]; }

  // Single direction (rows against cols); the loop uses the fused passes below.
  void softmin(Side rows, Side cols, const T* logw, const T* pot, double eps, const T* prev, T* out,
               bool track_residual) override {
    Pass<T> q = pass(Kind::kRows, rows, cols, eps);
    q.hc = offsets(hh_, cols, logw, pot, eps);
    run(q);
    double* lse = lse_.data();
    for (int64_t i = 0; i < n_[rows]; ++i) lse[i] = row_m_[i] + std::log2(row_s_[i]);
    finish(rows, lse, eps, prev, out, track_residual);
  }

  void softmin_cross(const T* logw_x, const T* pot_x, const T* prev_x, T* out_x, const T* logw_y, const T* pot_y,
                     const T* prev_y, T* out_y, double eps, bool track_residual) override {
    if (cross_rows_ == kY) {
      cross(kY, logw_y, pot_y, prev_y, out_y, logw_x, pot_x, prev_x, out_x, eps, track_residual);
    } else {
      cross(kX, logw_x, pot_x, prev_x, out_x, logw_y, pot_y, prev_y, out_y, eps, track_residual);
    }
  }

  void softmin_self(Side s, const T* logw, const T* pot, double eps, const T* prev, T* out,
                    bool track_residual) override {
    Pass<T> q = pass(Kind::kSelf, s, s, eps);
    q.hc = offsets(hh_, s, logw, pot, eps);
    q.hr = q.hc;
    Cache& cache = self_cache_[s];
    attach_cache(q, cache, [&](int64_t ch) { return (n_panels_[s] - ch * kTR / kW) * kW * kTR; });
    run(q);
    cache.ready = cache.data.defined();
    // A point's LSE = its row part (later columns) merged with its column part (earlier rows).
    merge_columns(q, n_[s], /*with_rows=*/true);
    finish(s, lse_.data(), eps, prev, out, track_residual);
  }

  double take_residual() override {
    const double r = residual_;
    residual_ = 0;
    return r;
  }

  void softmin_grad(Side rows, Side cols, const T* logw, const T* pot, double eps, T* grad) override {
    Pass<T> q = pass(Kind::kRows, rows, cols, eps);
    q.hc = offsets(hh_, cols, logw, pot, eps);
    run(q);
    // the row LSEs, rounded to T exactly like the terms they will be compared with
    at::Tensor lse = at::empty({n_[rows]}, hh_.options());
    T* l = lse.template data_ptr<T>();
    for (int64_t i = 0; i < n_[rows]; ++i) l[i] = static_cast<T>(row_m_[i] + std::log2(row_s_[i]));
    GradPass<T> g;
    g.p = q;
    g.cols = rows_[cols].template data_ptr<T>();
    g.lse = l;
    g.grad = grad;
    const GradFn<T> fn = k_.grad;
    parallel_tasks(q.n_chunks, 2 * n_[rows] * n_[cols], d_, [&](int64_t c0, int64_t c1) { fn(g, c0, c1); });
  }

 private:
  struct Cache {
    at::Tensor data;
    std::vector<int64_t> off;
    bool ready = false;
  };

  static Side other(Side s) { return s == kX ? kY : kX; }

  int64_t self_cache_elems(Side s) const {
    int64_t e = 0;
    for (int64_t ch = 0; ch < n_chunks_[s]; ++ch) e += (n_panels_[s] - ch * kTR / kW) * kW * kTR;
    return e;
  }

  // Centred copy of the cloud (rows, zero-padded to whole chunks), its squared norms (summed in
  // double) and its panel-packed copy, in one sweep of plain loops: at LossVal's sizes a chain of
  // tensor ops (and their temporaries' page faults) would cost more than the solve.
  void prepare(Side s, const at::Tensor& pts, const at::Tensor& center) {
    const int64_t n = pts.size(0), d = d_;
    n_[s] = n;
    n_chunks_[s] = (n + kTR - 1) / kTR;
    n_panels_[s] = (n + kW - 1) / kW;
    const int64_t n_pad = n_chunks_[s] * kTR;  // >= n_panels * 16: whole panels stay inside
    const auto opts = pts.options().dtype(c10::CppTypeToScalarType<T>::value);
    rows_[s] = at::empty({n_pad, d}, opts);
    rsq_[s] = at::empty({n_pad}, opts);
    panels_[s] = at::empty({n_panels_[s], d, kW}, opts);
    const at::Tensor src = pts.contiguous();
    const at::Tensor cen = center.to(src.scalar_type()).contiguous();
    const T* in = src.template data_ptr<T>();
    const T* c = cen.template data_ptr<T>();
    T* rows = rows_[s].template data_ptr<T>();
    T* sq = rsq_[s].template data_ptr<T>();
    T* pan = panels_[s].template data_ptr<T>();
    for (int64_t i = 0; i < n; ++i) {
      double acc = 0;
      T* r = rows + i * d;
      T* p = pan + (i / kW) * d * kW + i % kW;
      for (int64_t k = 0; k < d; ++k) {
        const T v = in[i * d + k] - c[k];
        r[k] = v;
        p[k * kW] = v;
        acc += static_cast<double>(v) * static_cast<double>(v);
      }
      sq[i] = static_cast<T>(acc);
    }
    std::fill(rows + n * d, rows + n_pad * d, T(0));
    std::fill(sq + n, sq + n_pad, T(0));
    for (int64_t i = n; i < n_panels_[s] * kW; ++i)
      for (int64_t k = 0; k < d; ++k) pan[(i / kW) * d * kW + k * kW + i % kW] = T(0);
  }

  Pass<T> pass(Kind kind, Side rows, Side cols, double eps) {
    Pass<T> q;
    q.kind = kind;
    q.d = d_;
    q.n_rows = n_[rows];
    q.n_chunks = n_chunks_[rows];
    q.n_panels = n_panels_[cols];
    q.n_groups = std::min<int64_t>(q.n_chunks, 8);
    q.rows = rows_[rows].template data_ptr<T>();
    q.rsq = rsq_[rows].template data_ptr<T>();
    q.panels = panels_[cols].template data_ptr<T>();
    q.csq = rsq_[cols].template data_ptr<T>();
    q.c = static_cast<T>(kLog2e / eps);
    q.row_m = row_m_.data();
    q.row_s = row_s_.data();
    if (kind != Kind::kRows) {
      const int64_t need = q.n_groups * q.n_panels * kW;
      if (!col_m_.defined() || col_m_.numel() < need) {
        col_m_ = at::empty({need}, hh_.options());
        col_s_ = at::empty({need}, hh_.options());
      }
      q.col_m = col_m_.template data_ptr<T>();
      q.col_s = col_s_.template data_ptr<T>();
    }
    return q;
  }

  template <typename Size>
  void attach_cache(Pass<T>& q, Cache& cache, const Size& chunk_elems) {
    if (!use_cache_) return;
    if (!cache.data.defined()) {
      cache.off.resize(static_cast<size_t>(q.n_chunks));
      int64_t total = 0;
      for (int64_t ch = 0; ch < q.n_chunks; ++ch) {
        cache.off[ch] = total;
        total += chunk_elems(ch);
      }
      cache.data = at::empty({total}, hh_.options());
      cache.ready = false;
    }
    q.cache = cache.data.template data_ptr<T>();
    q.cache_off = cache.off.data();
    q.cache_ready = cache.ready;
  }

  void run(const Pass<T>& q) {
    const GroupFn<T> fn = k_.group;
    parallel_tasks(q.n_groups, q.n_rows * q.n_panels * kW, d_, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) fn(q, g);
    });
  }

  // lse_[j] (log2 units) for the n column points: the groups' column states merged in group
  // order (and with the point's own row state for the self pass).
  void merge_columns(const Pass<T>& q, int64_t n, bool with_rows) {
    k_.merge(n, q.n_groups, q.n_panels * kW, q.col_m, q.col_s, with_rows ? row_m_.data() : nullptr,
             with_rows ? row_s_.data() : nullptr, lse_.data());
  }

  // Per-point offsets of cloud s, log2 units: log2(e) (log w_j + pot_j / eps (- |p_j|^2 / (2 eps)
  // for p = 2)), in double then rounded; kPad on the padding points so they never count.
  const T* offsets(at::Tensor& buf, Side s, const T* logw, const T* pot, double eps) const {
    T* h = buf.template data_ptr<T>();
    const T* sq = rsq_[s].template data_ptr<T>();
    const int64_t m = n_[s];
    const bool half_sq = p_ == 2;
    for (int64_t j = 0; j < m; ++j) {
      double v = static_cast<double>(logw[j]);
      if (pot != nullptr) v += static_cast<double>(pot[j]) / eps;
      if (half_sq) v -= 0.5 * static_cast<double>(sq[j]) / eps;
      h[j] = static_cast<T>(v * kLog2e);
    }
    for (int64_t j = m; j < buf.numel(); ++j) h[j] = simd::Consts<T>::kPad;
    return h;
  }

  void cross(Side rs, const T* logw_r, const T* pot_r, const T* prev_r, T* out_r, const T* logw_c, const T* pot_c,
             const T* prev_c, T* out_c, double eps, bool track_residual) {
    const Side cs = other(rs);
    Pass<T> q = pass(Kind::kCross, rs, cs, eps);
    q.hc = offsets(hh_, cs, logw_c, pot_c, eps);  // rows' softmin runs over the columns' potential
    q.hr = offsets(hr_, rs, logw_r, pot_r, eps);
    const int64_t np = n_panels_[cs];
    attach_cache(q, cross_cache_, [&](int64_t) { return np * kW * kTR; });
    run(q);
    cross_cache_.ready = cross_cache_.data.defined();
    double* lse = lse_.data();
    for (int64_t i = 0; i < n_[rs]; ++i) lse[i] = row_m_[i] + std::log2(row_s_[i]);
    finish(rs, lse, eps, prev_r, out_r, track_residual);
    merge_columns(q, n_[cs], /*with_rows=*/false);
    finish(cs, lse, eps, prev_c, out_c, track_residual);
  }

  // out = -eps * LSE (+ |p|^2 / 2 for p = 2: the row constant of the expanded cost), averaged
  // with prev when given (geomloss's symmetric update), tracking the largest change. lse in log2
  // units.
  void finish(Side s, const double* lse, double eps, const T* prev, T* out, bool track_residual) {
    const T* sq = rsq_[s].template data_ptr<T>();
    const bool half_sq = p_ == 2;
    double r = 0;
    for (int64_t i = 0, n = n_[s]; i < n; ++i) {
      const T nv = static_cast<T>(-eps * kLn2 * lse[i] + (half_sq ? 0.5 * static_cast<double>(sq[i]) : 0.0));
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
  int64_t n_[2] = {0, 0}, n_chunks_[2] = {0, 0}, n_panels_[2] = {0, 0};
  at::Tensor rows_[2], rsq_[2], panels_[2], hh_, hr_, col_m_, col_s_;
  std::vector<double> lse_, row_s_;
  std::vector<T> row_m_;
  Side cross_rows_ = kX;
  bool use_cache_ = false;
  Cache cross_cache_, self_cache_[2];
  double residual_ = 0;
  Kernels<T> k_;
};

}  // namespace
}  // namespace sinkhorn

TORCH_LIBRARY_IMPL(dvgs_fast, CPU, m) {
  m.impl("sinkhorn", &sinkhorn::forward<sinkhorn::CpuEngine>);
  m.impl("sinkhorn_backward", &sinkhorn::backward<sinkhorn::CpuEngine>);
}

}  // namespace dvgs_fast
