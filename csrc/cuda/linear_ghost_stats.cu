// CUDA glue of linear_ghost_stats: GEMMs in cuBLAS (shared driver), row pass in
// cuda/kernels/linear_ghost_stats_kernel.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/kernels/linear_ghost_stats_kernel.cuh"
#include "ops/linear_ghost_stats.h"

namespace dvgs_fast {
namespace {

template <typename T>
void reduce_typed(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& A, const at::Tensor& D,
                  const at::Tensor& gb, at::Tensor& pq, at::Tensor& a2, at::Tensor& d2) {
  const cudaError_t err = cuda::launch_ghost_row_reduce<T>(
      P.const_data_ptr<T>(), Q.const_data_ptr<T>(), P.size(1), A.const_data_ptr<T>(), A.size(1),
      D.const_data_ptr<T>(), D.size(1), gb.defined() ? gb.const_data_ptr<T>() : nullptr, P.size(0),
      pq.mutable_data_ptr<T>(), a2.mutable_data_ptr<T>(), d2.mutable_data_ptr<T>(),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "linear_ghost_stats: CUDA launch failed: ", cudaGetErrorString(err));
}

void ghost_row_reduce_cuda(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& A, const at::Tensor& D,
                           const at::Tensor& gb, at::Tensor& pq, at::Tensor& a2, at::Tensor& d2) {
  // pq/a2/d2 are contiguous slices of [rows] vectors; P, Q, A, D are contiguous blocks.
  if (P.scalar_type() == at::kDouble) {
    reduce_typed<double>(P, Q, A, D, gb, pq, a2, d2);
  } else {
    reduce_typed<float>(P, Q, A, D, gb, pq, a2, d2);
  }
}

std::tuple<at::Tensor, at::Tensor> linear_ghost_stats_cuda(const at::Tensor& inputs, const at::Tensor& output_grads,
                                                           const at::Tensor& target_weight,
                                                           const std::optional<at::Tensor>& target_bias) {
  // Validate first: the dispatcher picks this kernel when ANY argument is on a GPU, and a guard
  // built from a CPU `inputs` would fail with an internal error instead of the ValueError.
  check_linear_ghost_inputs(inputs, output_grads, target_weight, target_bias);
  const c10::cuda::CUDAGuard guard(inputs.device());
  return linear_ghost_stats_impl(inputs, output_grads, target_weight, target_bias, &ghost_row_reduce_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(dvgs_fast, CUDA, m) {
  m.impl("linear_ghost_stats", &linear_ghost_stats_cuda);
}

}  // namespace dvgs_fast
