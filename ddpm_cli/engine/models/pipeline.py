"""A loaded model ready to sample: network, noise schedule, sample shape, device and dtype.

``load_pipeline`` accepts what ``ddpm sample MODEL`` accepts: a local diffusers folder (the
project's training runs, or a DDPMPipeline such as google/ddpm-cifar10-32 saved locally), a
built-in name, or a Hub id with a revision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ddpm_cli.engine.runtime.acceleration import prepare_module, unet_forward
from ddpm_cli.engine.models.vae import decode_latents, latent_factor
from ddpm_cli.engine.choices import LEARNED_VARIANCES
from ddpm_cli.engine.models.load import load_scheduler_config, load_unet, load_vae
from ddpm_cli.engine.models.resolve import MODEL_INFO_FILE, read_json, resolve_model
from ddpm_cli.engine.diffusion.denoiser import UNetDenoiser
from ddpm_cli.engine.diffusion.edm import EDMDenoiser, EDMSchedule, schedule_from_config
from ddpm_cli.engine.runtime.device import resolve_device, resolve_dtype
from ddpm_cli.engine.errors import InputError, ModelError
from ddpm_cli.engine.diffusion.schedule import NoiseSchedule


# What each kind of model makes, and the command that runs it.
KINDS = {"image": ("an image model", "`ddpm sample {name}`"),
         "upscale": ("a super-resolution model", "`ddpm upscale {name} IMAGE`"),
         "inpaint": ("an inpainting model", "`ddpm inpaint {name} --image --mask`")}

# The scheduler's variance_type names the DDPM variance the model was meant to be sampled with.
_VARIANCE_FROM_CONFIG = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
                         "fixed_large": "fixed_large", "fixed_large_log": "fixed_large",
                         "learned_range": "learned_range", "learned": "learned"}


@dataclass(frozen=True)
class Condition:
    """What to generate: a class (index, or one per image) or a prompt with its negative prompt. A class
    model's unconditional branch is the null class, or ``negative_class_label`` to steer away from."""

    class_label: int | list[int] | None = None
    prompt: str | list[str] | None = None  # one prompt for the batch, or one per image
    negative_prompt: str = ""
    negative_class_label: int | None = None


def text_kwargs(hidden: torch.Tensor, mask: torch.Tensor | None, batch: int, dtype: torch.dtype) -> dict:
    """U-Net keyword tensors for text embeddings (1 or batch rows), broadcast to the batch. CLIP
    encoders pass no mask: Stable Diffusion's U-Nets were trained attending to the padding too."""
    kwargs = {"encoder_hidden_states": hidden.to(dtype).expand(batch, -1, -1)}
    if mask is not None:
        kwargs["encoder_attention_mask"] = mask.expand(batch, -1)
    return kwargs


def _canonical(name: str) -> str:
    """Class names compare without case, spaces or punctuation: "T-shirt/top" ~ "tshirt"."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


@dataclass
class Pipeline:
    """Everything a sampler needs from a checkpoint.

    ``kind`` is what the network does: "image" (x_t alone in: unconditional, class- or
    text-conditional generation), "upscale" (x_t and a low-resolution image in; ``scale`` is its
    factor) or "inpaint" (a Stable Diffusion inpainting U-Net: latents, the mask, the masked
    image's latents). The image inputs ride along as extra channels (``wrappers.with_channels``).
    """

    name: str
    folder: Path
    unet: torch.nn.Module
    schedule: NoiseSchedule
    variance: str
    device: torch.device
    dtype: torch.dtype
    class_names: list[str] | None = field(default=None)
    text_encoder: object | None = field(default=None)  # engine.text.TextEncoder for text models
    vae: torch.nn.Module | None = field(default=None)  # AutoencoderKL of a latent model (VQModel: LDM upscalers)
    kind: str = field(default="image")  # one of KINDS
    scale: int | None = field(default=None)  # an upscale model's factor
    low_res_schedule: NoiseSchedule | None = field(default=None)  # Stable Diffusion upscalers: noise added to the input
    max_noise_level: int | None = field(default=None)
    info: dict = field(default_factory=dict)  # ddpm_model.json: what the project recorded with the model
    forward: Callable | None = field(default=None)  # the U-Net call samplers use (acceleration.unet_forward)
    prompt_encoder: object | None = field(default=None)  # a class model's prompt prior (captions.class_captions)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown pipeline kind {self.kind!r}; one of {', '.join(KINDS)}")
        if (self.kind == "upscale") != bool(self.scale):
            raise ValueError("an upscale pipeline has a scale factor, and only it")

    @property
    def upscale(self) -> int | None:
        """The factor of an upscale model; None for other kinds."""
        return self.scale if self.kind == "upscale" else None

    def require(self, *kinds: str) -> None:
        """Refuse, in one line naming the command for this model, a task for other kinds of model."""
        if self.kind in kinds:
            return
        what, command = KINDS[self.kind]
        wanted = " or ".join(KINDS[kind][0] for kind in kinds)
        raise InputError(f"{self.name} is {what}, not {wanted}; use {command.format(name=self.name)}")

    def accelerate(self, compile: bool = False, graphs: bool | None = None) -> Pipeline:
        """The chosen memory layout, optionally torch.compile, and CUDA graphs on CUDA unless graphs=False."""
        prepare_module(self.unet)
        self.forward = unet_forward(self.unet, compile, graphs)
        return self

    @property
    def latent_factor(self) -> int:
        """Pixels per latent along a side (1 for pixel-space models)."""
        return latent_factor(self.vae) if self.vae is not None else 1

    @property
    def upscaler(self) -> str | None:
        """The super-resolution format: "sr3" (pixel space, `ddpm train --task superres`), "sd" (Stable
        Diffusion upscaler: noised input, prompt), "ldm" (LDM: VQ latents), or None for other models."""
        if self.kind != "upscale":
            return None
        if self.low_res_schedule is not None:
            return "sd"
        return "ldm" if self.vae is not None else "sr3"

    @property
    def unet_factor(self) -> int:
        """The U-Net's downsampling along a side: its input's sides must be multiples of this."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the images the model makes by default."""
        _, height, width = self.sample_shape
        return height * self.latent_factor, width * self.latent_factor

    @property
    def image_channels(self) -> int:
        return self.vae.config.out_channels if self.vae is not None else self.sample_shape[0]

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (scaled by the VAE's scaling factor) to images in [-1, 1]; pixels pass through."""
        return x if self.vae is None else decode_latents(self.vae, x)

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional model (its embedding has one more row: the null class)."""
        embeds = getattr(self.unet.config, "num_class_embeds", None)
        return embeds - 1 if embeds else 0

    def class_index(self, spec: str | int) -> int:
        """A class given by index ("7") or by name ("sneaker", "Ankle boot", "ankle-boot")."""
        if not self.num_classes:
            raise InputError(f"{self.name} is not class-conditional; drop --class")
        names = self.class_names or [str(k) for k in range(self.num_classes)]
        text = str(spec).strip()
        if text.isdigit() and int(text) < self.num_classes:
            return int(text)
        matches = [k for k, name in enumerate(names)
                   if _canonical(text) in (_canonical(name), _canonical(name.split("/")[0]))]
        if len(matches) != 1:
            raise InputError(f"unknown --class {text!r} for {self.name}; choose an index 0-{self.num_classes - 1} "
                             f"or one of: {', '.join(names)}")
        return matches[0]

    def class_name(self, index: int) -> str:
        return self.class_names[index] if self.class_names else str(index)

    @property
    def class_list(self) -> list[str]:
        """Every class's name, in index order ("0", "1", ... for a model without names)."""
        return [self.class_name(k) for k in range(self.num_classes)]

    @property
    def class_prompted(self) -> bool:
        """A class model without a text encoder: txt2img gives each prompt its nearest class (engine.models.captions)."""
        return self.text_encoder is None and self.num_classes > 0

    def conditioning(self, batch: int, condition: Condition | None) -> tuple[dict, dict | None]:
        """(cond, uncond) keyword tensors for the U-Net; uncond is None where nothing conditions.

        Class models: one class for the batch, one per image, or the null class. Text models: the
        prompt's embedding, and the negative prompt's (default "") for the unconditional branch.
        """
        condition = condition or Condition()
        if self.text_encoder is not None:
            if condition.prompt is None:
                raise InputError(f"{self.name} is text-conditional; use `ddpm txt2img PROMPT -m {self.name}`")
            prompts = [condition.prompt] if isinstance(condition.prompt, str) else list(condition.prompt)
            hidden, mask = self.text_encoder.encode([*prompts, condition.negative_prompt])
            masks = (None, None) if self.text_encoder.kind == "clip" else (mask[:-1], mask[-1:])
            return (text_kwargs(hidden[:-1], masks[0], batch, self.dtype),
                    text_kwargs(hidden[-1:], masks[1], batch, self.dtype))
        if condition.prompt is not None:
            raise InputError(f"{self.name} is not text-conditional; a prompt needs a text-conditional model")
        if not self.num_classes:
            if condition.class_label is not None:
                raise InputError(f"{self.name} is not class-conditional; drop --class")
            return {}, None
        null = torch.full((batch,), self.num_classes, device=self.device, dtype=torch.long)
        label = condition.class_label
        if label is None:
            return {"class_labels": null}, None
        labels = label if isinstance(label, list) else [label] * batch
        negative = condition.negative_class_label
        uncond = null if negative is None else torch.full((batch,), negative, device=self.device, dtype=torch.long)
        return {"class_labels": torch.tensor(labels, device=self.device, dtype=torch.long)}, {"class_labels": uncond}

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        channels = self.unet.config.in_channels if self.kind == "image" else self.unet.config.out_channels
        return (channels, height, width)

    def denoiser(self, batch: int = 1, condition: Condition | None = None, scale: float = 1.0,
                 rescale: float = 0.0) -> UNetDenoiser:
        """The network as samplers call it, guided with ``scale`` (rescaled by ``rescale``, phi) towards ``condition``."""
        cond, uncond = self.conditioning(batch, condition)
        if isinstance(self.schedule, EDMSchedule):  # D(x; sigma) as the eps of its schedule (engine/diffusion/edm.py)
            return EDMDenoiser(self.schedule, self.unet, self.dtype, cond, uncond, scale, self.forward, rescale)
        return UNetDenoiser(self.unet, self.dtype, cond, uncond, scale, self.forward, rescale)


def from_unet(unet: torch.nn.Module, schedule: NoiseSchedule, name: str = "in-memory", variance: str = "fixed_small",
              class_names: list[str] | None = None, text_encoder: object | None = None,
              vae: torch.nn.Module | None = None, upscale: int | None = None) -> Pipeline:
    """Wrap a network already in memory (the training loop's EMA model, a test's model)."""
    parameter = next(unet.parameters())
    return Pipeline(name, Path("."), unet, schedule, variance, parameter.device, parameter.dtype, class_names,
                    text_encoder, vae, "upscale" if upscale else "image", upscale)


def load_pipeline(model: str, revision: str | None = None, device: str = "auto", dtype: str = "auto",
                  allow_pickle: bool = False, compile: bool = False, loras: list | None = None) -> Pipeline:
    """Resolve MODEL, check its weights, and load its U-Net (with ``loras``, engine.models.lora.LoraSpec, on
    it) and noise schedule, accelerated (CUDA graphs on CUDA, torch.compile when ``compile``; see
    ``acceleration``)."""
    folder = resolve_model(model, revision)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    unet = load_unet(folder, torch_device, torch_dtype, allow_pickle=allow_pickle)
    if loras:
        from ddpm_cli.engine.models.lora import apply_loras

        apply_loras(unet, loras)
    vae = load_vae(folder, torch_device, torch_dtype) if (folder / "vae").is_dir() else None
    info = read_json(folder / MODEL_INFO_FILE) if (folder / MODEL_INFO_FILE).is_file() else {}
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    upscale, low_res_schedule, expected_in = None, None, unet.config.out_channels
    if info.get("task") == "superres":  # SR3: x_t and the upsampled image
        upscale, expected_in = int(info["scale"]), 2 * unet.config.out_channels
    elif index.get("_class_name") == "LDMSuperResolutionPipeline" and (folder / "vqvae").is_dir():
        # VQ latents and the low-resolution image, at the low resolution; the VQ decoder enlarges them
        vae = load_vae(folder, torch_device, torch_dtype, "vqvae", kind="VQModel")
        upscale, expected_in = latent_factor(vae), unet.config.out_channels + vae.config.in_channels
    elif index.get("_class_name") == "StableDiffusionUpscalePipeline" and vae is not None:
        # latents and the noised low-resolution image, at the low resolution; the VAE decodes them larger
        upscale, expected_in = latent_factor(vae), unet.config.out_channels + vae.config.in_channels
        low_res_schedule = NoiseSchedule.from_config(read_json(folder / "low_res_scheduler" / "scheduler_config.json"))
    inpainting = (upscale is None and vae is not None
                  and unet.config.in_channels == 2 * unet.config.out_channels + 1)
    if inpainting:  # Stable Diffusion inpainting: latents, the mask and the masked image's latents
        expected_in = unet.config.in_channels
    config = load_scheduler_config(folder)
    variance = _VARIANCE_FROM_CONFIG.get(config.get("variance_type") or "fixed_small")
    if variance is None:
        raise ModelError(f"{model}: scheduler variance_type {config.get('variance_type')!r} is not supported yet")
    if variance in LEARNED_VARIANCES and upscale is None:  # the U-Net outputs the mean's and the variance's channels
        expected_in = unet.config.out_channels // 2
    if unet.config.in_channels != expected_in:
        raise ModelError(f"{model}: a U-Net with {unet.config.out_channels} output channels for "
                         f"{unet.config.in_channels} input channels does not fit its scheduler "
                         f"(variance_type {config.get('variance_type') or 'fixed_small'})")
    text_encoder = None
    if type(unet).__name__ == "UNet2DConditionModel":
        from ddpm_cli.engine.models.text import TextEncoder

        spec = info.get("text_encoder") or str(folder)  # a project run names its encoder; else text_encoder/ inside
        text_encoder = TextEncoder.load(spec, torch_device, max_length=info.get("max_length"),
                                        embedding=info.get("text_embedding") or "tokens")
    kind = "upscale" if upscale else "inpaint" if inpainting else "image"
    pipeline = Pipeline(model, folder, unet, schedule_from_config(config), variance, torch_device, torch_dtype,
                        info.get("class_names"), text_encoder, vae, kind, upscale, low_res_schedule,
                        index.get("max_noise_level") if low_res_schedule is not None else None, info)
    return pipeline.accelerate(compile)
