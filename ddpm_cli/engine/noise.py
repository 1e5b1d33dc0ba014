"""Reproducible noise: image i of a run draws all its noise from its own CPU generator (seed + i).

A seed therefore gives the same image on any device and at any batch size, as diffusers advises
(CPU generators are portable; CUDA and MPS generators are not). On CUDA the draws are staged in
pinned memory and copied without blocking, so the sampling loop does not wait on the host copy.
"""

from __future__ import annotations

import torch


class SeededNoise:
    """Draws standard normals of shape (len(seeds), *shape), row b from ``torch.Generator(seeds[b])``."""

    def __init__(self, seeds: list[int], shape: tuple[int, ...], device: torch.device | str = "cpu"):
        self.seeds = list(seeds)
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in self.seeds]

    def __call__(self) -> torch.Tensor:
        draws = torch.cat([torch.randn((1, *self.shape), generator=g) for g in self.generators])
        if self.device.type == "cuda":
            return draws.pin_memory().to(self.device, non_blocking=True)
        return draws.to(self.device)
