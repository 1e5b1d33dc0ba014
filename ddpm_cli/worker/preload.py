"""What the warm worker imports once, before it forks its first call, and the thread count a call gets."""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

from ddpm_cli.worker import protocol

# What calls import, imported once in the worker (the CLI's modules import most of it lazily).
CLASSES = {"diffusers": ("UNet2DModel", "UNet2DConditionModel", "AutoencoderKL", "VQModel"),
           "transformers": ("CLIPTextModel", "AutoModel", "AutoTokenizer")}
MODULES = ("numpy", "PIL.Image", "PIL.PngImagePlugin", "safetensors.torch", "rich.console", "rich.progress")
PACKAGES = ("ddpm_cli.cli", "ddpm_cli.engine")


def import_stack(log) -> int:
    """Import torch, diffusers, transformers and the CLI; torch's thread count for a caller without
    OMP_NUM_THREADS (the worker itself keeps one thread). ``log`` takes a line about a part not preloaded."""
    import subprocess

    saved = {name: os.environ.pop(name) for name in protocol.PER_CALL if name in os.environ}
    # What a fresh process would use, asked of one (torch's own rule), while this one imports with one
    # thread: importing torch with more starts an OpenMP thread that a forked child would not have.
    fresh = subprocess.Popen([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    os.environ["OMP_NUM_THREADS"] = "1"
    from ddpm_cli.engine.runtime import openmp

    openmp.limit_spinning(openmp.WORKER_SPINCOUNT)  # calls run side by side in the worker
    import torch

    torch.set_num_threads(1)
    for package, names in CLASSES.items():
        try:
            module = importlib.import_module(package)
            for name in names:
                getattr(module, name)
        except Exception as exc:  # noqa: BLE001 - an optional part missing: its calls import it themselves
            log(f"not preloaded: {package} ({type(exc).__name__}: {exc})")
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001
            pass
    for package in PACKAGES:
        module = importlib.import_module(package)
        for info in pkgutil.walk_packages(module.__path__, package + ".", onerror=lambda name: None):
            try:
                importlib.import_module(info.name)
            except Exception as exc:  # noqa: BLE001 - e.g. an optional dependency
                log(f"not preloaded: {info.name} ({type(exc).__name__})")
    from ddpm_cli.cli.app import command

    command()  # the click command tree, which each call would otherwise build again
    del os.environ["OMP_NUM_THREADS"]
    os.environ.update(saved)
    answer = fresh.communicate()[0].strip()
    return int(answer) if answer.isdigit() else os.cpu_count() or 1


def threads(environ: dict, default: int) -> int:
    """torch's intra-op thread count in a fresh process with this environment."""
    for name in protocol.PER_CALL:
        try:
            value = int(environ.get(name, ""))
        except ValueError:
            continue
        if value > 0:
            return value
    return default
