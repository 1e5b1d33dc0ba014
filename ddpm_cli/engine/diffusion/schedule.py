"""The noise schedule and the forward process of Ho et al. (2020), in float64.

The tables (betas, alpha_bar, posterior coefficients) are computed once in float64 on the CPU,
because 1 - alpha_bar_t is tiny near t = 0 and cumulative products lose precision in float32.
Training gathers them per sample from a float32 copy on the training device; samplers read
single entries as Python floats, so the step loop never synchronises host and device.

Notation (DDPM paper): beta_t, alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s,
q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), and the posterior
q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde_t I) of equations (6) and (7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ddpm_cli.engine.choices import BETA_SCHEDULES, PREDICTION_TYPES, SPACINGS
from ddpm_cli.engine.diffusion.zero_snr import TERMINAL_ALPHA_BAR, rescale_zero_terminal_snr
from ddpm_cli.engine.errors import InputError, ModelError


# diffusers spells some names differently; these map its config values onto ours and back.
_SCHEDULE_FROM_DIFFUSERS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_SCHEDULE_TO_DIFFUSERS = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
_PREDICTION_FROM_DIFFUSERS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "sample"}
_PREDICTION_TO_DIFFUSERS = {"epsilon": "epsilon", "v": "v_prediction", "sample": "sample"}


def make_betas(kind: str, num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Beta_t for t = 0..T-1 in float64.

    linear: the DDPM paper (beta from 1e-4 to 0.02 over T = 1000).
    scaled_linear: linear in sqrt(beta), as in Stable Diffusion.
    cosine: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) pi/2) with s = 0.008, betas capped at 0.999
    (Nichol & Dhariwal 2021, eq. 17).
    """
    T = num_train_timesteps
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if kind == "cosine":
        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
        return torch.tensor(betas, dtype=torch.float64)
    raise InputError(f"unknown noise schedule {kind!r}; choose one of {', '.join(BETA_SCHEDULES)}")


def class_default_spacing(class_name: str | None) -> str:
    """The timestep_spacing diffusers' scheduler class ``class_name`` defaults to, and so writes into
    every config it saves ("leading" for DDPM, DDIM and PNDM, "linspace" for most others)."""
    import inspect

    import diffusers

    cls = getattr(diffusers, class_name or "DDPMScheduler", None)
    parameter = inspect.signature(cls.__init__).parameters.get("timestep_spacing") if isinstance(cls, type) else None
    return "leading" if parameter is None else parameter.default


def interpolate_log_variance(v, log_small, log_large):
    """learned_range: v in [-1, 1] puts log Sigma between log beta_tilde and log beta (Nichol & Dhariwal
    2021, eq. 15); tensors or floats, for training's per-sample tables and a sampler's respaced step."""
    frac = (v + 1.0) / 2.0
    return frac * log_large + (1.0 - frac) * log_small


@dataclass
class NoiseSchedule:
    """A fixed variance schedule with its prediction type and x_0 clipping rule."""

    betas: torch.Tensor
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    steps_offset: int = 0  # diffusers' steps_offset: added to "leading" timesteps (Stable Diffusion's configs: 1)
    set_alpha_to_one: bool = True  # False: DDIM's last step ends at alpha_bar_0, not at 1 (diffusers' DDIM/PNDM key)
    rescale_betas_zero_snr: bool = False  # the betas given are rescaled so that alpha_bar_T = 0 (Lin et al. 2024)
    timestep_spacing: str | None = None  # the spacing the model's config asks for; None: each sampler's usual
    _device_tables: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise InputError(f"unknown prediction type {self.prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")
        self.betas = self.betas.to(torch.float64)
        if self.rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
            # Sampling starts from the pure noise at T - 1 only if the timesteps start there (Lin et al. 2024, sec. 3.3).
            self.timestep_spacing = self.timestep_spacing or "trailing"
        if self.timestep_spacing is not None and self.timestep_spacing not in SPACINGS:
            raise ModelError(f"scheduler config has unsupported timestep_spacing {self.timestep_spacing!r}; "
                             f"ddpm knows {', '.join(SPACINGS)}")
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t  (eq. 7)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef_x0 = self.betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef_xt = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)
        # log beta_tilde_t with t = 0 (where beta_tilde is 0) given beta_tilde_1, and log beta_t with t = 0
        # given the same: the ends of a learned variance's range and the two fixed choices, as in
        # Nichol & Dhariwal's code, so the decoder term L_0 always has a finite variance.
        self.log_variance_small = torch.log(torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.log_variance_large = torch.log(torch.cat([self.posterior_variance[1:2], self.betas[1:]]))
        self.log_betas = torch.log(self.betas)

    def respaced(self, timesteps: list[int]) -> NoiseSchedule:
        """The K-step process on a subsequence of timesteps (Nichol & Dhariwal 2021, sec. 4): its
        alpha_bar_i is this schedule's at timesteps[i] (increasing), so beta_i = 1 - ab_i / ab_{i-1}."""
        steps = sorted(timesteps)
        alpha_bar = self.alphas_cumprod[steps]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        return NoiseSchedule(1.0 - alpha_bar / previous, self.prediction_type, self.clip_sample,
                             self.clip_sample_range, "trained")

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def zero_terminal_snr(self) -> bool:
        """alpha_bar_T = 0: x_T is pure noise, and the sigma samplers stop short of sigma = inf."""
        return float(self.alphas_cumprod[-1]) == 0.0

    @classmethod
    def create(cls, kind: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02, prediction_type: str = "epsilon", clip_sample: bool = True,
               zero_terminal_snr: bool = False) -> NoiseSchedule:
        """A named schedule; ``zero_terminal_snr`` rescales it (Lin et al. 2024) and samples it with the
        trailing spacing they prescribe, so that sampling starts from pure noise at T - 1."""
        betas = make_betas(kind, num_train_timesteps, beta_start, beta_end)
        return cls(betas, prediction_type, clip_sample, 1.0, kind, beta_start, beta_end,
                   rescale_betas_zero_snr=zero_terminal_snr)

    @classmethod
    def from_config(cls, config: dict) -> NoiseSchedule:
        """Build from a diffusers scheduler_config.json (DDPM, DDIM, DPM-Solver, PNDM... share these keys)."""
        prediction = _PREDICTION_FROM_DIFFUSERS.get(config.get("prediction_type", "epsilon"))
        if prediction is None:
            raise ModelError(f"scheduler config has unsupported prediction_type {config.get('prediction_type')!r}")
        clip = bool(config.get("clip_sample", False))
        clip_range = float(config.get("clip_sample_range", 1.0))
        # timestep_spacing counts when it says something: diffusers writes its class's default into
        # every config it saves (the built-in models' DDPMScheduler says "leading"), which leaves the
        # choice to each sampler's usual spacing (registry.py).
        spacing = config.get("timestep_spacing")
        if spacing == class_default_spacing(config.get("_class_name")):
            spacing = None
        ends = {"steps_offset": int(config.get("steps_offset") or 0),
                "set_alpha_to_one": bool(config.get("set_alpha_to_one", True)),
                "rescale_betas_zero_snr": bool(config.get("rescale_betas_zero_snr", False)),
                "timestep_spacing": spacing}
        if config.get("trained_betas"):
            betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
            return cls(betas, prediction, clip, clip_range, "trained", **ends)
        kind = _SCHEDULE_FROM_DIFFUSERS.get(config.get("beta_schedule", "linear"))
        if kind is None:
            raise ModelError(f"scheduler config has unsupported beta_schedule {config.get('beta_schedule')!r}")
        start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
        betas = make_betas(kind, int(config.get("num_train_timesteps", 1000)), start, end)
        return cls(betas, prediction, clip, clip_range, kind, start, end, **ends)

    def to_config(self, variance_type: str = "fixed_small") -> dict:
        """The DDPMScheduler config diffusers needs to sample this schedule unchanged; a model with
        learned variance says so in ``variance_type`` ("learned_range")."""
        config = {
            "_class_name": "DDPMScheduler",
            "num_train_timesteps": self.num_train_timesteps,
            "prediction_type": _PREDICTION_TO_DIFFUSERS[self.prediction_type],
            "clip_sample": self.clip_sample,
            "clip_sample_range": self.clip_sample_range,
            "variance_type": variance_type,
        }
        if self.beta_schedule == "trained":
            config["trained_betas"] = self.betas.tolist()  # rescaled already: rescaling again keeps them
        else:
            config.update(beta_schedule=_SCHEDULE_TO_DIFFUSERS[self.beta_schedule],
                          beta_start=self.beta_start, beta_end=self.beta_end)
        if self.rescale_betas_zero_snr:
            config["rescale_betas_zero_snr"] = True
        if self.timestep_spacing is not None:
            config["timestep_spacing"] = self.timestep_spacing
        return config

    # -- per-sample tables for training (float32 on the training device) ------------------------

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, str(device))
        if key not in self._device_tables:
            self._device_tables[key] = getattr(self, name).to(device=device, dtype=torch.float32)
        return self._device_tables[key]

    def _gather(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        values = self._table(name, t.device)[t]
        return values.reshape(-1, *([1] * (ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, in one shot (eq. 4)."""
        alpha_bar = self._gather("alphas_cumprod", t, x0.ndim)
        return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0) (eqs. 6-7)."""
        mean = self._gather("posterior_mean_coef_x0", t, xt.ndim) * x0 + self._gather("posterior_mean_coef_xt", t, xt.ndim) * xt
        return mean, self._gather("posterior_variance", t, xt.ndim)

    def predict_x0(self, output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, clip: bool = False) -> torch.Tensor:
        """x_0 from the network output at per-sample timesteps t (training and likelihood; not clipped
        unless asked). Extra output channels (a learned variance) are ignored."""
        output = output[:, : xt.shape[1]]
        alpha_bar = self._gather("alphas_cumprod", t, xt.ndim)
        if self.prediction_type == "epsilon":
            x0 = (xt - (1.0 - alpha_bar).sqrt() * output) / alpha_bar.where(alpha_bar > 0, TERMINAL_ALPHA_BAR).sqrt()
        elif self.prediction_type == "sample":
            x0 = output
        else:
            x0 = alpha_bar.sqrt() * xt - (1.0 - alpha_bar).sqrt() * output
        return x0.clamp(-self.clip_sample_range, self.clip_sample_range) if clip else x0

    def log_variance(self, output: torch.Tensor, t: torch.Tensor, variance: str, channels: int) -> torch.Tensor:
        """log Sigma_theta(x_t, t) per element for a variance kind (see VARIANCES).

        learned_range: the network's extra channels v in [-1, 1] interpolate between log beta_tilde_t
        and log beta_t (Nichol & Dhariwal 2021, eq. 15); learned: they are the log variance itself.
        """
        if variance == "learned":
            return output[:, channels:]
        small = self._gather("log_variance_small", t, output.ndim)
        if variance == "learned_range":
            return interpolate_log_variance(output[:, channels:], small, self._gather("log_betas", t, output.ndim))
        large = self._gather("log_variance_large", t, output.ndim)
        return (small if variance == "fixed_small" else large).expand(output.shape[0], channels, *output.shape[2:])

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output: eps, v = sqrt(ab) eps - sqrt(1-ab) x_0, or x_0."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        alpha_bar = self._gather("alphas_cumprod", t, x0.ndim)
        return alpha_bar.sqrt() * noise - (1.0 - alpha_bar).sqrt() * x0

    # -- single-timestep arithmetic for samplers (Python floats: no device sync) --------------

    def alpha_bar(self, t: float) -> float:
        """alpha_bar_t for t >= 0; alpha_bar_{-1} = 1 (the clean image) closes every sampler. A
        fractional t (karras/exponential noise levels) interpolates log sigma (``sigmas.sigma_at``)."""
        if t < 0:
            return 1.0
        if isinstance(t, int) or float(t).is_integer():
            return float(self.alphas_cumprod[int(t)])
        from ddpm_cli.engine.diffusion.sigmas import sigma_at

        return 1.0 / (1.0 + sigma_at(self, t) ** 2)

    @property
    def final_alpha_bar(self) -> float:
        """Where DDIM's last step lands: 1, or alpha_bar_0 when the config says set_alpha_to_one false."""
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])

    def split_prediction(self, output: torch.Tensor, xt: torch.Tensor, t: int,
                         alpha_bar: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_0, eps) predicted at timestep t from the network output; x_0 clipped if the schedule says so.

        eps is derived before clipping, as DDIM does (Song et al. 2021, eq. 12). Extra output channels
        (a learned variance) are ignored here; ``samplers.ddpm_step`` reads them. ``alpha_bar`` reads
        xt as being at that noise level instead of t's (DDIM inversion, ``tasks/invert.py``).
        """
        output = output[:, : xt.shape[1]]
        alpha_bar = self.alpha_bar(t) if alpha_bar is None else alpha_bar
        sqrt_ab, sqrt_1mab = alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5
        if self.prediction_type == "epsilon":
            eps = output
            # alpha_bar_T = 0 (zero terminal SNR): eps tells nothing of x_0 there; divide by
            # TERMINAL_ALPHA_BAR's root instead, so x_0 stays finite (and is clipped if asked).
            x0 = (xt - sqrt_1mab * eps) / (sqrt_ab if alpha_bar > 0 else TERMINAL_ALPHA_BAR**0.5)
        elif self.prediction_type == "sample":
            x0 = output
            eps = (xt - sqrt_ab * x0) / sqrt_1mab
        else:
            x0 = sqrt_ab * xt - sqrt_1mab * output
            eps = sqrt_ab * output + sqrt_1mab * xt
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0, eps
