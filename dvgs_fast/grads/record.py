"""Record, during one batched forward, what the fast scorer needs from each routed module:
the arguments it was called with and the output tensor whose gradient is the layer's δ.

Only forward hooks are used. The backward is a single `torch.autograd.grad(loss, outputs)`
over the recorded outputs, which needs no backward hooks (those clash with in-place ops such
as ReLU(inplace=True) on a hooked module's output and cost a wrapper node per call).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Call:
    """One call of a module: its (detached later) inputs and the output tensor it produced."""

    args: tuple
    kwargs: dict
    output: torch.Tensor
    version: int | None = None       # the output's version counter when it was not copied (see below)

    @property
    def input(self) -> Any:
        """The module's input: its first positional argument, or `input=` given by keyword."""
        return self.args[0] if self.args else self.kwargs.get("input")


class ForwardRecorder:
    """Context manager: while active, every call of the given modules is recorded.

    `calls[m]` lists the calls of module m in order (a module used twice, e.g. weight sharing,
    has two entries); `unsupported` collects modules whose output was not a single tensor that
    requires grad, whose parameters must then take the slow route.
    """

    def __init__(self, modules: list[nn.Module], uncopied: frozenset = frozenset()):
        self.modules = list(modules)
        self.uncopied = uncopied             # modules whose output no op can modify in place (fresh_output_modules)
        self.calls: dict[nn.Module, list[Call]] = {m: [] for m in self.modules}
        self.unsupported: set[nn.Module] = set()
        self._handles: list[Any] = []

    def __enter__(self) -> "ForwardRecorder":
        for m in self.modules:
            self._handles.append(m.register_forward_hook(self._make_hook(m), with_kwargs=True))
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # Hooks must be gone before the per-sample recomputations run the modules again.
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if exc_type is None:
            for m in self.uncopied:
                for c in self.calls.get(m, ()):
                    if c.output._version != c.version:
                        raise RuntimeError(f"the output of a {type(m).__name__} was modified in place during the "
                                           f"forward, after the gradient engine recorded it (a forward hook of "
                                           f"the next module?): its per-sample gradients would be wrong")

    def _make_hook(self, module: nn.Module):
        copy = module not in self.uncopied

        def hook(mod, args, kwargs, output):
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                self.unsupported.add(module)
                return None
            if not copy:                     # nothing downstream can change it: no copy, its version checked
                self.calls[module].append(Call(args, kwargs, output, output._version))
                return None
            self.calls[module].append(Call(args, kwargs, output))
            # The rest of the network gets a copy: an in-place op downstream (ReLU(inplace=True),
            # `x += ...`) then modifies the copy, so autograd.grad w.r.t. `output` stays the
            # gradient at this module's output. The copy is O(N * d_out), small next to the layer,
            # but it and its backward node cost 30-60 µs of a ~550 µs step on a 64-32-10 MLP
            # (bench/results/recorder_copy.md): skipped where nothing can modify the output.
            return output.clone()

        return hook


# Leaf modules whose forward returns a new tensor (never its input or a view of it) and leaves
# its input alone; the activations among them only with inplace=False. (Not Dropout / Identity:
# they can return their input itself; not Flatten / views: an in-place op on a view changes it.)
_FRESH = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d,
          nn.BatchNorm2d, nn.BatchNorm3d, nn.Tanh, nn.Sigmoid, nn.GELU, nn.Softplus, nn.Softsign, nn.Tanhshrink,
          nn.LogSigmoid, nn.Softmax, nn.LogSoftmax, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)
_FRESH_UNLESS_INPLACE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.SiLU, nn.Mish, nn.Hardtanh,
                         nn.Hardswish, nn.Hardsigmoid, nn.RReLU, nn.Threshold)


def fresh_output_modules(model: nn.Module, modules: list[nn.Module]) -> frozenset:
    """Those of `modules` whose output needs no copy: each appears once in the model, as a child
    of a plain nn.Sequential whose next child (the only reader of its output) is a fresh-output
    leaf (_FRESH). Anything else (the last child, a custom forward, a shared module) keeps the copy."""
    count: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        count[id(m)] = count.get(id(m), 0) + 1
    wanted = {id(m) for m in modules}
    out = set()
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential) or type(parent).forward is not nn.Sequential.forward:
            continue
        kids = list(parent)
        for m, nxt in zip(kids, kids[1:]):
            fresh = type(nxt) in _FRESH or (type(nxt) in _FRESH_UNLESS_INPLACE and not getattr(nxt, "inplace", True))
            if id(m) in wanted and count[id(m)] == 1 and fresh and not nxt._forward_hooks \
                    and not nxt._forward_pre_hooks:
                out.add(m)
    return frozenset(out)
