"""``ddpm sample MODEL``: images from an unconditional or class-conditional diffusion model."""

from __future__ import annotations

from typing import Annotated

import typer

from ddpm_cli.cli.errors import handle_errors
from ddpm_cli.cli.generation import Generation
from ddpm_cli.engine.models.resolve import builtin_models
from ddpm_cli.cli.options import CfgRescaleOpt, LoraOpt
from ddpm_cli.cli.options import (AllowPickleOpt, BatchSizeOpt, ClassOpt, CompileOpt, DeviceOpt, DtypeOpt, EtaOpt,
                                  FormatOpt, GridOpt, InitImageOpt, ResizeOpt, StrengthOpt, num_images_option, OutdirAlias, OutputOpt, OverwriteOpt, QuietOpt, RevisionOpt,
                                  SamplerOpt, ImageSeedOpt, SeedListOpt, SkipExistingOpt, SpacingOpt, StepsOpt, VarianceOpt, SigmasOpt, OrderOpt, ClipX0Opt, one)
from ddpm_cli.cli.img2img import InitImages
from ddpm_cli.cli.init_noise import AnimateOpt, FramesOpt, InitNoiseOpt, InitNoiseRowOpt, InterpolateOpt, NoiseStart
from ddpm_cli.cli.render import Job

EXAMPLES = """
Examples:

\b
  ddpm sample fashion-mnist -n 16 --grid                 # a built-in model (ddpm models lists them)
  ddpm sample google/ddpm-cifar10-32 --sampler ddim --steps 50 --seed 100 -o out/
  ddpm sample runs/fashion-classes --class sneaker --cfg 3 -n 8
  ddpm sample fashion-mnist -n 1 -o one.png              # one image: -o may name the file
  ddpm sample runs/fashion -n 4 --format json | jq -r '.images[].path'
  ddpm sample fashion-mnist --seeds 3,17,42 --grid             # exact seeds (ranges: 0-3,10); --seed random
  ddpm sample fashion-mnist --init-image shoe.png --strength 0.6  # image-to-image; a folder: {image}-{seed}.png
  ddpm sample fashion-mnist --init-noise noise.safetensors --sampler ddim --steps 50   # x_T from `ddpm invert`
  ddpm sample fashion-mnist --interpolate 3,17 --frames 12 --grid --animate gif --sampler ddim
  ddpm sample fashion-mnist --lora runs/lora:0.8 --lora style.safetensors:0.5   # LoRA files (diffusers' format)
"""

SAMPLE_IMAGES = 8
SampleImagesOpt = num_images_option(SAMPLE_IMAGES)

ModelArg = Annotated[str, typer.Argument(
    metavar="MODEL", show_default=False,
    help=f"A run folder, a built-in model ({', '.join(builtin_models()) or 'none installed'}; see `ddpm models`), "
         "or a Hub id (owner/name).")]


@handle_errors
def sample(
    model: ModelArg,
    num_images: SampleImagesOpt = None,
    batch_size: BatchSizeOpt = 16,
    sampler: SamplerOpt = "dpmpp-2m",
    steps: StepsOpt = None,
    eta: EtaOpt = None,
    spacing: SpacingOpt = None,
    variance: VarianceOpt = None,
    sigmas: SigmasOpt = None,
    order: OrderOpt = None,
    clip_x0: ClipX0Opt = None,
    class_spec: ClassOpt = None,
    cfg: Annotated[float | None, typer.Option("--cfg", min=0.0, show_default=False, help="With --class: guidance scale w, 0 unconditional, 1 conditional, >1 stronger [default: 2].")] = None,
    cfg_rescale: CfgRescaleOpt = None,
    seed: ImageSeedOpt = None,
    seed_list: SeedListOpt = None,
    output: OutputOpt = None,
    outdir: OutdirAlias = None,
    grid: GridOpt = False,
    init_image: InitImageOpt = None,
    strength: StrengthOpt = None,
    resize: ResizeOpt = False,
    init_noise: InitNoiseOpt = None,
    init_noise_row: InitNoiseRowOpt = None,
    interpolate: InterpolateOpt = None,
    frames: FramesOpt = None,
    animate: AnimateOpt = None,
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
    """Sample images from a model; write one PNG per seed ({seed:06d}.png) and print their paths.

    Under torchrun (torchrun --nproc-per-node N -m ddpm_cli sample ...) the seeds are shared out among
    the processes: the same files as one process, made N at a time.
    """
    start = NoiseStart(init_noise, init_noise_row, interpolate, frames, animate, init_image)
    run = Generation.of(locals(), images_default=start.images_default(SAMPLE_IMAGES))
    start.check_counts(run.seeds, num_images, seed_list)
    class_spec = one(class_spec, "--class")
    run.check_guidance(cfg, ("--class", class_spec), rescale=cfg_rescale)
    init = InitImages(init_image, strength, resize)
    jobs = start.frame_jobs(run) if start.interpolating else \
        [Job(s, run.path(f"{stem}-{s:06d}.png" if stem else f"{s:06d}.png"), params={**init.params(image), **start.row_params(i)})
         for stem, image in init.each() for i, s in enumerate(run.seeds)]
    todo, skipped = run.plan(jobs, grid)
    start.check_extras(run, grid)

    pipeline, settings = run.load()
    condition, scale, guidance = run.condition(pipeline, cfg, class_spec=class_spec)
    start.prepare(pipeline, model, run.seeds)
    steps = init.prepare(pipeline, settings, pipeline.image_size, todo)
    run.announce(pipeline, settings, init.describe(steps))
    for job in todo:
        job.condition = condition
    params = run.params(pipeline, settings, pipeline.image_size, command="sample", **guidance, **init.settings(),
                        **start.settings())
    run.render(pipeline, settings, todo, skipped, params, scale, grid=grid and not start.interpolating,
               steps_per_batch=steps, generate=start.generator(pipeline, settings, scale))
    start.finish(run, pipeline, todo + skipped, params, grid)
