"""``ddpm eval nll|fid|sweep``: the likelihood bound, FID, and either against sampling steps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

from ddpm_cli.cli.errors import EXIT_USAGE, fail, handle_errors, writable_folder
from ddpm_cli.cli.options import (AllowPickleOpt, DataAlias, DeviceOpt, DtypeOpt, ImagesAlias, QuietOpt, RevisionOpt,
                                  ClipX0Opt, Sampler, SeedOpt, SigmasOpt, VarianceOpt, complete, dtype_option, either, format_option,
                                  split_list)
from ddpm_cli.cli.progress import StepProgress, say
from ddpm_cli.engine.choices import SAMPLERS, SIGMAS

EXAMPLES = """
Examples:

\b
  ddpm eval nll fashion-mnist -n 1000                     # the built-in model on Fashion-MNIST's test split
  ddpm eval nll runs/fashion --exact -n 256 --format json | jq .bits_per_dim
  ddpm eval fid runs/cifar --ref ./cifar-train -n 10000 --inception pt_inception-2015-12-05-6726825d.pth
  ddpm eval sweep runs/fashion --metric nll --samplers ddpm --steps 10,20,50,100,1000 -o sweep.png
  ddpm eval sweep fashion-mnist --metric distance --samplers all --sigmas default,karras --steps 5,10,20 -n 64
"""

eval_app = typer.Typer(help="Measure models: the variational bound in bits/dim, FID, and either against steps.",
                       no_args_is_help=True, epilog=EXAMPLES)

ModelArg = Annotated[str, typer.Argument(metavar="MODEL", help="A model folder, a built-in name, or a Hub id.", show_default=False)]
InceptionOpt = Annotated[str | None, typer.Option("--inception", help="pytorch-fid's Inception weights (pt_inception-2015-12-05-6726825d.pth) [default: $DDPM_INCEPTION_WEIGHTS, else torch's hub cache].")]
RefOpt = Annotated[str | None, typer.Option("--ref", help="Reference images: a folder, a built-in data set (its training split), or an .npz of statistics from an earlier run.")]
RefImagesOpt = Annotated[int, typer.Option("--ref-images", min=2, help="Reference images to use at most.")]
DataArg = Annotated[str | None, typer.Argument(metavar="[DATA]", show_default=False, help="Held-out images: a folder or a built-in data set [default: the held-out split of the data the model records, as runs of ddpm train and the built-in models do].")]
NllDtypeOpt = dtype_option("fp32, which the bound needs")
SweepDtypeOpt = dtype_option("fp32 with --metric nll; fp32 on cpu, bf16/fp16 on gpu with fid")
NllFormatOpt = format_option("one line: bits/dim and its terms")
FidFormatOpt = format_option("one line: the FID")
SweepFormatOpt = format_option("a table, then the chart's path")
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per network call.")]


def _load(model: str, device: str, dtype: str, revision: str | None, allow_pickle: bool):
    from ddpm_cli.engine.models.pipeline import load_pipeline

    return load_pipeline(model, revision, device, dtype, allow_pickle)


def _inception(path: str | None, device: str):
    """(the FID network, the digest of its weights file)."""
    from ddpm_cli.engine.runtime.device import resolve_device
    from ddpm_cli.evaluation.fid import file_digest, find_weights, load_inception

    weights_path = find_weights(path)
    return load_inception(weights_path, resolve_device(device)), file_digest(weights_path)


def _bound(pipeline, images, batch_size: int, samples: int | None, seed: int, steps: int | None, variance: str | None,
           quiet: bool, label: str):
    from ddpm_cli.evaluation.nll import bound_of

    with StepProgress(label, images.shape[0], quiet) as bar:
        return bound_of(pipeline, images, batch_size, samples, seed, steps, variance, bar.update)


@handle_errors
def nll(
    model: ModelArg,
    data: DataArg = None,
    num_images: Annotated[int | None, typer.Option("--num-images", "-n", min=0, show_default=False, help="Images to evaluate (0: all) [default: 1000].")] = None,
    images: ImagesAlias = None,
    exact: Annotated[bool, typer.Option("--exact", help="Sum every timestep's term (T network calls per image) instead of sampling them.")] = False,
    timesteps: Annotated[int, typer.Option("--timesteps", min=1, help="Without --exact: KL terms sampled per image (stratified), plus the decoder term.")] = 100,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Bound of the model respaced to this many steps (the ddpm sampler's chain) [default: all training steps].")] = None,
    variance: VarianceOpt = None,
    batch_size: BatchOpt = 128,
    seed: SeedOpt = 0,
    output_format: NllFormatOpt = "text",
    device: DeviceOpt = "auto",
    dtype: NllDtypeOpt = "auto",
    revision: RevisionOpt = None,
    allow_pickle: AllowPickleOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The variational bound on -log p(x) in bits/dim (prior + KL terms + discretised decoder)."""
    images = either(num_images, images, "-n/--num-images", "--images", 1000)
    from ddpm_cli.evaluation.nll import check_pixel_model, held_out_images

    pipeline = _load(model, device, "fp32" if dtype == "auto" else dtype, revision, allow_pickle)
    check_pixel_model(pipeline)
    x, source = held_out_images(pipeline, data, images or None)
    mode = "exact" if exact else f"{timesteps} sampled timesteps"
    say(f"ddpm: {model}: bound on {x.shape[0]} images of {source}, {mode}", quiet)
    estimate = _bound(pipeline, x, batch_size, None if exact else timesteps, seed, steps, variance, quiet, "bound")
    result = {"model": model, "data": source, "mode": "exact" if exact else "sampled", "steps": steps,
              "variance": variance or pipeline.variance, **estimate.summary()}
    if output_format == "json":
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['bits_per_dim']:.4f} bits/dim ± {result['stderr']:.4f} ({result['images']} images; "
              f"prior {result['prior_bpd']:.4f}, KL terms {result['kl_bpd']:.4f}, decoder {result['decoder_bpd']:.4f})")


def _reference_stats(ref: str, inception, weights: str, size: int, channels: int, limit: int, batch_size: int,
                     quiet: bool):
    """Stats of the reference: an .npz given, or computed once and cached by source, size, count and weights."""
    import hashlib
    import os

    from ddpm_cli.evaluation.fid import Stats, image_stats
    from ddpm_cli.evaluation.images import read_images

    if ref.endswith(".npz"):
        stats = Stats.load(Path(ref).expanduser())
        if stats.weights != weights:
            raise fail(f"{ref} was made with other Inception weights ({stats.weights}, not {weights}); "
                       "recompute it from the images", EXIT_USAGE)
        return stats, ref
    local = Path(ref).expanduser()
    source = str(local.resolve()) if local.exists() else ref
    key = hashlib.sha256(json.dumps([source, size, channels, limit, weights]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm-cli" / "fid" / f"{key}.npz"
    if cache.is_file():
        say(f"ddpm: reference statistics from {cache}", quiet)
        return Stats.load(cache), str(cache)
    images, _ = read_images(ref, size, channels, "train", limit)
    with StepProgress("reference", images.shape[0], quiet) as bar:
        stats = image_stats(inception, images, batch_size, weights, bar.update)
    cache.parent.mkdir(parents=True, exist_ok=True)
    stats.save(cache)
    say(f"ddpm: reference statistics cached in {cache}", quiet)
    return stats, str(cache)


def _is_image_folder(source: str) -> bool:
    folder = Path(source).expanduser()
    return folder.is_dir() and not (folder / "model_index.json").is_file() and not (folder / "unet").is_dir()


@handle_errors
def fid(
    source: Annotated[str, typer.Argument(metavar="SAMPLES|MODEL", help="A folder of generated images, or a model to sample.", show_default=False)],
    ref: RefOpt = None,
    num_images: Annotated[int, typer.Option("--num-images", "-n", min=2, help="Images to sample from MODEL, or to read from SAMPLES at most.")] = 1000,
    ref_images: RefImagesOpt = 10_000,
    inception: InceptionOpt = None,
    sampler: Annotated[Sampler | None, typer.Option("--sampler", autocompletion=complete(SAMPLERS), show_default=False, help="Sampler for MODEL [default: dpmpp-2m].")] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=1, show_default=False, help="Steps for MODEL [default: the sampler's].")] = None,
    sigmas: SigmasOpt = None,
    clip_x0: ClipX0Opt = None,
    batch_size: BatchOpt = 64,
    seed: SeedOpt = 0,
    output_format: FidFormatOpt = "text",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    revision: RevisionOpt = None,
    allow_pickle: AllowPickleOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """FID of generated images against reference images (Inception-v3 pool features)."""
    if ref is None:
        raise fail("eval fid needs --ref: a folder, a built-in data set or a statistics .npz", EXIT_USAGE)
    folder = _is_image_folder(source)
    if folder and any(value is not None for value in (sampler, steps, sigmas, clip_x0)):
        raise fail(f"--sampler and --steps apply to a MODEL (and --sigmas, --clip-x0); {source} is a folder of images",
                   EXIT_USAGE)
    from ddpm_cli.engine.diffusion.registry import check_options

    check_options(sampler or "dpmpp-2m", {"sigmas": sigmas})  # refused before any weights load
    from ddpm_cli.evaluation.fid import feature_stats, frechet_distance, image_stats

    net, weights = _inception(inception, device)
    if folder:
        from ddpm_cli.evaluation.images import read_images
        from ddpm_cli.engine.io.images import load_image

        first = next((p for p in sorted(Path(source).expanduser().rglob("*")) if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")), None)
        if first is None:
            raise fail(f"no images found under {source}", EXIT_USAGE)
        size = min(load_image(first).size)
        images, _ = read_images(source, size, 3, "train", num_images)
        with StepProgress("features", images.shape[0], quiet) as bar:
            stats = image_stats(net, images, batch_size, weights, bar.update)
        channels, what = 3, {"samples": str(source)}
    else:
        from ddpm_cli.engine.tasks.generate import SamplerSettings
        from ddpm_cli.evaluation.sweep import generated_features

        pipeline = _load(source, device, dtype, revision, allow_pickle)
        clip = None if clip_x0 is None else clip_x0 == "on"
        settings = SamplerSettings(sampler or "dpmpp-2m", steps, options={"sigmas": sigmas},
                                   clip_x0=clip).resolved(pipeline)
        size, channels = pipeline.image_size[0], pipeline.image_channels
        say(f"ddpm: {source}: {num_images} images, {settings.sampler} {settings.steps} steps", quiet)
        with StepProgress("sampling", num_images, quiet) as bar:
            stats = feature_stats(generated_features(pipeline, net, settings, num_images, batch_size, seed, bar.update),
                                  weights)
        what = {"model": source, **settings.describe(), "seed": seed}
    reference, ref_source = _reference_stats(ref, net, weights, size, channels, ref_images, batch_size, quiet)
    value = frechet_distance(stats, reference)
    result = {**what, "fid": value, "images": stats.count, "ref": ref, "ref_stats": ref_source,
              "ref_images": reference.count, "inception": weights}
    if output_format == "json":
        print(json.dumps(result, indent=2))
    else:
        print(f"FID {value:.3f} ({stats.count} images against {reference.count} reference images)")


@handle_errors
def sweep(
    model: ModelArg,
    data: DataArg = None,
    metric: Annotated[Literal["nll", "fid", "distance"], typer.Option("--metric", autocompletion=complete(("nll", "fid", "distance")), help="nll (the bound of the ddpm sampler's respaced chain), fid, or distance (RMS pixel distance, 0-1 scale, to the probability-flow ODE solved by heun at 500 steps from the same seeds; deterministic samplers).")] = "nll",
    samplers: Annotated[str, typer.Option("--samplers", help="Comma-separated samplers, or all.")] = "ddpm",
    sigmas: Annotated[str, typer.Option("--sigmas", help="Comma-separated noise-level schedules (default, karras, exponential), each with the samplers that take --sigmas.")] = "default",
    steps: Annotated[str, typer.Option("--steps", help="Comma-separated step counts.")] = "10,20,50,100",
    num_images: Annotated[int | None, typer.Option("--num-images", "-n", min=2, show_default=False, help="Held-out images (nll), or generated images per point (fid, distance) [default: 500].")] = None,
    images: ImagesAlias = None,
    data_alias: DataAlias = None,
    timesteps: Annotated[int | None, typer.Option("--timesteps", min=1, help="nll: sample this many KL terms per image when a chain is longer [default: every term].")] = None,
    ref: RefOpt = None,
    ref_images: RefImagesOpt = 10_000,
    inception: InceptionOpt = None,
    variance: VarianceOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", show_default=False, help="The PNG chart to write [default: sweep.png].")] = None,
    chart: Annotated[Path | None, typer.Option("--chart", hidden=True)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the chart if it exists.")] = False,
    batch_size: BatchOpt = 128,
    seed: SeedOpt = 0,
    output_format: SweepFormatOpt = "text",
    device: DeviceOpt = "auto",
    dtype: SweepDtypeOpt = "auto",
    revision: RevisionOpt = None,
    allow_pickle: AllowPickleOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """A metric against step count, one line per sampler: a table on stdout and a PNG chart."""
    images = either(num_images, images, "-n/--num-images", "--images", 500)
    data = either(data, data_alias, "DATA", "--data")
    chart = Path(either(output, chart, "-o/--output", "--chart", Path("sweep.png")))
    only = {"nll": {"DATA": data, "--timesteps": timesteps, "--variance": variance},
            "fid": {"--ref": ref, "--inception": inception}, "distance": {}}
    unused = [flag for other, flags in only.items() if other != metric for flag, value in flags.items()
              if value is not None]
    if unused:
        raise fail(f"{unused[0]} does not apply to --metric {metric}", EXIT_USAGE)
    sampler_list = split_list(samplers, "--samplers", choices=(*SAMPLERS, "all"))
    if "all" in sampler_list:
        from ddpm_cli.engine.diffusion.registry import REGISTRY

        sampler_list = [name for name, entry in REGISTRY.items() if metric != "distance" or not entry.stochastic]
    sigmas_list = split_list(sigmas, "--sigmas", choices=SIGMAS)
    step_list = split_list(steps, "--steps", int)
    from ddpm_cli.evaluation.sweep import check_sweep, draw_chart, run_sweep

    check_sweep(metric, sampler_list, step_list)
    if chart.exists() and not overwrite:
        raise fail(f"{chart} exists; pass --overwrite to replace it", EXIT_USAGE)
    if metric == "fid" and ref is None:
        raise fail("--metric fid needs --ref: a folder, a built-in data set or a statistics .npz", EXIT_USAGE)
    writable_folder(chart.parent if str(chart.parent) else Path("."))
    if dtype == "auto" and metric == "nll":
        dtype = "fp32"
    pipeline = _load(model, device, dtype, revision, allow_pickle)
    if metric == "distance":
        from ddpm_cli.evaluation.sweep import distance_point

        evaluate = distance_point(pipeline, images, batch_size, seed)
    elif metric == "nll":
        evaluate = _nll_point(pipeline, data, images, timesteps, variance, batch_size, seed, quiet)
    else:
        evaluate = _fid_point(pipeline, images, ref, ref_images, inception, batch_size, seed, device, quiet)

    def on_point(row: dict) -> None:
        say(f"ddpm: {row['sampler']} ({row['sigmas']} sigmas) {row['steps']} steps: {metric} {row['value']:.4f}", quiet)

    rows = run_sweep(pipeline, metric, sampler_list, step_list, evaluate, on_point, sigmas_list)
    draw_chart(rows, chart, f"{model}: {metric} against steps ({images} images)")
    if output_format == "json":
        print(json.dumps({"model": model, "metric": metric, "chart": str(chart), "rows": rows}, indent=2))
        return
    print(f"{'sampler':<13} {'sigmas':<12} {'steps':>6} {'calls':>6} {metric:>10} {'stderr':>8} {'images':>7}")
    for row in rows:
        stderr = f"{row['stderr']:.4f}" if row.get("stderr") is not None else "-"
        print(f"{row['sampler']:<13} {row['sigmas']:<12} {row['steps']:>6} {row['calls']:>6} {row['value']:>10.4f} "
              f"{stderr:>8} {row['images']:>7}")
    print(chart)


def _nll_point(pipeline, data: str | None, images: int, timesteps: int | None, variance: str | None, batch_size: int,
               seed: int, quiet: bool):
    from ddpm_cli.evaluation.nll import check_pixel_model, held_out_images

    check_pixel_model(pipeline)
    x, _ = held_out_images(pipeline, data, images)

    def evaluate(settings) -> dict:
        samples = timesteps if timesteps and timesteps < settings.steps - 1 else None
        estimate = _bound(pipeline, x, batch_size, samples, seed, settings.steps, variance, quiet, f"{settings.steps} steps")
        summary = estimate.summary()
        return {"value": summary["bits_per_dim"], "stderr": summary["stderr"], "images": summary["images"],
                "variance": variance or pipeline.variance}

    return evaluate


def _fid_point(pipeline, images: int, ref: str, ref_images: int, inception: str | None, batch_size: int, seed: int,
               device: str, quiet: bool):
    from ddpm_cli.evaluation.fid import feature_stats, frechet_distance
    from ddpm_cli.evaluation.sweep import generated_features

    net, weights = _inception(inception, device)
    reference, _ = _reference_stats(ref, net, weights, pipeline.image_size[0], pipeline.image_channels, ref_images,
                                    batch_size, quiet)

    def evaluate(settings) -> dict:
        with StepProgress(f"{settings.sampler} {settings.steps}", images, quiet) as bar:
            features = generated_features(pipeline, net, settings, images, batch_size, seed, bar.update)
        return {"value": frechet_distance(feature_stats(features, weights), reference), "stderr": None,
                "images": images, "ref_images": reference.count}

    return evaluate
