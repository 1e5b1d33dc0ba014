"""The CLI's vocabulary: options shared by several commands, defined once (docs/cli.md lists them).

Choices are ``Literal`` types, so Typer checks them while parsing: a typo fails before torch is
imported. Completion of those choices never imports torch either. A renamed flag keeps its old
spelling as a hidden option (``*_ALIAS``), merged into the new one by ``either``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import typer

from ddpm_cli.cli.errors import EXIT_USAGE, fail
from ddpm_cli.engine.choices import CLIP_X0, DTYPES, SAMPLERS, SIGMAS, SPACINGS, VARIANCES

DEVICES = ("auto", "cpu", "cuda", "mps")
FORMATS = ("text", "json")
DEFAULT_OUTPUT = Path("samples")

Sampler = Literal[SAMPLERS]
Spacing = Literal[SPACINGS]
Variance = Literal[VARIANCES]
Sigmas = Literal[SIGMAS]
ClipX0 = Literal[CLIP_X0]
Dtype = Literal[DTYPES]
Format = Literal[FORMATS]

RULE = ("An option that does not apply to the chosen model or sampler is refused (exit 2), never silently "
        "ignored; so is an option given twice where it takes one value.")


def complete(values: tuple[str, ...]) -> Callable[[str], list[str]]:
    """A shell-completion function offering ``values`` (completion never imports torch)."""

    def completions(incomplete: str) -> list[str]:
        return [value for value in values if value.startswith(incomplete)]

    return completions


def format_option(text: str):
    """--format: ``text`` (described by ``text``, what this command prints) or json."""
    return Annotated[Format, typer.Option("--format", autocompletion=complete(FORMATS),
                                          help=f"stdout: text ({text}) or json (one JSON document).")]


def dtype_option(auto: str = "fp32 on cpu, bf16/fp16 on gpu"):
    """--dtype, whose ``auto`` means ``auto`` for this command."""
    return Annotated[Dtype, typer.Option("--dtype", autocompletion=complete(DTYPES),
                                         help=f"One of {', '.join(DTYPES)} (auto: {auto}).")]


def steps_option(default: str):
    """--steps with its default stated once, in words (``default``)."""
    return Annotated[int | None, typer.Option("--steps", min=1, show_default=False,
                                              help=f"Denoising steps [default: {default}].")]


DeviceOpt = Annotated[str, typer.Option("--device", autocompletion=complete(DEVICES),
                                        help="auto, cpu, cuda, cuda:N or mps (auto: cuda, then mps, then cpu).")]
DtypeOpt = dtype_option()
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or log lines on stderr (errors still print).")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, help="Seed of the first image; image i uses seed + i.")]
ImageSeedOpt = Annotated[str | None, typer.Option("--seed", metavar="N|random", show_default=False, help="Seed of the first image; image i uses seed + i. 'random': drawn from the OS, printed and stored in each image [default: 0].")]
SeedListOpt = Annotated[str | None, typer.Option("--seeds", metavar="LIST", show_default=False, help="Exact seeds instead of --seed and -n: a comma-separated list with a-b ranges, e.g. 3,17,42 or 0-3,10.")]
GridOpt = Annotated[bool, typer.Option("--grid", help="Also write grid.png with every image.")]
InitImageOpt = Annotated[Path | None, typer.Option("--init-image", metavar="IMG|DIR", show_default=False, help="Image-to-image (SDEdit): start from this image, or from each image in this folder ({image}-{seed:06d}.png), noised to where the last --strength of the steps begin.")]
StrengthOpt = Annotated[float | None, typer.Option("--strength", show_default=False, help="With --init-image: the share of the sampler's steps that run, in (0, 1]; low keeps the image, 1 starts from the top step [default: 0.8].")]
ResizeOpt = Annotated[bool, typer.Option("--resize", help="With --init-image: resize an image of another size to the output's (Lanczos) instead of refusing it.")]
FormatOpt = format_option("one path per line")
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit) of MODEL.")]
LoraOpt = Annotated[list[str] | None, typer.Option("--lora", metavar="PATH[:SCALE]", show_default=False, help="Load a LoRA (diffusers-format .safetensors, or a folder holding pytorch_lora_weights.safetensors, e.g. a `ddpm train --lora-rank` run) onto the U-Net with this scale [default: 1]; repeatable. Recorded with its SHA-256 in the metadata.")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the U-Net first (worth it for many images).")]
AllowPickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Load pickle (.bin/.ckpt) weights. They can run code: only for sources you trust.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace output files that exist.")]
SkipExistingOpt = Annotated[bool, typer.Option("--skip-existing", help="Keep output files that exist and do not redo them.")]
def num_images_option(default: int, what: str = "Images to make"):
    """-n/--num-images with its default stated in words; None when not given (--seeds refuses -n)."""
    return Annotated[int | None, typer.Option("--num-images", "-n", min=1, show_default=False,
                                              help=f"{what}, with seeds SEED, SEED+1, ... [default: {default}].")]


NumImagesOpt = num_images_option(1)
PerPromptOpt = num_images_option(1, "Images per prompt")
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images sampled together.")]
SamplerOpt = Annotated[Sampler, typer.Option("--sampler", autocompletion=complete(SAMPLERS), help=f"One of {', '.join(SAMPLERS)}.")]
StepsOpt = steps_option("ddpm every training step, ddim 50, euler, euler-a and lms 30, heun and dpm2 15 (two network "
                        "calls a step), the DPM-Solver++ family and unipc 20")
EtaOpt = Annotated[float | None, typer.Option("--eta", min=0.0, show_default=False, help="Samplers that take it (ddim): noise added at each step, 0 deterministic, 1 like DDPM [default: 0].")]
SpacingOpt = Annotated[Spacing | None, typer.Option("--spacing", autocompletion=complete(SPACINGS), show_default=False, help=f"Timestep spacing: {', '.join(SPACINGS)} [default: the model's config's timestep_spacing where it states one (not just its scheduler class's default; trailing for zero-terminal-SNR models), else the sampler's usual: leading for ddpm and ddim, trailing for the others, which diffusers recommends; --spacing leading reproduces a leading config, with each sampler's own leading rule].")]
VarianceOpt = Annotated[Variance | None, typer.Option("--variance", autocompletion=complete(VARIANCES), show_default=False, help=f"Samplers that take it (ddpm): the reverse-step variance, {', '.join(VARIANCES)} [default: the model's].")]
SigmasOpt = Annotated[Sigmas | None, typer.Option("--sigmas", autocompletion=complete(SIGMAS), show_default=False, help="Samplers that take it (all but ddpm, ddim, euler-a): noise levels, default (at the spaced timesteps), karras (Karras et al. 2022, rho 7) or exponential; diffusers' use_karras_sigmas / use_exponential_sigmas [default: default].")]
OrderOpt = Annotated[int | None, typer.Option("--order", min=2, max=3, show_default=False, help="Samplers that take it (unipc): the solver's order, 2 or 3 [default: 2].")]
ClipX0Opt = Annotated[ClipX0 | None, typer.Option("--clip-x0", autocompletion=complete(CLIP_X0), show_default=False, help="Clip each step's predicted clean image to [-1, 1]: on or off [default: as the model's config says (clip_sample), for every sampler; diffusers clips only with DDPM, DDIM and Heun, so off matches its other schedulers].")]
OutputOpt = Annotated[Path | None, typer.Option("--output", "-o", show_default=False, help=f"Folder for the images, or a .png file for a single image [default: {DEFAULT_OUTPUT}].")]
CfgRescaleOpt = Annotated[float | None, typer.Option("--cfg-rescale", metavar="PHI", min=0.0, max=1.0, show_default=False, help="With guidance (--cfg): rescale the guided prediction to the conditional one's standard deviation and mix phi of that in (Lin et al. 2024, sec. 3.4; diffusers' guidance_rescale; 0.7 in the paper), against the over-exposure of strong guidance [default: 0, off].")]
ClassOpt = Annotated[list[str] | None, typer.Option("--class", metavar="CLASS", show_default=False, help="Class-conditional models: the class, by index or name (once) [default: none, unconditional].")]

# Old spellings, still accepted and hidden from --help.
OutdirAlias = Annotated[Path | None, typer.Option("--outdir", hidden=True)]
ImagesAlias = Annotated[int | None, typer.Option("--images", hidden=True, min=0)]
ModelAlias = Annotated[str | None, typer.Option("--model", "-m", hidden=True)]
DataAlias = Annotated[str | None, typer.Option("--data", hidden=True)]


def either(value, alias, name: str, old: str, default=None):
    """The value of an option given as ``name`` or by its old spelling ``old``; refuses both."""
    if value is not None and alias is not None:
        raise fail(f"{name} and {old} are the same option; give it once", EXIT_USAGE)
    if value is not None:
        return value
    return alias if alias is not None else default


def one(values: list[str] | None, name: str) -> str | None:
    """The single value of an option Click would otherwise let repeat (the last one winning)."""
    if values and len(values) > 1:
        raise fail(f"{name} takes one value, got {len(values)} ({', '.join(values)}); run once per value", EXIT_USAGE)
    return values[0] if values else None


def split_list(values: str, name: str, cast: Callable = str, choices: tuple[str, ...] | None = None) -> list:
    """A comma-separated option's items, cast; refuses an empty list, an item ``cast`` rejects, or
    (with ``choices``) an item that is not one of them."""
    try:
        items = [cast(v.strip()) for v in values.split(",") if v.strip()]
    except ValueError:
        raise fail(f"{name} takes a comma-separated list, got {values!r}", EXIT_USAGE) from None
    if not items:
        raise fail(f"{name} is empty", EXIT_USAGE)
    unknown = [item for item in items if choices is not None and item not in choices]
    if unknown:
        raise fail(f"unknown {name} {unknown[0]!r}; choose from {', '.join(choices)}", EXIT_USAGE)
    return items


_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(text: str, name: str) -> float:
    """A duration as seconds: 600, 600s, 10m or 1.5h (exit 2 on anything else)."""
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in "smh" else ""
    try:
        seconds = float(value[:len(value) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise fail(f"{name} {text!r} is not a duration: give seconds (600), or 10m, 1.5h", EXIT_USAGE) from None
    if not seconds > 0:
        raise fail(f"{name} must be positive, e.g. 600 or 10m", EXIT_USAGE)
    return seconds
