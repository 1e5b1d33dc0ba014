"""The variational bound on -log p(x_0) (Ho et al. 2020, eq. 5), in bits per dimension.

    L = L_T + sum_{t=2..T} L_{t-1} + L_0
    L_T     = KL(q(x_T | x_0) || N(0, I))                           the prior term
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))          Gaussian KL terms
    L_0     = -log p(x_0 | x_1)                                      a discretised Gaussian decoder

Data are 8-bit images scaled to [-1, 1], so the decoder integrates the Gaussian over each of the
256 bins of width 2/255 (the two end bins reach to infinity). Every term is averaged over the
dimensions of an image and divided by ln 2: bits per dimension, as in the papers' tables.

Timesteps here are 0-based like the network's: index t = 0 is the decoder term and t >= 1 the KL
term of q(x_t-1 | x_t, x_0), so a bound over T training timesteps has T network terms plus the prior.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ddpm_cli.engine.diffusion.schedule import NoiseSchedule

LN2 = math.log(2.0)
BIN = 1.0 / 255.0  # half the width of an 8-bit bin in [-1, 1]


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) under N(mean, e^(2 log_scale)) for x on the 8-bit grid in [-1, 1], in nats.

    The log of a difference of CDFs loses everything far in a tail; the end bins use log_ndtr
    directly and the middle bins a floor of 1e-12, which only matters for hopeless predictions.
    """
    inv_std = torch.exp(-log_scale)
    upper = (x - mean + BIN) * inv_std
    lower = (x - mean - BIN) * inv_std
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_survival_lower = torch.special.log_ndtr(-lower)
    middle = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp_min(1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_survival_lower, middle))


def _mean_over_dims(values: torch.Tensor) -> torch.Tensor:
    return values.flatten(1).mean(1)


def prior_bpd(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T per image in bits/dim: KL(q(x_T | x_0) || N(0, I))."""
    alpha_bar = float(schedule.alphas_cumprod[-1])
    mean = alpha_bar**0.5 * x0
    logvar = torch.full_like(x0, math.log(1.0 - alpha_bar))
    return _mean_over_dims(normal_kl(mean, logvar, torch.zeros_like(x0), torch.zeros_like(x0))) / LN2


def vlb_terms(schedule: NoiseSchedule, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, output: torch.Tensor,
              variance: str, clip: bool = False) -> torch.Tensor:
    """The bound's term at each sample's timestep, bits/dim per image: L_0 where t == 0, else L_{t-1}.

    ``output`` is the network's output at (x_t, t); its extra channels hold a learned variance.
    The mean of p(x_{t-1} | x_t) is the posterior mean at the predicted x_0 (clipped if ``clip``).
    """
    channels = x0.shape[1]
    x0_hat = schedule.predict_x0(output, xt, t, clip=clip)
    mean, _ = schedule.q_posterior(x0_hat, xt, t)
    log_var = schedule.log_variance(output, t, variance, channels)
    true_mean, _ = schedule.q_posterior(x0, xt, t)
    true_log_var = schedule.log_variance(output, t, "fixed_small", channels)
    kl = _mean_over_dims(normal_kl(true_mean, true_log_var, mean, log_var)) / LN2
    decoder = -_mean_over_dims(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / LN2
    return torch.where(t == 0, decoder, kl)


Network = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class BoundEstimate:
    """Per-image bits/dim of the bound and its parts (prior, decoder L_0, the KL terms summed)."""

    total: torch.Tensor
    prior: torch.Tensor
    decoder: torch.Tensor
    kl: torch.Tensor
    timesteps: int  # network terms evaluated per image

    def summary(self) -> dict:
        n = self.total.numel()
        stderr = float(self.total.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
        return {"bits_per_dim": float(self.total.mean()), "stderr": stderr, "images": n,
                "prior_bpd": float(self.prior.mean()), "decoder_bpd": float(self.decoder.mean()),
                "kl_bpd": float(self.kl.mean()), "timesteps_per_image": self.timesteps}


def stratified_timesteps(num_train_timesteps: int, samples: int, batch: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """(samples, batch) KL timesteps from 1..T-1: for each image, one drawn uniformly in each of
    ``samples`` equal strata, independently across images (so their errors average out)."""
    edges = torch.linspace(1, num_train_timesteps, samples + 1, dtype=torch.float64).unsqueeze(1)
    u = torch.rand(samples, batch, generator=generator, dtype=torch.float64)
    picks = (edges[:-1] + u * (edges[1:] - edges[:-1])).floor().long()
    return picks.clamp(1, num_train_timesteps - 1)


@torch.no_grad()
def bound_bpd(network: Network, schedule: NoiseSchedule, x0: torch.Tensor, variance: str,
              samples: int | None = None, generator: torch.Generator | None = None,
              clip: bool = True) -> BoundEstimate:
    """The bound per image of a batch x0 (on the 8-bit grid, in [-1, 1]).

    samples None: every training timestep, the exact sum over t (one fresh x_t per term). Otherwise
    the decoder term exactly and an unbiased estimate of the KL sum from ``samples`` stratified
    timesteps per image (each term weighted by the width of its stratum). ``network(x_t, t)``
    returns the model output at per-image timesteps t (a long tensor).
    """
    T, n = schedule.num_train_timesteps, x0.shape[0]
    if samples is None or samples >= T - 1:
        kl_steps, weight = torch.arange(T - 1, 0, -1).unsqueeze(1).expand(-1, n), 1.0
    else:
        kl_steps, weight = stratified_timesteps(T, samples, n, generator), (T - 1) / samples
    chosen = torch.cat([kl_steps, torch.zeros(1, n, dtype=torch.long)])
    terms = torch.zeros(chosen.shape, dtype=torch.float64)
    for k in range(chosen.shape[0]):
        noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device, x0.dtype)
        t = chosen[k].to(x0.device)
        xt = schedule.q_sample(x0, t, noise)
        terms[k] = vlb_terms(schedule, x0, xt, t, network(xt, t).float(), variance, clip).double().cpu()
    decoder, kl = terms[-1], terms[:-1].sum(0) * weight
    prior = prior_bpd(schedule, x0.float()).double().cpu()
    return BoundEstimate(prior + decoder + kl, prior, decoder, kl, chosen.shape[0])
