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


def unet_config(preset: str, resolution: int, channels: int, num_classes: int | None = None) -> dict:
    """The UNet2DModel config for a preset at a resolution; the resolution must survive the downsamplings.

    With ``num_classes``, a class embedding of num_classes + 1 rows is added to the time embedding;
    the last row is the null class of the unconditional branch (classifier-free guidance).
    """
    if preset not in PRESETS:
        raise InputError(f"unknown --model-size {preset!r}; choose one of {', '.join(PRESETS)}")
    config = dict(_DDPM_STYLE, **PRESETS[preset])
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    if resolution % factor:
        raise InputError(f"--resolution {resolution} is not a multiple of {factor}, which --model-size {preset} needs")
    config.update(sample_size=resolution, in_channels=channels, out_channels=channels)
    if num_classes:
        config["num_class_embeds"] = num_classes + 1
    return config


def text_unet_config(preset: str, resolution: int, channels: int, cross_attention_dim: int) -> dict:
    """A UNet2DConditionModel config with the preset's widths, and cross-attention (with self-attention)
    to the text embeddings where the preset has self-attention, and in the middle block."""
    base = unet_config(preset, resolution, channels)
    down = tuple("CrossAttnDownBlock2D" if kind.startswith("Attn") else "DownBlock2D" for kind in base["down_block_types"])
    up = tuple("CrossAttnUpBlock2D" if kind.startswith("Attn") else "UpBlock2D" for kind in base["up_block_types"])
    return dict(sample_size=resolution, in_channels=channels, out_channels=channels,
                block_out_channels=base["block_out_channels"], layers_per_block=base["layers_per_block"],
                norm_num_groups=base["norm_num_groups"], down_block_types=down, up_block_types=up,
                mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=cross_attention_dim,
                attention_head_dim=8, act_fn="silu", norm_eps=1e-6)


# What a preset's loss comes down to on a built-in data set, from the built-in models (their cards):
# (preset, data, resolution) -> (mean loss of the last 10 steps, the run that reached it). A run that
# ends far above it has not learned much yet: its samples are still mostly noise.
REFERENCE_LOSSES: dict[tuple[str, str, int], tuple[float, str]] = {
    ("tiny", "fashion-mnist", 32): (0.0305, "the built-in fashion-mnist model: 3,000 steps at batch 512"),
}


def reference_loss(config) -> dict | None:
    """{"loss", "source"} for a run of plain L_simple epsilon training on a data set and preset with a
    measured reference (REFERENCE_LOSSES), else None."""
    plain = (config.task == "ddpm" and config.objective == "ddpm" and config.loss == "simple"
             and config.prediction_type == "epsilon"
             and config.snr_gamma is None
             and config.schedule == "linear" and config.num_train_timesteps == 1000 and config.conditioning == "none")
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
    return cls.from_config(config)


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
