"""``dvgs_fast.compat.DVGS``: the original DVGS class (nathanieljevans/DVGS, ``dvgs/DVGS.py``),
same constructor, ``run``, ``agg``, ``clean`` and ``pretrain_``, backed by the dvgs_fast engine.

See the package docstring (``dvgs_fast/compat/__init__.py``) for what is identical to the
original and what differs.
"""
from __future__ import annotations

import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import _validation as V
from .._io import save_npy
from ..result import ValuationResult, stats_from_sums
from . import _identify as I
from . import _storage as S
from ._loop import n_snapshots, run_loop

STORAGES = ("auto", "files", "memmap")
_PREFIX = "dvgs_fast.compat:"


class SlowSimilarityWarning(UserWarning):
    """The similarity is a callable the fast engine does not know: per-sample gradients are formed."""


def _say(msg: str) -> None:
    print(f"{_PREFIX} {msg}", flush=True)


def _as_labels(y: Any, name: str) -> torch.Tensor:
    t = y.detach() if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))
    if t.dim() == 0 or t.shape[0] == 0:
        raise ValueError(f"{name}: is empty (0 labels)")
    if t.is_floating_point() and not V.all_finite(t):
        raise ValueError(f"{name}: contains NaN/Inf")
    return t


def _same_data(y: Any, x: Any, xt: torch.Tensor) -> bool:
    """y = x (the original's autoencoder convention): the same object, or equal values."""
    if y is None or y is x:
        return True
    if isinstance(y, torch.Tensor) and isinstance(x, torch.Tensor):
        return y.shape == x.shape and y.dtype == x.dtype and bool(torch.equal(y, x))
    return False


class DVGS:
    """Drop-in for the original ``DVGS`` class: ``from dvgs_fast.compat import DVGS``.

    DVGS(x_source, y_source, x_target, y_target, model)
        tensors (or arrays) as in the original: classification labels [N, 1] (or [N]) integer
        tensors, regression targets as floats, and y = x for autoencoders. ``model`` is trained
        in place, as in the original (after ``run`` it holds the last restart's weights).
    """

    def __init__(self, x_source, y_source, x_target, y_target, model):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.x_source = x_source
        self.y_source = y_source
        self.x_target = x_target
        self.y_target = y_target
        self.model = model
        self.result: ValuationResult | None = None     # of the last run(): values, stderr, info
        self.run_id = None

    # ------------------------------------------------------------------------------ pretrain_
    def pretrain_(self, crit, batch_size=256, lr=1e-3, epochs=100, use_cuda=True, verbose=True, report_metric=None):
        """In-place pre-training of the model on the source set (Adam), as the original's."""
        batch_size = V.check_positive_int(batch_size, "batch_size")
        epochs = V.check_positive_int(epochs, "epochs")
        lr = V.check_positive_float(lr, "lr")
        device = self._device(use_cuda, verbose)
        xs = V.as_float_tensor(self.x_source, "x_source")
        ys = xs if _same_data(self.y_source, self.x_source, xs) else _as_labels(self.y_source, "y_source")
        model = self.model.train().to(device)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for i in range(epochs):
            losses, metric = [], -666
            for idx in torch.split(torch.randperm(xs.shape[0]), batch_size):
                x, y = xs[idx].to(device), ys[idx].to(device)
                opt.zero_grad()
                yhat = model(x)
                loss = crit(yhat, y)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                if report_metric is not None:
                    metric = report_metric(y.detach().cpu().numpy(), yhat.detach().cpu().numpy())
            if verbose:
                print(f"epoch: {i} | loss: {np.mean(losses):.4f} | metric: {metric:0.4f}", end="\r")
        if verbose:
            print()

    # ------------------------------------------------------------------------------------ run
    def run(self, target_crit, source_crit, num_restarts=1, save_dir="./dvgs_results/",
            similarity=torch.nn.CosineSimilarity(dim=1), optim=torch.optim.Adam, lr=1e-2, num_epochs=100,
            compute_every=1, target_batch_size=512, source_batch_size=512, grad_params=None, verbose=True,
            use_cuda=True, uid=None, wd=0., *, seed: int | None = None, storage: str = "auto"):
        """Train on the target set, scoring every source sample's gradient against the target's;
        returns the run id. Snapshots land in ``save_dir/<run id>/`` (see _storage.py);
        ``agg(f"{save_dir}/{run_id}/")`` gives the values.

        The original's arguments, with the original's meaning. Ours, keyword-only:
        seed     the run's seed (target order, restart-0 initialisation, dropout); None draws it
                 from torch's global RNG, so ``torch.manual_seed(s)`` before ``run`` makes the
                 run reproducible. ``self.result.info["seed"]`` holds it.
        storage  "auto" | "files" (data_value_iter=K.npy, the original's) | "memmap" (one [N, K]
                 matrix; auto picks it above 1 GiB or 10,000 snapshots and says so).
        """
        t_start, c_start = time.perf_counter(), time.process_time()
        # ---- arguments (all checked before any work) -----------------------------------------
        for crit, name in ((target_crit, "target_crit"), (source_crit, "source_crit")):
            if not callable(crit):
                raise ValueError(f"{name}: expected a loss callable (output, target) -> scalar, "
                                 f"got {type(crit).__name__}")
        restarts = V.check_positive_int(num_restarts, "num_restarts")
        epochs = V.check_positive_int(num_epochs, "num_epochs")
        compute_every = V.check_positive_int(compute_every, "compute_every")
        tbs = V.check_positive_int(target_batch_size, "target_batch_size")
        sbs = V.check_positive_int(source_batch_size, "source_batch_size")
        lr = V.check_positive_float(lr, "lr")
        wd = V.check_positive_float(wd, "wd", allow_zero=True)
        if not callable(optim):
            raise ValueError(f"optim: expected an optimizer class such as torch.optim.Adam, got {optim!r}")
        V.check_choice(storage, "storage", STORAGES)
        seed = V.check_seed(seed)
        kind = I.resolve_similarity(similarity)

        xs = V.as_float_tensor(self.x_source, "x_source")
        xt = V.as_float_tensor(self.x_target, "x_target")
        V.check_same_features(xs, xt, "x_source", "x_target")
        autoencoder = _same_data(self.y_source, self.x_source, xs) and _same_data(self.y_target, self.x_target, xt)
        if autoencoder:
            ys, yt = None, None
        else:
            ys, yt = _as_labels(self.y_source, "y_source"), _as_labels(self.y_target, "y_target")
            V.check_same_length(xs, ys, "x_source", "y_source")
            V.check_same_length(xt, yt, "x_target", "y_target")
        model = self.model
        names = V.resolve_grad_params(model, grad_params)   # names or module prefixes, as the engine
        device = self._device(use_cuda, verbose)
        model.to(device)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        xs, xt = xs.to(dtype), xt.to(dtype)
        if ys is not None and ys.is_floating_point():
            ys, yt = ys.to(dtype), yt.to(dtype)

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                probe = model(xt[:2].to(device))
        except Exception as exc:
            raise ValueError(f"x_target: the model cannot run on samples of shape {tuple(xt.shape[1:])} "
                             f"({type(exc).__name__}: {exc})") from exc
        finally:
            model.train(was_training)
        if not isinstance(probe, torch.Tensor):
            raise ValueError(f"model: must return a tensor, returned {type(probe).__name__}")
        plan = I.plan_losses(target_crit, source_crit, tuple(probe.shape[1:]), probe.dtype, device, yt, autoencoder)

        # ---- engine or compat loop -----------------------------------------------------------
        opt_name = I.optimizer_name(optim)
        reasons = []
        if kind is None:
            reasons.append("the similarity is a custom callable")
        if not plan.engine:
            reasons.append(plan.reason)
        if opt_name is None:
            reasons.append(f"optim {getattr(optim, '__name__', optim)!s} is not Adam/AdamW/SGD")
        if restarts > 1 and not I.engine_reset_matches(model):
            reasons.append("model.reset_parameters() re-initialises other tensors than a reset of every layer")
        if kind is None:
            warnings.warn("DVGS: the similarity is not one the fast engine knows (cosine, dot, scalar projection, "
                          "negative distance): it runs on explicit per-sample gradients, like the original, "
                          "which is much slower and uses O(source_batch_size x n_params) memory",
                          SlowSimilarityWarning, stacklevel=2)

        n, nt = xs.shape[0], xt.shape[0]
        k_total = n_snapshots(nt, tbs, epochs, restarts, compute_every)
        itemsize = 8 if dtype == torch.float64 else 4
        layout = S.choose_layout(n, k_total, itemsize, storage)

        # ---- the run folder (the original: mkdir save_dir, then save_dir/<uid>) --------------
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        run_id = uuid.uuid4() if uid is None else uid
        run_dir = save_dir / str(run_id)
        resume = False
        if run_dir.exists():
            meta = S.read_meta(run_dir)
            # A memmap-layout engine run keeps a checkpoint: rerunning the same uid resumes it.
            resume = (layout == "memmap" and not reasons and meta is not None and not meta.get("complete")
                      and any(run_dir.glob("dvgs_checkpoint*.pt")))
            if not resume:
                raise FileExistsError(f"uid: {run_dir} already exists; pass another uid (or none)")
            seed = int(meta["seed"]) if seed is None else seed
        else:
            run_dir.mkdir()
        self.run_id = run_id
        if seed is None:
            # From torch's global RNG, as the original's randomness is: torch.manual_seed() before
            # run() makes the run reproducible.
            seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        if layout == "memmap":
            if storage == "auto":
                _say(f"{k_total} snapshots x {n} samples = {n * k_total * itemsize / 2**30:.2f} GiB: storing them as one "
                     f"memory-mapped [N, K] matrix ({run_dir / S.SNAP_FILE}) instead of {k_total} "
                     f"data_value_iter=K.npy files; agg() reads it (storage='files' forces the original layout)")
            if not resume:
                S.write_meta(run_dir, layout="memmap", file=S.SNAP_FILE, n=n, snapshots=0, seed=seed, complete=False)

        # Restart 0 re-initialises the model, as the original's every restart does; the engine
        # resets restarts 1, 2, ... itself (the compat loop resets all of them).
        torch.manual_seed(seed)
        I.reset_model(model)

        route = "engine" if not reasons else "compat loop"
        if verbose:
            _say(f"{n} source / {nt} target samples, {k_total} snapshots, similarity "
                 f"{kind or getattr(similarity, '__name__', type(similarity).__name__)}, loss {plan.describe()}; "
                 f"{'fast engine' if not reasons else 'compat loop: ' + '; '.join(reasons)}")

        if not reasons:
            res = self._run_engine(model, plan, xs, ys, xt, yt, kind=kind, names=names, opt_name=opt_name, lr=lr, wd=wd,
                                   restarts=restarts, epochs=epochs, compute_every=compute_every, tbs=tbs, sbs=sbs,
                                   device=device, seed=seed, verbose=verbose, layout=layout, run_dir=run_dir)
        else:
            res = self._run_loop(model, plan, xs, ys, xt, yt, similarity=similarity, kind=kind, names=names,
                                 optim=optim, lr=lr, wd=wd, restarts=restarts, epochs=epochs,
                                 compute_every=compute_every, tbs=tbs, sbs=sbs, device=device, seed=seed,
                                 verbose=verbose, layout=layout, run_dir=run_dir, k_total=k_total,
                                 reasons=reasons)
        res.info.update({"route": route, "layout": layout, "path": str(run_dir), "run_id": str(run_id)})
        res.timings["compat_total"] = time.perf_counter() - t_start
        res.timings["compat_cpu"] = time.process_time() - c_start
        self.result = res
        if verbose:
            _say(f"{res.info.get('snapshots')} snapshots in {res.timings['compat_total']:.1f} s -> {run_dir} ({layout})")
        return run_id

    # ------------------------------------------------------------------------------ routes
    def _run_engine(self, model, plan, xs, ys, xt, yt, *, kind, names, opt_name, lr, wd, restarts, epochs,
                    compute_every, tbs, sbs, device, seed, verbose, layout, run_dir) -> ValuationResult:
        from dvgs_fast.methods.dvgs import DVGS as Engine
        if ys is not None and plan.labels_1d:
            ys, yt = ys.reshape(-1).long(), yt.reshape(-1).long()
        cw = None if plan.class_weight is None else [float(w) for w in plan.class_weight]
        # The factory hands the engine the user's own module, so it is trained in place as in
        # the original (the engine deep-copies a module passed directly).
        engine = Engine(lambda: model, loss=plan.loss, epochs=epochs, restarts=restarts, lr=lr, optimizer=opt_name,
                        weight_decay=wd, compute_every=compute_every, target_batch_size=tbs, source_batch_size=sbs,
                        similarity=kind, grad_params=names, class_weight=cw, device=device, seed=seed,
                        progress=bool(verbose), keep_snapshots=True, distributed=False,
                        checkpoint_dir=run_dir if layout == "memmap" else None)
        res = engine.fit(xs, ys, xt, yt)
        snaps = res.snapshots
        k = int(res.info.get("snapshots", snaps.shape[1]))
        if layout == "files":
            for j in range(k):
                save_npy(run_dir / S.file_name(j + 1), np.ascontiguousarray(snaps[:, j]))
        else:
            fname = Path(getattr(snaps, "filename", "") or (run_dir / S.SNAP_FILE))
            if fname.parent.resolve() != run_dir.resolve():
                raise RuntimeError(f"dvgs_fast.compat: the engine kept its snapshots in {fname}, not in {run_dir}")
            snaps.flush()
            S.write_meta(run_dir, layout="memmap", file=fname.name, n=int(snaps.shape[0]), snapshots=k,
                         seed=int(res.info["seed"]), complete=True)
        res.snapshots = None          # the run folder holds them; agg() reads them from there
        return res

    def _run_loop(self, model, plan, xs, ys, xt, yt, *, similarity, kind, names, optim, lr, wd, restarts, epochs,
                  compute_every, tbs, sbs, device, seed, verbose, layout, run_dir, k_total, reasons) -> ValuationResult:
        t0, c0 = time.perf_counter(), time.process_time()
        if ys is None:                                  # autoencoder: the target is the input
            ys, yt = xs, xt
        xt_d, yt_d = xt.to(device), yt.to(device)
        writer = (S.FileWriter(run_dir) if layout == "files"
                  else S.MemmapWriter(run_dir, xs.shape[0], k_total, np.float64 if xs.dtype == torch.float64 else np.float32))
        out = run_loop(model, xs=xs, ys=ys, xt=xt_d, yt=yt_d, target_loss=plan.target_loss,
                       sample_loss=plan.sample_loss, similarity=similarity, kind=kind, names=names, optim=optim,
                       lr=lr, wd=wd, restarts=restarts, epochs=epochs, compute_every=compute_every,
                       target_batch_size=tbs, source_batch_size=sbs, device=device, seed=seed, writer=writer,
                       progress=bool(verbose))
        writer.close(out["k"])
        if layout == "memmap":
            S.write_meta(run_dir, layout="memmap", file=S.SNAP_FILE, n=int(xs.shape[0]), snapshots=out["k"],
                         seed=seed, complete=True)
        counts = np.full(xs.shape[0], out["k"], dtype=np.int64)
        values, stderr = stats_from_sums(out["s1"], out["s2"], counts)
        return ValuationResult(values=values, method="dvgs", stderr=stderr, counts=counts,
                               params={"num_restarts": restarts, "num_epochs": epochs, "lr": lr, "wd": wd,
                                       "compute_every": compute_every, "target_batch_size": tbs,
                                       "source_batch_size": sbs, "similarity": kind or "custom",
                                       "optim": getattr(optim, "__name__", str(optim))},
                               timings={"total": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                                        "score": out["score_time"]},
                               info={"seed": seed, "device": str(device), "snapshots": out["k"], "steps": out["steps"],
                                     "reasons": reasons})

    # ------------------------------------------------------------------------------ helpers
    @staticmethod
    def _device(use_cuda: bool, verbose: bool) -> torch.device:
        if use_cuda and torch.cuda.is_available():
            device = torch.device("cuda")
        else:
            device = torch.device("cpu")
            if use_cuda:
                _say("use_cuda=True but no CUDA GPU is available: running on the CPU")
        if verbose:
            print("using device:", device.type)
        return device

    def agg(self, path, reduction="mean"):
        """Aggregate the snapshots in ``path`` (``save_dir/<run id>/``): 'mean' -> [N] (the
        values), 'quantile' -> [N] mean per-snapshot percentile rank, 'none' -> [N, K]."""
        return S.agg(path, reduction)

    def clean(self, path):
        """Remove ``path`` (the run folder), as the original."""
        shutil.rmtree(path)


__all__ = ["DVGS", "SlowSimilarityWarning"]
