"""``ddpm sample MODEL``: images from an unconditional diffusion model."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from ddpm_cli.cli.errors import fail, handle_errors, writable_folder
from ddpm_cli.cli.options import (AllowPickleOpt, DeviceOpt, DtypeOpt, FormatOpt, OverwriteOpt, QuietOpt, RevisionOpt,
                                  SeedOpt, SkipExistingOpt, complete)
from ddpm_cli.cli.progress import StepProgress, say
from ddpm_cli.engine.choices import SAMPLERS, SPACINGS, VARIANCES

EXAMPLES = """
Examples:

  ddpm sample runs/fashion -n 16 --grid

  ddpm sample google/ddpm-cifar10-32 --sampler ddim --steps 50 --seed 100 -o out/

  ddpm sample runs/fashion-classes --class sneaker --cfg 3 -n 8

  ddpm sample runs/fashion -n 4 --format json | jq -r '.images[].path'
"""


def image_path(outdir: Path, seed: int) -> Path:
    return outdir / f"{seed:06d}.png"


@handle_errors
def sample(
    model: Annotated[Path, typer.Argument(help="A model folder, a built-in name, or a Hub id.", show_default=False)],
    num_images: Annotated[int, typer.Option("--num-images", "-n", min=1, help="How many images.")] = 8,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images sampled together.")] = 16,
    sampler: Annotated[str, typer.Option("--sampler", autocompletion=complete(SAMPLERS), help=f"One of {', '.join(SAMPLERS)}.")] = "dpmpp-2m",
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Denoising steps [default: ddpm every training step, ddim 50, dpmpp-2m 20].")] = None,
    eta: Annotated[float, typer.Option("--eta", min=0.0, help="DDIM noise: 0 deterministic, 1 like DDPM.")] = 0.0,
    spacing: Annotated[str | None, typer.Option("--spacing", autocompletion=complete(SPACINGS), help=f"Timestep spacing: {', '.join(SPACINGS)} [default: the sampler's usual].")] = None,
    variance: Annotated[str | None, typer.Option("--variance", autocompletion=complete(VARIANCES), help=f"DDPM variance: {', '.join(VARIANCES)} [default: the model's].")] = None,
    class_spec: Annotated[str | None, typer.Option("--class", help="Class of a class-conditional model: index or name [default: none, unconditional].")] = None,
    cfg: Annotated[float, typer.Option("--cfg", min=0.0, help="Guidance scale w with --class: 0 unconditional, 1 conditional, >1 stronger.")] = 2.0,
    seed: SeedOpt = 0,
    outdir: Annotated[Path, typer.Option("--outdir", "-o", help="Folder for the images.")] = Path("samples"),
    grid: Annotated[bool, typer.Option("--grid", help="Also write grid.png with every image.")] = False,
    output_format: FormatOpt = "text",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    revision: RevisionOpt = None,
    allow_pickle: AllowPickleOpt = False,
    overwrite: OverwriteOpt = False,
    skip_existing: SkipExistingOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Sample images from a model; write one PNG per seed and print their paths."""
    model = str(model)
    if sampler not in SAMPLERS:
        raise fail(f"unknown --sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}", 2)
    if output_format not in ("text", "json"):
        raise fail(f"unknown --format {output_format!r}; choose text or json", 2)
    if overwrite and skip_existing:
        raise fail("--overwrite and --skip-existing cannot be given together", 2)
    seeds = list(range(seed, seed + num_images))
    if grid and (outdir / "grid.png").exists() and not overwrite:
        raise fail(f"{outdir / 'grid.png'} exists; pass --overwrite to replace it", 2)
    existing = [s for s in seeds if image_path(outdir, s).exists()]
    if existing and not (overwrite or skip_existing):
        raise fail(f"{image_path(outdir, existing[0])} exists ({len(existing)} of {len(seeds)} outputs exist); "
                   "pass --overwrite to replace or --skip-existing to keep them", 2)
    todo = [s for s in seeds if s not in existing] if skip_existing else seeds
    writable_folder(outdir)

    from ddpm_cli import __version__
    from ddpm_cli.engine.device import describe
    from ddpm_cli.engine.generate import SamplerSettings, generate
    from ddpm_cli.engine.imageio import load_image, make_grid, save_png, tensor_to_pil
    from ddpm_cli.engine.pipeline import load_pipeline

    pipeline = load_pipeline(model, revision, device, dtype, allow_pickle)
    settings = SamplerSettings(sampler, steps, eta, spacing, variance).resolved(pipeline)
    class_label = None if class_spec is None else pipeline.class_index(class_spec)
    say(f"ddpm: {model}: {describe(pipeline.device, pipeline.dtype)}; {settings.sampler}, {settings.steps} steps", quiet)
    channels, height, width = pipeline.sample_shape
    guidance = {} if class_label is None else {"class": class_label, "class_name": pipeline.class_name(class_label), "cfg": cfg}
    params = {"model": model, **settings.describe(), **guidance, "size": f"{width}x{height}",
              "dtype": str(pipeline.dtype).removeprefix("torch."), "version": __version__}
    written, started = [], time.perf_counter()
    n_batches = -(-len(todo) // batch_size)
    with StepProgress("sampling", n_batches * settings.steps, quiet) as bar:
        done_steps = 0

        def on_step(info: dict) -> None:
            bar.update(done_steps + info["i"] + 1)

        for batch_seeds, images in generate(pipeline, todo, batch_size, settings, on_step, class_label, cfg):
            for s, image in zip(batch_seeds, images):
                path = save_png(tensor_to_pil(image), image_path(outdir, s), {**params, "seed": s}, overwrite=True)
                written.append({"path": str(path), "seed": s})
                if output_format == "text":
                    print(path, flush=True)
            done_steps += settings.steps
    grid_path = None
    if grid:
        tiles = [load_image(image_path(outdir, s), mode="L" if channels == 1 else "RGB") for s in seeds]
        grid_path = save_png(make_grid(tiles), outdir / "grid.png", {**params, "seeds": f"{seeds[0]}-{seeds[-1]}"},
                             overwrite=True)
        if output_format == "text":
            print(grid_path, flush=True)
    if output_format == "json":
        print(json.dumps({"model": model, **settings.describe(), **guidance, "images": written,
                          "skipped": [str(image_path(outdir, s)) for s in seeds if s not in todo],
                          "grid": str(grid_path) if grid_path else None,
                          "seconds": round(time.perf_counter() - started, 3)}, indent=2))
