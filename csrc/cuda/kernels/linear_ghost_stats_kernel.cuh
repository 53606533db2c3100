// Torch-free CUDA launcher for linear_ghost_stats' fused row pass (see ops/linear_ghost_stats.h):
// one warp per row reads P, Q (width w), A (d_in) and D (d_out) once each.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace dvgs_fast {
namespace cuda {

template <typename T>
cudaError_t launch_ghost_row_reduce(const T* P, const T* Q, int64_t w, const T* A, int64_t d_in, const T* D,
                                    int64_t d_out, const T* gb /* nullable */, int64_t rows, T* pq, T* a2, T* d2,
                                    cudaStream_t stream);

}  // namespace cuda
}  // namespace dvgs_fast
