"""Summarise the blog-gap CSVs: per side mean, sd, the anchors' '2 * np.std' band, standard error,
Welch's t against the paper's exp2 DVGS row (0.750 +- 0.028 = mean +- 2*np.std over 5 runs), and
the paired difference original engine vs dvgs_fast engine on the same original data.

usage: python3 summarize.py ours.csv paired.csv [more.csv ...]
"""
from __future__ import annotations

import sys

import numpy as np
import pandas as pd
from scipy import stats

PAPER_MEAN, PAPER_2SD, PAPER_N = 0.750, 0.028, 5


def main(paths: list[str]) -> None:
    df = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    df = df.drop_duplicates(subset=["side", "randomness", "seed"], keep="last")
    p_sd1 = PAPER_2SD / 2 * np.sqrt(PAPER_N / (PAPER_N - 1))       # ddof 1 from np.std's ddof 0
    print(f"paper exp2 DVGS: mean {PAPER_MEAN:.3f}, sd(ddof1) {p_sd1:.4f}, se {p_sd1 / np.sqrt(PAPER_N):.4f} (n=5)")
    print(f"{'side':<22}{'rand':<10}{'n':>3} {'mean':>7} {'sd':>7} {'2*std0':>7} {'se':>7} {'min':>6} {'max':>6}"
          f" {'t vs paper':>10} {'p':>6} {'cpu s/run':>9}")
    for (side, rnd), g in df.groupby(["side", "randomness"], sort=False):
        a = g["auroc"].to_numpy(float)
        n, m, sd = a.size, a.mean(), a.std(ddof=1) if a.size > 1 else float("nan")
        se = sd / np.sqrt(n)
        t, p = stats.ttest_ind_from_stats(m, sd, n, PAPER_MEAN, p_sd1, PAPER_N, equal_var=False)
        print(f"{side:<22}{rnd:<10}{n:>3} {m:7.4f} {sd:7.4f} {2 * a.std():7.4f} {se:7.4f} {a.min():6.3f} "
              f"{a.max():6.3f} {t:10.2f} {p:6.3f} {g['cpu_s'].mean():9.1f}")
    o = df[df.side == "original"].set_index("seed")["auroc"]
    h = df[df.side == "orig-data+dvgs_fast"].set_index("seed")["auroc"]
    common = o.index.intersection(h.index)
    if len(common) > 1:
        d = (o[common] - h[common]).to_numpy(float)
        t, p = stats.ttest_1samp(d, 0.0)
        print(f"paired (same original data, same seed) original engine - dvgs_fast engine: n={d.size} "
              f"mean {d.mean():+.4f} sd {d.std(ddof=1):.4f} se {d.std(ddof=1) / np.sqrt(d.size):.4f} t {t:.2f} p {p:.3f}")
    a, b = df[df.side == "original"]["auroc"], df[df.side == "dvgs-fast"]["auroc"]
    if len(a) > 1 and len(b) > 1:
        t, p = stats.ttest_ind(a, b, equal_var=False)
        print(f"original vs dvgs-fast (unpaired, Welch): {a.mean() - b.mean():+.4f}, "
              f"se {np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)):.4f}, t {t:.2f}, p {p:.3f}")
    # what 5-run means of each side look like: how often does one land at >= 0.750?
    for side in ("dvgs-fast", "orig-data+dvgs_fast", "original"):
        a = df[df.side == side]["auroc"].to_numpy(float)
        if a.size >= 5:
            rng = np.random.default_rng(0)
            means = rng.choice(a, size=(20000, 5), replace=True).mean(1)
            print(f"{side}: bootstrap 5-run means, share >= {PAPER_MEAN}: {np.mean(means >= PAPER_MEAN):.3f}; "
                  f"5-95% of 5-run means {np.quantile(means, 0.05):.3f}-{np.quantile(means, 0.95):.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
