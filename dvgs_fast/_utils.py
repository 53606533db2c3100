"""Small helpers shared by the valuation methods: seeding, model construction, batching."""
from __future__ import annotations

import contextlib
import copy
import random
from typing import Any, Callable

import numpy as np
import torch
from torch import nn


# Parameter-free modules that act elementwise, alike in train and eval mode: a network that
# is a chain of nn.Linear and these can be run on stacked or concatenated rows unchanged (the
# removal curves' batched refits, In-Run Shapley's fused target pass).
ROWWISE_ACTIVATIONS = (nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                       nn.Mish, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
                       nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardshrink, nn.Softshrink, nn.Threshold)


def functional_call(module: nn.Module, tensors: Any, args: Any, kwargs: dict | None = None) -> Any:
    """torch.func.functional_call that leaves the module's own parameters and buffers in place.

    torch's (2.13, tie_weights=True) restores a module registered under two names (one
    nn.Linear used twice in an nn.Sequential, tied input/output embeddings) with plain tensors
    instead of its nn.Parameter objects: the optimizer then steps orphans, the model stops
    training and every method built on per-sample gradients drifts silently. Every original
    object is put back after the call (python_tests/test_reference_special_modules.py)."""
    from torch.func import functional_call as _torch_functional_call
    saved = [(m._parameters, dict(m._parameters)) for m in module.modules()]
    saved += [(m._buffers, dict(m._buffers)) for m in module.modules()]
    try:
        return _torch_functional_call(module, tensors, args, kwargs)
    finally:
        for store, before in saved:
            for k, v in before.items():
                if store.get(k) is not v:
                    store[k] = v


@contextlib.contextmanager
def own_rng(device: torch.device | None = None):
    """Random draws inside the block leave the caller's streams as they were: torch.random.fork_rng
    for the CPU generator (and ``device``'s, when it is a GPU), without fork_rng's accelerator
    look-up on every entry (~1 ms on CPU builds: more than a small scoring call's own work)."""
    state = torch.get_rng_state()
    cuda = device is not None and torch.device(device).type == "cuda"
    cuda_state = torch.cuda.get_rng_state(device) if cuda else None
    try:
        yield
    finally:
        torch.set_rng_state(state)
        if cuda:
            torch.cuda.set_rng_state(cuda_state, device)


def draw_seed() -> int:
    """A fresh seed from the OS entropy pool (for runs given seed=None; stored in result.info)."""
    return int(np.random.SeedSequence().generate_state(1)[0])


def seed_everything(seed: int | None) -> torch.Generator:
    """Seed python, numpy and torch; return a torch.Generator for explicit sampling."""
    g = torch.Generator()
    if seed is None:
        seed = draw_seed()
    random.seed(seed)
    np.random.seed(seed % (2**32))
    if torch.cuda.is_available():
        torch.manual_seed(seed)
    else:
        # The same CPU stream; torch.manual_seed would also queue a CUDA re-seed for later, capturing
        # a stack trace on every call (~1 ms, more than a small attribute() call's own work).
        torch.default_generator.manual_seed(seed)
    g.manual_seed(seed)
    return g


def build_model(model: nn.Module | Callable[[], nn.Module], name: str = "model") -> nn.Module:
    """Deep-copy a module (the caller's stays untouched) or call a zero-argument factory."""
    if isinstance(model, nn.Module):
        return _with_data(copy.deepcopy(model), name)
    if callable(model):
        m = model()
        if not isinstance(m, nn.Module):
            raise ValueError(f"{name}: the factory returned {type(m).__name__}, not an nn.Module")
        return _with_data(m, name)
    raise ValueError(f"{name}: expected an nn.Module or a zero-argument callable returning one, got {type(model).__name__}")


def _with_data(m: nn.Module, name: str) -> nn.Module:
    """Refuse a module built on the meta device: its tensors hold no values to train or score."""
    meta = next((n for n, t in [*m.named_parameters(), *m.named_buffers()] if t.is_meta), None)
    if meta is not None:
        raise ValueError(f"{name}: {meta} is on the meta device (shapes without data); build the model on the "
                         f"CPU, or call model.to_empty(device=...) and initialise its weights first")
    return m


def model_input_dtype(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a gradient method hands the model its inputs in: integer inputs stay int64 when
    the model runs on them and feeds them to an nn.Embedding / nn.EmbeddingBag (token ids: a
    float cast would break the lookup); every other input takes the model's float `dtype`.
    Decided by one eval-mode forward of `x` (a row or two, on the model's device)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    if x.is_floating_point() or not layers:
        return dtype
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: seen.append(not args[0].is_floating_point()))
             for m in layers]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except Exception:  # noqa: BLE001 - the model does not take integers: the float path reports it
        return dtype
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return torch.int64 if any(seen) else dtype


def embedding_hint(model: nn.Module, x: torch.Tensor) -> str:
    """What to add to "the model cannot run on x" when x is float and the model embeds tokens."""
    if x.is_floating_point() and any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in model.modules()):
        return ("; the model has an nn.Embedding, which takes integer token ids: pass x_source and x_target as "
                "integer arrays (e.g. x.astype(np.int64) or x.long()), they are then kept integer")
    return ""


def as_model_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the dtype of `model_input_dtype` (integers become float32 first, as they always did)."""
    if dtype == torch.int64:
        return x.to(torch.int64)
    if not x.is_floating_point():
        x = x.to(torch.float32)
    return x.to(dtype)


def reset_parameters(model: nn.Module) -> None:
    """Re-initialise every submodule that knows how (the original DVGS restart)."""
    for m in model.modules():
        if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()


def make_optimizer(name: str, params: Any, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    name = name.lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer: unknown value {name!r}; choose 'adam', 'adamw' or 'sgd'")


def iter_chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)
