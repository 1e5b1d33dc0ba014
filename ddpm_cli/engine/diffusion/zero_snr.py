"""Zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed").

A schedule whose alpha_bar_T > 0 trains the network on x_T that still holds a trace of the image,
but sampling starts from pure noise; rescaling the betas so that alpha_bar_T = 0 removes the gap.
At T the network must then predict v or x_0 (eps is the input itself), and sigma_T is infinite.
"""

from __future__ import annotations

import torch

# alpha_bar_T where a zero-terminal-SNR schedule has 0 and a finite value is needed (sigma_T for the
# sigma samplers, x_0 from eps): the smallest positive float16 subnormal, as diffusers' Euler,
# DPM-Solver and UniPC schedulers put in their alphas_cumprod[-1] (sigma_T = 4096).
TERMINAL_ALPHA_BAR = 2.0**-24


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose alpha_bar_T is exactly 0 (Lin et al. 2024, Algorithm 1), in the dtype given.

    sqrt(alpha_bar_t) is shifted so that its last value is 0 and scaled so that its first is
    unchanged; the betas follow from the ratios of consecutive alpha_bar. Applying it twice changes
    nothing (the shift and the scale are then 0 and 1).
    """
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas
