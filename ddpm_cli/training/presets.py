"""U-Net sizes for ``ddpm train --model-size``: diffusers UNet2DModel configs.

``ddpm-cifar10`` is the 35.7M-parameter network of Ho et al. (2020) as published in diffusers'
google/ddpm-cifar10-32 (channels 128-256-256-256, two residual blocks per level, self-attention at
16x16). The smaller presets keep its shape with fewer channels; ``tiny`` trains usefully on a CPU.
"""

from __future__ import annotations

from ddpm_cli.engine.errors import InputError

_DDPM_STYLE = dict(
    act_fn="silu", center_input_sample=False, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    mid_block_scale_factor=1, norm_eps=1e-6, time_embedding_type="positional",
)

PRESETS: dict[str, dict] = {
    "tiny": dict(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
    "small": dict(block_out_channels=(64, 128, 128, 128), layers_per_block=2, norm_num_groups=32,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    "ddpm-cifar10": dict(block_out_channels=(128, 256, 256, 256), layers_per_block=2, norm_num_groups=32,
                         down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
}


def image_size(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(height, width) of a training size: R (square) or (H, W)."""
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def sample_size(size: int | tuple[int, int] | list[int]) -> int | list[int]:
    """A U-Net config's sample_size: R for a square size, [H, W] otherwise (diffusers takes both)."""
    height, width = image_size(size)
    return height if height == width else [height, width]


def size_text(size: int | tuple[int, int] | list[int]) -> str:
    """A training size as --resolution writes it: R, or HxW (height x width)."""
    height, width = image_size(size)
    return str(height) if height == width else f"{height}x{width}"


def parse_resolution(text: str) -> tuple[int, int | None]:
    """--resolution R or HxW (height x width, e.g. 32x48) -> (R or H, None or W); InputError otherwise."""
    parts = str(text).strip().lower().replace("×", "x").split("x")
    if len(parts) not in (1, 2) or not all(part.strip().isdigit() for part in parts):
        raise InputError(f"--resolution {text!r}: give R (a square, e.g. 32) or HxW, height x width (e.g. 32x48)")
    height, width = (int(part) for part in (parts * 2)[:2])
    if min(height, width) < 8:
        raise InputError(f"--resolution {text}: each side must be at least 8 pixels")
    return height, None if width == height else width


def parse_int_list(text: str, flag: str, allow_none: bool = False) -> list[int]:
    """'64,128,256' -> [64, 128, 256] (each at least 1); 'none' -> [] where ``allow_none``."""
    text = str(text).strip().lower()
    if allow_none and text == "none":
        return []
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() and int(part) >= 1 for part in parts):
        example = "16 or 16,8 (or none)" if allow_none else "64,128,256"
        raise InputError(f"{flag} {text!r}: give positive whole numbers separated by commas, e.g. {example}")
    return [int(part) for part in parts]


def attention_levels(down_block_types) -> list[int]:
    """The levels (0 = full size) whose down block attends."""
    return [level for level, kind in enumerate(down_block_types) if "Attn" in kind]


def check_shape(block_out_channels, norm_num_groups: int, size: int | tuple[int, int] | None, what: str) -> None:
    """Group normalization divides every width, and the size survives the downsamplings; InputError naming ``what``
    (the options or file that set the shape)."""
    for width in block_out_channels:
        if width % norm_num_groups:
            raise InputError(f"{what}: width {width} is not a multiple of norm_num_groups {norm_num_groups} (group "
                             f"normalization splits each level's channels into that many groups); use multiples of "
                             f"{norm_num_groups}")
    factor = 2 ** (len(block_out_channels) - 1)
    if size is not None and any(side % factor for side in image_size(size)):
        raise InputError(f"--resolution {size_text(size)} is not a multiple of {factor}, which {what} needs "
                         f"({len(block_out_channels)} levels, each but the last halving the size)")


def unet_shape(preset: str, size: int | tuple[int, int], block_channels=None, layers_per_block: int | None = None,
               attention_resolutions=None) -> dict:
    """The widths, depth, group count and block types of a preset, with ``ddpm train --block-channels``,
    ``--layers-per-block`` and ``--attention-resolutions`` over it.

    ``attention_resolutions`` lists feature-map sizes: the levels whose map's shorter side is one of them
    get self-attention (the middle block always has it); [] gives none; None keeps the preset's attending
    levels (those the widths still have). The preset's norm_num_groups must divide the widths.
    """
    if preset not in PRESETS:
        raise InputError(f"unknown --model-size {preset!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[preset]
    widths = tuple(int(width) for width in (block_channels or base["block_out_channels"]))
    custom = [flag for flag, value in (("--block-channels", block_channels), ("--layers-per-block", layers_per_block))
              if value]
    what = " and ".join([f"--model-size {preset}"] + custom) if custom else f"--model-size {preset}"
    check_shape(widths, base["norm_num_groups"], size, what)
    height, width = image_size(size)
    sides = [min(height, width) // 2 ** level for level in range(len(widths))]
    if attention_resolutions is None:
        attending = [level for level in attention_levels(base["down_block_types"]) if level < len(widths)]
    else:
        for resolution in attention_resolutions:
            if resolution not in sides:
                raise InputError(f"--attention-resolutions {resolution}: no level of the U-Net is {resolution} pixels; "
                                 f"at --resolution {size_text(size)} its levels are {', '.join(map(str, sides))} "
                                 "(the shorter side)")
        attending = [level for level, side in enumerate(sides) if side in attention_resolutions]
    levels = range(len(widths))
    return dict(block_out_channels=widths, layers_per_block=int(layers_per_block or base["layers_per_block"]),
                norm_num_groups=base["norm_num_groups"],
                down_block_types=tuple("AttnDownBlock2D" if level in attending else "DownBlock2D" for level in levels),
                up_block_types=tuple("AttnUpBlock2D" if level in attending else "UpBlock2D" for level in reversed(levels)))


def unet_config(preset: str, resolution: int | tuple[int, int], channels: int, num_classes: int | None = None,
                **shape) -> dict:
    """The UNet2DModel config for a preset at a resolution (R or (H, W)); the resolution must survive the
    downsamplings. ``shape``: block_channels, layers_per_block, attention_resolutions over the preset
    (:func:`unet_shape`).

    With ``num_classes``, a class embedding of num_classes + 1 rows is added to the time embedding;
    the last row is the null class of the unconditional branch (classifier-free guidance).
    """
    config = dict(_DDPM_STYLE, **unet_shape(preset, resolution, **shape))
    config.update(sample_size=sample_size(resolution), in_channels=channels, out_channels=channels)
    if num_classes:
        config["num_class_embeds"] = num_classes + 1
    return config


def text_unet_config(preset: str, resolution: int | tuple[int, int], channels: int, cross_attention_dim: int,
                     **shape) -> dict:
    """A UNet2DConditionModel config with the preset's widths, and cross-attention (with self-attention)
    to the text embeddings where the preset has self-attention, and in the middle block."""
    base = unet_config(preset, resolution, channels, **shape)
    down = tuple("CrossAttnDownBlock2D" if kind.startswith("Attn") else "DownBlock2D" for kind in base["down_block_types"])
    up = tuple("CrossAttnUpBlock2D" if kind.startswith("Attn") else "UpBlock2D" for kind in base["up_block_types"])
    return dict(sample_size=base["sample_size"], in_channels=channels, out_channels=channels,
                block_out_channels=base["block_out_channels"], layers_per_block=base["layers_per_block"],
                norm_num_groups=base["norm_num_groups"], down_block_types=down, up_block_types=up,
                mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=cross_attention_dim,
                attention_head_dim=8, act_fn="silu", norm_eps=1e-6)


# ``ddpm train --unet-config FILE``: a diffusers U-Net config of the user's own.
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
_DIFFUSERS_NORM_GROUPS = 32  # both classes' default norm_num_groups


def read_unet_config(path: str) -> dict:
    """The U-Net config of ``--unet-config FILE`` (JSON, as diffusers writes unet/config.json), without diffusers'
    bookkeeping keys; a UNet2DConditionModel's keeps ``cross_attention_dim`` (None: filled from the text encoder)."""
    import json
    from pathlib import Path

    file = Path(path).expanduser()
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise InputError(f"--unet-config {path}: no such file; pass a diffusers U-Net config (JSON)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"--unet-config {path}: not a JSON file ({str(exc).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise InputError(f"--unet-config {path}: a U-Net config is a JSON object of diffusers' keys, not "
                         f"{type(config).__name__}")
    kind = config.get("_class_name", "UNet2DModel")
    if kind not in UNET_CLASSES:
        raise InputError(f"--unet-config {path} is a {kind} config; give a {' or '.join(UNET_CLASSES)} config")
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    if kind == "UNet2DConditionModel":
        config.setdefault("cross_attention_dim", None)
    widths = config.get("block_out_channels")
    if widths is not None and (not isinstance(widths, list) or not widths
                               or not all(isinstance(w, int) and w >= 1 for w in widths)):
        raise InputError(f"--unet-config {path}: block_out_channels must be a list of positive whole numbers")
    return config


def fill_unet_config(config: dict, size: int | tuple[int, int], in_channels: int, out_channels: int,
                     num_classes: int | None = None, cross_attention_dim: int | None = None) -> dict:
    """A --unet-config's config with sample_size, in/out channels, the class embedding and the text width
    filled from the run; a value the file sets otherwise is refused in one line."""
    text = "cross_attention_dim" in config
    if cross_attention_dim and not text:
        raise InputError("--conditioning text needs a UNet2DConditionModel config (cross-attention to the text); "
                         "--unet-config gives a UNet2DModel")
    if text and not cross_attention_dim:
        raise InputError("--unet-config gives a UNet2DConditionModel, which attends to text: it needs "
                         "--conditioning text (or give a UNet2DModel config)")
    if config.get("num_class_embeds") and not num_classes:
        raise InputError("--unet-config has num_class_embeds, a class embedding: it needs --conditioning class "
                         "(or drop num_class_embeds)")
    wanted = {"sample_size": (sample_size(size), f"the training size --resolution {size_text(size)}"),
              "in_channels": (in_channels, "the network's input channels (--channels)"),
              "out_channels": (out_channels, "the network's output channels (--channels, doubled by --learn-variance)")}
    if num_classes:
        wanted["num_class_embeds"] = (num_classes + 1, f"the data's {num_classes} classes and the null class")
    if cross_attention_dim:
        wanted["cross_attention_dim"] = (cross_attention_dim, "the width of the text encoder's states")
    filled = dict(config)
    for key, (value, meaning) in wanted.items():
        given = filled.get(key)
        same = given is None or (image_size(given) == image_size(value) if key == "sample_size" else given == value)
        if not same:
            raise InputError(f"--unet-config has {key} {given}, but this run needs {value}, {meaning}; drop {key} "
                             "from the file (it is filled from the data)")
        filled[key] = value
    return filled


def check_unet_file(config: dict, size: int | tuple[int, int] | None) -> None:
    """A --unet-config's widths against its group normalization, and the size against its downsamplings."""
    widths = config.get("block_out_channels")
    if widths:
        check_shape(widths, int(config.get("norm_num_groups") or _DIFFUSERS_NORM_GROUPS), size, "--unet-config")


def _check_keys(config: dict) -> None:
    """Refuse keys the U-Net class does not take (diffusers would ignore them with a warning: a typo would
    silently train another network)."""
    import inspect

    from diffusers import UNet2DConditionModel, UNet2DModel

    cls = UNet2DConditionModel if "cross_attention_dim" in config else UNet2DModel
    unknown = sorted(set(config) - set(inspect.signature(cls.__init__).parameters))
    if unknown:
        raise InputError(f"--unet-config: {cls.__name__} takes no {', '.join(unknown)}; check the spelling "
                         "against diffusers' config of that class")


def run_unet_config(config, size: int | tuple[int, int], in_channels: int, out_channels: int,
                    num_classes: int | None = None, cross_attention_dim: int | None = None) -> dict:
    """The U-Net config of a training run (a TrainConfig): its --unet-config filled from the data, or its
    --model-size preset with --block-channels, --layers-per-block and --attention-resolutions over it;
    UNet2DConditionModel where ``cross_attention_dim`` (text), with a class embedding where ``num_classes``."""
    custom = getattr(config, "custom_unet_config", None)
    if custom:
        _check_keys(custom)
        check_unet_file(custom, size)
        return fill_unet_config(custom, size, in_channels, out_channels, num_classes, cross_attention_dim)
    shape = dict(block_channels=getattr(config, "block_channels", None),
                 layers_per_block=getattr(config, "layers_per_block", None),
                 attention_resolutions=getattr(config, "attention_resolutions", None))
    if cross_attention_dim:
        unet = text_unet_config(config.model_size, size, in_channels, cross_attention_dim, **shape)
    else:
        unet = unet_config(config.model_size, size, in_channels, num_classes, **shape)
    unet["out_channels"] = out_channels
    return unet


ARCHITECTURE_OPTIONS = {"block_channels": "--block-channels", "layers_per_block": "--layers-per-block",
                        "attention_resolutions": "--attention-resolutions", "custom_unet_config": "--unet-config"}


def check_architecture(config, check) -> None:
    """The architecture options and a non-square --resolution against the rest of a TrainConfig, before any
    data is read (``check(ok, message)`` raises); what needs the data is checked when the U-Net is built."""
    if config.width is not None:
        check(config.task == "ddpm", f"--resolution HxW (non-square) trains --task ddpm; --task {config.task} "
              "takes a square --resolution R")
        check(not config.latent and not str(config.data).endswith(".safetensors"),
              "--resolution HxW trains on pixels; latent training (--latent, a latents file) takes square images")
        check(config.width >= 1, "--resolution HxW: the width must be at least 1")
    given = [flag for key, flag in ARCHITECTURE_OPTIONS.items() if getattr(config, key) is not None]
    if not given:
        return
    check(config.task != "autoencoder", f"{given[0]} shapes a diffusion U-Net; --task autoencoder takes "
          f"--model-size {' or '.join(AUTOENCODER_PRESETS)}")
    check(not (config.init_from and config.task == "ddpm"), f"{given[0]} contradicts --init-from {config.init_from}: a "
          f"fine-tuned model keeps its source's architecture; drop {given[0]}")
    check(config.layers_per_block is None or config.layers_per_block >= 1, "--layers-per-block must be at least 1")
    check(config.block_channels is None or (len(config.block_channels) >= 1 and min(config.block_channels) >= 1),
          "--block-channels: give positive widths, one per level, e.g. 64,128,256")
    size = config.image_size if config.resolution is not None else None
    if config.custom_unet_config is not None:
        check(len(given) == 1, f"--unet-config gives the whole architecture; drop {given[0]}")
        check_unet_file(config.custom_unet_config, size)
    elif size is not None and config.model_size in PRESETS:
        unet_shape(config.model_size, size, config.block_channels, config.layers_per_block, config.attention_resolutions)


def describe_unet(config: dict) -> dict:
    """What a diffusers U-Net config says of its architecture, for ``ddpm info``: class, widths per level,
    residual blocks per level, the feature-map sizes (shorter side) that self-attend, norm groups."""
    widths = list(config.get("block_out_channels") or [])
    size = config.get("sample_size")
    sides = [min(image_size(size)) // 2 ** level for level in range(len(widths))] if size else []
    levels = attention_levels(config.get("down_block_types") or [])
    return {"class": config.get("_class_name") or ("UNet2DConditionModel" if "cross_attention_dim" in config
                                                     else "UNet2DModel"),
            "block_channels": widths, "layers_per_block": config.get("layers_per_block"),
            "attention_resolutions": [sides[level] for level in levels if level < len(sides)],
            "norm_num_groups": config.get("norm_num_groups")}


# What a preset's loss comes down to on a built-in data set, from the built-in models (their cards):
# (preset, data, resolution) -> (mean loss of the last 10 steps, the run that reached it). A run that
# ends far above it has not learned much yet: its samples are still mostly noise.
REFERENCE_LOSSES: dict[tuple[str, str, int], tuple[float, str]] = {
    ("tiny", "fashion-mnist", 32): (0.0305, "the built-in fashion-mnist model: 3,000 steps at batch 512"),
}


def custom_architecture(config) -> bool:
    """Whether a TrainConfig's U-Net is other than its --model-size preset's (options over it, or a file)."""
    return any(getattr(config, key, None) is not None
               for key in ("block_channels", "layers_per_block", "attention_resolutions", "custom_unet_config"))


def reference_loss(config) -> dict | None:
    """{"loss", "source"} for a run of plain L_simple epsilon training on a data set and preset with a
    measured reference (REFERENCE_LOSSES), else None."""
    plain = (config.task == "ddpm" and config.objective == "ddpm" and config.loss == "simple"
             and config.prediction_type == "epsilon"
             and config.snr_gamma is None
             and config.schedule == "linear" and config.num_train_timesteps == 1000 and config.conditioning == "none"
             and not custom_architecture(config) and getattr(config, "width", None) is None)
    found = REFERENCE_LOSSES.get((config.model_size, config.data, config.resolution)) if plain else None
    return {"loss": found[0], "source": found[1]} if found else None


def with_dropout(config: dict, dropout: float | None) -> dict:
    """A U-Net config (UNet2DModel or UNet2DConditionModel, both of which take the key) with ``dropout`` in its
    residual blocks; None keeps the config's own (0 for a preset, an --init-from model's own)."""
    return config if dropout is None else {**config, "dropout": dropout}


def build_unet(config: dict):
    """UNet2DConditionModel for configs with cross-attention, else UNet2DModel."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    cls = UNet2DConditionModel if "cross_attention_dim" in config else UNet2DModel
    try:
        return cls.from_config(config)
    except (ValueError, TypeError) as exc:  # e.g. a --unet-config whose block lists disagree
        message = " ".join(str(exc).split())
        raise InputError(f"diffusers cannot build this {cls.__name__}: {message}") from None


# Autoencoders for latent diffusion (``ddpm train --task autoencoder``): diffusers AutoencoderKL
# configs in Stable Diffusion's shape (residual encoder and decoder, attention in the middle, 4
# latent channels), narrower. ``tiny`` downsamples 4x per side, ``small`` 8x as SD's VAE does.
AUTOENCODER_PRESETS: dict[str, dict] = {
    "tiny": dict(block_out_channels=(32, 64, 64), layers_per_block=1),
    "small": dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2),
}


def autoencoder_config(preset: str, resolution: int, channels: int, latent_channels: int = 4) -> dict:
    """The AutoencoderKL config of a preset; ``scaling_factor`` is set after training (1 / latent std)."""
    if preset not in AUTOENCODER_PRESETS:
        raise InputError(f"--task autoencoder takes --model-size {' or '.join(AUTOENCODER_PRESETS)}, not {preset!r}")
    widths = AUTOENCODER_PRESETS[preset]["block_out_channels"]
    factor = 2 ** (len(widths) - 1)
    if resolution % factor:
        raise InputError(f"--resolution {resolution} is not a multiple of {factor}, which the {preset} autoencoder needs")
    return dict(in_channels=channels, out_channels=channels, latent_channels=latent_channels,
                down_block_types=("DownEncoderBlock2D",) * len(widths), up_block_types=("UpDecoderBlock2D",) * len(widths),
                block_out_channels=widths, layers_per_block=AUTOENCODER_PRESETS[preset]["layers_per_block"],
                norm_num_groups=32, act_fn="silu", sample_size=resolution, scaling_factor=1.0)


def build_autoencoder(config: dict):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**config)
