"""Load the networks of a resolved, checked model folder: U-Nets, VAEs and the scheduler config."""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import Any

import torch

from ddpm_cli.engine.errors import ModelError, ResourceError
from ddpm_cli.engine.models import cache
from ddpm_cli.engine.models.resolve import read_json
from ddpm_cli.engine.models.safety import check_weights

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


def _unet_location(folder: Path) -> tuple[str | None, Path]:
    if (folder / "unet" / "config.json").is_file():
        return "unet", folder / "unet" / "config.json"
    if (folder / "unet").is_dir():
        raise ModelError(f"{folder / 'unet'} has no config.json; re-download or re-export the model")
    if (folder / "config.json").is_file():
        return None, folder / "config.json"
    raise ModelError(f"{folder} has neither unet/config.json nor config.json; pass a diffusers model folder")


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers logs advice (install accelerate, dtype notes) that is noise on a CLI's stderr."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def _from_pretrained(class_name: str, folder: str, subfolder: str | None, use_safetensors: bool | None, dtype: str):
    """A diffusers network from a local folder on the CPU (the cache's "diffusers" loader: JSON-able arguments)."""
    from ddpm_cli.engine.models.classes import model_class

    network = model_class(class_name)  # its own modules only, before _quiet_diffusers imports diffusers
    with _quiet_diffusers():
        return network.from_pretrained(
            folder, subfolder=subfolder, use_safetensors=use_safetensors, local_files_only=True,
            low_cpu_mem_usage=False, torch_dtype=getattr(torch, dtype.removeprefix("torch.")))


cache.register("diffusers", _from_pretrained)


def load_unet(folder: Path, device: torch.device | str, dtype: torch.dtype, allow_pickle: bool = False):
    """Load the UNet of a diffusers folder (checked first), in eval mode on device/dtype."""
    import safetensors

    folder = Path(folder)
    subfolder, config_path = _unet_location(folder)
    class_name = read_json(config_path).get("_class_name")
    if class_name not in UNET_CLASSES:
        raise ModelError(
            f"{config_path} describes a {class_name or 'model without _class_name'}, "
            f"but ddpm only loads {' or '.join(UNET_CLASSES)}; pass a pixel-space DDPM model"
        )
    check_weights(folder, allow_pickle=allow_pickle)
    loader_errors: tuple[type[BaseException], ...] = (
        OSError, ValueError, RuntimeError, KeyError, TypeError, EOFError,
        pickle.UnpicklingError, safetensors.SafetensorError,
    )
    try:
        model = cache.load("diffusers", cache.folder_of(folder, subfolder), class_name=class_name, folder=str(folder),
                           subfolder=subfolder, use_safetensors=None if allow_pickle else True, dtype=str(dtype))
    except torch.OutOfMemoryError:
        raise ResourceError(f"out of memory while loading the UNet from {folder}; free memory or use a smaller model") from None
    except loader_errors as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ModelError(f"{folder} could not be loaded ({reason}); re-download or re-export the model") from None
    try:
        with _quiet_diffusers():
            model = model.to(device=torch.device(device), dtype=dtype)
    except torch.OutOfMemoryError:
        raise ResourceError(
            f"out of memory moving the UNet from {folder} to {device}; use a smaller dtype, "
            "another device or --device cpu"
        ) from None
    model.eval()
    return model


def load_scheduler_config(folder: Path) -> dict[str, Any]:
    """scheduler/scheduler_config.json (or a top-level scheduler_config.json); {} if none."""
    folder = Path(folder)
    for path in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"):
        if path.is_file():
            return read_json(path)
    return {}


def load_vae(folder: Path, device: torch.device | str, dtype: torch.dtype, subfolder: str | None = "vae",
             kind: str = "AutoencoderKL"):
    """The autoencoder in ``folder/vae`` (or ``folder`` itself with ``subfolder=None``), in eval mode:
    an AutoencoderKL, or with ``kind="VQModel"`` the VQ autoencoder of an LDM pipeline (``vqvae/``).

    The caller has checked the weights (check_weights)."""
    folder = Path(folder)
    where = folder / subfolder if subfolder else folder
    class_name = read_json(where / "config.json").get("_class_name")
    if class_name != kind:
        raise ModelError(f"{where} holds a {class_name or 'model without _class_name'}; ddpm loads {kind} autoencoders there")
    try:
        vae = cache.load("diffusers", cache.folder_of(folder, subfolder), class_name=kind,
                         folder=str(folder), subfolder=subfolder, use_safetensors=True, dtype=str(dtype))
        with _quiet_diffusers():
            return vae.to(device=torch.device(device), dtype=dtype).eval()
    except torch.OutOfMemoryError:
        raise ResourceError(f"out of memory while loading the VAE from {where}") from None
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ModelError(f"{where} could not be loaded ({reason}); re-download or re-export the model") from None
