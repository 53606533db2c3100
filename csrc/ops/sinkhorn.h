// Shared pieces of the sinkhorn op: input checks, the epsilon-scaling schedule, the
// device-agnostic Sinkhorn loop and the host-side assembly of both ops (forward() and
// backward() at the end, templated on the engine). The CPU (cpu/sinkhorn.cpp) and CUDA
// (cuda/sinkhorn.cu) files only provide a SoftminEngine: the soft-C-transform between two of
// the point clouds, computed on the fly (never an N x M matrix), and register
// forward<TheirEngine> / backward<TheirEngine> for their dispatch key.
//
// Semantics follow geomloss's SamplesLoss("sinkhorn", backend="tensorized") for the same
// arguments (balanced OT, no reach), so LossVal reproduces the original:
//   * cost C(x, y) = |x - y|^2 / 2 (p = 2) or |x - y| (p = 1);
//   * epsilon schedule diameter^p, then exp(arange(p log diameter, p log blur, p log scaling)),
//     then blur^p; one symmetric (averaged) update of all potentials per entry;
//   * a final, un-averaged "extrapolation" update at eps = blur^p whose potentials give the
//     cost and its gradients (envelope theorem: no backprop through the iterations);
//   * weights are used as given (unnormalised masses allowed), log(0) is clamped to -1e5.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/DeviceGuard.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace dvgs_fast {
namespace sinkhorn {

// geomloss's log_weights(): log of a zero weight. Finite (not -inf) so that a zero-mass point
// can never turn an online log-sum-exp into inf - inf.
constexpr double kLogZero = -100000.0;

enum Side : int { kX = 0, kY = 1 };

struct Options {
  double blur = 0.05;
  int64_t p = 2;
  double scaling = 0.5;
  std::optional<double> diameter;
  bool debias = true;
  std::optional<int64_t> max_iter;
  std::optional<double> tol;
};

// ValueError (TORCH_CHECK_VALUE) naming the argument. Checks shapes, dtypes, devices and the
// scalar options; the data-dependent checks (NaN, negative weights) are the Python wrapper's.
void check_forward_inputs(const at::Tensor& x, const at::Tensor& y, const at::Tensor& a, const at::Tensor& b,
                          const Options& o);
void check_backward_inputs(const at::Tensor& wx, const at::Tensor& wy, const at::Tensor& x, const at::Tensor& y,
                           const at::Tensor& a, const at::Tensor& b, const at::Tensor& state_x,
                           const at::Tensor& state_y, double eps, int64_t p);

// [diameter^p, exp(p log diameter), exp(p log diameter + p log scaling), ..., blur^p], the
// arange taken with numpy's length rule ceil((stop - start) / step) so the number of
// iterations is the one geomloss runs.
std::vector<double> epsilon_schedule(int64_t p, double diameter, double blur, double scaling);

// Euclidean diagonal of the joint bounding box of x and y (geomloss's max_diameter), and the
// box's centre (used by the CPU engine to centre the clouds: costs are translation-invariant
// and smaller coordinates mean less cancellation in |x|^2 + |y|^2 - 2 x.y).
std::pair<double, at::Tensor> bounding_box(const at::Tensor& x, const at::Tensor& y);

// log(w) with w <= 0 -> kLogZero, in w's dtype.
at::Tensor log_weights(const at::Tensor& w);

// The soft-C-transform between two clouds, on one device:
//   new[i] = -eps * log sum_j exp( logw[j] + pot[j] / eps - C(r_i, c_j) / eps )
// where r = rows cloud, c = cols cloud, pot may be null (treated as 0). With prev != null the
// engine writes out[i] = (prev[i] + new[i]) / 2 (geomloss's symmetric update) and, if asked,
// tracks max_i |new[i] - prev[i]| for take_residual(). out never aliases prev or pot.
template <typename T>
class SoftminEngine {
 public:
  virtual ~SoftminEngine() = default;
  virtual int64_t size(Side s) const = 0;
  virtual void softmin(Side rows, Side cols, const T* logw, const T* pot, double eps, const T* prev, T* out,
                       bool track_residual) = 0;
  // Both directions between x and y at once (an engine can share every pairwise cost):
  //   out_x = softmin over y with (logw_y, pot_y), out_y = softmin over x with (logw_x, pot_x).
  virtual void softmin_cross(const T* logw_x, const T* pot_x, const T* prev_x, T* out_x, const T* logw_y,
                             const T* pot_y, const T* prev_y, T* out_y, double eps, bool track_residual) {
    softmin(kX, kY, logw_y, pot_y, eps, prev_x, out_x, track_residual);
    softmin(kY, kX, logw_x, pot_x, eps, prev_y, out_y, track_residual);
  }
  // A cloud against itself (an engine can use the symmetry of the costs).
  virtual void softmin_self(Side s, const T* logw, const T* pot, double eps, const T* prev, T* out,
                            bool track_residual) {
    softmin(s, s, logw, pot, eps, prev, out, track_residual);
  }
  // Largest residual since the last call (then reset); may synchronise a device.
  virtual double take_residual() = 0;
  // grad[i, :] = d new[i] / d r_i = sum_j P_ij grad_1 C(r_i, c_j), P_ij the softmax weights of
  // row i above (the barycentric formula; for p = 2 it is r_i - sum_j P_ij c_j).
  virtual void softmin_grad(Side rows, Side cols, const T* logw, const T* pot, double eps, T* grad) = 0;
};

struct ForwardResult {
  at::Tensor cost, f, g, n_iter, state_x, state_y;
};

// The Sinkhorn loop, shared by every device. a, b, loga, logb: contiguous [N], [M] in T on the
// engine's device. Returns cost [], f [N], g [M] (debiased potentials when debias), n_iter
// (int64 []), and the potentials before the final extrapolation that the backward needs:
// state_x = [f_ba; f_aa] ([2, N]), state_y = [g_ab; g_bb] ([2, M]) (second rows zero without
// debias).
template <typename T>
ForwardResult run_sinkhorn(SoftminEngine<T>& E, const at::Tensor& a, const at::Tensor& b, const at::Tensor& loga,
                           const at::Tensor& logb, const std::vector<double>& eps_list, const Options& o) {
  const int64_t n = E.size(kX), m = E.size(kY);
  const auto opts = a.options();
  // Two buffers per potential: current and next (the symmetric update reads the old values of
  // all four potentials while writing the new ones).
  at::Tensor sx = at::zeros({2, 2, n}, opts);  // [buffer][f_ba, f_aa][N]
  at::Tensor sy = at::zeros({2, 2, m}, opts);  // [buffer][g_ab, g_bb][M]
  auto fba = [&](int k) { return sx.data_ptr<T>() + (k * 2 + 0) * n; };
  auto faa = [&](int k) { return sx.data_ptr<T>() + (k * 2 + 1) * n; };
  auto gab = [&](int k) { return sy.data_ptr<T>() + (k * 2 + 0) * m; };
  auto gbb = [&](int k) { return sy.data_ptr<T>() + (k * 2 + 1) * m; };
  const T* la = loga.data_ptr<T>();
  const T* lb = logb.data_ptr<T>();

  // Initialisation at the largest temperature: a softmin against the weights alone.
  int cur = 0;
  const double eps0 = eps_list.front();
  E.softmin_cross(la, nullptr, nullptr, fba(cur), lb, nullptr, nullptr, gab(cur), eps0, false);
  if (o.debias) {
    E.softmin_self(kX, la, nullptr, eps0, nullptr, faa(cur), false);
    E.softmin_self(kY, lb, nullptr, eps0, nullptr, gbb(cur), false);
  }

  auto step = [&](double eps, bool track) {
    const int nxt = 1 - cur;
    E.softmin_cross(la, fba(cur), fba(cur), fba(nxt), lb, gab(cur), gab(cur), gab(nxt), eps, track);
    if (o.debias) {
      E.softmin_self(kX, la, faa(cur), eps, faa(cur), faa(nxt), track);
      E.softmin_self(kY, lb, gbb(cur), eps, gbb(cur), gbb(nxt), track);
    }
    cur = nxt;
  };

  int64_t n_iter = 0;
  for (double eps : eps_list) {  // the annealing schedule always runs to the end
    step(eps, false);
    ++n_iter;
  }
  // Optional extra iterations at the final temperature: until the largest potential update is
  // below tol, or up to max_iter iterations in all.
  const double eps_end = eps_list.back();
  const int64_t sched = static_cast<int64_t>(eps_list.size());
  const int64_t cap = o.max_iter.has_value() ? std::max(*o.max_iter, sched)
                                             : (o.tol.has_value() ? sched + 1000 : sched);
  if (n_iter < cap) E.take_residual();
  while (n_iter < cap) {
    step(eps_end, o.tol.has_value());
    ++n_iter;
    if (o.tol.has_value() && E.take_residual() <= *o.tol) break;
  }

  // Final extrapolation (not averaged): these potentials define the cost and the gradients.
  at::Tensor fin_x = at::empty({2, n}, opts), fin_y = at::empty({2, m}, opts);
  T* Fba = fin_x.data_ptr<T>();
  T* Faa = Fba + n;
  T* Gab = fin_y.data_ptr<T>();
  T* Gbb = Gab + m;
  E.softmin_cross(la, fba(cur), nullptr, Fba, lb, gab(cur), nullptr, Gab, eps_end, false);
  at::Tensor f, g;
  if (o.debias) {
    E.softmin_self(kX, la, faa(cur), eps_end, nullptr, Faa, false);
    E.softmin_self(kY, lb, gbb(cur), eps_end, nullptr, Gbb, false);
    f = fin_x[0] - fin_x[1];
    g = fin_y[0] - fin_y[1];
  } else {
    f = fin_x[0].clone();
    g = fin_y[0].clone();
  }
  // <a, f> + <b, g>, summed in float64 (the weights may be unnormalised, e.g. all ones).
  at::Tensor cost = (at::dot(a.to(at::kDouble), f.to(at::kDouble)) + at::dot(b.to(at::kDouble), g.to(at::kDouble)))
                        .to(a.scalar_type());
  ForwardResult r;
  r.cost = cost;
  r.f = f;
  r.g = g;
  r.n_iter = at::scalar_tensor(n_iter, opts.dtype(at::kLong));
  r.state_x = sx[cur].clone();
  r.state_y = sy[cur].clone();
  return r;
}

// ------------------------------------------------------------------------------------------
// Host-side assembly, written once for every device. An engine is a class template E<T>
// (T = float or double) deriving from SoftminEngine<T>, constructed as E<T>(x, y, center, p)
// on the inputs' device, with `static constexpr bool kCentres`: true when it wants the centre
// of the joint bounding box (then always computed; CPU), false when it takes an undefined
// tensor (the box is then only computed for a missing diameter, saving a device sync; CUDA).
// ------------------------------------------------------------------------------------------
template <template <typename> class Engine>
constexpr bool engine_centres = Engine<float>::kCentres && Engine<double>::kCentres;

inline Options make_options(double blur, int64_t p, double scaling, std::optional<double> diameter, bool debias,
                            std::optional<int64_t> max_iter, std::optional<double> tol) {
  Options o;
  o.blur = blur;
  o.p = p;
  o.scaling = scaling;
  o.diameter = diameter;
  o.debias = debias;
  o.max_iter = max_iter;
  o.tol = tol;
  return o;
}

// The sinkhorn op (schema in ops/sinkhorn.cpp).
template <template <typename> class Engine>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& a, const at::Tensor& b, double blur, int64_t p,
    double scaling, std::optional<double> diameter, bool debias, std::optional<int64_t> max_iter,
    std::optional<double> tol) {
  const Options o = make_options(blur, p, scaling, diameter, debias, max_iter, tol);
  check_forward_inputs(x, y, a, b, o);
  const c10::DeviceGuard guard(x.device());
  at::Tensor center;
  double diam = o.diameter.value_or(0.0);
  if (engine_centres<Engine> || !o.diameter.has_value()) {
    auto box = bounding_box(x, y);
    center = box.second;
    if (!o.diameter.has_value()) diam = box.first;
  }
  if (!(diam > 0)) diam = o.blur;  // every point at one place: any start scale will do
  const std::vector<double> eps_list = epsilon_schedule(p, diam, blur, scaling);
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const at::Tensor la = log_weights(ac).contiguous(), lb = log_weights(bc).contiguous();
  ForwardResult r;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sinkhorn", [&] {
    Engine<scalar_t> E(x, y, center, p);
    r = run_sinkhorn<scalar_t>(E, ac, bc, la, lb, eps_list, o);
  });
  return {r.cost, r.f, r.g, r.n_iter, r.state_x, r.state_y};
}

// The sinkhorn_backward op: grad_x[i] = wx[i] * d(f_ba - f_aa)[i] / dx_i, and the same for y.
template <template <typename> class Engine>
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& wx, const at::Tensor& wy, const at::Tensor& x,
                                            const at::Tensor& y, const at::Tensor& a, const at::Tensor& b,
                                            const at::Tensor& state_x, const at::Tensor& state_y, double eps,
                                            int64_t p, bool debias, bool need_x, bool need_y) {
  check_backward_inputs(wx, wy, x, y, a, b, state_x, state_y, eps, p);
  const c10::DeviceGuard guard(x.device());
  at::Tensor gx = at::zeros_like(x, at::MemoryFormat::Contiguous), gy = at::zeros_like(y, at::MemoryFormat::Contiguous);
  if (!need_x && !need_y) return {gx, gy};
  const at::Tensor la = log_weights(a.contiguous()).contiguous(), lb = log_weights(b.contiguous()).contiguous();
  const at::Tensor sx = state_x.contiguous(), sy = state_y.contiguous();
  at::Tensor center;
  if (engine_centres<Engine>) center = bounding_box(x, y).second;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sinkhorn_backward", [&] {
    using T = scalar_t;
    Engine<T> E(x, y, center, p);
    const int64_t n = x.size(0), m = y.size(0);
    // d f_ba[i]/dx_i uses the softmin over y with g_ab (state_y[0]); d f_aa[i]/dx_i the one
    // over x with f_aa (state_x[1]); symmetrically for y.
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

}  // namespace sinkhorn
}  // namespace dvgs_fast
