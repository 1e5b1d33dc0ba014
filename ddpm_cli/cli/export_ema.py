"""``ddpm export-ema RUN --sigma-rel S``: the EMA of any length, made after training from the snapshots
of a ``ddpm train --ema-profiles`` run (EDM2's post-hoc EMA; training/ema_profiles.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ddpm_cli.cli.errors import EXIT_USAGE, fail, handle_errors
from ddpm_cli.cli.options import OverwriteOpt, QuietOpt, SkipExistingOpt, format_option
from ddpm_cli.cli.progress import say

EXAMPLES = """
Examples:

\b
  ddpm train --ema-profiles -o runs/profiles
  ddpm export-ema runs/profiles --sigma-rel 0.15                  # runs/profiles-ema-0.150
  ddpm export-ema runs/profiles --sigma-rel 0.08 -o runs/short-ema && ddpm sample runs/short-ema --grid
"""


@handle_errors
def export_ema(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="A run folder trained with --ema-profiles.", show_default=False)],
    sigma_rel: Annotated[float, typer.Option("--sigma-rel", min=0.01, max=0.25, show_default=False, help="The EMA's length: the standard deviation of its averaging profile relative to the run's length (EDM2), 0.01 to 0.25; the two averages kept during training are 0.05 and 0.10.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", show_default=False, help="The pipeline folder to write [default: RUN-ema-S beside RUN].")] = None,
    overwrite: OverwriteOpt = False,
    skip_existing: SkipExistingOpt = False,
    output_format: format_option("the folder's path") = "text",
    quiet: QuietOpt = False,
) -> None:
    """Reconstruct the EMA with relative length --sigma-rel from a run's snapshots and export it as a pipeline."""
    if overwrite and skip_existing:
        raise fail("--overwrite and --skip-existing cannot be given together", EXIT_USAGE)
    output = output or run.with_name(f"{run.name}-ema-{sigma_rel:.3f}")
    if skip_existing and output.exists():
        say(f"ddpm: {output} exists; skipped", quiet)
        print(json.dumps({"pipeline": str(output), "skipped": True}) if output_format == "json" else output)
        return
    from ddpm_cli.training.ema_profiles import POOR_FIT, export_ema as export

    result = export(run, sigma_rel, output, overwrite)
    say(f"ddpm: EMA sigma_rel {sigma_rel:g} (gamma {result['gamma']:.2f}) at step {result['step']} from "
        f"{result['snapshots']} snapshots; profile fit error {result['profile_error']:.2%}", quiet)
    if result["profile_error"] > POOR_FIT:
        say(f"ddpm: warning: the snapshots fit this profile with a {result['profile_error']:.0%} error; a sigma_rel nearer "
            "0.05-0.10, or denser snapshots (--ema-snapshot-every), fit better")
    print(json.dumps(result, indent=2) if output_format == "json" else result["pipeline"])
