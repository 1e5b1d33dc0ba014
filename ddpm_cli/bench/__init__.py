"""``ddpm bench``: this project's training step and sampler against the diffusers way of doing the
same work, on the same network, batch and step count, measured side by side in one process.

:func:`run` measures every variant and returns rows; a variant that fails (out of memory, a
compiler missing) becomes a row with its error, and the others still run.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ddpm_cli.engine.device import describe, resolve_device
from ddpm_cli.training.presets import unet_config


@dataclass
class Row:
    task: str  # "train" (images/s) or "sample" (U-Net evaluations/s)
    implementation: str  # "ddpm" or "diffusers"
    precision: str  # fp32, bf16 (autocast when training), fp16
    levers: str  # what the variant turns on
    batch: int
    value: float | None = None  # images/s or evaluations/s
    seconds: float | None = None  # the timed window
    error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def layout() -> list[str]:
    """The memory-layout lever, when it is on (``DDPM_MEMORY_FORMAT=channels_last``)."""
    from ddpm_cli.engine.acceleration import memory_format

    return ["channels-last"] if memory_format() == torch.channels_last else []


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work: Callable[[], None]) -> float:
    """Wall seconds of ``work``, with the device drained before and after."""
    synchronize(device)
    started = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - started


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Plan:
    """What to measure: the network (a --model-size preset at 32x32 RGB), batches and step counts."""

    model_size: str = "tiny"
    device: str = "auto"
    train_batch: int = 64
    train_steps: int = 10
    sample_batch: int = 64
    sample_steps: int = 10
    compile: bool = False
    tasks: tuple[str, ...] = ("train", "sample")
    warmup: int = 3

    def unet(self) -> dict:
        return unet_config(self.model_size, 32, 3)


def variants(plan: Plan, device: torch.device) -> list[tuple[str, str, str, bool]]:
    """(task, implementation, precision, compile) in the order they run: diffusers first, as the
    baseline, then this project without and with torch.compile."""
    gpu = device.type == "cuda"
    out = []
    if "train" in plan.tasks:
        out += [("train", "diffusers", "fp32", False)] + ([("train", "diffusers", "bf16", False)] if gpu else [])
        out += [("train", "ddpm", "fp32", False), ("train", "ddpm", "bf16", False)]
        out += [("train", "ddpm", "bf16" if gpu else "fp32", True)] if plan.compile else []
    if "sample" in plan.tasks:
        out += [("sample", "diffusers", "fp32", False)] + ([("sample", "diffusers", "fp16", False)] if gpu else [])
        out += [("sample", "ddpm", "fp32", False), ("sample", "ddpm", "bf16", False)]
        out += [("sample", "ddpm", "bf16", True)] if plan.compile else []
    return out


def run(plan: Plan, on_row: Callable[[Row], None] | None = None) -> dict:
    """Measure every variant of the plan; returns {"device", "model", "parameters", "rows"}."""
    from diffusers.utils import logging

    from ddpm_cli.bench import sampling, training

    logging.set_verbosity_error()  # diffusers' advice on casting a model built in fp32 does not apply here
    device = resolve_device(plan.device)
    rows = []
    for task, implementation, precision, compile in variants(plan, device):
        module = training if task == "train" else sampling
        batch = plan.train_batch if task == "train" else plan.sample_batch
        row = Row(task, implementation, precision, module.levers(implementation, device, compile), batch)
        torch.backends.cudnn.benchmark = False  # each variant sets its own levers; diffusers sets none
        try:
            row.value, row.seconds, note = module.measure(plan, device, implementation, precision, compile)
            row.levers += f" ({note})" if note else ""
        except Exception as exc:  # noqa: BLE001 - one failed variant must not lose the others
            row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        release(device)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    from ddpm_cli.training.presets import build_unet

    parameters = sum(p.numel() for p in build_unet(plan.unet()).parameters())
    return {"device": describe(device, torch.float32).split(", dtype")[0].removeprefix("device "),
            "torch": torch.__version__, "model": plan.model_size, "parameters": parameters,
            "rows": [with_ratios(row, rows) for row in rows]}


def with_ratios(row: Row, rows: list[Row]) -> dict:
    """The row, with its speed over the diffusers fp32 figure and over diffusers' best of the same task."""
    baseline = [r.value for r in rows if r.task == row.task and r.implementation == "diffusers" and r.value]
    fp32 = [r.value for r in rows if r.task == row.task and r.implementation == "diffusers" and r.precision == "fp32"
            and r.value]
    out = row.as_dict()
    out["vs_diffusers_fp32"] = round(row.value / fp32[0], 2) if row.value and fp32 else None
    out["vs_diffusers_best"] = round(row.value / max(baseline), 2) if row.value and baseline else None
    return out
