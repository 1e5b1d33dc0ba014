"""`ddpm eval sweep`: a metric against step count, one line per sampler (and --sigmas), as a table
and a chart.

Metrics: ``nll``, the bound in bits/dim of the ddpm sampler's own respaced chain (the chain that
sampler draws from at that many steps; DDIM and DPM-Solver have no likelihood); ``fid``, of
generated images against reference statistics (see ``fid.py``); and ``distance``, how far each
N-step image is from the converged solution of the probability-flow ODE from the same noise (the
same seed), as the RMS pixel difference on a 0-1 scale. The reference is Heun's method at
``REFERENCE_STEPS`` steps (999 network calls), with the model's own x_0 clipping, as every sampler
here; only deterministic samplers converge to it, so stochastic ones are refused for this metric.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ddpm_cli.engine.errors import InputError
from ddpm_cli.engine.diffusion.registry import SAMPLERS, sampler_entry
from ddpm_cli.engine.tasks.generate import SamplerSettings, sample_batch
from ddpm_cli.engine.models.pipeline import Pipeline

METRICS = ("nll", "fid", "distance")
REFERENCE_STEPS = 500


def check_sweep(metric: str, samplers: list[str], steps: list[int]) -> None:
    if metric not in METRICS:
        raise InputError(f"unknown --metric {metric!r}; choose one of {', '.join(METRICS)}")
    if not samplers or not steps:
        raise InputError("give at least one sampler and one step count")
    if metric == "distance":
        stochastic = [name for name in samplers if sampler_entry(name).stochastic]
        if stochastic:
            raise InputError(f"--metric distance measures convergence to the probability-flow ODE's solution, which "
                             f"{', '.join(stochastic)} do not converge to (they draw fresh noise); use --metric fid")
    if metric == "nll" and samplers != ["ddpm"]:
        others = ", ".join(name for name in SAMPLERS if name != "ddpm")
        raise InputError(f"--metric nll is the bound of the ddpm sampler's chain; use --samplers ddpm "
                         f"({others} define no likelihood), or --metric fid")


def generated_features(pipeline: Pipeline, inception, settings: SamplerSettings, count: int, batch_size: int,
                       seed: int, on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """FID features of ``count`` images sampled with seeds seed, seed+1, ... (unconditional branch)."""
    from ddpm_cli.evaluation.fid import extract_features
    from ddpm_cli.evaluation.nll import unconditional

    def batches():
        for start in range(seed, seed + count, batch_size):
            seeds = list(range(start, min(start + batch_size, seed + count)))
            yield sample_batch(pipeline, seeds, settings, condition=unconditional(pipeline))

    return extract_features(inception, batches(), on_batch)


def network_calls(sampler: str, steps: int) -> int:
    """Network evaluations per image: two a step for Heun and DPM2, but one for their last step."""
    return 2 * steps - 1 if sampler in ("heun", "dpm2") else steps


def run_sweep(pipeline: Pipeline, metric: str, samplers: list[str], steps: list[int], evaluate: Callable,
              on_point: Callable[[dict], None] | None = None, sigmas: list[str] | None = None) -> list[dict]:
    """One row per (sampler, sigmas, steps): ``evaluate(settings) -> dict`` with at least "value".
    A noise-level schedule other than "default" runs only with the samplers that take --sigmas."""
    check_sweep(metric, samplers, steps)
    rows = []
    for sampler in samplers:
        takes = "sigmas" in sampler_entry(sampler).options
        for kind in sigmas or ["default"]:
            if kind != "default" and not takes:
                continue
            for count in steps:
                options = {"sigmas": kind} if takes else {}
                settings = SamplerSettings(sampler, count, options=options).resolved(pipeline)
                row = {"sampler": sampler, "sigmas": kind, "steps": count, "calls": network_calls(sampler, count),
                       "metric": metric, **evaluate(settings)}
                rows.append(row)
                if on_point is not None:
                    on_point(row)
    return rows


def distance_point(pipeline: Pipeline, count: int, batch_size: int, seed: int,
                   on_batch: Callable[[int], None] | None = None, reference_steps: int = REFERENCE_STEPS) -> Callable:
    """``evaluate(settings)`` for --metric distance: the mean over ``count`` seeds of the RMS pixel
    difference (0-1 scale) to the reference solution from the same seed, with its standard error."""
    import torch

    from ddpm_cli.evaluation.nll import unconditional

    def images(settings) -> torch.Tensor:
        out = []
        for start in range(seed, seed + count, batch_size):
            seeds = list(range(start, min(start + batch_size, seed + count)))
            out.append(sample_batch(pipeline, seeds, settings, condition=unconditional(pipeline)))
            if on_batch is not None:
                on_batch(len(seeds))
        return torch.cat(out)

    reference = []

    def evaluate(settings) -> dict:
        if not reference:
            reference.append(images(SamplerSettings("heun", reference_steps).resolved(pipeline)))
        rms = ((images(settings) - reference[0]) / 2).pow(2).flatten(1).mean(1).sqrt().double()
        return {"value": float(rms.mean()), "stderr": float(rms.std() / len(rms) ** 0.5), "images": count}

    return evaluate


def draw_chart(rows: list[dict], path: Path, title: str) -> Path:
    """A PNG with the metric against step count (log axis), one line per sampler; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = rows[0]["metric"]
    figure, axes = plt.subplots(figsize=(7, 5) if len(rows) > 40 else (6, 4), dpi=120)
    lines = dict.fromkeys((row["sampler"], row.get("sigmas", "default")) for row in rows)
    for sampler, kind in lines:
        points = sorted((row["steps"], row["value"], row.get("stderr") or 0.0) for row in rows
                        if (row["sampler"], row.get("sigmas", "default")) == (sampler, kind))
        xs, ys, errors = (np.array(column, dtype=float) for column in zip(*points))
        style = {"default": "-", "karras": "--", "exponential": ":"}[kind]
        label = sampler if kind == "default" else f"{sampler} {kind}"
        axes.errorbar(xs, ys, yerr=errors if errors.any() else None, marker="o", markersize=3, capsize=3, label=label,
                      linestyle=style, color=f"C{list(dict.fromkeys(s for s, _ in lines)).index(sampler) % 10}")
    if metric == "distance":
        axes.set_yscale("log")
    axes.set_xscale("log")
    axes.set_xticks(sorted({row["steps"] for row in rows}))
    axes.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.set_xlabel("sampling steps")
    axes.set_ylabel({"nll": "bound (bits/dim)", "fid": "FID",
                     "distance": "RMS distance to the converged ODE solution"}[metric])
    axes.set_title(title, fontsize=9)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=6 if len(lines) > 8 else None, ncol=2 if len(lines) > 8 else 1)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(path)
    return path

