"""Options shared by several commands, defined once, with shell completion of their choices."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from ddpm_cli.cli.errors import EXIT_USAGE, fail
from ddpm_cli.engine.choices import DTYPES, SAMPLERS, SPACINGS, VARIANCES

DEVICES = ("auto", "cpu", "cuda", "mps")


def complete(values: tuple[str, ...]) -> Callable[[str], list[str]]:
    """A shell-completion function offering ``values`` (completion never imports torch)."""

    def completions(incomplete: str) -> list[str]:
        return [value for value in values if value.startswith(incomplete)]

    return completions


DeviceOpt = Annotated[str, typer.Option("--device", autocompletion=complete(DEVICES),
                                        help="auto, cpu, cuda, cuda:N or mps (auto: cuda, then mps, then cpu).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", autocompletion=complete(DTYPES),
                                       help=f"One of {', '.join(DTYPES)} (auto: fp32 on cpu, bf16/fp16 on gpu).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or log lines on stderr (errors still print).")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, help="Seed of the first image; image i uses seed + i.")]
FormatOpt = Annotated[str, typer.Option("--format", autocompletion=complete(("text", "json")),
                                        help="stdout format: text (one path per line) or json.")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit) of MODEL.")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the U-Net first (worth it for many images).")]
AllowPickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Load pickle (.bin/.ckpt) weights. They can run code: only for sources you trust.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace output files that exist.")]
SkipExistingOpt = Annotated[bool, typer.Option("--skip-existing", help="Keep output files that exist and do not redo them.")]
NumImagesOpt = Annotated[int, typer.Option("--num-images", "-n", min=1, help="How many images (per prompt).")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images sampled together.")]
SamplerOpt = Annotated[str, typer.Option("--sampler", autocompletion=complete(SAMPLERS), help=f"One of {', '.join(SAMPLERS)}.")]
StepsOpt = Annotated[int | None, typer.Option("--steps", min=1, help="Denoising steps [default: ddpm every training step, ddim 50, dpmpp-2m 20].")]
EtaOpt = Annotated[float, typer.Option("--eta", min=0.0, help="DDIM noise: 0 deterministic, 1 like DDPM.")]
SpacingOpt = Annotated[str | None, typer.Option("--spacing", autocompletion=complete(SPACINGS), help=f"Timestep spacing: {', '.join(SPACINGS)} [default: the sampler's usual].")]
VarianceOpt = Annotated[str | None, typer.Option("--variance", autocompletion=complete(VARIANCES), help=f"DDPM variance: {', '.join(VARIANCES)} [default: the model's].")]
OutdirOpt = Annotated[Path, typer.Option("--outdir", "-o", help="Folder for the images.")]


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


def check_choices(sampler: str, output_format: str) -> None:
    """Refuse unknown choices before any model is loaded."""
    if sampler not in SAMPLERS:
        raise fail(f"unknown --sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}", EXIT_USAGE)
    if output_format not in ("text", "json"):
        raise fail(f"unknown --format {output_format!r}; choose text or json", EXIT_USAGE)
