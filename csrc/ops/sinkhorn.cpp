// Schema, input checks and the epsilon schedule of the sinkhorn op.
//
//   sinkhorn(x [N,d], y [M,d], a [N], b [M], blur, p, scaling, diameter?, debias, max_iter?, tol?)
//     -> (cost [], f [N], g [M], n_iter [] int64, state_x [2,N], state_y [2,M])
//   sinkhorn_backward(wx [N], wy [M], x, y, a, b, state_x, state_y, eps, p, debias, need_x, need_y)
//     -> (grad_x [N,d], grad_y [M,d])
//
// state_* are the potentials before the final extrapolation step; the backward recomputes the
// softmax weights of that step on the fly and returns grad_x[i] = wx[i] * d(f_ba - f_aa)[i]/dx_i
// (and the same for y), wx = dcost * a + df. See ops/sinkhorn.h for the algorithm.
#include "ops/sinkhorn.h"

#include <torch/library.h>

#include <cmath>
#include <limits>

namespace dvgs_fast {
namespace sinkhorn {

namespace {
bool supported_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kDouble; }

void check_cloud(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, "sinkhorn: ", name, " must be a 2-D [n_points, n_features] tensor, got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.size(0) > 0, "sinkhorn: ", name, " is empty (0 points)");
  TORCH_CHECK_VALUE(t.size(1) > 0, "sinkhorn: ", name, " has 0 features");
  TORCH_CHECK_VALUE(supported_dtype(t.scalar_type()), "sinkhorn: ", name, " must be float32 or float64, got ",
                    t.scalar_type());
}

void check_weights(const at::Tensor& w, const at::Tensor& pts, const char* name, const char* pts_name) {
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == pts.size(0), "sinkhorn: ", name, " must have shape [",
                    pts.size(0), "] (one weight per point of ", pts_name, "), got ", w.sizes());
  TORCH_CHECK_VALUE(w.scalar_type() == pts.scalar_type(), "sinkhorn: ", name, " has dtype ", w.scalar_type(),
                    " but ", pts_name, " has ", pts.scalar_type());
  TORCH_CHECK_VALUE(w.device() == pts.device(), "sinkhorn: ", name, " is on ", w.device(), " but ", pts_name,
                    " is on ", pts.device());
}
}  // namespace

void check_forward_inputs(const at::Tensor& x, const at::Tensor& y, const at::Tensor& a, const at::Tensor& b,
                          const Options& o) {
  check_cloud(x, "x");
  check_cloud(y, "y");
  TORCH_CHECK_VALUE(x.size(1) == y.size(1), "sinkhorn: y has ", y.size(1), " features but x has ", x.size(1));
  TORCH_CHECK_VALUE(y.scalar_type() == x.scalar_type(), "sinkhorn: y has dtype ", y.scalar_type(), " but x has ",
                    x.scalar_type());
  TORCH_CHECK_VALUE(y.device() == x.device(), "sinkhorn: y is on ", y.device(), " but x is on ", x.device());
  check_weights(a, x, "a", "x");
  check_weights(b, y, "b", "y");
  TORCH_CHECK_VALUE(std::isfinite(o.blur) && o.blur > 0, "sinkhorn: blur must be > 0 and finite, got ", o.blur);
  TORCH_CHECK_VALUE(o.p == 1 || o.p == 2, "sinkhorn: p must be 1 or 2, got ", o.p);
  TORCH_CHECK_VALUE(std::isfinite(o.scaling) && o.scaling > 0 && o.scaling < 1,
                    "sinkhorn: scaling must be in (0, 1), got ", o.scaling);
  if (o.diameter.has_value())
    TORCH_CHECK_VALUE(std::isfinite(*o.diameter) && *o.diameter > 0, "sinkhorn: diameter must be > 0 and finite, got ",
                      *o.diameter);
  if (o.max_iter.has_value()) TORCH_CHECK_VALUE(*o.max_iter >= 1, "sinkhorn: max_iter must be >= 1, got ", *o.max_iter);
  if (o.tol.has_value())
    TORCH_CHECK_VALUE(std::isfinite(*o.tol) && *o.tol > 0, "sinkhorn: tol must be > 0 and finite, got ", *o.tol);
}

void check_backward_inputs(const at::Tensor& wx, const at::Tensor& wy, const at::Tensor& x, const at::Tensor& y,
                           const at::Tensor& a, const at::Tensor& b, const at::Tensor& state_x,
                           const at::Tensor& state_y, double eps, int64_t p) {
  Options o;
  o.p = p;
  check_forward_inputs(x, y, a, b, o);
  check_weights(wx, x, "wx", "x");
  check_weights(wy, y, "wy", "y");
  TORCH_CHECK_VALUE(state_x.dim() == 2 && state_x.size(0) == 2 && state_x.size(1) == x.size(0),
                    "sinkhorn_backward: state_x must be [2, ", x.size(0), "], got ", state_x.sizes());
  TORCH_CHECK_VALUE(state_y.dim() == 2 && state_y.size(0) == 2 && state_y.size(1) == y.size(0),
                    "sinkhorn_backward: state_y must be [2, ", y.size(0), "], got ", state_y.sizes());
  TORCH_CHECK_VALUE(state_x.scalar_type() == x.scalar_type() && state_y.scalar_type() == x.scalar_type(),
                    "sinkhorn_backward: state_x / state_y must have x's dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(state_x.device() == x.device() && state_y.device() == x.device(),
                    "sinkhorn_backward: state_x / state_y must be on x's device");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, "sinkhorn_backward: eps must be > 0 and finite, got ", eps);
}

std::vector<double> epsilon_schedule(int64_t p, double diameter, double blur, double scaling) {
  const double pd = static_cast<double>(p);
  std::vector<double> eps{std::pow(diameter, pd)};
  const double start = pd * std::log(diameter), stop = pd * std::log(blur), step = pd * std::log(scaling);
  // numpy.arange(start, stop, step): ceil((stop - start) / step) values start + k * step
  // (none when diameter <= blur: the schedule is then just [diameter^p, blur^p]).
  const double len = std::ceil((stop - start) / step);
  const int64_t count = len > 0 ? static_cast<int64_t>(len) : 0;
  for (int64_t k = 0; k < count; ++k) eps.push_back(std::exp(start + static_cast<double>(k) * step));
  eps.push_back(std::pow(blur, pd));
  return eps;
}

std::pair<double, at::Tensor> bounding_box(const at::Tensor& x, const at::Tensor& y) {
  const at::Tensor lo = at::minimum(x.amin(0), y.amin(0));
  const at::Tensor hi = at::maximum(x.amax(0), y.amax(0));
  const double diam = (hi - lo).to(at::kDouble).norm().item<double>();
  return {diam, (lo + hi) * 0.5};
}

at::Tensor log_weights(const at::Tensor& w) {
  return at::where(w > 0, w.log(), at::scalar_tensor(kLogZero, w.options()));
}

}  // namespace sinkhorn

TORCH_LIBRARY_FRAGMENT(dvgs_fast, m) {
  m.def(
      "sinkhorn(Tensor x, Tensor y, Tensor a, Tensor b, float blur=0.05, int p=2, float scaling=0.5, "
      "float? diameter=None, bool debias=True, int? max_iter=None, float? tol=None) -> "
      "(Tensor cost, Tensor f, Tensor g, Tensor n_iter, Tensor state_x, Tensor state_y)");
  m.def(
      "sinkhorn_backward(Tensor wx, Tensor wy, Tensor x, Tensor y, Tensor a, Tensor b, Tensor state_x, "
      "Tensor state_y, float eps, int p, bool debias, bool need_x, bool need_y) -> (Tensor grad_x, Tensor grad_y)");
}

}  // namespace dvgs_fast
