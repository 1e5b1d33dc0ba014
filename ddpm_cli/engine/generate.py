"""Generation driver: a batch of seeds in, images out, with any sampler.

Image i of a run uses seed + i through its own CPU generator (``noise.SeededNoise``), so the
same seed gives the same image whatever the batch size or device. The caller batches and decides
what to do with each finished batch (the CLI writes files as they come, so an interrupt keeps them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ddpm_cli.engine.errors import InputError, NumericalError
from ddpm_cli.engine.noise import SeededNoise
from ddpm_cli.engine.pipeline import Condition, Pipeline
from ddpm_cli.engine.choices import LEARNED_VARIANCES, SAMPLERS
from ddpm_cli.engine.samplers import DEFAULT_SPACING, make_timesteps, sample_ddim, sample_ddpm, sample_dpmpp_2m

DEFAULT_STEPS = {"ddpm": None, "ddim": 50, "dpmpp-2m": 20}  # None: every training timestep


@dataclass(frozen=True)
class SamplerSettings:
    """How to run the reverse process; unset fields take each sampler's usual value."""

    sampler: str = "dpmpp-2m"
    steps: int | None = None
    eta: float = 0.0
    spacing: str | None = None
    variance: str | None = None

    def resolved(self, pipeline: Pipeline) -> SamplerSettings:
        if self.sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.eta and self.sampler != "ddim":
            raise InputError(f"--eta applies to the ddim sampler only, not {self.sampler}")
        steps = self.steps or DEFAULT_STEPS[self.sampler] or pipeline.schedule.num_train_timesteps
        variance = (self.variance or pipeline.variance) if self.sampler == "ddpm" else None
        if variance in LEARNED_VARIANCES and variance != pipeline.variance:
            raise InputError(f"--variance {variance} needs a model that outputs its variance ({pipeline.name}'s "
                             f"variance is {pipeline.variance}); choose fixed_small or fixed_large")
        spacing = self.spacing or DEFAULT_SPACING[self.sampler]
        make_timesteps(pipeline.schedule.num_train_timesteps, steps, spacing)  # validates steps and spacing
        eta = self.eta if self.sampler == "ddim" else None
        return SamplerSettings(self.sampler, steps, eta, spacing, variance)

    def timesteps(self, schedule) -> list[int]:
        """The decreasing timesteps of these (resolved) settings on ``schedule``, with its steps_offset."""
        return make_timesteps(schedule.num_train_timesteps, self.steps, self.spacing, schedule.steps_offset)

    def describe(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}


def run_sampler(settings: SamplerSettings, model, x: torch.Tensor, schedule, timesteps: list[int], noise: SeededNoise,
                callback: Callable[[dict], None] | None = None, project=None) -> torch.Tensor:
    """Run the settings' sampler from x_T (resolved settings); ``project`` as in samplers.py."""
    if settings.sampler == "ddpm":
        return sample_ddpm(model, x, schedule, timesteps, noise, variance=settings.variance, callback=callback,
                           project=project)
    if settings.sampler == "ddim":
        return sample_ddim(model, x, schedule, timesteps, noise, eta=settings.eta, callback=callback, project=project)
    return sample_dpmpp_2m(model, x, schedule, timesteps, callback=callback, project=project)


def sample_batch(pipeline: Pipeline, seeds: list[int], settings: SamplerSettings,
                 callback: Callable[[dict], None] | None = None, condition: Condition | None = None,
                 cfg: float = 1.0, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Sample one batch of images in [-1, 1], one per seed, shape (len(seeds), C, H, W), float32.

    ``condition`` picks a class (or one per seed) or a prompt for conditional models; ``cfg`` is the
    guidance scale w. ``size`` (height, width, in the model's own units: latents for latent models)
    overrides the model's sample size. Latent models are decoded by their VAE at the end.
    """
    if pipeline.upscale:
        raise InputError(f"{pipeline.name} is a super-resolution model; use `ddpm upscale {pipeline.name} IMAGE`")
    if pipeline.inpainting:
        raise InputError(f"{pipeline.name} is an inpainting model; use `ddpm inpaint {pipeline.name} --image --mask`")
    settings = settings.resolved(pipeline)
    timesteps = settings.timesteps(pipeline.schedule)
    channels, height, width = pipeline.sample_shape
    noise = SeededNoise(seeds, (channels, *(size or (height, width))), pipeline.device)
    x = noise()
    x = run_sampler(settings, pipeline.denoiser(len(seeds), condition, cfg), x, pipeline.schedule, timesteps, noise,
                    callback)
    x = pipeline.decode(x).float().cpu()
    if not torch.isfinite(x).all():
        raise NumericalError(f"sampling produced non-finite values (seeds {seeds[0]}-{seeds[-1]}, "
                             f"dtype {str(pipeline.dtype).removeprefix('torch.')}); try --dtype fp32")
    return x.clamp(-1.0, 1.0)

