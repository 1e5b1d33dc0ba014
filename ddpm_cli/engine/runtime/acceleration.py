"""Making the same network run faster: memory layout, attention kernel, torch.compile, CUDA graphs.

:func:`unet_forward` turns a diffusers U-Net into the plain call ``forward(x, t, **kwargs) -> tensor``
that samplers use, with the levers a device supports:

- the memory layout (``DDPM_MEMORY_FORMAT``: by default contiguous weights and inputs, with
  channels-last inside torch.compile's graphs; see :func:`compile_module`), and cuDNN's autotuner
  on CUDA;
- the attention kernel (``DDPM_ATTENTION``: torch's choice by default, or one SDPA backend; see
  :mod:`ddpm_cli.engine.runtime.attention`);
- ``compile``: ``torch.compile`` of the U-Net (fixed shapes, no graph breaks in diffusers' U-Nets);
- ``graphs`` (CUDA only): :class:`GraphedForward` records the forward pass once per input shape and
  replays it, so a sampling step costs one launch instead of hundreds.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from ddpm_cli.engine.choices import ATTENTION_BACKENDS
from ddpm_cli.engine.errors import InputError

Forward = Callable[..., torch.Tensor]

# choices.MEMORY_LAYOUTS: the layout of the weights and inputs; under compiler_channels_last they stay
# contiguous and torch.compile lays the network's own tensors out channels-last (compile_module).
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last,
           "compiler_channels_last": torch.contiguous_format}
_chosen: dict[str, str] = {}  # set by chosen_levers(); otherwise the environment decides


@contextmanager
def chosen_levers(layout: str | None = None, mode: str | None = None, attention: str | None = None) -> Iterator[None]:
    """Within the block, :func:`memory_format`, :func:`compile_mode` and :func:`attention_backend`
    answer ``layout`` (a key of LAYOUTS), ``mode`` (one of choices.COMPILE_MODES) and ``attention``
    (one of choices.ATTENTION_BACKENDS) instead of the environment, where given: how ``ddpm bench``
    builds variants that differ only in these, to time them side by side."""
    saved = dict(_chosen)
    chosen = (("layout", layout), ("mode", mode), ("attention", attention))
    _chosen.update({key: value for key, value in chosen if value is not None})
    try:
        yield
    finally:
        _chosen.clear()
        _chosen.update(saved)


def _lever(key: str, variable: str, default: str, choices) -> str:
    """A lever's value: chosen_levers()'s, else the environment variable's, else ``default``;
    a value outside ``choices`` is the user's error."""
    value = _chosen.get(key) or os.environ.get(variable) or default
    if value not in choices:
        raise InputError(f"unknown {variable}={value!r}; choose one of {', '.join(choices)}")
    return value


def layout() -> str:
    """The memory layout: a key of LAYOUTS, from DDPM_MEMORY_FORMAT (default: compiler_channels_last,
    which is contiguous where nothing is compiled)."""
    return _lever("layout", "DDPM_MEMORY_FORMAT", "compiler_channels_last", LAYOUTS)


def memory_format() -> torch.memory_format:
    """The layout of U-Net weights and inputs: contiguous (NCHW) unless DDPM_MEMORY_FORMAT=channels_last.
    Measured on an H200 with the DDPM CIFAR-10 U-Net, channels-last weights and inputs were slower
    (eager bf16 training 2,543 against 3,289 images/s; compiled, 5,185 against 5,349) than contiguous
    ones, and channels-last inside the compiled graphs was faster (6,119 against 5,348, batch 512).
    Other networks and devices may differ, hence the switch."""
    return LAYOUTS[layout()]


def attention_backend() -> str:
    """The attention kernel: "auto" (torch's choice), or the one SDPA backend DDPM_ATTENTION names."""
    return _lever("attention", "DDPM_ATTENTION", "auto", ATTENTION_BACKENDS)


def prepare_module(module: torch.nn.Module) -> torch.nn.Module:
    """Give the module's weights the chosen memory layout (in place) and its attention layers the
    chosen kernel, and on CUDA let cuDNN pick the fastest convolution algorithm for each shape (a
    training run's and a sampling loop's are fixed)."""
    from ddpm_cli.engine.runtime.attention import use_attention_backend

    if next(module.parameters()).device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    use_attention_backend(module, attention_backend())
    return module.to(memory_format=memory_format())


def compile_mode() -> str | None:
    """torch.compile's mode: its default, or DDPM_COMPILE_MODE (e.g. "max-autotune-no-cudagraphs",
    which autotunes the convolutions and matrix products for minutes first)."""
    mode = _chosen.get("mode") or os.environ.get("DDPM_COMPILE_MODE") or None
    return None if mode == "default" else mode


def compile_module(module: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` with fixed shapes (a new shape compiles again rather than going dynamic), in
    the chosen mode; under DDPM_MEMORY_FORMAT=compiler_channels_last (the default), with Inductor's
    channels-last layout of the network's tensors forced on.

    Inductor decides that layout per graph. For inference it weighs the convolutions' FLOPs and, for
    the DDPM CIFAR-10 U-Net, lays them out channels-last. For training it refuses as soon as one 3x3
    convolution has at least twice as many input channels as output ones, which a U-Net's decoder
    has (skip connections concatenated: 512 to 256). Its convolutions then take NCHW
    tensors, and cuDNN's NHWC kernels convert each input and output: a fifth of a compiled bf16
    training step of the DDPM CIFAR-10 U-Net on an H200 (``benchmarks/kernel_profile.py``). Forced
    on, that step ran at 6,119 instead of 5,348 images/s (batch 512, median of 3 rounds), and on a
    2-core CPU the tiny preset trained at 138 instead of 122. Sampling graphs were channels-last
    already. DDPM_MEMORY_FORMAT=contiguous leaves the choice to Inductor.
    """
    # In bf16, diffusers' resampling blocks call is_torch_version(), an lru_cache-wrapped function of
    # the installed version: Dynamo traces through the cache and warns about it in 14 lines of
    # stderr. The function is pure, so the warning is nothing a user could act on.
    warnings.filterwarnings("ignore", r"Dynamo detected a call to a `functools\.lru_cache`-wrapped function")
    if layout() != "compiler_channels_last":
        return torch.compile(module, dynamic=False, mode=compile_mode())
    from torch._inductor import list_mode_options

    mode = compile_mode()  # torch.compile takes a mode or options, not both: the mode as its options
    options = {**(list_mode_options(mode) if mode else {}), "force_layout_optimization": True}
    return torch.compile(module, dynamic=False, options=options)


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
