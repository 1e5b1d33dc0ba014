"""Latent data for latent diffusion: encode an image set with a VAE (once, resumably, to a file
``ddpm encode`` writes, or in memory at the start of a run) and serve the latents as training data.

A run given a latents file trains on it as is; a run given images and ``--latent VAE`` encodes
them once before its first step, never every epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ddpm_cli.engine.io.latents import LatentsFile, is_latents_file, read_latents
from ddpm_cli.engine.models.vae import encode_images, latent_factor, load_autoencoder
from ddpm_cli.engine.errors import InputError
from ddpm_cli.data.sources import BUILTIN_DATASETS, ArrayImageSet, FileImageSet, FolderImageSet, ImageSet, open_dataset

__all__ = ["LatentSet", "encode_set", "flip_latents", "is_latents_file", "open_inputs", "open_latent_data"]


class LatentSet(ArrayImageSet):
    """Latents held in memory (float32 N×C×h×w), with the labels and captions of their images."""

    latent = True

    def __init__(self, data: LatentsFile, name: str, source: str):
        self.images, self.labels, self.class_names, self.captions = data.latents, data.labels, data.class_names, data.captions
        self.channels, self.name, self.source, self.vae_name = data.latents.shape[1], name, source, data.vae
        self.image_size = tuple(data.image_size)
        if data.latents.shape[-1] != data.latents.shape[-2]:
            raise InputError(f"{source}: latent training needs square images, these are "
                             f"{self.image_size[1]}x{self.image_size[0]}; encode with --resolution R")


def flip_latents(latents: list[torch.Tensor], random_flip: bool, generator: torch.Generator,
                 rows: slice = slice(None), total: int | None = None) -> torch.Tensor:
    """Stack a batch of latents, each flipped left-right with probability 1/2 when ``random_flip``;
    the flips of a global batch of ``total`` are drawn and ``rows`` kept, as in ``crop_and_flip``."""
    batch = torch.stack(latents).float()
    if not random_flip:
        return batch
    flips = torch.rand(len(latents) if total is None else total, generator=generator)[rows] < 0.5
    return torch.where(flips[:, None, None, None], batch.flip(-1), batch)


def image_batch(dataset: ImageSet, indices: list[int], resolution: int | None) -> torch.Tensor:
    """Items of an image set as a float batch in [-1, 1], center-cropped square to ``resolution``
    (the set has already scaled each shorter side to it); with None, every image must be the same size."""
    images = []
    for i in indices:
        image = dataset.load(i)
        if resolution is not None:
            h, w = image.shape[-2:]
            top, left = (h - resolution) // 2, (w - resolution) // 2
            image = image[..., top:top + resolution, left:left + resolution]
        images.append(image)
    sizes = {tuple(image.shape) for image in images}
    if len(sizes) > 1:
        raise InputError(f"the images differ in size ({', '.join('x'.join(map(str, s[1:])) for s in sorted(sizes))}); "
                         "pass --resolution R to resize and center-crop them to R×R")
    return torch.stack(images).float() / 127.5 - 1.0


def open_inputs(inputs: list[str], resolution: int | None, channels: int) -> tuple[ImageSet, list[str]]:
    """What `ddpm encode` reads: one built-in data set or folder (keeping its labels and captions), or
    any mix of image files and folders. Returns the set and a source name per item."""
    from ddpm_cli.engine.io.images import IMAGE_EXTENSIONS, list_images

    if len(inputs) == 1 and inputs[0] in BUILTIN_DATASETS:
        dataset = open_dataset(inputs[0], resolution or 32, channels)
        return dataset, [f"{inputs[0]}:{i}" for i in range(len(dataset))]
    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        dataset = FolderImageSet(inputs[0], resolution, channels)
        return dataset, [str(p.relative_to(Path(inputs[0]).expanduser())) for p in dataset.paths]
    paths = []
    for spec in inputs:
        path = Path(spec).expanduser()
        if spec in BUILTIN_DATASETS:
            raise InputError(f"the built-in data set {spec} is encoded on its own; pass it as the only input")
        if path.is_dir():
            paths += [Path(p) for p in list_images(path)]
        elif path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            paths.append(path)
        elif path.exists():
            raise InputError(f"{spec} is not an image ({' '.join(IMAGE_EXTENSIONS)}) or a folder of images")
        else:
            raise InputError(f"input not found: {spec}; pass image files, folders or a built-in data set "
                             f"({', '.join(BUILTIN_DATASETS)})")
    if not paths:
        raise InputError("no images found in the inputs; pass image files, folders or a built-in data set")
    return FileImageSet(paths, resolution, channels), [str(p) for p in paths]


def _fingerprint(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def encode_set(dataset: ImageSet, sources: list[str], vae, vae_name: str, resolution: int | None,
               batch_size: int = 16, tile: int | None = None, parts: Path | None = None,
               on_batch: Callable[[int, int], None] | None = None) -> LatentsFile:
    """Encode every item of ``dataset`` in batches.

    With ``parts`` (a folder), each finished batch is saved there first, and a rerun with the same
    inputs, VAE and settings skips the batches already saved (resumable on large inputs). The caller
    removes ``parts`` once the result is written. ``on_batch(done, total)`` reports progress.
    """
    n = len(dataset)
    plan = {"sources": sources, "vae": vae_name, "resolution": resolution, "batch_size": batch_size,
            "dtype": str(vae.dtype), "scaling_factor": vae.config.scaling_factor}
    if parts is not None:
        stamp = parts / "plan.txt"
        if parts.is_dir() and (not stamp.is_file() or stamp.read_text() != _fingerprint(plan)):
            shutil.rmtree(parts)  # left by a run with other inputs or settings: start over
        parts.mkdir(parents=True, exist_ok=True)
        stamp.write_text(_fingerprint(plan))
    from safetensors.torch import load_file, save_file

    chunks, size = [], None
    for start in range(0, n, batch_size):
        part = parts / f"part-{start // batch_size:06d}.safetensors" if parts is not None else None
        if part is not None and part.is_file():
            latents = load_file(part)["latents"]
        else:
            images = image_batch(dataset, list(range(start, min(n, start + batch_size))), resolution)
            if size is not None and images.shape[-2:] != size:
                raise InputError(f"the images differ in size ({size[1]}x{size[0]} and {images.shape[-1]}x"
                                 f"{images.shape[-2]}); pass --resolution R to resize and center-crop them to R×R")
            size = images.shape[-2:]
            latents = encode_images(vae, images, tile).cpu()
            if part is not None:
                tmp = part.with_name(f".{part.name}.tmp")
                save_file({"latents": latents.contiguous()}, tmp)
                os.replace(tmp, part)
        chunks.append(latents)
        if on_batch:
            on_batch(min(n, start + batch_size), n)
    latents = torch.cat(chunks)
    factor = latent_factor(vae)
    return LatentsFile(latents, vae_name, float(vae.config.scaling_factor), (latents.shape[-2] * factor, latents.shape[-1] * factor),
                       sources, float(getattr(vae.config, "shift_factor", None) or 0.0), dataset.labels,
                       dataset.class_names, dataset.captions)


def open_latent_data(config, device: torch.device, on_event: Callable[[dict], None]) -> tuple[LatentSet, torch.nn.Module]:
    """The latents a run trains on and the VAE (fp32) that decodes them; sets ``config.channels``
    and ``config.resolution`` to the images' (the U-Net's size is the latents')."""
    if is_latents_file(config.data):
        data = read_latents(config.data)
        vae_name = config.latent or data.vae
        vae = load_autoencoder(vae_name, device, torch.float32)
        if abs(float(vae.config.scaling_factor) - data.scaling_factor) > 1e-6 * max(1.0, data.scaling_factor):
            raise InputError(f"--latent {vae_name} has scaling factor {vae.config.scaling_factor}, but {config.data} was "
                             f"encoded with {data.scaling_factor} (by {data.vae}); pass the VAE that encoded it")
        name, source = Path(config.data).stem, str(config.data)
    else:
        if str(config.data).endswith(".safetensors"):
            raise InputError(f"latents file not found: {config.data}; run `ddpm encode` first or pass an image folder")
        vae_name = config.latent
        vae = load_autoencoder(vae_name, device, torch.float32)
        dataset = open_dataset(config.data, config.resolution, config.channels or vae.config.in_channels)
        if dataset.channels != vae.config.in_channels:
            raise InputError(f"{config.data} has {dataset.channels}-channel images; the VAE {vae_name} takes "
                             f"{vae.config.in_channels}")
        on_event({"kind": "encode", "done": 0, "total": len(dataset)})
        data = encode_set(dataset, [str(i) for i in range(len(dataset))], vae, vae_name, config.resolution, 64,
                          on_batch=lambda done, total: on_event({"kind": "encode", "done": done, "total": total}))
        name, source = dataset.name, dataset.source
    config.latent, config.channels, config.resolution = vae_name, vae.config.out_channels, int(data.image_size[-1])
    return LatentSet(data, name, source), vae
