// Host emulation of csrc/cuda/kernels/sinkhorn_kernel.cu, for machines without a GPU.
//
// The kernel file is compiled by g++ with the CUDA keywords mapped onto plain C++: each block
// runs as blockDim.x std::threads meeting at a std::barrier for __syncthreads(), __shared__
// arrays become function statics (shared by the block's threads; blocks run one after another),
// atomicMax takes a mutex. This checks the kernels' logic -- tiling, chunking over features,
// partial tiles, the online log-sum-exp, the gradient pass -- not their speed.
//
// Usage: sinkhorn_cuda_emu IN OUT. IN: int64 header {dtype (0 float, 1 double), n, m, d, p,
// has_pot, has_prev, 0}, double eps, then rows[n*d], cols[m*d], logw[m], pot[m]?, prev[n]? in
// dtype. OUT: out[n] (dtype), lse[n] (double), residual (double), grad[n*d] (dtype).
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

namespace emu {
inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim;
inline std::barrier<>* bar = nullptr;
inline std::mutex atomic_mu;

template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, Args... args) {
  block_dim = block;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::barrier<> b(block.x);
      bar = &b;
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < block.x; ++t) {
        threads.emplace_back([=] {
          thread_idx = dim3(t);
          block_idx = dim3(bx, by);
          kernel(args...);
        });
      }
      for (auto& th : threads) th.join();
    }
  }
}
}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define DVGS_CUDA_LAUNCH(kernel, grid, block, stream, ...) emu::launch(kernel, dim3(grid), dim3(block), __VA_ARGS__)

inline void __syncthreads() { emu::bar->arrive_and_wait(); }
inline long long __double_as_longlong(double v) {
  long long r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}
inline unsigned long long atomicMax(unsigned long long* addr, unsigned long long v) {
  std::lock_guard<std::mutex> lock(emu::atomic_mu);
  const unsigned long long old = *addr;
  if (v > old) *addr = v;
  return old;
}

#include "cuda/kernels/sinkhorn_kernel.cu"

template <typename T>
int run(FILE* in, FILE* out, const int64_t* h, double eps) {
  const int64_t n = h[1], m = h[2], d = h[3];
  const int p = static_cast<int>(h[4]);
  std::vector<T> rows(n * d), cols(m * d), logw(m), pot(m), prev(n), res(n), grad(n * d);
  auto rd = [&](std::vector<T>& v) { return std::fread(v.data(), sizeof(T), v.size(), in) == v.size(); };
  if (!rd(rows) || !rd(cols) || !rd(logw)) return 2;
  if (h[5] && !rd(pot)) return 2;
  if (h[6] && !rd(prev)) return 2;
  std::vector<double> lse(n);
  unsigned long long residual = 0;
  dvgs_fast::cuda::SoftminArgs<T> a;
  a.rows = rows.data();
  a.cols = cols.data();
  a.n_rows = n;
  a.n_cols = m;
  a.d = d;
  a.logw = logw.data();
  a.pot = h[5] ? pot.data() : nullptr;
  a.prev = h[6] ? prev.data() : nullptr;
  a.out = res.data();
  a.eps = eps;
  a.p = p;
  a.residual = &residual;
  a.lse = lse.data();
  if (dvgs_fast::cuda::launch_sinkhorn_softmin<T>(a, nullptr) != cudaSuccess) return 3;
  dvgs_fast::cuda::SoftminGradArgs<T> g;
  g.rows = rows.data();
  g.cols = cols.data();
  g.n_rows = n;
  g.n_cols = m;
  g.d = d;
  g.logw = logw.data();
  g.pot = a.pot;
  g.eps = eps;
  g.p = p;
  g.lse = lse.data();
  g.grad = grad.data();
  if (dvgs_fast::cuda::launch_sinkhorn_softmin_grad<T>(g, nullptr) != cudaSuccess) return 3;
  double r;
  std::memcpy(&r, &residual, sizeof r);
  std::fwrite(res.data(), sizeof(T), n, out);
  std::fwrite(lse.data(), sizeof(double), n, out);
  std::fwrite(&r, sizeof(double), 1, out);
  std::fwrite(grad.data(), sizeof(T), n * d, out);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 3) return 1;
  FILE* in = std::fopen(argv[1], "rb");
  FILE* out = std::fopen(argv[2], "wb");
  if (!in || !out) return 1;
  int64_t h[8];
  double eps;
  if (std::fread(h, sizeof(int64_t), 8, in) != 8 || std::fread(&eps, sizeof(double), 1, in) != 1) return 2;
  const int rc = h[0] == 0 ? run<float>(in, out, h, eps) : run<double>(in, out, h, eps);
  std::fclose(in);
  std::fclose(out);
  return rc;
}
