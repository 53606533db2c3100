"""DVRL: data valuation using reinforcement learning (Yoon, Arik & Pfister, ICML 2020).

A value estimator h(x, y, |y - f_target(x)|) -> p in (0, 1) (the selection probability) is trained
with REINFORCE. Per outer iteration:

1. draw a batch of `batch_size` source points (capped at N);
2. sample a selection s ~ Bernoulli(p); if nothing is selected, resample with p = 0.5 (as the
   original code);
3. train the predictor from the *same initial weights* on the selected points
   (`inner_iterations` Adam steps on minibatches of `predictor_batch_size`);
4. reward = target score of that predictor - baseline;
5. estimator loss = -reward * sum(s log p + (1-s) log(1-p))
                    + 1e3 * (max(mean p - threshold, 0) + max((1 - threshold) - mean p, 0)),
   one Adam step with `learning_rate`.

Baseline: 'moving_average' (default) -- exponential moving average of past scores with window
`ma_window` (the paper, delta <- (T-1)/T delta + score/T), started at the fixed baseline; or
'fixed' -- score of the predictor trained on all source data (the Google code).

The estimator is the original architecture: `n_layers` - 2 layers of `hidden_dim` on
[x, y] (one-hot for classification) down to `comb_dim`, concatenated with |y - y_hat| of a model
trained on the target set, one `comb_dim` layer, then a sigmoid output. Values are the final
selection probabilities of all source points.

The predictor's inner training uses minibatch steps (`inner_iterations` of them) where the Keras
code ran `inner_iterations` epochs over the batch; with the DVGS authors' PyTorch port, steps.
"""
from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from dvgs_fast._utils import seed_everything
from dvgs_fast._validation import (check_choice, check_dtype, check_model_spec, check_optional_positive_int,
                                   check_positive_float, check_positive_int, prepare_inputs, resolve_metric)
from dvgs_fast.methods.base import Estimate, Run, Valuation
from dvgs_fast.refit.models import check_model_output, make_model, score_outputs

BASELINES = ("fixed", "moving_average")
DVRL_METRICS = ("accuracy", "auc", "neg_log_loss", "neg_mse", "neg_mae")


class ValueEstimator(nn.Module):
    """The DVRL value estimator (original layer layout)."""

    def __init__(self, x_dim: int, y_dim: int, hidden_dim: int = 100, comb_dim: int = 10, n_layers: int = 5,
                 activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(x_dim + y_dim, hidden_dim), activation()]
        for _ in range(n_layers - 3):
            layers += [nn.Linear(hidden_dim, hidden_dim), activation()]
        layers += [nn.Linear(hidden_dim, comb_dim), activation()]
        self.body = nn.Sequential(*layers)
        self.comb = nn.Sequential(nn.Linear(comb_dim + y_dim, comb_dim), activation())
        self.out = nn.Linear(comb_dim, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_diff: torch.Tensor) -> torch.Tensor:
        h = self.body(torch.cat([x, y], dim=1))
        h = self.comb(torch.cat([h, y_diff], dim=1))
        return torch.sigmoid(self.out(h)).squeeze(1)


class DVRL(Valuation):
    """Data valuation using reinforcement learning.

    Parameters
    ----------
    model : predictor, 'logistic' | 'mlp' (Linear-ReLU-Linear, `predictor_hidden` units) | nn.Module
        | zero-argument factory. Its initial weights are kept; every inner fit restarts from them.
    loss : 'cross_entropy' (classification) or 'mse' (regression).
    metric : reward metric; 'auc' (binary default, as the DVGS experiments), 'accuracy' (multiclass
        default), 'neg_log_loss'; regression 'neg_mse' (default) or 'neg_mae'.
    baseline : 'moving_average' (the paper, default) with window `ma_window`, or 'fixed' (the Google
        code). Measured on breast_cancer, 20% flipped, 150 iterations, 6 seeds: moving average
        AUROC 0.88-0.98 every time; fixed 0.70-0.98 but twice *inverted* (0.02, 0.03): with a fixed
        baseline every reward carries the same negative offset (a subset scores below the full
        data), which adds zero-mean noise to REINFORCE that a short run does not average out.
    hidden_dim, comb_dim, n_layers : value estimator (original 100, 10, 5).
    batch_size : outer batch (original 2000, capped at N).
    inner_iterations, predictor_batch_size, predictor_lr : predictor training (100 steps, 256, 0.01).
        The Keras original ran 100 *epochs* at Adam's default 1e-3 (~800 steps for 2000 points);
        with 100 steps, 1e-3 leaves the predictor near its initialisation and the reward carries
        almost no signal (measured on breast_cancer: inverted or chance-level values), so the
        default learning rate is 0.01.
    learning_rate : value estimator Adam learning rate (0.01).
    threshold, penalty, epsilon : the selection-rate penalty and log epsilon (0.9, 1e3, 1e-8).
    n_iterations : outer iterations (original 2000); max_time : wall-clock budget in seconds.
    """

    name = "dvrl"

    def __init__(self, model: Any = "logistic", *, loss: str = "cross_entropy", metric: str | None = None,
                 baseline: str = "moving_average", ma_window: int = 20, hidden_dim: int = 100, comb_dim: int = 10,
                 n_layers: int = 5, batch_size: int = 2000, inner_iterations: int = 100,
                 predictor_batch_size: int = 256, predictor_lr: float = 0.01, learning_rate: float = 0.01,
                 threshold: float = 0.9, penalty: float = 1e3, epsilon: float = 1e-8, n_iterations: int = 2000,
                 max_time: float | None = None, predictor_hidden: int = 100, n_classes: int | None = None,
                 dtype: str = "float32", device: Any = None, seed: int | None = None, progress: bool = True):
        self.model = check_model_spec(model)
        self.loss = check_choice(loss, "loss", ("cross_entropy", "mse"))
        if metric is not None:
            check_choice(metric, "metric", DVRL_METRICS)
        self.metric = metric
        self.baseline = check_choice(baseline, "baseline", BASELINES)
        self.ma_window = check_positive_int(ma_window, "ma_window")
        self.hidden_dim = check_positive_int(hidden_dim, "hidden_dim")
        self.comb_dim = check_positive_int(comb_dim, "comb_dim")
        self.n_layers = check_positive_int(n_layers, "n_layers")
        if self.n_layers < 3:
            raise ValueError(f"n_layers: the DVRL estimator needs at least 3 layers, got {n_layers}")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.inner_iterations = check_positive_int(inner_iterations, "inner_iterations")
        self.predictor_batch_size = check_positive_int(predictor_batch_size, "predictor_batch_size")
        self.predictor_lr = check_positive_float(predictor_lr, "predictor_lr")
        self.learning_rate = check_positive_float(learning_rate, "learning_rate")
        self.threshold = check_positive_float(threshold, "threshold")
        if not 0.5 <= self.threshold < 1.0:
            raise ValueError(f"threshold: must be in [0.5, 1), got {threshold}")
        self.penalty = check_positive_float(penalty, "penalty", allow_zero=True)
        self.epsilon = check_positive_float(epsilon, "epsilon")
        self.n_iterations = check_positive_int(n_iterations, "n_iterations")
        self.predictor_hidden = check_positive_int(predictor_hidden, "predictor_hidden")
        self.n_classes = check_optional_positive_int(n_classes, "n_classes")
        self.dtype = check_dtype(dtype)
        super().__init__(device=device, seed=seed, max_time=max_time, progress=progress)

    # ------------------------------------------------------------------------------------------
    def _fit(self, x_source, y_source, x_target, y_target, run: Run) -> Estimate:
        t0 = time.perf_counter()
        budget = run.budget
        budget.max_iterations = self.n_iterations
        data = prepare_inputs(x_source, y_source, x_target, y_target, loss=self.loss, n_classes=self.n_classes,
                              device=run.device, dtype=self.dtype, flatten=isinstance(self.model, str))
        metric = resolve_metric(self.metric, self.loss, n_classes=data.n_classes,
                                default_cls="auc" if data.n_classes == 2 else "accuracy")
        if metric == "r2":
            raise ValueError("metric: 'r2' is not a DVRL reward; use 'neg_mse' or 'neg_mae'")
        X, Y, Xt, Yt = data.x_source, data.y_source, data.x_target, data.y_target
        N = data.n_source
        seed = run.seed
        seed_everything(seed)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        dev = run.device

        predictor = make_model(self.model, int(np.prod(X.shape[1:])), data.out_dim,
                               hidden_dim=self.predictor_hidden).to(device=dev, dtype=self.dtype)
        check_model_output(predictor, X, data.out_dim)
        init_state = copy.deepcopy(predictor.state_dict())
        classification = data.classification

        def crit(out, y):
            if classification:
                return nn.functional.cross_entropy(out, y)
            return ((out[:, 0] - y) ** 2).mean()

        def fit_predictor(x, y):
            predictor.load_state_dict(init_state)
            predictor.train()
            opt = torch.optim.Adam(predictor.parameters(), lr=self.predictor_lr)
            n = x.shape[0]
            bs = min(self.predictor_batch_size, n)
            order, pos = torch.randperm(n, generator=gen), 0
            for _ in range(self.inner_iterations):
                if pos + bs > n:
                    order, pos = torch.randperm(n, generator=gen), 0
                idx = order[pos:pos + bs].to(dev)
                pos += bs
                opt.zero_grad(set_to_none=True)
                crit(predictor(x[idx]), y[idx]).backward()
                opt.step()
            predictor.eval()

        def target_score():
            with torch.no_grad():
                return float(score_outputs(predictor(Xt), Yt, metric))

        # y encoding and |y - y_hat| from a model trained on the target set (the original)
        if classification:
            y_enc = nn.functional.one_hot(Y, data.n_classes).to(self.dtype)
        else:
            y_enc = Y.reshape(-1, 1)
        fit_predictor(Xt, Yt)
        with torch.no_grad():
            out = predictor(X)
            y_hat = torch.softmax(out, 1) if classification else out[:, :1]
            y_diff = (y_enc - y_hat).abs()
        # baseline: predictor trained on all source data (the Google code's fixed baseline)
        fit_predictor(X, Y)
        full_score = target_score()
        baseline = full_score

        estimator = ValueEstimator(int(np.prod(X.shape[1:])), y_enc.shape[1], self.hidden_dim, self.comb_dim,
                                   self.n_layers).to(device=dev, dtype=self.dtype)
        est_opt = torch.optim.Adam(estimator.parameters(), lr=self.learning_rate)
        X_flat = X.reshape(N, -1)
        B = min(self.batch_size, N)
        t_setup = time.perf_counter() - t0
        rewards: list[float] = []
        n_done, stopped = 0, None
        resampled = 0
        bar = run.progress(self.n_iterations, "DVRL")
        try:
            while True:
                stopped = budget.exhausted(n_done)
                if stopped:
                    break
                idx = torch.randperm(N, generator=gen)[:B].to(dev)
                xb, yb, yeb, db = X_flat[idx], Y[idx], y_enc[idx], y_diff[idx]
                estimator.train()
                p = estimator(xb, yeb, db)
                p_sample = p.detach().cpu().double()
                s = torch.bernoulli(p_sample, generator=gen)
                if s.sum() == 0:
                    resampled += 1
                    s = torch.bernoulli(torch.full_like(p_sample, 0.5), generator=gen)
                sel = s.bool().to(dev)
                fit_predictor(X[idx][sel], yb[sel])
                score = target_score()
                reward = score - baseline
                s_d = s.to(device=dev, dtype=p.dtype)
                log_lik = (s_d * torch.log(p + self.epsilon) + (1 - s_d) * torch.log(1 - p + self.epsilon)).sum()
                mean_p = p.mean()
                loss = -reward * log_lik + self.penalty * (torch.relu(mean_p - self.threshold)
                                                           + torch.relu((1 - self.threshold) - mean_p))
                est_opt.zero_grad(set_to_none=True)
                loss.backward()
                est_opt.step()
                if self.baseline == "moving_average":
                    T = self.ma_window
                    baseline = (T - 1) / T * baseline + score / T
                rewards.append(reward)
                n_done += 1
                bar.update(1)
        finally:
            bar.close()

        estimator.eval()
        with torch.no_grad():
            values = torch.cat([estimator(X_flat[a:b], y_enc[a:b], y_diff[a:b])
                                for a, b in _chunks(N, 4096)])
        values_np = values.to("cpu", torch.float64).numpy()
        info = {"metric": metric, "iterations_done": n_done, "full_score": full_score,
                "final_baseline": baseline, "empty_selections_resampled": resampled,
                "mean_reward_last_100": float(np.mean(rewards[-100:])) if rewards else None,
                "mean_selection_probability": float(values_np.mean())}
        # n_iterations is what was asked: reaching it completes the run; only max_time stops it.
        return Estimate(values=values_np, status="stopped" if stopped == "max_time" else "completed",
                        stop_reason=stopped,
                        progress=f"{n_done} of {self.n_iterations} outer iterations", info=info,
                        timings={"setup": t_setup, "valuation": time.perf_counter() - t0 - t_setup})


def _chunks(n: int, size: int):
    for a in range(0, n, size):
        yield a, min(a + size, n)
