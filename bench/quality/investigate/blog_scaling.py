# Blog DVGS: does min-max scaling fitted as the original (on the sampled rows) change AUROC?
# Output of `python3 bench/quality/investigate/blog_scaling.py 0 1 2 3 4` (2026-11-29):
#   0 ours 0.741; orig-style 0.739 | 1 ours 0.743; orig-style 0.742 | 2 ours 0.730; orig-style 0.730
#   3 ours 0.743; orig-style 0.742 | 4 ours 0.725; orig-style 0.721
"""Blog DVGS with min-max scaling fitted as the original (on the sampled train rows + the test files)
vs ours (all rows), same splits, same flips, same DVGS settings as the CLI preset."""
import os, sys, warnings
warnings.simplefilter("ignore")
import numpy as np, torch
torch.set_num_threads(1)
from pathlib import Path
from dvgs_fast.datasets import load_blog
from dvgs_fast.cli import _data as D, _models as M
from dvgs_fast.methods.dvgs import DVGS
from dvgs_fast.evaluate import detection_auroc
root = Path(os.environ.get("DVGS_FAST_DATA", Path(__file__).resolve().parents[4] / "shared" / "data"))
raw = load_blog(root, scale=None)
ours = load_blog(root)
noise = D.parse_noise("label:0.2")
pre = D.PRESETS["blog"]
for seed in map(int, sys.argv[1:]):
    res = []
    for name, ds in (("ours", ours), ("orig-style", raw)):
        ld = D.Loaded(ds.X, ds.y, ds.n_classes, "blog", "blog", ds.train_idx, ds.test_idx)
        data = D.split_and_corrupt(ld, 1000, 400, None, noise, seed, max_test=None)
        if name == "orig-style":
            # the original: min-max over the sampled train rows + every test-file row
            ref = np.concatenate([data.x_source, data.x_target, data.x_test]).astype(np.float64)
            lo, rng = ref.min(0), ref.max(0) - ref.min(0)
            sc = lambda x: np.where(rng > 0, (x - lo) / np.where(rng > 0, rng, 1), 0).astype(np.float32)
            data.x_source, data.x_target = sc(data.x_source), sc(data.x_target)
        f = M.factory("mlp", data.sample_shape, 2, hidden=100, dropout=0.5)
        r = DVGS(f, seed=seed, progress=False, **pre["dvgs"]).fit(data.x_source, data.y_source, data.x_target, data.y_target)
        res.append(f"{name} {detection_auroc(r.values, data.is_corrupted):.3f}")
    print(seed, "; ".join(res), flush=True)
