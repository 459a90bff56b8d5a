"""Exponential moving average of a model's parameters, held in a separate module used for sampling."""

from __future__ import annotations

import copy

import torch
from torch import nn

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def ema_decay_at(decay: float, step: int) -> float:
    """The decay used at update `step` (0-based): the usual warm-up min(decay, (1+step)/(10+step))."""
    return min(decay, (1 + step) / (10 + step))


class EMA:
    """EMA of parameters (at least float32) in a deep copy of the model; buffers are copied as they are."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        for p in self.module.parameters():
            if p.dtype in _LOW_PRECISION:  # averaging in half precision loses small updates entirely
                p.data = p.data.float()

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move the average towards `model`'s current parameters; decay 0 makes it an exact copy."""
        d = ema_decay_at(self.decay, step)
        for avg, p in zip(self.module.parameters(), model.parameters(), strict=True):
            if d == 0.0:
                avg.copy_(p)
            else:
                avg.lerp_(p.detach().to(avg.dtype), 1.0 - d)
        for avg, b in zip(self.module.buffers(), model.buffers(), strict=True):
            avg.copy_(b)
