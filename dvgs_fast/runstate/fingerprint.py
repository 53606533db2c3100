"""A run's fingerprint: what determines its values (settings, seed, data, the model's structure
and initial weights, the loss), stored in its checkpoint; resuming with anything different is
refused with a message saying what differs."""
from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

from dvgs_fast.runstate.digest import new_hash, update_with_tensor
from dvgs_fast.runstate.files import CheckpointFiles

# Settings that do not enter the fingerprint: a resume may change them.
_RESUMABLE = ("max_time", "checkpoint_dir", "distributed", "device")


def fingerprint(settings: dict[str, Any], seed: int, world_size: int, model: nn.Module, loss: Any,
                data_identity: bytes) -> dict[str, Any]:
    """What determines the values, in parts, so that a mismatch can say what changed.

    settings: the method's settings (those a resume may change are dropped); model: its
    structure (module types, their hyper-parameters, class source for user classes, parameter
    and buffer names/shapes/dtypes) and its initial weights; loss: a callable's identity;
    data: the source's identity and the target's bytes."""
    s = {k: v for k, v in settings.items() if k not in _RESUMABLE}
    s["seed"] = int(seed)
    if world_size > 1:                  # a rank's rows depend on the number of ranks
        s["world_size"] = int(world_size)
    return {"settings": s, "model structure": model_structure(model), "initial weights": model_weights(model),
            "loss": callable_identity(loss), "data": new_hash_hex(data_identity)}


def new_hash_hex(b: bytes) -> str:
    h = new_hash()
    h.update(b)
    return h.hexdigest()


def compare(saved: dict, now: dict, files: CheckpointFiles) -> None:
    """Raise naming the first part of the fingerprint that differs."""
    if saved == now:
        return
    s0, s1 = saved.get("settings", {}), now["settings"]
    what = []
    changed = [f"{k}: {s0.get(k)!r} -> {s1.get(k)!r}" for k in sorted(set(s0) | set(s1)) if s0.get(k) != s1.get(k)]
    if changed:
        what.append("settings differ (" + "; ".join(changed[:4]) + ("; ..." if len(changed) > 4 else "") + ")")
    parts = [k for k in now if k != "settings" and saved.get(k) != now[k]]
    if parts:
        what.append("the " + " and the ".join(parts) + (" differs" if len(parts) == 1 else " differ"))
    what = " and ".join(what) or "the fingerprint differs"
    raise files.error(f"holds a checkpoint of another run: {what}")


_PLAIN = (bool, int, float, str, type(None))


def _plain(v: Any) -> bool:
    if isinstance(v, _PLAIN):
        return True
    if isinstance(v, (tuple, list)) and len(v) <= 64:
        return all(_plain(x) for x in v)
    return False


def _class_source(cls: type) -> str:
    """The source of a user-defined module class (its forward decides the function: ReLU vs
    Tanh inside a custom forward shows nowhere else); torch's own classes are named only."""
    if (cls.__module__ or "").startswith("torch."):
        return ""
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):     # defined interactively: its name is what we have
        return ""


def model_structure(model: nn.Module) -> str:
    """Digest of the architecture: for every submodule its path, class, extra_repr (Linear sizes,
    Dropout p, norm eps/momentum, activation settings), plain public attributes, the source of
    user-defined classes, and the names, shapes, dtypes and requires_grad of its own parameters
    and buffers."""
    h = new_hash()
    for name, m in model.named_modules():
        cls = type(m)
        attrs = sorted((k, v) for k, v in vars(m).items()
                       if not k.startswith("_") and k != "training" and _plain(v))
        h.update(repr((name, f"{cls.__module__}.{cls.__qualname__}", m.extra_repr(), attrs)).encode())
        h.update(_class_source(cls).encode())
        for pn, p in m.named_parameters(recurse=False):
            h.update(repr(("param", pn, tuple(p.shape), str(p.dtype), p.requires_grad)).encode())
        for bn, b in m.named_buffers(recurse=False):
            h.update(repr(("buffer", bn, tuple(b.shape), str(b.dtype))).encode())
    return h.hexdigest()


def model_weights(model: nn.Module) -> str:
    h = new_hash()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        if isinstance(v, torch.Tensor):
            update_with_tensor(h, v)
        else:
            h.update(repr(v).encode())
    return h.hexdigest()


def _code_identity(code) -> str:
    """The compiled body of a function (bytecode, constants, names), nested code included: unlike
    its source text, it does not change with what else stands on a lambda's line."""
    consts = [_code_identity(c) if inspect.iscode(c) else repr(c) for c in code.co_consts]
    return repr((code.co_code, consts, code.co_names, code.co_varnames))


def callable_identity(fn: Any) -> str:
    """What a custom loss computes, as far as can be told without running it."""
    if isinstance(fn, str):
        return fn
    if isinstance(fn, nn.Module):
        return model_structure(fn)
    if isinstance(fn, functools.partial):
        return "partial:" + callable_identity(fn.func) + repr([a for a in fn.args if _plain(a)]) + \
            repr(sorted((k, v) for k, v in fn.keywords.items() if _plain(v)))
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    code = getattr(fn, "__code__", None)
    if code is not None:
        defaults = [d for d in (getattr(fn, "__defaults__", None) or ()) if _plain(d)]
        return name + _code_identity(code) + repr(defaults)
    return name + _class_source(type(fn))        # a callable object: its class
