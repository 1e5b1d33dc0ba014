"""``ddpm train --init-from MODEL``: start a run from a trained model's weights rather than random ones
(fine-tuning). The run's network options must build the same network as the model's: every weight
name and shape is checked before any is copied."""

from __future__ import annotations

from pathlib import Path

import torch

from ddpm_cli.engine.errors import InputError, ModelError

# Where a model folder keeps the weights of each task's network.
COMPONENT = {"ddpm": "unet", "superres": "unet", "autoencoder": "vae"}


def initial_weights(spec: str, task: str, revision: str | None = None) -> tuple[Path, dict[str, torch.Tensor]]:
    """(weights file, tensors) of the network ``task`` trains, from a run folder, built-in or Hub id."""
    from safetensors.torch import load_file

    from ddpm_cli.engine.models.safety import check_weights, safetensors_damage
    from ddpm_cli.training.source import source_folder

    root = source_folder(spec, revision)
    folder = root / COMPONENT[task] if (root / COMPONENT[task]).is_dir() else root
    check_weights(folder)
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if "ema" not in f.name] or files
    if not files:
        raise ModelError(f"--init-from {spec}: {folder} holds no safetensors weights")
    path = files[0]
    damaged = safetensors_damage(path)
    if damaged:
        raise ModelError(f"--init-from {spec}: {path} is damaged ({damaged})")
    return path, load_file(str(path))


def load_initial_weights(model: torch.nn.Module, spec: str, task: str, revision: str | None = None) -> Path:
    """Copy ``spec``'s weights into ``model`` (cast to its dtype); InputError naming the first weight whose
    name or shape differs, before anything is copied. Returns the weights file used."""
    path, tensors = initial_weights(spec, task, revision)
    own = model.state_dict()
    missing = [name for name in own if name not in tensors]
    extra = [name for name in tensors if name not in own]
    shapes = [name for name in own if name in tensors and tuple(tensors[name].shape) != tuple(own[name].shape)]
    if missing or extra or shapes:
        if shapes:
            name = shapes[0]
            what = f"{name} is {tuple(tensors[name].shape)} there, {tuple(own[name].shape)} here"
        else:
            what = f"{(missing or extra)[0]} is {'missing there' if missing else 'not in this network'}"
        raise InputError(f"--init-from {spec}: its network differs from the one these options build ({what}); "
                         "give the options it was trained with (--model-size, --resolution, --channels, "
                         "--conditioning, --text-encoder, --text-embedding)")
    with torch.no_grad():
        for name, value in own.items():
            value.copy_(tensors[name].to(dtype=value.dtype))
    return path
