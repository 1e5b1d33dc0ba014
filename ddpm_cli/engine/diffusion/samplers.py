"""Reverse-process samplers as plain functions of one shape, found by name in ``registry.py``.

Every sampler is ``sample_x(model, x, schedule, timesteps, noise=None, callback=None, **options) -> x``:

- ``model(x, t) -> network output`` at timestep t, an integer or, for interpolated noise levels,
  fractional (``denoiser.py``; wrappers in ``wrappers.py`` add input channels or tile it);
- ``x`` is the state at ``timesteps[0]``: x_T, or a partially noised image when the list starts
  lower (the chain need not start at T);
- ``timesteps`` is a decreasing list (from :func:`make_timesteps`, or a tail of one), and the
  chain always ends at the clean image (alpha_bar = 1);
- ``noise()`` draws a fresh standard normal like ``x`` (deterministic samplers never call it);
- ``callback(info)`` runs after each step with ``{"i", "t", "t_prev", "x", "denoised"}``, where x
  is now at timestep t_prev (-1: the clean end); a tensor it returns replaces x (inpainting puts
  the known region back this way), None keeps it;
- ``options`` are the keyword-only options its registry entry lists (``eta``, ``variance``, ``sigmas``,
  ``order``).

DDPM and DDIM live here; the sigma-space samplers (Euler, Heun, DPM2, LMS) in ``ksamplers.py``,
DPM-Solver++ and UniPC in ``dpmsolver.py``. Timesteps may be fractional there (``sigmas.py``).

Coefficients are Python floats computed in float64, so the loop issues no host-device synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ddpm_cli.engine.choices import SPACINGS, VARIANCES
from ddpm_cli.engine.errors import InputError
from ddpm_cli.engine.diffusion.schedule import NoiseSchedule, interpolate_log_variance

Model = Callable[[torch.Tensor, int], torch.Tensor]
Noise = Callable[[], torch.Tensor] | None
Callback = Callable[[dict], torch.Tensor | None] | None


def make_timesteps(num_train_timesteps: int, steps: int, spacing: str = "leading", offset: int = 0,
                   solver_grid: bool = False) -> list[int]:
    """The decreasing timesteps visited by an n-step sampler (Table 2 of Lin et al. 2024).

    leading: 0, T/n, 2T/n... (DDPM/DDIM in diffusers); trailing: T-1, T-1-T/n, ... down to T/n-1;
    linspace: n points evenly from T-1 to 0. ``offset`` is diffusers' ``steps_offset``.
    ``solver_grid``: DPM-Solver's and UniPC's rule in diffusers for leading and linspace: n + 1
    points (leading: step T // (n + 1)), the lowest dropped, so 10 leading steps are 900 ... 90.
    """
    T = num_train_timesteps
    if not 1 <= steps <= T:
        raise InputError(f"--steps must be between 1 and {T} (the model's training timesteps), got {steps}")
    if spacing == "leading" and solver_grid:
        values = np.arange(1, steps + 1) * (T // (steps + 1)) + offset
    elif spacing == "leading":
        values = np.arange(0, steps) * (T // steps) + offset
    elif spacing == "trailing":
        values = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    elif spacing == "linspace" and solver_grid:
        values = np.linspace(0, T - 1, steps + 1).round()[1:]
    elif spacing == "linspace":
        values = np.linspace(0, T - 1, steps).round()
    else:
        raise InputError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return sorted({int(min(max(v, 0), T - 1)) for v in values}, reverse=True)


def _prev(timesteps: list[int], i: int) -> int:
    return timesteps[i + 1] if i + 1 < len(timesteps) else -1


def after_step(callback: Callback, i: int, t: int, t_prev: int, x: torch.Tensor,
               denoised: torch.Tensor | None) -> torch.Tensor:
    """Run the step callback; x, or the tensor the callback returned in its place."""
    if callback is None:
        return x
    replaced = callback({"i": i, "t": t, "t_prev": t_prev, "x": x, "denoised": denoised})
    return x if replaced is None else replaced


def _needs_noise(noise: Noise, sampler: str) -> None:
    if noise is None:
        raise ValueError(f"{sampler} needs a noise source with these options")


def ddpm_step(model: Model, x: torch.Tensor, schedule: NoiseSchedule, t: int, t_prev: int,
              noise: Callable[[], torch.Tensor], variance: str = "fixed_small") -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step from t to t_prev (-1: the clean end, no noise added); returns (x_prev, x0).

    A learned variance (the network's extra channels) interpolates, for "learned_range", between
    log beta_tilde and log beta of this (possibly respaced) step, as in Nichol & Dhariwal (2021).
    """
    alpha_bar_t, alpha_bar_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
    alpha_t = alpha_bar_t / alpha_bar_prev
    beta_t = 1.0 - alpha_t
    output = model(x, t)
    x0, _ = schedule.split_prediction(output, x, t)
    # Posterior mean mu_tilde(x_t, x_0), eq. (7).
    mean = (alpha_bar_prev**0.5 * beta_t / (1.0 - alpha_bar_t)) * x0 \
        + (alpha_t**0.5 * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)) * x
    if t_prev < 0:
        return mean, x0
    small = max((1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * beta_t, 1e-20)
    if variance in ("learned_range", "learned"):
        extra = output[:, x.shape[1]:]
        if extra.shape[1] != x.shape[1]:
            raise InputError(f"variance {variance} needs a model that outputs a variance; this one does not")
        log_var = extra if variance == "learned" else interpolate_log_variance(extra, math.log(small), math.log(beta_t))
        return mean + torch.exp(0.5 * log_var) * noise(), x0
    var = beta_t if variance == "fixed_large" else small
    return mean + var**0.5 * noise(), x0


@torch.no_grad()
def sample_ddpm(model: Model, x: torch.Tensor, schedule: NoiseSchedule, timesteps: list[int], noise: Noise = None,
                callback: Callback = None, *, variance: str = "fixed_small") -> torch.Tensor:
    """Ancestral sampling, Algorithm 2 of Ho et al. (2020), over any subsequence of timesteps.

    Respaced steps use beta_t = 1 - alpha_bar_t / alpha_bar_prev (Nichol & Dhariwal 2021, sec. 4).
    variance: "fixed_small" is the posterior variance beta_tilde_t, "fixed_large" is beta_t,
    "learned_range" and "learned" read the model's own variance output (see ``ddpm_step``).
    """
    if variance not in VARIANCES:
        raise InputError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")
    _needs_noise(noise, "sample_ddpm")
    for i, t in enumerate(timesteps):
        t_prev = _prev(timesteps, i)
        x, x0 = ddpm_step(model, x, schedule, t, t_prev, noise, variance)
        x = after_step(callback, i, t, t_prev, x, x0)
    return x


@torch.no_grad()
def sample_ddim(model: Model, x: torch.Tensor, schedule: NoiseSchedule, timesteps: list[int], noise: Noise = None,
                callback: Callback = None, *, eta: float = 0.0) -> torch.Tensor:
    """DDIM, eq. (12) of Song et al. (2021); eta = 0 is deterministic, eta = 1 matches DDPM's variance.

    The last step ends at ``schedule.final_alpha_bar`` (alpha_bar_0 for configs with set_alpha_to_one
    false, as Stable Diffusion's), so the result is then x_0 a hair short of clean, as in diffusers."""
    if eta < 0:
        raise InputError(f"--eta must be >= 0, got {eta}")
    if eta > 0:
        _needs_noise(noise, "sample_ddim with eta > 0")
    for i, t in enumerate(timesteps):
        t_prev = _prev(timesteps, i)
        alpha_bar_t = schedule.alpha_bar(t)
        alpha_bar_prev = schedule.alpha_bar(t_prev) if t_prev >= 0 else schedule.final_alpha_bar
        x0, eps = schedule.split_prediction(model(x, t), x, t)
        # sigma_t(eta), eq. (16).
        sigma = eta * ((1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * (1.0 - alpha_bar_t / alpha_bar_prev)) ** 0.5
        # "Direction pointing to x_t", then the predicted x_{t-1}.
        direction = max(1.0 - alpha_bar_prev - sigma**2, 0.0) ** 0.5 * eps
        x = alpha_bar_prev**0.5 * x0 + direction
        if sigma > 0:
            x = x + sigma * noise()
        x = after_step(callback, i, t, t_prev, x, x0)
    return x
