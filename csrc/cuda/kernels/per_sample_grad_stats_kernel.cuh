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
// Rows [row_begin, row_begin + row_count) of the layout; partial_{dot,sq}: [row_count, n_cols]
// row-major (row 0 = row_begin); this tensor writes columns [col_offset, col_offset + ceil(numel / chunk)).
template <typename T, typename Acc>
cudaError_t launch_grad_stats_partials(const T* data, const RowLayout& layout, const Acc* target,
                                       int64_t chunk, int64_t row_begin, int64_t row_count,
                                       double* partial_dot, double* partial_sq, int64_t n_cols,
                                       int64_t col_offset, cudaStream_t stream);

// out_dot[i] = sum_c partial_dot[i, c] (same for sq), in double.
cudaError_t launch_reduce_partials(const double* partial_dot, const double* partial_sq, int64_t n_rows,
                                   int64_t n_cols, double* out_dot, double* out_sq, cudaStream_t stream);

// Rows per pass so that one [rows, n_cols] double buffer stays within budget_bytes (at least one
// row). Without it, N = 720k samples of 1M parameters would need 2 x 0.7 GB of partials.
inline int64_t grad_stats_rows_per_pass(int64_t n_cols, int64_t budget_bytes) {
  const int64_t per_row = (n_cols > 0 ? n_cols : 1) * static_cast<int64_t>(sizeof(double));
  const int64_t rows = budget_bytes / per_row;
  return rows > 0 ? rows : 1;
}
constexpr int64_t kGradStatsPartialBudget = int64_t(64) << 20;  // bytes per partial buffer

}  // namespace cuda
}  // namespace dvgs_fast
