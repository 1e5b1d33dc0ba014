"""``--task ddpm --objective edm``: a diffusion model trained as Karras et al. (2022) train theirs
("Elucidating the design space", Table 1 and sec. 5).

The U-Net F is the network of the denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), with
x = y + sigma n, n ~ N(0, I), ln(sigma) ~ N(P_mean = -1.2, P_std = 1.2), and the loss

    E[ lambda(sigma) || D(y + sigma n; sigma) - y ||^2 ],   lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.

The preconditioning is diffusers' EDM schedulers' (``engine/diffusion/edm.py``), so the exported run
folder (the U-Net and an EDMEulerScheduler config in scheduler/) samples with EDMEulerScheduler and
EDMDPMSolverMultistepScheduler as it does with every ddpm sampler. Everything else (conditioning, latents,
previews, export) is the DDPM objective's.
"""

from __future__ import annotations

from statistics import NormalDist

import torch

from ddpm_cli.engine.diffusion.edm import P_MEAN, P_STD, EDMParameters, EDMSchedule, is_edm_config
from ddpm_cli.training.config import TrainConfig
from ddpm_cli.training.objectives.base import Batch, Draws, Network
from ddpm_cli.training.objectives.diffusion import VALIDATION_TIMESTEPS, DiffusionObjective


def edm_parameters(config: TrainConfig) -> EDMParameters:
    """The EDM numbers of a run: an --init-from EDM model's own, else the defaults with --sigma-data."""
    if is_edm_config(config.scheduler_config):
        return EDMParameters.from_config(config.scheduler_config)
    return EDMParameters(sigma_data=config.sigma_data or EDMParameters.sigma_data,
                         num_train_timesteps=config.num_train_timesteps)


def validation_sigmas(count: int = VALIDATION_TIMESTEPS) -> list[float]:
    """``count`` fixed noise levels: the training distribution's quantiles at (k + 0.5) / count."""
    normal = NormalDist(P_MEAN, P_STD)
    return [float(torch.tensor(normal.inv_cdf((k + 0.5) / count)).exp()) for k in range(count)]


class EDMObjective(DiffusionObjective):
    """The DDPM objective with EDM's parameterisation, noise levels and loss weights."""

    def __init__(self, config, dataset, device, vae=None, on_event=None):
        super().__init__(config, dataset, device, vae, on_event)
        self.edm = edm_parameters(config)
        self.schedule = EDMSchedule.from_parameters(self.edm)  # what previews sample and the export says

    def _loss(self, network: Network, batch: Batch, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) || D(y + sigma n; sigma) - y ||^2, averaged."""
        y = batch.images
        x = (y + sigma * noise).contiguous(memory_format=self.memory_format)
        denoised = self.edm.denoise(network, x, sigma, **batch.conditioning).float()
        return (self.edm.loss_weight(sigma) * (denoised - y) ** 2).mean()

    def loss(self, network: Network, batch: Batch, draws: Draws) -> torch.Tensor:
        y = batch.images
        # One noise level per image: ln(sigma) ~ N(P_mean, P_std^2).
        sigma = (draws.normal((y.shape[0], *[1] * (y.ndim - 1))) * P_STD + P_MEAN).exp()
        return self._loss(network, batch, sigma, draws.normal(y.shape))

    @torch.no_grad()
    def validation_loss(self, network: Network, batch: Batch, noise: torch.Tensor) -> dict[float, float]:
        """The loss on held-out images at fixed noise levels (``validation_sigmas``), the same noise each
        time: {sigma: loss}."""
        losses = {}
        for sigma in validation_sigmas():
            level = torch.full((batch.images.shape[0], *[1] * (batch.images.ndim - 1)), sigma, device=noise.device)
            losses[round(sigma, 4)] = float(self._loss(network, batch, level, noise))
        return losses
