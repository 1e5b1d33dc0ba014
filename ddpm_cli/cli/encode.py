"""``ddpm encode [MODEL] INPUTS... -o latents.safetensors``: images to a VAE's latents, and ``--decode`` back."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from ddpm_cli.cli.errors import EXIT_USAGE, fail, handle_errors, writable_folder
from ddpm_cli.cli.options import (AllowPickleOpt, DeviceOpt, DtypeOpt, ModelAlias, OverwriteOpt, QuietOpt, RevisionOpt,
                                  SkipExistingOpt, either, format_option)
from ddpm_cli.cli.progress import StepProgress, say

EXAMPLES = """
Examples:

\b
  ddpm encode ./photos --resolution 32 -o photos.safetensors      # the built-in VAE (emoji-vae)
  ddpm encode runs/vae ./photos --resolution 128 -o photos.safetensors
  ddpm encode runs/vae fashion-mnist -o fmnist.safetensors            # a built-in data set, labels kept
  ddpm encode stabilityai/sd-vae-ft-mse a.png b.jpg -o two.safetensors
  ddpm encode --decode photos.safetensors -o decoded/                # VAE from the file's metadata
"""
FormatOpt = format_option("the latents file's path; with --decode one image path per line")


DEFAULT_VAE = "emoji-vae"  # built in: `ddpm train emoji --task autoencoder` (see its MODEL_CARD.md)


def names_a_vae(word: str) -> bool:
    """Whether ``word`` (the first positional) names a VAE rather than an input: a folder holding a VAE
    (vae/ or an AutoencoderKL config.json), a built-in model with one, or a Hub id that is not a path."""
    from ddpm_cli.cli.models import vae_config
    from ddpm_cli.engine.models.resolve import BUILTIN_DIR, builtin_models, is_hub_id

    folder = Path(BUILTIN_DIR) / word if word in builtin_models() else Path(word).expanduser()
    if folder.is_dir():
        return bool(vae_config(folder))
    return not Path(word).exists() and is_hub_id(word)


def split_positionals(words: list[str], model: str | None, decode: bool) -> tuple[str | None, list[str]]:
    """(MODEL, INPUTS) from ``[MODEL] INPUTS...``, or with --decode ``[MODEL] LATENTS`` (MODEL may come from -m).
    Without a MODEL that names a VAE, encoding uses the built-in DEFAULT_VAE."""
    if model is None and words and (len(words) > 1 or not decode):
        if decode or (len(words) > 1 and names_a_vae(words[0])):
            model, words = words[0], words[1:]
        else:
            model = DEFAULT_VAE
    if not words:
        expected = "[MODEL] LATENTS" if decode else "[MODEL] INPUTS..."
        raise fail(f"encode{' --decode' if decode else ''} takes {expected}", EXIT_USAGE)
    return model, words


def parts_folder(output: Path) -> Path:
    """Where finished batches wait, so an interrupted encode resumes: a hidden folder beside the output."""
    return output.with_name(f".{output.name}.parts")


@handle_errors
def encode(
    words: Annotated[list[str], typer.Argument(metavar="[MODEL] INPUTS...", show_default=False, help="MODEL: the VAE [default: the built-in emoji-vae], a Stable Diffusion-format or run folder (its vae/), a VAE folder, or a Hub id (optional with --decode: the one that encoded the file). INPUTS: image files, folders (recursive) or one built-in data set; with --decode, one latents file.")],
    model_alias: ModelAlias = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="The latents file (.safetensors), or with --decode the folder for the images.", show_default=False)] = None,
    decode: Annotated[bool, typer.Option("--decode", help="Turn a latents file back into PNG images.")] = False,
    resolution: Annotated[int | None, typer.Option("--resolution", min=8, help="Resize each image's shorter side to R and center-crop R×R [default: keep sizes, which must then be equal; 32 for built-ins].")] = None,
    channels: Annotated[int | None, typer.Option("--channels", help="1 or 3 [default: the VAE's].")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per VAE call.")] = 16,
    tile: Annotated[int, typer.Option("--tile", min=0, help="Tile side in pixels of the full-resolution image: larger images go through the VAE in overlapping tiles with blended seams; 0: never.")] = 512,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    revision: RevisionOpt = None,
    allow_pickle: AllowPickleOpt = False,
    overwrite: OverwriteOpt = False,
    skip_existing: SkipExistingOpt = False,
    output_format: FormatOpt = "text",
    quiet: QuietOpt = False,
) -> None:
    """Encode images into a VAE's latents (scaled by its scaling factor), or decode them back."""
    model, inputs = split_positionals(list(words), either(None, model_alias, "MODEL", "-m"), decode)
    if output is None:
        raise fail("pass -o: the latents file to write (or with --decode, the folder for the images)", EXIT_USAGE)
    if overwrite and skip_existing:
        raise fail("--overwrite and --skip-existing cannot be given together", EXIT_USAGE)
    if decode and (resolution is not None or channels is not None):
        raise fail(f"{'--resolution' if resolution is not None else '--channels'} applies to encoding, not --decode",
                   EXIT_USAGE)
    if decode:
        return _decode(inputs, model, output, batch_size, tile, device, dtype, revision, allow_pickle, overwrite,
                       skip_existing, output_format, quiet)
    if output.suffix != ".safetensors":
        raise fail(f"-o {output}: the latents file must end in .safetensors", EXIT_USAGE)
    if output.exists() and not overwrite:
        if skip_existing:
            say(f"ddpm: {output} exists; skipped", quiet)
            print(output)
            return
        raise fail(f"{output} exists; pass --overwrite to replace it", EXIT_USAGE)
    writable_folder(output.parent if str(output.parent) else ".")

    from ddpm_cli.engine.io.latents import save_latents
    from ddpm_cli.engine.models.vae import load_autoencoder
    from ddpm_cli.engine.runtime.device import describe, resolve_device, resolve_dtype
    from ddpm_cli.training.latents import encode_set, open_inputs

    torch_device = resolve_device(device)
    vae = load_autoencoder(model, torch_device, resolve_dtype(dtype, torch_device), revision, allow_pickle)
    if channels not in (None, vae.config.in_channels):
        raise fail(f"--channels {channels}: the VAE {model} takes {vae.config.in_channels}-channel images", EXIT_USAGE)
    dataset, sources = open_inputs(inputs, resolution, vae.config.in_channels)
    parts, started = parts_folder(output), time.perf_counter()
    resumed = len(list(parts.glob("part-*.safetensors"))) if parts.is_dir() else 0
    say(f"ddpm: encoding {len(dataset)} images with {model}: {describe(vae.device, vae.dtype)}"
        + (f"; resuming ({resumed} batches already done)" if resumed else ""), quiet)
    with StepProgress("encoding", len(dataset), quiet) as bar:
        data = encode_set(dataset, sources, vae, _identity(model), resolution, batch_size, tile or None, parts,
                          on_batch=lambda done, total: bar.update(done))
    save_latents(output, data, overwrite=overwrite)
    shutil.rmtree(parts, ignore_errors=True)
    summary = {"output": str(output), "images": len(sources), "latent_shape": list(data.latents.shape[1:]),
               "image_size": list(data.image_size), "vae": model, "scaling_factor": data.scaling_factor,
               "seconds": round(time.perf_counter() - started, 3)}
    print(json.dumps(summary, indent=2) if output_format == "json" else output)


def _identity(model: str) -> str:
    """How the latents file names its VAE: an absolute path for a local folder, else the name given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def _decode(inputs, model, output, batch_size, tile, device, dtype, revision, allow_pickle, overwrite, skip_existing,
            output_format, quiet) -> None:
    from ddpm_cli.cli.render import Job, plan

    if len(inputs) != 1:
        raise fail("--decode takes one latents file", EXIT_USAGE)
    from ddpm_cli.engine.io.latents import is_latents_file, read_latents
    from ddpm_cli.engine.models.vae import decode_latents, load_autoencoder
    from ddpm_cli.engine.runtime.device import describe, resolve_device, resolve_dtype
    from ddpm_cli.engine.io.images import save_png, tensor_to_pil

    if not is_latents_file(inputs[0]):
        raise fail(f"{inputs[0]} is not a latents file (.safetensors written by `ddpm encode`)", EXIT_USAGE)
    data = read_latents(inputs[0])
    jobs = [Job(i, output / f"{i:06d}.png", params={"source": source}) for i, source in enumerate(data.sources)]
    todo, skipped = plan(jobs, output, overwrite, skip_existing, grid=False)
    torch_device = resolve_device(device)
    vae_name = model or data.vae
    vae = load_autoencoder(vae_name, torch_device, resolve_dtype(dtype, torch_device), revision, allow_pickle)
    say(f"ddpm: decoding {len(todo)} latents with {vae_name}: {describe(vae.device, vae.dtype)}", quiet)
    written, started = [], time.perf_counter()
    with StepProgress("decoding", len(todo), quiet) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            images = decode_latents(vae, data.latents[[job.seed for job in batch]], tile or None).cpu().clamp(-1, 1)
            for job, image in zip(batch, images):
                path = save_png(tensor_to_pil(image), job.path, {"vae": vae_name, "latents": str(inputs[0]),
                                                                 "index": job.seed, **job.params}, overwrite=overwrite)
                written.append(str(path))
                if output_format == "text":
                    print(path, flush=True)
            bar.update(start + len(batch))
    if output_format == "json":
        print(json.dumps({"images": written, "skipped": [str(job.path) for job in skipped], "vae": vae_name,
                          "seconds": round(time.perf_counter() - started, 3)}, indent=2))
    sys.stdout.flush()
