"""Starting from given noise on `sample` and `txt2img`: --init-noise FILE [--init-noise-row N], and
--interpolate A,B --frames K [--animate gif|webp].

--init-noise takes x_T from a file `ddpm invert` wrote: image i starts from row N + i (N: 0 unless
--init-noise-row), so -n defaults to the rows left and may not exceed them. --interpolate makes K
frames (frame-000.png ...) whose x_T move along the great circle (slerp) from A to B, each a seed
(its seeded noise, as `--seed A` draws it) or ``row:N`` of the --init-noise file; --grid writes
them as one strip (grid.png), --animate as animation.gif or .webp. Frame k is made with seed SEED + k,
from which stochastic samplers draw their step noise. Everything is checked, and the file read,
before the model loads; the file's model and shape once it has loaded. Bad input: one line, exit 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from ddpm_cli.cli.errors import EXIT_USAGE, fail
from ddpm_cli.cli.render import Job

InitNoiseOpt = Annotated[Path | None, typer.Option("--init-noise", metavar="FILE", show_default=False, help="Start from the x_T rows of this file (from `ddpm invert`) instead of seeded noise: image i from row i; -n defaults to the number of rows.")]
InitNoiseRowOpt = Annotated[int | None, typer.Option("--init-noise-row", min=0, metavar="N", show_default=False, help="With --init-noise: image i starts from row N + i [default: 0].")]
InterpolateOpt = Annotated[str | None, typer.Option("--interpolate", metavar="A,B", show_default=False, help="Frames from x_T of A to x_T of B (spherical interpolation); A and B are seeds, or rows of --init-noise written row:N. Writes frame-000.png ...")]
FramesOpt = Annotated[int | None, typer.Option("--frames", min=2, show_default=False, help="With --interpolate: how many frames, both ends included [default: 8].")]
AnimateOpt = Annotated[Literal["gif", "webp"] | None, typer.Option("--animate", show_default=False, help="With --interpolate: also write the frames as animation.gif or animation.webp (looping).")]

DEFAULT_FRAMES = 8
SECONDS_PER_FRAME = 0.15


def parse_end(text: str) -> tuple[str, int]:
    """("seed", N) for "N", ("row", N) for "row:N"."""
    word = text.strip().lower()
    kind, _, number = word.partition(":") if ":" in word else ("seed", "", word)
    if kind not in ("seed", "row") or not number.strip().isdigit():
        raise fail(f"--interpolate takes two ends A,B, each a seed (17) or a row of --init-noise (row:3), got {text!r}",
                   EXIT_USAGE)
    return kind, int(number)


class NoiseStart:
    """The run's given starting noise: none, rows of a file, or an interpolation."""

    def __init__(self, init_noise: Path | None, row: int | None, interpolate: str | None, frames: int | None,
                 animate: str | None, init_image: Path | None = None):
        for flag, value, needs, given in (("--init-noise-row", row, "--init-noise", init_noise),
                                          ("--frames", frames, "--interpolate", interpolate),
                                          ("--animate", animate, "--interpolate", interpolate)):
            if value is not None and given is None:
                raise fail(f"{flag} goes with {needs}; give {needs} or drop {flag}", EXIT_USAGE)
        if init_image is not None and (init_noise is not None or interpolate is not None):
            what = "--init-noise" if init_noise is not None else "--interpolate"
            raise fail(f"{what} and --init-image both give the start; choose one", EXIT_USAGE)
        if interpolate is not None and row is not None:
            raise fail("--interpolate names its rows itself (row:N); drop --init-noise-row", EXIT_USAGE)
        self.path, self.first_row, self.animate = init_noise, row or 0, animate
        self.frames = frames or DEFAULT_FRAMES
        self.ends: list[tuple[str, int]] = []
        if interpolate is not None:
            parts = interpolate.split(",")
            if len(parts) != 2:
                raise fail(f"--interpolate takes two ends A,B, got {interpolate!r}", EXIT_USAGE)
            self.ends = [parse_end(part) for part in parts]
            if any(kind == "row" for kind, _ in self.ends) and init_noise is None:
                raise fail("--interpolate row:N takes its rows from --init-noise FILE; give it", EXIT_USAGE)
        self.data, self.sha256, self.table = None, None, {}
        if init_noise is not None:
            from ddpm_cli.engine.io.noise_file import read_noise
            from ddpm_cli.engine.models.fingerprint import file_sha256

            self.data = read_noise(init_noise)  # an InputError (exit 2) when missing, unreadable or foreign
            self.sha256 = file_sha256(init_noise)
            rows = self.data.noise.shape[0]
            for number in [self.first_row] + [n for kind, n in self.ends if kind == "row"]:
                if number >= rows:
                    raise fail(f"--init-noise {init_noise} has {rows} rows (0-{rows - 1}); there is no row {number}",
                               EXIT_USAGE)

    @property
    def interpolating(self) -> bool:
        return bool(self.ends)

    def __bool__(self) -> bool:
        return self.data is not None or self.interpolating

    def images_default(self, default: int) -> int:
        """-n's default: the rows left in the file (from --init-noise-row), else ``default``."""
        if self.data is not None and not self.interpolating:
            return self.data.noise.shape[0] - self.first_row
        return default

    def check_counts(self, seeds: list[int], num_images: int | None, seed_list: str | None) -> None:
        """Refuse more images than rows, and -n or --seeds with --interpolate (--frames says how many)."""
        if self.interpolating:
            for flag, value in (("-n", num_images), ("--seeds", seed_list)):
                if value is not None:
                    raise fail(f"--interpolate makes --frames images (seeds SEED, SEED+1, ...); drop {flag}", EXIT_USAGE)
        elif self.data is not None:
            left = self.data.noise.shape[0] - self.first_row
            if len(seeds) > left:
                raise fail(f"{len(seeds)} images but --init-noise {self.path} has {left} rows from row "
                           f"{self.first_row}; lower -n or invert more images", EXIT_USAGE)

    def frame_jobs(self, run, stem: str = "", params: dict | None = None) -> list[Job]:
        """One job per frame, ``{stem-}frame-{k:03d}.png``, seed SEED + k."""
        prefix = f"{stem}-" if stem else ""
        return [Job(run.seeds[0] + k, run.path(f"{prefix}frame-{k:03d}.png"),
                    params={**(params or {}), "frame": k}) for k in range(self.frames)]

    def row_params(self, index: int) -> dict:
        """Image ``index``'s metadata: its row of the file."""
        return {"init_noise_row": self.first_row + index} if self.data is not None and not self.interpolating else {}

    def settings(self) -> dict:
        """Metadata every image of the run shares."""
        meta = {}
        if self.data is not None:
            meta.update(init_noise=str(self.path), init_noise_sha256=self.sha256)
        if self.interpolating:
            ends = ",".join(f"row:{n}" if kind == "row" else str(n) for kind, n in self.ends)
            meta.update(interpolate=ends, frames=self.frames)
        return meta

    def prepare(self, pipeline, model: str, seeds: list[int], size: tuple[int, int] | None = None) -> None:
        """Check the file against the loaded model and build each seed's x_T (``size``: height, width
        in the model's units; default its sample size)."""
        import torch

        from ddpm_cli.engine.diffusion.noise import SeededNoise
        from ddpm_cli.engine.tasks.interpolate import interpolation

        channels, height, width = pipeline.sample_shape
        shape = (channels, *(size or (height, width)))
        if self.data is not None:
            made_for = self.data.model
            same = made_for == model or (self.data.model_folder
                                         and Path(self.data.model_folder) == Path(pipeline.folder).resolve())
            if not same:
                raise fail(f"--init-noise {self.path} was made for the model {made_for}, not {model}; "
                           f"run `ddpm invert {model} ...` for this one", EXIT_USAGE)
            if tuple(self.data.noise.shape[1:]) != shape:
                raise fail(f"--init-noise {self.path} holds noise of shape {tuple(self.data.noise.shape[1:])}; "
                           f"{model} at this size starts from {shape}", EXIT_USAGE)
        if not self.interpolating:
            if self.data is not None:
                self.table = {seed: self.data.noise[self.first_row + i] for i, seed in enumerate(seeds)}
            return

        def end(kind: str, number: int) -> torch.Tensor:
            return self.data.noise[number] if kind == "row" else SeededNoise([number], shape)()[0]

        frames = interpolation(end(*self.ends[0]), end(*self.ends[1]), self.frames)
        self.table = {seeds[0] + k: frame for k, frame in enumerate(frames)}

    def generator(self, pipeline, settings, cfg: float, size: tuple[int, int] | None = None):
        """render's ``generate``: sample_batch from each seed's x_T (None without given noise)."""
        if not self:
            return None
        import torch

        from ddpm_cli.engine.tasks.generate import sample_batch

        def generate(seeds, on_step, condition, **inputs):
            x_T = torch.stack([self.table[seed] for seed in seeds])
            return sample_batch(pipeline, seeds, settings, on_step, condition, cfg, size, x_T=x_T, **inputs)

        return generate

    def extra_paths(self, run, grid: bool, stem: str = "") -> list[Path]:
        """The strip and animation an interpolation writes besides its frames (checked before work)."""
        if not self.interpolating:
            return []
        prefix = f"{stem}-" if stem else ""
        paths = [run.path(f"{prefix}grid.png")] if grid else []
        return paths + ([run.path(f"{prefix}animation.{self.animate}")] if self.animate else [])

    def check_extras(self, run, grid: bool, stem: str = "") -> None:
        for path in self.extra_paths(run, grid, stem):
            if path.exists() and not run.overwrite:
                raise fail(f"{path} exists; pass --overwrite to replace it", EXIT_USAGE)

    def finish(self, run, pipeline, jobs: list[Job], params: dict, grid: bool, stem: str = "") -> None:
        """After the frames: the strip (--grid) and the animation (--animate), from the frame files."""
        if not self.interpolating or not (grid or self.animate):
            return
        from ddpm_cli.engine.io.animation import save_animation
        from ddpm_cli.engine.io.images import load_image, make_grid, save_png
        from ddpm_cli.engine.runtime.distributed import world

        if not world().main:
            return
        mode = "L" if pipeline.image_channels == 1 else "RGB"
        frames = [load_image(job.path, mode=mode) for job in sorted(jobs, key=lambda job: job.params["frame"])]
        paths = self.extra_paths(run, grid, stem)
        if grid:
            save_png(make_grid(frames, nrow=len(frames)), paths[0], {**params, "images": len(frames)},
                     overwrite=run.overwrite)
        if self.animate:
            save_animation(frames, paths[-1], SECONDS_PER_FRAME, overwrite=run.overwrite)
        if run.output_format == "text":
            for path in paths:
                print(path, flush=True)
