"""Image-to-image (SDEdit, Meng et al. 2021): start the reverse process from a noised image.

The image x_0 is taken to the forward-process sample q(x_t0 | x_0) = sqrt(abar_t0) x_0 +
sqrt(1 - abar_t0) eps at the timestep t0 where the last int(strength * steps) sampler steps begin,
and those steps denoise it (diffusers' img2img convention: ``timesteps[len - k:]``). eps is the
first draw of each image's seeded generator, which then goes on to give the sampler's step noise,
in the order diffusers draws from a generator list. Latent models encode the image to the mean of
their VAE's posterior (as inpainting does), so a seed gives one image on every run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ddpm_cli.engine.errors import InputError

DEFAULT_STRENGTH = 0.8


def check_strength(strength: float) -> float:
    if not 0.0 < strength <= 1.0:
        raise InputError(f"--strength must be in (0, 1] (the share of the sampler's steps that run), got {strength}")
    return strength


def start_timesteps(timesteps: list[int], strength: float) -> list[int]:
    """The tail of ``timesteps`` an img2img run takes: its last int(strength * len) steps."""
    check_strength(strength)
    k = min(int(strength * len(timesteps)), len(timesteps))
    if k == 0:
        raise InputError(f"--strength {strength} of {len(timesteps)} steps runs no step; raise --strength or --steps "
                         f"(at least {1 / len(timesteps):.3g})")
    return timesteps[len(timesteps) - k:]


def noised(schedule, init: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    """q(x_t | x_0 = init) with the standard normal ``eps``: sqrt(abar_t) init + sqrt(1 - abar_t) eps."""
    alpha_bar = schedule.alpha_bar(t)
    return alpha_bar**0.5 * init.to(eps.device, eps.dtype) + (1.0 - alpha_bar) ** 0.5 * eps


@dataclass(frozen=True)
class InitImage:
    """An init image as read: the path as given, its bytes' SHA-256, and the decoded image (PIL)."""

    path: Path
    sha256: str
    image: object

    def metadata(self) -> dict:
        return {"init_image": str(self.path), "init_image_sha256": self.sha256}

    def pixels(self, size: tuple[int, int], channels: int, resize: bool = False) -> torch.Tensor:
        """C×H×W in [-1, 1] at ``size`` (height, width): another size is refused unless ``resize``
        (Lanczos); greyscale for one-channel models."""
        from PIL import Image

        from ddpm_cli.engine.io.images import pil_to_tensor

        image = self.image.convert("L") if channels == 1 else self.image
        height, width = size
        if (image.height, image.width) != (height, width):
            if not resize:
                raise InputError(f"--init-image {self.path} is {image.width}x{image.height} but the images are "
                                 f"{width}x{height}; pass --resize to resize it")
            image = image.resize((width, height), Image.LANCZOS)
        return pil_to_tensor(image)


def init_image_paths(spec: str | Path) -> list[Path]:
    """--init-image IMG|DIR: the file, or every image in the folder (recursive, sorted)."""
    from ddpm_cli.engine.io.images import list_images

    path = Path(spec)
    if path.is_dir():
        found = list_images(path)
        if not found:
            raise InputError(f"--init-image {spec}: the folder holds no image (.png, .jpg, .jpeg, .webp, .bmp)")
        return found
    if not path.is_file():
        raise InputError(f"--init-image {spec}: no such file or folder")
    return [path]


def read_init_image(path: Path) -> InitImage:
    """Read and decode an init image (RGB), with its SHA-256; an unreadable file is an InputError."""
    from ddpm_cli.engine.io.images import load_image

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read --init-image {path} ({exc.strerror or exc})") from None
    return InitImage(path, hashlib.sha256(data).hexdigest(), load_image(path, mode="RGB"))


def to_model_space(pipeline, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (C×H×W in [-1, 1]) -> what the sampler works on: the image itself, or the mean of the
    VAE's posterior for latent models (1×C'×h×w, on the pipeline's device)."""
    from ddpm_cli.engine.models.vae import encode_images

    x = pixels[None].to(pipeline.device)
    return x if pipeline.vae is None else encode_images(pipeline.vae, x).to(pipeline.device)
