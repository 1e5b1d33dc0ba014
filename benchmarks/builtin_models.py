"""What the built-in VAE and upscaler do to real images: the figures of their model cards.

    OMP_NUM_THREADS=1 python benchmarks/builtin_models.py [--vae emoji-vae] [--upscaler emoji-upscaler] [--images 64]

VAE: reconstruction PSNR (encode to the posterior mean, decode) on the emoji it was trained on and on
Fashion-MNIST test images it never saw (grey, as RGB). Upscaler: 2x super-resolution PSNR against the
true 64x64 image, for the model (its default: ancestral sampler, 100 steps) and for bicubic
interpolation of the same 32x32 input, on emoji (its training set) and on Fashion-MNIST test images
resized to 64 (never seen). Prints one table each.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image, for images in [-1, 1]."""
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def emoji(resolution: int, count: int) -> torch.Tensor:
    from ddpm_cli.data.captions import load_emoji

    images, _ = load_emoji(resolution)
    step = max(1, len(images) // count)
    return images[::step][:count].float() / 127.5 - 1


def fashion(resolution: int, count: int) -> torch.Tensor:
    from ddpm_cli.data.sources import open_dataset

    test = open_dataset("fashion-mnist", resolution, 3, split="test")
    return torch.stack([test.load(i) for i in range(count)]).float() / 127.5 - 1


def vae_table(name: str, count: int) -> None:
    from ddpm_cli.engine.models.vae import decode_latents, encode_images, load_autoencoder

    vae = load_autoencoder(name, "cpu", torch.float32)
    print(f"\n{name}: reconstruction PSNR (dB), {count} images each")
    print(f"{'images':34s} {'mean':>6s} {'min':>6s} {'max':>6s}")
    for label, images in ((f"emoji 32x32 (its training set)", emoji(32, count)),
                          (f"Fashion-MNIST test 32x32 (unseen)", fashion(32, count))):
        with torch.no_grad():
            back = decode_latents(vae, encode_images(vae, images, tile=None), tile=None)
        values = psnr(back, images)
        print(f"{label:34s} {values.mean():6.2f} {values.min():6.2f} {values.max():6.2f}")


def upscaler_table(name: str, count: int) -> None:
    from ddpm_cli.engine.models.pipeline import load_pipeline
    from ddpm_cli.engine.tasks.generate import SamplerSettings
    from ddpm_cli.engine.tasks.superres import degrade, upscale_batch

    pipeline = load_pipeline(name, device="cpu", dtype="fp32")
    settings = SamplerSettings("ddpm", 100)
    print(f"\n{name}: 2x PSNR (dB) against the true 64x64 image, {count} images each (ddpm sampler, 100 steps, seed 0)")
    print(f"{'images':34s} {'model':>6s} {'bicubic':>8s} {'gain':>6s} {'s/image':>8s}")
    for label, high in ((f"emoji (its training set)", emoji(64, count)),
                        (f"Fashion-MNIST test (unseen)", fashion(64, count))):
        low = degrade(high, 2)
        bicubic = F.interpolate(low, scale_factor=2, mode="bicubic", align_corners=False)
        started = time.perf_counter()
        made = torch.cat([upscale_batch(pipeline, [0], settings, image) for image in low])
        seconds = (time.perf_counter() - started) / count
        ours, base = psnr(made, high).mean(), psnr(bicubic, high).mean()
        print(f"{label:34s} {ours:6.2f} {base:8.2f} {ours - base:+6.2f} {seconds:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", default="emoji-vae")
    parser.add_argument("--upscaler", default="emoji-upscaler")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--only", choices=("vae", "upscaler"))
    args = parser.parse_args()
    if args.only != "upscaler":
        vae_table(args.vae, args.images)
    if args.only != "vae":
        upscaler_table(args.upscaler, max(1, args.images // 4))


if __name__ == "__main__":
    main()
