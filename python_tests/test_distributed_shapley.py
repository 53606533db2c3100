"""Data Shapley (and the semivalue core's MSR sampler and resampling phase) on 2 gloo processes (permutation p on rank p % 2, marginals all-reduced every
`check_every` permutations, convergence decided on the reduced values) equals the single-process
run with the same seed. One spawn runs every case; the parent computes the references."""
from __future__ import annotations

import numpy as np
import pytest

from _dist_workers import semivalue_case, shapley_case, spawn

CASES = {
    # TMC, 6 permutations in rounds of 4 (the second round is partial)
    "tmc_batched": {},
    "tmc_sequential": {"batched": False},
    "tmc_mlp": {"model": "mlp", "hidden_dim": 8, "max_permutations": 3, "check_every": 2, "refit_steps": 8},
    "gshapley": {"method": "gshapley", "g_learning_rate": 0.3, "max_permutations": 5, "check_every": 2},
    # the convergence check (from 100 permutations on, every 10) stops both runs at the same point
    "converged": {"n": 8, "method": "gshapley", "g_learning_rate": 0.3, "max_permutations": 400,
                  "check_every": 10, "convergence_tol": 0.2},
}
TIMED = {"max_permutations": None, "max_time": 1.0, "check_every": 3}
SEMIVALUE_CASES = {
    # MSR Banzhaf: 30 subsets in rounds of 4, batches of 5 (rounds and batches do not line up)
    "msr": {"cls": "DataBanzhaf", "max_updates": 30, "batch_size": 5},
    # Beta Shapley with the resampling variance (pairs of permutations sharing a first point)
    "beta_ci": {"cls": "BetaShapley", "max_updates": 4, "resampling_samples": 5, "tolerance": None},
}


@pytest.fixture(scope="module")
def ranks():
    cases = [(name, "shapley", kw) for name, kw in CASES.items()] + [("timed", "shapley", TIMED)]
    cases += [(name, "semivalue", kw) for name, kw in SEMIVALUE_CASES.items()]
    return spawn(cases, world=2)


@pytest.fixture(scope="module")
def single():
    import torch
    mp = pytest.MonkeyPatch()
    mp.delenv("WORLD_SIZE", raising=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {name: shapley_case(**kw) for name, kw in CASES.items()}
        out.update({name: semivalue_case(**kw) for name, kw in SEMIVALUE_CASES.items()})
        return out
    finally:
        torch.set_num_threads(n)
        mp.undo()


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_single_process(ranks, single, name):
    ref = single[name]
    assert np.abs(ref["values"]).max() > 0
    for r, out in enumerate(ranks):
        got = out[name]
        np.testing.assert_allclose(got["values"], ref["values"], rtol=1e-9, atol=1e-12)
        for k in ("stopped_by", "permutations_done", "mean_refits_per_permutation"):
            assert got["info"][k] == ref["info"][k], k
        assert got["info"]["world_size"] == 2 and got["info"]["rank"] == r


@pytest.mark.parametrize("name", list(SEMIVALUE_CASES))
def test_semivalue_samplers_on_two_ranks_equal_single_process(ranks, single, name):
    ref = single[name]
    assert np.abs(ref["values"]).max() > 0
    for r, out in enumerate(ranks):
        got = out[name]
        np.testing.assert_allclose(got["values"], ref["values"], rtol=1e-9, atol=1e-12)
        if "resampling_stderr" in ref:
            np.testing.assert_allclose(got["resampling_stderr"], ref["resampling_stderr"], rtol=1e-9, atol=1e-12)
        for k in ("stopped_by", "subsets_done", "permutations_done", "resampling_samples"):
            assert got["info"][k] == ref["info"][k], k
        assert got["info"]["world_size"] == 2 and got["info"]["rank"] == r


def test_convergence_case_stops_early(single):
    info = single["converged"]["info"]
    assert info["stopped_by"] == "converged" and 100 < info["permutations_done"] < 400


def test_time_budget_stops_every_rank_together(ranks):
    a, b = ranks[0]["timed"], ranks[1]["timed"]
    assert a["info"]["stopped_by"] == b["info"]["stopped_by"] == "max_time"
    assert a["info"]["permutations_done"] == b["info"]["permutations_done"]
    np.testing.assert_array_equal(a["values"], b["values"])


def test_distributed_true_needs_a_process_group(monkeypatch):
    from dvgs_fast.methods.shapley import DataShapley
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    import torch
    x, y = torch.randn(6, 3), torch.tensor([0, 1] * 3)
    with pytest.raises(ValueError, match="distributed: True needs a process group"):
        DataShapley(distributed=True, progress=False, max_permutations=1).fit(x, y, x, y)
    with pytest.raises(ValueError, match="distributed"):
        DataShapley(distributed=1)
