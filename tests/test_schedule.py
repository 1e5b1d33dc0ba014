"""The forward process and posterior against closed forms, and schedule values."""

import math

import pytest
import torch

from ddpm_cli.engine.errors import InputError
from ddpm_cli.engine.diffusion.schedule import NoiseSchedule, make_betas


def test_linear_schedule_values():
    schedule = NoiseSchedule.create("linear")
    assert schedule.betas.dtype == torch.float64
    assert schedule.betas[0].item() == pytest.approx(1e-4)
    assert schedule.betas[-1].item() == pytest.approx(0.02)
    # alpha_bar at T is about 4.0e-5 for the DDPM paper's schedule.
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.02)


def test_cosine_and_scaled_linear_match_their_definitions():
    cosine = NoiseSchedule.create("cosine")
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0, 10, 500, 900):
        assert cosine.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert cosine.betas.max().item() <= 0.999
    scaled = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    assert scaled[0].item() == pytest.approx(0.00085) and scaled[-1].item() == pytest.approx(0.012)
    assert scaled[500].item() == pytest.approx((0.00085**0.5 + 500 / 999 * (0.012**0.5 - 0.00085**0.5)) ** 2)


def test_schedule_matches_diffusers_tables():
    from diffusers import DDPMScheduler

    for kind, name in (("linear", "linear"), ("cosine", "squaredcos_cap_v2"), ("scaled_linear", "scaled_linear")):
        ours = NoiseSchedule.create(kind, beta_start=0.00085, beta_end=0.012)
        theirs = DDPMScheduler(beta_schedule=name, beta_start=0.00085, beta_end=0.012)
        torch.testing.assert_close(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=1e-5, atol=1e-7)


def test_forward_process_statistics():
    schedule = NoiseSchedule.create("linear")
    x0 = torch.full((200_000,), 0.7)
    for t_value in (0, 100, 999):
        t = torch.full((x0.shape[0],), t_value)
        xt = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(t_value)))
        alpha_bar = schedule.alphas_cumprod[t_value].item()
        assert xt.mean().item() == pytest.approx(alpha_bar**0.5 * 0.7, abs=0.01)
        assert xt.var().item() == pytest.approx(1 - alpha_bar, rel=0.02, abs=1e-6)


def test_posterior_matches_closed_form_and_bayes_rule():
    schedule = NoiseSchedule.create("linear")
    t = torch.tensor([1, 10, 500, 999])
    x0, xt = torch.randn(4, 3), torch.randn(4, 3)
    mean, var = schedule.q_posterior(x0, xt, t)
    for row, tv in enumerate(t.tolist()):
        ab, ab_prev = schedule.alphas_cumprod[tv].item(), schedule.alphas_cumprod[tv - 1].item()
        beta = schedule.betas[tv].item()
        # Product of N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) and N(x_{t-1}; sqrt(ab_prev) x_0, 1 - ab_prev).
        precision = (1 - beta) / beta + 1 / (1 - ab_prev)
        expected_var = 1 / precision
        expected_mean = expected_var * ((1 - beta) ** 0.5 * xt[row] / beta + ab_prev**0.5 * x0[row] / (1 - ab_prev))
        assert var[row].item() == pytest.approx(expected_var, rel=1e-5)
        assert var[row].item() == pytest.approx((1 - ab_prev) / (1 - ab) * beta, rel=1e-5)
        torch.testing.assert_close(mean[row], expected_mean.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "sample"])
def test_prediction_types_recover_x0_and_eps(prediction):
    schedule = NoiseSchedule.create("linear", prediction_type=prediction, clip_sample=False)
    x0, eps = torch.randn(2, 1, 4, 4).clamp(-1, 1), torch.randn(2, 1, 4, 4)
    t_value = 300
    t = torch.full((2,), t_value)
    xt = schedule.q_sample(x0, t, eps)
    target = schedule.training_target(x0, eps, t)
    x0_hat, eps_hat = schedule.split_prediction(target, xt, t_value)
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, eps, atol=1e-4, rtol=1e-4)


def test_config_round_trip_and_errors():
    schedule = NoiseSchedule.create("cosine", prediction_type="v", clip_sample=False)
    again = NoiseSchedule.from_config(schedule.to_config())
    assert again.prediction_type == "v" and again.beta_schedule == "cosine" and not again.clip_sample
    torch.testing.assert_close(again.betas, schedule.betas)
    with pytest.raises(InputError):
        NoiseSchedule.create("quadratic")
