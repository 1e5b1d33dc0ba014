"""Shared by the generating commands (through cli/generation.py) and encode --decode: plan the output files, run the engine batch by
batch, write each PNG as it is finished, and print the results.

One job is one image: a seed, its file, and what conditions it. Jobs that share a condition are
batched together. Existing files are refused, replaced or skipped before any work starts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ddpm_cli.cli.errors import EXIT_USAGE, fail, writable_folder
from ddpm_cli.cli.progress import StepProgress, say


@dataclass
class Job:
    seed: int
    path: Path
    condition: object = None  # engine.pipeline.Condition; None for unconditional models
    params: dict = field(default_factory=dict)  # per-image metadata (prompt, class)
    inputs: dict = field(default_factory=dict)  # keyword arguments of the generator for this job (img2img's init)


def plan(jobs: list[Job], outdir: Path, overwrite: bool, skip_existing: bool, grid: bool) -> tuple[list[Job], list[Job]]:
    """(to do, skipped): refuses two jobs with one file, and existing outputs unless --overwrite or
    --skip-existing; creates outdir."""
    if overwrite and skip_existing:
        raise fail("--overwrite and --skip-existing cannot be given together", EXIT_USAGE)
    first_of: dict[Path, Job] = {}
    for job in jobs:
        other = first_of.setdefault(job.path, job)
        if other is not job:
            what = "".join(f" ({key}s {other.params[key]!r} and {job.params[key]!r})" for key in ("prompt",)
                           if key in job.params and key in other.params)
            raise fail(f"two images of this run would both be written to {job.path}{what}; "
                       "nothing was written", EXIT_USAGE)
    if grid and (outdir / "grid.png").exists() and not overwrite:
        raise fail(f"{outdir / 'grid.png'} exists; pass --overwrite to replace it", EXIT_USAGE)
    existing = [job for job in jobs if job.path.exists()]
    if existing and not (overwrite or skip_existing):
        raise fail(f"{existing[0].path} exists ({len(existing)} of {len(jobs)} outputs exist); "
                   "pass --overwrite to replace or --skip-existing to keep them", EXIT_USAGE)
    writable_folder(outdir)
    skipped = existing if skip_existing else []
    return [job for job in jobs if job not in skipped], skipped


def _same_inputs(a: dict, b: dict) -> bool:
    """The same generator inputs: the same keys holding the same objects (tensors are not compared)."""
    return a.keys() == b.keys() and all(a[key] is b[key] for key in a)


def _batches(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """Consecutive jobs with the same condition, at most batch_size each."""
    batches: list[list[Job]] = []
    for job in jobs:
        if batches and len(batches[-1]) < batch_size and batches[-1][0].condition == job.condition \
                and _same_inputs(batches[-1][0].inputs, job.inputs):
            batches[-1].append(job)
        else:
            batches.append([job])
    return batches


PER_IMAGE_KEYS = ("seed", "prompt", "class", "class_name", "source", "image", "mask", "init_image", "init_image_sha256",
                  "init_noise_row", "frame", "batch_size", "batch_index")


def shared_settings(settings: list[dict], quiet: bool) -> dict:
    """The settings every image of a grid shares, plus how many images it holds. Images kept by
    --skip-existing may come from a run with other settings: the grid's metadata then names only
    what they all share, and a warning says which settings differ."""
    keys = [key for key in dict.fromkeys(k for s in settings for k in s) if key not in PER_IMAGE_KEYS]
    shared = {key: settings[0].get(key) for key in keys if all(key in s and s[key] == settings[0][key] for s in settings)}
    differing = [key for key in keys if key not in shared]
    if differing:
        say(f"ddpm: warning: the grid holds images made with other settings (kept by --skip-existing); "
            f"they differ in {', '.join(differing)}, which the grid's metadata leaves out", quiet)
    return {**shared, "images": len(settings)}


def render(pipeline, jobs: list[Job], skipped: list[Job], settings, cfg: float, batch_size: int, params: dict,
           output_format: str, quiet: bool, size: tuple[int, int] | None = None, grid_path: Path | None = None,
           generate: Callable | None = None, steps_per_batch: int | None = None, overwrite: bool = False) -> None:
    """Generate every job, writing and printing each image as soon as its batch is done.

    Without ``overwrite`` no file is ever replaced, not even one that another process wrote after
    ``plan`` checked: that job fails with one line (exit 2), keeping what was written before it.

    ``generate(seeds, on_step, condition, **job.inputs) -> images`` makes one batch (default: sample_batch with
    ``settings``, ``cfg`` and ``size``); ``steps_per_batch`` is its step count for the progress bar.
    """
    from ddpm_cli.engine.runtime import distributed
    from ddpm_cli.engine.tasks.generate import sample_batch
    from ddpm_cli.engine.io.images import load_image, make_grid, read_png_metadata, save_png, tensor_to_pil

    world = distributed.init(pipeline.device)  # under torchrun: this process makes every world.size-th image
    if world.distributed:
        jobs, quiet = jobs[world.rank::world.size], quiet or not world.main

    if generate is None:
        def generate(seeds, on_step, condition, **inputs):
            return sample_batch(pipeline, seeds, settings, on_step, condition, cfg, size, **inputs)

    steps = steps_per_batch or settings.steps
    written, started = [], time.perf_counter()
    batches = _batches(jobs, batch_size)
    with StepProgress("sampling", len(batches) * steps, quiet) as bar:
        for number, batch in enumerate(batches):
            def on_step(info: dict, done: int = number * steps) -> None:
                bar.update(done + info["i"] + 1)

            images = generate([job.seed for job in batch], on_step, batch[0].condition, **batch[0].inputs)
            for index, (job, image) in enumerate(zip(batch, images)):
                # the batch's size can change a pixel's last bit (batched kernels): `ddpm replay` remakes it
                meta = {**params, **job.params, "seed": job.seed, "batch_size": len(batch), "batch_index": index}
                path = save_png(tensor_to_pil(image), job.path, meta, overwrite=overwrite)
                written.append({"path": str(path), **job.params, "seed": job.seed})
                if output_format == "text":
                    print(path, flush=True)
    written = [entry for part in distributed.gather(written) for entry in part]  # every process's, in rank order
    if not world.main:
        return
    if grid_path is not None:
        everything = sorted({str(entry["path"]) for entry in written} | {str(job.path) for job in skipped})
        settings_of = {entry["path"]: {**params, **{k: v for k, v in entry.items() if k != "path"}} for entry in written}
        settings_of.update({str(job.path): read_png_metadata(job.path) for job in skipped})
        mode = "L" if pipeline.image_channels == 1 else "RGB"
        grid_params = shared_settings([settings_of.get(path, {}) for path in everything], quiet)
        save_png(make_grid([load_image(path, mode=mode) for path in everything]), grid_path, grid_params,
                 overwrite=overwrite)
        if output_format == "text":
            print(grid_path, flush=True)
    if output_format == "json":
        if world.distributed:
            written.sort(key=lambda entry: entry["path"])
        print(json.dumps({**params, "images": written, "skipped": [str(job.path) for job in skipped],
                          "grid": str(grid_path) if grid_path else None,
                          "seconds": round(time.perf_counter() - started, 3)}, indent=2))
