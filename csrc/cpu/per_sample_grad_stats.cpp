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
  int64_t first_chunk;  // this tensor's first partial column
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

// Bytes of one partial buffer: samples are processed in passes that fit it, so the partials
// stay bounded for any N (720k samples of 1M parameters would otherwise take 2 x 0.35 GB).
constexpr int64_t kPartialBudget = int64_t(64) << 20;

std::tuple<at::Tensor, at::Tensor> per_sample_grad_stats_cpu(at::TensorList grads_in, at::TensorList target_in) {
  std::vector<at::Tensor> grads(grads_in.begin(), grads_in.end());
  std::vector<at::Tensor> target(target_in.begin(), target_in.end());
  const int64_t n = check_grad_stats_inputs(grads, target, "per_sample_grad_stats");
  const auto out_type = stats_out_type(grads);

  std::vector<Job> jobs;
  std::vector<at::Tensor> keep;  // storage of the (rare) contiguous fallbacks
  int64_t chunks_per_row = 0, numel_per_row = 0;
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
    job.first_chunk = chunks_per_row;
    chunks_per_row += job.n_chunks;
    numel_per_row += L.numel;
    jobs.push_back(std::move(job));
  }

  at::Tensor dot = at::zeros({n}, grads[0].options().dtype(at::kDouble));
  at::Tensor sq = at::zeros({n}, grads[0].options().dtype(at::kDouble));
  if (chunks_per_row == 0) return {dot.to(out_type), sq.to(out_type)};
  double* dp = dot.data_ptr<double>();
  double* sp = sq.data_ptr<double>();
  const int64_t pass_rows =
      std::min(n, std::max<int64_t>(1, kPartialBudget / (chunks_per_row * int64_t(sizeof(double)))));
  // Item (job k, sample i of the pass, chunk c) is at rows * first_chunk(k) + i * n_chunks(k) + c, so
  // each task walks the jobs in order; its partial sums go to [i, first_chunk(k) + c] of the pass.
  std::vector<double> part_dot(pass_rows * chunks_per_row), part_sq(pass_rows * chunks_per_row);
  // ~32k elements per task amortises the scheduling cost when samples are small.
  const int64_t grain = std::max<int64_t>(1, kCpuChunk / std::max<int64_t>(1, numel_per_row / chunks_per_row));
  for (int64_t r0 = 0; r0 < n; r0 += pass_rows) {
    const int64_t rows = std::min(pass_rows, n - r0);
    at::parallel_for(0, rows * chunks_per_row, grain, [&](int64_t lo, int64_t hi) {
      size_t jk = 0;  // items are visited in increasing order, so the job index only advances
      for (int64_t item = lo; item < hi; ++item) {
        while (jk + 1 < jobs.size() && item >= rows * jobs[jk + 1].first_chunk) ++jk;
        const Job& job = jobs[jk];
        const int64_t local = item - rows * job.first_chunk;
        const int64_t i = local / job.n_chunks, c = local % job.n_chunks;
        const int64_t slot = i * chunks_per_row + job.first_chunk + c;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, job.dtype, "per_sample_grad_stats_cpu", [&] {
          run_item<scalar_t>(job, r0 + i, c, &part_dot[slot], &part_sq[slot]);
        });
      }
    });
    at::parallel_for(0, rows, 1024, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        double d = 0, s = 0;
        for (int64_t c = 0; c < chunks_per_row; ++c) {  // fixed order: thread-count independent
          d += part_dot[i * chunks_per_row + c];
          s += part_sq[i * chunks_per_row + c];
        }
        dp[r0 + i] = d;
        sp[r0 + i] = s;
      }
    });
  }
  return {dot.to(out_type), sq.to(out_type)};
}

}  // namespace

TORCH_LIBRARY_IMPL(dvgs_fast, CPU, m) {
  m.impl("per_sample_grad_stats", &per_sample_grad_stats_cpu);
}

}  // namespace dvgs_fast
