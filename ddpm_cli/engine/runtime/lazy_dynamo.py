"""torch._dynamo imported when something uses it, not when diffusers decorates its classes.

diffusers imports ``torch._dynamo`` (about 2 s of a cold ``ddpm sample`` on a small CPU) for two
decorators it applies while its modules import: ``allow_in_graph`` on attention blocks
(diffusers.utils.torch_utils) and ``torch.compiler.disable`` on the group-offloading hooks. Neither does
anything until torch.compile traces a graph, and an unconditional or class-conditional ``ddpm sample``
never compiles.

:func:`install` (called by the CLI before a command runs) puts a finder first on ``sys.meta_path``. The
first import of ``torch._dynamo`` then gives a *deferred* package: a module object with those decorators
as stand-ins and no code of torch run. The real package's ``__init__`` runs in that same object (so every
reference to it stays valid) the first time anything else is asked of it: any other attribute
(``torch._dynamo.optimize``, as torch.compile does) or any submodule (``import torch._dynamo.utils``, as
transformers' masking utilities do). Then:

- classes given to ``allow_in_graph`` are registered with the real one, before any graph is traced;
- functions given to ``disable``/``assume_constant_result`` were wrapped: the wrapper calls the function
  itself while torch._dynamo is deferred (nothing can be compiling then), and the real decorator's result
  once it is loaded;
- anything else (a class to ``disable``) loads the package at once and uses the real decorator.

No file of torch or diffusers is changed; a process that never calls :func:`install` imports as usual.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import inspect
import sys
import threading

NAME = "torch._dynamo"
_lock = threading.RLock()
_state: dict = {"module": None, "loader": None, "allowed": []}


def install() -> None:
    """Defer torch._dynamo in this process (a no-op if it is imported already or install ran)."""
    if NAME in sys.modules or any(isinstance(finder, _Finder) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())


def deferred() -> bool:
    """Whether torch._dynamo is in this process as a stand-in whose real package has not run yet."""
    module = sys.modules.get(NAME)
    return module is not None and module is _state["module"] and "__getattr__" in module.__dict__


def load() -> None:
    """Run the real torch._dynamo now if it is deferred (what any use of it does by itself)."""
    module = _state["module"]
    if module is None:
        return
    with _lock:
        if "__getattr__" not in module.__dict__:
            return
        del module.__dict__["__getattr__"]
        for name in _STAND_INS:
            module.__dict__.pop(name, None)
        try:
            _state["loader"].exec_module(module)
        except BaseException:
            if sys.modules.get(NAME) is module:
                del sys.modules[NAME]
            _state["module"] = None
            raise
        allowed, _state["allowed"] = _state["allowed"], []
        for fn in allowed:
            module.allow_in_graph(fn)


class _Finder:
    """Defers the package itself; loads it before any of its submodules is imported."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == NAME and _state["module"] is None:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is None or spec.loader is None:
                return None
            _state["loader"] = spec.loader
            spec.loader = _DeferredLoader()
            return spec
        if fullname.startswith(NAME + ".") and deferred():
            load()
            module = sys.modules.get(fullname)
            if module is not None:  # the package's __init__ imported it: hand over that module
                return importlib.util.spec_from_loader(fullname, _Existing(module), origin=getattr(module, "__file__", None),
                                                       is_package=hasattr(module, "__path__"))
        return None


class _DeferredLoader:
    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        module.__dict__.update(_STAND_INS)
        module.__getattr__ = _load_and_get
        _state["module"] = module


class _Existing:
    """The loader of a module that is already in sys.modules."""

    def __init__(self, module):
        self.module = module

    def create_module(self, spec):
        return self.module

    def exec_module(self, module) -> None:
        pass


def _real():
    load()
    return sys.modules[NAME]


def _load_and_get(name: str):
    return getattr(_real(), name)


def _allow_in_graph(fn):
    """The stand-in for ``allow_in_graph``: records ``fn`` for the real one."""
    if not deferred():
        return _real().allow_in_graph(fn)
    if isinstance(fn, (list, tuple)):
        return [_allow_in_graph(item) for item in fn]
    if not callable(fn):
        raise AssertionError("allow_in_graph expects a callable")
    with _lock:
        _state["allowed"].append(fn)
    return fn


def _wrapping(name: str):
    """A stand-in for a decorator that marks a function for the compiler (``decorator(fn, *args, **kwargs)``)."""

    def decorator(fn=None, *args, **kwargs):
        if fn is None:  # used as @decorator(...)
            return lambda function: decorator(function, *args, **kwargs)
        if not deferred() or not (inspect.isfunction(fn) or inspect.ismethod(fn)):
            return getattr(_real(), name)(fn, *args, **kwargs)
        marked = None

        @functools.wraps(fn)
        def call(*call_args, **call_kwargs):
            nonlocal marked
            if deferred():
                return fn(*call_args, **call_kwargs)
            if marked is None:
                marked = getattr(sys.modules[NAME], name)(fn, *args, **kwargs)
            return marked(*call_args, **call_kwargs)

        return call

    decorator.__name__ = name
    return decorator


_STAND_INS = {"allow_in_graph": _allow_in_graph, "disable": _wrapping("disable"),
              "assume_constant_result": _wrapping("assume_constant_result")}
