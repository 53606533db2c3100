"""Reference DVGS scorer: the original algorithm's per-sample gradients, kept simple.

Every source sample's loss gradient is formed explicitly with torch.func
(`vmap(grad(loss of one sample))`, `randomness="different"` so dropout draws an independent
mask per sample), the selected parameters' gradients are concatenated into one vector per
sample and compared with the target gradient by torch's own similarity functions. Memory and
time are O(N_chunk * n_params); this is the correctness and speed baseline for the fast scorer.

Recurrent layers (nn.RNN/GRU/LSTM) called without an initial state create it with
`new_zeros`, an unbatched tensor that the fused GRU kernel then updates in place with batched
values, which vmap refuses ("output with shape [1, H] doesn't match the broadcast shape
[N, 1, H]"). While per-sample gradients are taken, such calls get the same zero state made from
the (batched) input instead (`_batched_rnn_state`): identical values, and vmap can batch it.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from dvgs_fast._utils import functional_call
from dvgs_fast.grads.losses import SampleLoss


def check_vmappable(model: nn.Module) -> None:
    """Refuse, before any work, modules whose forward writes to their own parameters: an
    Embedding with max_norm renormalises the looked-up rows of its weight in place, which
    torch.func's vmap (every per-sample gradient of the reference route) cannot batch."""
    bad = [f"{n} (Embedding, max_norm={m.max_norm})" for n, m in model.named_modules()
           if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None]
    if bad:
        raise ValueError(f"model: {', '.join(bad)} renormalises its weight in place during the forward, which "
                         f"torch.func's per-sample gradients (backend='reference') cannot run; use "
                         f"backend='fast' (its Embedding route needs no vmap) or max_norm=None")


def per_sample_grads(model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor,
                     sample_loss: SampleLoss) -> dict[str, torch.Tensor]:
    """{name: [N, *param.shape]}: each sample's own loss gradient w.r.t. the named parameters.

    The model runs as it is (train mode: dropout active, one mask per sample); parameters not
    named are held fixed. `sample_loss(output, target)` returns one loss per sample.
    """
    check_vmappable(model)
    params = dict(model.named_parameters())
    chosen = {n: params[n].detach() for n in names}
    fixed = {n: p.detach() for n, p in params.items() if n not in chosen}
    buffers = dict(model.named_buffers())

    def loss_of_one(p_chosen, x_i, y_i):
        out = functional_call(model, ({**fixed, **p_chosen}, buffers), (x_i.unsqueeze(0),))
        return sample_loss(out, y_i.unsqueeze(0)).sum()

    with _batched_rnn_state(model):
        return vmap(grad(loss_of_one), in_dims=(None, 0, 0), randomness="different")(chosen, x, y)


def _zero_state(m: nn.RNNBase, x: torch.Tensor):
    """The zero initial state nn.RNNBase would create, but derived from x (so batched under vmap)."""
    layers = m.num_layers * (2 if m.bidirectional else 1)
    if x.dim() == 3:
        col = torch.zeros_like(x[:, 0, :1] if m.batch_first else x[0, :, :1])     # [B, 1]
        shape = (layers, col.shape[0])
        base = col.unsqueeze(0)                                                    # [1, B, 1]
    else:                                                                          # unbatched [T, d]
        base = torch.zeros_like(x[:1, :1])                                         # [1, 1]
        shape = (layers,)
    h_size = m.proj_size if getattr(m, "proj_size", 0) > 0 else m.hidden_size
    h = base.expand(*shape, h_size).clone()
    if isinstance(m, nn.LSTM):
        return h, base.expand(*shape, m.hidden_size).clone()
    return h


@contextlib.contextmanager
def _batched_rnn_state(model: nn.Module):
    def pre_hook(m, args, kwargs):
        if len(args) >= 2 or kwargs.get("hx") is not None or not args:
            return None
        x = args[0]
        if not isinstance(x, torch.Tensor):
            return None                     # a PackedSequence: leave it to the module
        return (x, _zero_state(m, x)), {k: v for k, v in kwargs.items() if k != "hx"}

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True)
               for m in model.modules() if isinstance(m, nn.RNNBase)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def torch_similarity(g: torch.Tensor, G: torch.Tensor, kind: str, eps: float = 1e-8) -> torch.Tensor:
    """Similarity of each row of g [N, P] with the vector G [P], straight from the definitions."""
    if kind == "cosine":
        return F.cosine_similarity(g, G.unsqueeze(0), dim=1, eps=eps)
    if kind == "dot":
        return g @ G
    if kind == "projection":
        return (g @ G) / torch.linalg.vector_norm(G).clamp_min(eps)
    if kind == "distance":
        return -torch.linalg.vector_norm(g - G.unsqueeze(0), dim=1)
    raise ValueError(f"similarity: unknown value {kind!r}")


class ReferenceScorer:
    """score(x, y, target) -> similarity [N] of each sample's gradient with the target gradient."""

    name = "reference"

    def __init__(self, model: nn.Module, names: list[str], sample_loss: SampleLoss, similarity: str,
                 eps: float = 1e-8):
        check_vmappable(model)
        self.model, self.names, self.sample_loss = model, list(names), sample_loss
        self.similarity, self.eps = similarity, eps

    def target(self, G: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([G[n].reshape(-1) for n in self.names])

    def score(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        g = per_sample_grads(self.model, self.names, x, y, self.sample_loss)
        flat = torch.cat([g[n].reshape(x.shape[0], -1) for n in self.names], dim=1)
        return torch_similarity(flat, target, self.similarity, self.eps).detach()

    def describe(self) -> dict:
        return {"backend": "reference", "per_sample_grad_params": list(self.names)}
