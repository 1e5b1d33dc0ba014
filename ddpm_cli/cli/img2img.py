"""--init-image IMG|DIR, --strength S and --resize on `sample` and `txt2img` (engine/tasks/img2img.py).

Checked and read before the model loads (a missing or unreadable image, a strength outside (0, 1],
--strength or --resize without --init-image: one line, exit 2); sized and encoded once per image
after it loads. One image keeps the command's file names; a folder puts each image's stem in them.
"""

from __future__ import annotations

from pathlib import Path

from ddpm_cli.cli.errors import EXIT_USAGE, fail


class InitImages:
    """The run's init images (none without --init-image)."""

    def __init__(self, spec: Path | None, strength: float | None, resize: bool):
        from ddpm_cli.engine.tasks.img2img import DEFAULT_STRENGTH

        if spec is None:
            for flag, value in (("--strength", strength is not None), ("--resize", resize)):
                if value:
                    raise fail(f"{flag} goes with --init-image; give --init-image IMG or drop {flag}", EXIT_USAGE)
            self.images, self.strength = [], None
            return
        self.strength = DEFAULT_STRENGTH if strength is None else strength
        if not 0.0 < self.strength <= 1.0:
            raise fail(f"--strength must be in (0, 1] (the share of the sampler's steps that run), got {self.strength}",
                       EXIT_USAGE)
        from ddpm_cli.engine.tasks.img2img import init_image_paths, read_init_image

        self.folder = Path(spec).is_dir()
        self.resize = resize
        self.images = [read_init_image(path) for path in init_image_paths(spec)]

    def __bool__(self) -> bool:
        return bool(self.images)

    def each(self, stem: str = "") -> list[tuple[str, object]]:
        """(file-name stem, image) per init image: ``stem`` as it is for one image, with the image's
        own stem for a folder ("a-red-cat" -> "a-red-cat-shirt"); [(stem, None)] without init images."""
        if not self.images:
            return [(stem, None)]
        if not self.folder:
            return [(stem, self.images[0])]
        return [("-".join(part for part in (stem, image.path.stem) if part), image) for image in self.images]

    def params(self, image) -> dict:
        """Per-image metadata: the init image's path as given and its SHA-256."""
        return image.metadata() if image is not None else {}

    def settings(self) -> dict:
        """Metadata every image of the run shares: the strength."""
        return {"strength": self.strength, "resize": self.resize or None} if self.images else {}  # ddpm replay needs both

    def describe(self, steps: int | None) -> str:
        """For the run's announcement line."""
        if not self.images:
            return ""
        return f"; from {len(self.images)} init image{'s' * (len(self.images) > 1)}, strength {self.strength} ({steps} steps run)"

    def prepare(self, pipeline, settings, size: tuple[int, int], jobs: list) -> int | None:
        """Size and encode every init image for ``pipeline`` (``size``: height, width in pixels), give
        each job its image's generator inputs, and return the sampler steps each image runs (None
        without init images)."""
        if not self.images:
            return None
        from ddpm_cli.engine.tasks.img2img import start_timesteps, to_model_space

        steps = len(start_timesteps(settings.timesteps(pipeline.schedule), self.strength))
        inputs = {}
        for image in self.images:
            pixels = image.pixels(size, pipeline.image_channels, self.resize)
            inputs[str(image.path)] = {"init": to_model_space(pipeline, pixels), "strength": self.strength}
        for job in jobs:
            job.inputs = inputs[job.params["init_image"]]
        return steps
