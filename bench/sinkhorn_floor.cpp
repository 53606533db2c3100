// Per-core throughputs that bound the CPU Sinkhorn kernel, measured with the kernel's own code
// (csrc/cpu/sinkhorn_simd.h) on L1/L2-resident data, one thread, CPU time:
//   fma_peak   FMAs/s of a register-only loop with 16 independent accumulator vectors (the
//              hardware limit of the dot products);
//   dot_tile   FMAs/s of the kernel's matrix-multiply micro-kernel on one 48 x 128 tile at d;
//   exp2       exp2/s of the kernel's vector exp2 (summed, as the log-sum-exp uses it);
//   lse_pair   seconds per pair of one tile's two-direction log-sum-exp (both sweeps, no skip).
// bench/bench_sinkhorn.py compiles this file with the extension's flags and turns the figures
// into a floor for each benchmark case. Prints one JSON object.
//
// Built once per instruction set, like the kernel's variants (there: target attributes):
//   g++ -O3 -std=gnu++20 -I csrc -mavx2 -mfma -DFLOOR_BYTES=32 bench/sinkhorn_floor.cpp -o floor && ./floor [d ...]
//   (-mavx512f -mavx512dq -mavx512vl -mavx512bw -mavx2 -mfma -DFLOOR_BYTES=64 for AVX-512)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <vector>

#include "cpu/sinkhorn_simd.h"

using namespace dvgs_fast::sinkhorn::simd;

static double cpu_now() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

// Repeat fn until it has run for at least `min_s` of CPU time; best of 5 such runs, per call.
template <typename F>
static double per_call(F&& fn, double min_s = 0.05) {
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    long calls = 0;
    const double t0 = cpu_now();
    double t = 0;
    do {
      fn();
      ++calls;
      t = cpu_now() - t0;
    } while (t < min_s);
    best = std::min(best, t / calls);
  }
  return best;
}

static volatile float g_sink;

template <int B>
struct Bench {
  using V = typename VT<float, B>::V;
  static constexpr int L = VT<float, B>::L;

  // 12 independent FMA chains in named registers (an array would be spilled around the barrier).
  static __attribute__((noinline)) float fma_loop(long iters, float a) {
    const V m = splat<V>(0.999f), c = splat<V>(a);
    V a0 = splat<V>(0.f), a1 = splat<V>(.1f), a2 = splat<V>(.2f), a3 = splat<V>(.3f), a4 = splat<V>(.4f),
      a5 = splat<V>(.5f), a6 = splat<V>(.6f), a7 = splat<V>(.7f), a8 = splat<V>(.8f), a9 = splat<V>(.9f),
      a10 = splat<V>(1.f), a11 = splat<V>(1.1f);
    for (long it = 0; it < iters; ++it) {
      a0 = a0 * m + c; a1 = a1 * m + c; a2 = a2 * m + c; a3 = a3 * m + c; a4 = a4 * m + c; a5 = a5 * m + c;
      a6 = a6 * m + c; a7 = a7 * m + c; a8 = a8 * m + c; a9 = a9 * m + c; a10 = a10 * m + c; a11 = a11 * m + c;
      // opaque to the optimiser (no folding of the chains), free at run time
      asm volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7), "+v"(a8),
                   "+v"(a9), "+v"(a10), "+v"(a11));
    }
    return static_cast<float>(hsum(a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11));
  }

  static __attribute__((noinline)) float exp_loop(const float* x, int n, int reps) {
    V acc = V{};
    for (int r = 0; r < reps; ++r)
      for (int j = 0; j < n; j += L) acc += vexp2<B>(vload<V>(x + j));
    return static_cast<float>(hsum(acc));
  }

  static __attribute__((noinline)) void tile(const float* x, int64_t d, const float* pan, float* S) {
    dot_tile<float, B>(x, d, pan, kTC, S);
  }

  static __attribute__((noinline)) void lse(const float* S, const float* hc, const float* hr, float* m, double* s,
                                            float* cm, float* cs) {
    V rm[kTR], rs[kTR];
    for (int r = 0; r < kTR; ++r) {
      rm[r] = splat<V>(Consts<float>::kInit);
      rs[r] = V{};
    }
    for (int j = 0; j < kTC; ++j) {
      cm[j] = Consts<float>::kInit;
      cs[j] = 0;
    }
    lse_rows<float, B>(S, kTC, kTR, hc, 1.0f, rm, rs);
    lse_cols<float, B>(S, kTC, kTR, hr, 1.0f, cm, cs);
    finish_rows<float, B>(kTR, rm, rs, m, s);
  }

  static void run(const std::vector<int64_t>& dims, const char* isa) {
    std::printf("{\"isa\": \"%s\", \"dtype\": \"float32\", \"lanes\": %d", isa, L);
    const long iters = 2000;
    const double t_fma = per_call([&] { g_sink = fma_loop(iters, 1e-3f); });
    std::printf(", \"fma_per_s\": %.6g", 12.0 * L * iters / t_fma);
    std::vector<float> xs(4096);
    for (size_t i = 0; i < xs.size(); ++i) xs[i] = -30.0f * static_cast<float>(i % 97) / 97.0f;
    const double t_exp = per_call([&] { g_sink = exp_loop(xs.data(), 4096, 16); });
    std::printf(", \"exp2_per_s\": %.6g", 4096.0 * 16 / t_exp);
    std::vector<float> S(kTR * kTC), hc(kTC), hr(kTR), m(kTR), cm(kTC), cs(kTC);
    std::vector<double> s(kTR);
    for (int i = 0; i < kTR * kTC; ++i) S[i] = -static_cast<float>((i * 37) % 101) * 0.3f;
    for (int j = 0; j < kTC; ++j) hc[j] = -0.01f * j;
    for (int r = 0; r < kTR; ++r) hr[r] = -0.02f * r;
    const double t_lse = per_call([&] { lse(S.data(), hc.data(), hr.data(), m.data(), s.data(), cm.data(), cs.data()); });
    std::printf(", \"lse_s_per_pair\": %.6g", t_lse / (kTR * kTC));
    std::printf(", \"dot_tile_fma_per_s\": {");
    for (size_t i = 0; i < dims.size(); ++i) {
      const int64_t d = dims[i];
      std::vector<float> x(kTR * d), pan(d * kTC);
      for (size_t k = 0; k < x.size(); ++k) x[k] = 0.001f * static_cast<float>(k % 13);
      for (size_t k = 0; k < pan.size(); ++k) pan[k] = 0.002f * static_cast<float>(k % 7);
      const double t = per_call([&] { tile(x.data(), d, pan.data(), S.data()); });
      std::printf("%s\"%lld\": %.6g", i ? ", " : "", static_cast<long long>(d), static_cast<double>(kTR) * kTC * d / t);
    }
    std::printf("}}\n");
  }
};

#ifndef FLOOR_BYTES
#define FLOOR_BYTES 32
#endif

int main(int argc, char** argv) {
  std::vector<int64_t> dims;
  for (int i = 1; i < argc; ++i) dims.push_back(std::atoll(argv[i]));
  if (dims.empty()) dims = {8, 64};
  Bench<FLOOR_BYTES>::run(dims, FLOOR_BYTES == 64 ? "avx512" : FLOOR_BYTES == 32 ? "avx2" : "generic");
  return 0;
}
