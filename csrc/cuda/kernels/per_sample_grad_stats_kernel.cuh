// Torch-free CUDA launchers for per_sample_grad_stats (compiled by nvcc on any machine).
//
// Pass 1: one thread block per work item (sample i, chunk c of kCudaChunk elements of one
// gradient tensor) reads its elements once (coalesced, 16-byte loads when the row is dense
// and aligned), reduces dot and squared norm in the accumulation type, and writes two
// partial sums. Pass 2: one warp per sample adds its partials in a fixed order (no atomics,
// so results are bit-reproducible).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/row_layout.h"

namespace dvgs_fast {
namespace cuda {

// T in {float, double, __half, __nv_bfloat16}; Acc = double for double, else float.
// target: the flattened target gradient, contiguous, type Acc, length layout.numel.
// partial_{dot,sq}: [n_rows, n_cols] row-major; this tensor writes columns
// [col_offset, col_offset + ceil(numel / chunk)).
template <typename T, typename Acc>
cudaError_t launch_grad_stats_partials(const T* data, const RowLayout& layout, const Acc* target,
                                       int64_t chunk, double* partial_dot, double* partial_sq,
                                       int64_t n_cols, int64_t col_offset, cudaStream_t stream);

// out_dot[i] = sum_c partial_dot[i, c] (same for sq), in double.
cudaError_t launch_reduce_partials(const double* partial_dot, const double* partial_sq, int64_t n_rows,
                                   int64_t n_cols, double* out_dot, double* out_sq, cudaStream_t stream);

}  // namespace cuda
}  // namespace dvgs_fast
