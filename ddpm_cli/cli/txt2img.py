"""``ddpm txt2img [MODEL] PROMPT``: images from a text-conditional diffusion model, or from a class-conditional
one given the class nearest in meaning to each prompt."""

from __future__ import annotations

import hashlib
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, Literal

import typer

from ddpm_cli.cli.errors import EXIT_USAGE, fail, handle_errors
from ddpm_cli.cli.generation import Generation
from ddpm_cli.engine.choices import PRIORS
from ddpm_cli.engine.models.resolve import builtin_models
from ddpm_cli.cli.options import CfgRescaleOpt, LoraOpt
from ddpm_cli.cli.options import (AllowPickleOpt, BatchSizeOpt, CompileOpt, DeviceOpt, DtypeOpt, EtaOpt, FormatOpt, GridOpt,
                                  InitImageOpt, ResizeOpt, StrengthOpt,
                                  ModelAlias, OutdirAlias, OutputOpt, OverwriteOpt, PerPromptOpt, QuietOpt, RevisionOpt,
                                  SamplerOpt, ImageSeedOpt, SeedListOpt, SkipExistingOpt, SpacingOpt, VarianceOpt, SigmasOpt, OrderOpt, ClipX0Opt, either, steps_option)
from ddpm_cli.cli.progress import say
from ddpm_cli.cli.img2img import InitImages
from ddpm_cli.cli.init_noise import AnimateOpt, FramesOpt, InitNoiseOpt, InitNoiseRowOpt, InterpolateOpt, NoiseStart
from ddpm_cli.cli.render import Job

DEFAULT_MODEL = "emoji"  # built in: trained by `ddpm train emoji --conditioning text` (see its MODEL_CARD.md)
DEFAULT_STEPS = 30
Prior = Literal[PRIORS]
StepsOpt = steps_option(str(DEFAULT_STEPS))

EXAMPLES = """
Examples:

\b
  ddpm txt2img "a cat" --cfg 7.5 --steps 30                        # the built-in emoji model
  ddpm txt2img runs/emoji "a cat face" --cfg 7.5 --steps 30
  ddpm txt2img runs/emoji "red apple" --negative-prompt "green" -n 4 --seed 10
  ddpm txt2img runs/emoji --from-file prompts.txt -o out/          # one prompt per line; - reads stdin
  ddpm txt2img "green apple" --init-image apple.png --strength 0.5 --seeds 0-3 --grid   # image-to-image
  ddpm txt2img "a cat" --interpolate 1,2 --frames 8 --animate gif --sampler euler  # {slug}-frame-000.png ...
"""


def slug(prompt: str, limit: int = 40) -> str:
    """A file-name-safe form of a prompt: "A red apple!" -> "a-red-apple" ("" when nothing is left)."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].strip("-")


def file_stems(prompts: list[str]) -> dict[str, str]:
    """Each prompt's file-name stem: its slug, unique within the run. Prompts whose slugs collide
    ("a cat", "A Cat!") or that have none ("🐱") get 8 hex digits of the prompt's SHA-256 too."""
    slugs = {prompt: slug(prompt) for prompt in prompts}
    counts = Counter(slugs.values())
    return {prompt: name if name and counts[name] == 1
            else f"{name or 'prompt'}-{hashlib.sha256(prompt.encode()).hexdigest()[:8]}"
            for prompt, name in slugs.items()}


def read_prompts(prompt: str | None, from_file: str | None) -> list[str]:
    if (prompt is None) == (from_file is None):
        raise fail("give a PROMPT or --from-file FILE (one prompt per line), not both or neither", EXIT_USAGE)
    if prompt is not None:
        return [prompt]
    try:
        text = sys.stdin.read() if from_file == "-" else Path(from_file).read_text()
    except OSError as exc:
        raise fail(f"cannot read --from-file {from_file} ({exc.strerror or exc})", EXIT_USAGE) from None
    line_of: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        prompt = line.strip()
        if not prompt or prompt.startswith("#"):
            continue
        if prompt in line_of:
            raise fail(f"--from-file {from_file}: lines {line_of[prompt]} and {number} hold the same prompt "
                       f"{prompt!r}; keep one and use -n for more images", EXIT_USAGE)
        line_of[prompt] = number
    if not line_of:
        raise fail(f"--from-file {from_file} holds no prompt", EXIT_USAGE)
    return list(line_of)


def split_positionals(words: list[str], model: str | None, from_file: str | None) -> tuple[str, str | None]:
    """(MODEL, PROMPT) from ``[MODEL] PROMPT`` (just ``[MODEL]`` with --from-file; MODEL may come from -m)."""
    prompts = 0 if from_file is not None else 1
    if model is None and len(words) == prompts + 1:
        model, words = words[0], words[1:]
    if len(words) > prompts:
        expected = "[MODEL]" if from_file is not None else "[MODEL] PROMPT"
        raise fail(f"txt2img takes {expected}, got {len(words)} words ({' '.join(map(repr, words))}); "
                   "quote a prompt that has spaces", EXIT_USAGE)
    return model or DEFAULT_MODEL, (words[0] if words else None)


@handle_errors
def txt2img(
    words: Annotated[list[str] | None, typer.Argument(metavar="[MODEL] PROMPT", show_default=False, help=f"MODEL: a text-conditional model (or a class-conditional one: a prompt draws the class nearest in meaning), a run folder, a Stable Diffusion-format folder or Hub id [default: the built-in {DEFAULT_MODEL}; `ddpm models` lists the built-ins ({', '.join(builtin_models())})]. PROMPT: what to draw (none with --from-file).")] = None,
    model_alias: ModelAlias = None,
    negative_prompt: Annotated[str, typer.Option("--negative-prompt", help="What to steer away from (replaces the empty prompt of the unconditional branch).")] = "",
    cfg: Annotated[float, typer.Option("--cfg", min=0.0, help="Guidance scale w: eps_uncond + w (eps_cond - eps_uncond).")] = 7.5,
    cfg_rescale: CfgRescaleOpt = None,
    steps: StepsOpt = None,
    sampler: SamplerOpt = "dpmpp-2m",
    eta: EtaOpt = None,
    spacing: SpacingOpt = None,
    variance: VarianceOpt = None,
    sigmas: SigmasOpt = None,
    order: OrderOpt = None,
    clip_x0: ClipX0Opt = None,
    seed: ImageSeedOpt = None,
    seed_list: SeedListOpt = None,
    num_images: PerPromptOpt = None,
    batch_size: BatchSizeOpt = 8,
    width: Annotated[int | None, typer.Option("--width", min=8, show_default=False, help="Width in pixels [default: the model's].")] = None,
    height: Annotated[int | None, typer.Option("--height", min=8, show_default=False, help="Height in pixels [default: the model's].")] = None,
    from_file: Annotated[str | None, typer.Option("--from-file", help="Prompts, one per line ('-': stdin).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="File name prefix instead of the prompt's slug: NAME-{seed:06d}.png (one prompt only).")] = None,
    output: OutputOpt = None,
    outdir: OutdirAlias = None,
    grid: GridOpt = False,
    prior: Annotated[Prior | None, typer.Option("--prior", show_default=False, help="nearest: draw the model's training caption nearest in meaning to the prompt (small models draw their captions far better than other wordings); none: the prompt as written [default: the model's; nearest for class-conditional models, which take no other].")] = None,
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
    """Generate images from text prompts; write one PNG per prompt and seed ({slug}-{seed:06d}.png) and print their paths."""
    model, prompt = split_positionals(list(words or []), either(None, model_alias, "MODEL", "-m"), from_file)
    steps = steps or DEFAULT_STEPS
    start = NoiseStart(init_noise, init_noise_row, interpolate, frames, animate, init_image)
    run = Generation.of(locals(), images_default=start.images_default(1))
    start.check_counts(run.seeds, num_images, seed_list)
    prompts = read_prompts(prompt, from_file)
    if name is not None and (len(prompts) > 1 or slug(name) != name):
        raise fail("--name takes one prompt and a plain name (lower-case letters, digits and -)", EXIT_USAGE)
    stems = {prompts[0]: name} if name is not None else file_stems(prompts)
    init = InitImages(init_image, strength, resize)
    jobs = [job for p in prompts for job in start.frame_jobs(run, stems[p], {"prompt": p})] if start.interpolating else \
        [Job(s, run.path(f"{stem}-{s:06d}.png"), params={"prompt": p, **init.params(image), **start.row_params(i)})
         for p in prompts for stem, image in init.each(stems[p]) for i, s in enumerate(run.seeds)]
    todo, skipped = run.plan(jobs, grid and not start.interpolating)
    for p in prompts:
        start.check_extras(run, grid, stems[p])

    pipeline, settings = run.load()
    by_class = pipeline.class_prompted  # a prompt draws its nearest class
    if pipeline.text_encoder is None and not by_class:
        raise fail(f"{model} is neither text- nor class-conditional; use `ddpm sample {model}`", EXIT_USAGE)
    for text in dict.fromkeys([*prompts, negative_prompt]) if pipeline.text_encoder is not None else ():
        dropped = pipeline.text_encoder.truncated_words(text)
        if dropped:
            say(f"ddpm: warning: prompt longer than the text encoder's {pipeline.text_encoder.max_length} tokens; "
                f"dropped: {' '.join(dropped)}")
    from ddpm_cli.engine.models.captions import prompt_captions
    from ddpm_cli.engine.models.pipeline import Condition

    captions = prompt_captions(pipeline, [*prompts, *([negative_prompt] if by_class and negative_prompt else [])], prior)
    what = "the class" if by_class else "the model's training caption"
    for text, (caption, similarity) in captions.items():
        if caption != text:
            steer = f"--negative-prompt {text!r} steers away from" if text == negative_prompt else f"{text!r} draws"
            say(f"ddpm: {steer} {what} {caption!r} (nearest in meaning, similarity {similarity:.2f}"
                + ("" if by_class else "; --prior none draws the prompt as written") + ")", run.quiet)
    model_height, model_width = pipeline.image_size
    size = (height or model_height, width or model_width)
    factor = pipeline.unet_factor * pipeline.latent_factor
    if size[0] % factor or size[1] % factor:
        raise fail(f"--width and --height must be multiples of {factor} for {model}, got {size[1]}x{size[0]}", EXIT_USAGE)
    latent_size = (size[0] // pipeline.latent_factor, size[1] // pipeline.latent_factor)
    start.prepare(pipeline, model, run.seeds, latent_size)
    steps_run = init.prepare(pipeline, settings, size, todo)
    run.announce(pipeline, settings, f", cfg {cfg}" + init.describe(steps_run))
    classes = pipeline.class_list
    negative_class = classes.index(captions[negative_prompt][0]) if by_class and negative_prompt else None
    for job in todo:
        caption = captions[job.params["prompt"]][0]
        if by_class:  # the class drawn, in the image's metadata
            job.params["class_name"] = caption
            job.condition = Condition(classes.index(caption), negative_class_label=negative_class)
            continue
        if caption != job.params["prompt"]:
            job.params["caption"] = caption  # what the model drew, in the image's metadata
        job.condition, _, _ = run.condition(pipeline, cfg, prompt=caption, negative_prompt=negative_prompt)
    params = run.params(pipeline, settings, size, command="txt2img", cfg=cfg, negative_prompt=negative_prompt or None, prior=prior,
                        **init.settings(), **start.settings())
    run.render(pipeline, settings, todo, skipped, params, cfg, grid=grid and not start.interpolating,
               steps_per_batch=steps_run, size=latent_size, generate=start.generator(pipeline, settings, cfg, latent_size))
    for p in prompts:
        start.finish(run, pipeline, [job for job in todo + skipped if job.params["prompt"] == p], params, grid, stems[p])
