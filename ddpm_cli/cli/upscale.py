"""``ddpm upscale MODEL IMAGE``: super-resolution with an SR3 model (`ddpm train --task superres`), a
Stable Diffusion upscaler (StableDiffusionUpscalePipeline format) or an LDM one (LDMSuperResolutionPipeline)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ddpm_cli.cli.errors import EXIT_USAGE, fail, handle_errors
from ddpm_cli.cli.options import (AllowPickleOpt, CompileOpt, BatchSizeOpt, DeviceOpt, DtypeOpt, EtaOpt, FormatOpt, NumImagesOpt,
                                  OutdirOpt, OverwriteOpt, QuietOpt, RevisionOpt, SamplerOpt, SeedOpt, SkipExistingOpt,
                                  SpacingOpt, VarianceOpt, check_choices)
from ddpm_cli.cli.progress import say
from ddpm_cli.cli.render import Job, plan, render

UPSCALE_DDPM_STEPS = 100  # the ancestral sampler's default here, rather than every training timestep

EXAMPLES = """
Examples:

\b
  ddpm upscale runs/sr small.png                         # ddpm sampler, 100 steps; out: samples/small-x4-000000.png
  ddpm upscale runs/sr photo.png --tile 64 --overlap 16 --steps 50 -n 3
  ddpm upscale stabilityai/stable-diffusion-x4-upscaler cat.png --prompt "a white cat" --noise-level 20 --steps 50
  ddpm upscale CompVis/ldm-super-resolution-4x-openimages cat.png --sampler ddim --steps 100
"""


@handle_errors
def upscale(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="A super-resolution run (ddpm train --task superres), or a Stable Diffusion or LDM upscaler folder or Hub id.", show_default=False)],
    image: Annotated[Path, typer.Argument(metavar="IMAGE", help="The low-resolution image.", show_default=False)],
    scale: Annotated[int | None, typer.Option("--scale", help="Upscaling factor; must be the model's [default: the model's].", show_default=False)] = None,
    tile: Annotated[int | None, typer.Option("--tile", min=8, help="Tile size for images larger than the model, in the network's units (output pixels; latents for SD upscalers) [default: the model's size].", show_default=False)] = None,
    overlap: Annotated[int | None, typer.Option("--overlap", min=0, help="Pixels shared by neighbouring tiles, blended [default: tile / 4].", show_default=False)] = None,
    prompt: Annotated[str, typer.Option("--prompt", help="Stable Diffusion upscalers: what the image shows.")] = "",
    negative_prompt: Annotated[str, typer.Option("--negative-prompt", help="Stable Diffusion upscalers: what to steer away from.")] = "",
    cfg: Annotated[float, typer.Option("--cfg", min=0.0, help="Stable Diffusion upscalers: guidance scale.")] = 9.0,
    noise_level: Annotated[int, typer.Option("--noise-level", min=0, help="Stable Diffusion upscalers: noise added to the input (its low_res_scheduler's timestep).")] = 20,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Denoising steps [default: ddpm 100, ddim 50, dpmpp-2m 20].", show_default=False)] = None,
    sampler: SamplerOpt = "ddpm",  # ancestral: on a real photograph the ODE samplers left grain it does not (README)
    eta: EtaOpt = 0.0,
    spacing: SpacingOpt = None,
    variance: VarianceOpt = None,
    seed: SeedOpt = 0,
    num_images: NumImagesOpt = 1,
    batch_size: BatchSizeOpt = 4,
    name: Annotated[str | None, typer.Option("--name", help="File name prefix [default: the image's name]: NAME-xS-{seed:06d}.png.")] = None,
    outdir: OutdirOpt = Path("samples"),
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
    """Upscale an image with a diffusion super-resolution model; one PNG per seed."""
    check_choices(sampler, output_format)
    from ddpm_cli.engine.imageio import load_image

    low = load_image(image, mode="RGB")  # read now: a bad image fails before the model loads

    from ddpm_cli import __version__
    from ddpm_cli.engine.device import describe
    from ddpm_cli.engine.generate import SamplerSettings
    from ddpm_cli.engine.imageio import pil_to_tensor
    from ddpm_cli.engine.pipeline import load_pipeline
    from ddpm_cli.engine.superres import UpscaleSettings, upscale_batch

    pipeline = load_pipeline(model, revision, device, dtype, allow_pickle, compile)
    if not pipeline.upscale:
        raise fail(f"{model} is not a super-resolution model; train one with `ddpm train --task superres --scale S`",
                   EXIT_USAGE)
    if scale is not None and scale != pipeline.upscale:
        raise fail(f"--scale {scale}: {model} upscales by {pipeline.upscale}", EXIT_USAGE)
    factor = pipeline.upscale
    stem = name or image.stem
    jobs = [Job(s, outdir / f"{stem}-x{factor}-{s:06d}.png") for s in range(seed, seed + num_images)]
    todo, skipped = plan(jobs, outdir, overwrite, skip_existing, grid=False)
    steps = steps or (UPSCALE_DDPM_STEPS if sampler == "ddpm" else None)
    settings = SamplerSettings(sampler, steps, eta, spacing, variance).resolved(pipeline)
    picture = pil_to_tensor(low.convert("L") if pipeline.image_channels == 1 else low)
    width, height = low.width * factor, low.height * factor
    say(f"ddpm: {model}: {describe(pipeline.device, pipeline.dtype)}; {settings.sampler}, {settings.steps} steps; "
        f"{low.width}x{low.height} -> {width}x{height}", quiet)
    sd = pipeline.upscaler == "sd"
    if not sd and (prompt or negative_prompt):
        raise fail(f"--prompt applies to Stable Diffusion upscalers; {model} is conditioned on the image alone", EXIT_USAGE)
    options = UpscaleSettings(tile, overlap, prompt, negative_prompt, cfg, noise_level)
    params = {"model": model, "task": "upscale", "image": str(image), "scale": factor, **settings.describe(),
              "size": f"{width}x{height}", "tile": tile, "overlap": overlap,
              "dtype": str(pipeline.dtype).removeprefix("torch."), "version": __version__}
    if sd:
        params.update(prompt=prompt, negative_prompt=negative_prompt or None, cfg=cfg, noise_level=noise_level)

    def generate(seeds, on_step, condition):
        return upscale_batch(pipeline, seeds, settings, picture, on_step, options)

    render(pipeline, todo, skipped, settings, 1.0, batch_size, {k: v for k, v in params.items() if v is not None},
           output_format, quiet, generate=generate, overwrite=overwrite)
