"""Write a LINCS-shaped GCTX file (default 720,000 samples x 978 landmark genes, float32,
~2.8 GB) with our own GctxWriter, block by block, in the real Level 5 layout:

    /0/DATA/0/matrix [n_samples, 978] float32, HDF5 chunks of ~1 MiB (268 rows), like CMap's
    /0/META/COL: id (cid "PLATE_CELL_TIME:BRD-...:DOSE"), pert_id, cell_id, pert_type, pert_idose
    /0/META/ROW: id (Entrez-like), pr_gene_symbol, pr_is_lm (all 1)

The values are synthetic: a low-rank signal (32 factors, like correlated expression programs)
plus noise, so an autoencoder has something to learn. Never write it into the repository:

    python bench/make_lincs_like.py /tmp/lincs_like_720k.gctx [--n 720000] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

N_GENES = 978
BLOCK = 16_384


def make(path: str | Path, n: int = 720_000, seed: int = 0, progress: bool = True) -> Path:
    from dvgs_fast.datasets.lincs import GctxWriter
    path = Path(path)
    repo = Path(__file__).resolve().parent.parent
    if repo in path.resolve().parents:
        raise SystemExit(f"{path}: refusing to write a multi-GB file into the repository; use /tmp")
    rng = np.random.default_rng(seed)
    gene_ids = [str(1000 + 7 * i) for i in range(N_GENES)]
    row_meta = {"pr_gene_symbol": np.array([f"GENE{i}" for i in range(N_GENES)]),
                "pr_is_lm": np.ones(N_GENES, dtype=np.int64)}
    n_perts, n_cells = max(1, n // 36), 70
    pert = rng.integers(0, n_perts, n)
    cell = rng.integers(0, n_cells, n)
    col_meta = {"pert_id": np.char.add("BRD-K", np.char.zfill(pert.astype(str), 8)),
                "cell_id": np.char.add("CELL", cell.astype(str)),
                "pert_type": np.where(pert % 10 == 0, "ctl_vehicle", "trt_cp"),
                "pert_idose": np.where(pert % 3 == 0, "10 uM", "1.11 uM")}
    cids = np.char.add(np.char.add(np.char.add("PLATE", (np.arange(n) // 384).astype(str)), "_"),
                       np.char.add(col_meta["cell_id"], np.char.add(":", col_meta["pert_id"])))
    loadings = rng.standard_normal((32, N_GENES)).astype(np.float32) / np.sqrt(32)
    t0 = time.perf_counter()
    with GctxWriter(path, gene_ids, n_samples=n, col_ids=list(cids), row_meta=row_meta,
                    col_meta=col_meta) as w:
        for a in range(0, n, BLOCK):
            b = min(a + BLOCK, n)
            f = rng.standard_normal((b - a, 32), dtype=np.float32)
            x = f @ loadings
            x += 0.5 * rng.standard_normal(x.shape, dtype=np.float32)
            x *= 2.0
            w.append(x)
            if progress and (a // BLOCK) % 8 == 0:
                print(f"\r{b:>9}/{n} rows  {time.perf_counter() - t0:6.1f} s", end="", file=sys.stderr)
    if progress:
        print(f"\rwrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--n", type=int, default=720_000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    make(a.path, a.n, a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
