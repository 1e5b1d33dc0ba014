"""How well DDIM inversion reconstructs real images, against --refine K and --steps N.

Held-out Fashion-MNIST test images (evenly spaced through the test split) are inverted by the
built-in fashion-mnist model (`ddpm invert`'s engine: DDIM, eta 0, leading spacing, K fixed-point
refinements per step), then sampled back with DDIM at the same steps (`ddpm sample --init-noise
--sampler ddim`), and compared with the originals: PSNR in dB on the [0, 1] scale, averaged over
the images (the mean of per-image PSNRs).

    python benchmarks/inversion_psnr.py [--images 8] [--steps 10,20,50] [--refine 0,1,2,5]

Prints one table row per step count, one column per K, and the seconds per image of each cell.
"""

from __future__ import annotations

import argparse
import time

import torch

from ddpm_cli.data.sources import open_dataset
from ddpm_cli.engine.models.pipeline import load_pipeline
from ddpm_cli.engine.tasks.generate import SamplerSettings, sample_batch
from ddpm_cli.engine.tasks.invert import invert_batch


def test_images(count: int, size: int) -> torch.Tensor:
    """``count`` Fashion-MNIST test images in [-1, 1], evenly spaced through the split."""
    data = open_dataset("fashion-mnist", size, 1, split="test")
    stride = max(1, len(data) // count)
    return torch.stack([data.load(i * stride).float() / 127.5 - 1.0 for i in range(count)])


def psnr(images: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [-1, 1], on the [0, 1] scale."""
    mse = ((images.clamp(-1, 1) - truth) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def reconstruction_psnr(pipeline, truth: torch.Tensor, steps: int, refine: int) -> torch.Tensor:
    """Per-image PSNR of invert-then-sample at ``steps`` with ``refine``."""
    noise = invert_batch(pipeline, truth, steps, refine=refine)
    back = sample_batch(pipeline, list(range(len(truth))), SamplerSettings("ddim", steps, eta=0.0), x_T=noise)
    return psnr(back, truth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", default="10,20,50")
    parser.add_argument("--refine", default="0,1,2,5")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pipeline = load_pipeline("fashion-mnist", device="cpu", dtype="fp32")
    truth = test_images(args.images, pipeline.image_size[0])
    refines = [int(k) for k in args.refine.split(",")]
    print(f"{args.images} Fashion-MNIST test images, built-in fashion-mnist model, fp32 on cpu; "
          "PSNR (dB) of invert + DDIM sample back, mean over images (min-max)")
    print("| steps | " + " | ".join(f"K={k}" for k in refines) + " |")
    print("| --- |" + " --- |" * len(refines))
    for steps in [int(n) for n in args.steps.split(",")]:
        cells = []
        for refine in refines:
            started = time.perf_counter()
            values = reconstruction_psnr(pipeline, truth, steps, refine)
            seconds = (time.perf_counter() - started) / len(truth)
            cells.append(f"{values.mean():.1f} ({values.min():.1f}-{values.max():.1f}; {seconds:.2f} s/img)")
        print(f"| {steps} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
