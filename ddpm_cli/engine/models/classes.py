"""diffusers' network classes, imported from the modules that define them and little more.

``from diffusers import UNet2DModel``, and even ``import diffusers.models.unets.unet_2d``, runs package
files on the way that import far more than the class: ``diffusers.models.unets`` imports all eleven
U-Nets (the conditional one brings diffusers' LoRA loaders and peft), ``diffusers.models.transformers``
(reached through ``unet_2d_blocks``) every transformer model and scipy.stats, ``diffusers.hooks``
(reached from ``ModelMixin.device``) peft and every cache hook, and ``diffusers.quantizers``
transformers (``_PRE_BOUND``: the two names ``modeling_utils`` takes from it are bound ahead, so it stays
deferred). ``benchmarks/cold_start.py`` measures what that costs a cold ``ddpm sample``
(docs/performance.md).

:func:`model_class` imports a class's own module with the packages that import every member of their
kind (``_ALL_OF_A_KIND``) *deferred*, none of diffusers' files changed: the package module exists, so
its modules import one by one, and its own ``__init__`` runs the first time a name is looked up on it
(``from diffusers.models.unets import X`` still works and gives the same class).

transformers is never hidden from diffusers: diffusers decides once, when it first imports, whether
transformers is installed (by looking for it, not importing it), and a process that later needs it (a
LoRA file's loader, a text model) would otherwise get diffusers' placeholder classes.

torch._dynamo, which diffusers imports for two decorators, is deferred by the CLI
(:mod:`ddpm_cli.engine.runtime.lazy_dynamo`).

If diffusers' layout changes so that this fails, the class is imported the ordinary way.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

# class name -> the module that defines it
DEFINED_IN = {
    "UNet2DModel": "diffusers.models.unets.unet_2d",
    "VQModel": "diffusers.models.autoencoders.vq_model",
    "UNet2DConditionModel": "diffusers.models.unets.unet_2d_condition",
    "AutoencoderKL": "diffusers.models.autoencoders.autoencoder_kl",
}
# Packages whose __init__ imports every member of its kind.
_ALL_OF_A_KIND = ("diffusers.models.unets", "diffusers.models.transformers", "diffusers.models.autoencoders",
                  "diffusers.hooks")
# Deferred packages of which the model classes' modules need a few names, bound from the submodules that
# define them (what the package's __init__ would bind): ``modeling_utils`` takes two quantizer classes from
# ``diffusers.quantizers``, whose __init__ also imports the pipeline quantization config and, through it,
# transformers (0.8 s), which no unconditional model needs.
_PRE_BOUND = {"diffusers.quantizers": (("DiffusersAutoQuantizer", "diffusers.quantizers.auto"),
                                       ("DiffusersQuantizer", "diffusers.quantizers.base"))}


def model_class(name: str) -> type:
    """diffusers' class ``name`` (a key of DEFINED_IN, else any name ``diffusers`` exports)."""
    if name not in DEFINED_IN:
        import diffusers

        return getattr(diffusers, name)
    return getattr(import_module(DEFINED_IN[name]), name)


def import_module(module_name: str):
    """``importlib.import_module(module_name)`` for a module of diffusers, with the packages of
    _ALL_OF_A_KIND deferred."""
    if module_name in sys.modules:
        return sys.modules[module_name]
    deferred: list = []
    try:
        importlib.import_module("diffusers.models")  # the parent of the deferred packages (lazy itself)
        for package in (*_ALL_OF_A_KIND, *_PRE_BOUND):
            if package not in sys.modules:
                deferred.append(_defer(package))
                for name, defined_in in _PRE_BOUND.get(package, ()):
                    setattr(deferred[-1], name, getattr(importlib.import_module(defined_in), name))
        return importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - diffusers laid out otherwise: import it the ordinary way
        for module in deferred:
            _finish(module)
        return importlib.import_module(module_name)


def _defer(package: str):
    """Put ``package`` in sys.modules without running its __init__, which runs on the first name looked up on it."""
    spec = importlib.util.find_spec(package)
    module = importlib.util.module_from_spec(spec)

    def __getattr__(attribute: str):
        _finish(module)
        return getattr(module, attribute)

    module.__getattr__ = __getattr__
    sys.modules[package] = module
    return module


def _finish(module) -> None:
    """Run a deferred package's own __init__ in it (once); a failure leaves it out of sys.modules, as
    a failed import does."""
    if module.__dict__.pop("__getattr__", None) is None:
        return
    try:
        module.__spec__.loader.exec_module(module)
    except BaseException:
        if sys.modules.get(module.__name__) is module:
            del sys.modules[module.__name__]
        raise
