// linear_ghost_stats: per-sample gradient stats of a Linear layer without forming the
// per-sample gradients ("ghost" norms / dots).
//
// For y = W a + b with per-sample input a_i [d_in] and output gradient d_i [d_out], the
// per-sample gradients are d_i a_i^T and d_i, so against the target gradient (G, g_b):
//   dot_i    = d_i^T G a_i + d_i . g_b
//   sqnorm_i = |d_i|^2 |a_i|^2 + |d_i|^2            (the "+|d_i|^2" only with a bias)
// For sequences a_i = [T, d_in], d_i = [T, d_out] (gradient summed over T):
//   dot_i    = sum_t d_t^T G a_t + (sum_t d_t) . g_b
//   sqnorm_i = sum_{t,s} (a_t.a_s)(d_t.d_s)  [Gram form, cost T^2 (d_in+d_out)]
//            or |D_i^T A_i|_F^2             [materialised, cost T d_in d_out], whichever is cheaper
//            + |sum_t d_t|^2 with a bias.
#pragma once
#include <ATen/ATen.h>

namespace dvgs_fast {

// Fused row pass, one implementation per device. For each row r of the [R, w] matrices P, Q,
// the [R, d_in] A and the [R, d_out] D (all contiguous, same floating dtype):
//   pq[r] = sum_j P[r,j] Q[r,j] (+ sum_o D[r,o] gb[o] when gb is defined)
//   a2[r] = |A[r]|^2, d2[r] = |D[r]|^2
// Outputs are preallocated [R] tensors of the same dtype.
using GhostRowReduce = void (*)(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& A,
                                const at::Tensor& D, const at::Tensor& gb, at::Tensor& pq, at::Tensor& a2,
                                at::Tensor& d2);

void check_linear_ghost_inputs(const at::Tensor& inputs, const at::Tensor& output_grads,
                               const at::Tensor& target_weight, const std::optional<at::Tensor>& target_bias);

// Device-generic driver: GEMMs through ATen (BLAS / cuBLAS), the rest through `reduce`.
std::tuple<at::Tensor, at::Tensor> linear_ghost_stats_impl(const at::Tensor& inputs,
                                                           const at::Tensor& output_grads,
                                                           const at::Tensor& target_weight,
                                                           const std::optional<at::Tensor>& target_bias,
                                                           GhostRowReduce reduce);

}  // namespace dvgs_fast
