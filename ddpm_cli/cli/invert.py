"""``ddpm invert MODEL IMAGE... -o noise.safetensors``: the x_T from which DDIM sampling makes each image."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from ddpm_cli.cli.errors import EXIT_USAGE, fail, handle_errors, writable_folder
from ddpm_cli.cli.generation import Generation
from ddpm_cli.cli.options import (AllowPickleOpt, BatchSizeOpt, CfgRescaleOpt, ClassOpt, DeviceOpt, OverwriteOpt, QuietOpt, RevisionOpt,
                                  SpacingOpt, dtype_option, format_option, one, steps_option)
from ddpm_cli.cli.progress import StepProgress, say

EXAMPLES = """
Examples:

\b
  ddpm invert fashion-mnist shirt.png boot.png -o noise.safetensors --steps 50 --refine 5
  ddpm sample fashion-mnist --init-noise noise.safetensors --sampler ddim --steps 50   # back to the images
  ddpm invert runs/fashion-classes photos/ --class sneaker --cfg 1 -o sneakers.safetensors
  ddpm invert runs/emoji face.png --prompt "grinning face" --cfg 1 --resize -o face.safetensors
"""
DEFAULT_STEPS = 50
FormatOpt = format_option("the noise file's path")
InvertStepsOpt = steps_option(f"{DEFAULT_STEPS}; sample back with the same")
# fp32 everywhere by default: refinement drives each step's residual to ~1e-4, below bf16's resolution
InvertDtypeOpt = dtype_option("fp32, on every device: inversion needs full precision")


def image_paths(inputs: list[Path]) -> list[Path]:
    """The image files named, folders expanded (recursively, sorted); refuses a missing path."""
    from ddpm_cli.engine.io.images import list_images

    paths: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = list_images(item)
            if not found:
                raise fail(f"{item} holds no images", EXIT_USAGE)
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise fail(f"{item}: no such image or folder", EXIT_USAGE)
    return paths


def read_images(paths: list[Path], size: tuple[int, int], channels: int, resize: bool):
    """N×C×H×W in [-1, 1] at ``size`` (height, width); another size is refused unless ``resize``."""
    import torch
    from PIL import Image

    from ddpm_cli.engine.io.images import load_image, pil_to_tensor

    height, width = size
    tensors = []
    for path in paths:
        image = load_image(path, mode="L" if channels == 1 else "RGB")
        if (image.height, image.width) != (height, width):
            if not resize:
                raise fail(f"{path} is {image.width}x{image.height}; the model makes {width}x{height} "
                           "(pass --resize to resize it, Lanczos)", EXIT_USAGE)
            image = image.resize((width, height), Image.LANCZOS)
        tensors.append(pil_to_tensor(image))
    return torch.stack(tensors)


@handle_errors
def invert(
    model: Annotated[str, typer.Argument(metavar="MODEL", show_default=False, help="The image model the noise is for: a run, a built-in name, a pipeline folder or Hub id.")],
    inputs: Annotated[list[Path], typer.Argument(metavar="IMAGE...", show_default=False, help="Images, or folders of images (recursive); one noise row each, in this order.")],
    output: Annotated[Path, typer.Option("--output", "-o", show_default=False, help="The noise file to write (.safetensors).")] = None,
    steps: InvertStepsOpt = None,
    refine: Annotated[int, typer.Option("--refine", min=0, help="Fixed-point iterations per step: re-evaluate the noise prediction at the current estimate of x_t and redo the step (1 network call each; 0: plain DDIM inversion, as diffusers' DDIMInverseScheduler).")] = 0,
    spacing: SpacingOpt = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="Text-conditional models: the images' prompt.")] = None,
    negative_prompt: Annotated[str, typer.Option("--negative-prompt", help="Text-conditional models: the unconditional branch's prompt.")] = "",
    class_spec: ClassOpt = None,
    cfg: Annotated[float | None, typer.Option("--cfg", min=0.0, show_default=False, help="Guidance scale, as for sampling [default: 7.5 with --prompt, 2 with --class]; sample back with the same one.")] = None,
    cfg_rescale: CfgRescaleOpt = None,
    resize: Annotated[bool, typer.Option("--resize", help="Resize images of another size to the model's (Lanczos) instead of refusing them.")] = False,
    batch_size: BatchSizeOpt = 16,
    output_format: FormatOpt = "text",
    device: DeviceOpt = "auto",
    dtype: InvertDtypeOpt = "auto",
    revision: RevisionOpt = None,
    allow_pickle: AllowPickleOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Invert images to the noise x_T from which deterministic DDIM (eta 0) at the same --steps makes them
    again; write it as one .safetensors file for `ddpm sample/txt2img --init-noise`."""
    class_spec = one(class_spec, "--class")
    if output is None or output.suffix != ".safetensors":
        raise fail("pass -o FILE.safetensors: the noise file to write", EXIT_USAGE)
    if prompt is not None and class_spec is not None:
        raise fail("--prompt and --class cannot be given together", EXIT_USAGE)
    Generation.check_guidance(cfg, ("--prompt", prompt), ("--class", class_spec), rescale=cfg_rescale)
    if negative_prompt and prompt is None:
        raise fail("--negative-prompt goes with --prompt; give --prompt too or drop it", EXIT_USAGE)
    if output.exists() and not overwrite:
        raise fail(f"{output} exists; pass --overwrite to replace it", EXIT_USAGE)
    paths = image_paths(inputs)
    from ddpm_cli.engine.io.images import probe_image

    for path in paths:
        probe_image(path)  # a bad image fails before the model loads
    writable_folder(output.parent if str(output.parent) else ".")

    from ddpm_cli.engine.io.noise_file import NoiseFile, save_noise
    from ddpm_cli.engine.models.fingerprint import file_sha256
    from ddpm_cli.engine.runtime.device import describe
    from ddpm_cli.engine.tasks.invert import invert_batch

    run = Generation(model, sampler="ddim", steps=steps or DEFAULT_STEPS, spacing=spacing, cfg_rescale=cfg_rescale,
                     batch_size=batch_size,
                     device=device, dtype="fp32" if dtype == "auto" else dtype, revision=revision, allow_pickle=allow_pickle, quiet=quiet)
    pipeline, settings = run.load()
    if prompt is None and class_spec is None and pipeline.text_encoder is not None:
        raise fail(f"{model} is text-conditional; pass --prompt (\"\" for unconditional)", EXIT_USAGE)
    condition, scale, guidance = run.condition(pipeline, cfg, class_spec, prompt, negative_prompt)
    images = read_images(paths, pipeline.image_size, pipeline.image_channels, resize)
    say(f"ddpm: inverting {len(paths)} images with {model}: {describe(pipeline.device, pipeline.dtype)}; ddim, "
        f"{settings.steps} steps, {refine} refinements per step", quiet)
    started, rows = time.perf_counter(), []
    batches = range(0, len(paths), batch_size)
    with StepProgress("inverting", len(batches) * settings.steps, quiet) as bar:
        for number, start in enumerate(batches):
            def on_step(info: dict, done: int = number * settings.steps) -> None:
                bar.update(done + info["i"] + 1)

            rows.append(invert_batch(pipeline, images[start:start + batch_size], settings.steps, settings.spacing,
                                     refine, condition, scale, on_step, settings.cfg_rescale))
    import torch

    noise = torch.cat(rows)
    recorded = {"sampler": "ddim", "steps": settings.steps, "spacing": settings.spacing, "eta": 0.0,
                "refine": refine, **guidance, "cfg_rescale": cfg_rescale or None, "resize": resize or None,
                "dtype": str(pipeline.dtype).removeprefix("torch.")}
    data = NoiseFile(noise, model, str(Path(pipeline.folder).resolve()), [str(path) for path in paths],
                     [file_sha256(path) for path in paths], {k: v for k, v in recorded.items() if v is not None})
    save_noise(output, data, overwrite=overwrite)
    if output_format == "json":
        print(json.dumps({"output": str(output), "model": model, "images": data.images, "shape": list(noise.shape),
                          **data.settings, "seconds": round(time.perf_counter() - started, 3)}, indent=2))
    else:
        print(output)
