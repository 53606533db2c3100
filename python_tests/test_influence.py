"""InfluenceFunction's solvers against exact solutions, in float64 on fresh random inputs.

* direct == the closed form on a linear model with MSE and on (multinomial) logistic
  regression, weight decay included; the scores' sign and fit() = the mean over the targets;
* CG == direct (relative 1e-6 at convergence); LiSSA within pyDVL's tolerance (0.3 relative
  on the top 10% of scores); Arnoldi at full rank == direct;
* K-FAC and EK-FAC == the exact Gauss-Newton = the Hessian on a single Linear layer under MSE
  (where they coincide);
* EK-FAC's corrected eigenvalues == brute-force per-sample gradients projected into the
  eigenbasis (Linear, sequence Linear, Conv1d, Conv2d, Embedding; empirical and exact GGN Fisher);
* DataInf == its formula from explicit per-sample gradients;
* the pairwise matrix == the per-query loop (fit() with one query), in blocks;
* ghost scoring == explicit per-sample gradients (conv, embedding, norm layers: direct solver
  against torch.func's Hessian);
* damping "auto" and the warnings for an indefinite damped Hessian.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dvgs_fast import grads
from dvgs_fast.grads import KroneckerFactors, fisher_factors, kfac_routes
from dvgs_fast.methods.influence import CurvatureWarning, InfluenceFunction
from dvgs_fast.methods.influence.direct import EXACT_AUTO_DAMPING

KW = dict(progress=False, seed=0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tiny models run fastest on one thread; two spin-wait each other on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cls_data(n=30, m=5, d=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(m, d, generator=g, dtype=torch.float64)
    return xs, torch.randint(0, k, (n,), generator=g), xq, torch.randint(0, k, (m,), generator=g)


def _linear(d, k, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d, k).double()


def _aug(x):
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)


def _attr(model, xs, ys, xq, yq, **kw):
    return np.asarray(InfluenceFunction(model, **{**KW, **kw}).attribute(xs, ys, xq, yq, dtype="float64"))


# ----------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("n,m,d,k", [(25, 4, 3, 2), (1, 1, 2, 1), (40, 6, 5, 3)])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_direct_equals_closed_form_linear_mse(n, m, d, k, wd):
    g = torch.Generator().manual_seed(n + d)
    xs, xq = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(m, d, generator=g, dtype=torch.float64)
    ys, yq = torch.randn(n, k, generator=g, dtype=torch.float64), torch.randn(m, k, generator=g, dtype=torch.float64)
    model = _linear(d, k)
    lam = 0.3
    # ℓ = (1/k)‖Wx + b − y‖²: H = (2/k) I_k ⊗ E[āāᵀ], g = (2/k) r ⊗ ā
    a_s, a_q = _aug(xs), _aug(xq)
    with torch.no_grad():
        r_s, r_q = model(xs) - ys, model(xq) - yq
    C = a_s.t() @ a_s / n
    inv = torch.linalg.inv(2 / k * C + (lam + wd) * torch.eye(d + 1, dtype=torch.float64))
    ref = (2 / k) ** 2 * (r_q @ r_s.t()) * (a_q @ inv @ a_s.t())
    got = _attr(model, xs, ys, xq, yq, loss="mse", solver="direct", damping=lam, weight_decay=wd)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-9, atol=1e-12)
    # K-FAC / EK-FAC with the exact Gauss-Newton: the same (MSE on one Linear layer: GN = H = A ⊗ S)
    for solver in ("kfac", "ekfac"):
        got = _attr(model, xs, ys, xq, yq, loss="mse", solver=solver, damping=lam + wd, fisher="ggn")
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("k", [2, 4])
def test_direct_equals_closed_form_logistic_regression(k):
    xs, ys, xq, yq = _cls_data(n=35, m=6, d=4, k=k, seed=k)
    model = _linear(4, k)
    lam, wd = 0.05, 0.01
    a_s, a_q = _aug(xs), _aug(xq)
    with torch.no_grad():
        p_s, p_q = torch.softmax(model(xs), 1), torch.softmax(model(xq), 1)
    g_s = ((p_s - F.one_hot(ys, k)).unsqueeze(2) * a_s.unsqueeze(1)).reshape(len(xs), -1)     # row-major [W|b]
    g_q = ((p_q - F.one_hot(yq, k)).unsqueeze(2) * a_q.unsqueeze(1)).reshape(len(xq), -1)
    H = sum(torch.kron(torch.diag(p) - torch.outer(p, p), torch.outer(a, a)) for p, a in zip(p_s, a_s)) / len(xs)
    ref = g_q @ torch.linalg.solve(H + (lam + wd) * torch.eye(H.shape[0], dtype=torch.float64), g_s.t())
    got = _attr(model, xs, ys, xq, yq, solver="direct", damping=lam, weight_decay=wd)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-9, atol=1e-12)
    # the sign: removing a training point with a positive score raises that query's loss
    fit = InfluenceFunction(model, solver="direct", damping=lam, weight_decay=wd, **KW).fit(xs, ys, xq, yq)
    np.testing.assert_allclose(fit.values, ref.numpy().mean(0), rtol=1e-9, atol=1e-12)
    assert fit.status == "completed" and fit.info["damping"] == lam and fit.info["positive_definite"]


def _mlp(seed=0, d=4, k=3, act=nn.Tanh):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 6), act(), nn.Linear(6, k)).double()


def _hessian_ref(model, xs, ys, xq, yq, lam, loss=None):
    """Explicit per-sample gradients and torch.func's Hessian of the mean loss."""
    loss = loss or (lambda o, y: F.cross_entropy(o, y, reduction="none"))
    names, params = zip(*[(n, p) for n, p in model.named_parameters()])
    sizes, shapes = [p.numel() for p in params], [p.shape for p in params]

    def per_sample(x, y):
        return torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss(model(x[i:i + 1]),
                                                                                        y[i:i + 1]).sum(), params)])
                            for i in range(len(x))])

    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def f(v):
        return loss(functional_call(model, dict(zip(names, [t.reshape(s) for t, s in zip(v.split(sizes), shapes)])),
                                    (xs,)), ys).mean()

    # Plain autograd (reverse over reverse): torch.func's hessian and jacrev(jacrev) give an
    # asymmetric, wrong Hessian for the Embedding + LayerNorm model in torch 2.13 (checked
    # against finite differences), this one matches them.
    H = torch.autograd.functional.hessian(f, flat)
    Gs, Gq = per_sample(xs, ys), per_sample(xq, yq)
    return Gq @ torch.linalg.solve(H + lam * torch.eye(len(flat), dtype=torch.float64), Gs.t()), H


# ----------------------------------------------------------------------------- iterative / low rank
def test_cg_lissa_arnoldi_against_direct(monkeypatch):
    xs, ys, xq, yq = _cls_data(n=40, m=7)
    model = _mlp()
    _, H = _hessian_ref(model, xs, ys, xq[:1], yq[:1], lam=0.0)
    lam = 0.2 - min(0.0, float(torch.linalg.eigvalsh(H)[0]))      # H + λI positive definite
    ref = _attr(model, xs, ys, xq, yq, solver="direct", damping=lam)
    from dvgs_fast.methods.influence import iterative
    for explicit in (True, False):                 # products by the explicit Hessian, or by HVPs
        monkeypatch.setattr(iterative, "EXPLICIT_SWITCH", 0.0)                       # at once, when allowed
        monkeypatch.setattr(iterative, "EXPLICIT_MAX_PARAMS", 10_000 if explicit else 0)
        res = InfluenceFunction(model, solver="cg", damping=lam, **KW).attribute(xs, ys, xq, yq, dtype="float64",
                                                                                query_batch_size=7)
        assert res.info["hessian"].startswith("explicit" if explicit else "Hessian-vector")
        assert np.abs(np.asarray(res) - ref).max() <= 1e-6 * np.abs(ref).max()
    lissa = _attr(model, xs, ys, xq, yq, solver="lissa", damping=lam, hessian_batch_size=20, max_iterations=400)
    top = np.abs(ref) >= np.quantile(np.abs(ref), 0.9)
    assert (np.abs(lissa - ref)[top] <= 0.3 * np.abs(ref)[top]).all()
    p = sum(q.numel() for q in model.parameters())
    arn = _attr(model, xs, ys, xq, yq, solver="arnoldi", damping=lam, rank=p)
    np.testing.assert_allclose(arn, ref, rtol=1e-7, atol=1e-9 * np.abs(ref).max())
    low = _attr(model, xs, ys, xq, yq, solver="arnoldi", damping=lam, rank=5)
    assert np.corrcoef(low.ravel(), ref.ravel())[0, 1] > 0.5          # the leading directions carry most of it


# ----------------------------------------------------------------------------- ghost scoring
class _Text(nn.Module):
    """Token ids come in as floats (the methods' inputs are float features) and are cast back."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 4, padding_idx=0)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(self.norm(self.emb(ids.long())).mean(1))


def _conv():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 9, 3)).double()


def _conv1d():
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv1d(2, 3, 2), nn.GroupNorm(1, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5, 3)).double()


def _inputs(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "img":
        return torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64)
    if kind == "sig":
        return torch.randn(n, 2, 6, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 9, (n, 5), generator=g)
    ids[:, 1] = ids[:, 0]
    return ids.double()


@pytest.mark.parametrize("make,kind", [(_conv, "img"), (_conv1d, "sig"), (lambda: _Text().double(), "ids")])
def test_ghost_scoring_equals_explicit_per_sample_gradients(make, kind):
    model = make()
    xs, xq = _inputs(kind, 14, 0), _inputs(kind, 4, 1)
    g = torch.Generator().manual_seed(3)
    ys, yq = torch.randint(0, 3, (14,), generator=g), torch.randint(0, 3, (4,), generator=g)
    ref, _ = _hessian_ref(model, xs, ys, xq, yq, lam=1.5)
    res = InfluenceFunction(model, solver="direct", damping=1.5, source_batch_size=5, **KW).attribute(
        xs, ys, xq, yq, dtype="float64", query_batch_size=3)
    np.testing.assert_allclose(np.asarray(res), ref.numpy(), rtol=1e-8, atol=1e-11)
    assert "reference" not in res.info["routes"].values()             # no per-sample gradient of the source


# ----------------------------------------------------------------------------- pairwise == loop
@pytest.mark.parametrize("solver", ["ekfac", "cg", "datainf", "arnoldi"])
def test_pairwise_matrix_equals_per_query_loop(solver):
    xs, ys, xq, yq = _cls_data(n=23, m=5)
    model = _mlp(seed=4)
    warnings.simplefilter("error", CurvatureWarning)                  # H + λI positive definite here
    kw = dict(solver=solver, damping=1.0, source_batch_size=6, rank=6, rtol=1e-12, **KW)
    kw["hessian_batch_size"] = 7 if solver in ("ekfac", "datainf") else 64     # block sums; HVPs in one block
    att = InfluenceFunction(model, **kw).attribute(xs, ys, xq, yq, dtype="float64", query_batch_size=2)
    for j in range(5):
        val = InfluenceFunction(model, **kw).fit(xs, ys, xq[j:j + 1], yq[j:j + 1])
        np.testing.assert_allclose(att.scores[j], val.values, rtol=1e-7, atol=1e-10)
    fit = InfluenceFunction(model, **kw).fit(xs, ys, xq, yq)             # fit() = the mean over the targets
    np.testing.assert_allclose(fit.values, np.asarray(att).mean(0), rtol=1e-7, atol=1e-10)


# ----------------------------------------------------------------------------- EK-FAC eigenvalues
class _Seq(nn.Module):
    """A Linear applied to every position of a sequence (rows > 1 per sample), then a head."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.out = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)).mean(1))


def _layer_grad_matrix(model, name, grad_dict):
    """A layer's per-sample gradient as [d_out, d_in(+1)] (Linear/conv) or [vocab, dim] (Embedding)."""
    m = dict(model.named_modules())[name]
    w = grad_dict[f"{name}.weight"]
    if isinstance(m, nn.Embedding):
        return w
    w = w.reshape(w.shape[0], -1)
    b = grad_dict.get(f"{name}.bias")
    return w if b is None else torch.cat([w, b.reshape(-1, 1)], 1)


def _pseudo_grads(model, x, y, fisher):
    """Per sample, the list of explicit pseudo-gradients {name: grad} (loss gradient, or J_iᵀ M_i columns)."""
    params = dict(model.named_parameters())
    out = []
    for i in range(len(x)):
        o = model(x[i:i + 1])
        if fisher == "empirical":
            vecs = [torch.autograd.grad(F.cross_entropy(o, y[i:i + 1]), o, retain_graph=True)[0]]
        else:
            p = torch.softmax(o.detach(), 1)[0]
            vecs = [(torch.sqrt(p[c]) * (F.one_hot(torch.tensor(c), len(p)).double() - p)).unsqueeze(0)
                    for c in range(len(p))]
        cols = []
        for v in vecs:
            gs = torch.autograd.grad(o, list(params.values()), grad_outputs=v, retain_graph=True, allow_unused=True)
            cols.append({n: (torch.zeros_like(params[n]) if t is None else t) for n, t in zip(params, gs)})
        out.append(cols)
    return out


@pytest.mark.parametrize("case", ["mlp", "seq", "conv2d", "conv1d", "text"])
@pytest.mark.parametrize("fisher", ["empirical", "ggn"])
def test_ekfac_eigenvalues_equal_brute_force_projections(case, fisher):
    g = torch.Generator().manual_seed(7)
    model, x = {"mlp": (_mlp(), torch.randn(9, 4, generator=g, dtype=torch.float64)),
                "seq": (_Seq().double(), torch.randn(9, 5, 3, generator=g, dtype=torch.float64)),
                "conv2d": (_conv(), _inputs("img", 9, 5)), "conv1d": (_conv1d(), _inputs("sig", 9, 5)),
                "text": (_Text().double(), _inputs("ids", 9, 5))}[case]
    y = torch.randint(0, 3, (9,), generator=g)
    model.eval()
    loss = grads.make_sample_loss("cross_entropy")
    sc = grads.FastScorer(model, [n for n, _ in model.named_parameters()], loss, "dot")
    routes, left = kfac_routes(sc)
    kf_scorer = grads.FastScorer(model, [n for r in routes for n in (r.weight, r.bias) if n], loss, "dot")
    kf = KroneckerFactors(torch.float64)
    blocks = [(0, 5), (4, 9)]                                   # two blocks, summed (row 4 in both)
    for a, b in blocks:
        kf.add_covariances(list(fisher_factors(kf_scorer, x[a:b], y[a:b], fisher, "cross_entropy")))
    kf.eigendecompose()
    for a, b in blocks:
        kf.add_lambda(list(fisher_factors(kf_scorer, x[a:b], y[a:b], fisher, "cross_entropy")))
    rows = [i for a, b in blocks for i in range(a, b)]
    pg = _pseudo_grads(model, x, y, fisher)
    for name, lay in kf.layers.items():
        lam = torch.zeros_like(lay.lam)
        for i in rows:
            for col in pg[i]:
                G = _layer_grad_matrix(model, name, col)
                proj = lay.QS.t() @ G @ lay.QA if lay.kind == "rows" else G @ lay.QS
                lam += proj ** 2
        torch.testing.assert_close(lay.ekfac_eigenvalues(), lam / len(rows), rtol=1e-9, atol=1e-13)
    assert set(left) == {n for n, _ in model.named_parameters()} - {n for r in routes for n in (r.weight, r.bias)}


def test_kfac_covariances_equal_explicit_outer_products():
    """A = mean ā āᵀ over rows, S = (1/N) Σ δδᵀ (K-FAC-expand), on a sequence Linear (L = 5 rows)."""
    g = torch.Generator().manual_seed(2)
    model, x = _Seq().double(), torch.randn(6, 5, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    sc = grads.FastScorer(model, ["inp.weight", "inp.bias"], grads.make_sample_loss("cross_entropy"), "dot")
    kf = KroneckerFactors(torch.float64)
    kf.add_covariances(list(fisher_factors(sc, x, y, "empirical", "cross_entropy")))
    A, S = kf.layers["inp"].covariances()
    a = _aug(x.reshape(-1, 3))
    torch.testing.assert_close(A, a.t() @ a / 30)
    h = model.inp(x)
    d = torch.autograd.grad(F.cross_entropy(model.out(torch.tanh(h).mean(1)), y, reduction="sum"), h)[0]
    d = d.reshape(-1, 4)
    torch.testing.assert_close(S, d.t() @ d / 6)


@pytest.mark.parametrize("block", [None, 1])
def test_kfac_covariances_of_a_conv_equal_explicit_patches(monkeypatch, block):
    """A conv (9 positions per sample, its factors channel-major views): A = mean ā āᵀ over the
    unfolded patches, S = (1/N) Σ δδᵀ over the positions, two blocks of samples summed (block=1:
    the covariance's own loop one sample at a time)."""
    from dvgs_fast.grads import curvature
    if block:
        monkeypatch.setattr(curvature, "_BLOCK", block)
    g = torch.Generator().manual_seed(6)
    model, x = _conv(), _inputs("img", 7, 3)
    y = torch.randint(0, 3, (7,), generator=g)
    sc = grads.FastScorer(model, ["0.weight", "0.bias"], grads.make_sample_loss("cross_entropy"), "dot")
    patches = _aug(F.unfold(x, 3).transpose(1, 2).reshape(-1, 9))                # [7·9, 10]
    h = model[0](x)
    d = torch.autograd.grad(F.cross_entropy(model[1:](h), y, reduction="sum"), h)[0]
    d = d.reshape(7, 2, 9).transpose(1, 2).reshape(-1, 2)
    kf = KroneckerFactors(torch.float64)
    for a, b in ((0, 3), (3, 7)):
        kf.add_covariances(list(fisher_factors(sc, x[a:b], y[a:b], "empirical", "cross_entropy")))
    A, S = kf.layers["0"].covariances()
    torch.testing.assert_close(A, patches.t() @ patches / 63, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(S, d.t() @ d / 7, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- DataInf
@pytest.mark.parametrize("arch,route", [("mlp", "formed"), ("mlp", "per_query"), ("mlp", "gram"), ("conv", "formed"),
                                        ("conv", "gram")])
def test_datainf_equals_its_formula(arch, route, monkeypatch):
    """(conv: several rows per sample, the weighted sum formed from per-sample gradients; the MLP
    both ways: from per-sample gradients, and by one GEMM per query block, the route of layers
    too wide to form gradients for many samples at once; "gram": the scores on the Hessian's own
    rows by per-layer Grams, datainf_gram.py, 4 uneven blocks of rows)"""
    from dvgs_fast.methods.influence import datainf
    monkeypatch.setattr(datainf, "cheaper", lambda *a: route == "gram")
    if route == "per_query":
        monkeypatch.setattr(datainf, "_MIN_SAMPLES", 1 << 40)
    xs, ys, xq, yq = _cls_data(n=17, m=4)
    if arch == "conv":
        xs, xq = _inputs("img", 17, 11), _inputs("img", 4, 12)
    model = _mlp(seed=2) if arch == "mlp" else _conv()
    params = list(model.named_parameters())
    layers = [["0.weight", "0.bias"], ["2.weight", "2.bias"]] if arch == "mlp" else \
        [["0.weight", "0.bias"], ["3.weight", "3.bias"]]

    def per(x, y):
        out = []
        for i in range(len(x)):
            gs = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), [p for _, p in params])
            d = {n: t.reshape(-1) for (n, _), t in zip(params, gs)}
            out.append([torch.cat([d[n] for n in names]) for names in layers])
        return out

    gs, gq = per(xs, ys), per(xq, yq)
    ref = np.zeros((4, 17))
    lams = [0.1 * sum(float(g[l] @ g[l]) for g in gs) / (17 * gs[0][l].numel()) for l in range(2)]
    for j in range(4):
        for i in range(17):
            tot = 0.0
            for l in range(2):
                v = gq[j][l] - sum(float(g[l] @ gq[j][l]) / (lams[l] + float(g[l] @ g[l])) * g[l] for g in gs) / 17
                tot += float(gs[i][l] @ v) / lams[l]
            ref[j, i] = tot
    got = InfluenceFunction(model, solver="datainf", hessian_batch_size=5, **KW).attribute(xs, ys, xq, yq,
                                                                                          dtype="float64")
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-9, atol=1e-12)
    assert got.info["damping"] == pytest.approx({"0": lams[0], layers[1][0][0]: lams[1]}, rel=1e-12)
    assert ("scoring" in got.info) == (route == "gram")


@pytest.mark.parametrize("make,kind,grad_params", [(lambda: _Text().double(), "ids", None),
                                                   (lambda: _mlp(seed=3), "mlp", ["0.bias", "2"]),
                                                   (_conv1d, "sig", None)])
def test_datainf_gram_route_equals_formed(make, kind, grad_params, monkeypatch):
    """Token layers, a bias without its weight, dense (GroupNorm) parameters, query blocks of
    uneven size: the Gram route's scores == the formed route's."""
    from dvgs_fast.methods.influence import datainf
    if kind == "mlp":
        xs, ys, xq, yq = _cls_data(n=19, m=5)
    else:
        xs, xq = _inputs(kind, 19, 30), _inputs(kind, 5, 31)
        g = torch.Generator().manual_seed(32)
        ys, yq = torch.randint(0, 3, (19,), generator=g), torch.randint(0, 3, (5,), generator=g)
    out = {}
    for gram in (True, False):
        monkeypatch.setattr(datainf, "cheaper", lambda *a, gram=gram: gram)
        att = InfluenceFunction(make(), solver="datainf", hessian_batch_size=6, source_batch_size=4,
                                grad_params=grad_params, **KW).attribute(xs, ys, xq, yq, query_batch_size=3,
                                                                         dtype="float64")
        assert ("scoring" in att.info) == gram
        out[gram] = np.asarray(att)
    np.testing.assert_allclose(out[True], out[False], rtol=1e-9, atol=1e-12)
    assert np.abs(out[False]).max() > 1e-3


def test_datainf_gram_route_chosen_by_cost():
    """A wide Linear layer and few rows: the Gram route (attribute() only); a sample of the rows
    as the Hessian's data or fit()'s single query: the formed route."""
    g = torch.Generator().manual_seed(0)
    xs, xq = torch.randn(40, 30, generator=g, dtype=torch.float64), torch.randn(6, 30, generator=g, dtype=torch.float64)
    ys, yq = torch.randint(0, 3, (40,), generator=g), torch.randint(0, 3, (6,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 3)).double()
    att = InfluenceFunction(model, solver="datainf", **KW).attribute(xs, ys, xq, yq, dtype="float64")
    assert "scoring" in att.info
    sub = InfluenceFunction(model, solver="datainf", hessian_samples=30, **KW).attribute(xs, ys, xq, yq)
    assert "scoring" not in sub.info
    assert "scoring" not in InfluenceFunction(model, solver="datainf", **KW).fit(xs, ys, xq, yq).info


@pytest.mark.parametrize("solver,fisher", [("datainf", None), ("ekfac", "empirical"), ("ekfac", "sampled"),
                                           ("kfac", "empirical")])
@pytest.mark.parametrize("source_batch", [4, 1000])
def test_recordings_kept_between_passes(monkeypatch, solver, fisher, source_batch):
    """Later passes over the same rows take the first pass's recordings (problem.KEEP_BYTES)
    instead of recording them again -- DataInf's query-block passes, EK-FAC's second pass, and
    the scoring of the source when it is the Hessian's data in the same blocks (source_batch 4)
    and the fit recorded loss gradients (DataInf, the empirical Fisher): the same scores as with
    nothing kept (KEEP_BYTES = 0), and one recording fewer per block and pass saved."""
    from dvgs_fast.methods.influence import problem
    xs, xq = _inputs("img", 13, 21), _inputs("img", 5, 22)
    g = torch.Generator().manual_seed(23)
    ys, yq = torch.randint(0, 3, (13,), generator=g), torch.randint(0, 3, (5,), generator=g)
    calls = []
    real = grads.FastScorer.record
    monkeypatch.setattr(grads.FastScorer, "record", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    real_ff = grads.fisher_factors
    monkeypatch.setattr(grads, "fisher_factors", lambda *a, **k: calls.append(1) or real_ff(*a, **k))
    from dvgs_fast.methods.influence import datainf
    monkeypatch.setattr(datainf, "cheaper", lambda *a: False)       # DataInf's formed route: it scores the source
    kw = dict(KW, solver=solver, hessian_batch_size=4, source_batch_size=source_batch,
              **({"fisher": fisher} if fisher else {}))
    out = {}
    for keep in (True, False):
        monkeypatch.setattr(problem, "KEEP_BYTES", 512 << 20 if keep else 0)
        calls.clear()
        att = InfluenceFunction(_conv(), **kw).attribute(xs, ys, xq, yq, query_batch_size=3, dtype="float64")
        out[keep] = (np.asarray(att), len(calls))
    np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-12, atol=1e-15)
    # 4 Hessian blocks: DataInf passes again per query block (2), EK-FAC once more
    saved = {"datainf": 4 * 2, "ekfac": 4, "kfac": 0}[solver]
    if source_batch == 4 and fisher != "sampled":
        saved += 4                                             # scoring on the fit's recordings
    assert out[False][1] - out[True][1] == saved


# ----------------------------------------------------------------------------- damping and warnings
def test_auto_damping_rules_and_indefinite_warnings():
    xs, ys, xq, yq = _cls_data(n=30, m=3)
    model = _mlp(seed=5)
    _, H = _hessian_ref(model, xs, ys, xq, yq, lam=0.0)
    ev = torch.linalg.eigvalsh(H)
    assert ev[0] < 0                                   # an untrained tanh MLP: indefinite
    res = InfluenceFunction(model, solver="direct", **KW).fit(xs, ys, xq, yq)
    assert res.info["damping"] == pytest.approx(EXACT_AUTO_DAMPING * float(ev[-1]), rel=1e-6)
    cg = InfluenceFunction(model, solver="cg", **KW).fit(xs, ys, xq, yq)
    assert cg.info["damping"] == pytest.approx(res.info["damping"], rel=2e-2)      # λ_max by Lanczos, ~1%
    lam = -float(ev[0]) / 2                            # below |λ_min|: H + λI indefinite
    with pytest.warns(CurvatureWarning, match="not positive definite"):
        d = InfluenceFunction(model, solver="direct", damping=lam, **KW).fit(xs, ys, xq, yq)
    assert d.info["positive_definite"] is False and np.isfinite(d.values).all()
    ref, _ = _hessian_ref(model, xs, ys, xq, yq, lam=lam)          # the indefinite system, solved exactly
    att = InfluenceFunction(model, solver="direct", damping=lam, **KW)
    with pytest.warns(CurvatureWarning, match="LDL"):
        got = np.asarray(att.attribute(xs, ys, xq, yq, dtype="float64"))
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-7, atol=1e-10 * np.abs(ref.numpy()).max())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        InfluenceFunction(model, solver="cg", damping=lam, **KW).attribute(xs, ys, xs, ys)
    assert any("negative curvature" in str(w.message) for w in caught if issubclass(w.category, CurvatureWarning))
    ek = InfluenceFunction(model, solver="ekfac", **KW).fit(xs, ys, xq, yq)
    assert set(ek.info["damping"]) == {"0", "2"} and all(v > 0 for v in ek.info["damping"].values())


@pytest.mark.parametrize("n", [300, 700])
def test_dense_extreme_eigenvalues_of_large_matrices(n):
    """Above 256 rows the direct solver's λ_max (damping) and λ_min (the warning) come from
    Lanczos on the explicit matrix: == eigvalsh to its 1e-3 tolerance, for an indefinite spectrum
    with a cluster near zero (an MLP Hessian's shape)."""
    from dvgs_fast.methods.influence.hvp import dense_bottom_eigenvalue, dense_top_eigenvalue
    g = torch.Generator().manual_seed(n)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = torch.cat([torch.tensor([-0.08, -0.05, 4.3, 2.0], dtype=torch.float64),
                    torch.rand(n - 4, generator=g, dtype=torch.float64) * 0.02 - 0.005])
    H = (Q * ev) @ Q.t()
    H = 0.5 * (H + H.t())
    assert dense_top_eigenvalue(H) == pytest.approx(4.3, rel=1e-3)
    assert dense_bottom_eigenvalue(H) == pytest.approx(-0.08, rel=1e-3)


def test_float32_and_hessian_subset():
    xs, ys, xq, yq = _cls_data(n=30, m=4)
    model = _mlp(seed=6)
    ref = _attr(model, xs, ys, xq, yq, solver="ekfac")
    f32 = InfluenceFunction(model.float(), solver="ekfac", dtype="float32", **KW).attribute(
        xs.float(), ys, xq.float(), yq)
    np.testing.assert_allclose(np.asarray(f32), ref, rtol=2e-3, atol=1e-4 * np.abs(ref).max())
    model.double()
    sub = InfluenceFunction(model, solver="direct", damping=0.1, hessian_samples=12, **KW)
    got = sub.attribute(xs, ys, xq, yq, dtype="float64")
    rows = got.info["n_hessian"]
    assert rows == 12
    # the same rows as a source of their own: the direct solution on that subset
    from dvgs_fast.methods.base import derive_seed
    pick = torch.randperm(30, generator=torch.Generator().manual_seed(derive_seed(0, 2901)))[:12].sort().values
    ref_sub, _ = _hessian_ref(model, xs[pick], ys[pick], xq, yq, lam=0.1)
    np.testing.assert_allclose(np.asarray(got)[:, pick.numpy()], ref_sub.numpy(), rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("p,q", [(30, 1), (40, 7), (25, 40), (1, 3)])
def test_block_cg_solves_spd_systems_and_detects_negative_curvature(p, q):
    from dvgs_fast.methods.influence.iterative import block_cg
    g = torch.Generator().manual_seed(p + q)
    M = torch.randn(p, p, generator=g, dtype=torch.float64)
    A = M @ M.t() / p + 0.05 * torch.eye(p, dtype=torch.float64)
    B = torch.randn(p, q, generator=g, dtype=torch.float64)
    B[:, 0] = 0.0                                               # a zero right-hand side stays zero
    X, it, rel, neg = block_cg(lambda P: A @ P, B, 1e-10, 10 * p)
    torch.testing.assert_close(X, torch.linalg.solve(A, B), rtol=1e-7, atol=1e-9)
    assert rel <= 1e-10 and not neg and it <= p
    if p > 1:
        A[0, 0] = -5.0                                          # indefinite
        _, _, _, neg = block_cg(lambda P: A @ P, torch.randn(p, q, generator=g, dtype=torch.float64), 1e-10, 10 * p)
        assert neg
