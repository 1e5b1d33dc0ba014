"""The latents file ``ddpm encode`` writes: safetensors holding the latents, with JSON metadata
naming the VAE, its scaling, the images' size and sources, and their labels or captions."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ddpm_cli.engine.errors import InputError
from ddpm_cli.engine.io.atomic import atomic_output

LATENTS_FORMAT = "ddpm-latents/1"


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
