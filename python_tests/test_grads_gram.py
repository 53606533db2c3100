"""The engine's factored per-sample gradients and their algebra (grads/factors.py, grads/gram.py)
against explicit float64 per-sample gradients (one autograd call per sample):
cross_gram == G_F G_Hᵀ, sqnorms == ‖g_i‖², batch_dots == G_F Vᵀ, per layer type, with shared
layers, sequences, conv, embedding (padding, repeated ids), norms, generic layers, parameter
subsets, N = 1 and a non-contiguous input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dvgs_fast import grads


class _Shared(nn.Module):
    """One Linear called twice (weight sharing) on a [N, T, d] sequence."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.mid(h)) + self.mid(h * 0.5)
        return self.out(h.mean(1))


class _Text(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 5, padding_idx=0)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, ids):
        return self.head(self.norm(self.emb(ids)).mean(1))


class _Scale(nn.Module):
    """A leaf layer with no ghost route (per_layer_func)."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.s


def _models():
    torch.manual_seed(0)
    return {
        "mlp": (nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), "tab"),
        "mlp_nobias_norm": (nn.Sequential(nn.Linear(5, 7, bias=False), nn.LayerNorm(7), nn.Mish(),
                                          _Scale(7), nn.Linear(7, 3)), "tab"),
        "shared_seq": (_Shared(), "seq"),
        "conv1d": (nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * 8, 3)), "sig"),
        "conv2d": (nn.Sequential(nn.Conv2d(1, 3, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 9, 3)), "img"),
        "text": (_Text(), "ids"),
    }


def _per_parameter(model, names, G):
    """{name: [Q, *shape]}: flat gradient rows G [Q, p] split per parameter (batch_dots' V)."""
    params = dict(model.named_parameters())
    sizes = [params[nm].numel() for nm in names]
    return {nm: t.reshape(G.shape[0], *params[nm].shape) for nm, t in zip(names, G.split(sizes, 1))}


def _inputs(kind, n, g):
    if kind == "tab":
        return torch.randn(n, 5, generator=g, dtype=torch.float64)
    if kind == "seq":
        return torch.randn(n, 3, 4, generator=g, dtype=torch.float64)
    if kind == "sig":
        return torch.randn(n, 2, 8, generator=g, dtype=torch.float64)
    if kind == "img":
        return torch.randn(n, 1, 7, 7, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 11, (n, 6), generator=g)
    ids[:, 0] = ids[:, 1]                    # repeated ids within a sample
    ids[0, -1] = 0                           # padding
    return ids


def _loss(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _explicit(model, names, x, y):
    params = dict(model.named_parameters())
    rows = []
    for i in range(x.shape[0]):
        g = torch.autograd.grad(_loss(model(x[i:i + 1]), y[i:i + 1]).sum(), [params[n] for n in names])
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows)


def _factors(model, names, x, y):
    sc = grads.FastScorer(model, names, _loss, "dot")
    return sc.record(x, y).factors()


@pytest.mark.parametrize("name", list(_models()))
@pytest.mark.parametrize("n,m", [(6, 4), (1, 3)])
def test_cross_gram_sqnorms_batch_dots_equal_explicit(name, n, m):
    model, kind = _models()[name]
    model = model.double()
    g = torch.Generator().manual_seed(n * 10 + m)
    x, xq = _inputs(kind, n, g), _inputs(kind, m, g)
    y, yq = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (m,), generator=g)
    names = [nm for nm, _ in model.named_parameters()]
    Gs, Gq = _explicit(model, names, x, y), _explicit(model, names, xq, yq)
    fs, fq = _factors(model, names, x, y), _factors(model, names, xq, yq)
    torch.testing.assert_close(grads.cross_gram(fs, fq), Gs @ Gq.t(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads.sqnorms(fs), Gs.square().sum(1), rtol=1e-10, atol=1e-12)
    V = _per_parameter(model, names, Gq)
    torch.testing.assert_close(grads.batch_dots(fs, V), Gs @ Gq.t(), rtol=1e-10, atol=1e-12)
    assert abs(float((Gs @ Gq.t()).abs().max())) > 1e-6      # not trivially zero


@pytest.mark.parametrize("name", ["shared_seq", "conv1d", "conv2d", "mlp"])
@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("m", [1, 5])
def test_batch_dots_both_multirow_forms(name, explicit, m, monkeypatch):
    """batch_dots' and sqnorms' ghost forms and their per-sample-gradient forms (chosen by cost,
    forced here) all == explicit gradients: layers with several rows per sample, and one row
    (the MLP: batch_dots takes the explicit form there too once Q > d_in)."""
    from dvgs_fast.grads import gram
    monkeypatch.setattr(gram, "_batch_explicit_cheaper", lambda *a: explicit)
    monkeypatch.setattr(gram, "_sqnorm_explicit_cheaper", lambda *a: explicit)
    model, kind = _models()[name]
    model = model.double()
    g = torch.Generator().manual_seed(7 + m)
    x, xq = _inputs(kind, 9, g), _inputs(kind, m, g)
    y, yq = torch.randint(0, 3, (9,), generator=g), torch.randint(0, 3, (m,), generator=g)
    names = [nm for nm, _ in model.named_parameters()]
    Gs, Gq = _explicit(model, names, x, y), _explicit(model, names, xq, yq)
    fs = _factors(model, names, x, y)
    assert any(r.rows > 1 for r in fs.rows) == (name != "mlp")
    V = _per_parameter(model, names, Gq)
    torch.testing.assert_close(grads.batch_dots(fs, V), Gs @ Gq.t(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads.sqnorms(fs), Gs.square().sum(1), rtol=1e-10, atol=1e-12)
    assert float((Gs @ Gq.t()).abs().max()) > 1e-6


def test_routes_taken_by_factors():
    model = _models()["text"][0].double()
    g = torch.Generator().manual_seed(1)
    x = _inputs("ids", 4, g)
    f = _factors(model, [n for n, _ in model.named_parameters()], x, torch.randint(0, 3, (4,), generator=g))
    assert [t.name for t in f.tokens] == ["emb"] and [r.name for r in f.rows] == ["head"]
    assert f.dense.names == ["norm.weight", "norm.bias"]      # norm affines from their reductions, no vmap


def test_parameter_subset_and_float32_and_noncontiguous():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 9, generator=g)[:, ::2][:, :5]          # non-contiguous rows
    assert not x.is_contiguous()
    y = torch.randint(0, 3, (5,), generator=g)
    names = ["2.weight", "0.bias"]
    G = _explicit(model.double(), names, x.double(), y)
    model = model.float()
    f = _factors(model, names, x, y)
    assert f.dtype == torch.float32
    torch.testing.assert_close(grads.cross_gram(f, f).double(), G @ G.t(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grads.sqnorms(f).double(), G.square().sum(1), rtol=2e-5, atol=1e-6)


def test_pairwise_and_materialised_forms_agree_on_long_sequences(monkeypatch):
    """The cost rule picks either form for a multi-row layer; both must give the same numbers."""
    from dvgs_fast.grads import gram
    model = _models()["shared_seq"][0].double()
    g = torch.Generator().manual_seed(5)
    x, y = _inputs("seq", 5, g), torch.randint(0, 3, (5,), generator=g)
    names = [nm for nm, _ in model.named_parameters()]
    f = _factors(model, names, x, y)
    monkeypatch.setattr(gram, "_pairwise_cheaper", lambda *a: True)
    a = grads.cross_gram(f, f)
    monkeypatch.setattr(gram, "_pairwise_cheaper", lambda *a: False)
    b = grads.cross_gram(f, f)
    monkeypatch.setattr(gram, "_BLOCK", 7)                     # many small blocks
    monkeypatch.setattr(gram, "_pairwise_cheaper", lambda *a: True)
    c = grads.cross_gram(f, f)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n,rows,d_in,d_out", [(5, 6, 3, 2), (4, 2, 8, 9), (1, 3, 2, 2), (0, 4, 3, 2)])
def test_row_factors_per_sample_form(n, rows, d_in, d_out):
    """RowFactors given per sample ([n, rows, width], here channel-major views as a conv's unfold
    gives them) == given flat: the flat a / d, the per-sample gradients kept (rows·(d_in + d_out)
    ≥ d_in·d_out) or formed in blocks, bias gradients, and the shared / own-copy contract."""
    g = torch.Generator().manual_seed(n * 100 + rows)
    a_cm = torch.randn(n, d_in, rows, generator=g, dtype=torch.float64)        # channel-major, as unfold
    d_cm = torch.randn(n, d_out, rows, generator=g, dtype=torch.float64)
    a3, d3 = a_cm.transpose(1, 2), d_cm.transpose(1, 2)
    assert n == 0 or not a3.is_contiguous()
    ref = torch.einsum("nto,nti->noi", d3, a3)
    lin = nn.Linear(d_in, d_out)
    f = grads.RowFactors("l", lin, a3, d3, rows, "l.weight", "l.bias")
    flat = grads.RowFactors("l", lin, a3.reshape(-1, d_in), d3.reshape(-1, d_out), rows, "l.weight", "l.bias")
    assert (f.n, f.d_in, f.d_out) == (n, d_in, d_out) == (flat.n, flat.d_in, flat.d_out)
    for x in (f, flat):
        torch.testing.assert_close(x.weight_grads(), ref)
        torch.testing.assert_close(x.bias_grads(), d3.sum(1))
        blocks = list(x.weight_grad_blocks(max_elements=7))
        got = torch.cat([b for _, b in blocks]) if blocks else torch.zeros(0, d_out, d_in, dtype=torch.float64)
        torch.testing.assert_close(got, ref)
        assert [s for s, _ in blocks] == sorted({s for s, _ in blocks})
    torch.testing.assert_close(f.a, a3.reshape(-1, d_in))
    torch.testing.assert_close(f.d, d3.reshape(-1, d_out))
    kept = rows * (d_in + d_out) >= d_in * d_out
    f2 = grads.RowFactors("l", lin, a3, d3, rows, "l.weight", "l.bias")
    first = f2.weight_grads(shared=True)
    assert (f2.weight_grads(shared=True) is first) == kept          # kept only when smaller than the rows
    own = f2.weight_grads()
    assert own is not first
    if n:
        own.zero_()                                                 # an own copy: the kept one is untouched
        torch.testing.assert_close(f2.weight_grads(shared=True), ref)


def test_conv_factors_are_channel_major_views():
    """A conv layer's factors keep unfold's channel-major layout (no transposing copy): their
    per-sample views are not contiguous, and they equal the explicit per-sample gradients."""
    model = _models()["conv2d"][0].double()
    g = torch.Generator().manual_seed(4)
    x, y = _inputs("img", 5, g), torch.randint(0, 3, (5,), generator=g)
    names = ["0.weight", "0.bias"]
    f = _factors(model, names, x, y)
    conv = f.rows[0]
    assert conv.rows == 9 and not conv.a3().is_contiguous()
    G = _explicit(model, names, x, y)
    got = torch.cat([conv.weight_grads().reshape(5, -1), conv.bias_grads()], 1)
    torch.testing.assert_close(got, G, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Conv1d(2, 3, 3, stride=2, dilation=2, padding=2, padding_mode="reflect"), (2, 11)),
    (lambda: nn.Conv2d(2, 3, (3, 2), stride=(2, 1), dilation=(1, 2), padding=1), (2, 7, 6)),
    (lambda: nn.Conv2d(1, 4, 3), (1, 5, 5)),
])
@pytest.mark.parametrize("n", [1, 4])
def test_conv_gradients_without_patches(make, shape, n):
    """A conv's per-sample gradients by one grouped convolution (the patches never cut) ==
    by its patches (unfold + bmm) == explicit autograd, with stride, dilation, padding modes."""
    torch.manual_seed(n)
    conv = make().double()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).double()
    g = torch.Generator().manual_seed(10 + n)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    model(x)                                                     # materialise the lazy layer
    y = torch.randint(0, 3, (n,), generator=g)
    names = ["0.weight", "0.bias"]
    f = _factors(model, names, x, y).rows[0]
    grouped = f.weight_grads()
    part = f.samples(n // 2, n)                                  # a slice keeps the conv input, not patches
    torch.testing.assert_close(part.weight_grads(), grouped[n // 2:], rtol=1e-10, atol=1e-12)
    assert f._a is None and part._a is None                      # no patch matrix was formed
    by_patches = torch.bmm(f.d3().transpose(1, 2), f.a3())       # cuts the patches now
    G = _explicit(model, names, x, y)
    w = conv.weight.numel()
    torch.testing.assert_close(grouped.reshape(n, -1), G[:, :w], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(by_patches, grouped, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f.bias_grads(), G[:, w:], rtol=1e-10, atol=1e-12)
