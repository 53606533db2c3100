// CUDA glue of the sinkhorn op: a SoftminEngine over the torch-free launchers in
// cuda/kernels/sinkhorn_kernel.cu, driven by the shared loop in ops/sinkhorn.h.
//
// The loop's bookkeeping (schedule, buffers, averaging) is the CPU's, so both devices compute
// the same thing; the engine only launches kernels on the current stream. Host syncs: the
// bounding box (once per call, for the diameter) and, only when tol is given, the residual after
// each extra iteration.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
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
  CudaEngine(const at::Tensor& x, const at::Tensor& y, int64_t p)
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_cuda(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& a, const at::Tensor& b, double blur, int64_t p,
    double scaling, std::optional<double> diameter, bool debias, std::optional<int64_t> max_iter,
    std::optional<double> tol) {
  Options o;
  o.blur = blur;
  o.p = p;
  o.scaling = scaling;
  o.diameter = diameter;
  o.debias = debias;
  o.max_iter = max_iter;
  o.tol = tol;
  check_forward_inputs(x, y, a, b, o);
  const c10::cuda::CUDAGuard guard(x.device());
  double diam = o.diameter.has_value() ? *o.diameter : bounding_box(x, y).first;
  if (!(diam > 0)) diam = o.blur;
  const std::vector<double> eps_list = epsilon_schedule(p, diam, blur, scaling);
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const at::Tensor la = log_weights(ac).contiguous(), lb = log_weights(bc).contiguous();
  ForwardResult r;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sinkhorn_cuda", [&] {
    CudaEngine<scalar_t> E(x, y, p);
    r = run_sinkhorn<scalar_t>(E, ac, bc, la, lb, eps_list, o);
  });
  return {r.cost, r.f, r.g, r.n_iter, r.state_x, r.state_y};
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_backward_cuda(const at::Tensor& wx, const at::Tensor& wy,
                                                          const at::Tensor& x, const at::Tensor& y,
                                                          const at::Tensor& a, const at::Tensor& b,
                                                          const at::Tensor& state_x, const at::Tensor& state_y,
                                                          double eps, int64_t p, bool debias, bool need_x,
                                                          bool need_y) {
  check_backward_inputs(wx, wy, x, y, a, b, state_x, state_y, eps, p);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor la = log_weights(a.contiguous()).contiguous(), lb = log_weights(b.contiguous()).contiguous();
  const at::Tensor sx = state_x.contiguous(), sy = state_y.contiguous();
  at::Tensor gx = at::zeros_like(x, at::MemoryFormat::Contiguous), gy = at::zeros_like(y, at::MemoryFormat::Contiguous);
  if (!need_x && !need_y) return {gx, gy};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sinkhorn_backward_cuda", [&] {
    using T = scalar_t;
    CudaEngine<T> E(x, y, p);
    const int64_t n = x.size(0), m = y.size(0);
    if (need_x) {
      at::Tensor G = at::empty_like(gx);
      E.softmin_grad(kX, kY, lb.data_ptr<T>(), sy.data_ptr<T>(), eps, G.data_ptr<T>());
      if (debias) {
        at::Tensor G2 = at::empty_like(gx);
        E.softmin_grad(kX, kX, la.data_ptr<T>(), sx.data_ptr<T>() + n, eps, G2.data_ptr<T>());
        G.sub_(G2);
      }
      gx = G.mul_(wx.unsqueeze(1));
    }
    if (need_y) {
      at::Tensor G = at::empty_like(gy);
      E.softmin_grad(kY, kX, la.data_ptr<T>(), sx.data_ptr<T>(), eps, G.data_ptr<T>());
      if (debias) {
        at::Tensor G2 = at::empty_like(gy);
        E.softmin_grad(kY, kY, lb.data_ptr<T>(), sy.data_ptr<T>() + m, eps, G2.data_ptr<T>());
        G.sub_(G2);
      }
      gy = G.mul_(wy.unsqueeze(1));
    }
  });
  return {gx, gy};
}

}  // namespace
}  // namespace sinkhorn

TORCH_LIBRARY_IMPL(dvgs_fast, CUDA, m) {
  m.impl("sinkhorn", &sinkhorn::sinkhorn_cuda);
  m.impl("sinkhorn_backward", &sinkhorn::sinkhorn_backward_cuda);
}

}  // namespace dvgs_fast
