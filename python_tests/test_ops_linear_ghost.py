"""linear_ghost_stats against per-sample gradients materialised in float64."""
import pytest
import torch

from dvgs_fast import ops
from _devices import DEVICES, TOL


def reference(a, d, w, b):
    a, d = a.double(), d.double()
    if a.dim() == 2:
        per_w, per_b = torch.einsum("no,ni->noi", d, a), d
    else:
        per_w, per_b = torch.einsum("nto,nti->noi", d, a), d.sum(1)
    dot = (per_w * w.double()).sum((1, 2))
    sq = (per_w * per_w).sum((1, 2))
    if b is not None:
        dot = dot + per_b @ b.double()
        sq = sq + (per_b * per_b).sum(1)
    return dot, sq


def rnd(gen, *shape, dtype=torch.float64, device="cpu"):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


CASES = [  # (N, T or None, d_in, d_out)
    (0, None, 5, 3), (1, None, 5, 3), (17, None, 8, 3), (17, None, 3, 8), (64, None, 108, 100),
    (0, 4, 5, 3), (1, 4, 5, 3), (9, 6, 7, 5),      # Gram form (2 T^2 <= d_in d_out)
    (9, 12, 3, 4), (5, 30, 2, 2),                  # materialised form
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_linear_ghost_matches_reference(device, dtype, bias, case):
    n, t, d_in, d_out = case
    gen = torch.Generator().manual_seed(hash((case, bias, str(dtype))) % 2**31)
    lead = (n,) if t is None else (n, t)
    a = rnd(gen, *lead, d_in, dtype=dtype, device=device)
    d = rnd(gen, *lead, d_out, dtype=dtype, device=device)
    w = rnd(gen, d_out, d_in, dtype=dtype, device=device)
    b = rnd(gen, d_out, dtype=dtype, device=device) if bias else None
    dot, sq = ops.linear_ghost_stats(a, d, w, b)
    assert dot.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    rdot, rsq = reference(a.cpu(), d.cpu(), w.cpu(), None if b is None else b.cpu())
    scale = max(1.0, float(rsq.abs().max())) if n else 1.0
    tol = TOL[dtype] * (10 if dtype in (torch.float16, torch.bfloat16) else 1)
    torch.testing.assert_close(dot.double().cpu(), rdot, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(sq.double().cpu(), rsq, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_ghost_non_contiguous(device):
    gen = torch.Generator().manual_seed(1)
    a = rnd(gen, 10, 6, device=device).t()[:, ::1].t()          # transposed-back view
    a = rnd(gen, 6, 20, device=device).t()[::2]                   # strided rows [10, 6]
    d = rnd(gen, 10, 8, device=device)[:, ::2]                    # strided columns [10, 4]
    w = rnd(gen, 6, 4, device=device).t()                         # [4, 6] transposed
    b = rnd(gen, 8, device=device)[::2]
    assert not (a.is_contiguous() or d.is_contiguous() or w.is_contiguous() or b.is_contiguous())
    dot, sq = ops.linear_ghost_stats(a, d, w, b)
    rdot, rsq = reference(a.cpu(), d.cpu(), w.cpu(), b.cpu())
    torch.testing.assert_close(dot.cpu(), rdot)
    torch.testing.assert_close(sq.cpu(), rsq)
    a3 = rnd(gen, 5, 7, 4, device=device).transpose(1, 2)         # [5, 4, 7] sequence view
    d3 = rnd(gen, 5, 4, 3, device=device)
    w3 = rnd(gen, 3, 7, device=device)
    dot, sq = ops.linear_ghost_stats(a3, d3, w3, None)
    rdot, rsq = reference(a3.cpu(), d3.cpu(), w3.cpu(), None)
    torch.testing.assert_close(dot.cpu(), rdot)
    torch.testing.assert_close(sq.cpu(), rsq)


def test_linear_ghost_large_n_blocks():
    # enough rows to cross the kernel's internal row blocks (bounded memory)
    gen = torch.Generator().manual_seed(4)
    a, d = rnd(gen, 70_000, 64, dtype=torch.float32), rnd(gen, 70_000, 3, dtype=torch.float32)
    w, b = rnd(gen, 3, 64, dtype=torch.float32), rnd(gen, 3, dtype=torch.float32)
    dot, sq = ops.linear_ghost_stats(a, d, w, b)
    rdot, rsq = reference(a, d, w, b)
    torch.testing.assert_close(dot.double(), rdot, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sq.double(), rsq, rtol=1e-4, atol=1e-4)


def test_linear_ghost_matches_autograd_of_real_layer():
    # end-to-end meaning: stats of the true per-sample gradients of an nn.Linear
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    y = torch.randn(5, 4, dtype=torch.float64)
    G, gb = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    out = lin(x)
    out.retain_grad()
    ((out - y) ** 2).sum().backward()
    dot, sq = ops.linear_ghost_stats(x, out.grad, G, gb)
    for i in range(5):
        lin.zero_grad()
        ((lin(x[i:i + 1]) - y[i:i + 1]) ** 2).sum().backward()
        gi = torch.cat([lin.weight.grad.reshape(-1), lin.bias.grad])
        Gi = torch.cat([G.reshape(-1), gb])
        assert abs(float(gi @ Gi) - float(dot[i])) < 1e-10
        assert abs(float(gi @ gi) - float(sq[i])) < 1e-10


@pytest.mark.parametrize("bad, match", [
    (lambda: ops.linear_ghost_stats(torch.zeros(3), torch.zeros(3, 2), torch.zeros(2, 3)), "inputs must be"),
    (lambda: ops.linear_ghost_stats(torch.zeros(3, 4), torch.zeros(2, 2), torch.zeros(2, 4)), "samples"),
    (lambda: ops.linear_ghost_stats(torch.zeros(3, 4), torch.zeros(3, 2), torch.zeros(4, 2)), "target_weight"),
    (lambda: ops.linear_ghost_stats(torch.zeros(3, 4), torch.zeros(3, 2), torch.zeros(2, 4), torch.zeros(3)),
     "target_bias"),
    (lambda: ops.linear_ghost_stats(torch.zeros(3, 5, 4), torch.zeros(3, 6, 2), torch.zeros(2, 4)), "T=6"),
    (lambda: ops.linear_ghost_stats(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long),
                                    torch.zeros(2, 4)), "floating"),
    (lambda: ops.linear_ghost_stats(torch.zeros(3, 4), torch.zeros(3, 2, dtype=torch.float64), torch.zeros(2, 4)),
     "same dtype"),
])
def test_linear_ghost_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_linear_ghost_cpp_checks_direct_call():
    with pytest.raises(ValueError, match="target_weight"):
        torch.ops.dvgs_fast.linear_ghost_stats(torch.zeros(3, 4), torch.zeros(3, 2), torch.zeros(4, 2), None)


@pytest.mark.parametrize("seq", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_ghost_opcheck_and_gradcheck(seq, bias):
    gen = torch.Generator().manual_seed(8)
    lead = (4, 3) if seq else (4,)
    a = rnd(gen, *lead, 5).requires_grad_()
    d = rnd(gen, *lead, 2).requires_grad_()
    w = rnd(gen, 2, 5).requires_grad_()
    b = rnd(gen, 2).requires_grad_() if bias else None
    torch.library.opcheck(torch.ops.dvgs_fast.linear_ghost_stats.default, (a, d, w, b))
    args = (a, d, w) + ((b,) if bias else ())
    assert torch.autograd.gradcheck(lambda *xs: torch.ops.dvgs_fast.linear_ghost_stats(
        xs[0], xs[1], xs[2], xs[3] if bias else None), args)


def test_linear_ghost_under_torch_compile():
    gen = torch.Generator().manual_seed(6)
    a, d, w = rnd(gen, 6, 5, dtype=torch.float32), rnd(gen, 6, 3, dtype=torch.float32), rnd(gen, 3, 5, dtype=torch.float32)

    def f(a, d, w):
        dot, sq = ops.linear_ghost_stats(a, d, w, None)
        return dot + sq

    torch.testing.assert_close(torch.compile(f, backend="aot_eager", fullgraph=True)(a, d, w), f(a, d, w))
