// CPU kernel of linear_ghost_stats: the GEMM runs in BLAS (via the shared driver); this file
// holds the fused row pass that reads P, Q, A and D once each, rows in parallel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/linear_ghost_stats.h"

namespace dvgs_fast {
namespace {

constexpr int kLanes = 8;

template <typename acc_t>
inline acc_t dot_lanes(const acc_t* __restrict__ x, const acc_t* __restrict__ y, int64_t n) {
  acc_t l[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) l[k] += x[j + k] * y[j + k];
  acc_t s = 0;
  for (; j < n; ++j) s += x[j] * y[j];
  for (int k = 0; k < kLanes; ++k) s += l[k];
  return s;
}

void ghost_row_reduce_cpu(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& A, const at::Tensor& D,
                          const at::Tensor& gb, at::Tensor& pq, at::Tensor& a2, at::Tensor& d2) {
  const int64_t rows = P.size(0), w = P.size(1), d_in = A.size(1), d_out = D.size(1);
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "linear_ghost_row_reduce_cpu", [&] {
    const scalar_t* p = P.const_data_ptr<scalar_t>();
    const scalar_t* q = Q.const_data_ptr<scalar_t>();
    const scalar_t* a = A.const_data_ptr<scalar_t>();
    const scalar_t* d = D.const_data_ptr<scalar_t>();
    const scalar_t* b = gb.defined() ? gb.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o_pq = pq.mutable_data_ptr<scalar_t>();
    scalar_t* o_a2 = a2.mutable_data_ptr<scalar_t>();
    scalar_t* o_d2 = d2.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, w + d_in + d_out));
    at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* dr = d + r * d_out;
        scalar_t v = dot_lanes(p + r * w, q + r * w, w);
        if (b) v += dot_lanes(dr, b, d_out);
        o_pq[r] = v;
        o_a2[r] = dot_lanes(a + r * d_in, a + r * d_in, d_in);
        o_d2[r] = dot_lanes(dr, dr, d_out);
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> linear_ghost_stats_cpu(const at::Tensor& inputs, const at::Tensor& output_grads,
                                                          const at::Tensor& target_weight,
                                                          const std::optional<at::Tensor>& target_bias) {
  return linear_ghost_stats_impl(inputs, output_grads, target_weight, target_bias, &ghost_row_reduce_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(dvgs_fast, CPU, m) {
  m.impl("linear_ghost_stats", &linear_ghost_stats_cpu);
}

}  // namespace dvgs_fast
