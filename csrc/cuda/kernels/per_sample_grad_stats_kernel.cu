// Device code of per_sample_grad_stats. No torch headers: `nvcc -c` checks it on CPU machines.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "cuda/kernels/per_sample_grad_stats_kernel.cuh"

// Launches go through a macro so that the host emulation (python_tests/_stats_cuda_emu.cpp, one
// std::thread per CUDA thread) can replace them.
#ifndef DVGS_CUDA_LAUNCH
#define DVGS_CUDA_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif

namespace dvgs_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename Acc>
__device__ __forceinline__ Acc to_acc(float x) { return static_cast<Acc>(x); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(double x) { return static_cast<Acc>(x); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(__half x) { return static_cast<Acc>(__half2float(x)); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(__nv_bfloat16 x) { return static_cast<Acc>(__bfloat162float(x)); }

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sum of (a, b) over the block; result valid in thread 0.
template <typename Acc>
__device__ __forceinline__ void block_sum2(Acc& a, Acc& b) {
  __shared__ Acc sa[kThreads / 32], sb[kThreads / 32];
  a = warp_sum(a);
  b = warp_sum(b);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kThreads / 32 ? sa[lane] : Acc(0);
    b = lane < kThreads / 32 ? sb[lane] : Acc(0);
    a = warp_sum(a);
    b = warp_sum(b);
  }
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
grad_stats_partials_kernel(const T* __restrict__ data, RowLayout L, const Acc* __restrict__ target,
                           int64_t chunk, int64_t n_chunks, int64_t row_begin, double* __restrict__ pdot,
                           double* __restrict__ psq, int64_t n_cols, int64_t col_offset, bool vec4) {
  const int64_t item = blockIdx.x;
  const int64_t i = item / n_chunks, c = item - i * n_chunks;  // i: row within this pass
  const int64_t begin = c * chunk;
  const int64_t end = begin + chunk < L.numel ? begin + chunk : L.numel;
  const T* row = data + (row_begin + i) * L.row_stride;
  Acc d = 0, s = 0;
  bool done = false;
  if constexpr (std::is_same_v<T, float>) {
    if (vec4 && L.is_dense()) {  // 16-byte loads: begin, row start and target are 16-byte aligned
      const float4* r4 = reinterpret_cast<const float4*>(row + begin);
      const float4* t4 = reinterpret_cast<const float4*>(target + begin);
      const int64_t n4 = (end - begin) / 4;
      for (int64_t j = threadIdx.x; j < n4; j += kThreads) {
        const float4 x = __ldg(r4 + j), t = __ldg(t4 + j);
        d += x.x * t.x + x.y * t.y + x.z * t.z + x.w * t.w;
        s += x.x * x.x + x.y * x.y + x.z * x.z + x.w * x.w;
      }
      for (int64_t j = begin + 4 * n4 + threadIdx.x; j < end; j += kThreads) {
        const Acc x = row[j];
        d += x * target[j];
        s += x * x;
      }
      done = true;
    }
  }
  if (!done && L.is_dense()) {
    for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
      const Acc x = to_acc<Acc>(row[j]);
      d += x * target[j];
      s += x * x;
    }
  } else if (!done) {
    for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
      const Acc x = to_acc<Acc>(row[L.offset_of(j)]);
      d += x * target[j];
      s += x * x;
    }
  }
  block_sum2(d, s);
  if (threadIdx.x == 0) {
    pdot[i * n_cols + col_offset + c] = static_cast<double>(d);
    psq[i * n_cols + col_offset + c] = static_cast<double>(s);
  }
}

__global__ void reduce_partials_kernel(const double* __restrict__ pdot, const double* __restrict__ psq,
                                       int64_t n_rows, int64_t n_cols, double* __restrict__ out_dot,
                                       double* __restrict__ out_sq) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (i >= n_rows) return;
  double d = 0, s = 0;
  for (int64_t c = lane; c < n_cols; c += 32) {
    d += pdot[i * n_cols + c];
    s += psq[i * n_cols + c];
  }
  d = warp_sum(d);
  s = warp_sum(s);
  if (lane == 0) {
    out_dot[i] = d;
    out_sq[i] = s;
  }
}

}  // namespace

template <typename T, typename Acc>
cudaError_t launch_grad_stats_partials(const T* data, const RowLayout& layout, const Acc* target,
                                       int64_t chunk, int64_t row_begin, int64_t row_count,
                                       double* partial_dot, double* partial_sq, int64_t n_cols,
                                       int64_t col_offset, cudaStream_t stream) {
  if (row_count <= 0 || layout.numel == 0) return cudaSuccess;
  if (row_begin < 0 || row_begin + row_count > layout.n_rows) return cudaErrorInvalidValue;
  const int64_t n_chunks = (layout.numel + chunk - 1) / chunk;
  const int64_t n_items = row_count * n_chunks;
  if (n_items > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  // 16-byte loads need every row start of the pass 16-byte aligned: an aligned base and a row
  // stride (and chunk) that are multiples of 4 floats.
  const bool vec4 = sizeof(T) == 4 && chunk % 4 == 0 && layout.row_stride % 4 == 0 &&
                    reinterpret_cast<uintptr_t>(data) % 16 == 0 && reinterpret_cast<uintptr_t>(target) % 16 == 0;
  DVGS_CUDA_LAUNCH((grad_stats_partials_kernel<T, Acc>), static_cast<unsigned>(n_items), kThreads, stream, data,
                   layout, target, chunk, n_chunks, row_begin, partial_dot, partial_sq, n_cols, col_offset, vec4);
  return cudaGetLastError();
}

cudaError_t launch_reduce_partials(const double* partial_dot, const double* partial_sq, int64_t n_rows,
                                   int64_t n_cols, double* out_dot, double* out_sq, cudaStream_t stream) {
  if (n_rows == 0) return cudaSuccess;
  constexpr int kWarps = 8;
  const int64_t blocks = (n_rows + kWarps - 1) / kWarps;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  DVGS_CUDA_LAUNCH(reduce_partials_kernel, static_cast<unsigned>(blocks), kWarps * 32, stream, partial_dot,
                   partial_sq, n_rows, n_cols, out_dot, out_sq);
  return cudaGetLastError();
}

#define DVGS_INSTANTIATE(T, Acc)                                                                           \
  template cudaError_t launch_grad_stats_partials<T, Acc>(const T*, const RowLayout&, const Acc*, int64_t,    \
                                                          int64_t, int64_t, double*, double*, int64_t, int64_t, \
                                                          cudaStream_t);
DVGS_INSTANTIATE(float, float)
DVGS_INSTANTIATE(double, double)
DVGS_INSTANTIATE(__half, float)
DVGS_INSTANTIATE(__nv_bfloat16, float)
#undef DVGS_INSTANTIATE

}  // namespace cuda
}  // namespace dvgs_fast
