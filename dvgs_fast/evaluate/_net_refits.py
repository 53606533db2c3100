"""Retraining a torch network on many subsets at once (the removal curves' refits).

A removal curve retrains a fresh network for every (fraction removed, replicate) and both curves
together need 2 x points x replicates networks, each trained with mini-batch Adam and dropout (the
DVGS paper: 200 epochs, batch 250, Adam 1e-4). Trained one after another that is thousands of
tiny steps per network; here the K networks are trained *as one batch*: their parameters are
stacked ([K, ...]), every step gathers each network's own mini-batch ([K, B, d]) and runs
batched GEMMs, and one autograd pass gives every network its own gradient (the networks share
nothing, so d(sum of losses)/d(theta_k) = d(loss_k)/d(theta_k)).

What makes a batched refit *equal* to a sequential one (same seed, same data -> same network up to
float summation order), checked in python_tests/test_removal_curves_paper.py against a plain
``nn.Module`` + ``torch.optim.Adam`` loop:

* initial weights: the factory is called under ``torch.manual_seed(init_seed)``;
* randomness of training: each network has its own ``torch.Generator(noise_seed)`` and draws, per
  epoch, first ``randperm(n_k)`` (its mini-batch order, ``torch.split`` into batches of B as the
  original's ``train_model``) and then one uniform [n_k, width] draw per dropout layer (in layer
  order); the row at position j of the epoch keeps unit u when ``u >= p``, and is scaled by
  1 / (1 - p) as ``nn.Dropout`` does;
* networks whose subsets are smaller take fewer steps per epoch (ceil(n_k / B)): they sit out the
  remaining steps (sorted by size, the active networks are a prefix of the stack) and keep their
  own Adam step count, so the bias correction is theirs; the last partial batch is padded with
  rows of weight 0 and the loss is sum(w * l) / sum(w);
* Adam is torch.optim.Adam's arithmetic (``refit.optim.adam_update``, the one Adam of every
  refit; L2 weight decay added to the gradient); SGD is torch.optim.SGD's without momentum
  (``refit.optim.sgd_update``).

:func:`train_batched_masked` is the other data order, the one of the counterfactual ground truth
(``evaluate.counterfactual``): every network sees the *same* batch order of all N rows (one
generator) and network k keeps the rows of its 0/1 mask. A removed row is masked (weight 0) in
its batch, so every other batch is untouched -- leaving one row out changes one batch, not the
whole order; a batch's loss is the mean over its kept rows (sum(w * l) / sum(w)), and a batch
with no kept row is skipped (no step; Adam's step count stays). ``train_sequential(...,
order="shared")`` is the plain loop that does the same.

Only networks that are a chain of ``nn.Linear`` and parameter-free layers (activations,
``LayerNorm`` without affine parameters, ``Dropout``, ``Flatten`` of already flat input) are
batched -- the paper's MLP and autoencoder are. Any other module (convolutions, batch norm) is
trained one at a time by :func:`train_sequential` with its own dropout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dvgs_fast._utils import ROWWISE_ACTIVATIONS, make_optimizer
from dvgs_fast.refit.optim import adam_update, sgd_update

OPTIMIZERS = ("adam", "sgd")



@dataclass
class NetSettings:
    """How every refit is trained (the paper's ``filter_kwargs``)."""

    epochs: int = 50
    lr: float = 1e-3
    batch_size: int = 128
    weight_decay: float = 0.0
    loss: str = "ce"                 # "ce" (classification) or "mse" (regression / reconstruction)
    optimizer: str = "adam"          # "adam" or "sgd" (no momentum)
    device: str = "cpu"
    dtype: torch.dtype = torch.float32


@dataclass
class _Op:
    kind: str                        # "linear", "dropout" or "fn"
    weight: str | None = None
    bias: str | None = None
    p: float = 0.0
    width: int = 0
    module: nn.Module | None = None
    name: str = ""


class Chain:
    """A network seen as a chain of layers: what the batched trainer runs."""

    def __init__(self, ops: list[_Op], names: list[str]):
        self.ops, self.names = ops, names
        self.dropouts = [op for op in ops if op.kind == "dropout" and op.p > 0]


def as_chain(module: nn.Module, in_features: int) -> Chain | None:
    """The module as a chain of Linear / parameter-free layers, or None when it is something else."""
    if any(True for _ in module.buffers()):
        return None
    try:
        gm = torch.fx.symbolic_trace(module)
    except Exception:  # noqa: BLE001 - anything fx cannot trace is simply not batched
        return None
    ops: list[_Op] = []
    prev = None
    width = in_features
    used: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if prev is not None:
                return None
            prev = node
            continue
        if node.op == "output":
            if node.args != (prev,):
                return None
            continue
        if node.op != "call_module" or node.args != (prev,) or node.kwargs:
            return None
        sub = gm.get_submodule(node.target)
        if isinstance(sub, nn.Linear):
            if sub.in_features != width:
                return None
            w, b = f"{node.target}.weight", (f"{node.target}.bias" if sub.bias is not None else None)
            ops.append(_Op("linear", weight=w, bias=b))
            used |= {w} | ({b} if b else set())
            width = sub.out_features
        elif isinstance(sub, nn.Dropout):
            ops.append(_Op("dropout", p=float(sub.p), width=width, name=node.target))
        elif isinstance(sub, nn.Flatten):
            continue                                 # the input is flat already
        elif isinstance(sub, nn.LayerNorm) and not sub.elementwise_affine and tuple(sub.normalized_shape) == (width,):
            ops.append(_Op("fn", module=sub))
        elif isinstance(sub, ROWWISE_ACTIVATIONS):      # elementwise: run unchanged on [K, B, width]
            ops.append(_Op("fn", module=sub))
        else:
            return None
        prev = node
    names = [k for k, _ in gm.named_parameters()]
    if set(names) != used:
        return None
    # fx keeps the parameter names of the original module (targets are its submodule paths)
    if set(names) != {k for k, _ in module.named_parameters()}:
        return None
    return Chain(ops, names)


def init_state(factory: Callable[[], nn.Module], init_seed: int) -> nn.Module:
    """A fresh network from the factory, its weights drawn under ``init_seed`` (global RNG restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(init_seed))
        return factory()


def _draw_epoch(g: torch.Generator, n: int, chain: Chain | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One epoch's randomness of one network: its batch order, then a keep-mask per dropout layer."""
    perm = torch.randperm(n, generator=g)
    masks = [] if chain is None else [torch.rand(n, op.width, generator=g) >= op.p for op in chain.dropouts]
    return perm, masks


def _per_row_loss(out: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Loss of every row: out [..., n, o] -> [..., n]. MSE averages over the outputs (as nn.MSELoss)."""
    if loss == "ce":
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1),
                                           reduction="none").view(out.shape[:-1])
    if y.dim() == out.dim() - 1:
        out = out[..., 0]
        return (out - y) ** 2
    return ((out - y) ** 2).mean(-1)


# ---------------------------------------------------------------------------------------------
# sequential reference (and the fallback for networks that are not chains)
# ---------------------------------------------------------------------------------------------
def train_sequential(net: nn.Module, X: torch.Tensor, Y: torch.Tensor, rows: np.ndarray, noise_seed: int,
                     cfg: NetSettings, chain: Chain | None, *, order: str = "subset") -> nn.Module:
    """Train ``net`` (in place) on ``X[rows]`` with mini-batch Adam or SGD: the plain torch loop.

    ``order="subset"``: each epoch shuffles the kept rows (``randperm(len(rows))``) and splits them
    into batches of B. ``order="shared"``: each epoch shuffles *all* N rows (``randperm(N)``), splits
    the positions into batches of B and drops the rows not in ``rows`` from their batch (an empty
    batch is skipped), the order of :func:`train_batched_masked`.

    With a ``chain``, dropout masks follow the module docstring's protocol (so the result equals
    the batched trainer's); otherwise the network's own dropout draws from the global RNG,
    seeded with ``noise_seed`` for the duration.
    """
    net = net.to(device=cfg.device, dtype=cfg.dtype)
    g = torch.Generator().manual_seed(int(noise_seed))
    opt = make_optimizer(cfg.optimizer, net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    idx = torch.as_tensor(rows, dtype=torch.long)
    B = cfg.batch_size
    # full batch and no dropout: the order only permutes a sum, so train on the kept rows as they
    # are, one step per epoch, as a plain full-batch loop would (no gather per step)
    full_batch = B >= (X.shape[0] if order == "shared" else len(rows)) and not any(
        isinstance(m, nn.modules.dropout._DropoutNd) for m in net.modules())
    if order == "shared" and not full_batch:
        keep = torch.zeros(X.shape[0], dtype=torch.bool)
        keep[idx] = True
        Xk, Yk, n = X, Y, X.shape[0]
    else:
        Xk, Yk, n = X[idx.to(X.device)], Y[idx.to(Y.device)], len(rows)
    net.train()
    hooks, current = [], {}
    if chain is not None:
        for j, op in enumerate(chain.dropouts):
            m = net.get_submodule(op.name)
            m.eval()                                 # identity; the hook applies the drawn mask
            scale = 1.0 / (1.0 - m.p)
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, j=j, scale=scale: inp[0] * (current[j].to(inp[0].dtype) * scale)))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(noise_seed))
            for _ in range(cfg.epochs):
                if full_batch:
                    opt.zero_grad(set_to_none=True)
                    _per_row_loss(net(Xk), Yk, cfg.loss).mean().backward()
                    opt.step()
                    continue
                perm, masks = _draw_epoch(g, n, chain)
                for s in range(0, n, B):
                    b = perm[s:s + B]
                    sel = slice(None)
                    if order == "shared":
                        sel = keep[b]
                        b = b[sel]
                        if b.numel() == 0:
                            continue
                    b = b.to(Xk.device)
                    for j, mk in enumerate(masks):
                        current[j] = mk[s:s + B][sel].to(Xk.device)
                    opt.zero_grad(set_to_none=True)
                    out = net(Xk[b])
                    _per_row_loss(out, Yk[b], cfg.loss).mean().backward()
                    opt.step()
    finally:
        for h in hooks:
            h.remove()
    return net.eval()


# ---------------------------------------------------------------------------------------------
# batched
# ---------------------------------------------------------------------------------------------
def chain_forward(chain: Chain, params: dict[str, torch.Tensor], x: torch.Tensor,
                  masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Stacked forward: params [K, ...], x [K, n, d] (or [n, d], shared) -> [K, n, out]."""
    di = 0
    for op in chain.ops:
        if op.kind == "linear":
            W = params[op.weight].transpose(1, 2)                          # [K, in, out]
            x = torch.matmul(x, W)                                         # shared [n, d] broadcasts
            if op.bias is not None:
                x = x + params[op.bias].unsqueeze(1)
        elif op.kind == "dropout":
            if op.p > 0 and masks is not None:
                x = x * masks[di]
            di += op.p > 0
        else:
            x = op.module(x)
    return x


def _optimizer_state(P: dict[str, torch.Tensor], K: int):
    """Adam's moments and each network's own step count (all zero; SGD ignores them)."""
    m = {k: torch.zeros_like(v) for k, v in P.items()}
    v2 = {k: torch.zeros_like(v) for k, v in P.items()}
    t = torch.zeros(K, dtype=next(iter(P.values())).dtype, device=next(iter(P.values())).device)
    return m, v2, t


def _update(P, m, v2, t, ps, grads, cfg: NetSettings, live: torch.Tensor | None = None) -> None:
    """One optimizer step of the first Ks networks (``ps`` holds their parameters) in place.

    ``live`` [Ks] (bool, None = all): networks whose batch had no kept row sit this step out --
    parameters, Adam moments and step count unchanged, as a plain loop that skips the batch."""
    Ks = next(iter(ps.values())).shape[0]
    with torch.no_grad():
        t[:Ks] += 1 if live is None else live.to(t.dtype)
        for (name, p), gr in zip(ps.items(), grads):
            p = p.detach()
            if cfg.weight_decay:
                gr = gr + cfg.weight_decay * p
            shape = (Ks,) + (1,) * (p.dim() - 1)
            if cfg.optimizer == "sgd":
                new, mk, vk = sgd_update(p, gr, cfg.lr), None, None
            else:                                                   # each network's own step count
                tk = t[:Ks].clamp_min(1).view(shape)
                new, mk, vk = adam_update(p, gr, m[name][:Ks], v2[name][:Ks], tk, cfg.lr)
            if live is not None:
                lv = live.view(shape)
                new = torch.where(lv, new, p)
                if mk is not None:
                    mk, vk = torch.where(lv, mk, m[name][:Ks]), torch.where(lv, vk, v2[name][:Ks])
            P[name][:Ks] = new
            if mk is not None:
                m[name][:Ks], v2[name][:Ks] = mk, vk


def train_batched(chain: Chain, params0: dict[str, torch.Tensor], X: torch.Tensor, Y: torch.Tensor,
                  subsets: list[np.ndarray], noise_seeds: list[int], cfg: NetSettings,
                  progress: Callable[[Any], Any] | None = None) -> dict[str, torch.Tensor]:
    """Train K networks at once; network k starts from ``params0[name][k]`` and trains on
    ``X[subsets[k]]`` with the generator ``noise_seeds[k]``. Returns the trained [K, ...] params."""
    K = len(subsets)
    dev, dt = X.device, X.dtype
    B = cfg.batch_size
    sizes = np.array([len(s) for s in subsets])
    order = np.argsort(-sizes, kind="stable")               # largest first: active nets are a prefix
    sizes_o = sizes[order]
    steps_o = -(-sizes_o // B)                              # ceil(n_k / B) steps per epoch
    S = int(steps_o.max())
    L = S * B
    active = [int((steps_o > s).sum()) for s in range(S)]
    P = {k: v[torch.as_tensor(order)].to(device=dev, dtype=dt).clone() for k, v in params0.items()}
    m, v2, t = _optimizer_state(P, K)
    gens = [torch.Generator().manual_seed(int(noise_seeds[i])) for i in order]
    sub_t = [torch.as_tensor(subsets[i], dtype=torch.long) for i in order]
    scales = [1.0 / (1.0 - op.p) for op in chain.dropouts]
    epochs = range(cfg.epochs) if progress is None else progress(range(cfg.epochs))
    for _ in epochs:
        # the epoch's batch order and dropout masks, per network, padded to L positions
        G = torch.zeros(K, L, dtype=torch.long)
        Wr = torch.zeros(K, L, dtype=dt)
        Ms = [torch.zeros(K, L, op.width, dtype=dt) for op in chain.dropouts]
        for k in range(K):
            n = int(sizes_o[k])
            perm, masks = _draw_epoch(gens[k], n, chain)
            G[k, :n] = sub_t[k][perm]
            Wr[k, :n] = 1.0
            for j, mk in enumerate(masks):
                Ms[j][k, :n] = mk.to(dt) * scales[j]
        G, Wr, Ms = G.to(dev), Wr.to(dev), [M.to(dev) for M in Ms]
        for s in range(S):
            Ks = active[s]
            sl = slice(s * B, (s + 1) * B)
            idx = G[:Ks, sl]
            w = Wr[:Ks, sl]
            ps = {k: v[:Ks].detach().requires_grad_(True) for k, v in P.items()}
            with torch.enable_grad():
                out = chain_forward(chain, ps, X[idx], [M[:Ks, sl] for M in Ms])
                per = (_per_row_loss(out, Y[idx], cfg.loss) * w).sum(1) / w.sum(1)
                grads = torch.autograd.grad(per.sum(), list(ps.values()))
            _update(P, m, v2, t, ps, grads, cfg)
    inv = torch.as_tensor(np.argsort(order))
    return {k: v[inv.to(dev)] for k, v in P.items()}


def train_batched_masked(chain: Chain, params0: dict[str, torch.Tensor], X: torch.Tensor, Y: torch.Tensor,
                         keep: torch.Tensor, order_seed: int, cfg: NetSettings,
                         progress: Callable[[Any], Any] | None = None) -> dict[str, torch.Tensor]:
    """Train K networks at once on one shared batch order: network k starts from
    ``params0[name][k]`` and trains on the rows where ``keep[k]`` ([K, N], 0/1). Every epoch draws,
    from one ``torch.Generator(order_seed)``, ``randperm(N)`` and then a keep-mask per dropout layer
    over the N positions (shared by all networks); a removed row is masked in its batch and a
    batch with no kept row is skipped (see the module docstring). Returns the trained [K, ...]
    params; equals ``train_sequential(..., order="shared")`` network by network."""
    K, N = keep.shape
    dev, dt = X.device, X.dtype
    B = cfg.batch_size
    P = {k: v.to(device=dev, dtype=dt).clone() for k, v in params0.items()}
    m, v2, t = _optimizer_state(P, K)
    W = keep.to(device=dev, dtype=dt)
    g = torch.Generator().manual_seed(int(order_seed))
    scales = [1.0 / (1.0 - op.p) for op in chain.dropouts]
    epochs = range(cfg.epochs) if progress is None else progress(range(cfg.epochs))
    for _ in epochs:
        perm, masks = _draw_epoch(g, N, chain)
        perm = perm.to(dev)
        masks = [mk.to(device=dev, dtype=dt) * sc for mk, sc in zip(masks, scales)]
        for s in range(0, N, B):
            pos = perm[s:s + B]
            w = W[:, pos]                                           # [K, b]
            n_kept = w.sum(1)
            live = n_kept > 0
            if not bool(live.any()):
                continue
            y = Y[pos]
            ps = {k: v.detach().requires_grad_(True) for k, v in P.items()}
            with torch.enable_grad():
                out = chain_forward(chain, ps, X[pos], [mk[s:s + B] for mk in masks])   # rows shared
                per = (_per_row_loss(out, y.expand(K, *y.shape), cfg.loss) * w).sum(1) / n_kept.clamp_min(1)
                grads = torch.autograd.grad(per.sum(), list(ps.values()))
            _update(P, m, v2, t, ps, grads, cfg, None if bool(live.all()) else live)
    return P


def batched_outputs(chain: Chain, params: dict[str, torch.Tensor], Xt: torch.Tensor,
                    max_elements: int = 1 << 25) -> torch.Tensor:
    """Eval-mode outputs of K stacked networks on a shared test set: [K, n, out], in chunks of
    networks so the largest activation stays under ``max_elements`` numbers."""
    K = next(iter(params.values())).shape[0]
    widest = max([Xt.shape[1]] + [params[op.weight].shape[1] for op in chain.ops if op.kind == "linear"])
    per = max(1, int(max_elements // max(1, Xt.shape[0] * widest)))
    outs = []
    with torch.no_grad():
        for a in range(0, K, per):
            outs.append(chain_forward(chain, {k: v[a:a + per] for k, v in params.items()}, Xt))
    return torch.cat(outs, 0)


def stack_inits(nets: list[nn.Module], names: list[str]) -> dict[str, torch.Tensor]:
    sd = [dict(n.named_parameters()) for n in nets]
    return {k: torch.stack([d[k].detach() for d in sd]) for k in names}

