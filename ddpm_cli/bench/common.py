"""What the bench's parts share: the plan, a prepared variant, a result row, and timing helpers.

``bench/__init__.py`` (the driver) and its task modules ``sampling.py`` and ``training.py`` import
these from here, so the task modules never import the driver.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from ddpm_cli.training.presets import unet_config


@dataclass
class Row:
    task: str  # "train" (images/s) or "sample" (U-Net evaluations/s)
    implementation: str  # "ddpm" or "diffusers"
    precision: str  # fp32, bf16 (autocast when training), fp16
    levers: str  # what the variant turns on
    batch: int
    value: float | None = None  # images/s or evaluations/s: the median round
    seconds: float | None = None  # the median round's timed window
    error: str | None = None
    per_round: list[float] = field(default_factory=list)  # every round's speed, in order

    def as_dict(self) -> dict:
        return asdict(self)


def lever_names(compile: bool) -> list[str]:
    """The memory-layout and attention-kernel levers, where they are on (``DDPM_MEMORY_FORMAT`` other
    than contiguous, ``DDPM_ATTENTION`` other than auto) for a variant compiled or not."""
    from ddpm_cli.engine.runtime.acceleration import attention_backend, layout

    names = []
    if layout() == "channels_last":
        names.append("channels-last")
    elif layout() == "compiler_channels_last" and compile:
        names.append("channels-last inside torch.compile")
    if attention_backend() != "auto":
        names.append(f"SDPA {attention_backend()}")
    return names


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
    rounds: int = 3
    layouts: tuple[str, ...] = ()  # memory layouts for this project's variants (none: the environment's)
    compile_modes: tuple[str, ...] = ()  # torch.compile modes for its compiled ones (none: the environment's)
    attention_backends: tuple[str, ...] = ()  # attention kernels for this project's variants (none: the environment's)

    def unet(self) -> dict:
        return unet_config(self.model_size, 32, 3)


@dataclass
class Prepared:
    """A variant built and warmed up: ``work()`` runs one timed window of ``units`` images (training)
    or U-Net evaluations (sampling); ``note()`` says what it had to give up, if anything."""

    work: Callable[[], object]
    units: int
    note: Callable[[], str] = lambda: ""
    cudnn_benchmark: bool = False  # the variant's own cuDNN setting, put back before each of its rounds
