"""Valuation methods by command-line name: import, availability, and construction from options.

A method is built by matching options to its constructor's parameters (``inspect.signature``), so
the command line follows the classes as they are, without a second list of their settings:
an option the user set explicitly that the method does not take is an error naming both, a
per-dataset default it does not take is left out.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from ._errors import CLIError

# name -> (module, class, fixed keyword arguments, description)
METHODS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "dvgs": ("dvgs_fast.methods.dvgs", "DVGS", {}, "Data Valuation with Gradient Similarity (fast engine)"),
    "lossval": ("dvgs_fast.methods.lossval", "LossVal", {}, "LossVal (learned per-sample loss weights)"),
    "dvrl": ("dvgs_fast.methods.dvrl", "DVRL", {}, "Data Valuation with Reinforcement Learning"),
    "dshap": ("dvgs_fast.methods.shapley", "DataShapley", {"method": "tmc"},
              "Data Shapley (TMC; [method] method = \"gshapley\" for G-Shapley)"),
    "loo": ("dvgs_fast.methods.loo", "LeaveOneOut", {}, "leave-one-out"),
    "random": ("dvgs_fast.methods.random", "RandomValuation", {}, "random values (baseline)"),
    "knn_shapley": ("dvgs_fast.methods.knn_shapley", "KNNShapley", {}, "exact KNN-Shapley (Jia et al. 2019)"),
    "inrun_shapley": ("dvgs_fast.methods.in_run_shapley", "InRunShapley", {}, "In-Run Data Shapley (Wang et al. 2024)"),
    "tracin": ("dvgs_fast.methods.tracin", "TracIn", {}, "TracIn-CP (Pruthi et al. 2020)"),
    "data_oob": ("dvgs_fast.methods.data_oob", "DataOOB", {}, "Data-OOB: out-of-bag scores of bootstrap refits"),
    # semivalues: a default sample budget so that a run ends without --max-time ([method] max_updates,
    # stop or --max-time change it); they refit many models, so --model logistic is the affordable choice
    "beta_shapley": ("dvgs_fast.methods.semivalues", "BetaShapley", {"max_updates": 100},
                     "Beta(16, 1) Shapley (Kwon & Zou 2022): weighted TMC permutations, batched refits"),
    "banzhaf": ("dvgs_fast.methods.semivalues", "DataBanzhaf", {"max_updates": 2000},
                "Data Banzhaf by maximum sample reuse (Wang & Jia 2023), batched refits"),
    "lava": ("dvgs_fast.methods.lava", "LAVA", {}, "LAVA: optimal-transport data values (Just et al. 2023)"),
    # The API scores a model as passed (epochs=0, as dattri's GradDot); the command line builds an
    # untrained model, so it trains it on the source first, as TracIn does (its default 50 epochs).
    "grad_dot": ("dvgs_fast.methods.grad_similarity", "GradDot", {"epochs": 50},
                 "grad-dot: gradient dot product at the model trained on the source"),
    "grad_cos": ("dvgs_fast.methods.grad_similarity", "GradCos", {"epochs": 50},
                 "grad-cos: gradient cosine at the model trained on the source"),
    "trak": ("dvgs_fast.methods.trak", "TRAK", {"epochs": 30, "n_models": 5},
             "TRAK (Park et al. 2023): projected gradients of 5 models trained 30 epochs (--epochs)"),
    "logra": ("dvgs_fast.methods.trak", "LoGraInfluence", {"epochs": 30},
              "LoGra influence (Choe et al. 2024): projected gradients, damped Fisher"),
    "dvemb": ("dvgs_fast.methods.dvemb", "DataValueEmbedding", {},
              "data value embedding (Wang et al. 2024): trajectory-specific leave-one-out of one training run"),
    # A factory model is trained on the source first (50 epochs unless --epochs), then scored.
    "influence": ("dvgs_fast.methods.influence", "InfluenceFunction", {},
                  "influence functions (Koh & Liang 2017); --solver direct|cg|lissa|arnoldi|kfac|ekfac|datainf"),
}
_MODEL_PARAMS = ("model", "model_or_factory", "predictor")


class NotAvailable(CLIError):
    """The method needs an optional package that is not installed."""


def load_class(name: str):
    """The method's class, or NotAvailable naming the missing optional package."""
    if name not in METHODS:
        raise CLIError(f"--method: unknown method {name!r}; choose one of {', '.join(METHODS)}")
    mod_name, cls_name, _, _ = METHODS[name]
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing == "dvgs_fast":
            raise                      # our own module missing is a packaging bug, not a user error
        raise NotAvailable(f"--method {name}: {cls_name} needs the package {missing!r}: pip install {missing}") from None
    return getattr(mod, cls_name)


@dataclass
class Built:
    method: Any
    kwargs: dict[str, Any]  # what was passed (for the report), the model as a description


def build(name: str, model_factory, model_desc: str, *, explicit: dict[str, tuple[str, Any]],
          defaults: dict[str, Any], table: dict[str, Any]) -> Built:
    """Construct method ``name``.

    explicit  {param: (flag, value)}: set by the user on the command line or in the config's top
              level; an error if the method has no such parameter
    defaults  {param: value}: per-dataset defaults; skipped when the method has no such parameter
    table     the config's [method] table: passed as is, unknown keys are an error
    """
    cls = load_class(name)
    _, cls_name, fixed, _ = METHODS[name]
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):  # pragma: no cover - C classes etc.
        sig = None
    params = {} if sig is None else dict(sig.parameters)
    takes_any = sig is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = {k for k, p in params.items()
                if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}

    kwargs: dict[str, Any] = {}
    for k, v in fixed.items():
        if k in accepted or takes_any:
            kwargs[k] = v
    for k, v in defaults.items():
        if k in accepted or takes_any:
            kwargs[k] = v
    for k, (flag, v) in explicit.items():
        if k not in accepted and not takes_any:
            raise CLIError(f"{flag}: method {name!r} ({cls_name}) has no {k!r} setting")
        kwargs[k] = v
    for k, v in table.items():
        if k in _MODEL_PARAMS:
            raise CLIError(f"[method] {k}: the model is chosen with --model/--hidden/--dropout, not in [method]")
        if k not in accepted and not takes_any:
            valid = ", ".join(sorted(a for a in accepted if a not in _MODEL_PARAMS))
            raise CLIError(f"[method] {k}: not a setting of {cls_name} (valid: {valid})")
        kwargs[k] = v

    args: list[Any] = []
    first = next((p for p in params.values()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)),
                 None)
    shown = dict(kwargs)
    if first is not None and first.name in _MODEL_PARAMS:
        args.append(model_factory)
        shown = {first.name: model_desc, **shown}
    try:
        method = cls(*args, **kwargs)
    except ValueError as exc:
        raise CLIError(f"--method {name}: {exc}") from None
    except TypeError as exc:
        raise CLIError(f"--method {name}: bad settings for {cls_name}: {exc}") from None
    return Built(method, shown)
