"""``--task autoencoder``: a KL-regularised autoencoder (AutoencoderKL) for latent diffusion.

The loss is the latent diffusion paper's "KL-reg" objective without its perceptual and adversarial
terms: per image, the squared reconstruction error plus ``kl_weight`` times KL(q(z|x) || N(0, I)),
both summed and divided by the number of pixels. The decoder sees a sample z ~ q(z|x), whose noise
is the Trainer's global-batch draw. Encoder and decoder run in one forward (:class:`EncodeDecode`),
the module the Trainer wraps in DDP and compiles.

The export is ``vae/`` (diffusers format) with ``scaling_factor`` set to 1 / (standard deviation of
the latents of up to 1,024 training images), as Rombach et al. do, so diffusion on the scaled
latents sees unit-variance data.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ddpm_cli.engine.models.vae import decode_latents, encode_images
from ddpm_cli.engine.io.images import make_grid, save_png
from ddpm_cli.engine.models.resolve import MODEL_INFO_FILE
from ddpm_cli.training import checkpoints
from ddpm_cli.training.objectives.base import Batch, Draws, Network, Objective, grid_path
from ddpm_cli.training.presets import autoencoder_config, build_autoencoder

SCALE_IMAGES = 1024  # training images whose latents set the scaling factor
GRID_IMAGES = 8


class EncodeDecode(torch.nn.Module):
    """One training pass of an AutoencoderKL: encode, sample z = mean + std * noise, decode.
    Returns (reconstruction, KL(q(z|x) || N(0, I)) per image)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(images).latent_dist
        z = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)
        return self.vae.decode(z).sample, posterior.kl()


class AutoencoderObjective(Objective):
    name = "autoencoder"

    def build_model(self) -> torch.nn.Module:
        c = self.config
        config = autoencoder_config(c.model_size, c.resolution, c.channels)
        size = c.resolution // 2 ** (len(config["block_out_channels"]) - 1)
        self.latent_shape = (config["latent_channels"], size, size)
        return build_autoencoder(config)

    def trainable(self, model: torch.nn.Module) -> torch.nn.Module:
        return EncodeDecode(model)

    def loss(self, network: Network, batch: Batch, draws: Draws) -> torch.Tensor:
        x0 = batch.images
        noise = draws.normal((x0.shape[0], *self.latent_shape))
        reconstruction, kl = network(x0, noise)
        pixels = x0[0].numel()
        reconstruction_error = F.mse_loss(reconstruction.float(), x0, reduction="sum") / (pixels * x0.shape[0])
        return reconstruction_error + self.config.kl_weight * kl.float().mean() / pixels

    @torch.no_grad()
    def export(self, run_dir: Path, ema_model: torch.nn.Module) -> None:
        """vae/ with the scaling factor measured on the training images, and ddpm_model.json."""
        vae = ema_model
        vae.register_to_config(scaling_factor=1.0)
        latents = torch.cat([encode_images(vae, batch.to(self.device), tile=None).cpu()
                             for batch in self.first_images(SCALE_IMAGES).split(64)])
        vae.register_to_config(scaling_factor=float(1.0 / latents.float().std().clamp_min(1e-6)))
        info = {"task": "autoencoder", "image_size": [self.config.resolution] * 2}
        checkpoints.export_files(run_dir, {"vae": vae.save_pretrained,
                                           MODEL_INFO_FILE: lambda path: path.write_text(json.dumps(info, indent=2))})

    @torch.no_grad()
    def preview(self, run_dir: Path, ema_model: torch.nn.Module, step: int) -> Path:
        """Training images (top row) over their reconstructions (bottom row)."""
        images = self.first_images(GRID_IMAGES)
        reconstructions = decode_latents(ema_model, encode_images(ema_model, images.to(self.device), tile=None))
        grid = make_grid(torch.cat([images, reconstructions.cpu().clamp(-1, 1)]), nrow=len(images))
        path = grid_path(run_dir, step)
        save_png(grid, path, {"model": str(run_dir), "step": step, "rows": "images over reconstructions"}, overwrite=True)
        return path
