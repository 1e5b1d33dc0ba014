"""Generation driver: a batch of seeds in, images out, with any sampler.

Settings name a sampler of ``diffusion/registry.py`` and its options; :func:`run_sampler` calls it.
Image i of a run uses seed + i through its own CPU generator (``noise.SeededNoise``), so the
same seed gives the same image whatever the batch size or device. The caller batches and decides
what to do with each finished batch (the CLI writes files as they come, so an interrupt keeps them).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ddpm_cli.engine.choices import LEARNED_VARIANCES, SIGMAS
from ddpm_cli.engine.errors import InputError, NumericalError
from ddpm_cli.engine.diffusion.noise import SeededNoise
from ddpm_cli.engine.models.pipeline import Condition, Pipeline
from ddpm_cli.engine.diffusion.registry import OPTIONS, check_options, sampler_entry
from ddpm_cli.engine.diffusion.samplers import make_timesteps
from ddpm_cli.engine.tasks.img2img import noised, start_timesteps


def resolve_option(name: str, value, pipeline: Pipeline):
    """An option's value for ``pipeline``: the given one checked, or the default (``OPTIONS``) when
    None; a default of None is the model's own (the variance its scheduler names)."""
    if name == "variance":
        variance = value or pipeline.variance
        if variance in LEARNED_VARIANCES and variance != pipeline.variance:
            raise InputError(f"--variance {variance} needs a model that outputs its variance ({pipeline.name}'s "
                             f"variance is {pipeline.variance}); choose fixed_small or fixed_large")
        return variance
    if name == "eta" and value is not None and value < 0:
        raise InputError(f"--eta must be >= 0, got {value}")
    if name == "order" and value is not None and value not in (2, 3):
        raise InputError(f"--order must be 2 or 3, got {value}")
    if name == "sigmas" and value is not None and value not in SIGMAS:
        raise InputError(f"unknown --sigmas {value!r}; choose one of {', '.join(SIGMAS)}")
    return OPTIONS[name].default if value is None else value


@dataclass(frozen=True)
class SamplerSettings:
    """How to run the reverse process; unset fields take each sampler's usual value.

    ``options`` holds sampler options by name (``registry.OPTIONS``); ``eta`` and
    ``variance`` are shorthands for options["eta"] and options["variance"]. Resolved settings keep
    every option of their sampler in ``options``, defaults filled in, and None in the shorthands.
    ``spacing`` None resolves to the model's (its config's timestep_spacing) or else the sampler's usual.
    ``cfg_rescale`` is phi of guidance rescaling (``denoiser.rescale_guidance``; 0: off).
    """

    sampler: str = "dpmpp-2m"
    steps: int | None = None
    eta: float | None = None
    spacing: str | None = None
    variance: str | None = None
    options: Mapping[str, object] = field(default_factory=dict)
    clip_x0: bool | None = None  # None: as the model's scheduler config says (clip_sample)
    cfg_rescale: float = 0.0

    def given(self) -> dict:
        """The options given (not None), shorthands included."""
        given = {name: value for name, value in self.options.items() if value is not None}
        for name, value in (("eta", self.eta), ("variance", self.variance)):
            if value is not None:
                if given.get(name, value) != value:
                    raise ValueError(f"{name} given twice: {value} and options[{name!r}] = {given[name]}")
                given[name] = value
        return given

    def resolved(self, pipeline: Pipeline) -> SamplerSettings:
        entry = sampler_entry(self.sampler)
        given = self.given()
        check_options(entry.name, given)
        options = {name: resolve_option(name, given.get(name), pipeline) for name in entry.options}
        steps = self.steps or entry.steps or pipeline.schedule.num_train_timesteps
        spacing = self.spacing or pipeline.schedule.timestep_spacing or entry.spacing
        make_timesteps(pipeline.schedule.num_train_timesteps, steps, spacing)  # validates steps and spacing
        clip_x0 = pipeline.schedule.clip_sample if self.clip_x0 is None else self.clip_x0
        if not 0.0 <= self.cfg_rescale <= 1.0:
            raise InputError(f"--cfg-rescale must be between 0 and 1, got {self.cfg_rescale}")
        return SamplerSettings(entry.name, steps, spacing=spacing, options=options, clip_x0=clip_x0,
                               cfg_rescale=self.cfg_rescale)

    def timesteps(self, schedule) -> list[int]:
        """The decreasing timesteps of these (resolved) settings on ``schedule``, with its steps_offset."""
        return make_timesteps(schedule.num_train_timesteps, self.steps, self.spacing, schedule.steps_offset,
                              sampler_entry(self.sampler).solver_grid)

    def describe(self) -> dict:
        """The settings as recorded with an image: sampler, steps, spacing and each option."""
        fields = {"sampler": self.sampler, "steps": self.steps, "spacing": self.spacing, **self.given(),
                  "clip_x0": self.clip_x0, "cfg_rescale": self.cfg_rescale or None}
        return {key: value for key, value in fields.items() if value is not None}


def run_sampler(settings: SamplerSettings, model, x: torch.Tensor, schedule, timesteps: list[int], noise: SeededNoise,
                callback: Callable[[dict], torch.Tensor | None] | None = None) -> torch.Tensor:
    """Run the (resolved) settings' sampler from x at ``timesteps[0]``, as samplers.py describes."""
    options = settings.given()
    check_options(settings.sampler, options)
    if settings.clip_x0 is not None and settings.clip_x0 != schedule.clip_sample:
        schedule = copy.copy(schedule)
        schedule.clip_sample = settings.clip_x0
    return sampler_entry(settings.sampler).load()(model, x, schedule, timesteps, noise, callback, **options)


def sample_batch(pipeline: Pipeline, seeds: list[int], settings: SamplerSettings,
                 callback: Callable[[dict], None] | None = None, condition: Condition | None = None,
                 cfg: float = 1.0, size: tuple[int, int] | None = None, *,
                 x_T: torch.Tensor | None = None, init: torch.Tensor | None = None,
                 strength: float = 1.0) -> torch.Tensor:
    """Sample one batch of images in [-1, 1], one per seed, shape (len(seeds), C, H, W), float32.

    ``condition`` picks a class (or one per seed) or a prompt for conditional models; ``cfg`` is the
    guidance scale w. ``size`` (height, width, in the model's own units: latents for latent models)
    overrides the model's sample size. Latent models are decoded by their VAE at the end.
    ``x_T`` (one row per seed) replaces the seeded starting noise; stochastic samplers still draw
    their step noise from the seeds (the same draws as without it).
    ``init`` (model space, 1 or len(seeds) rows) starts from that image noised to where the last
    int(strength * steps) steps begin, with each seed's first draw (img2img, ``tasks/img2img.py``).
    """
    pipeline.require("image")
    settings = settings.resolved(pipeline)
    timesteps = settings.timesteps(pipeline.schedule)
    channels, height, width = pipeline.sample_shape
    if init is not None:
        size = tuple(init.shape[-2:])
    noise = SeededNoise(seeds, (channels, *(size or (height, width))), pipeline.device)
    x = noise()
    if init is not None:
        timesteps = start_timesteps(timesteps, strength)
        x = noised(pipeline.schedule, init, x, timesteps[0])
    if x_T is not None:
        if tuple(x_T.shape) != tuple(x.shape):
            raise InputError(f"the starting noise has shape {tuple(x_T.shape)}; this batch needs {tuple(x.shape)}")
        x = x_T.to(x.device, x.dtype)
    model = pipeline.denoiser(len(seeds), condition, cfg, settings.cfg_rescale)
    x = run_sampler(settings, model, x, pipeline.schedule, timesteps, noise, callback)
    x = pipeline.decode(x).float().cpu()
    if not torch.isfinite(x).all():
        raise NumericalError(f"sampling produced non-finite values (seeds {seeds[0]}-{seeds[-1]}, "
                             f"dtype {str(pipeline.dtype).removeprefix('torch.')}); try --dtype fp32")
    return x.clamp(-1.0, 1.0)

