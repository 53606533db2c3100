// Shared declarations for the per_sample_grad_stats op: input checks and the row layout of
// each gradient tensor. Used by the CPU and CUDA kernels.
#pragma once
#include <ATen/ATen.h>

#include "common/row_layout.h"

namespace dvgs_fast {

// Validates grads/target (ValueError naming the offending index) and returns N.
int64_t check_grad_stats_inputs(const std::vector<at::Tensor>& grads,
                                const std::vector<at::Tensor>& target, const char* op);

// Layout of grads[k]; copies to contiguous (into `storage`) only in the rare case of more
// than kMaxRowDims non-mergeable per-sample dims.
RowLayout row_layout_of(const at::Tensor& g, at::Tensor& storage);

// float32 accumulation for fp16/bf16/fp32, float64 for float64.
inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Output dtype: float64 if any gradient is float64, else float32.
at::ScalarType stats_out_type(const std::vector<at::Tensor>& grads);

// Elements of one work item: rows are split in chunks so that N=1 with P=1e6 still
// uses all cores / SMs, and partial sums are combined in a fixed order (deterministic).
constexpr int64_t kCpuChunk = 1 << 15;
constexpr int64_t kCudaChunk = 1 << 13;

}  // namespace dvgs_fast
