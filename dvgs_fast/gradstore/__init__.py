"""Out-of-core stores of per-sample vectors (projected gradients, or anything [N, k]).

Attribution at scale keeps one vector per training sample -- a random projection of its
gradient (TRAK, LoGra), a data-value embedding -- and then answers any number of queries with
matrix products over them. This package holds those vectors on disk and streams them:

``write_store(directory, source, compute, dim=, dtype=, fingerprint=, aux=)`` (writer.py)
    computes the vectors of a row source (dvgs_fast.sources) block by block into a
    memory-mappable ``features.npy`` [N, k] (float16 / float32 / float64) with per-row ``aux``
    columns; resumable after a kill with identical bytes (run-state lock, checksummed state,
    fingerprint), sharded by row ranges under torchrun, ``stop`` for budgets, a progress bar.
``GradientStore.open(directory)`` (store.py)
    the finished store: ``n``, ``dim``, ``dtype``, ``fingerprint``, ``info``, ``blocks()``,
    ``read(a, b)``, ``aux(name)``, ``array()`` (a memory map).
``gram``, ``matmul_rows``, ``score_into``, ``source_blocks`` (scoring.py)
    blockwise ΦᵀΦ, Φ V, and query x source scores into an attribution ScoreSink (top-k per
    query, memory-mapped output, callbacks), never the whole score matrix unless asked.
"""
from dvgs_fast.gradstore.scoring import gram, matmul_rows, passes, score_into, source_blocks
from dvgs_fast.gradstore.store import DTYPES, GradientStore, StoreError
from dvgs_fast.gradstore.writer import StoreWriter, WriteResult, checked_rows, create_store, write_store

__all__ = ["DTYPES", "GradientStore", "StoreError", "StoreWriter", "WriteResult", "checked_rows", "create_store", "gram",
           "matmul_rows", "passes", "score_into", "source_blocks", "write_store"]
