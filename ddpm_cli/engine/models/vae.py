"""Autoencoders for latent diffusion: find and load a VAE, encode images to scaled latents and
decode them back (tiled for large images, fp16 guarded). The latents file ``ddpm encode`` writes is
``io/latents.py``.

A VAE is the ``vae/`` of a Stable Diffusion-format folder, a standalone AutoencoderKL folder
(config.json + weights), a run of ``ddpm train --task autoencoder``, or a Hub id of either.
Latents are ``(mean - shift_factor) * scaling_factor`` of the encoder's distribution, as
diffusers pipelines use them, so a latent model's noise schedule sees unit-scale data.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from ddpm_cli.engine.models.load import load_vae
from ddpm_cli.engine.models.resolve import locate
from ddpm_cli.engine.models.safety import check_weights
from ddpm_cli.engine.errors import InputError, ModelError, ResourceError

DEFAULT_TILE = 512  # pixels: larger images are encoded and decoded in overlapping tiles
_VAE_HUB_FILES = ["config.json", "diffusion_pytorch_model.safetensors", "model_index.json",
                  "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]


def locate_autoencoder(spec: str, revision: str | None = None) -> tuple[Path, str | None]:
    """VAE spec -> (folder, subfolder): ``vae`` inside a pipeline or run folder, or None for a standalone VAE."""
    folder = locate(spec, revision, what="VAE", hub_files=_VAE_HUB_FILES)
    if (folder / "vae" / "config.json").is_file():
        return folder, "vae"
    if (folder / "config.json").is_file():
        return folder, None
    raise ModelError(f"{folder} holds no VAE (neither vae/config.json nor an AutoencoderKL config.json); "
                     "pass a Stable Diffusion-format folder, a `ddpm train --task autoencoder` run or a VAE folder")


def load_autoencoder(spec: str, device: torch.device | str, dtype: torch.dtype, revision: str | None = None,
                     allow_pickle: bool = False):
    """Resolve and check a VAE spec, then load its AutoencoderKL (eval mode) on device/dtype."""
    folder, subfolder = locate_autoencoder(spec, revision)
    check_weights(folder / subfolder if subfolder else folder, allow_pickle=allow_pickle)
    return load_vae(folder, device, dtype, subfolder)


def latent_factor(vae) -> int:
    """Pixels per latent along a side."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _shift(vae) -> float:
    return float(getattr(vae.config, "shift_factor", None) or 0.0)


@contextlib.contextmanager
def _tiling(vae, tile: int | None):
    """diffusers' own tiled encode/decode (overlapping tiles, blended seams) above ``tile`` pixels."""
    saved = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size)
    if tile:
        if tile % latent_factor(vae) or tile < 2 * latent_factor(vae):
            raise InputError(f"--tile {tile} must be a multiple of the VAE's factor {latent_factor(vae)} "
                             f"and at least {2 * latent_factor(vae)}")
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = True, tile, tile // latent_factor(vae)
    try:
        yield
    finally:
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = saved


def _fp32_copy(vae):
    """A float32 copy of a half-precision VAE, made once and kept on it."""
    if getattr(vae, "_ddpm_fp32", None) is None:
        vae._ddpm_fp32 = copy.deepcopy(vae).float()
    return vae._ddpm_fp32


def _guarded(vae, run, x: torch.Tensor) -> torch.Tensor:
    """run(vae, x) in the VAE's dtype; a non-finite result in fp16/bf16 is redone in fp32."""
    try:
        with torch.no_grad():
            out = run(vae, x.to(vae.dtype)).float()
            if vae.dtype != torch.float32 and not torch.isfinite(out).all():
                out = run(_fp32_copy(vae), x.float()).float()
    except torch.OutOfMemoryError:
        raise ResourceError(f"out of memory in the VAE for a batch of {x.shape[0]} at {x.shape[-2]}x{x.shape[-1]}; "
                            "lower --batch-size or --tile") from None
    return out


def encode_images(vae, images: torch.Tensor, tile: int | None = DEFAULT_TILE) -> torch.Tensor:
    """Images in [-1, 1] (B×C×H×W) -> latents ``(mean - shift) * scaling_factor`` (float32)."""
    factor = latent_factor(vae)
    if images.shape[-1] % factor or images.shape[-2] % factor:
        raise InputError(f"image size {images.shape[-1]}x{images.shape[-2]} is not a multiple of the VAE's "
                         f"factor {factor}; pass --resolution")

    def run(model, x):
        with _tiling(model, tile):
            return model.encode(x).latent_dist.mean

    return (_guarded(vae, run, images.to(vae.device)) - _shift(vae)) * vae.config.scaling_factor


def is_vq(vae) -> bool:
    """An LDM VQ autoencoder (VQModel): its latents are used unscaled and quantised when decoded."""
    return type(vae).__name__ == "VQModel"


def decode_latents(vae, latents: torch.Tensor, tile: int | None = DEFAULT_TILE) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1]-ish (float32, not clamped). A VQModel decodes its latents
    as they are (quantised to its codebook first, as diffusers' LDM pipelines do), untiled."""
    if is_vq(vae):
        return _guarded(vae, lambda model, z: model.decode(z).sample, latents.float().to(vae.device))

    def run(model, z):
        with _tiling(model, tile):
            return model.decode(z).sample

    z = latents.float() / vae.config.scaling_factor + _shift(vae)
    return _guarded(vae, run, z.to(vae.device))
