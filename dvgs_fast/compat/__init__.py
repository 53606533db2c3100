"""Drop-in for the original DVGS code (github.com/nathanieljevans/DVGS, ``dvgs/DVGS.py``).

Change one import::

    from DVGS import DVGS                  # before
    from dvgs_fast.compat import DVGS      # after

and the rest of the script (``DVGS(x_source, y_source, x_target, y_target, model)``,
``.run(target_crit, source_crit, ...)``, ``.agg(path, reduction)``, ``.clean(path)``) runs as it
did, on the dvgs_fast engine.

Same as the original
* arguments, defaults and return values of ``run`` (the run id), ``agg``, ``clean``, ``pretrain_``;
* the algorithm: train on the target set only; every ``compute_every``-th target step (global
  counter, never reset) compare every source sample's own loss gradient (``source_crit`` on a
  batch of one) with the target batch gradient (``target_crit``) before the optimizer step;
  every restart re-initialises the model with its ``reset_parameters()`` and builds a new
  ``optim(params, lr=lr, weight_decay=wd)``; ``grad_params`` by name; the model is trained in
  place;
* snapshots in ``save_dir/<run id>/data_value_iter=K.npy`` (K = 1, 2, ...), or, above 1 GiB /
  10,000 snapshots, one memory-mapped ``[N, K]`` matrix there (stated when chosen; ``agg`` reads
  both layouts); ``agg``: 'mean', 'quantile' (mean per-snapshot percentile rank, scipy's
  ``percentileofscore(kind='rank')``), 'none' ([N, K], snapshots in order K = 1, 2, ...);
* ``use_cuda``: the GPU when there is one, else the CPU with one line saying so.

How it maps onto the engine (``dvgs_fast.methods.dvgs.DVGS``)
* similarity: cosine (``nn.CosineSimilarity(dim=1)``, the default), and the original's
  ``similarities.dot_product()``, ``scalar_projection()``, ``C_dist()`` (recognised by type/name
  and checked numerically on a probe, or passed as "cosine" / "dot" / "projection" /
  "distance") run on the fast engine (per-layer statistics, no per-sample gradient vectors).
  Any other callable runs on explicit per-sample gradients, like the original, with a
  ``SlowSimilarityWarning``.
* criteria are checked on a probe batch: when ``target_crit`` is the mean of ``source_crit`` per
  sample (MSELoss for both, the same cross-entropy lambda for both, ...) or a class-weighted
  cross-entropy with a plain per-sample cross-entropy as ``source_crit`` (the original's
  ``dvgs_balance_class_weights``; the weights are read off the criterion), the engine runs them;
  otherwise, and for optimizers other than Adam/AdamW/SGD or a model whose own
  ``reset_parameters()`` resets other tensors than a reset of every layer would, the compat
  loop (``_loop.py``) runs the original algorithm itself, still scoring on the fast path when the
  similarity is known. ``run(..., verbose=True)`` prints which route ran and why.

What differs
* randomness: ``run`` takes a seed (keyword ``seed=``; by default drawn from torch's global RNG,
  so ``torch.manual_seed(s)`` makes a run reproducible); the target order and dropout come from
  it. With dropout, every source sample gets its own mask on CPU and GPU (the original's CPU path
  used one mask for the whole source batch, ``randomness="same"``).
* BatchNorm runs in eval mode while the source is scored (per-sample gradients are undefined
  under batch statistics; the original's vmap fails on BatchNorm in train mode).
* the original's ``C_dist`` adds PairwiseDistance's eps=1e-6 to the difference; the engine's
  distance does not (a ~1e-6 relative difference).
* ``grad_params`` naming no parameter is an error (the original silently ignored unknown names).
* bad arguments raise ValueError naming the argument before any training.
* ``run`` returns the run id; ``self.result`` additionally holds a ValuationResult (values,
  stderr, counts, the seed and which route ran).
"""
from ._dvgs import DVGS, SlowSimilarityWarning
from ._storage import MEMMAP_BYTES, MEMMAP_FILES
from . import similarities

__all__ = ["DVGS", "SlowSimilarityWarning", "similarities", "MEMMAP_BYTES", "MEMMAP_FILES"]
