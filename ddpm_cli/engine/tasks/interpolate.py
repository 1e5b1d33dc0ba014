"""Spherical interpolation (slerp) between two starting noises x_T, for `ddpm sample --interpolate`.

Gaussian noise in many dimensions lies near a sphere of radius sqrt(d); a straight line between two
draws passes well inside it (at the midpoint its norm is about 0.71 of theirs), where the model has
seen no noise, and the middle frames come out grey and blurred. Slerp (Shoemake 1985; used for GAN
and diffusion latents since White 2016) follows the great circle, so every frame's x_T has a
typical norm.
"""

from __future__ import annotations

import math

import torch


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """The point a fraction t of the way from a to b along the great circle through them (t = 0: a,
    t = 1: b), angle measured on the flattened tensors; nearly parallel ones are interpolated linearly."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cosine = float(torch.dot(a64, b64) / (a64.norm() * b64.norm()).clamp_min(1e-30))
    theta = math.acos(max(-1.0, min(1.0, cosine)))
    if math.sin(theta) < 1e-6:
        return ((1.0 - t) * a64 + t * b64).reshape(a.shape).to(a.dtype)
    mixed = (math.sin((1.0 - t) * theta) * a64 + math.sin(t * theta) * b64) / math.sin(theta)
    return mixed.reshape(a.shape).to(a.dtype)


def interpolation(a: torch.Tensor, b: torch.Tensor, frames: int) -> list[torch.Tensor]:
    """``frames`` (>= 2) points from a to b, both ends included, evenly spaced in angle."""
    if frames < 2:
        raise ValueError("an interpolation needs at least 2 frames")
    return [a.clone() if k == 0 else b.clone() if k == frames - 1 else slerp(a, b, k / (frames - 1))
            for k in range(frames)]
