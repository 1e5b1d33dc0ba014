"""A loaded model ready to sample: network, noise schedule, sample shape, device and dtype.

``load_pipeline`` accepts what ``ddpm sample MODEL`` accepts: a local diffusers folder (the
project's training runs, or a DDPMPipeline such as google/ddpm-cifar10-32 saved locally), a
built-in name, or a Hub id with a revision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ddpm_cli.engine.checkpoint import load_scheduler_config, load_unet, resolve_model
from ddpm_cli.engine.denoiser import UNetDenoiser
from ddpm_cli.engine.device import resolve_device, resolve_dtype
from ddpm_cli.engine.errors import ModelError
from ddpm_cli.engine.schedule import NoiseSchedule

# The scheduler's variance_type names the DDPM variance the model was meant to be sampled with.
_VARIANCE_FROM_CONFIG = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
                         "fixed_large": "fixed_large", "fixed_large_log": "fixed_large"}


@dataclass
class Pipeline:
    """Everything a sampler needs from a checkpoint."""

    name: str
    folder: Path
    unet: torch.nn.Module
    schedule: NoiseSchedule
    variance: str
    device: torch.device
    dtype: torch.dtype

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, height, width)

    def denoiser(self) -> UNetDenoiser:
        return UNetDenoiser(self.unet, self.dtype)


def from_unet(unet: torch.nn.Module, schedule: NoiseSchedule, name: str = "in-memory",
              variance: str = "fixed_small") -> Pipeline:
    """Wrap a network already in memory (the training loop's EMA model, a test's model)."""
    parameter = next(unet.parameters())
    return Pipeline(name, Path("."), unet, schedule, variance, parameter.device, parameter.dtype)


def load_pipeline(model: str, revision: str | None = None, device: str = "auto", dtype: str = "auto",
                  allow_pickle: bool = False) -> Pipeline:
    """Resolve MODEL, check its weights, and load its U-Net and noise schedule."""
    folder = resolve_model(model, revision)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    unet = load_unet(folder, torch_device, torch_dtype, allow_pickle=allow_pickle)
    if type(unet).__name__ != "UNet2DModel":
        raise ModelError(f"{model} holds a {type(unet).__name__}; `ddpm sample` runs unconditional UNet2DModel checkpoints")
    if unet.config.out_channels != unet.config.in_channels:
        raise ModelError(f"{model}: a U-Net with {unet.config.out_channels} output channels for "
                         f"{unet.config.in_channels} input channels (learned variance) is not supported yet")
    config = load_scheduler_config(folder)
    variance = _VARIANCE_FROM_CONFIG.get(config.get("variance_type", "fixed_small"))
    if variance is None:
        raise ModelError(f"{model}: scheduler variance_type {config.get('variance_type')!r} is not supported yet")
    return Pipeline(model, folder, unet, NoiseSchedule.from_config(config), variance, torch_device, torch_dtype)
