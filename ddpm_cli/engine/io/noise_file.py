"""The noise file ``ddpm invert`` writes and ``--init-noise`` reads: safetensors holding ``noise``
(N×C×H×W float32, x_T in the model's space, one row per image) with JSON metadata naming the
model, the DDIM steps and spacing, the refinement, the condition, and each image with its SHA-256."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ddpm_cli.engine.errors import InputError
from ddpm_cli.engine.io.atomic import atomic_output

NOISE_FORMAT = "ddpm-noise/1"


@dataclass
class NoiseFile:
    """x_T rows and what made them. ``model`` is MODEL as given, ``model_folder`` where it resolved."""

    noise: torch.Tensor
    model: str
    model_folder: str = ""
    images: list[str] = field(default_factory=list)
    image_sha256: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # sampler, steps, spacing, refine, condition and cfg

    def metadata(self) -> dict[str, str]:
        fields = {"format": NOISE_FORMAT, "model": self.model, "model_folder": self.model_folder,
                  "shape": list(self.noise.shape), "images": self.images, "image_sha256": self.image_sha256,
                  "settings": self.settings}
        return {key: json.dumps(value) for key, value in fields.items()}


def save_noise(path: str | os.PathLike, data: NoiseFile, overwrite: bool = False) -> None:
    """Write atomically (``atomic.atomic_output``); without ``overwrite`` never replace a file."""
    from safetensors.torch import save_file

    with atomic_output(path, overwrite) as tmp:
        save_file({"noise": data.noise.float().contiguous().cpu()}, tmp, metadata=data.metadata())


def read_noise(path: str | os.PathLike) -> NoiseFile:
    """Read a file written by :func:`save_noise`; a missing, unreadable or foreign file is an InputError."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--init-noise {path}: no such file; make one with `ddpm invert`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != json.dumps(NOISE_FORMAT) or "noise" not in f.keys():
                raise InputError(f"--init-noise {path} is not a noise file written by `ddpm invert`")
            noise = f.get_tensor("noise").float()
        fields = {key: json.loads(value) for key, value in meta.items() if key != "format"}
    except (OSError, SafetensorError, ValueError) as exc:
        raise InputError(f"--init-noise {path}: cannot read it ({exc}); rerun `ddpm invert`") from None
    if noise.dim() != 4 or list(noise.shape) != fields.get("shape") or not torch.isfinite(noise).all():
        raise InputError(f"--init-noise {path}: noise of shape {tuple(noise.shape)} does not match its metadata "
                         "or is not finite; rerun `ddpm invert`")
    return NoiseFile(noise, str(fields.get("model", "")), str(fields.get("model_folder", "")),
                     list(fields.get("images") or []), list(fields.get("image_sha256") or []),
                     dict(fields.get("settings") or {}))
