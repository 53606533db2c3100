"""One valuation run of one library, in a process of its own (its own virtualenv for the peers):

    python run_peer.py JOB.json OUT.json

JOB: {"lib": "ours" | "pydvl" | "opendataval", "method": "banzhaf" | "beta" | "lava",
      "task": TASK.npz (x_source, y_source, x_target, y_target, and the model's initial weights
              init_* when the model is a torch one), "model": "torch_logistic" | "torch_mlp" |
              "sklearn_logistic", "samples": K (MSR subsets / permutations / OpenDataVal models),
      "steps", "lr", "alpha", "beta", "seed", "threads"}

Every library runs its *own* valuation code; what is shared is the model and its training, so
that the utility is the same function of the subset everywhere:

* torch models: `TorchRefit` below replays our refit (dvgs_fast.refit.models.Refitter): the
  task's initial weights, `steps` full-batch steps of torch.optim.Adam with `lr` on the mean
  cross-entropy, target accuracy; a subset that lacks a class present in the target set (or
  is empty) scores the target's majority-class rate instead (our utility's "chance" score);
* sklearn_logistic: scikit-learn's LogisticRegression (defaults); pyDVL's catch_errors returns
  the scorer default for a one-class subset, set to the same chance score.

The valuation alone is timed (process CPU time and wall time; imports and data loading are not),
with torch and BLAS pinned to `threads` threads; LAVA (seconds or less) after one untimed call on
a slice of the data on both sides, so that one-time process start-up costs are not counted. OUT: values, stderr (when the library reports
one), the number of refits the library asked for, CPU and wall seconds, versions.
"""
from __future__ import annotations

import json
import os
import sys
import time

JOB = json.load(open(sys.argv[1]))
_T = str(JOB.get("threads", 1))
for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_v] = _T

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(_T))
TASK = np.load(JOB["task"])
XS, YS, XT, YT = (TASK[k] for k in ("x_source", "y_source", "x_target", "y_target"))
REQUIRED = np.unique(YT)
CHANCE_CLASS = int(np.bincount(YT).argmax())
N_CLASSES = int(max(YS.max(), YT.max()) + 1)
FITS = [0]
WARM = (200, 100)        # LAVA: one untimed call on these many source / target rows first (process start-up costs)


try:        # every venv has scikit-learn; its scorers need an estimator's tags (pyDVL's scorer)
    from sklearn.base import BaseEstimator, ClassifierMixin
except ImportError:     # pragma: no cover
    BaseEstimator, ClassifierMixin = object, object


class TorchRefit(ClassifierMixin, BaseEstimator):
    """The refit of dvgs_fast's torch utility (see the module doc), a scikit-learn classifier
    (pyDVL scores it with sklearn's accuracy scorer, which reads its tags and ``classes_``)."""

    def __init__(self, arch="logistic", steps=100, lr=0.1):
        self.arch, self.steps, self.lr = arch, steps, lr

    def get_params(self, deep=True):
        return {"arch": self.arch, "steps": self.steps, "lr": self.lr}

    def set_params(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)
        return self

    def _module(self):
        d = XS.shape[1]
        if self.arch == "logistic":
            m = torch.nn.Linear(d, N_CLASSES)
            names = {"weight": "init_weight", "bias": "init_bias"}
        else:
            h = TASK["init_0_weight"].shape[0]
            m = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.ReLU(), torch.nn.Linear(h, N_CLASSES))
            names = {"0.weight": "init_0_weight", "0.bias": "init_0_bias", "2.weight": "init_2_weight",
                     "2.bias": "init_2_bias"}
        m.load_state_dict({k: torch.as_tensor(TASK[v]) for k, v in names.items()})
        return m

    def fit(self, x, y):
        FITS[0] += 1
        x, y = torch.as_tensor(np.asarray(x), dtype=torch.float32), torch.as_tensor(np.asarray(y)).long().reshape(-1)
        self.classes_ = np.arange(N_CLASSES)
        self.const = None
        if len(y) == 0 or not np.isin(REQUIRED, y.numpy()).all():
            self.const = CHANCE_CLASS
            return self
        self.m = self._module()
        opt = torch.optim.Adam(self.m.parameters(), lr=self.lr)
        for _ in range(self.steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(self.m(x), y).backward()
            opt.step()
        return self

    def predict(self, x):
        n = len(x)
        if self.const is not None:
            return np.full(n, self.const)
        with torch.no_grad():
            return self.m(torch.as_tensor(np.asarray(x), dtype=torch.float32)).argmax(1).numpy()

    def score(self, x, y):
        return float((self.predict(x) == np.asarray(y)).mean())


def chance() -> float:
    return float((YT == CHANCE_CLASS).mean())


def make_sklearn_logistic():
    from sklearn.linear_model import LogisticRegression

    class CountingLR(LogisticRegression):
        def fit(self, x, y, sample_weight=None):
            FITS[0] += 1
            return super().fit(x, y, sample_weight=sample_weight)
    return CountingLR()


# ---------------------------------------------------------------------------------- libraries
def run_ours():
    from dvgs_fast.methods.semivalues import BetaShapley, DataBanzhaf
    from dvgs_fast import LAVA
    import dvgs_fast
    m, k, seed = JOB["method"], JOB["samples"], JOB["seed"]
    if m == "lava":
        est = LAVA(progress=False, dtype=JOB.get("dtype", "float32"))
        est.fit(XS[:WARM[0]], YS[:WARM[0]], XT[:WARM[1]], YT[:WARM[1]])          # untimed warm-up, as theirs
        return _timed(lambda: est.fit(XS, YS, XT, YT), lambda r: (r.values, None, 0), dvgs_fast.__version__)
    model = _our_model()
    kw = dict(seed=seed, progress=False, max_updates=k)
    if JOB["model"].startswith("torch"):
        kw.update(refit_steps=JOB["steps"], refit_lr=JOB["lr"])
    if m == "banzhaf":
        est = DataBanzhaf(model, batch_size=JOB.get("batch", 64), **kw)
    else:
        est = BetaShapley(model, alpha=JOB["alpha"], beta=JOB["beta"], tolerance=None,
                          batch_size=JOB.get("batch", 16), **kw)
    return _timed(lambda: est.fit(XS, YS, XT, YT),
                  lambda r: (r.values, r.stderr, r.info["utility_refits"]), dvgs_fast.__version__)


def _our_model():
    if JOB["model"] == "sklearn_logistic":
        from sklearn.linear_model import LogisticRegression
        return LogisticRegression()
    t = TorchRefit("logistic" if JOB["model"] == "torch_logistic" else "mlp")._module()
    return t


def run_pydvl():
    import pydvl
    from joblib import parallel_config
    from pydvl.valuation import (BetaShapleyValuation, Dataset, MaxSamples, ModelUtility, MSRBanzhafValuation,
                                 PermutationSampler, SupervisedScorer)
    from pydvl.valuation.samplers import MSRSampler
    train, test = Dataset(XS, YS), Dataset(XT, YT)
    model = make_sklearn_logistic() if JOB["model"] == "sklearn_logistic" else \
        TorchRefit("logistic" if JOB["model"] == "torch_logistic" else "mlp", JOB["steps"], JOB["lr"])
    scorer = SupervisedScorer("accuracy", test, default=chance(), range=(0.0, 1.0))
    # scikit-learn's LogisticRegression raises on a one-class subset: pyDVL's catch_errors gives it the
    # chance score; the torch refit handles those itself, so any error there is a bug and must surface
    # (caught, it silently turned every utility into the default score: all values 0)
    utility = ModelUtility(model, scorer, catch_errors=JOB["model"] == "sklearn_logistic", show_warnings=False)
    k, seed = JOB["samples"], JOB["seed"]
    if JOB["method"] == "banzhaf":
        val = MSRBanzhafValuation(utility, is_done=MaxSamples(MSRSampler(seed=seed), k), seed=seed)
        val.is_done = MaxSamples(val.sampler, k)
    else:
        sampler = PermutationSampler(seed=seed)
        val = BetaShapleyValuation(utility, sampler, MaxSamples(sampler, k), alpha=JOB["alpha"], beta=JOB["beta"])

    def go():
        with parallel_config(n_jobs=1):
            val.fit(train)
        return val.result
    return _timed(go, lambda r: (np.asarray(r.values), np.asarray(r.stderr), FITS[0]), pydvl.__version__)


def run_opendataval():
    import opendataval
    from opendataval.dataval import BetaShapley, DataBanzhaf, LavaEvaluator
    from opendataval.dataval.margcontrib import TMCSampler
    from opendataval.metrics import accuracy
    from opendataval.model.api import Model
    eye = torch.eye(N_CLASSES)
    xs, xt = torch.as_tensor(XS, dtype=torch.float32), torch.as_tensor(XT, dtype=torch.float32)
    if JOB["method"] == "lava" and JOB.get("dtype") == "float64":
        xs, xt = xs.double(), xt.double()
    ys, yt = eye[torch.as_tensor(YS)], eye[torch.as_tensor(YT)]
    m, k, seed = JOB["method"], JOB["samples"], JOB["seed"]
    if m == "lava":
        warm = LavaEvaluator(device=torch.device("cpu"), random_state=seed)     # untimed warm-up, as ours
        warm.input_data(xs[:WARM[0]], ys[:WARM[0]], xt[:WARM[1]], yt[:WARM[1]])
        warm.train_data_values()
        ev = LavaEvaluator(device=torch.device("cpu"), random_state=seed)
    else:
        class Wrapped(Model):
            """Their Model interface around the shared refit (their evaluators call fit on
            Subset views with one-hot labels and score argmax agreement)."""

            def __init__(self):
                self.r = TorchRefit("logistic" if JOB["model"] == "torch_logistic" else "mlp", JOB["steps"], JOB["lr"])

            def fit(self, x, y, *args, **kwargs):
                xi = x.dataset[x.indices] if hasattr(x, "indices") else x
                yi = y.dataset[y.indices] if hasattr(y, "indices") else y
                self.r.fit(xi.numpy(), yi.argmax(1).numpy() if len(yi) else np.zeros(0, dtype=np.int64))
                return self

            def predict(self, x, *args, **kwargs):
                return eye[torch.as_tensor(self.r.predict(x.numpy()))]

        ev = DataBanzhaf(num_models=k, random_state=np.random.RandomState(seed)) if m == "banzhaf" else \
            BetaShapley(sampler=TMCSampler(mc_epochs=k, min_cardinality=0, cache_name=None,
                                           random_state=np.random.RandomState(seed)),
                        alpha=JOB["alpha"], beta=JOB["beta"])
        ev.input_model_metric(Wrapped(), accuracy)
    ev.input_data(xs, ys, xt, yt)

    def go():
        ev.train_data_values()
        return ev.evaluate_data_values()
    return _timed(go, lambda r: (np.asarray(r, dtype=np.float64), None, FITS[0]), opendataval.__version__)


def _timed(fn, unpack, version):
    load0 = os.getloadavg()[0]
    c0, w0 = time.process_time(), time.perf_counter()
    res = fn()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    values, stderr, refits = unpack(res)
    return {"values": np.asarray(values, dtype=np.float64).tolist(),
            "stderr": None if stderr is None else np.asarray(stderr, dtype=np.float64).tolist(),
            "refits": int(refits), "cpu_s": cpu, "wall_s": wall, "load_start": load0, "load_end": os.getloadavg()[0],
            "threads": torch.get_num_threads(), "version": version, "torch": torch.__version__}


if __name__ == "__main__":
    out = {"ours": run_ours, "pydvl": run_pydvl, "opendataval": run_opendataval}[JOB["lib"]]()
    json.dump({**JOB, **out}, open(sys.argv[2], "w"))
