// CUDA glue of per_sample_grad_stats: validates, lays out each gradient tensor, and calls
// the torch-free launchers in cuda/kernels/per_sample_grad_stats_kernel.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "cuda/kernels/per_sample_grad_stats_kernel.cuh"
#include "ops/per_sample_grad_stats.h"

namespace dvgs_fast {
namespace {

template <typename T, typename Acc>
void launch_one(const at::Tensor& storage, const RowLayout& L, const at::Tensor& tgt, int64_t row_begin,
                int64_t row_count, at::Tensor& pdot, at::Tensor& psq, int64_t col_offset, cudaStream_t stream) {
  const cudaError_t err = cuda::launch_grad_stats_partials<T, Acc>(
      reinterpret_cast<const T*>(storage.const_data_ptr()), L, tgt.const_data_ptr<Acc>(), kCudaChunk, row_begin,
      row_count, pdot.mutable_data_ptr<double>(), psq.mutable_data_ptr<double>(), pdot.size(1), col_offset, stream);
  TORCH_CHECK(err == cudaSuccess, "per_sample_grad_stats: CUDA launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> per_sample_grad_stats_cuda(at::TensorList grads_in, at::TensorList target_in) {
  std::vector<at::Tensor> grads(grads_in.begin(), grads_in.end());
  std::vector<at::Tensor> target(target_in.begin(), target_in.end());
  const int64_t n = check_grad_stats_inputs(grads, target, "per_sample_grad_stats");
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const auto out_type = stats_out_type(grads);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  std::vector<at::Tensor> storages, targets;
  std::vector<RowLayout> layouts;
  int64_t n_cols = 0;
  for (size_t k = 0; k < grads.size(); ++k) {
    at::Tensor storage;
    layouts.push_back(row_layout_of(grads[k], storage));
    storages.push_back(storage);
    targets.push_back(target[k].to(acc_type_of(storage.scalar_type())).contiguous());
    n_cols += (layouts.back().numel + kCudaChunk - 1) / kCudaChunk;
  }
  n_cols = std::max<int64_t>(n_cols, 1);  // all-empty gradients: one zero column
  auto dopts = grads[0].options().dtype(at::kDouble);
  at::Tensor dot = at::empty({n}, dopts), sq = at::empty({n}, dopts);
  // Samples go in passes whose partials fit a fixed budget; one buffer pair serves every pass
  // (passes are ordered on the stream). Zeroed once: columns are rewritten by every pass.
  const int64_t pass_rows = std::min(n, cuda::grad_stats_rows_per_pass(n_cols, cuda::kGradStatsPartialBudget));
  at::Tensor pdot = at::zeros({std::max<int64_t>(pass_rows, 1), n_cols}, dopts);
  at::Tensor psq = at::zeros_like(pdot);
  for (int64_t r0 = 0; r0 < n; r0 += pass_rows) {
    const int64_t rows = std::min(pass_rows, n - r0);
    int64_t col = 0;
    for (size_t k = 0; k < grads.size(); ++k) {
      const RowLayout& L = layouts[k];
      switch (storages[k].scalar_type()) {
        case at::kFloat: launch_one<float, float>(storages[k], L, targets[k], r0, rows, pdot, psq, col, stream); break;
        case at::kDouble: launch_one<double, double>(storages[k], L, targets[k], r0, rows, pdot, psq, col, stream); break;
        case at::kHalf: launch_one<__half, float>(storages[k], L, targets[k], r0, rows, pdot, psq, col, stream); break;
        case at::kBFloat16:
          launch_one<__nv_bfloat16, float>(storages[k], L, targets[k], r0, rows, pdot, psq, col, stream);
          break;
        default: TORCH_CHECK_VALUE(false, "per_sample_grad_stats: unsupported dtype ", storages[k].scalar_type());
      }
      col += (L.numel + kCudaChunk - 1) / kCudaChunk;
    }
    const cudaError_t err = cuda::launch_reduce_partials(pdot.const_data_ptr<double>(), psq.const_data_ptr<double>(),
                                                         rows, n_cols, dot.mutable_data_ptr<double>() + r0,
                                                         sq.mutable_data_ptr<double>() + r0, stream);
    TORCH_CHECK(err == cudaSuccess, "per_sample_grad_stats: CUDA launch failed: ", cudaGetErrorString(err));
  }
  return {dot.to(out_type), sq.to(out_type)};
}

}  // namespace

TORCH_LIBRARY_IMPL(dvgs_fast, CUDA, m) {
  m.impl("per_sample_grad_stats", &per_sample_grad_stats_cuda);
}

}  // namespace dvgs_fast
