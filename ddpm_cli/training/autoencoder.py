"""``ddpm train --task autoencoder``: a KL-regularised autoencoder (AutoencoderKL) for latent diffusion.

The loss is the latent diffusion paper's "KL-reg" objective without its perceptual and adversarial
terms: per image, the squared reconstruction error plus ``kl_weight`` times KL(q(z|x) || N(0, I)),
both summed and divided by the number of pixels. The decoder sees a sample z ~ q(z|x).

The run shares everything else with DDPM training (data, batching, EMA, mixed precision,
checkpoints, exact resume). Its export is ``vae/`` (diffusers format) with ``scaling_factor`` set
to 1 / (standard deviation of the latents of up to 1,024 training images), as Rombach et al. do,
so diffusion on the scaled latents sees unit-variance data.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from ddpm_cli.engine.autoencoder import decode_latents, encode_images
from ddpm_cli.engine.imageio import make_grid, save_png
from ddpm_cli.engine.pipeline import MODEL_INFO_FILE
from ddpm_cli.training import checkpoints
from ddpm_cli.training.loop import Trainer
from ddpm_cli.training.presets import autoencoder_config, build_autoencoder

SCALE_IMAGES = 1024  # training images whose latents set the scaling factor
GRID_IMAGES = 8


class AutoencoderTrainer(Trainer):
    def _build_model(self) -> torch.nn.Module:
        c = self.config
        return build_autoencoder(autoencoder_config(c.model_size, c.resolution, c.channels))

    def _setup_conditioning(self, config) -> None:
        self.class_names, self.encoder, self.captions = None, None, None

    def _loss(self, x0: torch.Tensor, conditioning: dict | None = None) -> torch.Tensor:
        with self.autocast:
            posterior = self.model.encode(x0).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=self.generators["noise"],
                                                             device=self.device, dtype=posterior.mean.dtype)
            reconstruction = self.model.decode(z).sample
        pixels = x0[0].numel()
        reconstruction_error = F.mse_loss(reconstruction.float(), x0, reduction="sum") / (pixels * x0.shape[0])
        kl = posterior.kl().float().mean() / pixels
        return reconstruction_error + self.config.kl_weight * kl

    def _first_images(self, count: int) -> torch.Tensor:
        from ddpm_cli.training.data import crop_and_flip

        count = min(count, len(self.dataset))
        images = [self.dataset.load(i) for i in range(count)]
        batch = crop_and_flip(images, self.config.resolution, True, False, torch.Generator())
        return batch.float() / 127.5 - 1.0

    @torch.no_grad()
    def _export(self) -> None:
        """vae/ with the scaling factor measured on the training images, and ddpm_model.json."""
        vae = self.ema.model
        vae.register_to_config(scaling_factor=1.0)
        latents = torch.cat([encode_images(vae, batch.to(self.device), tile=None).cpu()
                             for batch in self._first_images(SCALE_IMAGES).split(64)])
        vae.register_to_config(scaling_factor=float(1.0 / latents.float().std().clamp_min(1e-6)))
        checkpoints.export_files(self.run_dir, {"vae": vae.save_pretrained,
                                                MODEL_INFO_FILE: lambda path: path.write_text(json.dumps(
                                                    {"task": "autoencoder", "image_size": [self.config.resolution] * 2},
                                                    indent=2))})

    @torch.no_grad()
    def _sample_grid(self) -> None:
        """Training images (top row) over their reconstructions (bottom row)."""
        images = self._first_images(GRID_IMAGES)
        reconstructions = decode_latents(self.ema.model, encode_images(self.ema.model, images.to(self.device), tile=None))
        grid = make_grid(torch.cat([images, reconstructions.cpu().clamp(-1, 1)]), nrow=len(images))
        path = self.run_dir / "samples" / f"step-{self.step:07d}.png"
        save_png(grid, path, {"model": str(self.run_dir), "step": self.step, "rows": "images over reconstructions"},
                 overwrite=True)
        self.on_event({"kind": "sample", "step": self.step, "path": str(path)})
