// Device code of linear_ghost_stats' row pass. No torch headers: `nvcc -c` checks it anywhere.
#include "cuda/kernels/linear_ghost_stats_kernel.cuh"

// Launches go through a macro so that the host emulation (python_tests/_stats_cuda_emu.cpp, one
// std::thread per CUDA thread) can replace them.
#ifndef DVGS_CUDA_LAUNCH
#define DVGS_CUDA_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif

namespace dvgs_fast {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
ghost_row_reduce_kernel(const T* __restrict__ P, const T* __restrict__ Q, int64_t w, const T* __restrict__ A,
                        int64_t d_in, const T* __restrict__ D, int64_t d_out, const T* __restrict__ gb, int64_t rows,
                        T* __restrict__ pq, T* __restrict__ a2, T* __restrict__ d2) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;
  T v = 0, sa = 0, sd = 0;
  for (int64_t j = lane; j < w; j += 32) v += __ldg(P + r * w + j) * __ldg(Q + r * w + j);
  for (int64_t j = lane; j < d_in; j += 32) {
    const T x = __ldg(A + r * d_in + j);
    sa += x * x;
  }
  for (int64_t j = lane; j < d_out; j += 32) {
    const T x = __ldg(D + r * d_out + j);
    sd += x * x;
    if (gb != nullptr) v += x * __ldg(gb + j);
  }
  v = warp_sum(v);
  sa = warp_sum(sa);
  sd = warp_sum(sd);
  if (lane == 0) {
    pq[r] = v;
    a2[r] = sa;
    d2[r] = sd;
  }
}

}  // namespace

template <typename T>
cudaError_t launch_ghost_row_reduce(const T* P, const T* Q, int64_t w, const T* A, int64_t d_in, const T* D,
                                    int64_t d_out, const T* gb, int64_t rows, T* pq, T* a2, T* d2,
                                    cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  DVGS_CUDA_LAUNCH(ghost_row_reduce_kernel<T>, static_cast<unsigned>(blocks), kWarpsPerBlock * 32, stream, P, Q,
                   w, A, d_in, D, d_out, gb, rows, pq, a2, d2);
  return cudaGetLastError();
}

template cudaError_t launch_ghost_row_reduce<float>(const float*, const float*, int64_t, const float*, int64_t,
                                                    const float*, int64_t, const float*, int64_t, float*, float*,
                                                    float*, cudaStream_t);
template cudaError_t launch_ghost_row_reduce<double>(const double*, const double*, int64_t, const double*, int64_t,
                                                     const double*, int64_t, const double*, int64_t, double*, double*,
                                                     double*, cudaStream_t);

}  // namespace cuda
}  // namespace dvgs_fast
