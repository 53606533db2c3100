"""Run the ORIGINAL DVGS code path (its own BlogFeedback loading, sampling, label flipping,
min-max scaling, NN model and DVGS class) end to end on CPU, one run per seed, and print the
AUROC of roc_auc_score(noise_labels, -values) as the paper's notebook computes it.

The original code is NOT part of this project: point --orig at an unpacked copy of the original
repository (e.g. `git clone https://github.com/nathanieljevans/DVGS /tmp/dvgs_orig`). Nothing in it is edited; this driver only
  * serves BlogFeedback.zip from disk where the original downloads it from UCI (same archive),
  * builds the balanced class weights on the CPU (scripts/run_valuation.py puts them on 'cuda'),
  * optionally forces vmap(randomness="different"), which is what the original does on a GPU
    (the paper's runs: run_valuation.py needs CUDA for the class weights); on CPU the original
    silently switches to randomness="same" (one dropout mask shared by a whole source batch),
  * gives corrupt_label a writable label array (pandas >= 3 hands out read-only ones),
  * seeds numpy and torch (the original never seeds) so runs can be repeated.
It skips the filtered-performance training that run_valuation.py does after valuation (it does
not touch the values).

usage: python3 run_original.py --seeds 0-9 --randomness different --out orig.csv
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import tempfile
import time
import types
from pathlib import Path

from _common import parse_seeds, results_writer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--orig", default="/tmp/dvgs_orig", help="unpacked original repository (holds dvgs/ and configs/)")
    p.add_argument("--zip", default=None, help="BlogFeedback.zip (default: the one in $DVGS_FAST_DATA or ../shared/data)")
    p.add_argument("--config", default="configs/exp2.py", help="relative to --orig")
    p.add_argument("--seeds", default="0-9")
    p.add_argument("--randomness", choices=("different", "same"), default="different",
                   help="vmap dropout randomness for the source gradients: 'different' = the original on "
                        "GPU (the paper), 'same' = the original on CPU")
    p.add_argument("--engines", default="original",
                   help="comma list: 'original' = the original DVGS class and NN model; 'ours' = "
                        "dvgs_fast's DVGS with the CLI's blog preset and MLP, on the same original data")
    p.add_argument("--exact-cosine", action="store_true",
                   help="use exp2's torch.nn.CosineSimilarity as is (about 4x slower on CPU) instead of "
                        "the equivalent matrix-vector form")
    p.add_argument("--out", required=True, help="CSV to append one row per seed and engine to")
    args = p.parse_args()

    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    torch.set_num_threads(1)
    orig = Path(args.orig).resolve()
    sys.path.insert(0, str(orig / "dvgs"))
    # utils.py imports torchvision for CIFAR-10 only; stand in for it when it is not installed.
    if importlib.util.find_spec("torchvision") is None:
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")
        sys.modules["torchvision"], sys.modules["torchvision.transforms"] = tv, tv.transforms
    import data_loading  # noqa: E402  (the original's modules)
    import utils         # noqa: E402
    import DVGS as dvgs_mod  # noqa: E402

    if args.zip is None:
        from dvgs_fast.datasets import default_data_root
        root = default_data_root()
        if root is None or not (root / "BlogFeedback.zip").is_file():
            raise SystemExit("BlogFeedback.zip not found: pass --zip PATH or set $DVGS_FAST_DATA")
        args.zip = root / "BlogFeedback.zip"
    zip_bytes = Path(args.zip).read_bytes()

    class _Resp:
        def read(self):
            return zip_bytes

    def _urlopen(url):
        if not url.endswith("BlogFeedback.zip"):
            raise RuntimeError(f"unexpected download {url}")
        return _Resp()

    data_loading.urllib = types.SimpleNamespace(request=types.SimpleNamespace(urlopen=_urlopen))

    # Under pandas >= 3 (copy-on-write) np.asarray(train['Y']) is read-only and corrupt_label's
    # in-place flips fail; under the pandas of 2023 it was writable. Hand it a writable copy (its
    # result is what load_tabular_data stores, so nothing else changes).
    _orig_corrupt = data_loading.corrupt_label
    data_loading.corrupt_label = lambda y, rate: _orig_corrupt(np.array(y), rate)

    # The original picks vmap's randomness from the device string alone; give it the one wanted.
    _orig_psg = dvgs_mod.get_per_sample_grad_func
    fake_device = "cuda" if args.randomness == "different" else "cpu"
    dvgs_mod.get_per_sample_grad_func = lambda crit, model, device: _orig_psg(crit, model, fake_device)

    cwd = os.getcwd()
    os.chdir(orig / "configs")          # the config appends '../src/' to sys.path, harmless
    config = utils.load_config(str(orig / args.config))
    os.chdir(cwd)

    with results_writer(args.out) as w:
        for seed in parse_seeds(args.seeds):
            np.random.seed(seed)
            torch.manual_seed(seed)
            engines = [e.strip() for e in args.engines.split(",") if e.strip()]
            with tempfile.TemporaryDirectory() as tmp:
                t0, c0 = time.perf_counter(), time.process_time()
                x_tr, y_tr, x_va, y_va, _x_te, _y_te, _exog, endog, _ = utils.load_data(
                    dataset=config.dataset, train_num=config.train_num, valid_num=config.valid_num,
                    exog_noise=config.exog_noise, endog_noise=config.endog_noise,
                    save_dir=f"{tmp}/data/", clean_up=True, transforms=config.transforms)
                load_wall, load_cpu = time.perf_counter() - t0, time.process_time() - c0
                for engine in engines:
                    t0, c0 = time.perf_counter(), time.process_time()
                    if engine == "original":
                        vals = _original_engine(config, dvgs_mod, x_tr, y_tr, x_va, y_va, f"{tmp}/dvgs_s{seed}/",
                                                seed, fast_cosine=not args.exact_cosine)
                    elif engine == "ours":
                        vals = _our_engine(x_tr, y_tr, x_va, y_va, seed)
                    else:
                        raise SystemExit(f"--engines: unknown engine {engine!r}")
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    auc = roc_auc_score(endog, -vals)
                    side = "original" if engine == "original" else "orig-data+dvgs_fast"
                    row = [side, args.randomness if engine == "original" else "different", seed, f"{auc:.6f}",
                           int(endog.sum()), f"{float(y_tr.float().mean()):.4f}", f"{float(y_va.float().mean()):.4f}",
                           f"{wall + load_wall:.1f}", f"{cpu + load_cpu:.1f}"]
                    w(row)
                    print(*row, flush=True)


def _cosine_rows(a, b):
    """exp2's similarity, torch.nn.CosineSimilarity(dim=1), on rows of a (the target gradient
    expanded to [n, p]) and b ([n, p] per-sample gradients), as one matrix-vector product.

    Speed only: on torch 2.13's CPU, cosine_similarity of the stride-0 expanded target takes ~0.1 s
    per 400 x 38.5k batch, 3/4 of the original's run time; this takes 6 ms and differs from it by
    <= 4e-8 per value. The values never feed back into training, so only ties could move."""
    import torch
    g = a[0]
    return (b @ g) / torch.clamp(b.norm(dim=1) * g.norm(), min=1e-8)


def _original_engine(config, dvgs_mod, x_tr, y_tr, x_va, y_va, save_dir, seed, fast_cosine=True):
    """The original DVGS class and NN model with exp2's dvgs_kwargs, class weights as run_valuation.py."""
    import numpy as np
    import torch
    from sklearn.utils.class_weight import compute_class_weight
    torch.manual_seed(seed)
    cw = torch.tensor(compute_class_weight(class_weight="balanced", classes=np.sort(np.unique(y_tr.numpy())),
                                           y=y_va.numpy().ravel()), dtype=torch.float)
    cel = torch.nn.CrossEntropyLoss(weight=cw)
    kw = dict(config.dvgs_kwargs)
    kw["target_crit"] = lambda x, y: cel(x, y.squeeze(1).type(torch.long))
    kw["source_crit"] = lambda x, y: torch.nn.functional.cross_entropy(x, y.squeeze(1).type(torch.long))
    kw.update(save_dir=save_dir, verbose=False, use_cuda=False)
    if fast_cosine:
        kw["similarity"] = _cosine_rows
    d = dvgs_mod.DVGS(x_source=x_tr, y_source=y_tr, x_target=x_va, y_target=y_va, model=copy.deepcopy(config.model))
    run_id = d.run(**kw, uid="run")
    return d.agg(f"{save_dir}/{run_id}/").ravel()


def _our_engine(x_tr, y_tr, x_va, y_va, seed):
    """dvgs_fast's DVGS with exactly what `dvgs-fast run --dataset blog` uses (preset + MLP factory)."""
    import numpy as np
    from dvgs_fast.cli import _data as D, _models as M
    from dvgs_fast.methods.dvgs import DVGS
    pre = D.PRESETS["blog"]
    f = M.factory("mlp", (int(x_tr.shape[1]),), 2, hidden=100, dropout=pre["dropout"])
    r = DVGS(f, seed=seed, progress=False, **pre["dvgs"]).fit(x_tr.numpy(), y_tr.numpy().ravel(),
                                                            x_va.numpy(), y_va.numpy().ravel())
    return np.asarray(r.values)


if __name__ == "__main__":
    main()
