// RowLayout: how one sample's slice of a [N, *s] tensor sits in memory, with no torch types,
// so CPU kernels and torch-free CUDA kernels share it.
//
// Per-sample gradients from torch.func are usually contiguous, but views (transposes,
// slices, expanded dims) must work without a copy. We collapse the per-sample dims into as
// few (size, stride) pairs as possible; the common case becomes one dim of stride 1.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define DVGS_HOST_DEVICE __host__ __device__
#else
#define DVGS_HOST_DEVICE
#endif

namespace dvgs_fast {

constexpr int kMaxRowDims = 8;

struct RowLayout {
  int64_t n_rows = 0;      // N
  int64_t row_stride = 0;  // elements between sample i and i+1
  int64_t numel = 0;       // elements per sample (prod of per-sample sizes)
  int ndim = 0;            // collapsed per-sample dims (0 when numel <= 1)
  int64_t sizes[kMaxRowDims] = {};
  int64_t strides[kMaxRowDims] = {};

  DVGS_HOST_DEVICE bool is_dense() const { return ndim == 0 || (ndim == 1 && strides[0] == 1); }

  // Element offset (within a row) of the logical per-sample index j (row-major order).
  DVGS_HOST_DEVICE int64_t offset_of(int64_t j) const {
    int64_t off = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      const int64_t q = j / sizes[d];
      off += (j - q * sizes[d]) * strides[d];
      j = q;
    }
    return off;
  }
};

// Build a layout from sizes/strides of the per-sample dims (dims 1.. of the tensor).
// Returns false when more than kMaxRowDims dims remain after collapsing (caller copies then).
inline bool make_row_layout(int64_t n_rows, int64_t row_stride, const int64_t* sizes,
                            const int64_t* strides, int ndim, RowLayout* out) {
  RowLayout L;
  L.n_rows = n_rows;
  L.row_stride = row_stride;
  L.numel = 1;
  for (int d = 0; d < ndim; ++d) L.numel *= sizes[d];
  int m = 0;
  int64_t cs[64], cst[64];
  for (int d = 0; d < ndim; ++d) {
    if (sizes[d] == 1) continue;  // size-1 dims carry no layout information
    if (m > 0 && cst[m - 1] == strides[d] * sizes[d]) {
      // the previous dim steps exactly over this one: merge them
      cs[m - 1] *= sizes[d];
      cst[m - 1] = strides[d];
    } else {
      if (m == 64) return false;
      cs[m] = sizes[d];
      cst[m] = strides[d];
      ++m;
    }
  }
  if (L.numel == 0) m = 0;
  if (m > kMaxRowDims) return false;
  L.ndim = m;
  for (int d = 0; d < m; ++d) {
    L.sizes[d] = cs[d];
    L.strides[d] = cst[d];
  }
  *out = L;
  return true;
}

}  // namespace dvgs_fast
