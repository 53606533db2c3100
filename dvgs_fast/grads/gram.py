"""Inner products of per-sample gradients in factored form (factors.py), never forming them
where a cheaper exact form exists.

* ``cross_gram(F, H) -> [n_F, n_H]``: ⟨g_i, h_j⟩ for every pair (pairwise attribution: TracIn,
  grad-dot, influence with a preconditioned query side);
* ``sqnorms(F) -> [n]``: ‖g_i‖² (grad-cosine);
* ``batch_dots(F, V) -> [n, Q]``: ⟨g_i, V_q⟩ against Q explicit gradient-shaped tensors
  (V: {parameter name: [Q, *shape]}) -- a preconditioned query gradient, a target gradient per query.

Per layer, the forms and their costs (n, m samples of L, L' rows; d_in, d_out the layer's widths):

* Linear / conv, one row per sample: (A_F A_Hᵀ [+1 for the bias]) ⊙ (D_F D_Hᵀ), summed over
  nothing -- n·m·(d_in + d_out) multiply-adds, no d_in × d_out tensor ever;
* several rows per sample: the same products over rows, summed per (sample, sample) block,
  n·L·m·L'·(d_in + d_out); or the per-sample gradients formed (n·L + m·L')·d_in·d_out plus a GEMM
  n·m·d_in·d_out -- whichever is fewer (``_pairwise_cheaper``; for batch_dots
  ``_batch_explicit_cheaper``);
* Embedding: Σ_{t,s} [id_t = id'_s] (δ_t·δ'_s) over the two samples' tokens;
* dense parameters: G_F G_Hᵀ.

All products accumulate in float64 when either side is float64, else float32.
"""
from __future__ import annotations

import torch

from dvgs_fast.grads.factors import RowFactors, SampleFactors, TokenFactors

# Elements of the largest temporary a block of products may take (rows × rows of two layers'
# factors, or rows × Q × d_out for batch_dots).
_BLOCK = 1 << 23


def _acc(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _pairwise_cheaper(n: int, lf: int, m: int, lh: int, d_in: int, d_out: int) -> bool:
    pair = n * lf * m * lh * (d_in + d_out + 1)
    mat = (n * lf + m * lh) * d_in * d_out + n * m * d_in * d_out
    return pair <= mat


def _rows_gram(f: RowFactors, h: RowFactors) -> torch.Tensor:
    acc = _acc(f.d3(), h.d3())
    n, m = f.n, h.n
    bias = f.bias is not None and h.bias is not None
    weight = f.weight is not None and h.weight is not None
    d_in, d_out = f.d_in, f.d_out
    if f.rows == 1 and h.rows == 1:
        dd = f.d.to(acc) @ h.d.to(acc).t()
        if not weight:
            return dd
        fa, ha = f.a.to(acc), h.a.to(acc)
        aa = torch.addmm(torch.ones((), dtype=acc, device=fa.device), fa, ha.t()) if bias else fa @ ha.t()
        return aa.mul_(dd)
    if _pairwise_cheaper(n, f.rows, m, h.rows, d_in, d_out):
        out = torch.empty(n, m, dtype=acc, device=f.a.device)
        step = max(1, _BLOCK // max(1, h.a.shape[0] * f.rows)) * f.rows     # whole samples of F per block
        for s in range(0, f.a.shape[0], step):
            a, d = f.a[s:s + step].to(acc), f.d[s:s + step].to(acc)
            prod = d @ h.d.to(acc).t()
            if weight:
                aa = a @ h.a.to(acc).t()
                prod = (aa.add_(1.0) if bias else aa).mul_(prod)
            k = a.shape[0] // f.rows
            out[s // f.rows:s // f.rows + k] = prod.view(k, f.rows, m, h.rows).sum((1, 3))
        return out
    out = torch.zeros(n, m, dtype=acc, device=f.device())
    if weight:
        out += (f.weight_grads(shared=True).to(acc).reshape(n, -1)
                @ h.weight_grads(shared=True).to(acc).reshape(m, -1).t())
    if bias:
        out += f.bias_grads().to(acc) @ h.bias_grads().to(acc).t()
    return out


def _tokens_gram(f: TokenFactors, h: TokenFactors) -> torch.Tensor:
    acc = _acc(f.d, h.d)
    n, t = f.ids.shape
    m, t2 = h.ids.shape
    dim = f.d.shape[-1]
    hd = h.d.to(acc).reshape(m * t2, dim)
    hid = h.ids.reshape(m * t2)
    out = torch.empty(n, m, dtype=acc, device=f.d.device)
    step = max(1, _BLOCK // max(1, m * t2 * t))
    for s in range(0, n, step):
        fd = f.d[s:s + step].to(acc).reshape(-1, dim)
        same = f.ids[s:s + step].reshape(-1, 1) == hid.reshape(1, -1)
        k = fd.shape[0] // t
        out[s:s + k] = ((fd @ hd.t()) * same).view(k, t, m, t2).sum((1, 3))
    return out


def _match(f: SampleFactors, h: SampleFactors):
    """Pair each layer of F with the same layer of H; a layer in one set only (a call that could
    not be split on one side) makes both sides fall back to dense gradients for it."""
    hr = {x.name: x for x in h.rows}
    ht = {x.name: x for x in h.tokens}
    fr = {x.name: x for x in f.rows}
    ft = {x.name: x for x in f.tokens}
    if set(hr) != set(fr) or set(ht) != set(ft) or \
            (f.dense.names if f.dense else []) != (h.dense.names if h.dense else []):
        raise ValueError("the two sets of per-sample gradients were recorded with different routes (a layer's "
                         "call could be split by sample on one side only); record both with the same model "
                         "and input shapes")
    return [(fr[k], hr[k]) for k in fr], [(ft[k], ht[k]) for k in ft]


def cross_gram(f: SampleFactors, h: SampleFactors, per_layer: dict | None = None) -> torch.Tensor:
    """[n_F, n_H]: ⟨g_i, h_j⟩ over every selected parameter. per_layer: filled with each
    layer's share (and "<dense>")."""
    rows, toks = _match(f, h)
    acc = torch.float64 if torch.float64 in (f.dtype, h.dtype) else torch.float32
    device = next((x.device() for x in f.rows), None) or next((x.d.device for x in f.tokens), None) \
        or (f.dense.g.device if f.dense is not None else torch.device("cpu"))
    out = None
    parts = [(a.name, lambda a=a, b=b: _rows_gram(a, b)) for a, b in rows]
    parts += [(a.name, lambda a=a, b=b: _tokens_gram(a, b)) for a, b in toks]
    if f.dense is not None:
        parts.append(("<dense>", lambda: f.dense.g.to(acc) @ h.dense.g.to(acc).t()))
    for name, term in parts:
        g = term().to(acc)
        if per_layer is not None:
            per_layer[name] = g
        out = (g.clone() if per_layer is not None else g) if out is None else out.add_(g)
    return torch.zeros(f.n, h.n, dtype=acc, device=device) if out is None else out


def sqnorms(f: SampleFactors) -> torch.Tensor:
    """[n]: ‖g_i‖² over every selected parameter (the diagonal of cross_gram(F, F), without the
    off-diagonal work)."""
    acc = f.dtype
    terms: list[torch.Tensor] = []
    add = terms.append
    for x in f.rows:
        n = x.n
        bias = x.bias is not None
        if x.rows == 1:
            dn = x.d.to(acc).square().sum(1)
            if x.weight is None:
                add(dn)                                  # bias only: ‖δ‖²
            else:
                an = x.a.to(acc).square().sum(1)
                add(dn * (an + 1.0) if bias else dn * an)
        else:
            d = x.d3().to(acc)
            d_in, d_out = x.d_in, x.d_out
            if x.weight is not None and _sqnorm_explicit_cheaper(x.rows, d_in, d_out):
                # a conv layer's many positions: form the gradients (kept for the batch's other uses)
                wn = x.weight_grads(shared=True).to(acc).square().sum((1, 2))
                add(wn + d.sum(1).square().sum(1) if bias else wn)
            elif x.weight is not None:
                a = x.a3().to(acc)
                aa = torch.bmm(a, a.transpose(1, 2))
                if bias:
                    aa = aa + 1.0
                add((aa * torch.bmm(d, d.transpose(1, 2))).sum((1, 2)))
            elif bias:
                add(d.sum(1).square().sum(1))
    for x in f.tokens:
        n, t = x.ids.shape
        d = x.d.to(acc)
        same = (x.ids.unsqueeze(2) == x.ids.unsqueeze(1)).to(acc)
        add((torch.bmm(d, d.transpose(1, 2)) * same).sum((1, 2)))
    if f.dense is not None:
        add(f.dense.g.to(acc).square().sum(1))
    return sum(terms) if terms else torch.zeros(f.n, dtype=acc)


def _sqnorm_explicit_cheaper(rows: int, d_in: int, d_out: int) -> bool:
    """‖g_i‖² of a sample with several rows: the row Gram costs L²·(d_in + d_out + 1) per sample,
    forming the gradient L·d_in·d_out."""
    return rows * (d_in + d_out + 1) > d_in * d_out


def _batch_explicit_cheaper(rows: int, q: int, d_in: int, d_out: int) -> bool:
    """Per sample, batch_dots' ghost form costs rows·Q·d_out·(d_in + 1) multiply-adds; forming the
    sample's gradient (rows·d_out·d_in) and taking Q dots with it (Q·d_out·d_in) is cheaper as soon
    as a sample has several rows (a conv layer's positions): on the digits CNN (1,000 x 32x32
    samples, 300 queries) the ghost form took 17.7 CPU s of EK-FAC's 100-query run. With one row
    per sample it is cheaper once Q > d_in, and more so than the count says: the ghost form's
    [rows, Q, d_out] product is a memory-bound pass (digits MLP 64-64-10, 1,000 samples, 1 thread:
    300 queries 50 ms explicit against 162 ms ghost; 32 queries 9.5 against 7.4 ms)."""
    return rows * q * d_out * (d_in + 1) > (rows + q) * d_out * d_in


def _explicit_dots(x: RowFactors, w: torch.Tensor, n: int, acc: torch.dtype) -> torch.Tensor:
    """[n, Q]: the per-sample weight gradients δᵢᵀ aᵢ (kept by the factors, or formed a block of
    samples at a time, at most _BLOCK elements), then one GEMM against the Q flattened weights
    w [Q, d_out, d_in]."""
    q = w.shape[0]
    wf = w.reshape(q, -1).t()                                             # [d_out·d_in, Q]
    out = torch.empty(n, q, dtype=acc, device=w.device)
    for s, g in x.weight_grad_blocks(_BLOCK):
        out[s:s + g.shape[0]] = g.to(acc).reshape(g.shape[0], -1) @ wf
    return out


def batch_dots(f: SampleFactors, V: dict[str, torch.Tensor]) -> torch.Tensor:
    """[n, Q]: ⟨g_i, V_q⟩ with V = {parameter name: [Q, *parameter shape]} covering every selected
    parameter (a missing name counts as zero)."""
    q = next(iter(V.values())).shape[0]
    acc = f.dtype if all(v.dtype != torch.float64 for v in V.values()) else torch.float64
    terms: list[torch.Tensor] = []
    add = terms.append

    for x in f.rows:
        n = x.n
        if x.weight is not None and x.weight in V:
            w = V[x.weight].to(acc).reshape(q, x.d_out, -1)               # [Q, d_out, d_in]
            d_out, d_in = w.shape[1], w.shape[2]
            if _batch_explicit_cheaper(x.rows, q, d_in, d_out):
                add(_explicit_dots(x, w, n, acc))
                if x.bias is not None and x.bias in V:
                    add(x.bias_grads().to(acc) @ V[x.bias].to(acc).reshape(q, -1).t())
                continue
            wt = w.reshape(q * d_out, d_in).t()
            r = torch.empty(x.a.shape[0], q, dtype=acc, device=x.a.device)
            step = max(1, _BLOCK // max(1, q * d_out))
            for s in range(0, x.a.shape[0], step):
                t = (x.a[s:s + step].to(acc) @ wt).view(-1, q, d_out)      # [rows, Q, d_out]
                r[s:s + step] = (t * x.d[s:s + step].to(acc).unsqueeze(1)).sum(2)
            add(r if x.rows == 1 else r.view(n, x.rows, q).sum(1))
        if x.bias is not None and x.bias in V:
            add(x.bias_grads().to(acc) @ V[x.bias].to(acc).reshape(q, -1).t())
    for x in f.tokens:
        if x.weight in V:
            w = V[x.weight].to(acc)                                          # [Q, vocab, dim]
            g = w[:, x.ids.reshape(-1)]                                      # [Q, n·T, dim]
            n, t = x.ids.shape
            add((g * x.d.to(acc).reshape(1, n * t, -1)).sum(2).t().reshape(n, t, q).sum(1))
    if f.dense is not None:
        cols = [V[nm].to(acc).reshape(q, -1) if nm in V else torch.zeros(q, sz, dtype=acc, device=f.dense.g.device)
                for nm, sz in zip(f.dense.names, f.dense.sizes)]
        add(f.dense.g.to(acc) @ torch.cat(cols, 1).t())
    return sum(terms) if terms else torch.zeros(f.n, q, dtype=acc)


__all__ = ["batch_dots", "cross_gram", "sqnorms"]
