"""Options shared by several commands, defined once."""

from __future__ import annotations

from typing import Annotated

import typer

DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps (auto: cuda, then mps, then cpu).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or log lines on stderr (errors still print).")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, help="Seed of the first image; image i uses seed + i.")]
FormatOpt = Annotated[str, typer.Option("--format", help="stdout format: text (one path per line) or json.")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit) of MODEL.")]
AllowPickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Load pickle (.bin/.ckpt) weights. They can run code: only for sources you trust.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace output files that exist.")]
SkipExistingOpt = Annotated[bool, typer.Option("--skip-existing", help="Keep output files that exist and do not redo them.")]
