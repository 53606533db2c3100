// Torch-free CUDA launchers of the sinkhorn op (see ops/sinkhorn.h for the algorithm).
//
// softmin: out[i] = -eps * log sum_j exp(h_j - C(r_i, c_j) / eps), h_j = logw_j + pot_j / eps,
// C = |r - c|^2 / 2 (p = 2) or max(|r - c|, 1e-4) (p = 1, geomloss's clamp of the squared
// distance at 1e-8). FlashAttention-style: one thread per row, the row's coordinates in
// registers (in chunks of the feature dimension), tiles of columns staged through shared memory,
// an online log-sum-exp per row; nothing of size rows x cols is ever stored.
// softmin_grad: grad[i] = sum_j P_ij grad_1 C(r_i, c_j) for the softmax weights P of row i
// (given its LSE from a softmin pass), again tile by tile.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace dvgs_fast {
namespace cuda {

template <typename T>
struct SoftminArgs {
  const T* rows = nullptr;  // [n_rows, d], row-major, contiguous
  const T* cols = nullptr;  // [n_cols, d]
  int64_t n_rows = 0, n_cols = 0, d = 0;
  const T* logw = nullptr;  // [n_cols] log-weights of the columns (log 0 clamped to -1e5)
  const T* pot = nullptr;   // [n_cols] column potential, or null (= 0)
  const T* prev = nullptr;  // [n_rows] or null: with it, out = (prev + new) / 2
  T* out = nullptr;         // [n_rows]
  double eps = 1.0;
  int p = 2;
  // null, or a device word holding max_i |new_i - prev_i| (rows giving NaN skipped, as on the CPU)
  // as the bits of a nonnegative double (bit order = numeric order for those, so an integer
  // atomicMax works).
  unsigned long long* residual = nullptr;
  double* lse = nullptr;    // null, or [n_rows]: the raw log-sum-exp of each row
};

template <typename T>
struct SoftminGradArgs {
  const T* rows = nullptr;
  const T* cols = nullptr;
  int64_t n_rows = 0, n_cols = 0, d = 0;
  const T* logw = nullptr;
  const T* pot = nullptr;
  double eps = 1.0;
  int p = 2;
  const double* lse = nullptr;  // [n_rows], from a softmin pass with the same arguments
  T* grad = nullptr;            // [n_rows, d]
};

template <typename T>
cudaError_t launch_sinkhorn_softmin(const SoftminArgs<T>& args, cudaStream_t stream);

template <typename T>
cudaError_t launch_sinkhorn_softmin_grad(const SoftminGradArgs<T>& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace dvgs_fast
