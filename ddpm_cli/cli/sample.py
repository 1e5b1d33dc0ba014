"""``ddpm sample MODEL``: images from an unconditional or class-conditional diffusion model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ddpm_cli.cli.errors import handle_errors
from ddpm_cli.cli.options import (AllowPickleOpt, CompileOpt, BatchSizeOpt, DeviceOpt, DtypeOpt, EtaOpt, FormatOpt, NumImagesOpt,
                                  OutdirOpt, OverwriteOpt, QuietOpt, RevisionOpt, SamplerOpt, SeedOpt, SkipExistingOpt,
                                  SpacingOpt, StepsOpt, VarianceOpt, check_choices)
from ddpm_cli.cli.progress import say
from ddpm_cli.cli.render import Job, plan, render
from ddpm_cli.engine.distributed import world

EXAMPLES = """
Examples:

\b
  ddpm sample runs/fashion -n 16 --grid
  ddpm sample google/ddpm-cifar10-32 --sampler ddim --steps 50 --seed 100 -o out/
  ddpm sample runs/fashion-classes --class sneaker --cfg 3 -n 8
  ddpm sample runs/fashion -n 4 --format json | jq -r '.images[].path'
"""


def image_path(outdir: Path, seed: int) -> Path:
    return outdir / f"{seed:06d}.png"


@handle_errors
def sample(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="A model folder, a built-in name, or a Hub id.", show_default=False)],
    num_images: NumImagesOpt = 8,
    batch_size: BatchSizeOpt = 16,
    sampler: SamplerOpt = "dpmpp-2m",
    steps: StepsOpt = None,
    eta: EtaOpt = 0.0,
    spacing: SpacingOpt = None,
    variance: VarianceOpt = None,
    class_spec: Annotated[str | None, typer.Option("--class", help="Class of a class-conditional model: index or name [default: none, unconditional].")] = None,
    cfg: Annotated[float, typer.Option("--cfg", min=0.0, help="Guidance scale w with --class: 0 unconditional, 1 conditional, >1 stronger.")] = 2.0,
    seed: SeedOpt = 0,
    outdir: OutdirOpt = Path("samples"),
    grid: Annotated[bool, typer.Option("--grid", help="Also write grid.png with every image.")] = False,
    output_format: FormatOpt = "text",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    revision: RevisionOpt = None,
    allow_pickle: AllowPickleOpt = False,
    compile: CompileOpt = False,
    overwrite: OverwriteOpt = False,
    skip_existing: SkipExistingOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Sample images from a model; write one PNG per seed and print their paths.

    Under torchrun (torchrun --nproc-per-node N -m ddpm_cli sample ...) the seeds are shared out among
    the processes: the same files as one process, made N at a time.
    """
    model = str(model)
    quiet = quiet or not world().main  # under torchrun, rank 0 reports
    check_choices(sampler, output_format)
    jobs = [Job(s, image_path(outdir, s)) for s in range(seed, seed + num_images)]
    todo, skipped = plan(jobs, outdir, overwrite, skip_existing, grid)

    from ddpm_cli import __version__
    from ddpm_cli.engine.device import describe
    from ddpm_cli.engine.generate import SamplerSettings
    from ddpm_cli.engine.pipeline import Condition, load_pipeline

    pipeline = load_pipeline(model, revision, device, dtype, allow_pickle, compile)
    settings = SamplerSettings(sampler, steps, eta, spacing, variance).resolved(pipeline)
    say(f"ddpm: {model}: {describe(pipeline.device, pipeline.dtype)}; {settings.sampler}, {settings.steps} steps", quiet)
    guidance = {}
    if class_spec is not None:
        label = pipeline.class_index(class_spec)
        guidance = {"class": label, "class_name": pipeline.class_name(label), "cfg": cfg}
        for job in todo:
            job.condition = Condition(label)
    height, width = pipeline.image_size
    params = {"model": model, **settings.describe(), **guidance, "size": f"{width}x{height}",
              "dtype": str(pipeline.dtype).removeprefix("torch."), "version": __version__}
    render(pipeline, todo, skipped, settings, cfg, batch_size, params, output_format, quiet,
           grid_path=outdir / "grid.png" if grid else None, overwrite=overwrite)
