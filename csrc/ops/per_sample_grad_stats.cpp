// Schema and input checks of per_sample_grad_stats and per_sample_cosine.
//
//   per_sample_grad_stats(grads: [N,*s_k] x K, target: [s_k] x K) -> (dot[N], sqnorm[N])
//
// dot_i = <g_i, G>, sqnorm_i = |g_i|^2 over the K gradient tensors taken together, in one
// pass over each gradient tensor and without concatenating them (the torch reference
// cat(flatten)s all K tensors first: an extra N x P copy).
#include "ops/per_sample_grad_stats.h"

#include <torch/library.h>

#include <sstream>

namespace dvgs_fast {

namespace {
std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}
}  // namespace

int64_t check_grad_stats_inputs(const std::vector<at::Tensor>& grads,
                                const std::vector<at::Tensor>& target, const char* op) {
  TORCH_CHECK_VALUE(!grads.empty(), op, ": grads is an empty list");
  TORCH_CHECK_VALUE(grads.size() == target.size(), op, ": grads has ", grads.size(),
                    " tensors but target has ", target.size());
  const auto device = grads[0].device();
  TORCH_CHECK_VALUE(grads[0].dim() >= 1, op, ": grads[0] must have a sample dimension, got a 0-d tensor");
  const int64_t n = grads[0].size(0);
  for (size_t k = 0; k < grads.size(); ++k) {
    const auto& g = grads[k];
    const auto& t = target[k];
    TORCH_CHECK_VALUE(at::isFloatingType(g.scalar_type()), op, ": grads[", k,
                      "] must be floating point, got ", g.scalar_type());
    TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), op, ": target[", k,
                      "] must be floating point, got ", t.scalar_type());
    TORCH_CHECK_VALUE(g.device() == device && t.device() == device, op,
                      ": all tensors must be on one device; grads[0] is on ", device, ", grads[", k,
                      "] on ", g.device(), ", target[", k, "] on ", t.device());
    TORCH_CHECK_VALUE(g.dim() >= 1, op, ": grads[", k, "] must have a sample dimension, got a 0-d tensor");
    TORCH_CHECK_VALUE(g.size(0) == n, op, ": grads[", k, "] has ", g.size(0), " samples but grads[0] has ", n);
    TORCH_CHECK_VALUE(g.sizes().slice(1) == t.sizes(), op, ": target[", k, "] has shape ",
                      shape_str(t.sizes()), " but grads[", k, "] has per-sample shape ",
                      shape_str(g.sizes().slice(1)), " (grads[", k, "] is ", shape_str(g.sizes()), ")");
  }
  return n;
}

RowLayout row_layout_of(const at::Tensor& g, at::Tensor& storage) {
  RowLayout L;
  const int nd = static_cast<int>(g.dim()) - 1;
  if (make_row_layout(g.size(0), g.stride(0), g.sizes().data() + 1, g.strides().data() + 1, nd, &L)) {
    storage = g;
    return L;
  }
  storage = g.contiguous();  // > kMaxRowDims unmergeable dims: exotic views only
  TORCH_INTERNAL_ASSERT(make_row_layout(storage.size(0), storage.stride(0), storage.sizes().data() + 1,
                                        storage.strides().data() + 1, nd, &L));
  return L;
}

at::ScalarType stats_out_type(const std::vector<at::Tensor>& grads) {
  for (const auto& g : grads)
    if (g.scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

namespace {
// cosine = dot / (max(|g|, eps) * max(|G|, eps)): exactly torch.nn.functional.cosine_similarity,
// so a zero gradient gives 0, never NaN. Composite: runs on any backend that has the stats op.
//
// Overflow: the stats accumulate fp16/bf16/fp32 gradients in fp32, so |g| >~ 1.8e19 overflows
// dot and |g|^2 to inf and the cosine becomes NaN, while torch's cosine_similarity stays finite.
// |G|^2 is therefore always summed in float64, and rows whose fp32 stats are not finite are
// recomputed from their gradients in float64 (rare: one extra pass over just those rows; on a
// GPU the check costs one synchronisation per call). Rows whose gradients themselves hold
// NaN/Inf stay NaN, as in torch.
at::Tensor per_sample_cosine(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& target,
                             double eps) {
  TORCH_CHECK_VALUE(eps >= 0.0, "per_sample_cosine: eps must be >= 0, got ", eps);
  static auto stats_op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dvgs_fast::per_sample_grad_stats", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(at::TensorList, at::TensorList)>();
  auto [dot, sq] = stats_op.call(grads, target);
  at::Tensor tsq = at::zeros({}, dot.options().dtype(at::kDouble));
  for (const auto& t : target) tsq = tsq + t.to(at::kDouble).square().sum();
  const at::Tensor tnorm = tsq.sqrt().clamp_min(eps);
  at::Tensor cos = (dot.to(at::kDouble) / (sq.to(at::kDouble).sqrt().clamp_min(eps) * tnorm)).to(dot.scalar_type());
  if (dot.scalar_type() != at::kDouble && dot.numel() > 0) {
    const at::Tensor bad = at::logical_not(at::logical_and(at::isfinite(dot), at::isfinite(sq)));
    if (bad.any().item<bool>()) {
      const at::Tensor rows = bad.nonzero().squeeze(1);
      std::vector<at::Tensor> g64, t64;
      for (size_t k = 0; k < grads.size(); ++k) {
        g64.push_back(grads[k].index_select(0, rows).to(at::kDouble));
        t64.push_back(target[k].to(at::kDouble));
      }
      auto [d64, s64] = stats_op.call(g64, t64);
      cos.index_put_({rows}, (d64 / (s64.sqrt().clamp_min(eps) * tnorm)).to(cos.scalar_type()));
    }
  }
  return cos;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(dvgs_fast, m) {
  m.def("per_sample_grad_stats(Tensor[] grads, Tensor[] target) -> (Tensor, Tensor)");
  m.def("per_sample_cosine(Tensor[] grads, Tensor[] target, float eps=1e-8) -> Tensor",
        &per_sample_cosine);
}

}  // namespace dvgs_fast
