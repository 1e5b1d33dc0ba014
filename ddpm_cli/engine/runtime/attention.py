"""Which kernel runs a U-Net's attention: torch's own choice, or one scaled-dot-product backend.

diffusers' attention layers call ``scaled_dot_product_attention``, and torch picks the kernel. For
the DDPM CIFAR-10 U-Net (one head of 256 channels over 16x16 tokens) the one it picks on an H200,
cuDNN's flash kernel, reached 41 TFLOP/s, a twentieth of the convolutions' rate, for a fifth of a
sampling step (``benchmarks/kernel_profile.py``). :func:`use_attention_backend` pins another backend
on the layers, so ``ddpm bench --attention-backends`` can time them side by side. The choice is made
inside each layer's call, where ``torch.compile`` sees it and fixes it in the compiled graph.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}  # and "auto": torch's choice


class PinnedBackendProcessor(AttnProcessor2_0):
    """diffusers' SDPA attention, run with only ``backend`` allowed. The signature is the parent's:
    diffusers reads it to decide which keyword arguments a processor takes."""

    def __init__(self, backend: str):
        super().__init__()
        self.backend = backend

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        with sdpa_kernel([BACKENDS[self.backend]]):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def use_attention_backend(module: torch.nn.Module, backend: str) -> int:
    """Pin ``backend`` (a key of BACKENDS, or "auto" for torch's choice) on every attention layer of
    ``module`` that runs diffusers' SDPA processor; returns how many layers run it now. Layers with
    other processors (added key/value projections, custom ones) are left as they are."""
    count = 0
    for layer in module.modules():
        if isinstance(layer, Attention) and type(layer.processor) in (AttnProcessor2_0, PinnedBackendProcessor):
            if getattr(layer.processor, "backend", "auto") != backend:
                layer.set_processor(AttnProcessor2_0() if backend == "auto" else PinnedBackendProcessor(backend))
            count += 1
    return count
