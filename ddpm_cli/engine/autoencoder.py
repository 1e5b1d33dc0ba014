"""Autoencoders for latent diffusion: find and load a VAE, encode images to scaled latents and
decode them back (tiled for large images, fp16 guarded), and the latents file ``ddpm encode`` writes.

A VAE is the ``vae/`` of a Stable Diffusion-format folder, a standalone AutoencoderKL folder
(config.json + weights), a run of ``ddpm train --task autoencoder``, or a Hub id of either.
Latents are ``(mean - shift_factor) * scaling_factor`` of the encoder's distribution, as
diffusers pipelines use them, so a latent model's noise schedule sees unit-scale data.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ddpm_cli.engine import checkpoint as ckpt
from ddpm_cli.engine.atomic import atomic_output
from ddpm_cli.engine.errors import InputError, ModelError, ResourceError

LATENTS_FORMAT = "ddpm-latents/1"
DEFAULT_TILE = 512  # pixels: larger images are encoded and decoded in overlapping tiles
_VAE_HUB_FILES = ["config.json", "diffusion_pytorch_model.safetensors", "model_index.json",
                  "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]


def locate_autoencoder(spec: str, revision: str | None = None) -> tuple[Path, str | None]:
    """VAE spec -> (folder, subfolder): ``vae`` inside a pipeline or run folder, or None for a standalone VAE."""
    text = str(spec).strip()
    local = Path(text).expanduser()
    if not text:
        raise ModelError("no VAE was given; pass a folder (a pipeline's, a run's or a standalone VAE) or a Hub id")
    if local.is_dir():
        folder = local
    elif local.exists():
        raise ModelError(f"{local} is a file, not a VAE folder; pass the folder that holds config.json or vae/")
    elif text in ckpt.builtin_models():
        folder = Path(ckpt.BUILTIN_DIR) / text
    elif ckpt.is_hub_id(text):
        folder = ckpt.hub_snapshot(text, revision, _VAE_HUB_FILES)
    else:
        raise ModelError(f"VAE {text!r} is not an existing folder or a Hub id (owner/name); pass one of those")
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
    ckpt.check_weights(folder / subfolder if subfolder else folder, allow_pickle=allow_pickle)
    return ckpt.load_vae(folder, device, dtype, subfolder)


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


# --------------------------------------------------------------------------- the latents file

@dataclass
class LatentsFile:
    """Latents N×C×h×w (float32) and what made them: the VAE, its scaling, the images' size and
    sources, and the labels or captions the images had (for conditional latent training)."""

    latents: torch.Tensor
    vae: str
    scaling_factor: float
    image_size: tuple[int, int]
    sources: list[str]
    shift_factor: float = 0.0
    labels: list[int] | None = None
    class_names: list[str] | None = None
    captions: list[str] | None = None

    def metadata(self) -> dict[str, str]:
        fields = {"format": LATENTS_FORMAT, "vae": self.vae, "scaling_factor": self.scaling_factor,
                  "shift_factor": self.shift_factor, "image_size": list(self.image_size), "sources": self.sources,
                  "labels": self.labels, "class_names": self.class_names, "captions": self.captions}
        return {key: json.dumps(value) for key, value in fields.items()}


def save_latents(path: str | os.PathLike, data: LatentsFile, dtype: torch.dtype = torch.float32,
                 overwrite: bool = True) -> None:
    """Write atomically (see ``atomic.atomic_output``) as safetensors with JSON metadata; without
    ``overwrite`` an existing file is never replaced."""
    from safetensors.torch import save_file

    with atomic_output(path, overwrite) as tmp:
        save_file({"latents": data.latents.to(dtype).contiguous().cpu()}, tmp, metadata=data.metadata())


def is_latents_file(path: str | os.PathLike) -> bool:
    return str(path).endswith(".safetensors") and Path(path).is_file()


def read_latents(path: str | os.PathLike) -> LatentsFile:
    """Read a file written by :func:`save_latents`; a wrong or damaged file is an InputError."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != json.dumps(LATENTS_FORMAT) or "latents" not in f.keys():
                raise InputError(f"{path} is not a latents file written by `ddpm encode`")
            latents = f.get_tensor("latents").float()
    except (OSError, SafetensorError) as exc:
        raise InputError(f"cannot read latents file {path} ({exc}); rerun `ddpm encode`") from None
    fields = {key: json.loads(value) for key, value in meta.items() if key != "format"}
    if latents.dim() != 4 or len(fields.get("sources") or []) != latents.shape[0]:
        raise InputError(f"{path}: latents of shape {tuple(latents.shape)} do not match its metadata; rerun `ddpm encode`")
    return LatentsFile(latents, fields["vae"], float(fields["scaling_factor"]), tuple(fields["image_size"]),
                       fields["sources"], float(fields.get("shift_factor") or 0.0), fields.get("labels"),
                       fields.get("class_names"), fields.get("captions"))
