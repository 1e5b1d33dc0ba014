"""Every sampler x noise-level schedule equals its diffusers scheduler's loop (as a diffusers pipeline
runs it: init_noise_sigma, scale_model_input, step with the per-image generators) on the same model,
seeds and settings: a pixel model with a DDPM config (clip_sample true, leading spacing, and trailing
for each sampler once) and the tiny Stable Diffusion U-Net with SD's config (scaled_linear,
steps_offset 1, leading)."""

import inspect

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from ddpm_cli.engine.diffusion.denoiser import UNetDenoiser
from ddpm_cli.engine.diffusion.noise import SeededNoise
from ddpm_cli.engine.diffusion.registry import REGISTRY, sampler_entry
from ddpm_cli.engine.diffusion.samplers import make_timesteps
from ddpm_cli.engine.diffusion.schedule import NoiseSchedule
from tests.conftest import tiny_unet

SEEDS = [5, 6]
STEPS = 7

# sampler -> (diffusers class, its settings, whether that class honours clip_sample)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}, True),
    "euler": ("EulerDiscreteScheduler", {}, False),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, False),
    "heun": ("HeunDiscreteScheduler", {}, True),
    "dpm2": ("KDPM2DiscreteScheduler", {}, False),
    "lms": ("LMSDiscreteScheduler", {}, False),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, False),
    "dpmpp-2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, False),
    "dpmpp-3m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, False),
    "dpmpp-2s-a": ("DPMSolverSinglestepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, False),
    "unipc": ("UniPCMultistepScheduler", {"solver_type": "bh2", "solver_order": 2}, False),
    "unipc-3": ("UniPCMultistepScheduler", {"solver_type": "bh2", "solver_order": 3}, False),  # --order 3
}
SIGMAS = {"default": {}, "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}
DDPM_CONFIG = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "clip_sample": True,
               "timestep_spacing": "leading"}
SD_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
             "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}
CASES = [(name, sigmas) for name in SCHEDULERS for sigmas in SIGMAS
         if sigmas == "default" or "sigmas" in REGISTRY[name.removesuffix("-3")].options]


@pytest.fixture(scope="module")
def models(sd_dir):
    from diffusers import UNet2DConditionModel

    sd_unet = UNet2DConditionModel.from_pretrained(sd_dir / "unet").eval()
    context = torch.randn(len(SEEDS), 77, 32, generator=torch.Generator().manual_seed(0))
    return {"pixel": (tiny_unet(), {}, (1, 8, 8), DDPM_CONFIG),
            # trailing starts from pure noise at T - 1, where the sigma schedulers scale it by sigma_max
            "pixel-trailing": (tiny_unet(), {}, (1, 8, 8), {**DDPM_CONFIG, "timestep_spacing": "trailing"}),
            "sd": (sd_unet, {"encoder_hidden_states": context}, (4, 8, 8), SD_CONFIG)}


def diffusers_images(unet, kwargs, shape, scheduler, steps=STEPS):
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    scheduler.set_timesteps(steps)
    x = randn_tensor((len(SEEDS), *shape), generator=generators) * scheduler.init_noise_sigma
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(x, t), t, **kwargs).sample
            step_kwargs = {"generator": generators} if takes_generator else {}
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


def our_images(name, unet, kwargs, shape, config, sigmas, clip):
    order = 3 if name == "unipc-3" else None
    name = name.removesuffix("-3")
    entry = sampler_entry(name)
    schedule = NoiseSchedule.from_config({**config, "clip_sample": clip})
    # DPMSolverSinglestep has no spacing setting: its grid is linspace's (n + 1 points, the lowest dropped).
    spacing = "linspace" if name == "dpmpp-2s-a" else config["timestep_spacing"]
    timesteps = make_timesteps(1000, STEPS, spacing, schedule.steps_offset, entry.solver_grid)
    noise = SeededNoise(SEEDS, shape)
    options = {"sigmas": sigmas} if "sigmas" in entry.options else {}
    if order:
        options["order"] = order
    return entry.load()(UNetDenoiser(unet, cond=kwargs), noise(), schedule, timesteps, noise, None, **options)


@pytest.mark.parametrize("model,name,sigmas", [(model, *case) for model in ("pixel", "sd") for case in CASES]
                         # (diffusers' DDIM steps trailing timesteps by T // n, which 7 steps do not divide)
                         + [("pixel-trailing", name, "default") for name in SCHEDULERS if name != "ddim"])
def test_every_sampler_equals_its_diffusers_scheduler(models, model, name, sigmas):
    import diffusers

    unet, kwargs, shape, config = models[model]
    class_name, settings, honours_clip = SCHEDULERS[name]
    scheduler = getattr(diffusers, class_name).from_config({**config, **settings, **SIGMAS[sigmas]})
    expected = diffusers_images(unet, kwargs, shape, scheduler)
    clip = config["clip_sample"] and honours_clip
    got = our_images(name, unet, kwargs, shape, config, sigmas, clip)
    assert got.shape == expected.shape
    # A random network's samples reach |x| ~ 400, where float32 (diffusers' arithmetic) keeps ~1e-5 relative:
    # the difference is measured relative to max(1, |x|), i.e. absolute on the image scale [-1, 1].
    difference = ((got - expected).abs() / expected.abs().clamp(min=1.0)).max().item()
    assert difference < 1e-4, f"{name} {sigmas} on {model}: max scaled |difference| {difference:.2e}"


@pytest.mark.parametrize("name", ["dpmpp-2m", "euler", "unipc"])
def test_settings_reproduce_a_ddpm_config_with_spacing_leading_and_clip_x0_off(name):
    """Through SamplerSettings and sample_batch (each sampler's own leading rule, --clip-x0 off), a
    DDPM config (clip_sample true, leading) gives diffusers' images; ddpm's default (x_0 clipped,
    trailing) deliberately does not."""
    import diffusers

    from ddpm_cli.engine.models.pipeline import from_unet
    from ddpm_cli.engine.tasks.generate import SamplerSettings, sample_batch

    unet = tiny_unet()
    class_name, settings, _ = SCHEDULERS[name]
    scheduler = getattr(diffusers, class_name).from_config({**DDPM_CONFIG, **settings})
    expected = diffusers_images(unet, {}, (1, 8, 8), scheduler).clamp(-1, 1)
    pipeline = from_unet(unet, NoiseSchedule.from_config(DDPM_CONFIG))
    same = sample_batch(pipeline, SEEDS, SamplerSettings(name, STEPS, spacing="leading", clip_x0=False))
    assert (same - expected).abs().max() < 1e-4
    default = sample_batch(pipeline, SEEDS, SamplerSettings(name, STEPS))
    assert (default - expected).abs().max() > 1e-2
