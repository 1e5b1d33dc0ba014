"""Exponential moving average of the weights, the network that gets exported and sampled."""

from __future__ import annotations

import copy

import torch


class EMA:
    """theta_ema <- decay_k theta_ema + (1 - decay_k) theta, with decay_k = min(decay, (1 + k) / (10 + k)).

    The warm-up of decay_k keeps short runs from being dominated by their random start. The update
    is a few foreach calls over all parameters; buffers are copied.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int, skipped: torch.Tensor | None = None) -> None:
        """One EMA step; ``skipped`` (1.0 on the device where the optimiser skipped the step) leaves
        the average unchanged, without reading the flag on the host."""
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        if skipped is None:
            torch._foreach_lerp_(ema_params, params, 1.0 - self.decay_at(step))
        else:
            delta = torch._foreach_sub(params, ema_params)
            torch._foreach_mul_(delta, (1.0 - skipped) * (1.0 - self.decay_at(step)))
            torch._foreach_add_(ema_params, delta)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)
