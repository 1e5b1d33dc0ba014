"""Noise levels as sigma = sqrt((1 - alpha_bar) / alpha_bar), for the samplers that step in sigma
(``ksamplers.py``) or in log-SNR lambda = -log(sigma) (``dpmsolver.py``).

A sampler receives integer timesteps (``samplers.make_timesteps``); :func:`plan` turns them into
the noise levels it visits, sigma_0 > ... > sigma_{n-1} > sigma_n = 0, and the timesteps at which the
network is asked about each. ``--sigmas`` chooses the levels:

- ``default``: sigma at each given timestep;
- ``karras``: Karras et al. (2022), eq. 5 with rho = 7, evenly spaced in sigma^(1/rho);
- ``exponential``: evenly spaced in log sigma.

The last two keep the number of steps and put the network's timestep at t(sigma), interpolating
log sigma linearly between training timesteps, as diffusers does. Its schedulers differ in which
range they span and whether they round t; ``span``/``times`` name each convention (see ``plan``).
"""

from __future__ import annotations

import math

import numpy as np

from ddpm_cli.engine.choices import SIGMAS as SIGMA_SCHEDULES
from ddpm_cli.engine.diffusion.zero_snr import TERMINAL_ALPHA_BAR, rescale_zero_terminal_snr
from ddpm_cli.engine.errors import InputError


def sigma_table(schedule) -> np.ndarray:
    """sigma_t for t = 0..T-1 (increasing in t), from alpha_bar in float32 as diffusers computes it
    (betas by torch.linspace in float32, then their cumulative product). The levels differ from
    float64's by ~4e-6 relative, nothing to the eye; but karras and exponential levels (and the SDE
    solvers' noise) amplify that to 1e-3 of an image, and these are the levels diffusers users get.
    A schedule that carries its own levels (an EDM model's, ``edm.EDMSchedule.sigma_levels``) gives those."""
    levels = getattr(schedule, "sigma_levels", None)
    if levels is not None:
        return levels
    import torch

    T = schedule.num_train_timesteps
    if schedule.beta_schedule == "linear":
        betas = torch.linspace(schedule.beta_start, schedule.beta_end, T, dtype=torch.float32)
    elif schedule.beta_schedule == "scaled_linear":
        betas = torch.linspace(schedule.beta_start**0.5, schedule.beta_end**0.5, T, dtype=torch.float32) ** 2
    else:  # cosine and trained betas: diffusers rounds its float64 values to float32
        betas = schedule.betas.to(torch.float32)
    if schedule.rescale_betas_zero_snr:  # in float32, as diffusers rescales (rescaled betas stay as they are)
        betas = rescale_zero_terminal_snr(betas)
    alpha_bar = torch.cumprod(1.0 - betas, dim=0)
    if schedule.zero_terminal_snr:  # sigma_T = inf: a large finite sigma instead, as diffusers has it
        alpha_bar[-1] = TERMINAL_ALPHA_BAR
    return (((1.0 - alpha_bar) / alpha_bar) ** 0.5).numpy()


def log_sigma_table(schedule) -> np.ndarray:
    """log sigma_t, as diffusers takes it (in float32), for interpolating timesteps."""
    return np.log(sigma_table(schedule)).astype(np.float64)


def sigma_at(schedule, t: float) -> float:
    """sigma at timestep t: the table's entry for an integer, log-linear in between; 0 for t < 0."""
    if t < 0:
        return 0.0
    if float(t).is_integer():
        return float(sigma_table(schedule)[int(t)])
    table = log_sigma_table(schedule)
    return float(math.exp(np.interp(t, np.arange(len(table)), table)))


def sigma_to_t(log_table: np.ndarray, sigma: float) -> float:
    """The (fractional) timestep whose sigma this is, clamped to the table's range."""
    return float(np.interp(math.log(max(sigma, 1e-10)), log_table, np.arange(len(log_table))))


def _as_time(t: float) -> int | float:
    return int(t) if float(t).is_integer() else t


def plan(schedule, timesteps: list[int], kind: str = "default", span: str = "timesteps",
         times: str = "float") -> tuple[list[float], list[int | float]]:
    """(sigmas, model_times): n + 1 noise levels ending at 0, and the n timesteps the network sees.

    span: the ends of a karras/exponential schedule: "timesteps" from sigma(timesteps[0]) to
    sigma(timesteps[-1]) (diffusers' Euler, Heun, KDPM2, LMS), "full" from sigma(T - 1) to sigma(0)
    whatever the timesteps (its DPM-Solver and UniPC, which keep only their count), "tail" from
    sigma(timesteps[0]) to sigma(0) (theirs when starting midway, from a partly noised image).
    times: how t(sigma) is given to the network: "float" as is; "round-karras" rounded for karras
    (KDPM2); "dpm" rounded for karras and truncated for exponential (DPM-Solver's int64 timesteps).
    """
    if kind not in SIGMA_SCHEDULES:
        raise InputError(f"unknown --sigmas {kind!r}; choose one of {', '.join(SIGMA_SCHEDULES)}")
    sigma = sigma_table(schedule).astype(np.float64)
    table = log_sigma_table(schedule)
    n = len(timesteps)
    continuous = getattr(schedule, "sigma_levels", None) is not None  # an EDM network takes any sigma: no rounding
    if kind == "default":
        return [float(sigma[t]) for t in timesteps] + [0.0], list(timesteps)
    if span == "full":
        high, low = float(sigma[-1]), float(sigma[0])
    elif span == "tail":
        high, low = float(sigma[timesteps[0]]), float(sigma[0])
    else:
        high, low = float(sigma[timesteps[0]]), float(sigma[timesteps[-1]])
    ramp = np.linspace(0.0, 1.0, n)
    if kind == "karras":
        rho = schedule.edm.rho if continuous else 7.0
        levels = (high ** (1 / rho) + ramp * (low ** (1 / rho) - high ** (1 / rho))) ** rho
    else:
        levels = np.exp(np.linspace(math.log(high), math.log(low), n))
    model_times = [sigma_to_t(table, float(s)) for s in levels]
    if kind == "karras" and times in ("round-karras", "dpm") and not continuous:
        model_times = [float(np.round(t)) for t in model_times]
    elif kind == "exponential" and times == "dpm" and not continuous:
        model_times = [float(math.floor(t)) for t in model_times]
    return [float(s) for s in levels] + [0.0], [_as_time(t) for t in model_times]


def vp_scale(sigma: float) -> float:
    """sqrt(1 + sigma^2) = 1 / sqrt(alpha_bar): x in sigma form is x_t times this."""
    return (sigma * sigma + 1.0) ** 0.5
