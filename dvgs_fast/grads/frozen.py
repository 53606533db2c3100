"""Scoring must never change the model: `FrozenStatistics` puts BatchNorm in eval mode (each
sample normalised with the running statistics, independently of the others in its batch, which
is what makes a per-sample gradient defined) and restores every buffer afterwards."""
from __future__ import annotations

import torch
from torch import nn


class FrozenStatistics:
    """Context manager: BatchNorm in eval mode while scoring, every buffer restored afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.bn = [m for m in self.model.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        for m in self.bn:
            m.eval()
        self.buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for b, saved in self.buffers:
                b.copy_(saved)
        for m in self.bn:
            m.train()
        return False
