"""Curves: corrupted-sample discovery, and test performance after removing high/low-valued data."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ._checks import as_fractions, as_mask, as_values, rank_order

DEFAULT_DISCOVERY_FRACTIONS = np.linspace(0.0, 1.0, 21)
DEFAULT_REMOVAL_FRACTIONS = np.linspace(0.0, 0.5, 11)


@dataclass
class DiscoveryCurve:
    """found[i] = fraction of all corrupted samples among the ``fractions[i] * n`` lowest values.

    ``random`` is the expected curve of a random ranking (= fraction inspected) and ``optimal``
    the best possible one (all inspected samples corrupted until none is left).
    """

    fractions: np.ndarray
    found: np.ndarray
    random: np.ndarray
    optimal: np.ndarray
    n: int
    n_corrupted: int

    def auc(self) -> float:
        """Area under ``found`` over the fraction range, divided by the range (1 = perfect at once)."""
        span = float(self.fractions[-1] - self.fractions[0])
        if span <= 0:
            return float(self.found.mean())
        trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
        return float(trapezoid(self.found, self.fractions) / span)


def discovery_curve(values, is_corrupted, fractions=None, *, seed: int | None = 0) -> DiscoveryCurve:
    """Fraction of corrupted samples found when inspecting the lowest-valued samples first.

    fractions  fractions of the data inspected (default 0, 0.05, ..., 1); ``k = round(f * n)``
    seed       breaks ties in the values at random (reproducibly)
    """
    v = as_values(values)
    m = as_mask(is_corrupted, v.shape[0])
    fr = as_fractions(DEFAULT_DISCOVERY_FRACTIONS if fractions is None else fractions)
    n, n_bad = v.shape[0], int(m.sum())
    order = rank_order(v, seed)
    found_cum = np.concatenate([[0], np.cumsum(m[order])])  # corrupted among the k lowest
    k = np.rint(fr * n).astype(np.int64)
    return DiscoveryCurve(fractions=fr, found=found_cum[k] / n_bad, random=k / n,
                          optimal=np.minimum(k, n_bad) / n_bad, n=n, n_corrupted=n_bad)


# ---------------------------------------------------------------------------------------------
# removal curves
# ---------------------------------------------------------------------------------------------
class TorchClassifier:
    """Minimal sklearn-style wrapper that trains a fresh torch module (cross-entropy, Adam).

    Lets ``remove_curve(model=lambda: nn.Sequential(...))`` use a torch model: the factory is
    called for each fit, so every point of a curve starts from a new initialisation.
    """

    def __init__(self, factory: Callable[[], Any], *, epochs: int = 50, lr: float = 1e-3,
                 batch_size: int = 128, weight_decay: float = 0.0, seed: int = 0, device: str = "cpu"):
        self.factory, self.epochs, self.lr = factory, epochs, lr
        self.batch_size, self.weight_decay, self.seed, self.device = batch_size, weight_decay, seed, device
        self.module = None

    def fit(self, X, y):
        import torch
        g = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        self.module = self.factory().to(self.device)
        X = torch.as_tensor(np.asarray(X), dtype=torch.float32, device=self.device)
        y = torch.as_tensor(np.asarray(y), dtype=torch.long, device=self.device)
        opt = torch.optim.Adam(self.module.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        loss_fn = torch.nn.CrossEntropyLoss()
        self.module.train()
        n = X.shape[0]
        for _ in range(self.epochs):
            perm = torch.randperm(n, generator=g).to(self.device)
            for s in range(0, n, self.batch_size):
                idx = perm[s:s + self.batch_size]
                opt.zero_grad(set_to_none=True)
                loss_fn(self.module(X[idx]), y[idx]).backward()
                opt.step()
        return self

    def predict_proba(self, X):
        import torch
        self.module.eval()
        with torch.no_grad():
            out = self.module(torch.as_tensor(np.asarray(X), dtype=torch.float32, device=self.device))
            return torch.softmax(out, dim=1).cpu().numpy()

    def predict(self, X):
        return self.predict_proba(X).argmax(axis=1)


def default_model(task: str = "classification"):
    """A fast, deterministic baseline: scikit-learn's LogisticRegression (lbfgs); for a regression
    (metric "r2") LinearRegression."""
    if task == "regression":
        from sklearn.linear_model import LinearRegression
        return LinearRegression()
    from sklearn.linear_model import LogisticRegression
    return LogisticRegression(max_iter=500)


METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "auroc", "r2")
METRIC_LABELS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "f1_macro": "macro F1",
                 "auroc": "AUROC", "r2": "R^2"}
SELECTIONS = ("rank", "quantile")
ENGINES = ("auto", "batched", "sequential")


def paper_settings(task: str) -> dict[str, Any]:
    """The DVGS paper's removal-curve settings (``filter_kwargs`` of its configs).

    classification (exp1/exp2/exp4, Adult and Blog): the experiment's MLP retrained with Adam
    lr 1e-4, 200 epochs, batch 250, 2 re-initialised replicates per point (their mean is the
    curve), fractions linspace(0, 0.5, 10), test ROC AUC of softmax[:, 1];
    reconstruction / regression (exp8, LINCS): the autoencoder, MSE, Adam lr 1e-3, 300 epochs,
    batch 500, 1 replicate, fractions linspace(0, 0.95, 10), test R^2 (uniform average over the
    outputs). Both remove by quantile threshold (``selection="quantile"``, ties kept) and score on
    the test set, as ``get_filtered_scores`` in the original's utils.py.
    """
    if task == "classification":
        return {"fractions": np.linspace(0.0, 0.5, 10), "epochs": 200, "lr": 1e-4, "batch_size": 250,
                "repeats": 2, "metric": "auroc", "selection": "quantile"}
    if task in ("regression", "reconstruction"):
        return {"fractions": np.linspace(0.0, 0.95, 10), "epochs": 300, "lr": 1e-3, "batch_size": 500,
                "repeats": 1, "metric": "r2", "selection": "quantile"}
    raise ValueError(f"task: unknown value {task!r}; choose 'classification', 'regression' or 'reconstruction'")


def _auroc(y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    """ROC AUC from class probabilities (columns = ``classes``): binary -> column 1 (the paper's
    softmax[:, 1]); multiclass -> one-vs-rest, macro average over the classes present in y_true."""
    from sklearn.metrics import roc_auc_score
    if classes.shape[0] == 2:
        return float(roc_auc_score(y_true == classes[1], proba[:, 1]))
    present = np.unique(y_true)
    P = proba[:, np.searchsorted(classes, present)]
    P = P / np.clip(P.sum(1, keepdims=True), 1e-300, None)   # sklearn's ovr wants rows summing to 1
    if present.shape[0] == 2:
        return float(roc_auc_score(y_true == present[1], P[:, 1]))
    return float(roc_auc_score(y_true, P, multi_class="ovr", average="macro", labels=present))


def score_predictions(metric, y_true, *, pred=None, proba=None, classes=None) -> float:
    """One point of a curve: ``metric`` of the test predictions (labels ``pred``, or class
    probabilities ``proba`` with columns ``classes``; for "r2" ``pred`` are the outputs)."""
    from sklearn import metrics as skm
    if callable(metric):
        return float(metric(y_true, pred))
    if metric == "auroc":
        return _auroc(y_true, proba, classes)
    if metric == "r2":
        return float(skm.r2_score(y_true, pred, multioutput="uniform_average"))
    if metric == "accuracy":
        return float(skm.accuracy_score(y_true, pred))
    if metric == "balanced_accuracy":
        return float(skm.balanced_accuracy_score(y_true, pred))
    return float(skm.f1_score(y_true, pred, average="macro"))


def removal_subsets(values, fractions, mode: str, selection: str = "rank", seed: int | None = 0) -> list[np.ndarray]:
    """The sorted training rows kept at each fraction.

    rank      remove exactly floor(f * n) samples, highest (mode "high") or lowest first, ties
              broken at random (seeded)
    quantile  the DVGS paper's rule: remove-low keeps ``values >= quantile(values, f)``,
              remove-high keeps ``values <= quantile(values, 1 - f)`` (numpy's linear
              interpolation), so tied values are kept or removed together
    """
    v = np.asarray(values, dtype=np.float64)
    n = v.shape[0]
    if selection == "quantile":
        if mode == "low":
            return [np.flatnonzero(v >= np.quantile(v, f)) for f in fractions]
        return [np.flatnonzero(v <= np.quantile(v, 1.0 - f)) for f in fractions]
    order = rank_order(v, seed, descending=(mode == "high"))
    n_remove = np.floor(np.asarray(fractions) * n + 1e-9).astype(np.int64)
    return [np.sort(order[k:]) for k in n_remove]


@dataclass
class RemovalCurve:
    """Test score after removing the ``fractions`` of samples with the highest/lowest values.

    ``scores[i]`` is the mean over the ``replicate_scores[i]`` (one per re-initialised refit).
    """

    fractions: np.ndarray
    scores: np.ndarray
    n_kept: np.ndarray
    mode: str
    metric: str
    label: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    replicate_scores: np.ndarray | None = None

    @property
    def metric_label(self) -> str:
        return METRIC_LABELS.get(self.metric, self.metric)


def _derived_seed(base: int, *keys: int) -> int:
    return int(np.random.SeedSequence([base, *keys]).generate_state(1)[0])


def _check_inputs(v, x_train, y_train, x_test, y_test, regression: bool):
    X, Xt = np.asarray(x_train), np.asarray(x_test)
    y, yt = np.asarray(y_train), np.asarray(y_test)
    if X.shape[0] != v.shape[0]:
        raise ValueError(f"x_train: has {X.shape[0]} rows but values has {v.shape[0]}")
    if y.shape[0] != v.shape[0]:
        raise ValueError(f"y_train: has {y.shape[0]} labels but values has {v.shape[0]}")
    if Xt.shape[0] != yt.shape[0] or Xt.shape[0] == 0:
        raise ValueError(f"y_test: has {yt.shape[0]} labels but x_test has {Xt.shape[0]} rows")
    for name, a in (("x_train", X), ("x_test", Xt)) + ((("y_train", y), ("y_test", yt)) if regression else ()):
        if a.dtype.kind not in "fiub":
            raise ValueError(f"{name}: expected numbers, got dtype {a.dtype}")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise ValueError(f"{name}: contains NaN/Inf")
    if regression and (y.ndim > 2 or y.shape[1:] != yt.shape[1:]):
        raise ValueError(f"y_test: targets of shape {yt.shape[1:]} do not match y_train's {y.shape[1:]}")
    if X.ndim > 2:  # images etc.: flatten for sklearn models; torch factories see flat input too
        X, Xt = X.reshape(X.shape[0], -1), Xt.reshape(Xt.shape[0], -1)
    return X, y, Xt, yt


def _model_kind(model, regression: bool):
    """("sklearn", make) or ("torch", factory): what fits the curve's points."""
    if model is None:
        return "sklearn", lambda: default_model("regression" if regression else "classification")
    if hasattr(model, "fit") and not isinstance(model, type):
        from sklearn.base import clone  # an estimator instance: a fresh unfitted copy per point
        return "sklearn", lambda: clone(model)
    if not callable(model):
        raise ValueError(f"model: expected a zero-argument factory (e.g. a class or lambda), got "
                         f"{type(model).__name__}; pass `lambda: est` so every fit gets a fresh model")
    est = model()
    import torch
    if isinstance(est, torch.nn.Module):
        return "torch", model
    if not (hasattr(est, "fit") and hasattr(est, "predict")):
        raise ValueError(f"model: the factory returned {type(est).__name__}, which has no fit/predict "
                         f"and is not a torch nn.Module")
    return "sklearn", model


def remove_curves(values, x_train, y_train, x_test, y_test, *, modes=("high", "low"), fractions=None,
                  model=None, metric="accuracy", seed: int | None = 0, label: str | None = None,
                  repeats: int = 1, selection: str = "rank", torch_options: dict | None = None,
                  progress: bool = False) -> dict[str, RemovalCurve]:
    """Retrain on the data left after removing high- and/or low-valued samples; score on the test set.

    Returns ``{mode: RemovalCurve}`` for each of ``modes``. Every refit of every curve is trained
    in one go: for a torch network that is a chain of Linear / parameter-free layers, all of
    them at once as one batch of networks (see ``_net_refits``).

    values          one value per training sample
    modes           "high": remove the top fraction first (a good valuation makes the score
                    drop fast); "low": remove the bottom fraction first (the score should hold
                    or rise, as corrupted samples go first)
    fractions       fractions removed, each in [0, 1) (default 0, 0.05, ..., 0.5)
    model           an sklearn-style estimator (instance, cloned per point, or zero-argument
                    factory) or a zero-argument factory of a torch ``nn.Module`` (trained with
                    mini-batch Adam, cross-entropy or MSE, see ``torch_options``); default
                    LogisticRegression (LinearRegression for "r2")
    metric          "accuracy", "balanced_accuracy", "f1_macro", "auroc" (from class
                    probabilities: binary column 1, multiclass one-vs-rest macro), "r2"
                    (a regression: y is a float target [n] or [n, outputs], e.g. y = x for an
                    autoencoder; uniform average over the outputs) or ``f(y_true, y_pred)``
    repeats         refits per point from different initialisations (and training noise);
                    the curve is their mean, ``replicate_scores`` keeps each. Replicate r of
                    point i starts from the same weights in both modes, as the paper's.
    selection       "rank" (exactly floor(f * n) removed, ties broken at random by ``seed``) or
                    "quantile" (the paper's thresholds; ties kept together), see
                    :func:`removal_subsets`
    seed            ties and the refits' initialisation / batch order / dropout
    torch_options   for a torch model: epochs (50), lr (1e-3), batch_size (128), weight_decay
                    (0), device ("cpu"), dtype (torch.float32), engine ("auto": batched when the
                    network allows it; "batched"; "sequential")
    label           name of the method, used as the legend entry by the plots

    With an sklearn model, if the kept data hold a single class that class is predicted.
    """
    from .._validation import check_choice, check_positive_int
    v = as_values(values)
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    if not modes:
        raise ValueError("modes: is empty")
    for md in modes:
        check_choice(md, "mode", ("high", "low"))
    if len(set(modes)) != len(modes):
        raise ValueError(f"modes: {modes} names a mode twice")
    if not callable(metric):
        check_choice(metric, "metric", METRICS)
    check_positive_int(repeats, "repeats")
    check_choice(selection, "selection", SELECTIONS)
    regression = metric == "r2"
    X, y, Xt, yt = _check_inputs(v, x_train, y_train, x_test, y_test, regression)
    fr = as_fractions(DEFAULT_REMOVAL_FRACTIONS if fractions is None else fractions, allow_one=False)
    subsets = {md: removal_subsets(v, fr, md, selection, seed) for md in modes}
    if any(len(s) < 1 for ss in subsets.values() for s in ss):
        raise ValueError("fractions: every point must keep at least one training sample")
    classes = None
    if not regression:
        classes = np.unique(np.concatenate([y.reshape(-1), yt.reshape(-1)]))
        if metric == "auroc" and np.unique(yt).size < 2:
            raise ValueError("y_test: AUROC needs test labels of at least two classes")
    kind, make = _model_kind(model, regression)
    base = int(seed) if seed is not None else int(np.random.SeedSequence().entropy % (2 ** 32))
    jobs = [(md, i, r) for md in modes for i in range(fr.shape[0]) for r in range(repeats)]
    if kind == "torch":
        scores, info = _torch_scores(make, jobs, subsets, X, y, Xt, yt, classes, metric, base,
                                     dict(torch_options or {}), progress)
    else:
        if torch_options:
            raise ValueError("torch_options: only for a torch model (a factory returning an nn.Module)")
        scores, info = _sklearn_scores(make, jobs, subsets, X, y, Xt, yt, classes, metric, base,
                                       repeats, progress)
    name = metric if isinstance(metric, str) else getattr(metric, "__name__", "custom")
    info.update({"repeats": repeats, "selection": selection})
    out = {}
    for md in modes:
        rep = np.array([[scores[(md, i, r)] for r in range(repeats)] for i in range(fr.shape[0])])
        out[md] = RemovalCurve(fractions=fr, scores=rep.mean(1), n_kept=np.array([len(s) for s in subsets[md]]),
                               mode=md, metric=name, label=label, info=dict(info), replicate_scores=rep)
    return out


def _sklearn_scores(make, jobs, subsets, X, y, Xt, yt, classes, metric, base, repeats, progress):
    want_proba = metric == "auroc"
    it = jobs
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(jobs, desc="removal curves")
    scores = {}
    for md, i, r in it:
        keep = subsets[md][i]
        yk = y[keep]
        proba = pred = None
        if classes is not None and np.unique(yk).size < 2:
            c = yk[0]
            pred = np.full(yt.shape[0], c)
            proba = np.zeros((yt.shape[0], classes.shape[0]))
            proba[:, np.searchsorted(classes, c)] = 1.0
        else:
            est = make()
            if repeats > 1 and "random_state" in getattr(est, "get_params", lambda: {})():
                est.set_params(random_state=_derived_seed(base, 0, i, r) % (2 ** 31))
            est.fit(X[keep], yk)
            if want_proba:
                if not hasattr(est, "predict_proba"):
                    raise ValueError(f"model: metric 'auroc' needs predict_proba, which "
                                     f"{type(est).__name__} does not have")
                proba = np.zeros((yt.shape[0], classes.shape[0]))
                proba[:, np.searchsorted(classes, est.classes_)] = est.predict_proba(Xt)
            else:
                pred = est.predict(Xt)
        scores[(md, i, r)] = score_predictions(metric, yt, pred=pred, proba=proba, classes=classes)
    return scores, {"engine": "sklearn"}


def _torch_scores(factory, jobs, subsets, X, y, Xt, yt, classes, metric, base, opts, progress):
    import torch
    from . import _net_refits as R
    allowed = {"epochs", "lr", "batch_size", "weight_decay", "device", "dtype", "engine"}
    unknown = set(opts) - allowed
    if unknown:
        raise ValueError(f"torch_options: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    engine = opts.pop("engine", "auto")
    from .._validation import check_choice, check_positive_int
    check_choice(engine, "torch_options['engine']", ENGINES)
    cfg = R.NetSettings(loss="mse" if classes is None else "ce", **opts)
    check_positive_int(cfg.epochs, "torch_options['epochs']")
    check_positive_int(cfg.batch_size, "torch_options['batch_size']")
    if not (isinstance(cfg.lr, (int, float)) and cfg.lr > 0):
        raise ValueError(f"torch_options['lr']: expected a positive number, got {cfg.lr!r}")
    dt, dev = cfg.dtype, torch.device(cfg.device)
    Xtr = torch.as_tensor(np.asarray(X, dtype=np.float64), dtype=dt, device=dev)
    Xte = torch.as_tensor(np.asarray(Xt, dtype=np.float64), dtype=dt, device=dev)
    if classes is None:
        Ytr = torch.as_tensor(np.asarray(y, dtype=np.float64), dtype=dt, device=dev)
        n_out = 1 if y.ndim == 1 else y.shape[1]
    else:
        Ytr = torch.as_tensor(np.searchsorted(classes, y.reshape(-1)), dtype=torch.long, device=dev)
        n_out = classes.shape[0]
    probe = R.init_state(factory, 0).to(device=dev, dtype=dt)
    try:
        with torch.no_grad():
            o = probe.eval()(Xtr[:2])
    except Exception as exc:  # noqa: BLE001 - re-raised as a clear ValueError
        raise ValueError(f"model: forward pass on x_train rows failed ({type(exc).__name__}: {exc})") from exc
    if o.dim() != 2 or o.shape[1] != n_out:
        raise ValueError(f"model: expected output shape [n, {n_out}], got {tuple(o.shape)}")
    # a chain trains batched; "sequential" still draws its dropout masks the chain's way, so that
    # both engines compute the same networks
    chain = R.as_chain(probe, Xtr.shape[1])
    batched = chain is not None and engine != "sequential"
    if engine == "batched" and chain is None:
        raise ValueError("torch_options['engine']: 'batched' needs a network that is a chain of Linear and "
                         "parameter-free layers (activations, Dropout, LayerNorm without affine); use 'auto'")
    # replicate r of point i starts from the same weights in both modes (as the paper's loop)
    inits = {(i, r): R.init_state(factory, _derived_seed(base, 0, i, r)) for _, i, r in jobs}
    mode_id = {"high": 1, "low": 2}
    noise = [_derived_seed(base, mode_id[md], i, r) for md, i, r in jobs]
    rows = [subsets[md][i] for md, i, _ in jobs]
    if batched:
        params0 = R.stack_inits([inits[(i, r)] for _, i, r in jobs], chain.names)
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = lambda it: tqdm(it, desc=f"removal curves ({len(jobs)} refits, batched)")  # noqa: E731
        params = R.train_batched(chain, params0, Xtr, Ytr, rows, noise, cfg, progress=bar)
        outs = R.batched_outputs(chain, params, Xte)
    else:
        import copy
        it = range(len(jobs))
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, desc="removal curves")
        outs = []
        for j in it:
            _, i, r = jobs[j]
            net = R.train_sequential(copy.deepcopy(inits[(i, r)]), Xtr, Ytr, rows[j], noise[j], cfg, chain)
            with torch.no_grad():
                outs.append(net(Xte))
        outs = torch.stack(outs)
    scores = {}
    for j, job in enumerate(jobs):
        out = outs[j].to("cpu", torch.float64)
        if classes is None:
            pred = out.numpy() if y.ndim == 2 else out[:, 0].numpy()
            scores[job] = score_predictions(metric, yt, pred=pred)
        else:
            proba = torch.softmax(out, -1).numpy()
            scores[job] = score_predictions(metric, yt, pred=classes[proba.argmax(1)], proba=proba, classes=classes)
    info = {"engine": "batched" if batched else "sequential", "epochs": cfg.epochs, "lr": cfg.lr,
            "batch_size": cfg.batch_size, "loss": "cross-entropy" if classes is not None else "MSE"}
    return scores, info


def remove_curve(values, x_train, y_train, x_test, y_test, *, mode: str = "high", **kw) -> RemovalCurve:
    """One curve of :func:`remove_curves` (``mode`` "high" or "low"; same keyword arguments)."""
    from .._validation import check_choice
    check_choice(mode, "mode", ("high", "low"))
    return remove_curves(values, x_train, y_train, x_test, y_test, modes=(mode,), **kw)[mode]


def remove_high_curve(values, x_train, y_train, x_test, y_test, **kw) -> RemovalCurve:
    """:func:`remove_curve` with ``mode="high"``."""
    return remove_curve(values, x_train, y_train, x_test, y_test, mode="high", **kw)


def remove_low_curve(values, x_train, y_train, x_test, y_test, **kw) -> RemovalCurve:
    """:func:`remove_curve` with ``mode="low"``."""
    return remove_curve(values, x_train, y_train, x_test, y_test, mode="low", **kw)
