"""Evaluate data values against known corruption: metrics, curves and plots.

Convention: a low value means "probably corrupted/harmful". Metrics: :func:`detection_auroc`,
:func:`detection_auprc`, :func:`kmeans_f1` (OpenDataVal's noisy-detection F1),
:func:`noise_spearman`; curves: :func:`discovery_curve`, :func:`remove_curves` / :func:`remove_curve` (and the
``remove_high_curve`` / ``remove_low_curve`` shorthands; :func:`paper_settings` holds the DVGS
paper's retraining settings); plots: :func:`plot_discovery_curve`,
:func:`plot_remove_curves`, :func:`plot_value_histogram`; :func:`summarize` gathers the metrics
into a JSON-friendly dict. Counterfactual ground truth for attributions (leave-one-out and the
linear datamodeling score): :func:`loo_ground_truth`, :func:`lds_ground_truth`, :func:`lds`,
:func:`loo_correlation`, :func:`seed_noise` (see :mod:`dvgs_fast.evaluate.counterfactual`).
"""
from __future__ import annotations

from .curves import (DiscoveryCurve, RemovalCurve, TorchClassifier, default_model, discovery_curve,
                     paper_settings, remove_curve, remove_curves, remove_high_curve, remove_low_curve,
                     removal_subsets, score_predictions)
from .counterfactual import (AttributionQuality, Correlation, GroundTruth, LDSGroundTruth, LOOCorrelation,
                             LOOGroundTruth, SeedNoise, TrainingRecipe, evaluate_attribution, exact_linear_influence,
                             lds, lds_ground_truth, loo_correlation, loo_ground_truth, query_outputs, reference_model,
                             seed_noise)
from .metrics import detection_auprc, detection_auroc, kmeans_f1, noise_spearman, summarize
from .plots import plot_discovery_curve, plot_remove_curves, plot_value_histogram

__all__ = ["detection_auroc", "detection_auprc", "kmeans_f1", "noise_spearman", "summarize",
           "discovery_curve", "DiscoveryCurve", "remove_curve", "remove_curves", "remove_high_curve",
           "remove_low_curve", "RemovalCurve", "TorchClassifier", "default_model", "paper_settings",
           "removal_subsets", "score_predictions",
           "plot_discovery_curve", "plot_remove_curves", "plot_value_histogram",
           "TrainingRecipe", "loo_ground_truth", "lds_ground_truth", "GroundTruth", "LOOGroundTruth",
           "LDSGroundTruth", "lds", "loo_correlation", "seed_noise", "Correlation", "LOOCorrelation", "SeedNoise",
           "exact_linear_influence", "query_outputs", "reference_model", "AttributionQuality", "evaluate_attribution"]
