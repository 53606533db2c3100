"""Where in the noise range a method's values follow sigma (feature-noise experiments of
bench/QUALITY.md): per method, over the seeds, the Spearman(sigma, value) of the whole source set
and within the lower and upper half of sigma, and the mean value percentile per sigma quintile.
Reads bench/quality/<experiment>/values/*.csv (written by run_quality.py; not committed).

    python3 bench/quality/investigate/noise_bins.py adult_feature blog_feature lincs
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from scipy.stats import rankdata, spearmanr

HERE = Path(__file__).resolve().parents[1]

for exp in sys.argv[1:] or ["adult_feature", "blog_feature", "lincs"]:
    files = sorted((HERE / exp / "values").glob("*-seed*.csv"))
    by: dict[str, list] = {}
    for f in files:
        rows = list(csv.DictReader(open(f, newline="")))
        v = np.array([float(r["value"]) for r in rows])
        s = np.array([float(r["noise_sigma"]) for r in rows])
        by.setdefault(f.name.split("-seed")[0], []).append((v, s))
    print(f"== {exp}: Spearman(sigma, value) all / sigma in lower half / upper half; mean value percentile "
          f"per sigma quintile (low -> high sigma), mean over {len(next(iter(by.values())))} seeds")
    for m, runs in by.items():
        allr, lo, hi, q = [], [], [], []
        for v, s in runs:
            med = np.median(s)
            allr.append(spearmanr(s, v)[0])
            lo.append(spearmanr(s[s <= med], v[s <= med])[0])
            hi.append(spearmanr(s[s > med], v[s > med])[0])
            pct = rankdata(v) / len(v)
            edges = np.quantile(s, [0.2, 0.4, 0.6, 0.8])
            b = np.searchsorted(edges, s)
            q.append([pct[b == k].mean() for k in range(5)])
        qm = np.mean(q, axis=0)
        print(f"  {m:<14} {np.mean(allr):+.3f} / {np.mean(lo):+.3f} / {np.mean(hi):+.3f}   "
              + " ".join(f"{x:.2f}" for x in qm))
