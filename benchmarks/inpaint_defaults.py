"""Which sampler and step count `ddpm inpaint` should use by default, measured.

Held-out Fashion-MNIST test images get a hole (four kinds of mask), the built-in fashion-mnist model
fills it with each sampler, and each fill is scored against the true pixels:

- hole error: mean squared error inside the hole, on the [-1, 1] scale (lower is better);
- noisy fills: the share of fills whose mean absolute Laplacian inside the hole is more than twice
  the true image's there, i.e. holes left full of speckle (what a user sees as "filled with noise").

    python benchmarks/inpaint_defaults.py [--images 32] [--seeds 2]

Prints one table row per sampler and step count, with the time per image.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ddpm_cli.data.sources import open_dataset
from ddpm_cli.engine.models.pipeline import load_pipeline
from ddpm_cli.engine.tasks.generate import SamplerSettings
from ddpm_cli.engine.tasks.inpaint import inpaint_batch

CANDIDATES = [("ddpm", 30), ("ddpm", 50), ("ddpm", 100), ("ddim", 20), ("ddim", 50), ("dpmpp-2m", 20), ("dpmpp-2m", 50)]
LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])[None, None]


def masks(size: int) -> dict[str, torch.Tensor]:
    """1×1×H×W masks (1 = fill): a centre square, the left half, the top third, two blocks."""
    out = {name: torch.zeros(1, 1, size, size) for name in ("centre", "left half", "top third", "two blocks")}
    q = size // 4
    out["centre"][..., q:size - q, q:size - q] = 1
    out["left half"][..., :, : size // 2] = 1
    out["top third"][..., : size // 3, :] = 1
    out["two blocks"][..., 2:2 + q, 2:2 + q] = 1
    out["two blocks"][..., size - 2 - q:size - 2, size - 2 - q:size - 2] = 1
    return out


def roughness(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute Laplacian inside the mask, per image."""
    lap = F.conv2d(images, LAPLACIAN, padding=1).abs()
    return (lap * mask).sum(dim=(1, 2, 3)) / mask.sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pipeline = load_pipeline("fashion-mnist", device="cpu", dtype="fp32")
    size = pipeline.image_size[0]
    data = open_dataset("fashion-mnist", size, 1, split="test")
    stride = max(1, len(data) // args.images)
    truth = torch.stack([data.load(i * stride).float() / 127.5 - 1.0 for i in range(args.images)])
    print(f"{args.images} Fashion-MNIST test images x {len(masks(size))} masks x {args.seeds} seeds per row; "
          f"built-in fashion-mnist model, CPU fp32")
    print(f"{'sampler':<10} {'steps':>5} {'hole MSE':>9} {'noisy fills':>12} {'s/image':>8}")
    for sampler, steps in CANDIDATES:
        settings = SamplerSettings(sampler, steps)
        errors, noisy, count, started = [], 0, 0, time.perf_counter()
        for mask in masks(size).values():
            for k, image in enumerate(truth):
                seeds = [1000 * k + s for s in range(args.seeds)]
                filled = inpaint_batch(pipeline, seeds, settings, image, mask)
                target = image[None].expand_as(filled)
                errors.append((((filled - target) ** 2) * mask).sum(dim=(1, 2, 3)) / mask.sum())
                noisy += int((roughness(filled, mask) > 2 * roughness(image[None], mask)).sum())
                count += filled.shape[0]
        seconds = (time.perf_counter() - started) / count
        print(f"{sampler:<10} {steps:>5} {torch.cat(errors).mean().item():>9.4f} {noisy / count:>11.0%} {seconds:>8.3f}")


if __name__ == "__main__":
    main()
