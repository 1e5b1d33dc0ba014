"""The samplers agree with diffusers' schedulers on the same model, noise and steps (fp32, 1e-4; DDIM 1e-3).
Each is called by its registry name with the one sampler signature."""

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from ddpm_cli.engine.diffusion.denoiser import UNetDenoiser
from ddpm_cli.engine.errors import InputError
from ddpm_cli.engine.diffusion.noise import SeededNoise
from ddpm_cli.engine.diffusion.registry import sampler_entry
from ddpm_cli.engine.diffusion.samplers import make_timesteps
from ddpm_cli.engine.diffusion.schedule import NoiseSchedule

SEEDS = [3, 4]
SHAPE = (1, 8, 8)


def diffusers_loop(unet, scheduler, steps, step_kwargs=None):
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    x = randn_tensor((len(SEEDS), *SHAPE), generator=generators)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(x, t).sample
            x = scheduler.step(out, t, x, generator=generators, **(step_kwargs or {})).prev_sample
    return x, [int(t) for t in scheduler.timesteps]


def ours(sampler, unet, schedule, timesteps, **options):
    noise = SeededNoise(SEEDS, SHAPE)
    x = noise()
    return sampler_entry(sampler).load()(UNetDenoiser(unet), x, schedule, timesteps, noise, None, **options)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("steps,prediction", [(10, "epsilon"), (50, "v"), (25, "sample")])
def test_ddpm_matches_diffusers(unet, variance, steps, prediction):
    from diffusers import DDPMScheduler

    config = dict(variance_type=variance, clip_sample=True, prediction_type={"v": "v_prediction"}.get(prediction, prediction))
    expected, their_steps = diffusers_loop(unet, DDPMScheduler(**config), steps)
    schedule = NoiseSchedule.from_config(config)
    timesteps = make_timesteps(1000, steps, "leading")
    assert timesteps == their_steps
    got = ours("ddpm", unet, schedule, timesteps, variance=variance)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_ddpm_full_chain_matches_diffusers(unet):
    from diffusers import DDPMScheduler

    expected, _ = diffusers_loop(unet, DDPMScheduler(), 1000)
    got = ours("ddpm", unet, NoiseSchedule.create(), make_timesteps(1000, 1000))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("eta,steps,spacing", [(0.0, 20, "leading"), (0.5, 10, "leading"), (0.0, 25, "trailing"), (1.0, 50, "trailing")])
def test_ddim_matches_diffusers(unet, eta, steps, spacing):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(clip_sample=True, timestep_spacing=spacing)
    expected, their_steps = diffusers_loop(unet, scheduler, steps, {"eta": eta})
    timesteps = make_timesteps(1000, steps, spacing)
    assert timesteps == their_steps
    got = ours("ddim", unet, NoiseSchedule.create(clip_sample=True), timesteps, eta=eta)
    # Deterministic DDIM over 20+ steps of a random network amplifies float32 rounding (diffusers keeps
    # alpha_bar in float32, this project in float64): up to 3.4e-4 on an AVX2 CPU, under 1e-4 on others.
    # A wrong formula moves samples by 1e-2 or more (diffusers' own t - 1000 // steps rule for the
    # previous trailing timestep, where steps does not divide 1000, moves them by 0.13 at 15 steps).
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)


def test_ddim_follows_stable_diffusion_config_ends(unet):
    """steps_offset 1 and set_alpha_to_one false (Stable Diffusion's and its upscaler's DDIM configs)."""
    from diffusers import DDIMScheduler

    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
              "set_alpha_to_one": False, "steps_offset": 1}
    expected, their_steps = diffusers_loop(unet, DDIMScheduler(**config), 10)
    schedule = NoiseSchedule.from_config(config)
    timesteps = make_timesteps(1000, 10, "leading", schedule.steps_offset)
    assert timesteps == their_steps and timesteps[-1] == 1
    assert schedule.final_alpha_bar == pytest.approx(1 - 0.00085)
    torch.testing.assert_close(ours("ddim", unet, schedule, timesteps), expected, atol=1e-4, rtol=1e-4)
    clean_end = ours("ddim", unet, NoiseSchedule.from_config({**config, "set_alpha_to_one": True}), timesteps)
    assert (clean_end - expected).abs().max() > 1e-3  # the end point matters, so the match above is not by chance


@pytest.mark.parametrize("steps,prediction,kind", [(10, "epsilon", "linear"), (20, "v", "cosine"), (7, "epsilon", "scaled_linear")])
def test_dpmpp_2m_matches_diffusers(unet, steps, prediction, kind):
    from diffusers import DPMSolverMultistepScheduler

    diffusers_name = {"cosine": "squaredcos_cap_v2"}.get(kind, kind)
    diffusers_prediction = {"v": "v_prediction"}.get(prediction, prediction)
    scheduler = DPMSolverMultistepScheduler(timestep_spacing="trailing", beta_schedule=diffusers_name,
                                            prediction_type=diffusers_prediction)
    expected, their_steps = diffusers_loop(unet, scheduler, steps)
    schedule = NoiseSchedule.create(kind, prediction_type=prediction, clip_sample=False)
    timesteps = make_timesteps(1000, steps, "trailing")
    assert timesteps == their_steps
    got = ours("dpmpp-2m", unet, schedule, timesteps)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_timesteps_spacings_and_bounds():
    assert make_timesteps(1000, 4, "leading") == [750, 500, 250, 0]
    assert make_timesteps(1000, 4, "trailing") == [999, 749, 499, 249]
    assert make_timesteps(1000, 3, "linspace") == [999, 500, 0]
    assert make_timesteps(1000, 1000) == list(range(999, -1, -1))
    with pytest.raises(InputError):
        make_timesteps(1000, 0)
    with pytest.raises(InputError):
        make_timesteps(1000, 1001)


def test_noise_is_per_image_and_independent_of_batch():
    together = SeededNoise([7, 8, 9], (2, 3, 3))
    alone = SeededNoise([8], (2, 3, 3))
    first_together, first_alone = together(), alone()
    torch.testing.assert_close(first_together[1:2], first_alone)
    torch.testing.assert_close(together()[1:2], alone())
    assert not torch.equal(first_together[0], first_together[1])


def test_noise_is_the_same_whatever_the_number_of_threads():
    seeds = list(range(100, 123))
    one, four = SeededNoise(seeds, (3, 4, 4), workers=1), SeededNoise(seeds, (3, 4, 4), workers=4)
    assert four.workers == 4 and [len(rows) for rows in four.chunks] == [5, 6, 6, 6]
    generator = torch.Generator().manual_seed(117)
    for _ in range(3):
        drawn = four()
        assert torch.equal(drawn, one())
        assert torch.equal(drawn[17], torch.randn((3, 4, 4), generator=generator))
    # A draw of another shape (the SD upscaler's image noise) takes just that much from each generator.
    assert torch.equal(four((2, 5))[17], torch.randn((2, 5), generator=generator))
    assert torch.equal(four()[17], torch.randn((3, 4, 4), generator=generator))


@pytest.mark.parametrize("grad_mode", ["inference_mode", "no_grad"])
def test_threaded_noise_under_the_callers_grad_mode(grad_mode):
    # Worker threads do not inherit the caller's inference mode, yet must fill its inference tensor.
    seeds = list(range(40))
    expected = SeededNoise(seeds, (2, 3), workers=1)()
    with getattr(torch, grad_mode)():
        drawn = SeededNoise(seeds, (2, 3), workers=3)()
    assert drawn.is_inference() == (grad_mode == "inference_mode")
    assert torch.equal(drawn, expected)


@pytest.mark.parametrize("steps", [10, 1000])
def test_ddpm_with_learned_range_variance_matches_diffusers(steps):
    from diffusers import DDPMScheduler

    from tests.conftest import tiny_unet

    unet = tiny_unet()
    # A learned-variance U-Net: a second output channel holds v of "learned_range".
    torch.manual_seed(1)
    learned = type(unet)(**{**unet.config, "out_channels": 2}).eval()
    with torch.no_grad():
        learned.conv_out.weight.mul_(0.1)
    expected, _ = diffusers_loop(learned, DDPMScheduler(variance_type="learned_range"), steps)
    got = ours("ddpm", learned, NoiseSchedule.create(), make_timesteps(1000, steps), variance="learned_range")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_sweep_distance_to_the_converged_ode_solution():
    """`ddpm eval sweep --metric distance`: each deterministic sampler x --sigmas, distance to Heun's
    solution from the same seeds, which shrinks as the steps grow; stochastic samplers are refused."""
    from ddpm_cli.engine.models.pipeline import from_unet
    from ddpm_cli.evaluation.sweep import check_sweep, distance_point, run_sweep
    from tests.conftest import tiny_unet

    pipeline = from_unet(tiny_unet(), NoiseSchedule.create(clip_sample=True))
    evaluate = distance_point(pipeline, 2, 2, 0, reference_steps=20)
    rows = run_sweep(pipeline, "distance", ["heun", "euler", "ddim"], [2, 5, 20], evaluate, sigmas=["default", "karras"])
    assert [(r["sampler"], r["sigmas"], r["steps"], r["calls"]) for r in rows][:3] == [
        ("heun", "default", 2, 3), ("heun", "default", 5, 9), ("heun", "default", 20, 39)]
    assert {(r["sampler"], r["sigmas"]) for r in rows} == {("heun", "default"), ("heun", "karras"), ("euler", "default"),
                                                          ("euler", "karras"), ("ddim", "default")}
    value = {(r["sampler"], r["sigmas"], r["steps"]): r["value"] for r in rows}
    assert value[("heun", "default", 20)] == 0.0  # the reference itself
    assert value[("euler", "default", 2)] > value[("euler", "default", 5)] > value[("euler", "default", 20)] > 0
    assert value[("heun", "karras", 2)] > value[("heun", "karras", 5)] > 1e-4
    with pytest.raises(InputError, match="euler-a, dpmpp-2m-sde do not converge"):
        check_sweep("distance", ["euler", "euler-a", "dpmpp-2m-sde"], [5])
