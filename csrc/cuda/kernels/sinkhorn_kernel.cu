// Device code of the sinkhorn op. No torch headers: `nvcc -c` checks it anywhere.
//
// Layout of both kernels: a block of kThreads threads owns kThreads consecutive rows (one per
// thread). The columns are walked in tiles of TJ points; each tile's coordinates go through
// shared memory in chunks of KC features, so any feature dimension works with a fixed amount of
// shared memory, and each thread keeps its row's chunk in registers (loaded once when d <= KC).
// Every thread then holds the TJ costs of its row against the tile in registers and folds them
// into its running (max, sum) -- an online log-sum-exp, so the rows x cols matrix never exists.
#include "cuda/kernels/sinkhorn_kernel.cuh"

// The launch goes through a macro so that a host-side emulation (python_tests/test_sinkhorn.py
// runs these kernels on the CPU, one std::thread per CUDA thread) can replace it.
#ifndef DVGS_CUDA_LAUNCH
#define DVGS_CUDA_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif

namespace dvgs_fast {
namespace cuda {
namespace {

constexpr int kThreads = 128;

template <typename T>
struct Tile;
template <>
struct Tile<float> {
  static constexpr int TJ = 32;  // columns per tile
  static constexpr int KC = 32;  // features per shared-memory chunk
  static constexpr float kInit = -1e37f;  // finite "minus infinity": no inf - inf anywhere
  static constexpr float kPad = -1e30f;   // offset of the padding columns of a partial tile
};
template <>
struct Tile<double> {
  static constexpr int TJ = 16;
  static constexpr int KC = 16;
  static constexpr double kInit = -1e300;
  static constexpr double kPad = -1e200;
};

__device__ __forceinline__ float dexp(float v) { return expf(v); }
__device__ __forceinline__ double dexp(double v) { return exp(v); }
__device__ __forceinline__ float dlog(float v) { return logf(v); }
__device__ __forceinline__ double dlog(double v) { return log(v); }
__device__ __forceinline__ float dsqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double dsqrt(double v) { return sqrt(v); }

// Squared distances of this thread's row to the TJ columns of tile j0, and (first chunk) the
// tile's column offsets h_j into hs. Ends with every thread past its last shared-memory read
// of ys, so the caller may overwrite ys after one more __syncthreads.
template <typename T>
__device__ __forceinline__ void tile_sqdist(const T* __restrict__ rows, const T* __restrict__ cols, int64_t n_cols,
                                            int64_t d, int64_t row, bool active, int64_t j0, bool x_in_regs,
                                            T (&xr)[Tile<T>::KC], T (&ys)[Tile<T>::TJ][Tile<T>::KC],
                                            T (&acc)[Tile<T>::TJ]) {
  constexpr int TJ = Tile<T>::TJ, KC = Tile<T>::KC;
#pragma unroll
  for (int jj = 0; jj < TJ; ++jj) acc[jj] = T(0);
  for (int64_t k0 = 0; k0 < d; k0 += KC) {
    __syncthreads();  // the previous chunk's readers are done with ys
    for (int idx = threadIdx.x; idx < TJ * KC; idx += blockDim.x) {
      const int jj = idx / KC, kk = idx % KC;
      const int64_t j = j0 + jj, k = k0 + kk;
      ys[jj][kk] = (j < n_cols && k < d) ? cols[j * d + k] : T(0);
    }
    __syncthreads();
    if (!x_in_regs && active) {
#pragma unroll
      for (int kk = 0; kk < KC; ++kk) xr[kk] = (k0 + kk < d) ? rows[row * d + k0 + kk] : T(0);
    }
#pragma unroll
    for (int jj = 0; jj < TJ; ++jj) {
      T s = T(0);
#pragma unroll
      for (int kk = 0; kk < KC; ++kk) {
        const T diff = xr[kk] - ys[jj][kk];  // ys[jj][kk] is the same address for every thread
        s += diff * diff;
      }
      acc[jj] += s;
    }
  }
}

template <typename T>
__device__ __forceinline__ void load_offsets(const T* __restrict__ logw, const T* __restrict__ pot, int64_t n_cols,
                                             double eps, int64_t j0, T (&hs)[Tile<T>::TJ]) {
  for (int jj = threadIdx.x; jj < Tile<T>::TJ; jj += blockDim.x) {
    const int64_t j = j0 + jj;
    double h = Tile<T>::kPad;
    if (j < n_cols) {
      h = static_cast<double>(logw[j]);
      if (pot != nullptr) h += static_cast<double>(pot[j]) / eps;
    }
    hs[jj] = static_cast<T>(h);
  }
}

// -C / eps from a squared distance; inv_dist (p = 1) is 0 where the clamp removes the gradient.
template <typename T>
__device__ __forceinline__ T neg_cost(T sq, int p, T inv_eps, T* inv_dist) {
  if (p == 2) {
    if (inv_dist) *inv_dist = T(1);
    return -T(0.5) * sq * inv_eps;
  }
  const bool small = sq <= T(1e-8);
  const T dist = dsqrt(small ? T(1e-8) : sq);
  if (inv_dist) *inv_dist = small ? T(0) : T(1) / dist;
  return -dist * inv_eps;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) softmin_kernel(SoftminArgs<T> a) {
  constexpr int TJ = Tile<T>::TJ, KC = Tile<T>::KC;
  __shared__ T ys[TJ][KC];
  __shared__ T hs[TJ];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool active = row < a.n_rows;
  const T inv_eps = static_cast<T>(1.0 / a.eps);
  const bool x_in_regs = a.d <= KC;
  T xr[KC];
#pragma unroll
  for (int kk = 0; kk < KC; ++kk) xr[kk] = (active && x_in_regs && kk < a.d) ? a.rows[row * a.d + kk] : T(0);
  T m = Tile<T>::kInit, s = T(0);
  T acc[TJ];
  for (int64_t j0 = 0; j0 < a.n_cols; j0 += TJ) {
    tile_sqdist<T>(a.rows, a.cols, a.n_cols, a.d, row, active, j0, x_in_regs, xr, ys, acc);
    load_offsets<T>(a.logw, a.pot, a.n_cols, a.eps, j0, hs);  // hs was last read before the syncs above
    __syncthreads();
    T tile_max = Tile<T>::kInit;
#pragma unroll
    for (int jj = 0; jj < TJ; ++jj) {
      acc[jj] = hs[jj] + neg_cost<T>(acc[jj], a.p, inv_eps, nullptr);  // acc now holds the arguments
      tile_max = acc[jj] > tile_max ? acc[jj] : tile_max;
    }
    if (tile_max > m) {  // rescale the running sum once per tile, not per column
      s *= dexp(m - tile_max);
      m = tile_max;
    }
#pragma unroll
    for (int jj = 0; jj < TJ; ++jj) s += dexp(acc[jj] - m);
  }
  if (!active) return;
  const double lse = static_cast<double>(m) + static_cast<double>(dlog(s));
  if (a.lse != nullptr) a.lse[row] = lse;
  if (a.out == nullptr) return;
  const T nv = static_cast<T>(-a.eps * lse);
  if (a.prev != nullptr) {
    const T pv = a.prev[row];
    a.out[row] = T(0.5) * (pv + nv);
    if (a.residual != nullptr) {
      // The integer atomicMax orders doubles correctly only for +0.0 .. +inf: fabs turns a -0.0
      // (sign bit set: the largest key of all) into +0.0, and a NaN row is skipped, as the CPU's
      // std::max skips it -- either would otherwise win and end the iterations at once.
      const double r = fabs(static_cast<double>(nv) - static_cast<double>(pv));
      if (r == r) atomicMax(a.residual, static_cast<unsigned long long>(__double_as_longlong(r)));
    }
  } else {
    a.out[row] = nv;
  }
}

// grid.y picks a chunk of KC output features; the distances are recomputed per chunk (so the
// work grows like ceil(d / KC) -- the backward runs once per forward, the forward many times).
template <typename T>
__global__ void __launch_bounds__(kThreads) softmin_grad_kernel(SoftminGradArgs<T> a) {
  constexpr int TJ = Tile<T>::TJ, KC = Tile<T>::KC;
  __shared__ T ys[TJ][KC];
  __shared__ T yc[TJ][KC];
  __shared__ T hs[TJ];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * KC;  // first output feature of this block
  const bool active = row < a.n_rows;
  const T inv_eps = static_cast<T>(1.0 / a.eps);
  const bool x_in_regs = a.d <= KC;
  const T lse = active ? static_cast<T>(a.lse[row]) : T(0);
  T xr[KC];
#pragma unroll
  for (int kk = 0; kk < KC; ++kk) xr[kk] = (active && x_in_regs && kk < a.d) ? a.rows[row * a.d + kk] : T(0);
  T acc[TJ], B[KC];
#pragma unroll
  for (int kk = 0; kk < KC; ++kk) B[kk] = T(0);
  T S = T(0), A = T(0);
  for (int64_t j0 = 0; j0 < a.n_cols; j0 += TJ) {
    tile_sqdist<T>(a.rows, a.cols, a.n_cols, a.d, row, active, j0, x_in_regs, xr, ys, acc);
    load_offsets<T>(a.logw, a.pot, a.n_cols, a.eps, j0, hs);
    for (int idx = threadIdx.x; idx < TJ * KC; idx += blockDim.x) {  // this block's output chunk
      const int jj = idx / KC, kk = idx % KC;
      const int64_t j = j0 + jj, k = c0 + kk;
      yc[jj][kk] = (j < a.n_cols && k < a.d) ? a.cols[j * a.d + k] : T(0);
    }
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < TJ; ++jj) {
      T inv_dist;
      const T arg = hs[jj] + neg_cost<T>(acc[jj], a.p, inv_eps, &inv_dist);
      const T w = dexp(arg - lse);  // <= 1: lse is this row's log-sum-exp
      const T wc = w * inv_dist;
      S += w;
      A += wc;
#pragma unroll
      for (int kk = 0; kk < KC; ++kk) B[kk] += wc * yc[jj][kk];
    }
  }
  if (!active) return;
  // sum_j P_ij grad_1 C = (x_i * sum_j P_ij w_ij - sum_j P_ij w_ij y_j) / sum_j P_ij,
  // w_ij = 1 (p = 2) or 1 / dist (p = 1); the division renormalises P.
  const T inv_s = T(1) / S;
  for (int kk = 0; kk < KC; ++kk) {
    const int64_t k = c0 + kk;
    if (k < a.d) a.grad[row * a.d + k] = (a.rows[row * a.d + k] * A - B[kk]) * inv_s;
  }
}

unsigned grid_rows(int64_t n_rows) { return static_cast<unsigned>((n_rows + kThreads - 1) / kThreads); }

}  // namespace

template <typename T>
cudaError_t launch_sinkhorn_softmin(const SoftminArgs<T>& args, cudaStream_t stream) {
  if (args.n_rows == 0) return cudaSuccess;
  if ((args.n_rows + kThreads - 1) / kThreads > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  DVGS_CUDA_LAUNCH(softmin_kernel<T>, grid_rows(args.n_rows), kThreads, stream, args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_sinkhorn_softmin_grad(const SoftminGradArgs<T>& args, cudaStream_t stream) {
  if (args.n_rows == 0 || args.d == 0) return cudaSuccess;
  const int64_t chunks = (args.d + Tile<T>::KC - 1) / Tile<T>::KC;
  if ((args.n_rows + kThreads - 1) / kThreads > 0x7fffffffLL || chunks > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(grid_rows(args.n_rows), static_cast<unsigned>(chunks));
  DVGS_CUDA_LAUNCH(softmin_grad_kernel<T>, grid, kThreads, stream, args);
  return cudaGetLastError();
}

template cudaError_t launch_sinkhorn_softmin<float>(const SoftminArgs<float>&, cudaStream_t);
template cudaError_t launch_sinkhorn_softmin<double>(const SoftminArgs<double>&, cudaStream_t);
template cudaError_t launch_sinkhorn_softmin_grad<float>(const SoftminGradArgs<float>&, cudaStream_t);
template cudaError_t launch_sinkhorn_softmin_grad<double>(const SoftminGradArgs<double>&, cudaStream_t);

}  // namespace cuda
}  // namespace dvgs_fast
