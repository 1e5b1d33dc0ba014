"""``--task superres --scale S``: an SR3 super-resolution DDPM on any image set.

Each training image (the high-resolution target at --resolution) makes its own pair: the
low-resolution image is ``degrade(image, S)`` and the network's extra input is that image upsampled
back bicubically. The diffusion runs on the residual x_0 = image - upsampled (what bicubic
upsampling misses, zero on flat regions, as in SRDiff), with L_simple given the upsampled image
concatenated to x_t; sampling adds the upsampled image back. Timesteps and noise are the
Trainer's global-batch draws, as for ``--task ddpm``.
The run exports a diffusers pipeline whose U-Net takes 2C channels and returns C; ddpm_model.json
records the task and the scale for `ddpm upscale`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ddpm_cli.engine.tasks.generate import SamplerSettings
from ddpm_cli.engine.io.images import make_grid, save_png
from ddpm_cli.engine.models.pipeline import from_unet
from ddpm_cli.engine.tasks.superres import degrade, upsample, upscale_batch
from ddpm_cli.training import checkpoints
from ddpm_cli.training.objectives.base import Batch, Draws, Network, Objective, grid_path
from ddpm_cli.training.objectives.diffusion import make_schedule
from ddpm_cli.training.presets import build_unet, run_unet_config, with_dropout

GRID_IMAGES = 8


class SuperResObjective(Objective):
    name = "superres"

    def __init__(self, config, dataset, device, vae=None, on_event=None):
        super().__init__(config, dataset, device, vae, on_event)
        self.schedule = make_schedule(config)

    def build_model(self) -> torch.nn.Module:
        c = self.config
        # x_t and the upsampled low-resolution image in, the residual's channels out
        config = run_unet_config(c, c.resolution, 2 * c.channels, c.channels)
        return build_unet(with_dropout(config, c.dropout))

    def loss(self, network: Network, batch: Batch, draws: Draws) -> torch.Tensor:
        images, scale = batch.images, self.config.scale
        low = upsample(degrade(images, scale), scale)
        x0 = images - low  # the residual
        t = draws.timesteps(x0.shape[0], self.schedule.num_train_timesteps)
        noise = draws.normal(x0.shape)
        output = network(torch.cat([self.schedule.q_sample(x0, t, noise), low], dim=1), t).sample
        return F.mse_loss(output.float(), self.schedule.training_target(x0, noise, t))

    def export(self, run_dir: Path, ema_model: torch.nn.Module) -> None:
        info = {"task": "superres", "scale": self.config.scale, "target": "residual", "conditioning": "none"}
        checkpoints.export_pipeline(run_dir, ema_model, self.schedule.to_config(), info)

    @torch.no_grad()
    def preview(self, run_dir: Path, ema_model: torch.nn.Module, step: int) -> Path:
        """Rows: the bicubic upsampling, the model's upscale, the original."""
        images = self.first_images(GRID_IMAGES)
        count, scale = len(images), self.config.scale
        pipeline = from_unet(ema_model, self.schedule, upscale=scale)
        low = degrade(images, scale)
        settings = SamplerSettings("dpmpp-2m", min(20, self.schedule.num_train_timesteps))
        upscaled = torch.cat([upscale_batch(pipeline, [k], settings, low[k]) for k in range(count)])
        grid = make_grid(torch.cat([upsample(low, scale), upscaled, images]), nrow=count)
        path = grid_path(run_dir, step)
        save_png(grid, path, {"model": str(run_dir), "step": step, "rows": "bicubic, upscaled, original"}, overwrite=True)
        return path
