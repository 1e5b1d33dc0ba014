"""``ddpm train --init-from MODEL --lora-rank R``: train low-rank adapters (LoRA, Hu et al. 2021) on the
U-Net and nothing else, with peft, the library diffusers itself uses for LoRA.

peft wraps each targeted layer W as W x + (alpha / r) B A x, with A (r x in) random and B (out x r)
zero, so step 0 is the source model exactly; only A and B train. The run exports the adapters as
``pytorch_lora_weights.safetensors`` in diffusers' format (what its LoRA training scripts write, so
``pipeline.load_lora_weights(run)`` takes it) and ``ddpm_lora.json``, the pointer to the base model;
checkpoints hold the adapters only, so the run folder stays small.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ddpm_cli.engine.errors import ResourceError

LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_INFO_FILE = "ddpm_lora.json"
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
CONV = ["conv1", "conv2"]  # the residual blocks' two 3x3 convolutions


def lora_config(rank: int, alpha: float | None, targets: str):
    try:
        from peft import LoraConfig
    except ImportError:
        raise ResourceError("--lora-rank needs peft: pip install peft") from None
    modules = ATTENTION + (CONV if targets == "attention+conv" else [])
    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
                      target_modules=modules)


def add_adapters(model: torch.nn.Module, rank: int, alpha: float | None, targets: str) -> torch.nn.Module:
    """Freeze ``model`` and give its targeted layers trainable adapters (in place)."""
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    inject_adapter_in_model(lora_config(rank, alpha, targets), model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return model


def adapter_names(model: torch.nn.Module) -> set[str]:
    """The state-dict names of the adapters (what a LoRA checkpoint holds)."""
    return {name for name in model.state_dict() if "lora_" in name}


def diffusers_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters in peft's key layout (``<layer>.lora_A.weight``), which diffusers' loader takes as it
    is. (diffusers' older ``lora.down``/``lora.up`` layout, convert_state_dict_to_diffusers, renames the
    attention layers only: a file with convolution adapters would mix both layouts, and diffusers would
    then load the convolutions' adapters and silently drop the attention ones.)"""
    from peft.utils import get_peft_model_state_dict

    return {name: value.detach().float().cpu().contiguous() for name, value in get_peft_model_state_dict(model).items()}


def write_lora_file(model: torch.nn.Module, path: Path, rank: int, alpha: float | None, targets: str) -> None:
    """Write ``path`` with diffusers' own LoRA writer (keys ``unet.*``, the LoraConfig in its metadata)."""
    import tempfile

    from diffusers.loaders import StableDiffusionLoraLoaderMixin  # its LoRA file methods, without the pipeline

    metadata = lora_config(rank, alpha, targets).to_dict()
    metadata = {key: metadata[key] for key in ("r", "lora_alpha", "target_modules", "init_lora_weights", "use_dora",
                                               "lora_bias") if key in metadata}
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        StableDiffusionLoraLoaderMixin.save_lora_weights(tmp, unet_lora_layers=diffusers_state(model),
                                                  unet_lora_adapter_metadata=metadata)
        (Path(tmp) / LORA_FILE).rename(path)


def export_lora(run_dir: Path, model: torch.nn.Module, config, info: dict) -> None:
    """The run folder of a LoRA run: the adapters and the pointer to the base model."""
    from ddpm_cli.training.checkpoints import export_files
    from ddpm_cli.training.source import source_folder

    pointer = {"base_model": config.init_from, "revision": config.revision,
               "base_path": str(source_folder(config.init_from, config.revision).resolve()),
               "rank": config.lora_rank, "alpha": config.lora_alpha or config.lora_rank,
               "targets": config.lora_targets, **info}
    export_files(run_dir, {
        LORA_FILE: lambda path: write_lora_file(model, path, config.lora_rank, config.lora_alpha, config.lora_targets),
        LORA_INFO_FILE: lambda path: path.write_text(json.dumps(pointer, indent=2)),
    })
