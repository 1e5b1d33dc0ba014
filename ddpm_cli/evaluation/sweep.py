"""`ddpm eval sweep`: a metric against step count, one line per sampler, as a table and a chart.

Metrics: ``nll``, the bound in bits/dim of the ddpm sampler's own respaced chain (the chain that
sampler draws from at that many steps; DDIM and DPM-Solver have no likelihood), and ``fid``, of
generated images against reference statistics (see ``fid.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ddpm_cli.engine.errors import InputError
from ddpm_cli.engine.diffusion.registry import SAMPLERS
from ddpm_cli.engine.tasks.generate import SamplerSettings, sample_batch
from ddpm_cli.engine.models.pipeline import Pipeline

METRICS = ("nll", "fid")


def check_sweep(metric: str, samplers: list[str], steps: list[int]) -> None:
    if metric not in METRICS:
        raise InputError(f"unknown --metric {metric!r}; choose one of {', '.join(METRICS)}")
    if not samplers or not steps:
        raise InputError("give at least one sampler and one step count")
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


def run_sweep(pipeline: Pipeline, metric: str, samplers: list[str], steps: list[int], evaluate: Callable,
              on_point: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per (sampler, steps): ``evaluate(settings) -> dict`` with at least "value"."""
    check_sweep(metric, samplers, steps)
    rows = []
    for sampler in samplers:
        for count in steps:
            settings = SamplerSettings(sampler, count).resolved(pipeline)
            row = {"sampler": sampler, "steps": count, "metric": metric, **evaluate(settings)}
            rows.append(row)
            if on_point is not None:
                on_point(row)
    return rows


def draw_chart(rows: list[dict], path: Path, title: str) -> Path:
    """A PNG with the metric against step count (log axis), one line per sampler; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = rows[0]["metric"]
    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    for sampler in dict.fromkeys(row["sampler"] for row in rows):
        points = sorted((row["steps"], row["value"], row.get("stderr") or 0.0) for row in rows if row["sampler"] == sampler)
        xs, ys, errors = (np.array(column, dtype=float) for column in zip(*points))
        axes.errorbar(xs, ys, yerr=errors if errors.any() else None, marker="o", capsize=3, label=sampler)
    axes.set_xscale("log")
    axes.set_xticks(sorted({row["steps"] for row in rows}))
    axes.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.set_xlabel("sampling steps")
    axes.set_ylabel({"nll": "bound (bits/dim)", "fid": "FID"}[metric])
    axes.set_title(title, fontsize=9)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(path)
    return path

