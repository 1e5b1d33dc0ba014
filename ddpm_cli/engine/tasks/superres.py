"""Super-resolution by conditional diffusion: SR3 (Saharia et al. 2021), the Stable Diffusion
upscaler format (StableDiffusionUpscalePipeline) and the LDM one (LDMSuperResolutionPipeline).

The U-Net sees the noisy x_t concatenated with the low-resolution image upsampled bicubically to
the output size, and predicts the noise; x_0 is the residual (high-resolution image minus the
upsampled one), so the output is the upsampled image plus the sampled residual. Sampling is any
sampler's reverse process with that extra input (``wrappers.with_channels`` around the model); the result is finally projected onto the images
whose block means equal the input (``back_project``), so downsampling the output gives the input. The low-resolution image of a training pair is the high-resolution
one box-filtered down by the scale factor (``degrade``), the operator the consistency check inverts.

Images larger than the model's size are upscaled in overlapping tiles: at every step the network
runs on each tile and the outputs are blended with weights that ramp down towards tile edges, so
every pixel gets one consistent prediction (no seams) and memory is bounded by the tile batch.

A Stable Diffusion upscaler is a latent model whose U-Net sees the latents concatenated with the
low-resolution image, noised to ``noise_level`` by its low_res_scheduler (the level is also its
class label), and cross-attends to the prompt; its VAE decodes the latents at the larger size.
An LDM upscaler (Rombach et al. 2022) sees its VQ latents concatenated with the low-resolution
image as it is; its VQ decoder makes the larger image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ddpm_cli.engine.errors import InputError
from ddpm_cli.engine.tasks.generate import SamplerSettings, run_sampler
from ddpm_cli.engine.diffusion.noise import SeededNoise
from ddpm_cli.engine.diffusion.denoiser import UNetDenoiser
from ddpm_cli.engine.models.pipeline import Condition, Pipeline
from ddpm_cli.engine.tasks.wrappers import with_channels


def degrade(images: torch.Tensor, scale: int) -> torch.Tensor:
    """High- to low-resolution: the mean of each scale×scale block."""
    return F.avg_pool2d(images, scale)


def upsample(images: torch.Tensor, scale: int) -> torch.Tensor:
    """Low-resolution images to the high-resolution grid, bicubic (the network's conditioning)."""
    return F.interpolate(images, scale_factor=scale, mode="bicubic", align_corners=False).clamp(-1.0, 1.0)


TILES_PER_PASS = 16  # tiles of an image that share one network pass


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _ramp(tile: int, overlap: int, device) -> torch.Tensor:
    """1-D blending weight: rises linearly over ``overlap`` pixels at each end, 1 in between."""
    position = torch.arange(tile, device=device, dtype=torch.float32)
    edge = torch.minimum(position + 1, tile - position) / max(overlap, 1)
    return edge.clamp(max=1.0)


def tiled(model: Callable, tile: int, overlap: int, tiles_per_pass: int = TILES_PER_PASS) -> Callable:
    """``model(x, t)`` run on overlapping tile×tile windows and blended; the whole image when it fits
    in one tile. x is the network's whole input (conditioning channels included), the output may
    have other channels. Up to ``tiles_per_pass`` windows (of every image in the batch) go through
    the network together, which bounds memory and keeps the device busy."""
    def run(x: torch.Tensor, t: int) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height <= tile and width <= tile:
            return model(x, t)
        out = None
        total = torch.zeros((1, 1, height, width), device=x.device, dtype=x.dtype)
        tile_h, tile_w = min(tile, height), min(tile, width)
        weight = (_ramp(tile_h, overlap, x.device)[:, None] * _ramp(tile_w, overlap, x.device)[None, :]).to(x.dtype)
        windows = [(..., slice(top, top + tile_h), slice(left, left + tile_w))
                   for top in _starts(height, tile_h, tile_h - overlap)
                   for left in _starts(width, tile_w, tile_w - overlap)]
        batch = x.shape[0]
        for start in range(0, len(windows), tiles_per_pass):
            chunk = windows[start:start + tiles_per_pass]
            xs = torch.cat([x[window] for window in chunk])  # window-major: B rows per window
            parts = model(xs, t)
            if out is None:
                out = x.new_zeros((batch, parts.shape[1], height, width))
            for window, part in zip(chunk, parts.split(batch)):
                out[window] += weight * part
                total[window] += weight
        return out / total
    return run


@dataclass(frozen=True)
class UpscaleSettings:
    """Tiling (``tile`` and ``overlap`` in the network's own units: pixels for SR3, latents for SD
    upscalers; default the model's sample size and a quarter of it) and, for Stable Diffusion
    upscalers, the prompt, guidance scale and the noise level added to the input image."""

    tile: int | None = None
    overlap: int | None = None
    prompt: str = ""
    negative_prompt: str = ""
    cfg: float = 9.0
    noise_level: int = 20


def upscale_batch(pipeline: Pipeline, seeds: list[int], settings: SamplerSettings, low: torch.Tensor,
                  callback: Callable[[dict], None] | None = None, options: UpscaleSettings = UpscaleSettings()) -> torch.Tensor:
    """Upscale one low-resolution image (C×h×w in [-1, 1]) once per seed: B×C×(h·s)×(w·s) in [-1, 1]."""
    pipeline.require("upscale")
    scale = pipeline.scale
    if low.shape[0] != pipeline.image_channels:
        raise InputError(f"the image has {low.shape[0]} channels but {pipeline.name} makes {pipeline.image_channels}")
    settings = settings.resolved(pipeline)
    kind = pipeline.upscaler
    channels = pipeline.sample_shape[0]
    # SR3 samples at the output size; latent upscalers sample at the input size (their decoder enlarges).
    height, width = (low.shape[-2] * scale, low.shape[-1] * scale) if kind == "sr3" else tuple(low.shape[-2:])
    tile = options.tile or pipeline.sample_shape[-1]
    overlap = tile // 4 if options.overlap is None else options.overlap
    if not 0 <= overlap < tile:
        raise InputError(f"--overlap must be between 0 and the tile size {tile} - 1, got {overlap}")
    factor = pipeline.unet_factor
    if tile % factor or (height < tile and height % factor) or (width < tile and width % factor):
        raise InputError(f"the network's input {width}x{height} and the tile {tile} must be multiples of {factor} "
                         f"where smaller than a tile; crop the image a little")
    noise = SeededNoise(seeds, (channels, height, width), pipeline.device)
    image = low[None].to(pipeline.device).float()
    if kind == "sd":  # diffusers' order: each seed's generator draws the image's noise, then the initial latents
        if not 0 <= options.noise_level <= (pipeline.max_noise_level or 1000):
            raise InputError(f"--noise-level must be between 0 and {pipeline.max_noise_level}, got {options.noise_level}")
        image_noise = noise(tuple(low.shape))
        alpha_bar = pipeline.low_res_schedule.alpha_bar(options.noise_level)
        condition = alpha_bar**0.5 * image + (1.0 - alpha_bar) ** 0.5 * image_noise
        cond, uncond = pipeline.conditioning(len(seeds), Condition(prompt=options.prompt,
                                                                   negative_prompt=options.negative_prompt))
        level = torch.full((len(seeds),), options.noise_level, device=pipeline.device, dtype=torch.long)
        denoiser = UNetDenoiser(pipeline.unet, pipeline.dtype, {**cond, "class_labels": level},
                                None if uncond is None else {**uncond, "class_labels": level}, options.cfg, pipeline.forward,
                                settings.cfg_rescale)
    elif kind == "ldm":  # the low-resolution image itself, as extra input channels
        condition, denoiser = image, pipeline.denoiser(len(seeds))
    else:
        condition = upsample(image, scale).expand(len(seeds), -1, -1, -1)
        denoiser = pipeline.denoiser(len(seeds))
    model = with_channels(tiled(denoiser, tile, overlap), condition)
    timesteps = settings.timesteps(pipeline.schedule)
    x = run_sampler(settings, model, noise(), pipeline.schedule, timesteps, noise, callback)
    if kind == "sr3":
        x = back_project(condition + x, image, scale)  # the upsampled image plus the residual, made consistent
    return pipeline.decode(x).float().clamp(-1.0, 1.0).cpu()


def back_project(high: torch.Tensor, low: torch.Tensor, scale: int) -> torch.Tensor:
    """Correct ``high`` so that ``degrade(high, scale)`` equals ``low``: each scale×scale block is
    shifted by its error (the block mean is the degradation, so this is an exact projection)."""
    error = low - degrade(high, scale)
    return high + F.interpolate(error, scale_factor=scale, mode="nearest")
