"""One call shape over the networks: ``denoiser(x, t) -> network output`` at timestep t (an integer,
or fractional for the sigma samplers' interpolated noise levels).

Samplers see only this call. The sampler state stays in float32; the network may run in fp16 or
bf16, and its output is cast back. Conditioning (class labels now; text embeddings later) rides
along as keyword tensors for the U-Net, and classifier-free guidance (Ho & Salimans 2022) is
applied here, so every sampler gets it for free:

    eps = eps_uncond + w (eps_cond - eps_uncond)

with both branches evaluated in one batched forward pass. w = 1 is the plain conditional model,
w = 0 the unconditional one. Guidance rescaling (Lin et al. 2024, sec. 3.4; diffusers'
``guidance_rescale``) then pulls the guided output's standard deviation back towards the
conditional one's, which strong guidance inflates (``rescale_guidance``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Conditioning = dict[str, torch.Tensor]


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. (2024), eqs. 15-17: x_rescaled = x_cfg * std(x_pos) / std(x_cfg), and the output
    phi x_rescaled + (1 - phi) x_cfg; each image's standard deviation over all its elements."""
    if phi == 0.0:
        return guided
    dims = list(range(1, guided.dim()))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1.0 - phi) * guided


class UNetDenoiser:
    """Adapter for diffusers U-Nets: builds the timestep tensor on the device (no host copy).

    ``forward(x, t, **kwargs) -> tensor`` runs the network (default: the U-Net, eagerly; see
    ``acceleration.unet_forward`` for compiled and CUDA-graph forms).
    """

    def __init__(self, unet: torch.nn.Module, dtype: torch.dtype | None = None, cond: Conditioning | None = None,
                 uncond: Conditioning | None = None, scale: float = 1.0, forward: Callable | None = None,
                 rescale: float = 0.0):
        self.unet = unet
        self.forward = forward or (lambda x, t, **kwargs: unet(x, t, **kwargs).sample)
        self.dtype = dtype or next(unet.parameters()).dtype
        self.cond, self.uncond, self.scale, self.rescale = cond or {}, uncond, scale, rescale
        self.evaluations = 0

    @staticmethod
    def _fit(kwargs: Conditioning, rows: int) -> Conditioning:
        """Conditioning made for B images, repeated for a batch of k·B rows ordered k blocks of B
        (several tiles of the same images in one pass)."""
        return {key: value.repeat(rows // value.shape[0], *([1] * (value.dim() - 1)))
                if value.shape[0] != rows else value for key, value in kwargs.items()}

    def _forward(self, x: torch.Tensor, t: int | torch.Tensor, kwargs: Conditioning) -> torch.Tensor:
        if torch.is_tensor(t):  # one timestep per image (likelihood evaluation); repeated for guidance's 2 branches
            timestep = t.to(x.device, torch.long).repeat(x.shape[0] // t.shape[0])
        else:  # fractional timesteps (interpolated noise levels) as float32, as diffusers gives them
            integral = isinstance(t, int) or float(t).is_integer()
            timestep = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long if integral else torch.float32)
        self.evaluations += x.shape[0]
        return self.forward(x.to(self.dtype), timestep, **kwargs).to(x.dtype)

    def __call__(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """The (guided) network output at x and timestep t (an int, or one per image). x is the
        network's whole input: image conditioning, if any, is already among its channels
        (``wrappers.with_channels``)."""
        cond = self._fit(self.cond, x.shape[0])
        if self.uncond is None or self.scale == 1.0:
            return self._forward(x, t, cond)
        uncond = self._fit(self.uncond, x.shape[0])
        if self.scale == 0.0:
            return self._forward(x, t, uncond)
        both = {key: torch.cat([uncond[key], cond[key]]) for key in cond}
        out_uncond, out_cond = self._forward(torch.cat([x, x]), t, both).chunk(2)
        # Output channels past the input's are a learned variance. (Models with extra input channels
        # output fewer channels than they take, and no learned variance: every output channel is guided.)
        channels = x.shape[1]
        guided = out_uncond[:, :channels] + self.scale * (out_cond[:, :channels] - out_uncond[:, :channels])
        guided = rescale_guidance(guided, out_cond[:, :channels], self.rescale)
        # A learned variance (extra channels) is taken from the conditional branch, unguided.
        return torch.cat([guided, out_cond[:, channels:]], dim=1) if out_cond.shape[1] > channels else guided
