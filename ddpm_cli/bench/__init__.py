"""``ddpm bench``: this project's training step and sampler against the diffusers way of doing the
same work, on the same network, batch and step count, measured side by side in one process.

:func:`run` prepares every variant of a task (builds, compiles and warms it up), then times them in
turn, round after round, and keeps each one's median round: on a shared machine a slow spell then
falls on every variant alike instead of on whichever ran during it. A variant that fails (out of
memory, a compiler missing) becomes a row with its error, and the others still run.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import NamedTuple

import torch

from ddpm_cli.bench.common import Plan, Prepared, Row, lever_names, release, synchronize, timed
from ddpm_cli.engine.runtime.device import describe, native_bf16, resolve_device

__all__ = ["Plan", "Prepared", "Row", "Variant", "lever_names", "release", "run", "synchronize", "timed", "variants",
           "with_ratios"]


class Variant(NamedTuple):
    task: str  # "train" or "sample"
    implementation: str  # "diffusers" or "ddpm"
    precision: str
    compile: bool = False
    layout: str | None = None  # a key of acceleration.LAYOUTS; None: the environment's
    mode: str | None = None  # a torch.compile mode; None: the environment's
    attention: str | None = None  # one of choices.ATTENTION_BACKENDS; None: the environment's


def variants(plan: Plan, device: torch.device) -> list[Variant]:
    """The variants in the order they are prepared: diffusers first, as the baseline, then this
    project without and with torch.compile, once per layout of ``plan.layouts`` and attention kernel
    of ``plan.attention_backends`` (and compiled, once per mode of ``plan.compile_modes``)."""
    gpu = device.type == "cuda"
    modes = plan.compile_modes or (None,)
    levers = [(layout, attention) for layout in plan.layouts or (None,) for attention in plan.attention_backends or (None,)]
    out = []
    for task in ("train", "sample"):
        if task not in plan.tasks:
            continue
        second = ("bf16" if task == "train" else "fp16") if gpu else None  # diffusers' fast precision
        out += [Variant(task, "diffusers", p) for p in ("fp32", second) if p]
        out += [Variant(task, "ddpm", p, False, layout, None, attention) for layout, attention in levers
                if layout != "compiler_channels_last" for p in ("fp32", "bf16")]  # that one is compiled only
        if plan.compile:  # bf16 on a GPU; on a CPU, sampling in bf16 where it is native, training in fp32
            precision = "bf16" if gpu or (task == "sample" and native_bf16(device)) else "fp32"
            out += [Variant(task, "ddpm", precision, True, layout, mode, attention) for layout, attention in levers
                    for mode in modes]
    return out


def run(plan: Plan, on_row: Callable[[Row], None] | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Measure every variant of the plan; returns {"device", "model", "parameters", "rounds", "rows"}."""
    from diffusers.utils import logging

    logging.set_verbosity_error()  # diffusers' advice on casting a model built in fp32 does not apply here
    device = resolve_device(plan.device)
    if plan.compile:  # every compiled variant is another entry for the same U-Net code: none may fall back to eager
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
    rows = []
    for task in plan.tasks:
        task_rows = _measure_task(plan, device, [v for v in variants(plan, device) if v.task == task], log)
        release(device)
        rows += task_rows
        for row in task_rows:
            if on_row is not None:
                on_row(row)
    from ddpm_cli.training.presets import build_unet

    parameters = sum(p.numel() for p in build_unet(plan.unet()).parameters())
    return {"device": describe(device, torch.float32).split(", dtype")[0].removeprefix("device "),
            "torch": torch.__version__, "model": plan.model_size, "parameters": parameters, "rounds": plan.rounds,
            "rows": [with_ratios(row, rows) for row in rows]}


def _measure_task(plan: Plan, device: torch.device, task_variants: list[Variant],
                  log: Callable[[str], None] | None = None) -> list[Row]:
    """Prepare the variants of one task and time them in interleaved rounds; the caller releases
    their memory once this returns and drops them."""
    from ddpm_cli.bench import sampling, training
    from ddpm_cli.engine.runtime.acceleration import chosen_levers

    prepared: list[tuple[Row, Prepared | None]] = []
    for v in task_variants:
        module = training if v.task == "train" else sampling
        batch = plan.train_batch if v.task == "train" else plan.sample_batch
        with chosen_levers(v.layout, v.mode, v.attention):  # the levers are fixed when a variant is built
            row = Row(v.task, v.implementation, v.precision, module.levers(v.implementation, device, v.compile), batch)
            if log is not None:
                log(f"preparing {v.task} {v.implementation} {v.precision}" + (f" ({row.levers})" if row.levers else ""))
            torch.backends.cudnn.benchmark = False  # each variant sets its own levers; diffusers sets none
            try:
                variant = module.prepare(plan, device, v.implementation, v.precision, v.compile)
                variant.cudnn_benchmark = torch.backends.cudnn.benchmark
            except Exception as exc:  # noqa: BLE001 - one failed variant must not lose the others
                row.error, variant = _error(exc), None
        prepared.append((row, variant))
    timings: list[list[float]] = [[] for _ in prepared]  # each variant's timed windows, in seconds
    for number in range(plan.rounds):
        if log is not None:
            log(f"timing {task_variants[0].task}, round {number + 1} of {plan.rounds}")
        for (row, variant), seconds in zip(prepared, timings):
            if row.error:
                continue
            torch.backends.cudnn.benchmark = variant.cudnn_benchmark
            try:
                seconds.append(timed(device, variant.work))
            except Exception as exc:  # noqa: BLE001
                row.error = _error(exc)
    for (row, variant), seconds in zip(prepared, timings):
        if not row.error:
            row.seconds = statistics.median(seconds)
            row.value = variant.units / row.seconds
            row.per_round = [round(variant.units / window, 1) for window in seconds]
            note = variant.note()
            row.levers += f" ({note})" if note else ""
    return [row for row, _ in prepared]


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


def with_ratios(row: Row, rows: list[Row]) -> dict:
    """The row, with its speed over the diffusers fp32 figure and over diffusers' best of the same task."""
    baseline = [r.value for r in rows if r.task == row.task and r.implementation == "diffusers" and r.value]
    fp32 = [r.value for r in rows if r.task == row.task and r.implementation == "diffusers" and r.precision == "fp32"
            and r.value]
    out = row.as_dict()
    out["vs_diffusers_fp32"] = round(row.value / fp32[0], 2) if row.value and fp32 else None
    out["vs_diffusers_best"] = round(row.value / max(baseline), 2) if row.value and baseline else None
    return out
