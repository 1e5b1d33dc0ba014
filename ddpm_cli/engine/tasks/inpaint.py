"""Zero-shot inpainting with any model the project samples (Lugmayr et al. 2022, RePaint; sec. 3 of
Song et al. 2021 for the replacement idea).

After every reverse step to timestep s, the known region is replaced by a forward-process sample
q(x_s | x_0) of the known image, and the unknown region keeps what the model made:

    x_s <- m * x_s + (1 - m) * (sqrt(alpha_bar_s) x_known + sqrt(1 - alpha_bar_s) eps)

(m = 1 where the mask says "generate"). At the clean end (alpha_bar = 1) the known region is the
known image itself, so in pixel space the output's known region equals the input up to 8-bit
rounding. Every sampler takes this as a step callback (:class:`KnownRegion`), which returns the
replaced x. RePaint's resampling harmonises
the border: after each ``jump_length`` steps down, the chain is diffused ``jump_length`` steps back
up with q(x_t | x_s) and denoised again, ``jump_n_sample`` times in all (ancestral DDPM steps).

Latent models inpaint their latents (the known image is encoded once; the mask is reduced to
latent resolution: a latent is generated if any of its pixels is) and decode at the end.

Stable Diffusion inpainting checkpoints (a 9-channel U-Net: 4 latent channels, the mask, and the
4 latents of the image with the hole set to grey) were trained to fill holes, so nothing is
replaced during sampling: the mask (nearest-neighbour at latent size) and the masked image's
latents ride along as extra input channels at every step (``wrappers.with_channels``), as in
diffusers' StableDiffusionInpaintPipeline. The masked image is encoded to the mean of the VAE's posterior
(diffusers draws a sample from it), so a seed gives the same image on every run and device.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ddpm_cli.engine.models.vae import encode_images
from ddpm_cli.engine.errors import InputError
from ddpm_cli.engine.tasks.generate import SamplerSettings, run_sampler
from ddpm_cli.engine.diffusion.noise import SeededNoise
from ddpm_cli.engine.models.pipeline import Condition, Pipeline
from ddpm_cli.engine.diffusion.samplers import after_step, ddpm_step
from ddpm_cli.engine.tasks.wrappers import chain, with_channels

MASK_THRESHOLD = 128  # mask pixels (0-255, after flattening to grey) at or above this are generated


def read_mask(path: str | Path, size: tuple[int, int], invert: bool = False, resize: bool = False) -> torch.Tensor:
    """The mask as a 1×1×H×W float tensor: 1 = generate, 0 = keep.

    White means generate. Any colour mode is read deliberately: palette and RGBA masks are
    flattened onto black (transparent pixels are kept), colour is converted to grey (ITU-R 601
    luma), 16-bit is rescaled to 8 bits; then grey >= 128 means generate. ``size`` is the image's
    (height, width); another size is an error unless ``resize`` (nearest neighbour).
    """
    from PIL import Image

    from ddpm_cli.engine.io.images import load_image

    mask = load_image(path, mode="L", background=(0, 0, 0))
    height, width = size
    if (mask.height, mask.width) != (height, width):
        if not resize:
            raise InputError(f"the mask {path} is {mask.width}x{mask.height} but the image is {width}x{height}; "
                             "pass --resize-mask to resize it (nearest neighbour)")
        mask = mask.resize((width, height), Image.NEAREST)
    generate = torch.from_numpy(np.array(mask)) >= MASK_THRESHOLD
    if invert:
        generate = ~generate
    if not generate.any():
        raise InputError(f"the mask {path} marks nothing to generate (white = generate; --invert-mask flips it)")
    return generate.float()[None, None]


def repaint_levels(steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """The levels the RePaint chain visits, from ``steps`` (pure noise) down to 0 (clean).

    Level k > 0 is the k-th timestep from the clean end; each move is one step down or one up.
    Without resampling (jump_n_sample = 1) it is steps, steps - 1, ..., 0.
    """
    if jump_length < 1 or jump_n_sample < 1:
        raise InputError("--jump-length and --jump-n-sample must be at least 1")
    jumps = {k: jump_n_sample - 1 for k in range(0, steps - jump_length, jump_length)}
    level, path = steps, [steps]
    while level >= 1:
        level -= 1
        path.append(level)
        if jumps.get(level, 0) > 0:
            jumps[level] -= 1
            for _ in range(jump_length):
                level += 1
                path.append(level)
    return path


class KnownRegion:
    """The replacement step callback: x's known region (mask 0) becomes the known image noised to
    the timestep x is now at, t_prev (-1: the clean end, the known image itself). The noise comes
    from ``noise``, one draw per step."""

    def __init__(self, known: torch.Tensor, mask: torch.Tensor, schedule, noise: SeededNoise):
        self.known, self.mask, self.schedule, self.noise = known, mask, schedule, noise

    def replace(self, x: torch.Tensor, s: int) -> torch.Tensor:
        """x with its known region at timestep s."""
        alpha_bar = self.schedule.alpha_bar(s)
        noisy_known = self.known if s < 0 else alpha_bar**0.5 * self.known + (1.0 - alpha_bar) ** 0.5 * self.noise()
        return self.mask * x + (1.0 - self.mask) * noisy_known

    def __call__(self, info: dict) -> torch.Tensor:
        return self.replace(info["x"], info["t_prev"])


def _repaint(model, x, schedule, timesteps: list[int], noise, known: KnownRegion, variance: str, jump_length: int,
             jump_n_sample: int, callback) -> torch.Tensor:
    """Ancestral DDPM steps along :func:`repaint_levels`, the known region replaced after each; steps
    up are q(x_t | x_s) (forward diffusion). ``callback`` sees every move (denoised None going up)."""
    n = len(timesteps)
    down = chain(known, callback)

    def t_of(level: int) -> int:  # level 0 is the clean end
        return timesteps[n - level] if level > 0 else -1

    path = repaint_levels(n, jump_length, jump_n_sample)
    for i, (here, there) in enumerate(zip(path, path[1:])):
        t, s = t_of(here), t_of(there)
        if there > here:  # back up: x_t ~ q(x_t | x_s) with alpha = alpha_bar_t / alpha_bar_s
            ratio = schedule.alpha_bar(s) / schedule.alpha_bar(t)
            x = after_step(callback, i, t, s, ratio**0.5 * x + (1.0 - ratio) ** 0.5 * noise(), None)
        else:
            x, x0 = ddpm_step(model, x, schedule, t, s, noise, variance)
            x = after_step(down, i, t, s, x, x0)
    return x


def inpaint_batch(pipeline: Pipeline, seeds: list[int], settings: SamplerSettings, image: torch.Tensor,
                  mask: torch.Tensor, callback: Callable[[dict], None] | None = None, condition: Condition | None = None,
                  cfg: float = 1.0, jump_length: int = 1, jump_n_sample: int = 1,
                  preserve_known: bool = False) -> torch.Tensor:
    """Fill the masked region of ``image`` (C×H×W in [-1, 1]) once per seed; returns B×C×H×W in [-1, 1].

    ``mask`` is 1×1×H×W (1 = generate). ``jump_n_sample`` > 1 turns on RePaint resampling (DDPM
    sampler only). ``preserve_known`` pastes the known pixels back after decoding (latent models;
    pixel models keep them anyway).
    """
    pipeline.require("image", "inpaint")
    settings = settings.resolved(pipeline)
    if jump_n_sample > 1 and settings.sampler != "ddpm":
        raise InputError("RePaint resampling (--jump-n-sample > 1) runs with --sampler ddpm")
    if jump_n_sample > 1 and pipeline.kind == "inpaint":
        raise InputError(f"{pipeline.name} is an inpainting model that sees the mask itself; drop --jump-n-sample")
    if image.shape[0] != pipeline.image_channels:
        raise InputError(f"the image has {image.shape[0]} channels but {pipeline.name} makes {pipeline.image_channels}")
    device = pipeline.device
    known = image[None].to(device)
    pixel_mask = mask.to(device)
    if pipeline.kind == "inpaint":  # the model's extra inputs: the masked image's latents and the mask at their size
        known = encode_images(pipeline.vae, known * (1.0 - pixel_mask)).to(device)
        mask = F.interpolate(pixel_mask, size=known.shape[-2:])
    elif pipeline.vae is not None:
        known = encode_images(pipeline.vae, known).to(device)
        mask = F.max_pool2d(pixel_mask, pipeline.latent_factor)  # a latent is generated if any of its pixels is
    else:
        mask = pixel_mask
    batch = len(seeds)
    known = known.expand(batch, -1, -1, -1)
    schedule = pipeline.schedule
    noise = SeededNoise(seeds, tuple(known.shape[1:]), device)
    x = noise()
    known_noise = SeededNoise([seed + 1_000_003 for seed in seeds], tuple(known.shape[1:]), device)
    region = KnownRegion(known, mask, schedule, known_noise)
    model = pipeline.denoiser(batch, condition, cfg, settings.cfg_rescale)
    timesteps = settings.timesteps(pipeline.schedule)
    if pipeline.kind == "inpaint":  # the U-Net fills the hole itself, seeing the mask and the masked image
        x = run_sampler(settings, with_channels(model, torch.cat([mask, known[:1]], dim=1)), x, schedule, timesteps,
                        noise, callback)
    elif jump_n_sample > 1:
        x = _repaint(model, x, schedule, timesteps, noise, region, settings.options["variance"], jump_length,
                     jump_n_sample, callback)
    else:
        x = run_sampler(settings, model, x, schedule, timesteps, noise, chain(region, callback))
    out = pipeline.decode(x).float().clamp(-1.0, 1.0)
    if pipeline.vae is None or preserve_known:  # exact known pixels (pixel models have them already)
        out = pixel_mask * out + (1.0 - pixel_mask) * image[None].to(device).float()
    return out.cpu()
