"""Upscaling and inpainting a real photograph through the CLI, with models trained here on photographs.

    pip install scikit-image        # its bundled photographs (public domain / CC0), no download
    python examples/real_photo.py --out runs/photo-demo --steps 1500

1. Cuts 32x32 patches from scikit-image's bundled photographs, all but "chelsea" (the cat), which
   is held out.
2. Trains with `ddpm train PATCHES`: an SR3 2x upscaler (`--task superres --scale 2`) and an
   unconditional model.
3. Upscales chelsea, box-filtered to half size, back to full size with `ddpm upscale` (tiled),
   against bicubic: PSNR to the original, consistency (mean |downsample(output) - input|) and
   edge energy (mean |neighbour difference|, what blur removes; the original's is the target).
4. Fills a 48x48 hole in the cat's forehead with `ddpm inpaint`, against a mean fill: mean squared
   error inside the hole to the original, and the hole's edge energy (texture) against the original's.
5. Prints the table and writes side-by-side PNGs (input, bicubic or mean fill, ddpm, original).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

TRAIN_PHOTOS = ["astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
                "camera", "moon", "brick", "grass", "gravel", "coins", "clock"]
PATCH = 32
HOLE = (slice(40, 88), slice(124, 172))  # rows, columns of the hole in the 300x448 photograph: the forehead


def ddpm(*args) -> str:
    result = subprocess.run([sys.executable, "-m", "ddpm_cli", *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"ddpm {args[0]} failed ({result.returncode}): {result.stderr.strip().splitlines()[-1]}")
    return result.stdout.strip()


def cut_patches(folder: Path, per_photo: int, seed: int = 0) -> int:
    """Random PATCHxPATCH RGB patches at full and half size of every training photograph."""
    import skimage.data

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for name in TRAIN_PHOTOS:
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        for image in (photo, photo.resize((photo.width // 2, photo.height // 2), Image.BOX)):
            pixels = np.asarray(image)
            for _ in range(per_photo // 2):
                top = rng.integers(0, pixels.shape[0] - PATCH + 1)
                left = rng.integers(0, pixels.shape[1] - PATCH + 1)
                Image.fromarray(pixels[top:top + PATCH, left:left + PATCH]).save(folder / f"{name}-{count:05d}.png")
                count += 1
    return count


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def edge_energy(image: np.ndarray) -> float:
    x = image.astype(np.float64) / 127.5 - 1
    return float(np.abs(np.diff(x, axis=0)).mean() + np.abs(np.diff(x, axis=1)).mean())


def side_by_side(images: list[np.ndarray], path: Path) -> None:
    gap = np.full((images[0].shape[0], 4, 3), 255, np.uint8)
    row = [part for image in images for part in (image, gap)][:-1]
    Image.fromarray(np.concatenate(row, axis=1)).save(path)


def main() -> None:
    import skimage.data

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/photo-demo"))
    parser.add_argument("--steps", type=int, default=1500, help="training steps of each model")
    parser.add_argument("--sample-steps", type=int, default=20, help="inpainting steps (dpmpp-2m)")
    args = parser.parse_args()
    out = args.out
    patches = out / "patches"
    if not patches.is_dir():
        print(f"{cut_patches(patches, 200)} patches in {patches}", file=sys.stderr)
    common = ["--resolution", PATCH, "--max-steps", args.steps, "-b", 32, "--lr", "1e-3", "--random-flip",
              "--checkpoint-every", args.steps, "-q"]
    for run, extra in ((out / "sr", ["--task", "superres", "--scale", 2]), (out / "uncond", [])):
        if not (run / "unet").is_dir():
            ddpm("train", patches, "-o", run, *common, *extra)

    original = np.asarray(Image.fromarray(skimage.data.chelsea()).convert("RGB"))[:300, :448]  # sides divisible by 4
    Image.fromarray(original).save(out / "chelsea.png")
    low = Image.fromarray(original).resize((224, 150), Image.BOX)  # the 2x2 block means
    low.save(out / "chelsea-low.png")
    upscaled = np.asarray(Image.open(ddpm("upscale", out / "sr", out / "chelsea-low.png", "-o", out, "--overwrite",
                                          "-q")).convert("RGB"))  # its defaults: ddpm sampler, 100 steps
    bicubic = np.asarray(low.resize((448, 300), Image.BICUBIC))
    back = np.asarray(Image.fromarray(upscaled).resize((224, 150), Image.BOX), dtype=np.float64)
    consistency = np.abs(back - np.asarray(low, dtype=np.float64)).mean() / 127.5
    print("| upscale 224x150 -> 448x300 | PSNR dB | consistency | edge energy (original "
          f"{edge_energy(original):.4f}) |\n| --- | --- | --- | --- |")
    print(f"| bicubic | {psnr(bicubic, original):.2f} | - | {edge_energy(bicubic):.4f} |")
    print(f"| ddpm upscale (ddpm sampler, 100 steps) | {psnr(upscaled, original):.2f} | {consistency:.4f} "
          f"| {edge_energy(upscaled):.4f} |")
    nearest = np.asarray(low.resize((448, 300), Image.NEAREST))
    side_by_side([nearest, bicubic, upscaled, original], out / "upscale-comparison.png")

    mask = np.zeros(original.shape[:2], np.uint8)
    mask[HOLE] = 255
    Image.fromarray(mask).save(out / "hole.png")
    filled = np.asarray(Image.open(ddpm("inpaint", out / "uncond", "--image", out / "chelsea.png", "--mask",
                                        out / "hole.png", "--steps", args.sample_steps, "-o", out, "--overwrite",
                                        "-q")).convert("RGB"))
    mean_fill = original.copy()
    mean_fill[HOLE] = original[mask == 0].mean(axis=0).round().astype(np.uint8)
    holed = original.copy()
    holed[HOLE] = 255
    truth, hole = original[HOLE].astype(np.float64) / 127.5 - 1, (mask == 255)
    mse = lambda image: float(((image[HOLE].astype(np.float64) / 127.5 - 1 - truth) ** 2).mean())  # noqa: E731
    print(f"\n| inpaint 48x48 hole | MSE in the hole ([-1, 1] units) | edge energy in the hole (original "
          f"{edge_energy(original[HOLE]):.4f}) | known pixels unchanged |\n| --- | --- | --- | --- |")
    print(f"| mean fill | {mse(mean_fill):.4f} | {edge_energy(mean_fill[HOLE]):.4f} | yes |")
    print(f"| ddpm inpaint ({args.sample_steps} steps) | {mse(filled):.4f} | {edge_energy(filled[HOLE]):.4f} | "
          f"{'yes' if np.array_equal(filled[~hole], original[~hole]) else 'NO'} |")
    side_by_side([holed, mean_fill, filled, original], out / "inpaint-comparison.png")
    print(f"\ncomparisons: {out / 'upscale-comparison.png'}, {out / 'inpaint-comparison.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
