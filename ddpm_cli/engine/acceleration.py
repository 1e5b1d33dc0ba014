"""Making the same network run faster: channels-last memory, torch.compile, CUDA graphs.

:func:`unet_forward` turns a diffusers U-Net into the plain call ``forward(x, t, **kwargs) -> tensor``
that samplers use, with the levers a device supports:

- the memory layout (``DDPM_MEMORY_FORMAT``: contiguous by default, or channels-last), and cuDNN's
  autotuner on CUDA;
- ``compile``: ``torch.compile`` of the U-Net (fixed shapes, no graph breaks in diffusers' U-Nets);
- ``graphs`` (CUDA only): :class:`GraphedForward` records the forward pass once per input shape and
  replays it, so a sampling step costs one launch instead of hundreds.

Attention already goes through ``scaled_dot_product_attention`` (diffusers' default processor).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

Forward = Callable[..., torch.Tensor]

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}  # choices.MEMORY_LAYOUTS
_chosen: dict[str, str] = {}  # set by chosen_levers(); otherwise the environment decides


@contextmanager
def chosen_levers(layout: str | None = None, mode: str | None = None) -> Iterator[None]:
    """Within the block, :func:`memory_format` and :func:`compile_mode` answer ``layout`` (a key of
    LAYOUTS) and ``mode`` (one of choices.COMPILE_MODES) instead of the environment, where given: how
    ``ddpm bench`` builds variants that differ only in these, to time them side by side."""
    saved = dict(_chosen)
    _chosen.update({key: value for key, value in (("layout", layout), ("mode", mode)) if value is not None})
    try:
        yield
    finally:
        _chosen.clear()
        _chosen.update(saved)


def memory_format() -> torch.memory_format:
    """The layout of U-Net weights and inputs: contiguous (NCHW), or channels-last with
    DDPM_MEMORY_FORMAT=channels_last. Measured on an H200 with the DDPM CIFAR-10 U-Net, channels-last
    was slower (eager bf16 training 2,543 against 3,289 images/s; compiled, 5,185 against 5,349): its
    group norms run a slow path. Other networks and devices may differ, hence the switch."""
    if "layout" in _chosen:
        return LAYOUTS[_chosen["layout"]]
    return torch.channels_last if os.environ.get("DDPM_MEMORY_FORMAT") == "channels_last" else torch.contiguous_format


def prepare_module(module: torch.nn.Module) -> torch.nn.Module:
    """Give the module's weights the chosen memory layout (in place), and on CUDA let cuDNN pick the
    fastest convolution algorithm for each shape (a training run's and a sampling loop's are fixed)."""
    if next(module.parameters()).device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return module.to(memory_format=memory_format())


def compile_mode() -> str | None:
    """torch.compile's mode: its default, or DDPM_COMPILE_MODE (e.g. "max-autotune-no-cudagraphs",
    which autotunes the convolutions and matrix products for minutes first)."""
    mode = _chosen.get("mode") or os.environ.get("DDPM_COMPILE_MODE") or None
    return None if mode == "default" else mode


def compile_module(module: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` with fixed shapes (a new shape compiles again rather than going dynamic)."""
    # In bf16, diffusers' resampling blocks call is_torch_version(), an lru_cache-wrapped function of
    # the installed version: Dynamo traces through the cache and warns about it in 14 lines of
    # stderr. The function is pure, so the warning is nothing a user could act on.
    warnings.filterwarnings("ignore", r"Dynamo detected a call to a `functools\.lru_cache`-wrapped function")
    return torch.compile(module, dynamic=False, mode=compile_mode())


class GraphedForward:
    """Replays ``forward`` as a CUDA graph: one graph per input signature, recorded on first use.

    Inputs are copied into the graph's static tensors and the output is cloned out, so callers see
    ordinary tensors. Non-tensor keyword values are part of the signature. If recording fails (an
    operation that cannot be captured), the call falls back to ``forward`` for good.
    """

    def __init__(self, forward: Forward, warmup: int = 2):
        self.forward, self.warmup = forward, warmup
        self.graphs: dict[tuple, tuple[list[torch.Tensor], dict, torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.failed: str | None = None

    @staticmethod
    def _signature(args: tuple, kwargs: dict) -> tuple:
        def describe(value):
            if torch.is_tensor(value):
                return ("tensor", tuple(value.shape), value.dtype, tuple(value.stride()), value.device)
            return ("value", value)
        return tuple(describe(a) for a in args) + tuple((k, describe(v)) for k, v in sorted(kwargs.items()))

    def _record(self, args: tuple, kwargs: dict):
        static_args = [a.clone() if torch.is_tensor(a) else a for a in args]
        static_kwargs = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (and compilation) outside the recording
            for _ in range(self.warmup):
                self.forward(*static_args, **static_kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.forward(*static_args, **static_kwargs)
        return static_args, static_kwargs, graph, output

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        if self.failed is not None:
            return self.forward(*args, **kwargs)
        key = self._signature(args, kwargs)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._record(args, kwargs)
            except Exception as exc:  # noqa: BLE001 - an uncapturable network still runs, eagerly
                self.failed = f"{type(exc).__name__}: {exc}"
                torch.cuda.synchronize()
                return self.forward(*args, **kwargs)
        static_args, static_kwargs, graph, output = self.graphs[key]
        for static, value in zip(static_args, args):
            if torch.is_tensor(static):
                static.copy_(value)
        for name, static in static_kwargs.items():
            if torch.is_tensor(static):
                static.copy_(kwargs[name])
        graph.replay()
        return output.clone()


def unet_forward(unet: torch.nn.Module, compile: bool = False, graphs: bool | None = None) -> Forward:
    """``forward(x, t, **kwargs)``: the U-Net's output tensor, through the levers asked for.

    ``graphs=None`` records CUDA graphs on CUDA devices and not elsewhere.
    """
    module = compile_module(unet) if compile else unet

    def forward(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        return module(x, t, **kwargs).sample

    device = next(unet.parameters()).device
    if graphs is None:
        graphs = device.type == "cuda"
    return GraphedForward(forward) if graphs and device.type == "cuda" else forward
