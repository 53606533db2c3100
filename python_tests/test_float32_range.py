"""float32 at the edges of its range (issue 33, item 4): features or coordinates whose squares
over- or underflow float32 must not change the answer silently.

* KNNShapley(dtype="float32") with features of magnitude 1e19 (squared distances overflow: every
  neighbour tied) or 1e-25 (they underflow to 0) gave values up to 0.02-0.06 away from float64;
  such features are now measured in float64, and the values equal float64's on the same data.
* ops.sinkhorn in float32 with coordinates of 1e18 (or blur 1e-19) returned NaN, or was 2% off,
  where float64 gives a cost float32 can hold; such calls run in float64 and return float32.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dvgs_fast import KNNShapley
from dvgs_fast.ops import sinkhorn


@pytest.mark.parametrize("scale", [1e19, 1e25, 1e-25, 1e-30])
@pytest.mark.parametrize("metric", ["euclidean", "manhattan", "cosine"])
def test_knn_shapley_float32_with_extreme_features_equals_float64(scale, metric):
    g = torch.Generator().manual_seed(3)
    xs = (torch.randn(120, 6, generator=g, dtype=torch.float64) * scale).float()
    xt = (torch.randn(30, 6, generator=g, dtype=torch.float64) * scale).float()
    ys, yt = torch.randint(0, 3, (120,), generator=g), torch.randint(0, 3, (30,), generator=g)
    r32 = KNNShapley(k=5, metric=metric, dtype="float32", progress=False).fit(xs, ys, xt, yt)
    r64 = KNNShapley(k=5, metric=metric, dtype="float64", progress=False).fit(xs.double(), ys, xt.double(), yt)
    np.testing.assert_array_equal(r32.values, r64.values)
    assert r32.info["distances_dtype"] == "float64"


def test_knn_shapley_float32_stays_float32_for_ordinary_features():
    g = torch.Generator().manual_seed(4)
    xs, xt = torch.randn(50, 4, generator=g), torch.randn(10, 4, generator=g)
    ys, yt = torch.randint(0, 2, (50,), generator=g), torch.randint(0, 2, (10,), generator=g)
    res = KNNShapley(k=3, dtype="float32", progress=False).fit(xs * 1e6, ys, xt * 1e6, yt)
    assert res.info["distances_dtype"] == "float32"


def _clouds():
    g = torch.Generator().manual_seed(0)
    return torch.randn(50, 3, generator=g, dtype=torch.float64), torch.randn(40, 3, generator=g, dtype=torch.float64) + 1


@pytest.mark.parametrize("scale,blur,p", [(1e18, 0.05, 2), (1e15, 0.05, 2), (1.0, 1e-19, 2), (1e19, 0.05, 1),
                                          (1e25, 0.05, 1)])
def test_sinkhorn_float32_far_from_one_equals_float64(scale, blur, p):
    x, y = _clouds()
    x32, y32 = (x * scale).float(), (y * scale).float()
    ref = sinkhorn(x32.double(), y32.double(), blur=blur, p=p)          # the same points, in float64
    got = sinkhorn(x32, y32, blur=blur, p=p)
    assert got.cost.dtype == torch.float32 and got.f.dtype == torch.float32
    assert float(got.cost) == pytest.approx(float(ref.cost), rel=1e-6)
    np.testing.assert_allclose(got.f.double().numpy(), ref.f.numpy(), rtol=0, atol=1e-5 * float(ref.f.abs().max()))


def test_sinkhorn_float32_gradient_is_finite_when_promoted():
    x, y = _clouds()
    x32 = (x * 1e18).float().requires_grad_()
    cost = sinkhorn(x32, (y * 1e18).float()).cost
    cost.backward()
    assert x32.grad.dtype == torch.float32 and torch.isfinite(x32.grad).all()


def test_sinkhorn_float32_cost_beyond_its_range_is_refused():
    x, y = _clouds()
    with pytest.raises(ValueError, match=r"^sinkhorn: the cost \(2\.\d+e\+40\) exceeds float32's range .*pass "
                                         r"float64 x and y"):
        sinkhorn((x * 1e20).float(), (y * 1e20).float())
