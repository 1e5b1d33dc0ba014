"""``ddpm train --task superres --scale S``: an SR3 super-resolution DDPM on any image set.

Each training image (the high-resolution target at --resolution) makes its own pair: the
low-resolution image is ``degrade(image, S)`` and the network's extra input is that image upsampled
back bicubically. The diffusion runs on the residual x_0 = image - upsampled (what bicubic
upsampling misses, zero on flat regions, as in SRDiff), with L_simple given the upsampled image
concatenated to x_t; sampling adds the upsampled image back.
The run exports a diffusers pipeline whose U-Net takes 2C channels and returns C; ddpm_model.json
records the task and the scale for `ddpm upscale`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddpm_cli.engine.generate import SamplerSettings
from ddpm_cli.engine.imageio import make_grid, save_png
from ddpm_cli.engine.pipeline import from_unet
from ddpm_cli.engine.superres import degrade, upsample, upscale_batch
from ddpm_cli.training import checkpoints
from ddpm_cli.training.data import crop_and_flip
from ddpm_cli.training.loop import Trainer
from ddpm_cli.training.presets import build_unet, unet_config

GRID_IMAGES = 8


class SuperResTrainer(Trainer):
    def _build_model(self) -> torch.nn.Module:
        c = self.config
        config = unet_config(c.model_size, c.resolution, c.channels)
        config["in_channels"] = 2 * c.channels  # x_t and the upsampled low-resolution image
        return build_unet(config)

    def _setup_conditioning(self, config) -> None:
        self.class_names, self.encoder, self.captions = None, None, None

    def _loss(self, images: torch.Tensor, conditioning: dict | None = None) -> torch.Tensor:
        scale = self.config.scale
        low = upsample(degrade(images, scale), scale)
        x0 = images - low  # the residual
        noise_gen = self.generators["noise"]
        t = torch.randint(0, self.schedule.num_train_timesteps, (x0.shape[0],), generator=noise_gen, device=self.device)
        noise = torch.randn(x0.shape, generator=noise_gen, device=self.device)
        with self.autocast:
            output = self.model(torch.cat([self.schedule.q_sample(x0, t, noise), low], dim=1), t).sample
        return F.mse_loss(output.float(), self.schedule.training_target(x0, noise, t))

    def _export(self) -> None:
        info = {"task": "superres", "scale": self.config.scale, "target": "residual", "conditioning": "none"}
        checkpoints.export_pipeline(self.run_dir, self.ema.model, self.schedule.to_config(), info)

    @torch.no_grad()
    def _sample_grid(self) -> None:
        """Rows: the bicubic upsampling, the model's upscale, the original."""
        count = min(GRID_IMAGES, len(self.dataset))
        images = crop_and_flip([self.dataset.load(i) for i in range(count)], self.config.resolution, True, False,
                               torch.Generator()).float() / 127.5 - 1.0
        scale = self.config.scale
        pipeline = from_unet(self.ema.model, self.schedule, upscale=scale)
        low = degrade(images, scale)
        upscaled = torch.cat([upscale_batch(pipeline, [k], SamplerSettings("dpmpp-2m", 20), low[k]) for k in range(count)])
        grid = make_grid(torch.cat([upsample(low, scale), upscaled, images]), nrow=count)
        path = self.run_dir / "samples" / f"step-{self.step:07d}.png"
        save_png(grid, path, {"model": str(self.run_dir), "step": self.step,
                              "rows": "bicubic, upscaled, original"}, overwrite=True)
        self.on_event({"kind": "sample", "step": self.step, "path": str(path)})
