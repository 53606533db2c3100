"""The semivalue methods users pick: Beta Shapley, Data Banzhaf (MSR) and asymmetric Data
Shapley, each `core.Semivalue` with its weight and sampler fixed (Data Shapley itself, with its
G-Shapley variant, is `dvgs_fast.methods.shapley.DataShapley`)."""
from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from dvgs_fast.methods.semivalues.core import Semivalue
from dvgs_fast.methods.semivalues.permutations import group_ordered_draw
from dvgs_fast.methods.semivalues.weights import BetaWeight


def takes_semivalue_settings(fixed: tuple[str, ...], defaults: dict[str, Any] | None = None):
    """Class decorator: the constructor's public signature is its own parameters followed by
    every setting of `Semivalue` it does not fix (`**kwargs` passes them on). One list of
    settings, read by ``settings()`` (the result's params) and by the command line."""
    def deco(cls):
        own = inspect.signature(cls.__init__)
        params = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        names = {p.name for p in params} | set(fixed) | {"self"}
        for name, p in inspect.signature(Semivalue.__init__).parameters.items():
            if name not in names:
                params.append(p.replace(default=(defaults or {}).get(name, p.default)))
        cls.__init__.__signature__ = own.replace(parameters=params)
        return cls
    return deco


@takes_semivalue_settings(fixed=("weight", "sampler"))
class BetaShapley(Semivalue):
    """Beta(alpha, beta) Shapley (Kwon & Zou, AISTATS 2022) by weighted permutation sampling.

    Every permutation marginal at position k is weighted by n q(k), q the Beta-binomial subset
    size distribution (`weights.BetaWeight`), so the mean is an unbiased estimate of the Beta
    Shapley value (up to TMC truncation, ``tolerance``; None disables it). alpha > beta weights
    small subsets, where a noisy point's marginal is largest: Beta(16, 1), the default, is the
    paper's recommendation; Beta(1, 1) is Data Shapley. Other settings: see `core.Semivalue`.
    """

    def __init__(self, model: Any = "logistic", alpha: float = 16.0, beta: float = 1.0, **kwargs):
        _refuse_fixed(type(self), kwargs)
        self.alpha, self.beta = alpha, beta
        super().__init__(model, BetaWeight(alpha, beta), sampler="permutation", **kwargs)

    @property
    def name(self) -> str:
        return "beta_shapley"


@takes_semivalue_settings(fixed=("weight", "sampler", "tolerance", "truncation_patience", "chunk_size",
                                 "resampling_samples", "resampling_method", "resampling_inner"),
                          defaults={"batch_size": 64})
class DataBanzhaf(Semivalue):
    """Data Banzhaf (Wang & Jia, AISTATS 2023) by maximum sample reuse (MSR).

    Each sample is a uniform random subset, refit once; every point's value is the mean score of
    the samples that contain it minus the mean of those that do not (`msr.py`). ``batch_size``
    subsets are refit as one batch (torch) or spread over ``n_jobs`` joblib workers (sklearn).
    Other settings: see `core.Semivalue` (no truncation: MSR has no permutations).
    """

    def __init__(self, model: Any = "logistic", **kwargs):
        _refuse_fixed(type(self), kwargs)
        kwargs.setdefault("batch_size", 64)
        super().__init__(model, "banzhaf", sampler="msr", tolerance=None, **kwargs)

    @property
    def name(self) -> str:
        return "banzhaf"


@takes_semivalue_settings(fixed=("weight", "sampler", "resampling_samples", "resampling_method",
                                 "resampling_inner"))
class AsymmetricShapley(Semivalue):
    """Asymmetric Data Shapley (Zheng et al. 2024): Data Shapley averaged only over the
    permutations that respect an order of groups of the data -- every point of an earlier group
    before every point of a later one, e.g. data collected in stages, or originals before their
    augmentations. A point's value is then its Shapley value within its group, with all earlier
    groups already present; the values still add up to U(all) - U(empty), and with one group
    this is Data Shapley.

    groups : [N] group label of every source sample (integers or strings).
    order : the group labels, earliest first (default: the sorted distinct labels).
    Other settings: see `core.Semivalue` (Shapley weights, permutation sampling, TMC truncation).
    For a KNN utility the values have a closed form: ``KNNShapley(k, groups=...)``.
    """

    def __init__(self, model: Any = "logistic", groups: Any = None, *, order: Any = None, **kwargs):
        _refuse_fixed(type(self), kwargs)
        self.groups, self.order, self._members = check_groups(groups, order)
        super().__init__(model, "shapley", sampler="permutation", **kwargs)

    def _check_data(self, data) -> None:
        if len(self.groups) != data.n_source:
            raise ValueError(f"groups: has {len(self.groups)} labels for {data.n_source} source samples")

    def _draw(self, n: int):
        return group_ordered_draw(self._members)

    @property
    def name(self) -> str:
        return "asymmetric_shapley"


def _refuse_fixed(cls, kwargs: dict) -> None:
    """A setting the class fixes (not in its signature) given anyway: one line naming it."""
    accepted = inspect.signature(cls.__init__).parameters
    for k in kwargs:
        if k not in accepted:
            raise ValueError(f"{k}: not a setting of {cls.__name__} (it fixes it, or there is no such setting); "
                             f"use dvgs_fast.methods.semivalues.Semivalue to choose the weight and sampler")


def check_groups(groups: Any, order: Any) -> tuple[np.ndarray, list, list[np.ndarray]]:
    """(labels [N], order, member indices of each group in order); ValueError naming the argument."""
    if groups is None:
        raise ValueError("groups: AsymmetricShapley needs the group label of every source sample")
    if hasattr(groups, "detach"):
        groups = groups.detach().cpu().numpy()
    g = np.asarray(groups)
    if g.ndim != 1 or g.size == 0:
        raise ValueError(f"groups: expected a non-empty 1-D sequence of labels, got shape {g.shape}")
    if g.dtype.kind == "f" and not np.isfinite(g).all():
        raise ValueError("groups: contains NaN/Inf labels")
    labels = sorted(np.unique(g).tolist())
    if order is None:
        order = labels
    else:
        order = list(np.asarray(order).tolist())
        if len(set(order)) != len(order):
            raise ValueError(f"order: repeats a group ({order})")
        missing = [x for x in labels if x not in order]
        extra = [x for x in order if x not in labels]
        if missing or extra:
            raise ValueError(f"order: must list every group exactly once (missing {missing}, unknown {extra})")
    members = [np.flatnonzero(g == lab) for lab in order]
    return g, order, members
