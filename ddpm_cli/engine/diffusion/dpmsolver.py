"""Exponential-integrator samplers in log-SNR: DPM-Solver++ (Lu et al. 2022b), its SDE form, and
UniPC (Zhao et al. 2023). Each has the one signature of ``samplers.py``.

They step on x_t itself (alpha_t = 1 / sqrt(1 + sigma^2), sigma_t = sigma alpha_t) from data
predictions x_0 = D(x_t), with h = lambda_next - lambda, lambda = log(alpha_t / sigma_t) = -log sigma.
The last step, to sigma = 0, is first order (diffusers' final_sigmas_type "zero"), and the orders
ramp up and down as in diffusers' DPMSolverMultistep/Singlestep and UniPCMultistep schedulers, whose
images these equal (``tests/test_samplers.py``). x_0 is clipped only when the schedule says so
(``--clip-x0``; diffusers offers thresholding instead and never clips here).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ddpm_cli.engine.choices import SPACINGS
from ddpm_cli.engine.diffusion.samplers import (
    Callback,
    Model,
    Noise,
    _needs_noise,
    after_step,
    make_timesteps,
)
from ddpm_cli.engine.diffusion.schedule import NoiseSchedule
from ddpm_cli.engine.diffusion.sigmas import plan
from ddpm_cli.engine.errors import InputError


def data_prediction(model: Model, schedule: NoiseSchedule, x: torch.Tensor, sigma: float, t) -> torch.Tensor:
    """x_0 from the network at x_t with noise level sigma, clipped if the schedule says so."""
    output = model(x, t)[:, : x.shape[1]]
    alpha = 1.0 / (1.0 + sigma * sigma) ** 0.5
    if schedule.prediction_type == "epsilon":
        x0 = (x - sigma * alpha * output) / alpha
    elif schedule.prediction_type == "v":
        x0 = alpha * x - sigma * alpha * output
    else:
        x0 = output
    if schedule.clip_sample:
        x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    return x0


def noise_levels(schedule: NoiseSchedule, timesteps: list[int], sigmas: str) -> tuple[list[float], list]:
    """The noise levels and network timesteps (``sigmas.plan``). Karras and exponential levels span
    the whole training range, as diffusers' DPM-Solver and UniPC have them, when the timesteps are a
    whole n-step grid; a tail of one (image-to-image starts midway, from a partly noised image)
    starts at its own first timestep, where that image's noise is."""
    T = schedule.num_train_timesteps
    whole = any(timesteps == make_timesteps(T, len(timesteps), spacing, schedule.steps_offset, True)
                for spacing in SPACINGS)
    return plan(schedule, timesteps, sigmas, span="full" if whole else "tail", times="dpm")


def _coefficients(sigma: float) -> tuple[float, float, float]:
    """(alpha_t, sigma_t, lambda) of a noise level sigma; lambda = inf at the clean end."""
    alpha = 1.0 / (1.0 + sigma * sigma) ** 0.5
    return alpha, sigma * alpha, (math.inf if sigma == 0 else -math.log(sigma))


def _done(callback: Callback, i: int, times: list, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    return after_step(callback, i, times[i], times[i + 1] if i + 1 < len(times) else -1, x, x0)


def _dpm_update(x: torch.Tensor, d: list[torch.Tensor], sigma_s: float, sigma_t: float, h: float, r: list[float],
                z: torch.Tensor | None) -> torch.Tensor:
    """One DPM-Solver++ update from noise level sigma_s to sigma_t of order len(d) (Lu et al. 2022b,
    Algorithms 1-2; the SDE form of their sec. 5 when z, the fresh noise, is given). d holds the data
    predictions newest first, r the ratios h_k / h of the previous log-SNR steps."""
    alpha_t, s_t, _ = _coefficients(sigma_t)
    _, s_s, _ = _coefficients(sigma_s)
    if z is None:
        x_next = (s_t / s_s) * x
        first = -alpha_t * math.expm1(-h)  # alpha_t (1 - e^{-h})
    else:
        x_next = (s_t / s_s * math.exp(-h)) * x
        first = -alpha_t * math.expm1(-2.0 * h)  # alpha_t (1 - e^{-2h})
    x_next = x_next + first * d[0]
    if len(d) == 2:  # midpoint form: D1 = (m0 - m1) / r0
        x_next = x_next + (0.5 * first / r[0]) * (d[0] - d[1])
    elif len(d) == 3:
        d1_0, d1_1 = (d[0] - d[1]) / r[0], (d[1] - d[2]) / r[1]
        d1 = d1_0 + (r[0] / (r[0] + r[1])) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r[0] + r[1])
        if z is None:
            c1 = alpha_t * (math.expm1(-h) / h + 1.0)
            c2 = -alpha_t * ((math.expm1(-h) + h) / h**2 - 0.5)
        else:
            c1 = alpha_t * (-math.expm1(-2.0 * h) / (-2.0 * h) + 1.0)
            c2 = alpha_t * ((-math.expm1(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
        x_next = x_next + c1 * d1 + c2 * d2
    if z is not None:
        x_next = x_next + s_t * (-math.expm1(-2.0 * h)) ** 0.5 * z
    return x_next


def _multistep(model, x, schedule, timesteps, noise, callback, sigmas: str, order: int, sde: bool) -> torch.Tensor:
    levels, times = noise_levels(schedule, timesteps, sigmas)
    n = len(times)
    history: list[tuple[torch.Tensor, float]] = []  # (x_0, lambda), newest last
    for i, t in enumerate(times):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = data_prediction(model, schedule, x, sigma, t)
        lam = _coefficients(sigma)[2]
        history = [*history[-(order - 1):], (x0, lam)] if order > 1 else [(x0, lam)]
        z = noise() if sde else None
        # diffusers' warm-up and lower_order_final: first order at the start and at the end; with
        # fewer than 15 steps, at most second order on the step before last.
        k = min(order, len(history))
        if i == n - 1:
            k = 1
        elif i == n - 2 and n < 15:
            k = min(k, 2)
        h = _coefficients(sigma_next)[2] - lam
        d = [history[-1 - j][0] for j in range(k)]
        r = [(history[-1 - j][1] - history[-2 - j][1]) / h for j in range(k - 1)]
        x = _done(callback, i, times, _dpm_update(x, d, sigma, sigma_next, h, r, z), x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Model, x: torch.Tensor, schedule: NoiseSchedule, timesteps: list[int], noise: Noise = None,
                    callback: Callback = None, *, sigmas: str = "default") -> torch.Tensor:
    """DPM-Solver++(2M), Algorithm 2 of Lu et al. (2022b): data prediction, multistep, second order."""
    return _multistep(model, x, schedule, timesteps, noise, callback, sigmas, 2, False)


@torch.no_grad()
def sample_dpmpp_2m_sde(model: Model, x: torch.Tensor, schedule: NoiseSchedule, timesteps: list[int],
                        noise: Noise = None, callback: Callback = None, *, sigmas: str = "default") -> torch.Tensor:
    """SDE-DPM-Solver++(2M), Lu et al. (2022b) sec. 5: the 2M update of the reverse SDE, fresh noise each step."""
    _needs_noise(noise, "sample_dpmpp_2m_sde")
    return _multistep(model, x, schedule, timesteps, noise, callback, sigmas, 2, True)


@torch.no_grad()
def sample_dpmpp_3m_sde(model: Model, x: torch.Tensor, schedule: NoiseSchedule, timesteps: list[int],
                        noise: Noise = None, callback: Callback = None, *, sigmas: str = "default") -> torch.Tensor:
    """SDE-DPM-Solver++(3M), Lu et al. (2022b): the third-order multistep update of the reverse SDE."""
    _needs_noise(noise, "sample_dpmpp_3m_sde")
    return _multistep(model, x, schedule, timesteps, noise, callback, sigmas, 3, True)


def singlestep_orders(n: int) -> list[int]:
    """diffusers' order list for second-order singlestep with lower_order_final: 1, 2, 1, 2, ..., ending in 1."""
    orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
    orders[-1] = 1
    return orders[:n]


@torch.no_grad()
def sample_dpmpp_2s_a(model: Model, x: torch.Tensor, schedule: NoiseSchedule, timesteps: list[int],
                      noise: Noise = None, callback: Callback = None, *, sigmas: str = "default") -> torch.Tensor:
    """SDE-DPM-Solver++(2S), Lu et al. (2022b), singlestep: a first-order step to an intermediate level,
    then a second-order step over both from the level before it, fresh noise in each (diffusers'
    DPMSolverSinglestepScheduler with sde-dpmsolver++, order 2)."""
    _needs_noise(noise, "sample_dpmpp_2s_a")
    levels, times = noise_levels(schedule, timesteps, sigmas)
    orders = singlestep_orders(len(times))
    start, x0_start = x, None
    for i, t in enumerate(times):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = data_prediction(model, schedule, x, sigma, t)
        z = noise()
        if orders[i] == 1 or x0_start is None:
            start, x0_start, sigma_start = x, x0, sigma
            h = _coefficients(sigma_next)[2] - _coefficients(sigma)[2]
            x = _dpm_update(x, [x0], sigma, sigma_next, h, [], z)
        else:
            lam_start = _coefficients(sigma_start)[2]
            h = _coefficients(sigma_next)[2] - lam_start
            r0 = (_coefficients(sigma)[2] - lam_start) / h
            # From the level before: D0 = its x_0, D1 = (x_0 here - D0) / r0 (the midpoint form).
            first = -_coefficients(sigma_next)[0] * math.expm1(-2.0 * h)
            x = _dpm_update(start, [x0_start], sigma_start, sigma_next, h, [], z) + (0.5 * first / r0) * (x0 - x0_start)
        x = _done(callback, i, times, x, x0)
    return x


def _unipc_rhos(rks: list[float], hh: float, order: int, corrector: bool) -> tuple[list[float], float, float]:
    """UniPC-bh2's coefficients (Zhao et al. 2023, Algorithms 2-3): (rhos, h phi_1(hh), B(h))."""
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    b_h = math.expm1(hh)  # bh2
    factorial, rows, b = 1, [], []
    ks = np.array([*rks, 1.0])
    for k in range(1, order + 1):
        rows.append(ks ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R, b = np.array(rows), np.array(b)
    if corrector:
        rhos = [0.5] if order == 1 else list(np.linalg.solve(R, b))
    else:
        rhos = [0.5] if order == 2 else list(np.linalg.solve(R[:-1, :-1], b[:-1])) if order > 2 else []
    return [float(v) for v in rhos], h_phi_1, b_h


def _unipc_update(x, history, sigma_s, sigma_t, order, new_x0=None):
    """UniPC's predictor (new_x0 None) or corrector from x at sigma_s to sigma_t, data prediction;
    history holds (x_0, lambda) newest last, its last entry at sigma_s."""
    alpha_t, s_t, lam_t = _coefficients(sigma_t)
    _, s_s, lam_s = _coefficients(sigma_s)
    h = lam_t - lam_s
    m0 = history[-1][0]
    rks = [(history[-1 - k][1] - lam_s) / h for k in range(1, order)]
    d1s = [(history[-1 - k][0] - m0) / rk for k, rk in zip(range(1, order), rks)]
    rhos, h_phi_1, b_h = _unipc_rhos(rks, -h, order, new_x0 is not None)
    x_next = (s_t / s_s) * x - (alpha_t * h_phi_1) * m0
    residual = sum((rho * d for rho, d in zip(rhos, d1s)), torch.zeros_like(x))
    if new_x0 is not None:
        residual = residual + rhos[-1] * (new_x0 - m0)
    return x_next - (alpha_t * b_h) * residual


@torch.no_grad()
def sample_unipc(model: Model, x: torch.Tensor, schedule: NoiseSchedule, timesteps: list[int], noise: Noise = None,
                 callback: Callback = None, *, sigmas: str = "default", order: int = 2) -> torch.Tensor:
    """UniPC, Zhao et al. (2023): the bh2 predictor of order 2 or 3 with the corrector (UniC) applied
    to each new state once the network has been evaluated there (diffusers' UniPCMultistepScheduler)."""
    if order not in (2, 3):
        raise InputError(f"--order must be 2 or 3, got {order}")
    levels, times = noise_levels(schedule, timesteps, sigmas)
    n = len(times)
    history: list[tuple[torch.Tensor, float]] = []
    last, predicted, last_order = None, None, 1
    for i, t in enumerate(times):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = data_prediction(model, schedule, x, sigma, t)
        if last is not None:
            corrected = _unipc_update(last, history, levels[i - 1], sigma, last_order, new_x0=x0)
            # A callback's replacement (inpainting) is kept: the corrector moves only the prediction.
            x = corrected if x is predicted else corrected + (x - predicted)
        history = [*history[-(order - 1):], (x0, _coefficients(sigma)[2])]
        last_order = min(order, n - i, len(history))
        last = x
        predicted = _unipc_update(x, history, sigma, sigma_next, last_order)
        x = _done(callback, i, times, predicted, x0)
    return x
