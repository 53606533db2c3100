"""LoGra influence (Choe et al. 2024, "What is Your Data Worth to GPT? LLM-Scale Data Valuation
with Influence Functions"): the influence function in a projected gradient space.

Each sample's loss gradient is projected with a Kronecker-structured matrix per layer,
P_out ∇W P_inᵀ = Σ_t (P_out δ_t)(P_in a_t)ᵀ from the layer's recorded inputs and output
gradients (never the gradient itself; grads.Projector), the training gradients go to an on-disk
store (gradstore), and with the projected Fisher as the Hessian,

    H = ΦᵀΦ / N + λI,       λ = damping × tr(ΦᵀΦ / N) / k,
    score(q, z_i) = g(q) H⁻¹ g(z_i)ᵀ,

> 0 when upweighting z_i lowers q's loss (the attribute() sign convention; the influence on the
loss of removing z_i is -score/N). ``damping`` is relative to the mean eigenvalue of H, set from
the training features alone (never the queries). With ``checkpoints=[...]`` the scores are
averaged over them. Any per-sample loss ("cross_entropy", "mse", a callable), labels optional
(autoencoders: the target is the input).

Differences from LogIX (LoGra's library): LogIX's default Hessian is its EK-FAC / raw
covariance per layer (block-diagonal over layers); here the projected covariance is one
k x k matrix over all layers (cross-layer terms kept), damped relative to its mean eigenvalue
(LogIX: 0.1 x the mean eigenvalue per layer by default).
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from dvgs_fast.methods.trak.method import ProjectedGradientMethod, check_relative

#: λ = DAMPING × the mean eigenvalue of the projected Fisher (module docstring)
DAMPING = 0.1


class LoGraInfluence(ProjectedGradientMethod):
    """Projected-gradient influence with a damped projected Fisher (see the module docstring).

    model, loss, epochs, batch_size, lr, optimizer, weight_decay, checkpoints, proj_dim,
    layer_dims, projection, grad_params, store_dir, store_dtype, source_batch_size, distributed,
    max_time                 as TRAK (one model: the model as passed, trained for `epochs`, or the
                             average over `checkpoints`).
    projection_structure     "kronecker" (LoGra's own, the default), "khatri_rao" or "dense" (TRAK).
    damping                  λ = damping × tr(H₀)/k, H₀ = ΦᵀΦ/N.
    """

    name = "logra"
    requires_labels = False
    reg_name = "damping"
    kernel_is_mean = True
    n_models = 1
    n_checkpoints = 1
    subsample = 1.0

    def __init__(self, model: nn.Module | Callable[[], nn.Module], loss: str | Callable = "cross_entropy",
                 epochs: int = 0, batch_size: int = 64, lr: float = 1e-3, optimizer: str = "adam",
                 weight_decay: float = 0.0, checkpoints: list | None = None, proj_dim: int = 4096,
                 layer_dims: dict | None = None, projection: str = "gaussian",
                 projection_structure: str = "kronecker", damping: float = DAMPING, grad_params: Any = None,
                 store_dir=None, store_dtype: str = "float32", source_batch_size: int = 1024,
                 distributed: bool | None = None, device: Any = None, seed: int | None = None,
                 max_time: float | None = None, progress: bool = True):
        self._common(model, loss, epochs, batch_size, lr, optimizer, weight_decay, checkpoints, proj_dim, layer_dims,
                     projection, projection_structure, grad_params, store_dir, store_dtype, source_batch_size,
                     distributed)
        self.damping = check_relative(damping, "damping")
        super().__init__(device=device, seed=seed, max_time=max_time, progress=progress)


__all__ = ["DAMPING", "LoGraInfluence"]
