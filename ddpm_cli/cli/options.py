"""Options shared by several commands, defined once, with shell completion of their choices."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from ddpm_cli.engine.choices import DTYPES

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
AllowPickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Load pickle (.bin/.ckpt) weights. They can run code: only for sources you trust.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace output files that exist.")]
SkipExistingOpt = Annotated[bool, typer.Option("--skip-existing", help="Keep output files that exist and do not redo them.")]
