"""The variational bound (engine/bound.py) against closed forms: Gaussian data with its exact denoiser."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from ddpm_cli.engine.diffusion.bound import bound_bpd, discretized_gaussian_log_likelihood, normal_kl
from ddpm_cli.engine.diffusion.schedule import NoiseSchedule

MU, STD = 0.1, 0.15  # data: N(MU, STD^2) per dimension, quantised to the 8-bit grid


def quantised_gaussian(n: int, dims: tuple, generator: torch.Generator) -> torch.Tensor:
    x = MU + STD * torch.randn(n, *dims, generator=generator, dtype=torch.float64)
    return (torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1).float()


def true_entropy_bits() -> float:
    """Entropy in bits of one quantised dimension, summed over the 256 bins."""
    centres = np.arange(256) * 2 / 255 - 1
    upper = norm.cdf((np.minimum(centres + 1 / 255, 10) - MU) / STD)
    lower = norm.cdf((centres - 1 / 255 - MU) / STD)
    upper[-1], lower[0] = 1.0, 0.0
    p = upper - lower
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def exact_network(schedule: NoiseSchedule, learned: bool):
    """The Bayes-optimal eps (and, if learned, the true reverse variance as a learned_range output)."""
    ab = schedule.alphas_cumprod

    def network(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shape = (-1, *([1] * (xt.ndim - 1)))
        a = ab[t].reshape(shape)
        x0 = MU + a.sqrt() * STD**2 / (a * STD**2 + 1 - a) * (xt - a.sqrt() * MU)
        eps = ((xt - a.sqrt() * x0) / (1 - a).sqrt()).float()
        if not learned:
            return eps
        a_prev = schedule.alphas_cumprod_prev[t].reshape(shape)
        v_prev = torch.where(t.reshape(shape) == 0, torch.full_like(a, STD**2), a_prev * STD**2 + 1 - a_prev)
        log_var = torch.log(v_prev * schedule.betas[t].reshape(shape) / (a * STD**2 + 1 - a))
        small, large = schedule.log_variance_small[t].reshape(shape), schedule.betas[t].log().reshape(shape)
        frac = ((log_var - small) / (large - small)).float()
        return torch.cat([eps, (2 * frac - 1).expand_as(eps)], dim=1)

    return network


@pytest.fixture(scope="module")
def exact_bounds():
    schedule = NoiseSchedule.create("linear", 1000, clip_sample=False)
    x0 = quantised_gaussian(400, (1, 4, 4), torch.Generator().manual_seed(0))
    out = {}
    for name, variance, learned in (("learned", "learned_range", True), ("small", "fixed_small", False),
                                    ("large", "fixed_large", False)):
        out[name] = bound_bpd(exact_network(schedule, learned), schedule, x0, variance,
                              generator=torch.Generator().manual_seed(1), clip=False)
    return schedule, x0, out


def test_bound_of_the_exact_model_matches_the_entropy(exact_bounds):
    _, _, bounds = exact_bounds
    entropy = true_entropy_bits()
    learned = bounds["learned"].summary()
    # The exact reverse process makes the bound tight up to the prior's mismatch (tiny) and sampling error.
    assert abs(learned["bits_per_dim"] - entropy) < max(0.03, 3 * learned["stderr"]), (learned, entropy)
    # Fixed variances are not the true reverse variance: their bound is looser, never tighter.
    for name in ("small", "large"):
        assert bounds[name].summary()["bits_per_dim"] > learned["bits_per_dim"] + 0.01, (name, bounds[name].summary())


def test_each_term_has_the_right_sign_and_size(exact_bounds):
    schedule, x0, bounds = exact_bounds
    est = bounds["learned"]
    assert (est.prior >= 0).all() and float(est.prior.mean()) < 1e-4  # q(x_T|x_0) is almost N(0, I)
    assert (est.kl >= 0).all()
    # The decoder pays for the bin given x_1: about -log2 of (bin width / (sqrt(2 pi e) sigma_0)) bits.
    sigma0 = math.sqrt(float(schedule.betas[0]))
    assert 0 < float(est.decoder.mean()) < 1.0 + max(0.0, math.log2(math.sqrt(2 * math.pi * math.e) * sigma0 / (2 / 255)))
    # Most of the information sits in the KL terms; together the parts make the total.
    assert float(est.kl.mean()) > 0.5 * float(est.total.mean())
    assert torch.allclose(est.total, est.prior + est.decoder + est.kl)


def test_sampled_timesteps_estimate_the_exact_bound(exact_bounds):
    schedule, x0, bounds = exact_bounds
    g = torch.Generator().manual_seed(2)
    sampled = bound_bpd(exact_network(schedule, True), schedule, x0, "learned_range", samples=50,
                        generator=g, clip=False)
    exact = bounds["learned"]
    assert sampled.timesteps == 51  # 50 KL terms and the decoder, per image
    # Unbiased: the estimate's error is within a few of its own standard errors (over images).
    summary = sampled.summary()
    assert abs(summary["bits_per_dim"] - exact.summary()["bits_per_dim"]) < 4 * summary["stderr"] + 0.02, summary


def test_kl_and_decoder_closed_forms():
    m1, m2 = torch.tensor([0.3]), torch.tensor([-0.2])
    lv1, lv2 = torch.tensor([math.log(0.5)]), torch.tensor([math.log(2.0)])
    expected = math.log(2.0 / 0.5) / 2 + (0.5 + 0.25) / (2 * 2.0) - 0.5
    assert float(normal_kl(m1, lv1, m2, lv2)) == pytest.approx(expected, rel=1e-6)
    assert float(normal_kl(m1, lv1, m1, lv1)) == pytest.approx(0.0, abs=1e-7)
    # The 256 bin probabilities of any Gaussian sum to one.
    grid = torch.arange(256, dtype=torch.float64) * 2 / 255 - 1
    for mean, scale in ((0.0, 0.3), (0.9, 0.05), (-1.2, 1.0)):
        logp = discretized_gaussian_log_likelihood(grid, torch.full_like(grid, mean), torch.full_like(grid, math.log(scale)))
        assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-6)
        centre = int(round((mean + 1) * 127.5))
        if 0 < centre < 255:
            width = 2 / 255
            expected_bin = norm.cdf(width / 2 / scale) - norm.cdf(-width / 2 / scale)
            assert float(logp[centre].exp()) == pytest.approx(expected_bin, rel=0.05, abs=1e-6)
