"""``ddpm models``: the built-in models and the models in the Hugging Face cache, described from
their config files alone (no weights are read, torch is not imported)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ddpm_cli.cli.errors import handle_errors
from ddpm_cli.cli.options import format_option
from ddpm_cli.engine.models.resolve import BUILTIN_DIR, MODEL_INFO_FILE, builtin_models, json_or_empty


EXAMPLES = """
Examples:

\b
  ddpm models
  ddpm models --format json | jq -r '.[] | select(.conditioning == "text") | .name'
"""


def _bytes(folder: Path) -> int:
    """Bytes on disk under ``folder``, following the Hub cache's links to their blobs."""
    total = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_size
        except OSError:
            pass
    return total


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return ""


def describe(name: str, source: str, folder: Path) -> dict | None:
    """What a model folder's configs say (None when it holds no U-Net config)."""
    unet = json_or_empty(folder / "unet" / "config.json") or json_or_empty(folder / "config.json")
    if "sample_size" not in unet:
        return None
    index, info = json_or_empty(folder / "model_index.json"), json_or_empty(folder / MODEL_INFO_FILE)
    vae = json_or_empty(folder / "vae" / "config.json") or json_or_empty(folder / "vqvae" / "config.json")
    factor = 2 ** (len(vae.get("block_out_channels", [])) - 1) if vae else 1
    size = unet["sample_size"]
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    pipeline = index.get("_class_name") or "UNet"
    if info.get("task") == "superres" or "Upscale" in pipeline or "SuperResolution" in pipeline:
        kind = f"upscaler x{info.get('scale') or factor}"
    elif "Inpaint" in pipeline:
        kind = "inpainting"
    else:
        kind = "latent diffusion" if vae else "pixel diffusion"
    classes = unet.get("num_class_embeds")
    if info.get("conditioning") in ("class", "text"):
        conditioning = info["conditioning"]
    elif unet.get("_class_name") == "UNet2DConditionModel":
        conditioning = "text"
    else:
        conditioning = "class" if classes else "none"
    if conditioning == "class" and classes:
        conditioning = f"class ({classes - 1})"
    channels = (vae or unet).get("out_channels") or unet.get("out_channels")
    row = {"name": name, "source": source, "kind": kind, "conditioning": conditioning,
           "resolution": f"{height * factor}x{width * factor}", "channels": channels, "bytes": _bytes(folder),
           "path": str(folder)}
    scheduler = json_or_empty(folder / "scheduler" / "scheduler_config.json")
    if "sigma_data" in scheduler or str(scheduler.get("_class_name", "")).startswith("EDM"):
        row["objective"] = "edm"  # an EDM denoiser (Karras et al. 2022), sampled in sigma
    return row


VAE_CLASSES = ("Autoencoder", "VQModel")  # diffusers' class names of VAEs start so


def vae_config(folder: Path) -> dict:
    """The config of the VAE a folder holds (vae/, vqvae/, or a VAE's own config.json); {} when none."""
    for config in (json_or_empty(folder / "vae" / "config.json"), json_or_empty(folder / "vqvae" / "config.json"),
                   json_or_empty(folder / "config.json")):
        if str(config.get("_class_name", "")).startswith(VAE_CLASSES):
            return config
    return {}


def describe_vae(name: str, folder: Path, source: str = "folder") -> dict | None:
    """A VAE-only folder (config.json or vae/config.json of an AutoencoderKL, no U-Net)."""
    if (folder / "unet").is_dir():  # a pipeline that holds a VAE, not a VAE
        return None
    config = vae_config(folder)
    if not str(config.get("_class_name", "")).startswith("Autoencoder"):
        return None
    factor = 2 ** (len(config.get("block_out_channels", [])) - 1)
    size = config.get("sample_size")
    latent = f"{config.get('latent_channels')}x{size // factor}x{size // factor}" if isinstance(size, int) else "?"
    return {"name": name, "source": source, "kind": "VAE", "conditioning": "none", "resolution": f"{size}x{size}",
            "channels": config.get("in_channels"), "latents": latent, "downsampling": factor, "bytes": _bytes(folder),
            "path": str(folder)}


def kind_text(row: dict) -> str:
    """A model's kind as the tables show it: "pixel diffusion", "pixel diffusion (EDM)"..."""
    return row["kind"] + (" (EDM)" if row.get("objective") == "edm" else "")


def hub_cache() -> Path:
    """The Hugging Face Hub cache folder, as huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "huggingface" / "hub"


def _snapshot(repo: Path) -> Path | None:
    """The snapshot refs/main points to, else the newest one."""
    main = repo / "refs" / "main"
    if main.is_file():
        folder = repo / "snapshots" / main.read_text().strip()
        if folder.is_dir():
            return folder
    snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime) if (repo / "snapshots").is_dir() else []
    return snapshots[-1] if snapshots else None


def list_models() -> list[dict]:
    rows = [describe_vae(name, BUILTIN_DIR / name, "built-in") or describe(name, "built-in", BUILTIN_DIR / name)
            for name in builtin_models()]
    cache = hub_cache()
    for repo in sorted(cache.glob("models--*")) if cache.is_dir() else []:
        snapshot = _snapshot(repo)
        if snapshot is not None:
            name = repo.name.removeprefix("models--").replace("--", "/", 1)
            rows.append(describe_vae(name, snapshot, "hub cache") or describe(name, "hub cache", snapshot))
    return [row for row in rows if row is not None]


TableFormatOpt = format_option("a table")


@handle_errors
def models(output_format: TableFormatOpt = "text") -> None:
    """List the built-in models and the Hub cache's: kind, conditioning, resolution, size on disk."""
    rows = list_models()
    if output_format == "json":
        print(json.dumps(rows, indent=2))
        return
    head = ("name", "source", "kind", "conditioning", "resolution", "size")
    lines = [head] + [(r["name"], r["source"], kind_text(r), r["conditioning"], r["resolution"], _human(r["bytes"]))
                      for r in rows]
    widths = [max(len(line[k]) for line in lines) for k in range(len(head))]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
