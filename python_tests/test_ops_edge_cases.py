"""Op inputs at the edges: overflow-sized gradients, negative eps, negative or mis-shaped norms."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dvgs_fast import ops


def _flat(gs):
    return torch.cat([g.reshape(g.shape[0], -1) for g in gs], 1)


@pytest.mark.parametrize("scale", [1e20, 1e30, 1e-30])
def test_cosine_of_huge_and_tiny_fp32_gradients_is_finite_and_matches_torch(scale):
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(6, 3, 4, generator=g) * scale, torch.randn(6, 5, generator=g) * scale]
    target = [torch.randn(3, 4, generator=g) * scale, torch.randn(5, generator=g) * scale]
    got = ops.per_sample_cosine(grads, target)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    want = F.cosine_similarity(_flat([x.double() for x in grads]),
                               _flat([t.double()[None] for t in target]), dim=1, eps=1e-8)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_cosine_mixed_rows_only_overflowing_rows_recomputed():
    g = torch.Generator().manual_seed(6)
    grads = [torch.randn(5, 7, generator=g)]
    grads[0][2] *= 1e25                      # one overflowing row among ordinary ones
    target = [torch.randn(7, generator=g)]
    got = ops.per_sample_cosine(grads, target)
    want = F.cosine_similarity(grads[0].double(), target[0].double()[None], dim=1, eps=1e-8)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_cosine_of_nan_gradients_stays_nan():
    grads = [torch.tensor([[1.0, float("nan")], [1.0, 2.0]])]
    got = ops.per_sample_cosine(grads, [torch.tensor([1.0, 1.0])])
    assert torch.isnan(got[0]) and torch.isfinite(got[1])


def test_negative_eps_refused():
    grads, target = [torch.randn(3, 2)], [torch.randn(2)]
    with pytest.raises(ValueError, match="eps"):
        ops.per_sample_cosine(grads, target, eps=-1.0)
    with pytest.raises(ValueError, match="eps"):
        torch.ops.dvgs_fast.per_sample_cosine(grads, target, -1.0)
    with pytest.raises(ValueError, match="eps"):
        ops.similarity(torch.ones(3), torch.ones(3), 1.0, "cosine", eps=-1e-8)


def test_similarity_refuses_negative_and_misshaped_norms():
    dot, sq = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([4.0, 9.0, 1.0])
    with pytest.raises(ValueError, match="target_sqnorm"):
        ops.similarity(dot, sq, -2.0, "cosine")
    with pytest.raises(ValueError, match="target_sqnorm"):
        ops.similarity(dot, sq, torch.ones(2), "cosine")
    with pytest.raises(ValueError, match="sqnorm"):
        ops.similarity(dot, torch.tensor([4.0, -9.0, 1.0]), 1.0, "distance")
    # rounding-sized negatives (the Gram form of a ~0 norm) are clamped, not refused
    out = ops.similarity(dot, torch.tensor([4.0, 9.0, -1e-9]), torch.tensor([1.0]), "cosine")
    assert torch.isfinite(out).all()
