// CPU kernel of per_sample_grad_stats: dot_i = <g_i, G> and sqnorm_i = |g_i|^2.
//
// Memory-bound: each gradient element is read exactly once. Work items are (tensor k,
// sample i, chunk c) of up to kCpuChunk elements, spread over threads with at::parallel_for;
// each item writes its own partial sums, which are then added per sample in a fixed order,
// so the result does not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/per_sample_grad_stats.h"

namespace dvgs_fast {
namespace {

constexpr int kLanes = 16;  // independent accumulators: lets the compiler vectorise the loop

template <typename scalar_t, typename acc_t>
inline void accumulate_dense(const scalar_t* __restrict__ g, const acc_t* __restrict__ t, int64_t n,
                             acc_t* dot_lanes, acc_t* sq_lanes) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t x = static_cast<acc_t>(g[j + l]);
      dot_lanes[l] += x * t[j + l];
      sq_lanes[l] += x * x;
    }
  }
  for (; j < n; ++j) {
    const acc_t x = static_cast<acc_t>(g[j]);
    dot_lanes[0] += x * t[j];
    sq_lanes[0] += x * x;
  }
}

// Logical elements [begin, end) of one sample whose per-sample dims are strided.
template <typename scalar_t, typename acc_t>
inline void accumulate_strided(const scalar_t* row, const RowLayout& L, const acc_t* t, int64_t begin,
                               int64_t end, acc_t* dot_lanes, acc_t* sq_lanes) {
  const int last = L.ndim - 1;
  int64_t idx[kMaxRowDims];
  int64_t rem = begin, off = 0;
  for (int d = last; d >= 0; --d) {
    idx[d] = rem % L.sizes[d];
    rem /= L.sizes[d];
    off += idx[d] * L.strides[d];
  }
  const int64_t s = L.strides[last];
  int64_t j = begin;
  while (j < end) {
    const int64_t run = std::min(L.sizes[last] - idx[last], end - j);
    for (int64_t r = 0; r < run; ++r) {
      const acc_t x = static_cast<acc_t>(row[off + r * s]);
      dot_lanes[r % kLanes] += x * t[j + r];
      sq_lanes[r % kLanes] += x * x;
    }
    j += run;
    off += run * s;
    idx[last] += run;
    for (int d = last; d > 0 && idx[d] == L.sizes[d]; --d) {  // carry into outer dims
      off -= L.sizes[d] * L.strides[d];
      idx[d] = 0;
      ++idx[d - 1];
      off += L.strides[d - 1];
    }
  }
}

struct Job {
  const void* data;
  RowLayout layout;
  at::ScalarType dtype;
  at::Tensor target;  // contiguous, accumulation dtype
  int64_t n_chunks;
  int64_t first_item;
};

template <typename scalar_t>
void run_item(const Job& job, int64_t i, int64_t c, double* out_dot, double* out_sq) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const scalar_t* row = static_cast<const scalar_t*>(job.data) + i * job.layout.row_stride;
  const acc_t* t = job.target.data_ptr<acc_t>();
  const int64_t begin = c * kCpuChunk;
  const int64_t end = std::min(begin + kCpuChunk, job.layout.numel);
  acc_t dl[kLanes] = {}, sl[kLanes] = {};
  if (job.layout.is_dense()) {
    accumulate_dense<scalar_t, acc_t>(row + begin, t + begin, end - begin, dl, sl);
  } else {
    accumulate_strided<scalar_t, acc_t>(row, job.layout, t, begin, end, dl, sl);
  }
  double d = 0, s = 0;
  for (int l = 0; l < kLanes; ++l) {
    d += dl[l];
    s += sl[l];
  }
  *out_dot = d;
  *out_sq = s;
}

std::tuple<at::Tensor, at::Tensor> per_sample_grad_stats_cpu(at::TensorList grads_in, at::TensorList target_in) {
  std::vector<at::Tensor> grads(grads_in.begin(), grads_in.end());
  std::vector<at::Tensor> target(target_in.begin(), target_in.end());
  const int64_t n = check_grad_stats_inputs(grads, target, "per_sample_grad_stats");
  const auto out_type = stats_out_type(grads);

  std::vector<Job> jobs;
  std::vector<at::Tensor> keep;  // storage of the (rare) contiguous fallbacks
  int64_t n_items = 0, total = 0;
  for (size_t k = 0; k < grads.size(); ++k) {
    at::Tensor storage;
    RowLayout L = row_layout_of(grads[k], storage);
    keep.push_back(storage);
    if (L.numel == 0 || n == 0) continue;
    Job job;
    job.data = storage.data_ptr();
    job.layout = L;
    job.dtype = storage.scalar_type();
    job.target = target[k].to(acc_type_of(job.dtype)).contiguous();
    job.n_chunks = (L.numel + kCpuChunk - 1) / kCpuChunk;
    job.first_item = n_items;
    n_items += n * job.n_chunks;
    total += n * L.numel;
    jobs.push_back(std::move(job));
  }

  std::vector<double> part_dot(n_items), part_sq(n_items);
  if (n_items > 0) {
    // ~32k elements per task amortises the scheduling cost when samples are small.
    const int64_t grain = std::max<int64_t>(1, kCpuChunk / std::max<int64_t>(1, total / n_items));
    at::parallel_for(0, n_items, grain, [&](int64_t lo, int64_t hi) {
      size_t jk = 0;  // items are visited in increasing order, so the job index only advances
      for (int64_t item = lo; item < hi; ++item) {
        while (jk + 1 < jobs.size() && item >= jobs[jk + 1].first_item) ++jk;
        const Job& job = jobs[jk];
        const int64_t local = item - job.first_item;
        const int64_t i = local / job.n_chunks, c = local % job.n_chunks;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, job.dtype, "per_sample_grad_stats_cpu", [&] {
          run_item<scalar_t>(job, i, c, &part_dot[item], &part_sq[item]);
        });
      }
    });
  }

  at::Tensor dot = at::empty({n}, grads[0].options().dtype(at::kDouble));
  at::Tensor sq = at::empty({n}, grads[0].options().dtype(at::kDouble));
  double* dp = dot.data_ptr<double>();
  double* sp = sq.data_ptr<double>();
  at::parallel_for(0, n, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      double d = 0, s = 0;
      for (const Job& job : jobs) {
        const int64_t base = job.first_item + i * job.n_chunks;
        for (int64_t c = 0; c < job.n_chunks; ++c) {
          d += part_dot[base + c];
          s += part_sq[base + c];
        }
      }
      dp[i] = d;
      sp[i] = s;
    }
  });
  return {dot.to(out_type), sq.to(out_type)};
}

}  // namespace

TORCH_LIBRARY_IMPL(dvgs_fast, CPU, m) {
  m.impl("per_sample_grad_stats", &per_sample_grad_stats_cpu);
}

}  // namespace dvgs_fast
