"""One influence computation by one library, in its own process (run by bench/bench_influence.py
with that library's virtualenv python; ours with this repository's).

    python influence_runner.py --lib pydvl --solver cg --problem P.pt --settings '{...}' --out R.npz

P.pt (written by the bench): the architecture name, the trained weights and the data, so every
library scores the same model. R.npz: the [n_query, n_train] scores in OUR sign convention
(> 0: training on i lowers query j's loss), the CPU and wall seconds of the computation alone
(fitting + scoring every pair; the library's import, one warm-up autograd call, loading and
the model build excluded, alike for every library), the peak RSS above
the level before it, and the library's version.

Each library's own public API is used as documented; where its solver takes a knob that maps to
ours (damping, iterations, rank, scale) the bench passes the same value. The definitions that
differ are listed in the results (bench/results/influence.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))       # bench/_memory.py (torch only)
from _memory import peak_memory  # noqa: E402


def build(arch: str) -> nn.Module:
    """The benchmark's models (plain torch: every library must be able to build them)."""
    if arch == "logreg":
        return nn.Sequential(nn.Linear(64, 10))
    if arch == "mlp":
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    if arch == "cnn":
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * 16, 10))
    raise ValueError(arch)


# ------------------------------------------------------------------------------------------ ours
def run_ours(model, xs, ys, xq, yq, solver, st):
    from dvgs_fast.methods.influence import InfluenceFunction
    kw = dict(solver=solver, damping=st["damping"], dtype="float32", progress=False, seed=0,
              hessian_batch_size=st.get("hessian_batch_size", 1000), source_batch_size=1000)
    if solver == "cg":
        kw.update(max_iterations=st["cg_maxiter"], rtol=st["cg_rtol"])
    if solver == "lissa":
        kw.update(max_iterations=st["lissa_depth"], lissa_scale=st["lissa_scale"], rtol=1e-12,
                  hessian_batch_size=st["lissa_batch"])
    if solver == "arnoldi":
        kw.update(rank=st["rank"])
    if solver in ("kfac", "ekfac"):
        kw.update(fisher=st["fisher"])
    res = InfluenceFunction(model, **kw).attribute(xs, ys, xq, yq, query_batch_size=len(xq), dtype="float64")
    return np.asarray(res.scores)


# ------------------------------------------------------------------------------------------ pyDVL
def run_pydvl(model, xs, ys, xq, yq, solver, st):
    from torch.utils.data import DataLoader, TensorDataset
    from pydvl.influence.torch import (ArnoldiInfluence, CgInfluence, DirectInfluence, EkfacInfluence,
                                       InverseHarmonicMeanInfluence, LissaInfluence)
    from pydvl.influence.torch.base import BlockMode
    lam = st["damping"]
    full = DataLoader(TensorDataset(xs, ys), batch_size=len(xs))
    if solver == "direct":
        inf = DirectInfluence(model, F.cross_entropy, regularization=lam)
    elif solver == "cg":
        inf = CgInfluence(model, F.cross_entropy, regularization=lam, rtol=st["cg_rtol"], atol=0.0,
                          maxiter=st["cg_maxiter"], solve_simultaneously=True, warn_on_max_iteration=False)
    elif solver == "lissa":
        full = DataLoader(TensorDataset(xs, ys), batch_size=st["lissa_batch"], shuffle=True)
        inf = LissaInfluence(model, F.cross_entropy, regularization=lam, maxiter=st["lissa_depth"],
                             scale=st["lissa_scale"], rtol=1e-12, warn_on_max_iteration=False)
    elif solver == "arnoldi":
        inf = ArnoldiInfluence(model, F.cross_entropy, regularization=lam, rank=st["rank"])
    elif solver == "ekfac":
        inf = EkfacInfluence(model, update_diagonal=True, hessian_regularization=lam)
    elif solver == "datainf":
        inf = InverseHarmonicMeanInfluence(model, F.cross_entropy, regularization=lam,
                                           block_structure=BlockMode.LAYER_WISE)
    else:
        raise ValueError(solver)
    inf = inf.fit(full)
    out = inf.influences(xq, yq, xs, ys)
    return out.detach().double().numpy()


# ------------------------------------------------------------------------------------------ dattri
def run_dattri(model, xs, ys, xq, yq, solver, st):
    from torch.utils.data import DataLoader, TensorDataset
    from dattri.algorithm.influence_function import (IFAttributorArnoldi, IFAttributorCG, IFAttributorDataInf,
                                                     IFAttributorEKFAC, IFAttributorExplicit, IFAttributorLiSSA)
    from dattri.task import AttributionTask

    def loss(params, data):
        x, y = data
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y.long())

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    lam = st["damping"]
    train = DataLoader(TensorDataset(xs, ys), batch_size=len(xs))
    test = DataLoader(TensorDataset(xq, yq), batch_size=len(xq))
    if solver == "direct":
        att = IFAttributorExplicit(task, regularization=lam)
    elif solver == "cg":
        att = IFAttributorCG(task, regularization=lam, max_iter=st["cg_maxiter"], tol=st["cg_tol_abs"])
    elif solver == "lissa":
        # x ← g + (1 − d) x − H x / s, result x / s: (H + d·s·I)⁻¹, so d = λ / s
        att = IFAttributorLiSSA(task, batch_size=st["lissa_batch"], recursion_depth=st["lissa_depth"],
                                damping=lam / st["lissa_scale"], scaling=st["lissa_scale"])
    elif solver == "arnoldi":
        att = IFAttributorArnoldi(task, proj_dim=st["rank"], max_iter=st["arnoldi_iter"], regularization=lam)
    elif solver == "ekfac":
        att = IFAttributorEKFAC(task, damping=lam,
                                module_name=[n for n, m in model.named_modules() if isinstance(m, nn.Linear)])
    elif solver == "datainf":
        # per-sample train gradients at any batch size (dattri vmaps over the rows); its attribute()
        # redoes the DataInf transform of the queries once per train batch, so one batch of all rows
        att = IFAttributorDataInf(task, regularization=lam)
    else:
        raise ValueError(solver)
    att.cache(train)
    out = att.attribute(train, test)                  # [n_train, n_test]
    return out.t().detach().double().numpy()


# ------------------------------------------------------------------------------------------ Kronfluence
def run_kronfluence(model, xs, ys, xq, yq, solver, st):
    import logging
    from torch.utils.data import TensorDataset
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    logging.disable(logging.WARNING)

    class Cls(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    task = Cls()
    model = prepare_model(model, task)
    with tempfile.TemporaryDirectory() as tmp:
        an = Analyzer("bench", model, task, cpu=True, disable_tqdm=True, disable_model_save=True, output_dir=tmp)
        fa = FactorArguments(strategy=solver, use_empirical_fisher=st["fisher"] == "empirical",
                             activation_covariance_dtype=torch.float32, gradient_covariance_dtype=torch.float32,
                             lambda_dtype=torch.float32)
        an.fit_all_factors("f", dataset=TensorDataset(xs, ys), per_device_batch_size=len(xs), factor_args=fa,
                           overwrite_output_dir=True)
        sa = ScoreArguments(damping_factor=None if st["damping"] == "auto" else st["damping"])
        an.compute_pairwise_scores("s", "f", query_dataset=TensorDataset(xq, yq), train_dataset=TensorDataset(xs, ys),
                                   per_device_query_batch_size=len(xq), per_device_train_batch_size=len(xs),
                                   score_args=sa, overwrite_output_dir=True)
        scores = an.load_pairwise_scores("s")["all_modules"]
    return scores.detach().double().numpy()


RUNNERS = {"dvgs_fast": run_ours, "pydvl": run_pydvl, "dattri": run_dattri, "kronfluence": run_kronfluence}
# Imported before the clock starts (a library's import is not its solver's time).
# Imported before the clock starts (import time is excluded alike for every library): each
# library's public modules and what they import lazily on a first call (ours: the sources and
# tqdm's progress bars, ~0.06 s of imports that the first attribute() call paid inside the clock).
MODULES = {"dvgs_fast": ["dvgs_fast.methods.influence", "dvgs_fast.sources", "tqdm.auto", "scipy.sparse.linalg"],
           "pydvl": ["pydvl.influence.torch", "pydvl.influence.torch.base", "scipy.sparse.linalg"],
           "dattri": ["dattri.algorithm.influence_function", "dattri.task", "dattri.func.hessian"],
           "kronfluence": ["kronfluence.analyzer", "kronfluence.arguments", "kronfluence.task"]}


def warm_up() -> None:
    """What every library's first autograd call pays once per process (torch imports its symbolic
    shapes machinery on the first grad with grad_outputs; vmap and functional_call their own): done
    before the clock starts, for every library alike."""
    m = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    g = torch.autograd.grad(m(x).square().sum(), list(m.parameters()), create_graph=True)
    torch.autograd.grad(g, list(m.parameters()), grad_outputs=[torch.ones_like(t) for t in g])
    params = {k: v.detach() for k, v in m.named_parameters()}
    torch.func.vmap(torch.func.grad(lambda p, xi: torch.func.functional_call(m, p, (xi,)).sum()),
                    in_dims=(None, 0))(params, x)
VERSIONS = {"dvgs_fast": "dvgs_fast", "pydvl": "pyDVL", "dattri": "dattri", "kronfluence": "kronfluence"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True, choices=list(RUNNERS))
    ap.add_argument("--solver", required=True)
    ap.add_argument("--problem", required=True)
    ap.add_argument("--settings", default="{}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    st = json.loads(a.settings)
    pb = torch.load(a.problem, weights_only=True)
    model = build(pb["arch"])
    model.load_state_dict(pb["state_dict"])
    model.eval()
    xs, ys, xq, yq = pb["x_train"], pb["y_train"], pb["x_query"], pb["y_query"]
    import importlib
    for mod in MODULES[a.lib]:
        importlib.import_module(mod)
    warm_up()
    torch.manual_seed(0)
    fn = RUNNERS[a.lib]
    c0, w0 = time.process_time(), time.perf_counter()
    scores, peak = peak_memory(fn, model, xs, ys, xq, yq, a.solver, st)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    import importlib.metadata as md
    try:
        version = md.version(VERSIONS[a.lib])
    except md.PackageNotFoundError:
        version = "repo"
    np.savez(a.out, scores=scores, cpu=cpu, wall=wall, peak=peak, version=version, torch=torch.__version__)


if __name__ == "__main__":
    main()
