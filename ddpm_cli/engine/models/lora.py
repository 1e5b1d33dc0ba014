"""LoRA files on a loaded U-Net (``--lora PATH[:SCALE]``, repeatable): diffusers' loader reads the file
(its own format, peft's, kohya's...) and injects the adapters with peft, as ``pipeline.load_lora_weights``
does; each adapter's scale is set as ``pipeline.set_adapters`` sets it.

Checked before anything is injected: the file is safetensors (a pickle is refused), holds LoRA weights,
and every adapter names a layer of this U-Net with the shapes that layer takes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ddpm_cli.engine.errors import InputError, ModelError

LORA_FILE = "pytorch_lora_weights.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class LoraSpec:
    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> LoraSpec:
        """PATH or PATH:SCALE; PATH is a .safetensors file or a folder holding pytorch_lora_weights.safetensors."""
        text, scale = str(spec), 1.0
        head, colon, tail = text.rpartition(":")
        if colon and head:
            try:
                scale = float(tail)
            except ValueError:
                raise InputError(f"--lora {spec}: the scale after ':' must be a number, e.g. {head}:0.8") from None
            text = head
        path = Path(text).expanduser()
        if path.is_dir():
            path = path / LORA_FILE
        return cls(path, scale)

    @property
    def label(self) -> str:
        return f"{self.path}:{self.scale:g}"


def check_file(spec: LoraSpec) -> None:
    """ModelError when the file is missing, a pickle or not a safetensors file."""
    from ddpm_cli.engine.models.safety import safetensors_damage

    path = spec.path
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(f"--lora {path}: a pickle file can run code when loaded and is refused; "
                         "use a .safetensors LoRA")
    if not path.is_file():
        raise ModelError(f"--lora {path}: no such file (pass a .safetensors file or a folder holding {LORA_FILE})")
    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"--lora {path}: not a .safetensors file")
    damaged = safetensors_damage(path)
    if damaged:
        raise ModelError(f"--lora {path} is damaged ({damaged})")


TEXT_ENCODER_PREFIXES = ("text_encoder", "lora_te")  # diffusers' and kohya's names for text-encoder adapters


def text_encoder_adapters(spec: LoraSpec) -> int:
    """How many of the file's tensors adapt a text encoder (not loaded: ddpm loads U-Net adapters)."""
    from ddpm_cli.engine.models.safety import safetensors_header

    return sum(key.startswith(TEXT_ENCODER_PREFIXES) for key in safetensors_header(spec.path))


def read_lora(spec: LoraSpec) -> tuple[dict, dict | None, dict | None]:
    """(state dict, network alphas, metadata) as diffusers' loader reads and converts the file."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin  # its LoRA file methods, without the pipeline

    check_file(spec)
    try:
        state, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(str(spec.path), return_lora_metadata=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"--lora {spec.path} is not a LoRA file diffusers can read ({str(exc).splitlines()[0][:200]})") from None
    if not state or not all("lora" in key for key in state):
        raise ModelError(f"--lora {spec.path} holds no LoRA weights (keys such as unet.*.lora.down.weight)")
    return state, alphas, metadata


def check_fits(unet: torch.nn.Module, state: dict, spec: LoraSpec) -> None:
    """ModelError naming the first adapter whose layer is not in this U-Net or whose shape differs."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    own = {key.removeprefix("unet."): value for key, value in state.items() if key.startswith("unet.")}
    if not own:
        raise ModelError(f"--lora {spec.path} has no adapters for a U-Net (its keys are not unet.*)")
    peft = convert_unet_state_dict_to_peft(own)
    modules = dict(unet.named_modules())
    for key, value in peft.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        name = key.split(".lora_")[0]
        layer = modules.get(name)
        if layer is None:
            raise ModelError(f"--lora {spec.path} is for another architecture: this U-Net has no layer {name}")
        weight = getattr(layer, "weight", None)
        if weight is None:
            raise ModelError(f"--lora {spec.path} adapts {name}, which has no weights here")
        # lora_A: (rank, in, ...); lora_B: (out, rank, ...)
        wanted, got = (weight.shape[1], value.shape[1]) if ".lora_A." in key else (weight.shape[0], value.shape[0])
        if wanted != got:
            raise ModelError(f"--lora {spec.path} is for another architecture: {name} takes {tuple(weight.shape)} "
                             f"here, the adapter has {tuple(value.shape)}")


def apply_loras(unet: torch.nn.Module, specs: list[LoraSpec]) -> None:
    """Inject every LoRA in ``specs`` into ``unet`` with its scale (all checked first)."""
    from diffusers.loaders.peft import PeftAdapterMixin

    read = [read_lora(spec) for spec in specs]
    for spec, (state, _, _) in zip(specs, read):
        check_fits(unet, state, spec)
    names = [f"lora{i}" for i in range(len(specs))]
    if not isinstance(unet, PeftAdapterMixin):
        # UNet2DModel lacks diffusers' adapter methods (UNet2DConditionModel has them): the same class with them.
        unet.__class__ = type(f"{type(unet).__name__}WithLoRA", (type(unet), PeftAdapterMixin), {})
    for name, (state, alphas, metadata) in zip(names, read):
        with warnings.catch_warnings():  # peft's multi-line notes on config/state differences (checked above)
            warnings.simplefilter("ignore", RuntimeWarning)
            unet.load_lora_adapter(state, prefix="unet", network_alphas=alphas, adapter_name=name, metadata=metadata)
    unet.set_adapters(names, [spec.scale for spec in specs])
