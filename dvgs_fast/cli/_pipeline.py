"""The steps of one valuation run, shared by ``run`` and ``compare``: load and corrupt the data
for a seed, build the method with its model, value, and score the values (detection metrics,
removal curves)."""
from __future__ import annotations

import sys
import time
import warnings
from typing import Any

import numpy as np

from ._errors import CLIError, one_line
from ._options import METHOD_OPTIONS, REMOVAL_FRACTIONS, curve_spec, flag_of, version
from ._plan import Plan


# Methods whose natural end can be hours away on a CPU get a default time budget when neither the
# command line nor the config sets one, printed at the start (never silently). Data Shapley (TMC)
# runs until its convergence rule holds; DVRL runs 2000 outer iterations. Measured on Adult
# (1000 source / 400 target, 1 thread, this project's 2-core CPU): TMC with the default linear refit
# costs ~0.7 CPU s per permutation, DVRL with the CLI's MLP predictor ~0.25 CPU s per outer
# iteration. Ten minutes thus gives ~800 permutations (the DVGS paper ran 200-1000) and about the
# full 2000 DVRL iterations on an idle core, and still answers within a coffee break; on a busy
# machine the run stops earlier, says status "stopped", and its report opens with a banner.
DEFAULT_MAX_TIME = {"dvrl": 600.0, "dshap": 600.0}


def load_data(plan: Plan, seed: int):
    """(RunData, noise, preset, seconds) for one seed: loaded, split and corrupted."""
    from . import _data as D
    status, settings, spec, root = plan.status, plan.settings, plan.spec, plan.root
    t0 = time.perf_counter()
    status(f"loading {spec.label}" + (f" from {root}" if root is not None else ""))
    split = D.split_and_corrupt
    target = None
    if plan.lincs_gctx is not None:
        from . import _lincs
        status(f"reading {plan.lincs_gctx} (z-score statistics: one pass over the file)")
        loaded, preset, split = (_lincs.load(plan.lincs_gctx, settings.get("target_balance_by")), _lincs.PRESET,
                                 _lincs.split)
    elif plan.target_path is not None:
        loaded, target = D.load_csv_pair(spec.path, plan.target_path, settings.get("label_column"))
        preset = D.PRESETS[loaded.preset]
    else:
        loaded = D.load(spec, root, download=bool(settings.get("download")), label_column=settings.get("label_column"))
        preset = D.PRESETS[loaded.preset]
    noise = plan.noise
    if noise is None:
        # Your own target file means your own data: nothing is corrupted on purpose unless asked.
        noise = D.parse_noise("none" if target is not None else preset["noise"])
    if target is not None:
        data = D.split_with_target(loaded, target, settings.get("n_source"), settings.get("n_target"),
                                   settings.get("n_test"), noise, seed, max_test=preset.get("max_test"))
    else:
        n_source = settings.get("n_source", preset["n_source"])
        # An explicit --n-target is used as given; only the out-of-core LINCS run sizes its default
        # from the file (None), so it must see whether the user set it.
        n_target = settings.get("n_target", None if plan.lincs_gctx is not None else preset["n_target"])
        data = split(loaded, n_source, n_target, settings.get("n_test"), noise, seed, max_test=preset.get("max_test"))
    return data, noise, preset, time.perf_counter() - t0


def accepted_params(method: str) -> set[str] | None:
    """Names the method's constructor takes (None: it takes any keyword)."""
    import inspect
    from ._methods import load_class
    try:
        params = inspect.signature(load_class(method)).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def build_method(plan: Plan, method: str, data, preset: dict[str, Any], seed: int,
                  table: dict[str, Any], *, skip_foreign: bool = False):
    """(Built, model description, budget line or None). skip_foreign: an explicit option this
    method does not take is left out (compare: --epochs is for the methods that have epochs)."""
    from . import _models as M
    from ._methods import build
    settings = plan.settings
    choice = plan.model_choice
    table = dict(table)
    if "model" in table and "model" not in settings:
        # [method.NAME] model = "logistic": a per-method --model (a comparison's refitting
        # methods may need a cheaper model than the gradient methods). With --model as well,
        # build() refuses the table entry (two explicit choices).
        if not (isinstance(table["model"], str) and table["model"] in M.MODEL_CHOICES):
            raise CLIError(f"[method] model: expected one of {', '.join(M.MODEL_CHOICES)} (the model's kind, as "
                           f"--model), got {table['model']!r}")
        choice = table.pop("model")
    kind = M.resolve_kind(choice, data.task, data.sample_shape, method)
    hidden = settings.get("hidden", M.default_hidden(kind))
    dropout = settings.get("dropout", preset["dropout"])
    n_out = data.n_classes if data.task == "classification" else 0
    arch = M.arch_options(settings)     # --num-layers / --latent-channels (the original LINCS flags)
    model_factory = M.factory(kind, data.sample_shape, n_out, hidden=hidden, dropout=dropout, **arch)
    model_desc = M.describe(kind, data.sample_shape, n_out, hidden, dropout, **arch)
    explicit = {k: (flag_of(k), settings[k]) for k in METHOD_OPTIONS if k in settings}
    if skip_foreign:
        accepted = accepted_params(method)
        if accepted is not None:
            explicit = {k: v for k, v in explicit.items() if k in accepted}
    defaults: dict[str, Any] = {"seed": seed, "progress": plan.progress}
    if plan.device is not None:
        explicit["device"] = ("--device", plan.device)
    if data.task == "reconstruction":
        defaults["loss"] = "mse"
    if method == "dvgs":
        defaults.update(preset["dvgs"])
    budget = None
    if "max_time" not in explicit and "max_time" not in table and method in DEFAULT_MAX_TIME:
        defaults["max_time"] = DEFAULT_MAX_TIME[method]
        budget = (f"{method}: time budget {DEFAULT_MAX_TIME[method]:g} s (the default for {method}; "
                  f"--max-time SECONDS to change it)")
    built = build(method, model_factory, model_desc, explicit=explicit, defaults=defaults, table=table)
    return built, model_desc, budget


def run_method(plan: Plan, method: str, built, data):
    """(result, wall seconds, CPU seconds, the method's warnings as one-line notes)."""
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = built.method.fit(data.x_source, data.y_source, data.x_target, data.y_target)
        except ValueError as exc:
            raise CLIError(f"{method}: {one_line(exc)}") from None
    t_value, c_value = time.perf_counter() - t0, time.process_time() - c0
    notes: list[str] = []
    # The method's own warnings (a budget that ran out, ...) belong in the report, once each.
    for w in caught:
        if issubclass(w.category, (UserWarning, RuntimeWarning)):
            msg = f"warning: {one_line(w.message)}"
            if msg not in notes:
                notes.append(msg)
    values = np.asarray(result.values, dtype=np.float64)
    valued = np.asarray(result.counts) > 0
    if values.shape != (data.n_source,) or not np.all(np.isfinite(values[valued])):
        raise CLIError(f"{method}: returned {values.shape} values, {int((~np.isfinite(values)).sum())} "
                       f"not finite, for {data.n_source} source samples")
    return result, t_value, c_value, notes


def score_values(values: np.ndarray, counts: np.ndarray, data, seed: int, *, label: str, want_curves: bool,
           progress: bool, status=None, settings: dict[str, Any] | None = None):
    """(metrics, removal curves, why the curves were skipped or None, notes).

    Metrics are computed over the valued samples only (counts > 0): a budget-stopped run's
    unvalued samples hold placeholders, and scoring them would measure the budget, not the method.
    Removal curves retrain on the data ranked by value, which needs every sample ranked; their
    model is --curve-model (``settings``): a logistic regression, or the paper's network and
    filter settings (see :func:`curve_setup`)."""
    from ..evaluate import summarize
    valued = np.asarray(counts) > 0
    k, n = int(valued.sum()), int(values.shape[0])
    notes: list[str] = []
    bad = None if data.is_corrupted is None else np.asarray(data.is_corrupted, dtype=bool)[valued]
    if bad is not None and (bad.all() or not bad.any()):
        notes.append(f"the {k} valued samples hold {int(bad.sum())} corrupted ones: detection metrics need "
                     f"both kinds, so they are not computed")
        bad = None
    sigma = None if data.sigma is None else np.asarray(data.sigma)[valued]
    if k:
        metrics = summarize(values[valued], bad, sigma, random_state=seed)
    else:
        metrics = {"n": 0}
    if k < n:
        metrics["n_unvalued"] = n - k
    curves, skipped = [], None
    spec = curve_spec(settings or {})
    paper = spec["model"] == "paper"
    if want_curves and data.n_test > 0 and (
            (data.task == "classification" and np.unique(data.y_test).size > 1)
            or (paper and data.task == "reconstruction")):
        if k < n:
            skipped = (f"Removal curves were skipped: they retrain on the data ranked by value, and {n - k} "
                       f"samples have no value.")
        else:
            from ..evaluate import remove_curves
            kw, desc = curve_setup(spec, data)
            if status is not None:
                status(f"removal curves: retraining {desc}")
            xs = data.x_source.reshape(data.n_source, -1)
            xt = data.x_test.reshape(data.n_test, -1)
            ys, yt = (data.y_source, data.y_test) if data.task == "classification" else (xs, xt)
            try:
                got = remove_curves(values, xs, ys, xt, yt, seed=seed, label=label, progress=progress, **kw)
            except ValueError as exc:
                raise CLIError(f"removal curves: {one_line(exc)}") from None
            for mode in ("high", "low"):
                c = got[mode]
                c.info["model"] = desc
                curves.append(c)
                metrics[f"remove_{mode}"] = {
                    "fractions": c.fractions.tolist(), "scores": c.scores.tolist(), "metric": c.metric,
                    "replicate_scores": c.replicate_scores.tolist(), "n_kept": c.n_kept.tolist(),
                    "model": desc, "curve_model": spec["model"], "epochs": c.info.get("epochs"),
                    "repeats": c.info["repeats"], "selection": c.info["selection"]}
    return metrics, curves, skipped, notes


def curve_setup(spec: dict[str, Any], data) -> tuple[dict[str, Any], str]:
    """(keyword arguments of remove_curves, a one-line description) for --curve-model.

    logistic: scikit-learn's LogisticRegression, test accuracy at REMOVAL_FRACTIONS, exactly
    floor(f * n) samples removed. paper: the DVGS paper's ``filter_kwargs`` (configs/exp1, exp2,
    exp4; exp8 for lincs) -- the experiment's network re-initialised per refit, mini-batch Adam,
    the paper's fractions, replicates averaged, quantile thresholds, scored on the test set;
    --curve-epochs / --curve-repeats override its epochs / replicates."""
    if spec["model"] == "logistic":
        return ({"fractions": REMOVAL_FRACTIONS, "metric": "accuracy"},
                "logistic regression (scikit-learn, lbfgs), test accuracy")
    from ..evaluate import paper_settings
    from ._models import autoencoder, mlp
    d = int(np.prod(data.x_source.shape[1:]))
    task = "classification" if data.task == "classification" else "reconstruction"
    ps = paper_settings(task)
    epochs = spec["epochs"] or ps["epochs"]
    repeats = spec["repeats"] or ps["repeats"]
    if task == "classification":
        n_out = data.n_classes
        factory = lambda: mlp(d, n_out, 100, 0.5, 2)  # noqa: E731 - the exp1/exp2 network
        net = f"the paper's MLP {d}-100-100-{n_out} (Mish, dropout 0.5, LayerNorm)"
    else:
        factory = lambda: autoencoder(d, 250, 32, 2, 0.0)  # noqa: E731 - the exp8 autoencoder
        net = f"the paper's autoencoder {d}-250-250-32-250-250-{d} (Mish, MSE)"
    kw = {"fractions": ps["fractions"], "metric": ps["metric"], "model": factory, "repeats": repeats,
          "selection": ps["selection"],
          "torch_options": {"epochs": epochs, "lr": ps["lr"], "batch_size": ps["batch_size"]}}
    metric = "AUROC" if ps["metric"] == "auroc" else "R^2"
    desc = (f"{net}, Adam lr {ps['lr']:g}, {epochs} epochs, batch {ps['batch_size']}, "
            f"{repeats} replicate{'s' if repeats > 1 else ''} per point, test {metric}")
    return kw, desc


def versions() -> dict[str, str]:
    import dvgs_fast
    import torch
    return {"dvgs_fast": getattr(dvgs_fast, "__version__", version()), "torch": torch.__version__,
            "python": sys.version.split()[0]}
