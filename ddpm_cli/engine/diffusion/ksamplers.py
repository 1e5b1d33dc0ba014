"""Samplers that step in sigma, the k-diffusion family (Karras et al. 2022; Crowson's k-diffusion).

Each has the one signature of ``samplers.py``. Inside, the state is x in sigma form,
x_sigma = x_t / sqrt(alpha_bar_t) = x_0 + sigma eps, and the probability-flow ODE is
dx/dsigma = (x - D(x; sigma)) / sigma with D the denoised estimate. The network still sees x_t
(x_sigma / sqrt(1 + sigma^2)) at timestep t(sigma), fractional between training timesteps.
Callbacks see x_t, as with every sampler, and may replace it.

Each follows its diffusers scheduler (EulerDiscrete, EulerAncestralDiscrete, HeunDiscrete,
KDPM2Discrete, LMSDiscrete): the same levels, the same timesteps given to the network, x_0 clipped
only when the schedule says so (``--clip-x0``), and the same start: from pure noise at the last
training timestep those schedulers scale it by sigma_max, not sqrt(1 + sigma_max^2).
"""

from __future__ import annotations

import numpy as np
import torch

from ddpm_cli.engine.diffusion.samplers import (
    Callback,
    Model,
    Noise,
    _needs_noise,
    after_step,
)
from ddpm_cli.engine.diffusion.schedule import NoiseSchedule
from ddpm_cli.engine.diffusion.sigmas import log_sigma_table, plan, sigma_to_t, vp_scale


def denoised(model: Model, schedule: NoiseSchedule, x: torch.Tensor, sigma: float, t) -> torch.Tensor:
    """D(x; sigma): the network's x_0 from x in sigma form, clipped if the schedule says so."""
    output = model(x / vp_scale(sigma), t)[:, : x.shape[1]]
    if schedule.prediction_type == "epsilon":
        x0 = x - sigma * output
    elif schedule.prediction_type == "v":
        x0 = output * (-sigma / vp_scale(sigma)) + x / (sigma * sigma + 1.0)
    else:
        x0 = output
    if schedule.clip_sample:
        x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    return x0


def _start(x: torch.Tensor, schedule: NoiseSchedule, timesteps: list[int], sigma: float) -> torch.Tensor:
    # diffusers' init_noise_sigma: sigma_max from pure noise at T - 1 (its "linspace"/"trailing"), else sqrt(1 + sigma^2),
    # which its EDM schedulers take from pure noise too.
    edm = getattr(schedule, "sigma_levels", None) is not None
    pure_noise = timesteps[0] == schedule.num_train_timesteps - 1 and not edm
    return x * (sigma if pure_noise else vp_scale(sigma))


def _done(callback: Callback, i: int, times: list, x: torch.Tensor, sigma_next: float,
          x0: torch.Tensor) -> torch.Tensor:
    """The step callback on x_t; a replacement comes back into sigma form."""
    if callback is None:
        return x
    scale = vp_scale(sigma_next)
    x_t = x / scale
    t_prev = times[i + 1] if i + 1 < len(times) else -1
    replaced = after_step(callback, i, times[i], t_prev, x_t, x0)
    return x if replaced is x_t else replaced * scale


@torch.no_grad()
def sample_euler(model: Model, x: torch.Tensor, schedule: NoiseSchedule, timesteps: list[int], noise: Noise = None,
                 callback: Callback = None, *, sigmas: str = "default") -> torch.Tensor:
    """Euler's method on the probability-flow ODE, Algorithm 1 of Karras et al. (2022) without churn."""
    levels, times = plan(schedule, timesteps, sigmas)
    x = _start(x, schedule, timesteps, levels[0])
    for i, t in enumerate(times):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoised(model, schedule, x, sigma, t)
        x = x + (x - x0) / sigma * (sigma_next - sigma)
        x = _done(callback, i, times, x, sigma_next, x0)
    return x


@torch.no_grad()
def sample_euler_a(model: Model, x: torch.Tensor, schedule: NoiseSchedule, timesteps: list[int], noise: Noise = None,
                   callback: Callback = None) -> torch.Tensor:
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise up to sigma_next, so that
    each step is an ancestral step of the DDPM posterior (Ho et al. 2020) in sigma form, as in
    k-diffusion's sample_euler_ancestral (Karras et al. 2022 for the ODE form)."""
    _needs_noise(noise, "sample_euler_a")
    levels, times = plan(schedule, timesteps)
    x = _start(x, schedule, timesteps, levels[0])
    for i, t in enumerate(times):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoised(model, schedule, x, sigma, t)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x = x + (x - x0) / sigma * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + sigma_up * noise()
        x = _done(callback, i, times, x, sigma_next, x0)
    return x


@torch.no_grad()
def sample_heun(model: Model, x: torch.Tensor, schedule: NoiseSchedule, timesteps: list[int], noise: Noise = None,
                callback: Callback = None, *, sigmas: str = "default") -> torch.Tensor:
    """Heun's second-order method, Algorithm 1 of Karras et al. (2022): two network calls a step,
    Euler for the last step (to sigma = 0)."""
    levels, times = plan(schedule, timesteps, sigmas)
    x = _start(x, schedule, timesteps, levels[0])
    for i, t in enumerate(times):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoised(model, schedule, x, sigma, t)
        slope = (x - x0) / sigma
        euler = x + slope * (sigma_next - sigma)
        if sigma_next > 0:
            x0 = denoised(model, schedule, euler, sigma_next, times[i + 1])
            x = x + (slope + (euler - x0) / sigma_next) / 2 * (sigma_next - sigma)
        else:
            x = euler
        x = _done(callback, i, times, x, sigma_next, x0)
    return x


@torch.no_grad()
def sample_dpm2(model: Model, x: torch.Tensor, schedule: NoiseSchedule, timesteps: list[int], noise: Noise = None,
                callback: Callback = None, *, sigmas: str = "default") -> torch.Tensor:
    """DPM-Solver-2 in sigma form (Lu et al. 2022a, Algorithm 4 as in k-diffusion's sample_dpm_2):
    the slope at the geometric midpoint of sigma and sigma_next takes the whole step; Euler for the last."""
    levels, times = plan(schedule, timesteps, sigmas, times="round-karras")
    table = log_sigma_table(schedule)
    x = _start(x, schedule, timesteps, levels[0])
    for i, t in enumerate(times):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoised(model, schedule, x, sigma, t)
        slope = (x - x0) / sigma
        if sigma_next > 0:
            sigma_mid = float(np.exp(0.5 * (np.log(sigma) + np.log(sigma_next))))
            mid = x + slope * (sigma_mid - sigma)
            x0 = denoised(model, schedule, mid, sigma_mid, sigma_to_t(table, sigma_mid))
            x = x + (mid - x0) / sigma_mid * (sigma_next - sigma)
        else:
            x = x + slope * (sigma_next - sigma)
        x = _done(callback, i, times, x, sigma_next, x0)
    return x


def lms_coefficient(levels: list[float], i: int, order: int, j: int) -> float:
    """The integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of sigma_{i-j}
    on the points sigma_i, ..., sigma_{i-order+1} (exact, for polynomials)."""
    basis = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            basis *= np.polynomial.Polynomial([-levels[i - k], 1.0]) / (levels[i - j] - levels[i - k])
    antiderivative = basis.integ()
    return float(antiderivative(levels[i + 1]) - antiderivative(levels[i]))


@torch.no_grad()
def sample_lms(model: Model, x: torch.Tensor, schedule: NoiseSchedule, timesteps: list[int], noise: Noise = None,
               callback: Callback = None, *, sigmas: str = "default") -> torch.Tensor:
    """Linear multistep (Adams-Bashforth) of order 4 in sigma, as in k-diffusion's sample_lms
    (Karras et al. 2022's ODE; the method after Adams, see Hairer, Norsett & Wanner 1993)."""
    levels, times = plan(schedule, timesteps, sigmas)
    x = _start(x, schedule, timesteps, levels[0])
    slopes: list[torch.Tensor] = []
    for i, t in enumerate(times):
        sigma = levels[i]
        x0 = denoised(model, schedule, x, sigma, t)
        slopes = [*slopes[-3:], (x - x0) / sigma]
        order = len(slopes)
        x = x + sum(lms_coefficient(levels, i, order, j) * slopes[-1 - j] for j in range(order))
        x = _done(callback, i, times, x, levels[i + 1], x0)
    return x
