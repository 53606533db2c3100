"""Integer token ids for models that start with an nn.Embedding (issue 33, item 6).

The gradient methods cast every input to the model's float dtype, so an Embedding model failed on
its own token ids. Integer inputs now stay int64 when the model feeds them to an Embedding; the
values must equal those of the workaround that was needed before (float inputs and a model that
casts them back with .long()), on both backends. Integer *features* of a model without an
Embedding are still floats, and float inputs to an Embedding model get a message saying how to
pass them.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dvgs_fast import DVGS, InRunShapley, TracIn

VOCAB, T = 30, 5


class _Text(nn.Module):
    def __init__(self, cast: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.cast = cast
        self.emb = nn.Embedding(VOCAB, 6)
        self.fc = nn.Linear(6 * T, 3)

    def forward(self, ids):
        if self.cast:                       # the old workaround: float ids cast back inside the model
            ids = ids.round().long()
        return self.fc(torch.tanh(self.emb(ids)).flatten(1))


def _ids():
    g = torch.Generator().manual_seed(1)
    xs, xt = torch.randint(0, VOCAB, (36, T), generator=g), torch.randint(0, VOCAB, (10, T), generator=g)
    return xs, torch.randint(0, 3, (36,), generator=g), xt, torch.randint(0, 3, (10,), generator=g)


METHODS = {
    "dvgs": lambda m, be: DVGS(m, epochs=2, target_batch_size=5, backend=be, seed=0, progress=False),
    "tracin": lambda m, be: TracIn(m, epochs=2, n_checkpoints=2, batch_size=12, backend=be, seed=0, progress=False),
    "in_run": lambda m, be: InRunShapley(m, epochs=1, batch_size=12, backend=be, seed=0, progress=False),
}


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("method", list(METHODS))
def test_integer_token_ids_reach_the_embedding(method, backend):
    xs, ys, xt, yt = _ids()
    res = METHODS[method](lambda: _Text(), backend).fit(xs.numpy(), ys, xt.numpy(), yt)     # numpy int64 too
    old = METHODS[method](lambda: _Text(cast=True), backend).fit(xs.float(), ys, xt.float(), yt)
    assert np.isfinite(res.values).all() and np.abs(res.values).max() > 0
    np.testing.assert_allclose(res.values, old.values, rtol=1e-6, atol=1e-9)


def test_float_ids_for_an_embedding_model_say_how_to_pass_them():
    xs, ys, xt, yt = _ids()
    with pytest.raises(ValueError, match=r"^x_target: the model cannot run .*nn.Embedding, which takes integer "
                                         r"token ids: pass x_source and x_target as integer arrays"):
        DVGS(_Text, epochs=1, progress=False).fit(xs.float(), ys, xt.float(), yt)


def test_integer_features_of_a_model_without_embedding_stay_floats():
    g = torch.Generator().manual_seed(2)
    xs, xt = torch.randint(-3, 4, (30, 4), generator=g), torch.randint(-3, 4, (8, 4), generator=g)
    ys, yt = torch.randint(0, 2, (30,), generator=g), torch.randint(0, 2, (8,), generator=g)

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))

    a = DVGS(mlp, epochs=2, seed=0, progress=False).fit(xs, ys, xt, yt)
    b = DVGS(mlp, epochs=2, seed=0, progress=False).fit(xs.float(), ys, xt.float(), yt)
    np.testing.assert_array_equal(a.values, b.values)
