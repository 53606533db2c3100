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

    def __init__(self, modules: list[nn.Module]):
        self.modules = list(modules)
        self.calls: dict[nn.Module, list[Call]] = {m: [] for m in self.modules}
        self.unsupported: set[nn.Module] = set()
        self._handles: list[Any] = []

    def __enter__(self) -> "ForwardRecorder":
        for m in self.modules:
            self._handles.append(m.register_forward_hook(self._make_hook(m), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        # Hooks must be gone before the per-sample recomputations run the modules again.
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, module: nn.Module):
        def hook(mod, args, kwargs, output):
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                self.unsupported.add(module)
                return None
            self.calls[module].append(Call(args, kwargs, output))
            # The rest of the network gets a copy: an in-place op downstream (ReLU(inplace=True),
            # `x += ...`) then modifies the copy, so autograd.grad w.r.t. `output` stays the
            # gradient at this module's output. The copy is O(N * d_out), small next to the layer.
            return output.clone()

        return hook
