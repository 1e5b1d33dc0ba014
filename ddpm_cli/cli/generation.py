"""The setup every generating command (sample, txt2img, inpaint, upscale) shares, in one place:
where the images go (-o, a folder or one .png), loading the model with its sampler settings, the
conditioning (--class, --prompt, --cfg), the metadata, and rendering. The commands declare their
options and build their jobs; ``Generation`` does the rest. Imports no torch until ``load``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from ddpm_cli.cli.errors import EXIT_USAGE, fail
from ddpm_cli.cli.options import DEFAULT_OUTPUT, either
from ddpm_cli.cli.progress import say
from ddpm_cli.cli.render import Job, plan, render
from ddpm_cli.cli.seeds import resolve_seeds

DEFAULT_CFG = {"class": 2.0, "prompt": 7.5}  # guidance scale when --cfg is not given


@dataclass
class Generation:
    """The options the generating commands share, and the steps they take with them."""

    model: str
    sampler: str = "dpmpp-2m"
    steps: int | None = None
    eta: float | None = None
    spacing: str | None = None
    variance: str | None = None
    sigmas: str | None = None
    order: int | None = None
    clip_x0: str | None = None  # --clip-x0 on|off; None: the model's config
    cfg_rescale: float | None = None  # --cfg-rescale PHI; None: not given (0, off)
    seed: str | int | None = None  # --seed N|random (None: 0)
    seed_list: str | None = None  # --seeds LIST, which replaces --seed and -n
    num_images: int | None = None  # -n; None: not given (images_default, or one per --seeds entry)
    images_default: int = 1
    batch_size: int = 8
    output: Path | None = None
    outdir: Path | None = None  # the hidden old spelling of --output
    output_format: str = "text"
    device: str = "auto"
    dtype: str = "auto"
    revision: str | None = None
    lora: list[str] | None = None  # --lora PATH[:SCALE], repeatable
    allow_pickle: bool = False
    compile: bool = False
    overwrite: bool = False
    skip_existing: bool = False
    quiet: bool = False

    @classmethod
    def of(cls, options: dict, **overrides) -> Generation:
        """From a command's parameters (its ``locals()``): the ones named like a field, then ``overrides``."""
        names = {field.name for field in fields(cls)}
        return cls(**{**{key: value for key, value in options.items() if key in names}, **overrides})

    def __post_init__(self) -> None:
        from ddpm_cli.engine.runtime.distributed import world

        self.model = str(self.model)
        self.output = Path(either(self.output, self.outdir, "-o/--output", "--outdir", DEFAULT_OUTPUT))
        self.quiet = self.quiet or not world().main  # under torchrun, rank 0 reports
        self._seeds, drawn = resolve_seeds(self.seed, self.seed_list, self.num_images or self.images_default,
                                           self.num_images is not None, world().distributed)
        self.num_images = len(self._seeds)
        if drawn:
            say(f"ddpm: seed {self._seeds[0]} (random)", self.quiet)

    @property
    def one_file(self) -> bool:
        """-o names a PNG file rather than a folder."""
        return self.output.suffix.lower() == ".png"

    @property
    def folder(self) -> Path:
        return self.output.parent if self.one_file else self.output

    @property
    def seeds(self) -> list[int]:
        """The run's seeds, resolved once from --seed, -n and --seeds (cli/seeds.py)."""
        return self._seeds

    def path(self, name: str) -> Path:
        """The output file ``name`` in the output folder."""
        return self.folder / name

    def plan(self, jobs: list[Job], grid: bool = False) -> tuple[list[Job], list[Job]]:
        """(to do, skipped), checked before any work: -o FILE.png takes exactly one image, no two
        jobs share a file, and existing files are refused, replaced or kept as the user said."""
        if self.one_file:
            if len(jobs) != 1 or grid:
                what = "--grid" if grid else f"{len(jobs)} images"
                raise fail(f"-o {self.output} names one file but this run makes {what}; pass a folder to -o",
                           EXIT_USAGE)
            jobs[0].path = self.output
        return plan(jobs, self.folder, self.overwrite, self.skip_existing, grid)

    def load(self):
        """(pipeline, resolved sampler settings)."""
        from ddpm_cli.engine.tasks.generate import SamplerSettings
        from ddpm_cli.engine.models.pipeline import load_pipeline

        from ddpm_cli.engine.models.lora import LoraSpec, check_file, text_encoder_adapters

        self.loras = [LoraSpec.parse(spec) for spec in self.lora or []]
        for spec in self.loras:  # missing, pickle or damaged files: refused before the model loads
            check_file(spec)
            skipped = text_encoder_adapters(spec)
            if skipped:
                say(f"ddpm: warning: --lora {spec.path}: its {skipped} text-encoder tensors are not loaded "
                    "(ddpm applies a LoRA's U-Net adapters only)", self.quiet)
        pipeline = load_pipeline(self.model, self.revision, self.device, self.dtype, self.allow_pickle, self.compile,
                                 loras=self.loras)
        clip = None if self.clip_x0 is None else self.clip_x0 == "on"
        settings = SamplerSettings(self.sampler, self.steps, self.eta, self.spacing, self.variance,
                                   options={"sigmas": self.sigmas, "order": self.order},
                                   clip_x0=clip, cfg_rescale=self.cfg_rescale or 0.0).resolved(pipeline)
        return pipeline, settings

    def announce(self, pipeline, settings, extra: str = "") -> None:
        from ddpm_cli.engine.runtime.device import describe

        say(f"ddpm: {self.model}: {describe(pipeline.device, pipeline.dtype)}; {settings.sampler}, "
            f"{settings.steps} steps{extra}", self.quiet)

    @staticmethod
    def check_guidance(cfg: float | None, *conditions: tuple[str, object], rescale: float | None = None) -> None:
        """Refuse --cfg (and --cfg-rescale, ``rescale``) when none of ``conditions`` ((flag, value)
        pairs, e.g. ("--class", None)) is given: guidance has nothing to steer towards."""
        if all(value is None for _, value in conditions):
            flags = " or ".join(flag for flag, _ in conditions)
            for flag, given in (("--cfg", cfg), ("--cfg-rescale", rescale)):
                if given is not None:
                    raise fail(f"{flag} guides towards {flags}; give {flags} or drop {flag}", EXIT_USAGE)

    @staticmethod
    def condition(pipeline, cfg: float | None, class_spec: str | None = None, prompt: str | None = None,
                  negative_prompt: str = ""):
        """(Condition or None, guidance scale, metadata) of --class or --prompt with --cfg."""
        from ddpm_cli.engine.models.pipeline import Condition

        if prompt is not None:
            cfg = DEFAULT_CFG["prompt"] if cfg is None else cfg
            meta = {"prompt": prompt, "negative_prompt": negative_prompt or None, "cfg": cfg}
            return Condition(prompt=prompt, negative_prompt=negative_prompt), cfg, meta
        if class_spec is not None:
            label = pipeline.class_index(class_spec)
            cfg = DEFAULT_CFG["class"] if cfg is None else cfg
            return Condition(label), cfg, {"class": label, "class_name": pipeline.class_name(label), "cfg": cfg}
        return None, 1.0, {}

    def params(self, pipeline, settings, size: tuple[int, int], **extra) -> dict:
        """The metadata every image carries: model, settings, size (height, width), dtype, version, and ``extra``
        (``command`` first among them), with what `ddpm replay` needs: the device, the SHA-256 of the
        U-Net's weights (hashed once per file, cached) and the Hub commit of a Hub model."""
        from ddpm_cli import __version__
        from ddpm_cli.engine.models.fingerprint import file_sha256, hub_commit, weights_sha256

        loras = getattr(self, "loras", [])
        if loras:
            extra = {**extra, "lora": [spec.label for spec in loras],
                     "lora_sha256": [file_sha256(spec.path) for spec in loras]}
        params = {"model": self.model, **settings.describe(), **extra, "size": f"{size[1]}x{size[0]}",
                  "dtype": str(pipeline.dtype).removeprefix("torch."), "device": str(pipeline.device),
                  "revision": hub_commit(pipeline.folder), "model_sha256": weights_sha256(pipeline.folder),
                  "version": __version__}
        return {key: value for key, value in params.items() if value is not None}

    def render(self, pipeline, settings, todo: list[Job], skipped: list[Job], params: dict, cfg: float = 1.0,
               grid: bool = False, **kwargs) -> None:
        """Generate ``todo``, writing and printing each image (render.render, with this run's options)."""
        render(pipeline, todo, skipped, settings, cfg, self.batch_size, params, self.output_format, self.quiet,
               grid_path=self.path("grid.png") if grid else None, overwrite=self.overwrite, **kwargs)
