"""``ddpm txt2img PROMPT -m MODEL``: images from a text-conditional diffusion model."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from ddpm_cli.cli.errors import EXIT_USAGE, fail, handle_errors
from ddpm_cli.cli.options import (AllowPickleOpt, CompileOpt, BatchSizeOpt, DeviceOpt, DtypeOpt, EtaOpt, FormatOpt, NumImagesOpt,
                                  OutdirOpt, OverwriteOpt, QuietOpt, RevisionOpt, SamplerOpt, SeedOpt, SkipExistingOpt,
                                  SpacingOpt, StepsOpt, VarianceOpt, check_choices)
from ddpm_cli.cli.progress import say
from ddpm_cli.cli.render import Job, plan, render

DEFAULT_MODEL = "emoji"  # built in: trained by `ddpm train emoji --conditioning text` (see its MODEL_CARD.md)

EXAMPLES = """
Examples:

\b
  ddpm txt2img "a cat" --cfg 7.5 --steps 30                        # the built-in emoji model
  ddpm txt2img "a cat face" -m runs/emoji --cfg 7.5 --steps 30
  ddpm txt2img "red apple" -m runs/emoji --negative-prompt "green" -n 4 --seed 10
  ddpm txt2img --from-file prompts.txt -m runs/emoji -o out/       # one prompt per line; - reads stdin
"""


def slug(prompt: str, limit: int = 40) -> str:
    """A file-name-safe form of a prompt: "A red apple!" -> "a-red-apple"."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].strip("-") or "prompt"


def read_prompts(prompt: str | None, from_file: str | None) -> list[str]:
    if (prompt is None) == (from_file is None):
        raise fail("give a PROMPT or --from-file FILE (one prompt per line), not both or neither", EXIT_USAGE)
    if prompt is not None:
        return [prompt]
    try:
        text = sys.stdin.read() if from_file == "-" else Path(from_file).read_text()
    except OSError as exc:
        raise fail(f"cannot read --from-file {from_file} ({exc.strerror or exc})", EXIT_USAGE) from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise fail(f"--from-file {from_file} holds no prompt", EXIT_USAGE)
    return prompts


@handle_errors
def txt2img(
    prompt: Annotated[str | None, typer.Argument(metavar="PROMPT", help="What to draw.", show_default=False)] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="A text-conditional model: the built-in emoji, a run folder, a Stable Diffusion-format folder or Hub id.")] = DEFAULT_MODEL,
    negative_prompt: Annotated[str, typer.Option("--negative-prompt", help="What to steer away from (replaces the empty prompt of the unconditional branch).")] = "",
    cfg: Annotated[float, typer.Option("--cfg", min=0.0, help="Guidance scale w: eps_uncond + w (eps_cond - eps_uncond).")] = 7.5,
    steps: StepsOpt = 30,
    sampler: SamplerOpt = "dpmpp-2m",
    eta: EtaOpt = 0.0,
    spacing: SpacingOpt = None,
    variance: VarianceOpt = None,
    seed: SeedOpt = 0,
    num_images: NumImagesOpt = 1,
    batch_size: BatchSizeOpt = 8,
    width: Annotated[int | None, typer.Option("--width", min=8, help="Width in pixels [default: the model's].")] = None,
    height: Annotated[int | None, typer.Option("--height", min=8, help="Height in pixels [default: the model's].")] = None,
    from_file: Annotated[str | None, typer.Option("--from-file", help="Prompts, one per line ('-': stdin).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="File name prefix instead of the prompt's slug: NAME-{seed:06d}.png (one prompt only).")] = None,
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
    """Generate images from text prompts; write one PNG per prompt and seed and print their paths."""
    check_choices(sampler, output_format)
    prompts = read_prompts(prompt, from_file)
    if name is not None and (len(prompts) > 1 or slug(name) != name):
        raise fail("--name takes one prompt and a plain name (letters, digits and -)", EXIT_USAGE)
    jobs = [Job(s, outdir / f"{name or slug(p)}-{s:06d}.png", params={"prompt": p}) for p in prompts
            for s in range(seed, seed + num_images)]
    todo, skipped = plan(jobs, outdir, overwrite, skip_existing, grid=False)

    from ddpm_cli import __version__
    from ddpm_cli.engine.device import describe
    from ddpm_cli.engine.generate import SamplerSettings
    from ddpm_cli.engine.pipeline import Condition, load_pipeline

    pipeline = load_pipeline(model, revision, device, dtype, allow_pickle, compile)
    if pipeline.text_encoder is None:
        raise fail(f"{model} is not text-conditional; use `ddpm sample {model}`", EXIT_USAGE)
    settings = SamplerSettings(sampler, steps, eta, spacing, variance).resolved(pipeline)
    say(f"ddpm: {model}: {describe(pipeline.device, pipeline.dtype)}; {settings.sampler}, {settings.steps} steps, "
        f"cfg {cfg}", quiet)
    for text in dict.fromkeys([*prompts, negative_prompt]):
        dropped = pipeline.text_encoder.truncated_words(text)
        if dropped:
            say(f"ddpm: warning: prompt longer than the text encoder's {pipeline.text_encoder.max_length} tokens; "
                f"dropped: {' '.join(dropped)}")
    model_height, model_width = pipeline.image_size
    size = (height or model_height, width or model_width)
    factor = pipeline.unet_factor * pipeline.latent_factor
    if size[0] % factor or size[1] % factor:
        raise fail(f"--width and --height must be multiples of {factor} for {model}, got {size[1]}x{size[0]}", EXIT_USAGE)
    for job in todo:
        job.condition = Condition(prompt=job.params["prompt"], negative_prompt=negative_prompt)
    params = {"model": model, **settings.describe(), "cfg": cfg, "negative_prompt": negative_prompt or None,
              "size": f"{size[1]}x{size[0]}", "dtype": str(pipeline.dtype).removeprefix("torch."), "version": __version__}
    render(pipeline, todo, skipped, settings, cfg, batch_size, {k: v for k, v in params.items() if v is not None},
           output_format, quiet, size=(size[0] // pipeline.latent_factor, size[1] // pipeline.latent_factor), overwrite=overwrite)
