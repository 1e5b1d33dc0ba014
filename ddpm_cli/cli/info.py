"""``ddpm info MODEL``: one model described from its files alone (configs, safetensors headers, its
card): what it is, what it takes, how it was trained and which commands use it. Imports no torch."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from ddpm_cli.cli.errors import handle_errors
from ddpm_cli.cli.models import _human, describe, describe_vae, kind_text
from ddpm_cli.cli.options import RevisionOpt, format_option

EXAMPLES = """
Examples:

\b
  ddpm info emoji
  ddpm info runs/fashion --format json | jq .parameters
"""

COMPONENTS = ("unet", "vae", "vqvae", "text_encoder", "transformer")
# Which commands take a model, by its kind (cli/models.describe's "kind").
COMMANDS = {"pixel diffusion": "sample, inpaint, eval", "latent diffusion": "sample, inpaint, eval",
            "inpainting": "inpaint", "VAE": "encode"}
SHOWN_CLASSES = 20  # class names the text format lists; json lists all
TRAINING_KEYS = ("data", "task", "scale", "resolution", "class_names", "text_encoder", "text_embedding", "max_length")


def safetensors_parameters(path: Path) -> int:
    """Number of values stored in a safetensors file, read from its header (no weights are loaded)."""
    from ddpm_cli.engine.models.safety import safetensors_header

    return sum(math.prod(entry.get("shape", [])) for name, entry in safetensors_header(path).items()
               if name != "__metadata__" and isinstance(entry, dict))


def parameters(folder: Path) -> dict[str, int]:
    """{component: parameter count} of the safetensors weights in a model folder (flat or per component)."""
    counts = {}
    for name in COMPONENTS:
        files = sorted((folder / name).glob("*.safetensors")) if (folder / name).is_dir() else []
        if files:
            counts[name] = sum(safetensors_parameters(path) for path in files)
    if not counts:
        files = sorted(folder.glob("*.safetensors"))
        if files:
            counts["model"] = sum(safetensors_parameters(path) for path in files)
    return counts


def model_info(spec: str, revision: str | None = None) -> dict:
    """Everything ``ddpm info`` says about a model (ModelError when it cannot be found)."""
    from ddpm_cli.engine.models.resolve import BUILTIN_DIR, MODEL_INFO_FILE, builtin_models, json_or_empty, locate

    folder = locate(spec, revision)
    source = "built-in" if spec in builtin_models() and folder == Path(BUILTIN_DIR) / spec else "folder"
    if "snapshots" in folder.parts:
        source = f"hub cache (revision {folder.name})"
    info = describe_vae(spec, folder) or describe(spec, source, folder)
    if info is None:
        from ddpm_cli.engine.errors import ModelError

        raise ModelError(f"{folder} holds no U-Net or VAE config; pass a model folder, a built-in name or a Hub id")
    info["source"] = source
    unet = json_or_empty(folder / "unet" / "config.json") or json_or_empty(folder / "config.json")
    if "block_out_channels" in unet and "down_block_types" in unet:
        from ddpm_cli.training.presets import describe_unet

        info["architecture"] = describe_unet(unet)
    counts = parameters(folder)
    info["parameters"] = counts
    scheduler = json_or_empty(folder / "scheduler" / "scheduler_config.json")
    if scheduler:
        info["schedule"] = {key: scheduler[key] for key in ("_class_name", "num_train_timesteps", "beta_schedule",
                                                            "beta_start", "beta_end", "prediction_type",
                                                            "variance_type", "clip_sample", "sigma_min", "sigma_max",
                                                            "sigma_data", "sigma_schedule", "rho") if key in scheduler}
    training = json_or_empty(folder / MODEL_INFO_FILE)
    if training:
        info["training"] = {key: training[key] for key in TRAINING_KEYS if training.get(key) is not None}
    kind = info["kind"]
    text = info.get("conditioning") == "text"
    info["commands"] = ("txt2img, inpaint" if text else "upscale" if kind.startswith("upscaler")
                        else COMMANDS.get(kind, "sample"))
    if info.get("conditioning", "").startswith("class") and info["commands"].startswith("sample"):  # a prompt: its nearest class
        info["commands"] = info["commands"].replace("sample", "sample, txt2img", 1)
    card = folder / "MODEL_CARD.md"
    if card.is_file():
        info["card"] = str(card)
    info["size"] = _human(info.pop("bytes"))
    return info


def _lines(info: dict) -> list[str]:
    total = sum(info["parameters"].values())
    parts = ", ".join(f"{name} {count / 1e6:.2f}M" for name, count in info["parameters"].items())
    lines = [f"{info['name']}: {kind_text(info)}, {info['source']}",
             f"  path          {info['path']}",
             f"  resolution    {info['resolution']}, {info.get('channels')} channel(s)"
             + (f"; latents {info['latents']}" if "latents" in info else ""),
             f"  conditioning  {info['conditioning']}",
             *([_architecture_line(info["architecture"])] if "architecture" in info else []),
             f"  parameters    {total / 1e6:.2f}M" + (f" ({parts})" if len(info["parameters"]) > 1 else ""),
             f"  size on disk  {info['size']}"]
    if "schedule" in info and info.get("objective") == "edm":
        s = info["schedule"]
        spacing = f"rho {s.get('rho', 7.0)}" if s.get("sigma_schedule", "karras") == "karras" else "exponential"
        lines.append(f"  schedule      EDM, sigma {s.get('sigma_min', 0.002)}-{s.get('sigma_max', 80.0)} ({spacing}), "
                     f"sigma_data {s.get('sigma_data', 0.5)}, {s.get('prediction_type', 'epsilon')} preconditioning")
    elif "schedule" in info:
        s = info["schedule"]
        lines.append(f"  schedule      {s.get('beta_schedule', '?')} betas {s.get('beta_start')}-{s.get('beta_end')}, "
                     f"T={s.get('num_train_timesteps')}, {s.get('prediction_type', 'epsilon')} prediction, "
                     f"variance {s.get('variance_type', 'fixed_small')}")
    if "training" in info:
        lines.append("  training      " + ", ".join(f"{key} {value}" for key, value in info["training"].items()
                                                      if key != "class_names"))
        names = info["training"].get("class_names")
        if names:
            shown = ", ".join(map(str, names[:SHOWN_CLASSES]))
            more = len(names) - SHOWN_CLASSES
            lines.append(f"  classes       {shown}" + (f", ... and {more} more (--format json lists all)" if more > 0 else ""))
    lines.append(f"  commands      {info['commands']}")
    if "card" in info:
        lines.append(f"  model card    {info['card']}")
    return lines


def _architecture_line(arch: dict) -> str:
    attention = ", ".join(map(str, arch["attention_resolutions"])) or "none"
    return (f"  architecture  {arch['class']}: widths {'-'.join(map(str, arch['block_channels']))}, "
            f"{arch['layers_per_block']} residual blocks per level, self-attention at {attention} (and the middle), "
            f"{arch['norm_num_groups']} norm groups")


InfoFormatOpt = format_option("a description")


@handle_errors
def info(
    model: Annotated[str, typer.Argument(metavar="MODEL", show_default=False, help="A run folder, a built-in model or a Hub id (cached, or downloaded).")],
    revision: RevisionOpt = None,
    output_format: InfoFormatOpt = "text",
) -> None:
    """Describe one model: kind, resolution, conditioning, parameters, schedule, training data, commands."""
    described = model_info(model, revision)
    if output_format == "json":
        print(json.dumps(described, indent=2))
        return
    print("\n".join(_lines(described)))
