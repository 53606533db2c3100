// Schema, input checks and the device-generic driver of linear_ghost_stats (see the header).
#include "ops/linear_ghost_stats.h"

#include <torch/library.h>

#include <sstream>

namespace dvgs_fast {

namespace {
std::string shp(at::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

// Rows per block: keeps every intermediate under ~32 MB so memory stays bounded for any N.
int64_t rows_per_block(int64_t width, int64_t elem_size) {
  const int64_t budget = int64_t(32) << 20;
  return std::max<int64_t>(1, budget / std::max<int64_t>(1, width * elem_size));
}
}  // namespace

void check_linear_ghost_inputs(const at::Tensor& a, const at::Tensor& d, const at::Tensor& w,
                               const std::optional<at::Tensor>& b) {
  const char* op = "linear_ghost_stats";
  TORCH_CHECK_VALUE(a.dim() == 2 || a.dim() == 3, op, ": inputs must be [N, d_in] or [N, T, d_in], got ", shp(a.sizes()));
  TORCH_CHECK_VALUE(d.dim() == a.dim(), op, ": output_grads must have the same number of dims as inputs (",
                    a.dim(), "), got ", shp(d.sizes()));
  TORCH_CHECK_VALUE(d.size(0) == a.size(0), op, ": output_grads has ", d.size(0), " samples but inputs has ", a.size(0));
  if (a.dim() == 3)
    TORCH_CHECK_VALUE(d.size(1) == a.size(1), op, ": output_grads has T=", d.size(1), " but inputs has T=", a.size(1));
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == d.size(-1) && w.size(1) == a.size(-1), op,
                    ": target_weight must be [d_out, d_in] = [", d.size(-1), ", ", a.size(-1), "], got ", shp(w.sizes()));
  for (auto [t, name] : {std::pair{&a, "inputs"}, std::pair{&d, "output_grads"}, std::pair{&w, "target_weight"}}) {
    TORCH_CHECK_VALUE(at::isFloatingType(t->scalar_type()), op, ": ", name, " must be floating point, got ",
                      t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == a.device(), op, ": ", name, " is on ", t->device(), " but inputs is on ", a.device());
  }
  TORCH_CHECK_VALUE(a.scalar_type() == d.scalar_type(), op, ": inputs (", a.scalar_type(), ") and output_grads (",
                    d.scalar_type(), ") must have the same dtype");
  if (b.has_value()) {
    TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == d.size(-1), op, ": target_bias must be [d_out] = [", d.size(-1),
                      "], got ", shp(b->sizes()));
    TORCH_CHECK_VALUE(at::isFloatingType(b->scalar_type()), op, ": target_bias must be floating point, got ",
                      b->scalar_type());
    TORCH_CHECK_VALUE(b->device() == a.device(), op, ": target_bias is on ", b->device(), " but inputs is on ", a.device());
  }
}

std::tuple<at::Tensor, at::Tensor> linear_ghost_stats_impl(const at::Tensor& inputs, const at::Tensor& output_grads,
                                                           const at::Tensor& target_weight,
                                                           const std::optional<at::Tensor>& target_bias,
                                                           GhostRowReduce reduce) {
  check_linear_ghost_inputs(inputs, output_grads, target_weight, target_bias);
  // fp16/bf16 are accumulated in fp32; fp64 stays fp64.
  const auto acc = inputs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t n = inputs.size(0);
  const bool seq = inputs.dim() == 3;
  const int64_t t_len = seq ? inputs.size(1) : 1;
  const int64_t d_in = inputs.size(-1), d_out = output_grads.size(-1);
  const bool has_bias = target_bias.has_value();
  auto opts = inputs.options().dtype(acc);
  at::Tensor dot = at::zeros({n}, opts), sq = at::zeros({n}, opts);
  if (n == 0) return {dot, sq};

  const at::Tensor G = target_weight.to(acc);
  const at::Tensor gb = has_bias ? target_bias->to(acc).contiguous() : at::Tensor();
  // Multiply by the cheaper side: the [rows, min(d_in, d_out)] product is what we reduce.
  const bool via_a = d_out <= d_in;
  const at::Tensor Gm = via_a ? G.t() : G;  // A @ G^T -> [rows, d_out]  or  D @ G -> [rows, d_in]
  const int64_t esz = at::elementSize(acc);

  // ---- dot (and, for 2-D inputs, the norms) over flattened rows (sample, token) --------------
  const at::Tensor A2 = inputs.reshape({n * t_len, d_in});
  const at::Tensor D2 = output_grads.reshape({n * t_len, d_out});
  const int64_t rows = n * t_len;
  at::Tensor pq = at::empty({rows}, opts), a2 = at::empty({rows}, opts), d2 = at::empty({rows}, opts);
  const int64_t blk = rows_per_block(d_in + d_out + std::min(d_in, d_out), esz);
  for (int64_t r0 = 0; r0 < rows; r0 += blk) {
    const int64_t r1 = std::min(rows, r0 + blk);
    at::Tensor Ab = A2.slice(0, r0, r1).to(acc).contiguous();
    at::Tensor Db = D2.slice(0, r0, r1).to(acc).contiguous();
    at::Tensor P = at::mm(via_a ? Ab : Db, Gm);  // contiguous [rows_b, w]
    at::Tensor pq_b = pq.slice(0, r0, r1), a2_b = a2.slice(0, r0, r1), d2_b = d2.slice(0, r0, r1);
    reduce(P, via_a ? Db : Ab, Ab, Db, gb, pq_b, a2_b, d2_b);
  }
  if (!seq) {
    dot.copy_(pq);
    sq.copy_(d2 * (a2 + (has_bias ? 1.0 : 0.0)));
    return {dot, sq};
  }
  dot.copy_(pq.view({n, t_len}).sum(1));

  // ---- sequences: |sum_t d_t a_t^T|^2 by the cheaper of the Gram and materialised forms --------
  const bool gram = 2 * t_len * t_len <= d_in * d_out;
  const int64_t per_sample = gram ? 2 * t_len * t_len : d_in * d_out;
  const int64_t sblk = rows_per_block(per_sample + t_len * (d_in + d_out), esz);
  for (int64_t s0 = 0; s0 < n; s0 += sblk) {
    const int64_t s1 = std::min(n, s0 + sblk);
    at::Tensor Ab = inputs.slice(0, s0, s1).to(acc);
    at::Tensor Db = output_grads.slice(0, s0, s1).to(acc);
    at::Tensor w2;
    if (gram) {
      w2 = (at::bmm(Ab, Ab.transpose(1, 2)) * at::bmm(Db, Db.transpose(1, 2))).sum({1, 2});
    } else {
      w2 = at::bmm(Db.transpose(1, 2), Ab).square().sum({1, 2});
    }
    if (has_bias) w2 = w2 + Db.sum(1).square().sum(1);
    sq.slice(0, s0, s1).copy_(w2);
  }
  return {dot, sq};
}

TORCH_LIBRARY_FRAGMENT(dvgs_fast, m) {
  m.def("linear_ghost_stats(Tensor inputs, Tensor output_grads, Tensor target_weight, Tensor? target_bias=None) "
        "-> (Tensor, Tensor)");
}

}  // namespace dvgs_fast
