"""TRAK (Park, Georgiev, Ilyas, Leclerc, Madry 2023, "TRAK: Attributing Model Behavior at
Scale"), on the gradient engine's factored per-sample gradients.

For M members θ_m (models trained from independent initialisations, optionally on random
subsets, optionally several checkpoints each -- or checkpoints passed in), with the margin
f(z; θ) = log(p/(1-p)) of the true class and its out-to-loss weight Q = 1 - p:

    φ_m(z)   = P_m ∇_θ f(z; θ_m)                         (projected to k dimensions)
    τ(q, z_i) = [ (1/M) Σ_m φ_m(q) (Φ_mᵀΦ_m + λ_m I)⁻¹ φ_m(z_i)ᵀ ] · [ (1/M) Σ_m Q_m(z_i) ]

τ > 0: training on z_i raises q's margin (lowers its loss) -- the attribute() sign convention.

The projection P_m is per layer (grads.Projector; a new seed per member, recorded), from the
engine's factors of Linear / conv / Embedding layers (their inputs and output gradients; no
per-sample gradient formed): by default Khatri-Rao rows, (Pg)_r = Σ_t (u_rᵀδ_t)(v_rᵀã_t)/√k --
k (d_out + d_in) per row, and at the same k as good as a dense projection on bench_trak's digits
MLP, where LoGra's Kronecker P_out ⊗ P_in (cheaper: ~√k (d_out + d_in)) loses ~0.04 LDS with
one model (a Kronecker product of two JL maps has a relative variance ~2/k_out + 2/k_in on a
rank-one gradient, Khatri-Rao ~8/k, dense ~2/k); a dense Gaussian/Rademacher JL for every other
parameter.
The training features go to an on-disk store per member (gradstore: float32 or float16,
resumable, sharded under torchrun); scoring is blockwise GEMM over the stores into the
attribute() sink (top-k per query, a memory-mapped matrix, callbacks), never holding the score
matrix unless asked.

Regularisation: λ_m = ``regularization`` × tr(Φ_mᵀΦ_m)/k -- a factor times the mean eigenvalue of
the member's own training kernel, set from the training features alone (never from the queries
scored). The default 1.0 was chosen on tasks other than the one TRAK is reported on in
bench/QUALITY.md: bench/bench_trak.py's "reg" part sweeps it on MLPs for breast cancer, Adult and
a synthetic 5-class task (1 and 5 models, k = 512), where 1.0 has the best mean LDS (0.616; 0:
0.253, 0.3: 0.594, 3: 0.607). On the digits MLP no regularisation gives LDS ~0.18 (one model)
where a good factor gives ~0.45-0.55, so this setting decides the result.

Where this differs from traker 0.3.2 (the reference implementation):

* traker projects the whole flattened gradient with one dense matrix (its CPU projector a
  Gaussian generated block by block per batch); here the projection is per layer (above), its
  total dimension split over the layers by parameter count;
* traker divides gradients by √(#parameters) and rescales each member's (ΦᵀΦ)⁻¹ by its mean
  absolute entry; here neither (the relative λ makes the kernel scale-free: φ K φᵀ is unchanged
  when a member's gradients are scaled), so members are weighted equally;
* traker's ``lambda_reg`` is absolute (default 0); here ``regularization`` is relative (above).
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from dvgs_fast import _validation as V
from dvgs_fast.methods.trak.method import ProjectedGradientMethod, check_relative
from dvgs_fast.methods.trak.outputs import margin

#: λ = REGULARIZATION × the mean eigenvalue of ΦᵀΦ (module docstring)
REGULARIZATION = 1.0


class TRAK(ProjectedGradientMethod):
    """TRAK attribution scores and values (see the module docstring).

    >>> trak = TRAK(model_factory, n_models=5, epochs=30, proj_dim=2048)
    >>> res = trak.attribute(x_train, y_train, x_query, y_query, top_k=10)

    model             nn.Module or a zero-argument factory; the architecture (and, with
                      epochs=0, the one member as passed).
    loss              "cross_entropy" (TRAK's margin output function needs class logits).
    n_models          models trained (epochs > 0), each from its own initialisation.
    epochs, batch_size, lr, optimizer, weight_decay   their training on the source.
    subsample         fraction of the source rows each model trains on (1.0: all; TRAK's paper 0.5).
    n_checkpoints     members per trained model, evenly spaced over its steps (the last at the end).
    checkpoints       instead of training: a list of state dicts (or modules) of `model`, one member each.
    proj_dim          projected dimension per member (split over the layers; see grads.Projector).
    layer_dims        {layer name: k or (k_out, k_in)} for layers that set their own.
    projection        "gaussian" or "rademacher".
    projection_structure  how a Linear / conv / Embedding layer is projected from its factors:
                      "khatri_rao" (rows u_r ⊗ v_r: k (d_out + d_in) per row, TRAK's dense
                      projection's quality), "kronecker" (LoGra's P_out ⊗ P_in: cheapest,
                      coarser), "dense" (the gradient formed, one dense matrix: k·d_out·d_in).
    regularization    λ = regularization × tr(ΦᵀΦ)/k per member (0: TRAK without regularisation).
    grad_params       None (every trainable parameter) or names / module prefixes.
    store_dir         where the members' stores (and trained models) are kept and resumed; None:
                      a temporary folder removed after the call.
    store_dtype       "float32", "float16" (half the disk) or "float64".
    source_batch_size rows featurised at once (the store's block).
    distributed       None: torchrun is detected; fit()/featurize() shard the source rows.
    max_time          seconds; training, featurisation and scoring stop when it is spent (a
                      stopped fit() returns status "stopped"; store_dir keeps the stores written).
    """

    name = "trak"
    requires_labels = True
    reg_name = "regularization"
    weights_q = True

    def __init__(self, model: nn.Module | Callable[[], nn.Module], loss: str = "cross_entropy", n_models: int = 1,
                 epochs: int = 0, batch_size: int = 64, lr: float = 1e-3, optimizer: str = "adam",
                 weight_decay: float = 0.0, subsample: float = 1.0, n_checkpoints: int = 1,
                 checkpoints: list | None = None, proj_dim: int = 2048, layer_dims: dict | None = None,
                 projection: str = "gaussian", projection_structure: str = "khatri_rao",
                 regularization: float = REGULARIZATION, grad_params: Any = None, store_dir=None,
                 store_dtype: str = "float32", source_batch_size: int = 1024, distributed: bool | None = None,
                 device: Any = None, seed: int | None = None, max_time: float | None = None, progress: bool = True):
        if loss != "cross_entropy":
            raise ValueError(f"loss: TRAK's output function (the margin) needs loss='cross_entropy', got {loss!r}; "
                             f"for other losses use LoGraInfluence")
        self._common(model, loss, epochs, batch_size, lr, optimizer, weight_decay, checkpoints, proj_dim, layer_dims,
                     projection, projection_structure, grad_params, store_dir, store_dtype, source_batch_size,
                     distributed)
        self.n_models = V.check_positive_int(n_models, "n_models")
        self.n_checkpoints = V.check_positive_int(n_checkpoints, "n_checkpoints")
        self.subsample = V.check_positive_float(subsample, "subsample")
        if self.subsample > 1.0:
            raise ValueError(f"subsample: a fraction of the source rows in (0, 1], got {subsample!r}")
        if self.epochs == 0 and (self.n_models > 1 or self.n_checkpoints > 1 or self.subsample < 1.0):
            raise ValueError("epochs: 0 scores the model as passed (one member); n_models, n_checkpoints and "
                             "subsample need training (epochs > 0), or pass checkpoints=[...]")
        self.regularization = check_relative(regularization, "regularization")
        super().__init__(device=device, seed=seed, max_time=max_time, progress=progress)

    def output_function(self, prep) -> Callable:
        return margin


__all__ = ["REGULARIZATION", "TRAK"]
