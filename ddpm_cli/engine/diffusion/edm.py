"""EDM models (Karras et al. 2022, "Elucidating the design space of diffusion-based generative models").

An EDM network F is wrapped as a denoiser of x = y + sigma n (Table 1, "Ours"):

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)     c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in = 1 / sqrt(sigma^2 + sigma_data^2)              c_noise = ln(sigma) / 4

trained with ln(sigma) ~ N(P_mean, P_std^2) and the loss weight lambda(sigma) = (sigma^2 + sigma_data^2) /
(sigma sigma_data)^2. This is the contract of diffusers' EDMEulerScheduler and EDMDPMSolverMultistepScheduler
(precondition_inputs, precondition_noise, precondition_outputs): the U-Net's timestep input is c_noise, and
their prediction_type "epsilon" is the c_out above, "v_prediction" the same with c_out negated.

ddpm's samplers step on a variance-preserving schedule; an EDM model joins them as one: an
:class:`EDMSchedule` has T = num_train_timesteps noise levels sigma_0 < ... < sigma_{T-1} from sigma_min
to sigma_max (the config's karras rho or exponential spacing), alpha_bar_t = 1 / (1 + sigma_t^2), and the
:class:`EDMDenoiser` turns D into the epsilon such a schedule's samplers expect,
eps = (x_sigma - D(x_sigma; sigma)) / sigma with x_sigma = x_t sqrt(1 + sigma^2). Every sampler then
works unchanged, and with karras levels the sigma samplers visit exactly the levels diffusers' EDM
schedulers do (``tests/test_edm.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ddpm_cli.engine.diffusion.denoiser import Conditioning, UNetDenoiser
from ddpm_cli.engine.diffusion.schedule import NoiseSchedule
from ddpm_cli.engine.errors import ModelError

EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
EDM_PREDICTIONS = ("epsilon", "v_prediction")
SIGMA_SCHEDULES = ("karras", "exponential")
P_MEAN, P_STD = -1.2, 1.2  # the training noise levels: ln(sigma) ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1)
# Sampling an EDM model spans its levels from sigma_max to sigma_min, as diffusers' EDM schedulers do.
SAMPLING_SPACING = "linspace"


def is_edm_config(config: dict | None) -> bool:
    """Whether a diffusers scheduler config is an EDM scheduler's (by class, or by its sigma_data key)."""
    return bool(config) and (config.get("_class_name") in EDM_SCHEDULERS or "sigma_data" in config)


@dataclass(frozen=True)
class EDMParameters:
    """The EDM scheduler config's numbers, with diffusers' defaults (EDMEulerScheduler)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    sigma_schedule: str = "karras"
    prediction_type: str = "epsilon"  # diffusers' name: the sign of c_out
    num_train_timesteps: int = 1000
    scheduler: str = "EDMEulerScheduler"

    @classmethod
    def from_config(cls, config: dict) -> EDMParameters:
        """From a diffusers EDM scheduler config (ModelError for what it cannot mean)."""
        defaults = cls()
        values = {name: config.get(name, getattr(defaults, name))
                  for name in ("sigma_min", "sigma_max", "sigma_data", "rho", "sigma_schedule", "prediction_type",
                               "num_train_timesteps")}
        if values["prediction_type"] not in EDM_PREDICTIONS:
            raise ModelError(f"EDM scheduler config has prediction_type {values['prediction_type']!r}; "
                             f"ddpm samples {' and '.join(EDM_PREDICTIONS)}")
        if values["sigma_schedule"] not in SIGMA_SCHEDULES:
            raise ModelError(f"EDM scheduler config has sigma_schedule {values['sigma_schedule']!r}; "
                             f"one of {', '.join(SIGMA_SCHEDULES)} expected")
        if not 0 < float(values["sigma_min"]) < float(values["sigma_max"]) or float(values["sigma_data"]) <= 0:
            raise ModelError("EDM scheduler config needs 0 < sigma_min < sigma_max and sigma_data > 0")
        scheduler = config.get("_class_name") if config.get("_class_name") in EDM_SCHEDULERS else defaults.scheduler
        return cls(float(values["sigma_min"]), float(values["sigma_max"]), float(values["sigma_data"]),
                   float(values["rho"]), values["sigma_schedule"], values["prediction_type"],
                   int(values["num_train_timesteps"]), scheduler)

    def to_config(self) -> dict:
        """The scheduler config diffusers' EDM schedulers load (scheduler/scheduler_config.json)."""
        return {"_class_name": self.scheduler, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "sigma_data": self.sigma_data, "sigma_schedule": self.sigma_schedule, "rho": self.rho,
                "num_train_timesteps": self.num_train_timesteps, "prediction_type": self.prediction_type,
                "final_sigmas_type": "zero"}

    # -- preconditioning (Table 1): floats, or tensors of one sigma per row -------------------------

    def c_skip(self, sigma):
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma):
        sign = -1.0 if self.prediction_type == "v_prediction" else 1.0
        return sign * sigma * self.sigma_data / (sigma**2 + self.sigma_data**2) ** 0.5

    def c_in(self, sigma):
        return 1.0 / (sigma**2 + self.sigma_data**2) ** 0.5

    @staticmethod
    def c_noise(sigma):
        return torch.log(sigma) / 4.0 if torch.is_tensor(sigma) else math.log(sigma) / 4.0

    def loss_weight(self, sigma):
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2: the loss weight that makes the
        network's effective target unit-variance at every noise level."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def denoise(self, network, x: torch.Tensor, sigma, **conditioning) -> torch.Tensor:
        """D(x; sigma) from ``network(input, c_noise, **conditioning) -> F`` (a U-Net's ``.sample`` or a
        plain tensor). ``sigma`` is a float or a tensor broadcastable to x, one level per row."""
        noise_input = self.c_noise(sigma)
        if torch.is_tensor(noise_input):
            noise_input = noise_input.reshape(-1).to(torch.float32)
        else:
            noise_input = torch.full((x.shape[0],), noise_input, device=x.device, dtype=torch.float32)
        output = network(self.c_in(sigma) * x, noise_input, **conditioning)
        output = getattr(output, "sample", output)
        return self.c_skip(sigma) * x + self.c_out(sigma) * output.to(x.dtype)

    def sigma_levels(self) -> np.ndarray:
        """The T training noise levels, increasing from sigma_min to sigma_max (float64): karras,
        evenly spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5), or exponential, evenly in log sigma."""
        ramp = np.linspace(0.0, 1.0, self.num_train_timesteps)
        if self.sigma_schedule == "karras":
            low, high = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
            return (low + ramp * (high - low)) ** self.rho
        return np.exp(np.log(self.sigma_min) + ramp * (np.log(self.sigma_max) - np.log(self.sigma_min)))


@dataclass
class EDMSchedule(NoiseSchedule):
    """An EDM model's noise levels as a variance-preserving schedule: alpha_bar_t = 1 / (1 + sigma_t^2) on
    the T levels of ``edm.sigma_levels()``, epsilon prediction (what :class:`EDMDenoiser` returns), no
    clipping. ``sigma_levels`` is the exact table; ``sigmas.sigma_table`` reads it instead of rebuilding
    one from betas, and the samplers see the levels as continuous (``sigmas.plan``)."""

    edm: EDMParameters = field(default_factory=EDMParameters)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.sigma_levels = self.edm.sigma_levels()
        if getattr(self, "timestep_spacing", None) is None:  # timesteps from T - 1 to 0: sigma_max to sigma_min
            self.timestep_spacing = SAMPLING_SPACING

    @classmethod
    def from_parameters(cls, edm: EDMParameters) -> EDMSchedule:
        # float64 throughout: 1 - alpha_bar is 4e-6 at sigma_min.
        sigma = torch.from_numpy(edm.sigma_levels())
        alpha_bar = 1.0 / (1.0 + sigma**2)
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        return cls(betas=1.0 - alpha_bar / previous, prediction_type="epsilon", clip_sample=False,
                   beta_schedule="trained", edm=edm)

    def to_config(self, variance_type: str = "fixed_small") -> dict:
        """The EDM scheduler config (an EDM model has no variance type)."""
        return self.edm.to_config()

    def sigma(self, t) -> float:
        """sigma at a (fractional) timestep: the table's entry, log-linear in between (as ``sigmas.sigma_at``)."""
        if float(t).is_integer():
            return float(self.sigma_levels[int(t)])
        return float(np.exp(np.interp(float(t), np.arange(len(self.sigma_levels)), np.log(self.sigma_levels))))


def schedule_from_config(config: dict) -> NoiseSchedule:
    """The schedule a model's scheduler config describes: an EDMSchedule for diffusers' EDM schedulers,
    else the variance-preserving NoiseSchedule."""
    if is_edm_config(config):
        return EDMSchedule.from_parameters(EDMParameters.from_config(config))
    return NoiseSchedule.from_config(config)


class EDMDenoiser(UNetDenoiser):
    """The denoiser of an EDM U-Net on its :class:`EDMSchedule`: at timestep t (sigma = sigma_t) it takes
    x_t, runs D on x_sigma = x_t sqrt(1 + sigma^2) and returns eps = (x_sigma - D) / sigma. Guidance
    (``UNetDenoiser.__call__``) combines these eps, which is guiding D: eps is affine in D."""

    def __init__(self, schedule: EDMSchedule, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.schedule = schedule

    def _sigma(self, t, x: torch.Tensor):
        if torch.is_tensor(t):  # one timestep per image (likelihood evaluation): one sigma per row
            table = torch.as_tensor(self.schedule.sigma_levels, dtype=torch.float32, device=x.device)
            return table[t.to(x.device, torch.long).repeat(x.shape[0] // t.shape[0])].view(-1, *([1] * (x.dim() - 1)))
        return self.schedule.sigma(t)

    def _forward(self, x: torch.Tensor, t, kwargs: Conditioning) -> torch.Tensor:
        sigma = self._sigma(t, x)
        x_sigma = x * (1.0 + sigma**2) ** 0.5
        self.evaluations += x.shape[0]

        def network(inputs, noise_input, **conditioning):
            return self.forward(inputs.to(self.dtype), noise_input, **conditioning)

        return (x_sigma - self.schedule.edm.denoise(network, x_sigma, sigma, **kwargs)) / sigma
