"""Exponential moving averages of the weights: the one that gets exported and sampled (``EMA``), and the
power-function averages of ``--ema-profiles`` (``PowerEMA``, snapshotted by ``ema_profiles.py``)."""

from __future__ import annotations

import copy
import math

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


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent gamma of the power-function profile with relative standard deviation sigma_rel.

    The profile p(tau) = (gamma + 1) tau^gamma on [0, 1] (Karras et al. 2024, sec. 3.1) has mean
    (gamma + 1)/(gamma + 2) and variance (gamma + 1) / ((gamma + 2)^2 (gamma + 3)), so sigma_rel^2
    (gamma + 2)^2 (gamma + 3) = gamma + 1: a cubic in gamma, whose largest real root is the one
    with gamma > -0.38, where sigma_rel falls as gamma grows (0.05 -> 16.97, 0.10 -> 6.94).
    """
    import numpy as np

    if not 0 < sigma_rel < 0.3:  # sigma_rel peaks at 0.3003 (gamma = -0.382)
        raise ValueError(f"no power-function EMA has relative std {sigma_rel}")
    s2 = sigma_rel * sigma_rel
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    return float(roots[np.abs(roots.imag) < 1e-9 * np.maximum(1.0, np.abs(roots))].real.max())


def sigma_rel_from_gamma(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


class PowerEMA:
    """EDM2's power-function EMA (Karras et al. 2024, sec. 3.1 and appendix C.1):

        theta_hat_t = beta_t theta_hat_{t-1} + (1 - beta_t) theta_t,   beta_t = (1 - 1/t)^(gamma + 1),

    with t the number of optimiser steps taken. Unrolled, theta_hat_t averages theta_1 .. theta_t
    with weights (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1): the profile (gamma + 1)
    tau^gamma / t^(gamma+1) integrated over each step, so the average of a run of any length
    has the same shape, relative std sigma_rel. Kept in float32 by parameter name.
    """

    def __init__(self, model: torch.nn.Module, sigma_rel: float):
        self.sigma_rel, self.gamma = sigma_rel, gamma_from_sigma_rel(sigma_rel)
        self.names = [name for name, _ in model.named_parameters()]
        self.averages = [p.detach().float().clone() for p in model.parameters()]

    def beta(self, t: int) -> float:
        return (1.0 - 1.0 / t) ** (self.gamma + 1.0)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, t: int) -> None:
        """Fold in the weights after optimiser step t (t = 1, 2, ...). A skipped step's unchanged
        weights count as that step's: the profile is over steps."""
        torch._foreach_lerp_(self.averages, [p.detach() for p in model.parameters()], 1.0 - self.beta(t))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.averages))

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != set(self.names):
            raise KeyError("the saved power-EMA averages hold other weights than this model's")
        for name, average in zip(self.names, self.averages):
            average.copy_(tensors[name])
