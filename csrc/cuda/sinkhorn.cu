// CUDA glue of the sinkhorn op: a SoftminEngine over the torch-free launchers in
// cuda/kernels/sinkhorn_kernel.cu. Everything else -- option checks, schedule, the loop's
// bookkeeping, the debiased backward -- is ops/sinkhorn.h's forward / backward, shared with the
// CPU, so both devices compute the same thing; the engine only launches kernels on the current
// stream. Host syncs: the bounding box (once per call, only when no diameter is given) and, only
// when tol is given, the residual after each extra iteration.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>

#include "cuda/kernels/sinkhorn_kernel.cuh"
#include "ops/sinkhorn.h"

namespace dvgs_fast {
namespace sinkhorn {
namespace {

void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "sinkhorn: CUDA launch failed: ", cudaGetErrorString(err));
}

template <typename T>
class CudaEngine final : public SoftminEngine<T> {
 public:
  static constexpr bool kCentres = false;  // the kernels use |x - y| directly: no centring

  // Built by ops/sinkhorn.h's forward / backward under a device guard for x's device.
  CudaEngine(const at::Tensor& x, const at::Tensor& y, const at::Tensor& /*center*/, int64_t p)
      : pts_{x.contiguous(), y.contiguous()}, p_(p), stream_(c10::cuda::getCurrentCUDAStream()) {
    residual_ = at::zeros({1}, x.options().dtype(at::kLong));
    lse_ = at::empty({std::max(x.size(0), y.size(0))}, x.options().dtype(at::kDouble));
  }

  int64_t size(Side s) const override { return pts_[s].size(0); }

  void softmin(Side rows, Side cols, const T* logw, const T* pot, double eps, const T* prev, T* out,
               bool track_residual) override {
    cuda::SoftminArgs<T> a = args(rows, cols, logw, pot, eps);
    a.prev = prev;
    a.out = out;
    a.residual = track_residual ? reinterpret_cast<unsigned long long*>(residual_.data_ptr<int64_t>()) : nullptr;
    check_launch(cuda::launch_sinkhorn_softmin<T>(a, stream_));
  }

  double take_residual() override {
    const int64_t bits = residual_.item<int64_t>();  // synchronises the stream
    residual_.zero_();
    double r;
    std::memcpy(&r, &bits, sizeof r);
    return r;
  }

  void softmin_grad(Side rows, Side cols, const T* logw, const T* pot, double eps, T* grad) override {
    cuda::SoftminArgs<T> a = args(rows, cols, logw, pot, eps);
    a.lse = lse_.data_ptr<double>();  // pass 1: each row's log-sum-exp
    check_launch(cuda::launch_sinkhorn_softmin<T>(a, stream_));
    cuda::SoftminGradArgs<T> g;
    g.rows = a.rows;
    g.cols = a.cols;
    g.n_rows = a.n_rows;
    g.n_cols = a.n_cols;
    g.d = a.d;
    g.logw = logw;
    g.pot = pot;
    g.eps = eps;
    g.p = a.p;
    g.lse = a.lse;
    g.grad = grad;
    check_launch(cuda::launch_sinkhorn_softmin_grad<T>(g, stream_));
  }

 private:
  cuda::SoftminArgs<T> args(Side rows, Side cols, const T* logw, const T* pot, double eps) const {
    cuda::SoftminArgs<T> a;
    a.rows = pts_[rows].data_ptr<T>();
    a.cols = pts_[cols].data_ptr<T>();
    a.n_rows = pts_[rows].size(0);
    a.n_cols = pts_[cols].size(0);
    a.d = pts_[rows].size(1);
    a.logw = logw;
    a.pot = pot;
    a.eps = eps;
    a.p = static_cast<int>(p_);
    return a;
  }

  at::Tensor pts_[2];
  int64_t p_;
  cudaStream_t stream_;
  at::Tensor residual_, lse_;
};

}  // namespace
}  // namespace sinkhorn

TORCH_LIBRARY_IMPL(dvgs_fast, CUDA, m) {
  m.impl("sinkhorn", &sinkhorn::forward<sinkhorn::CudaEngine>);
  m.impl("sinkhorn_backward", &sinkhorn::backward<sinkhorn::CudaEngine>);
}

}  // namespace dvgs_fast
