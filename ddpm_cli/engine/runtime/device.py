"""Pick the torch device and dtype from the user's --device / --dtype options."""

from __future__ import annotations

import re

import torch

from ddpm_cli.engine.runtime.distributed import world
from ddpm_cli.engine.errors import InputError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")

_SHORT_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    try:
        return bool(backend is not None and backend.is_available())
    except Exception:  # noqa: BLE001 - an odd build must not crash device selection
        return False


def _cuda_device(index: int | None) -> torch.device:
    if not torch.cuda.is_available():
        raise InputError("CUDA was requested but no CUDA device is available; use --device cpu")
    count = torch.cuda.device_count()
    if index is None:  # under torchrun each process takes the GPU of its local rank
        here = world()
        index = here.local_rank if here.distributed else torch.cuda.current_device()
    if index >= count:
        raise InputError(
            f"CUDA device {index} was requested but only {count} CUDA device(s) exist "
            f"(cuda:0 to cuda:{count - 1}); pick one of those or use --device cpu"
        )
    return torch.device("cuda", index)


def resolve_device(spec: str | None = "auto") -> torch.device:
    """Turn "auto", "cpu", "cuda", "cuda:N" or "mps" into an available torch.device."""
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return _cuda_device(None)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda":
        return _cuda_device(None)
    match = re.fullmatch(r"cuda:(\d+)", text)
    if match:
        return _cuda_device(int(match.group(1)))
    if text == "mps":
        if not _mps_available():
            raise InputError("MPS was requested but no Apple MPS device is available; use --device cpu")
        return torch.device("mps")
    raise InputError(f"unknown device {spec!r}; choose one of {', '.join(DEVICE_CHOICES)}")


def resolve_dtype(spec: str | None, device: torch.device | str) -> torch.dtype:
    """Turn "auto", "fp32", "fp16" or "bf16" (or the float* spellings) into a torch.dtype."""
    dev = torch.device(device)
    text = "auto" if spec is None else str(spec).strip().lower()
    if text.startswith("torch."):
        text = text[len("torch."):]
    if text == "auto":
        if dev.type == "cuda":
            try:
                bf16 = torch.cuda.is_bf16_supported()
            except Exception:  # noqa: BLE001 - be conservative when the query itself fails
                bf16 = False
            return torch.bfloat16 if bf16 else torch.float16
        if dev.type == "mps":
            return torch.float16
        return torch.float32
    if text in _DTYPES:
        return _DTYPES[text]
    raise InputError(f"unknown dtype {spec!r}; choose one of {', '.join(DTYPE_CHOICES)}")


def native_bf16(device: torch.device | str) -> bool:
    """Whether the device computes in bf16 natively: a CUDA GPU that supports it, or a CPU with
    AVX512-bf16 or AMX. Elsewhere a CPU emulates bf16, many times slower than fp32."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch's own CPU-feature queries
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a dtype: fp32, fp16, bf16 (or torch's own name for others)."""
    return _SHORT_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def describe(device: torch.device | str, dtype: torch.dtype) -> str:
    """One line such as "device cuda:0 (NVIDIA H100), dtype bf16" or "device cpu, dtype fp32"."""
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index
        try:
            if index is None:
                index = torch.cuda.current_device()
            name = torch.cuda.get_device_name(index)
            where = f"cuda:{index} ({name})"
        except Exception:  # noqa: BLE001 - the description is informational only
            where = "cuda" if index is None else f"cuda:{index}"
    else:
        where = str(dev)
    return f"device {where}, dtype {dtype_name(dtype)}"
