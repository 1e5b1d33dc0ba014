"""``ddpm upscale [MODEL] IMAGE``: super-resolution with an SR3 model (`ddpm train --task superres`), a
Stable Diffusion upscaler (StableDiffusionUpscalePipeline format) or an LDM one (LDMSuperResolutionPipeline)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ddpm_cli.cli.errors import EXIT_USAGE, fail, handle_errors
from ddpm_cli.cli.generation import Generation
from ddpm_cli.cli.options import CfgRescaleOpt, LoraOpt
from ddpm_cli.cli.options import (AllowPickleOpt, BatchSizeOpt, CompileOpt, DeviceOpt, DtypeOpt, EtaOpt, FormatOpt, GridOpt,
                                  NumImagesOpt, OutdirAlias, OutputOpt, OverwriteOpt, QuietOpt, RevisionOpt, SamplerOpt,
                                  ImageSeedOpt, SeedListOpt, SkipExistingOpt, SpacingOpt, VarianceOpt, SigmasOpt, OrderOpt, ClipX0Opt, steps_option)
from ddpm_cli.cli.render import Job

DEFAULT_UPSCALER = "emoji-upscaler"  # built in: `ddpm train emoji --task superres --scale 2` (see its MODEL_CARD.md)
UPSCALE_DDPM_STEPS = 100  # the ancestral sampler's default here, rather than every training timestep
UpscaleStepsOpt = steps_option(f"ddpm {UPSCALE_DDPM_STEPS}, ddim 50, dpmpp-2m 20")
SD_DEFAULTS = {"--prompt": "", "--negative-prompt": "", "--cfg": 9.0, "--noise-level": 20}  # Stable Diffusion upscalers only

EXAMPLES = """
Examples:

\b
  ddpm upscale examples/images/cat-face.png              # the built-in 2x upscaler (emoji-upscaler): 32x32 -> 64x64
  ddpm upscale runs/sr small.png                         # ddpm sampler, 100 steps; out: samples/small-x4-000000.png
  ddpm upscale runs/sr photo.png --tile 64 --overlap 16 --steps 50 -n 3       # tiles of 64x64 output pixels
  ddpm upscale stabilityai/stable-diffusion-x4-upscaler cat.png --prompt "a white cat" --noise-level 20 --steps 50
  ddpm upscale CompVis/ldm-super-resolution-4x-openimages cat.png --sampler ddim --steps 100
"""


@handle_errors
def upscale(
    words: Annotated[list[str], typer.Argument(metavar="[MODEL] IMAGE", show_default=False, help=f"MODEL: a super-resolution run (ddpm train --task superres), or a Stable Diffusion or LDM upscaler folder or Hub id [default: the built-in {DEFAULT_UPSCALER}]. IMAGE: the low-resolution image.")],
    scale: Annotated[int | None, typer.Option("--scale", help="Upscaling factor; must be the model's [default: the model's].", show_default=False)] = None,
    tile: Annotated[int | None, typer.Option("--tile", min=8, show_default=False, help="Tile side in pixels of the full-resolution (output) image: larger images are upscaled in overlapping tiles [default: the model's size].")] = None,
    overlap: Annotated[int | None, typer.Option("--overlap", min=0, show_default=False, help="Output pixels shared by neighbouring tiles, blended [default: tile / 4].")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", show_default=False, help="Stable Diffusion upscalers: what the image shows [default: \"\"].")] = None,
    negative_prompt: Annotated[str | None, typer.Option("--negative-prompt", show_default=False, help="Stable Diffusion upscalers: what to steer away from [default: \"\"].")] = None,
    cfg: Annotated[float | None, typer.Option("--cfg", min=0.0, show_default=False, help="Stable Diffusion upscalers: guidance scale [default: 9].")] = None,
    cfg_rescale: CfgRescaleOpt = None,
    noise_level: Annotated[int | None, typer.Option("--noise-level", min=0, show_default=False, help="Stable Diffusion upscalers: noise added to the input (its low_res_scheduler's timestep) [default: 20].")] = None,
    steps: UpscaleStepsOpt = None,
    sampler: SamplerOpt = "ddpm",  # ancestral: on a real photograph the ODE samplers left grain it does not (README)
    eta: EtaOpt = None,
    spacing: SpacingOpt = None,
    variance: VarianceOpt = None,
    sigmas: SigmasOpt = None,
    order: OrderOpt = None,
    clip_x0: ClipX0Opt = None,
    seed: ImageSeedOpt = None,
    seed_list: SeedListOpt = None,
    num_images: NumImagesOpt = None,
    batch_size: BatchSizeOpt = 4,
    name: Annotated[str | None, typer.Option("--name", help="File name prefix [default: the image's name]: NAME-xS-{seed:06d}.png.")] = None,
    output: OutputOpt = None,
    outdir: OutdirAlias = None,
    grid: GridOpt = False,
    output_format: FormatOpt = "text",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    revision: RevisionOpt = None,
    lora: LoraOpt = None,
    allow_pickle: AllowPickleOpt = False,
    compile: CompileOpt = False,
    overwrite: OverwriteOpt = False,
    skip_existing: SkipExistingOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Upscale an image with a diffusion super-resolution model; one PNG per seed ({name}-x{scale}-{seed:06d}.png)."""
    if len(words) > 2:
        raise fail(f"upscale takes [MODEL] IMAGE, got {len(words)} arguments ({' '.join(map(repr, words))}); "
                   "upscale one image per call", EXIT_USAGE)
    model, image = (DEFAULT_UPSCALER, *words) if len(words) == 1 else words
    image = Path(image)
    run = Generation.of(locals())
    run.steps = steps or (UPSCALE_DDPM_STEPS if sampler == "ddpm" else None)
    from ddpm_cli.engine.io.images import load_image

    low = load_image(image, mode="RGB")  # read now: a bad image fails before the model loads

    from ddpm_cli.engine.io.images import pil_to_tensor
    from ddpm_cli.engine.tasks.superres import UpscaleSettings, upscale_batch

    pipeline, settings = run.load()
    if not pipeline.upscale:
        raise fail(f"{model} is not a super-resolution model; train one with `ddpm train --task superres --scale S`",
                   EXIT_USAGE)
    factor = pipeline.upscale
    if scale is not None and scale != factor:
        raise fail(f"--scale {scale}: {model} upscales by {factor}", EXIT_USAGE)
    sd = pipeline.upscaler == "sd"
    given = {"--prompt": prompt, "--negative-prompt": negative_prompt, "--cfg": cfg, "--noise-level": noise_level}
    unused = [flag for flag, value in {**given, "--cfg-rescale": cfg_rescale}.items() if value is not None and not sd]
    if unused:
        raise fail(f"{unused[0]} applies to Stable Diffusion upscalers; {model} is conditioned on the image alone",
                   EXIT_USAGE)
    sd_options = {flag: SD_DEFAULTS[flag] if value is None else value for flag, value in given.items()}
    unit = 1 if pipeline.upscaler == "sr3" else factor  # latent upscalers' networks work at the input's size
    for flag, value in (("--tile", tile), ("--overlap", overlap)):
        if value is not None and value % unit:
            raise fail(f"{flag} {value}: {model} works in blocks of {unit} output pixels; give a multiple of {unit}",
                       EXIT_USAGE)
    todo, skipped = run.plan([Job(s, run.path(f"{name or image.stem}-x{factor}-{s:06d}.png")) for s in run.seeds],
                             grid)
    picture = pil_to_tensor(low.convert("L") if pipeline.image_channels == 1 else low)
    width, height = low.width * factor, low.height * factor
    run.announce(pipeline, settings, f"; {low.width}x{low.height} -> {width}x{height}")
    options = UpscaleSettings(tile and tile // unit, overlap and overlap // unit, sd_options["--prompt"],
                              sd_options["--negative-prompt"], sd_options["--cfg"], sd_options["--noise-level"])
    from ddpm_cli.engine.models.fingerprint import file_sha256

    extra = {"command": "upscale", "task": "upscale", "image": str(image), "image_sha256": file_sha256(image),
             "scale": factor, "tile": tile, "overlap": overlap}
    if sd:
        extra.update(prompt=options.prompt, negative_prompt=options.negative_prompt or None, cfg=options.cfg,
                     noise_level=options.noise_level)
    params = run.params(pipeline, settings, (height, width), **extra)

    def generate(seeds, on_step, condition):
        return upscale_batch(pipeline, seeds, settings, picture, on_step, options)

    run.render(pipeline, settings, todo, skipped, params, grid=grid, generate=generate)
