"""Counterfactual ground truth for data attribution: leave-one-out and the linear datamodeling score.

An attribution method claims, for each query and training row, how much that row moves the
query's output. These functions retrain the model to find out:

* :func:`loo_ground_truth` -- retrain without each source row (or a sample of them), same
  initial weights and data order as the reference; score with :func:`loo_correlation`;
* :func:`lds_ground_truth` -- retrain on random subsets (fraction ``alpha``, several seeds
  averaged); score with :func:`lds` (the linear datamodeling score);
* :func:`reference_model` -- the model trained on every row with the recipe: the one to attribute;
* :func:`seed_noise` -- how much the ground truth's own seeds agree (the ceiling of any score);
* :func:`exact_linear_influence` -- the closed-form influence of an L2-regularised linear model,
  the case where the answer is known;
* :func:`evaluate_attribution` -- every method's ``attribute()`` scored by both, with its cost.

The retrains follow a :class:`TrainingRecipe` and are trained many at once (batched networks on
0/1 row masks), cached on disk by fingerprint, resumable, budgeted and sharded under torchrun.

    recipe = TrainingRecipe(lambda: nn.Linear(64, 10), optimizer="sgd", lr=1.0, epochs=300,
                            weight_decay=1e-2)
    gt = lds_ground_truth(recipe, x_train, y_train, x_query, y_query, cache_dir="runs/gt")
    lds(scores, gt)        # scores[n_query, n_source] -> Correlation(mean, stderr, per_query)
"""
from __future__ import annotations

from .exact import exact_linear_influence
from .groundtruth import lds_ground_truth, loo_ground_truth, reference_model
from .methods import AttributionQuality, evaluate_attribution
from .outputs import query_outputs
from .recipe import TrainingRecipe
from .results import GroundTruth, LDSGroundTruth, LOOGroundTruth
from .scoring import Correlation, LOOCorrelation, SeedNoise, lds, loo_correlation, seed_noise

__all__ = ["TrainingRecipe", "loo_ground_truth", "lds_ground_truth", "GroundTruth", "LOOGroundTruth",
           "LDSGroundTruth", "lds", "loo_correlation", "seed_noise", "Correlation", "LOOCorrelation", "SeedNoise",
           "exact_linear_influence", "query_outputs", "reference_model", "AttributionQuality",
           "evaluate_attribution"]
