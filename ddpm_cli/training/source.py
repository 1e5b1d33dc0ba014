"""What ``ddpm train --init-from MODEL`` takes from the model: its U-Net's architecture (unet/config.json),
its noise schedule and prediction type (the scheduler config), its resolution, channels and conditioning
(ddpm_model.json, or what the configs imply). Options the user gave that contradict them are refused in
one line; those not given are filled in. Free of torch: it reads JSON only.

The resolved configs are kept in the run's config (``unet_config``, ``scheduler_config``), so a resumed
run builds the same network and schedule without the source model.
"""

from __future__ import annotations

from pathlib import Path

from ddpm_cli.engine.errors import InputError, ModelError
from ddpm_cli.engine.models.resolve import MODEL_INFO_FILE, locate, read_json

_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "sample"}
# Config keys of a preset that say what the network is (widths, depth, blocks, attention).
_SHAPE_KEYS = ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "norm_num_groups")


def source_folder(spec: str, revision: str | None = None) -> Path:
    return locate(spec, revision, what="model")


def read_source(spec: str, revision: str | None = None) -> tuple[Path, dict, dict, dict]:
    """(folder, U-Net config, scheduler config, ddpm_model.json or {}) of a diffusion model."""
    folder = source_folder(spec, revision)
    unet = folder / "unet" / "config.json"
    if not unet.is_file():
        raise ModelError(f"--init-from {spec}: {folder} has no unet/config.json; pass a run folder, a DDPMPipeline "
                         "or Stable Diffusion-format folder, a built-in model or a Hub id")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    info = folder / MODEL_INFO_FILE
    return (folder, read_json(unet), read_json(scheduler) if scheduler.is_file() else {},
            read_json(info) if info.is_file() else {})


def is_stable_diffusion(folder: Path) -> bool:
    """A Stable Diffusion-format folder: U-Net, VAE, text encoder and tokenizer side by side."""
    return all((folder / name).is_dir() for name in ("unet", "vae", "text_encoder", "tokenizer"))


def source_settings(folder: Path, unet: dict, scheduler: dict, info: dict) -> dict:
    """The training options a model implies (TrainConfig field -> value)."""
    text = unet.get("_class_name") == "UNet2DConditionModel"
    settings = {
        "schedule": _SCHEDULES.get(scheduler.get("beta_schedule", "linear"), "linear"),
        "prediction_type": _PREDICTIONS.get(scheduler.get("prediction_type", "epsilon"), "epsilon"),
        "num_train_timesteps": int(scheduler.get("num_train_timesteps", 1000)),
        "learn_variance": scheduler.get("variance_type") in ("learned", "learned_range"),
        "conditioning": "text" if text else ("class" if unet.get("num_class_embeds") else "none"),
        "objective": "ddpm",
    }
    if "sigma_data" in scheduler or str(scheduler.get("_class_name", "")).startswith("EDM"):  # an EDM model
        settings.update(objective="edm", prediction_type="epsilon", sigma_data=float(scheduler.get("sigma_data", 0.5)))
    if is_stable_diffusion(folder) and not info:  # frozen VAE and text encoder, from the folder itself
        vae = read_json(folder / "vae" / "config.json")
        factor = 2 ** (len(vae.get("block_out_channels") or [0]) - 1)
        settings.update(latent=str(folder), text_encoder=str(folder), text_embedding="tokens",
                        resolution=int(unet["sample_size"]) * factor)
    elif info.get("latent"):
        settings["latent"] = info["latent"]
        settings["resolution"] = (info.get("image_size") or [info.get("resolution")])[0]
    else:
        from ddpm_cli.training.presets import image_size

        height, width = image_size(info.get("resolution") or unet.get("sample_size"))  # R, or [H, W] (non-square)
        settings["resolution"], settings["width"] = height, None if width == height else width
        settings["channels"] = int(unet["in_channels"])
    for key in ("text_encoder", "text_embedding"):
        if info.get(key):
            settings[key] = info[key]
    if info.get("max_length"):
        settings["text_max_length"] = info["max_length"]
    return settings


def inherit(config, given: set[str]) -> None:
    """Fill ``config`` (a TrainConfig with ``init_from``) from the source model; InputError naming the first
    option given that contradicts it."""
    from ddpm_cli.training.presets import PRESETS

    spec = config.init_from
    if config.task != "ddpm":
        return  # an autoencoder or upscaler keeps the network options it is given (checked weight by weight)
    folder, unet, scheduler, info = read_source(spec, config.revision)
    settings = source_settings(folder, unet, scheduler, info)
    if "resolution" in given and "resolution" in settings and config.image_size != (
            settings["resolution"] if settings.get("width") is None else (settings["resolution"], settings["width"])):
        from ddpm_cli.training.presets import size_text

        source_size = size_text((settings["resolution"], settings.get("width") or settings["resolution"]))
        raise InputError(f"--resolution {size_text(config.image_size)} contradicts --init-from {spec}, which has "
                         f"{source_size}; drop --resolution (a fine-tuned model keeps its source's architecture and "
                         "schedule)")
    for key, value in settings.items():
        if key in ("resolution", "width") and "resolution" in given:
            setattr(config, key, value)
            continue
        if key in given and getattr(config, key) != value:
            flag = "--" + key.replace("_", "-")
            raise InputError(f"{flag} {getattr(config, key)} contradicts --init-from {spec}, which has {value}; "
                             f"drop {flag} (a fine-tuned model keeps its source's architecture and schedule)")
        setattr(config, key, value)
    if "model_size" in given:
        preset = PRESETS[config.model_size]
        if any(list(preset[key]) != list(unet.get(key) or []) if isinstance(preset[key], tuple)
               else preset[key] != unet.get(key) for key in _SHAPE_KEYS):
            raise InputError(f"--model-size {config.model_size} contradicts --init-from {spec}, whose U-Net is "
                             f"{tuple(unet.get('block_out_channels') or ())} wide; drop --model-size")
    config.unet_config = {key: value for key, value in unet.items() if not key.startswith("_")}
    config.scheduler_config = {key: value for key, value in scheduler.items() if not key.startswith("_")}


def export_stable_diffusion(run_dir: Path, unet, source: Path) -> None:
    """A Stable Diffusion fine-tune's run folder: the source's pipeline folder (VAE, text encoder, tokenizer,
    scheduler, model_index.json, copied) with the trained U-Net, so StableDiffusionPipeline.from_pretrained
    loads it."""
    import shutil

    from ddpm_cli.training.checkpoints import export_files

    def copy(entry: Path):
        return (lambda path: shutil.copytree(entry, path)) if entry.is_dir() else (lambda path: shutil.copy(entry, path))

    index = read_json(source / "model_index.json")
    writers = {name: copy(source / name) for name in index if not name.startswith("_") and (source / name).exists()
               and name != "unet"}
    writers.update({"unet": unet.save_pretrained, "model_index.json": copy(source / "model_index.json")})
    export_files(run_dir, writers)
