"""``--snr-gamma G``: min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via
Min-SNR Weighting Strategy").

SNR(t) = alpha_bar_t / (1 - alpha_bar_t). Written as a loss on x_0, L_simple weights timestep t by
SNR(t); min-SNR-gamma clamps that weight at gamma, so the nearly clean timesteps, whose gradients
conflict with the rest, stop dominating. Each sample's squared error on the network's target is
multiplied by the clamped weight expressed for that target, as diffusers' training scripts do
(``compute_snr`` and ``--snr_gamma``):

    epsilon   min(SNR, gamma) / SNR          (an epsilon error is an x_0 error times SNR)
    v         min(SNR, gamma) / (SNR + 1)    (a v error is an x_0 error times SNR + 1)
    sample    min(SNR, gamma)

With gamma larger than every SNR all three are the plain epsilon loss.
"""

from __future__ import annotations

import torch

from ddpm_cli.engine.diffusion.schedule import NoiseSchedule


def snr_table(schedule: NoiseSchedule) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t) for t = 0 .. T - 1 (float64, as the schedule)."""
    alpha_bar = schedule.alphas_cumprod
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Each sample's weight for its SNR. For epsilon, min(SNR, gamma) / SNR is written min(1, gamma / SNR):
    equal where SNR > 0, and 1 (not 0/0) where SNR = 0, at a zero-terminal-SNR schedule's last step."""
    if prediction_type == "epsilon":
        return (gamma / snr).clamp(max=1.0)
    clamped = snr.clamp(max=gamma)
    return clamped / (snr + 1.0) if prediction_type == "v" else clamped
