"""The gradient engine: per-sample gradient statistics without per-sample gradients.

Every gradient method (DVGS, TracIn, In-Run Data Shapley, and the attribution methods built on
them) asks a model the same questions about a batch of samples: for each sample i, what is
⟨gᵢ, G⟩ and ‖gᵢ‖² against a target gradient G, what are the dots against a batch of target rows,
or what is gᵢ itself. This package answers them from ONE batched forward and ONE backward, by the
cheapest exact route per layer:

* nn.Linear: from the layer's input aᵢ and output gradient δᵢ (⟨δᵢaᵢᵀ, G⟩ = δᵢᵀGaᵢ,
  ‖δᵢaᵢᵀ‖ = ‖δᵢ‖‖aᵢ‖), our fused ``ops.linear_ghost_stats``;
* Conv1d/Conv2d, Embedding, LayerNorm/RMSNorm/GroupNorm/InstanceNorm/eval BatchNorm affines: the
  ghost routes of ``ghost_layers``;
* any other leaf layer: that layer's own per-sample gradients (torch.func), reduced at once;
* what cannot be split by layer (tied weights, recurrent layers, parameters on non-leaf modules):
  whole-model per-sample gradients (``reference``).

Public surface (everything a method needs; nothing outside this package imports its modules'
private names):

``FastScorer(model, names, sample_loss, similarity)``
    ``record(x, y) -> Recording``: the one forward/backward; ``Recording.stats(G)`` -> per-sample
    (dot, sqnorm) [N] against a target gradient (dict name -> tensor), ``per_layer=`` for each
    layer's share, ``calls(m)`` / ``deltas(m)`` for a layer's recorded inputs and δ.
    ``stats(x, y, G)``: record + stats in one call. ``score(x, y, target(G))``: a similarity
    (``ops.similarity``: cosine, dot, projection, distance).
    ``layer_routes() -> [LayerRoute]`` and ``describe()``: which route each layer takes and why.
    ``recorder()`` / ``grad_outputs(rec)`` / ``deltas_by_module`` / ``stats_from_record``: the same
    statistics from a forward/backward the caller runs itself (a training step).
``Recording.factors() -> SampleFactors``
    the batch's per-sample gradients in factored form (Linear/conv: inputs a and output
    gradients δ per row; Embedding: token ids and δ; the rest explicit), detached, for
    ``cross_gram(F, H)`` ([n_F, n_H] dots between two sets of samples: pairwise attribution),
    ``sqnorms(F)`` and ``batch_dots(F, V)`` (dots with Q gradient-shaped tensors), all in gram.py;
    ``dense_factors(model, names, x, y, loss)``: the same from explicit per-sample gradients;
    ``materialise(F, shapes)``: the per-sample gradients formed, {name: [n, *shape]}.
``Projector(dim, layer_dims=, kind=, seed=, structure=)`` (project.py)
    random projections of per-sample gradients from their factored form: Kronecker-structured
    P_out G P_inᵀ per Linear / conv / Embedding layer from (a, δ) (LoGra; or, for layers small
    enough, a dense JL of the gradient formed from its factors), a dense JL matrix for the
    DenseGrads; ``project(F) -> [n, dim]``, ``project_gradients`` (the same map on explicit
    gradients), ``project_vectors`` (any [n, P]); reproducible from its seed, ``fingerprint()``.
``ReferenceScorer``, ``per_sample_grads(model, names, x, y, sample_loss)``
    explicit per-sample gradients by torch.func: the float64 truth for tests and the route of
    last resort. ``check_vmappable(model)`` refuses models it cannot batch, up front.
``KroneckerFactors``, ``fisher_factors(scorer, x, y, fisher, loss)``, ``kfac_routes(scorer)``
    curvature from the recordings (curvature.py): the Gauss-Newton's pseudo-gradients of a batch
    in factored form ("ggn" exact, "sampled", "empirical"), and K-FAC / EK-FAC factors per Linear /
    conv / Embedding layer accumulated from them (covariances, eigenbases, corrected eigenvalues).
``pairwise``
    the pairwise ("ghost dot-product") route: dots of each sample's gradient with a target
    gradient that is itself a sum of per-row outer products, without forming either
    (``rows_of``, ``pairwise_dot``, ``pairwise_cheaper``, ``materialise``).
``ForwardRecorder`` / ``Call``: forward hooks recording a layer's calls (inputs and output).
``FrozenStatistics``: scoring leaves the model unchanged (eval BatchNorm, buffers restored).
``make_sample_loss`` / ``cast_labels``: per-sample losses and labels, the same for every method.
``SlowRouteWarning``: some layers take a torch.func route (named once per layer).

Assumptions shared by every route: dim 0 of a routed layer's input and output is the sample
dimension, and samples do not interact in the forward (BatchNorm with batch statistics couples
them: then every parameter takes the reference route, with a SlowRouteWarning).

A new method plugs in as DEVELOPING.md shows ("Adding a gradient method").
"""
from dvgs_fast.grads import pairwise
from dvgs_fast.grads.curvature import FISHERS, KroneckerFactors, LayerFactors, fisher_factors, kfac_routes
from dvgs_fast.grads.factors import DenseGrads, RowFactors, SampleFactors, TokenFactors, dense_factors, materialise
from dvgs_fast.grads.frozen import FrozenStatistics
from dvgs_fast.grads.ghost_layers import conv_patches
from dvgs_fast.grads.gram import batch_dots, cross_gram, sqnorms
from dvgs_fast.grads.project import KINDS as PROJECTION_KINDS
from dvgs_fast.grads.project import STRUCTURES as PROJECTION_STRUCTURES
from dvgs_fast.grads.project import LayerPlan, Projector
from dvgs_fast.grads.losses import SampleLoss, cast_labels, make_sample_loss
from dvgs_fast.grads.record import Call, ForwardRecorder
from dvgs_fast.grads.reference import ReferenceScorer, check_vmappable, per_sample_grads, torch_similarity
from dvgs_fast.grads.scorer import FastScorer, LayerRoute, Recording, SlowRouteWarning

__all__ = ["FISHERS", "KroneckerFactors", "LayerFactors", "fisher_factors", "kfac_routes",
           "DenseGrads", "RowFactors", "SampleFactors", "TokenFactors", "batch_dots", "cross_gram", "dense_factors",
           "materialise", "sqnorms", "LayerPlan", "PROJECTION_KINDS", "PROJECTION_STRUCTURES", "Projector",
           "Call", "FastScorer", "ForwardRecorder", "FrozenStatistics", "LayerRoute", "Recording", "ReferenceScorer",
           "SampleLoss", "SlowRouteWarning", "cast_labels", "check_vmappable", "conv_patches", "make_sample_loss",
           "pairwise",
           "per_sample_grads", "torch_similarity"]
