"""``ddpm inpaint MODEL --image IMG --mask MASK``: fill the masked region with any model, no special training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ddpm_cli.cli.errors import EXIT_USAGE, fail, handle_errors
from ddpm_cli.cli.generation import Generation
from ddpm_cli.cli.options import CfgRescaleOpt, LoraOpt
from ddpm_cli.cli.options import (AllowPickleOpt, BatchSizeOpt, ClassOpt, CompileOpt, DeviceOpt, DtypeOpt, EtaOpt,
                                  FormatOpt, GridOpt, NumImagesOpt, OutdirAlias, OutputOpt, OverwriteOpt, QuietOpt, RevisionOpt,
                                  SamplerOpt, ImageSeedOpt, SeedListOpt, SkipExistingOpt, SpacingOpt, VarianceOpt, SigmasOpt, OrderOpt, ClipX0Opt, one, steps_option)
from ddpm_cli.cli.render import Job

EXAMPLES = """
Examples:

\b
  ddpm inpaint fashion-mnist --image shirt.png --mask hole.png -n 4        # ddpm sampler, 50 steps
  ddpm inpaint runs/photos --image cat.jpg --mask mask.png --sampler ddpm --steps 250 --jump-n-sample 10
  ddpm inpaint runs/emoji --image face.png --mask mouth.png --prompt "grinning face" --cfg 5
  ddpm inpaint runs/latent --image x.png --mask m.png --preserve-known      # latent model: exact known pixels
"""


# Measured by benchmarks/inpaint_defaults.py (16 Fashion-MNIST test images x 4 masks x 2 seeds, the
# built-in model): the ancestral sampler at 50 steps fills holes closest to the truth (hole MSE 0.147,
# 6% of fills left speckled) where dpmpp-2m at 20 steps, the generating commands' default, gives
# 0.236 and 11%, and ddim at 20 steps 0.218 and 9% (docs/experiments.md).
INPAINT_SAMPLER, INPAINT_DDPM_STEPS = "ddpm", 50
InpaintStepsOpt = steps_option(f"ddpm {INPAINT_DDPM_STEPS}, ddim 50, dpmpp-2m 20")


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^a-zA-Z0-9_-]+", "-", text).strip("-") or "inpaint"


@handle_errors
def inpaint(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Any model ddpm samples: a run, a built-in name, a pipeline folder or Hub id.", show_default=False)],
    image: Annotated[Path, typer.Option("--image", help="The image to fill in.", show_default=False)] = None,
    mask: Annotated[Path, typer.Option("--mask", help="White (grey >= 128) = generate, black = keep; RGBA/palette masks are flattened onto black first.", show_default=False)] = None,
    invert_mask: Annotated[bool, typer.Option("--invert-mask", help="Black = generate instead.")] = False,
    resize_mask: Annotated[bool, typer.Option("--resize-mask", help="Resize a mask of another size to the image's (nearest neighbour).")] = False,
    preserve_known: Annotated[bool, typer.Option("--preserve-known", help="Latent models: paste the original pixels back outside the mask after decoding.")] = False,
    prompt: Annotated[str | None, typer.Option("--prompt", help="Text-conditional models: what to draw in the hole.")] = None,
    negative_prompt: Annotated[str, typer.Option("--negative-prompt", help="Text-conditional models: what to steer away from.")] = "",
    class_spec: ClassOpt = None,
    cfg: Annotated[float | None, typer.Option("--cfg", min=0.0, help="Guidance scale [default: 7.5 with --prompt, 2 with --class].", show_default=False)] = None,
    cfg_rescale: CfgRescaleOpt = None,
    jump_length: Annotated[int, typer.Option("--jump-length", min=1, help="RePaint: steps between jumps back up.")] = 10,
    jump_n_sample: Annotated[int, typer.Option("--jump-n-sample", min=1, help="RePaint: times each stretch is denoised (1: no resampling; >1 needs --sampler ddpm).")] = 1,
    steps: InpaintStepsOpt = None,
    sampler: SamplerOpt = INPAINT_SAMPLER,
    eta: EtaOpt = None,
    spacing: SpacingOpt = None,
    variance: VarianceOpt = None,
    sigmas: SigmasOpt = None,
    order: OrderOpt = None,
    clip_x0: ClipX0Opt = None,
    seed: ImageSeedOpt = None,
    seed_list: SeedListOpt = None,
    num_images: NumImagesOpt = None,
    batch_size: BatchSizeOpt = 8,
    name: Annotated[str | None, typer.Option("--name", help="File name prefix [default: the image's name]: NAME-{seed:06d}.png.")] = None,
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
    """Fill the white region of a mask in an image, with any model; one PNG per seed ({name}-{seed:06d}.png)."""
    run = Generation.of(locals())
    run.steps = steps or (INPAINT_DDPM_STEPS if sampler == "ddpm" else None)
    class_spec = one(class_spec, "--class")
    if image is None or mask is None:
        raise fail("pass the image with --image and the region to fill with --mask", EXIT_USAGE)
    if prompt is not None and class_spec is not None:
        raise fail("--prompt and --class cannot be given together", EXIT_USAGE)
    run.check_guidance(cfg, ("--prompt", prompt), ("--class", class_spec), rescale=cfg_rescale)
    if negative_prompt and prompt is None:
        raise fail("--negative-prompt goes with --prompt; give --prompt too or drop it", EXIT_USAGE)
    from ddpm_cli.engine.io.images import load_image
    from ddpm_cli.engine.tasks.inpaint import read_mask, repaint_levels

    known = load_image(image, mode="RGB")  # read now: a bad image fails before the model loads
    region = read_mask(mask, (known.height, known.width), invert_mask, resize_mask)
    stem = _slug(name or image.stem)
    todo, skipped = run.plan([Job(s, run.path(f"{stem}-{s:06d}.png")) for s in run.seeds], grid)

    from ddpm_cli.engine.io.images import pil_to_tensor
    from ddpm_cli.engine.tasks.inpaint import inpaint_batch

    pipeline, settings = run.load()
    factor = pipeline.unet_factor * pipeline.latent_factor
    if known.width % factor or known.height % factor:
        raise fail(f"{image} is {known.width}x{known.height}; {model} needs sides that are multiples of {factor} "
                   "(crop or resize the image and its mask)", EXIT_USAGE)
    if prompt is None and class_spec is None and pipeline.text_encoder is not None:
        raise fail(f"{model} is text-conditional; pass --prompt (\"\" for unconditional)", EXIT_USAGE)
    condition, scale, guidance = run.condition(pipeline, cfg, class_spec, prompt, negative_prompt)
    for job in todo:
        job.condition = condition
    picture = pil_to_tensor(known.convert("L") if pipeline.image_channels == 1 else known)
    resampling = settings.sampler == "ddpm" and jump_n_sample > 1
    if jump_n_sample > 1 and not resampling:
        raise fail(f"--jump-n-sample (RePaint resampling) needs --sampler ddpm, not {settings.sampler}", EXIT_USAGE)
    run.announce(pipeline, settings, (f", RePaint jump length {jump_length} x {jump_n_sample}" if resampling else "")
                 + f"; filling {int(region.sum())} of {region.numel()} pixels")
    from ddpm_cli.engine.models.fingerprint import file_sha256

    params = run.params(pipeline, settings, (known.height, known.width), command="inpaint", task="inpaint",
                        image=str(image), image_sha256=file_sha256(image), mask=str(mask),
                        mask_sha256=file_sha256(mask), invert_mask=invert_mask or None,
                        resize_mask=resize_mask or None, preserve_known=preserve_known or None, **guidance)
    if resampling:
        params.update(jump_length=jump_length, jump_n_sample=jump_n_sample)

    def generate(seeds, on_step, condition):
        return inpaint_batch(pipeline, seeds, settings, picture, region, on_step, condition, scale,
                             jump_length, jump_n_sample, preserve_known)

    moves = len(repaint_levels(settings.steps, jump_length, jump_n_sample)) - 1 if resampling else None
    run.render(pipeline, settings, todo, skipped, params, scale, grid=grid, generate=generate,
               steps_per_batch=moves)
