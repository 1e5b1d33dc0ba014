"""One call shape over the networks: ``denoiser(x, t) -> network output`` at integer timestep t.

Samplers see only this call. The sampler state stays in float32; the network may run in fp16 or
bf16, and its output is cast back. Conditioning and guidance wrap the same call.
"""

from __future__ import annotations

import torch


class UNetDenoiser:
    """Adapter for diffusers' UNet2DModel: builds the timestep tensor on the device (no host copy)."""

    def __init__(self, unet: torch.nn.Module, dtype: torch.dtype | None = None):
        self.unet = unet
        self.dtype = dtype or next(unet.parameters()).dtype
        self.evaluations = 0

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        timestep = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        self.evaluations += x.shape[0]
        output = self.unet(x.to(self.dtype), timestep).sample
        return output.to(x.dtype)
