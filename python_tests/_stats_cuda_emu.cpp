// Host emulation of the per_sample_grad_stats and linear_ghost_stats CUDA kernels, for machines
// without a GPU (driven by python_tests/test_cuda_emulation.py).
//
// The kernel file is compiled by g++ with the CUDA keywords mapped onto plain C++. Each CUDA thread
// of a block is a fiber (ucontext) on one OS thread, run by a small scheduler: __syncthreads() waits
// for the block's live threads, a warp shuffle exchanges values through a per-warp buffer between two
// waits of the warp's 32 lanes, __shared__ arrays become function statics (blocks run one after
// another), float4 / __ldg / __half / __nv_bfloat16 are small host types. A wait nobody can complete
// (a divergent __syncthreads, a shuffle with exited lanes) stops the emulator with an error, where a
// GPU would hang or read garbage. (Fibers, not std::threads: a block synchronises ~40 times, which
// costs ~5 ms per block here instead of ~50 ms of futex wake-ups.)
//
// A block filter runs only the blocks that touch chosen rows, so the index math can be checked at the
// GPU targets' sizes (N = 720,000 rows, 4096 x 1M elements) while only those rows are materialised:
// the inputs live in MAP_NORESERVE mappings that the kernel addresses at their full size.
//
// Build with -DEMU_GRAD_STATS or -DEMU_GHOST_STATS (the two kernel files share helper names).
// Usage: stats_cuda_emu IN OUT (binary formats: see run_typed below).
#include <sys/mman.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

// ---- the CUDA runtime surface the kernel files use ---------------------------------------------
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;

struct alignas(16) float4 {
  float x, y, z, w;
};
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float __half2float(__half h) {  // IEEE binary16 -> binary32, subnormals included
  const uint32_t sign = (h.bits >> 15) & 1u, exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
  float f;
  if (exp == 0) {
    f = std::ldexp(static_cast<float>(man), -24);
  } else if (exp == 31) {
    f = man ? NAN : INFINITY;
  } else {
    f = std::ldexp(static_cast<float>(man | 0x400u), static_cast<int>(exp) - 25);
  }
  return sign ? -f : f;
}

namespace emu {
inline dim3 thread_idx, block_idx, block_dim, grid_dim;
inline cudaError_t last_error = cudaSuccess;
inline std::function<bool(unsigned)> block_filter;  // null: every block
inline long long vec4_loads = 0, blocks_run = 0;

constexpr int kRunnable = -1, kBlockBarrier = 0;  // a fiber waiting on warp w waits on 1 + w
struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  int wait = kRunnable;
};
inline std::vector<Fiber> fibers;
inline ucontext_t scheduler;
inline unsigned current = 0;
inline std::function<void()> body;             // the kernel call of the running launch
inline std::vector<unsigned char> shfl_buf;    // [warps][32 lanes][8 bytes]

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emulator: %s (block %u, thread %u)\n", what, block_idx.x, thread_idx.x);
  std::exit(8);
}

inline void fiber_main() {
  body();
  fibers[current].done = true;  // returning resumes uc_link, the scheduler
}

// Park the running fiber until everyone it waits for has arrived.
inline void wait_on(int what) {
  fibers[current].wait = what;
  swapcontext(&fibers[current].ctx, &scheduler);
}

inline void run_block(unsigned n_threads) {
  for (unsigned t = 0; t < n_threads; ++t) {
    Fiber& f = fibers[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &scheduler;
    makecontext(&f.ctx, fiber_main, 0);
    f.done = false;
    f.wait = kRunnable;
  }
  const unsigned warps = n_threads / 32;
  for (;;) {
    for (unsigned t = 0; t < n_threads; ++t) {  // run every runnable thread up to its next wait or its end
      if (fibers[t].done || fibers[t].wait != kRunnable) continue;
      current = t;
      thread_idx = dim3(t);
      swapcontext(&scheduler, &fibers[t].ctx);
    }
    unsigned live = 0, at_block = 0;
    for (unsigned t = 0; t < n_threads; ++t) {
      live += !fibers[t].done;
      at_block += !fibers[t].done && fibers[t].wait == kBlockBarrier;
    }
    if (live == 0) return;
    bool released = false;
    if (at_block == live) {  // __syncthreads: every thread still running has arrived
      for (unsigned t = 0; t < n_threads; ++t) fibers[t].wait = kRunnable;
      released = true;
    }
    for (unsigned w = 0; w < warps && !released; ++w) {
      unsigned arrived = 0, exited = 0;
      for (unsigned t = 32 * w; t < 32 * w + 32; ++t) {
        arrived += !fibers[t].done && fibers[t].wait == 1 + static_cast<int>(w);
        exited += fibers[t].done;
      }
      if (arrived == 0) continue;
      if (exited > 0) fail("full-warp shuffle after some lanes of the warp exited");
      if (arrived == 32) {
        for (unsigned t = 32 * w; t < 32 * w + 32; ++t) fibers[t].wait = kRunnable;
        released = true;
      }
    }
    if (!released) fail("deadlock: threads wait at different barriers");
  }
}

template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, Args... args) {
  // What a real launch would reject.
  if (grid.x == 0 || block.x == 0 || block.x > 1024 || grid.x > 0x7fffffffu) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (block.x % 32 != 0) {
    std::fprintf(stderr, "emulator: blockDim.x %u is not a multiple of 32\n", block.x);
    std::exit(4);
  }
  block_dim = block;
  grid_dim = grid;
  body = [=] { kernel(args...); };
  fibers.resize(block.x);
  for (Fiber& f : fibers) f.stack.resize(256 << 10);
  shfl_buf.assign(static_cast<size_t>(block.x) * 8, 0);
  for (unsigned b = 0; b < grid.x; ++b) {
    if (block_filter && !block_filter(b)) continue;
    block_idx = dim3(b);
    run_block(block.x);
    ++blocks_run;
  }
}
}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define DVGS_CUDA_LAUNCH(kernel, grid, block, stream, ...) emu::launch(kernel, dim3(grid), dim3(block), __VA_ARGS__)

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
inline void __syncthreads() { emu::wait_on(emu::kBlockBarrier); }

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline float4 __ldg(const float4* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) emu::fail("misaligned float4 load");  // a GPU faults
  ++emu::vec4_loads;
  return *p;
}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
  static_assert(sizeof(T) <= 8, "shuffle of a wider type");
  if (mask != 0xffffffffu) emu::fail("only full-warp shuffles are emulated");
  const unsigned lane = emu::thread_idx.x & 31u, warp = emu::thread_idx.x >> 5;
  unsigned char* buf = emu::shfl_buf.data() + static_cast<size_t>(warp) * 32 * 8;
  std::memcpy(buf + lane * 8, &v, sizeof(T));
  emu::wait_on(1 + static_cast<int>(warp));
  T out = v;  // lanes past the end keep their own value, as on the GPU
  if (lane + delta < 32) std::memcpy(&out, buf + (lane + delta) * 8, sizeof(T));
  emu::wait_on(1 + static_cast<int>(warp));  // nobody overwrites a slot before all have read
  return out;
}

#if defined(EMU_GRAD_STATS)
#include "cuda/kernels/per_sample_grad_stats_kernel.cu"
#elif defined(EMU_GHOST_STATS)
#include "cuda/kernels/linear_ghost_stats_kernel.cu"
#else
#error "define EMU_GRAD_STATS or EMU_GHOST_STATS"
#endif

// ---- driver --------------------------------------------------------------------------------------
namespace {

// Zero-filled memory of `bytes` that is only backed where it is written.
void* reserve(size_t bytes) {
  void* p = mmap(nullptr, bytes ? bytes : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "emulator: cannot map %zu bytes\n", bytes);
    std::exit(7);
  }
  return p;
}

bool read_all(FILE* f, void* dst, size_t bytes) { return std::fread(dst, 1, bytes, f) == bytes; }

#if defined(EMU_GRAD_STATS)
// IN: int64 {dtype (0 f32, 1 f64, 2 f16, 3 bf16), n_rows, row_stride, ndim, sizes[8], strides[8],
//     chunk, row_begin, row_count, col_offset, extra_cols, data_shift, target_shift, n_pick},
//     int64 picked rows[n_pick] (absolute, inside the pass), target[numel] (f32, or f64 for f64),
//     then per picked row its numel elements in logical order (dtype; 2-byte types as raw bits).
// OUT: int64 {n_cols, vec4_loads, blocks_run, rows_per_pass(n_cols, kGradStatsPartialBudget), rc},
//      then per picked row: dot, sq (double), partial_dot[n_cols], partial_sq[n_cols] (double).
//      Columns outside [col_offset, col_offset + chunks) must come back as the sentinel -7.
template <typename T, typename Acc>
int run_typed(FILE* in, FILE* out, const int64_t* h) {
  const int64_t n_rows = h[1], row_stride = h[2];
  const int ndim = static_cast<int>(h[3]);
  const int64_t* sizes = h + 4;
  const int64_t* strides = h + 12;
  const int64_t chunk = h[20], row_begin = h[21], row_count = h[22], col_offset = h[23], extra_cols = h[24];
  const int64_t data_shift = h[25], target_shift = h[26], n_pick = h[27];
  dvgs_fast::RowLayout L;
  if (!dvgs_fast::make_row_layout(n_rows, row_stride, sizes, strides, ndim, &L)) return 6;
  std::vector<int64_t> pick(n_pick);
  if (!read_all(in, pick.data(), n_pick * sizeof(int64_t))) return 2;

  // Extent of the strided tensor, in elements: the farthest element any row can reach.
  int64_t row_extent = 1;
  for (int d = 0; d < L.ndim; ++d) row_extent += (L.sizes[d] - 1) * L.strides[d];
  const size_t data_elems = static_cast<size_t>((n_rows - 1) * row_stride + row_extent + data_shift);
  T* base = static_cast<T*>(reserve(data_elems * sizeof(T)));
  T* data = base + data_shift;  // a shift of one element breaks 16-byte alignment
  Acc* tbase = static_cast<Acc*>(reserve((L.numel + target_shift) * sizeof(Acc)));
  Acc* target = tbase + target_shift;
  if (!read_all(in, target, L.numel * sizeof(Acc))) return 2;
  std::vector<T> vals(L.numel);
  for (int64_t r : pick) {
    if (!read_all(in, vals.data(), L.numel * sizeof(T))) return 2;
    for (int64_t j = 0; j < L.numel; ++j) data[r * row_stride + L.offset_of(j)] = vals[j];
  }

  const int64_t chunks = (L.numel + chunk - 1) / chunk;
  const int64_t n_cols = col_offset + chunks + extra_cols;
  std::vector<double> pdot(static_cast<size_t>(row_count * n_cols), -7.0), psq(pdot.size(), -7.0);
  std::vector<double> dot(row_count, -7.0), sq(row_count, -7.0);
  std::vector<char> picked(row_count, 0);
  for (int64_t r : pick) picked[r - row_begin] = 1;

  emu::block_filter = [&](unsigned b) { return picked[b / chunks] != 0; };  // block = row * chunks + chunk
  cudaError_t rc = dvgs_fast::cuda::launch_grad_stats_partials<T, Acc>(
      data, L, target, chunk, row_begin, row_count, pdot.data(), psq.data(), n_cols, col_offset, nullptr);
  std::vector<double> snap;  // the picked rows' partials as the kernel left them, sentinels included
  for (int64_t r : pick) {
    const double* pd = &pdot[(r - row_begin) * n_cols];
    const double* ps = &psq[(r - row_begin) * n_cols];
    snap.insert(snap.end(), pd, pd + n_cols);
    snap.insert(snap.end(), ps, ps + n_cols);
  }
  // Other tensors' columns hold their own partials in the op; here they are zero for the reduction.
  for (int64_t i = 0; i < row_count; ++i)
    for (int64_t c = 0; c < n_cols; ++c)
      if (c < col_offset || c >= col_offset + chunks) pdot[i * n_cols + c] = psq[i * n_cols + c] = 0.0;
  if (rc == cudaSuccess) {
    emu::block_filter = [&](unsigned b) {  // 8 rows (warps) per block
      for (int64_t r = 8 * int64_t(b); r < std::min<int64_t>(8 * int64_t(b) + 8, row_count); ++r)
        if (picked[r]) return true;
      return false;
    };
    rc = dvgs_fast::cuda::launch_reduce_partials(pdot.data(), psq.data(), row_count, n_cols, dot.data(), sq.data(),
                                                 nullptr);
  }
  const int64_t head[5] = {n_cols, emu::vec4_loads, emu::blocks_run,
                           dvgs_fast::cuda::grad_stats_rows_per_pass(n_cols, dvgs_fast::cuda::kGradStatsPartialBudget),
                           rc};
  std::fwrite(head, sizeof(int64_t), 5, out);
  for (int64_t k = 0; k < n_pick; ++k) {
    const int64_t i = pick[k] - row_begin;
    std::fwrite(&dot[i], sizeof(double), 1, out);
    std::fwrite(&sq[i], sizeof(double), 1, out);
    std::fwrite(&snap[2 * k * n_cols], sizeof(double), 2 * n_cols, out);
  }
  return 0;
}

int run(FILE* in, FILE* out) {
  int64_t h[28];
  if (!read_all(in, h, sizeof h)) return 2;
  switch (h[0]) {
    case 0: return run_typed<float, float>(in, out, h);
    case 1: return run_typed<double, double>(in, out, h);
    case 2: return run_typed<__half, float>(in, out, h);
    case 3: return run_typed<__nv_bfloat16, float>(in, out, h);
    default: return 3;
  }
}
#else
// IN: int64 {dtype (0 f32, 1 f64), rows, w, d_in, d_out, has_gb, n_pick}, int64 picked rows[n_pick],
//     then per picked row P[w], Q[w], A[d_in], D[d_out], then gb[d_out] when has_gb (dtype).
// OUT: int64 {blocks_run, rc}, then per picked row pq, a2, d2 (dtype).
template <typename T>
int run_typed(FILE* in, FILE* out, const int64_t* h) {
  const int64_t rows = h[1], w = h[2], d_in = h[3], d_out = h[4], has_gb = h[5], n_pick = h[6];
  std::vector<int64_t> pick(n_pick);
  if (!read_all(in, pick.data(), n_pick * sizeof(int64_t))) return 2;
  // [rows, width] row-major arrays addressed at full size, backed only at the picked rows.
  T* P = static_cast<T*>(reserve(static_cast<size_t>(rows * w) * sizeof(T)));
  T* Q = static_cast<T*>(reserve(static_cast<size_t>(rows * w) * sizeof(T)));
  T* A = static_cast<T*>(reserve(static_cast<size_t>(rows * d_in) * sizeof(T)));
  T* D = static_cast<T*>(reserve(static_cast<size_t>(rows * d_out) * sizeof(T)));
  T* pq = static_cast<T*>(reserve(static_cast<size_t>(rows) * sizeof(T)));
  T* a2 = static_cast<T*>(reserve(static_cast<size_t>(rows) * sizeof(T)));
  T* d2 = static_cast<T*>(reserve(static_cast<size_t>(rows) * sizeof(T)));
  for (int64_t r : pick) {
    if (!read_all(in, P + r * w, w * sizeof(T)) || !read_all(in, Q + r * w, w * sizeof(T)) ||
        !read_all(in, A + r * d_in, d_in * sizeof(T)) || !read_all(in, D + r * d_out, d_out * sizeof(T)))
      return 2;
  }
  std::vector<T> gb(has_gb ? d_out : 0);
  if (has_gb && !read_all(in, gb.data(), d_out * sizeof(T))) return 2;
  std::vector<char> picked(rows, 0);
  for (int64_t r : pick) picked[r] = 1;
  emu::block_filter = [&](unsigned b) {  // kWarpsPerBlock rows per block, one per warp
    const int64_t r0 = static_cast<int64_t>(b) * dvgs_fast::cuda::kWarpsPerBlock;
    for (int64_t r = r0; r < std::min<int64_t>(r0 + dvgs_fast::cuda::kWarpsPerBlock, rows); ++r)
      if (picked[r]) return true;
    return false;
  };
  const cudaError_t rc = dvgs_fast::cuda::launch_ghost_row_reduce<T>(P, Q, w, A, d_in, D, d_out,
                                                                     has_gb ? gb.data() : nullptr, rows, pq, a2, d2,
                                                                     nullptr);
  const int64_t head[2] = {emu::blocks_run, rc};
  std::fwrite(head, sizeof(int64_t), 2, out);
  for (int64_t r : pick) {
    std::fwrite(pq + r, sizeof(T), 1, out);
    std::fwrite(a2 + r, sizeof(T), 1, out);
    std::fwrite(d2 + r, sizeof(T), 1, out);
  }
  return 0;
}

int run(FILE* in, FILE* out) {
  int64_t h[7];
  if (!read_all(in, h, sizeof h)) return 2;
  return h[0] == 0 ? run_typed<float>(in, out, h) : run_typed<double>(in, out, h);
}
#endif

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) return 1;
  FILE* in = std::fopen(argv[1], "rb");
  FILE* out = std::fopen(argv[2], "wb");
  if (!in || !out) return 1;
  const int rc = run(in, out);
  std::fclose(in);
  std::fclose(out);
  return rc;
}
