"""Latent vs pixel DDPM training on the same data: seconds per training step and peak memory, and
what a large image costs the VAE with tiling.

Each measurement runs in its own process (peak memory is that process's), one after another:

    python benchmarks/latent_vs_pixel.py                   # 64x64 and 256x256, then 2048x2048 tiled
    python benchmarks/latent_vs_pixel.py --sizes 64 --no-large --device cuda

Setting: a batch of RGB images at each size; the same U-Net preset in both spaces; the
latent side uses an AutoencoderKL of the `small` autoencoder preset (8x per side, 4 channels), whose
one-off encoding cost per image is reported apart (`ddpm encode` pays it once, not every step).
Weights and pixels are random: the cost depends on neither. "peak MB" is the rise of the process's
peak resident memory (CPU) or of torch's peak allocated memory (CUDA) over the memory in use just
before the first step (weights, optimiser state and activations of the steps count).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _current_mb(device) -> float:
    import os

    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(task: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from ddpm_cli.engine.models.vae import decode_latents, encode_images
    from ddpm_cli.engine.runtime.device import resolve_device
    from ddpm_cli.training.presets import autoencoder_config, build_autoencoder, build_unet, unet_config

    device = resolve_device(task["device"])
    torch.manual_seed(0)
    if task["kind"] == "large":
        size, tile = task["size"], task["tile"]
        vae = build_autoencoder(autoencoder_config(task["vae"], 64, 3)).to(device).eval()
        image = torch.rand(1, 3, size, size, device=device) * 2 - 1
        base = _current_mb(device)
        start = time.perf_counter()
        latents = encode_images(vae, image, tile=tile)
        encoded = time.perf_counter()
        decoded = decode_latents(vae, latents, tile=tile)
        done = time.perf_counter()
        assert decoded.shape == image.shape and torch.isfinite(decoded).all()
        return {"encode_s": encoded - start, "decode_s": done - encoded, "peak_mb": _peak_mb(device) - base,
                "latent_shape": list(latents.shape)}
    size, batch = task["size"], task["batch"]
    images = torch.rand(batch, 3, size, size, device=device) * 2 - 1  # cost does not depend on the pixels
    result = {}
    if task["kind"] == "latent":
        vae = build_autoencoder(autoencoder_config(task["vae"], size, 3)).to(device).eval()
        start = time.perf_counter()
        x0 = encode_images(vae, images, tile=None)
        result["encode_ms_per_image"] = 1000 * (time.perf_counter() - start) / batch
        del vae
    else:
        x0 = images
    unet = build_unet(unet_config(task["preset"], x0.shape[-1], x0.shape[1])).to(device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)

    def step():
        t = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(x0)
        loss = F.mse_loss(unet(x0 + noise, t).sample, noise)  # the cost is the network's, not the schedule's
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    base = _current_mb(device)
    step()  # warm-up: allocations, kernels, optimizer state (counted in the peak)
    start = time.perf_counter()
    for _ in range(task["steps"]):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    result.update(step_s=(time.perf_counter() - start) / task["steps"], peak_mb=_peak_mb(device) - base,
                  shape=list(x0.shape[1:]), parameters=sum(p.numel() for p in unet.parameters()))
    return result


def run_child(task: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(task)], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,256", help="image sizes in pixels, comma-separated")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--preset", default="small", help="U-Net preset in both spaces")
    parser.add_argument("--vae", default="small", help="autoencoder preset (small: 8x per side)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--large", type=int, default=2048, help="size of the tiled VAE round trip")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--large-vae", default="tiny", help="autoencoder preset of the tiled round trip")
    parser.add_argument("--no-large", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import torch

    print(f"# latent vs pixel training, U-Net preset {args.preset}, batch {args.batch}, {args.steps} timed steps, "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| size | space | network input | s/step | peak MB | pixel/latent time | pixel/latent memory | VAE encode ms/image |")
    print("|---|---|---|---|---|---|---|---|")
    for size in [int(s) for s in args.sizes.split(",")]:
        common = {"size": size, "batch": args.batch, "steps": args.steps, "preset": args.preset, "vae": args.vae,
                  "device": args.device}
        pixel, latent = run_child({**common, "kind": "pixel"}), run_child({**common, "kind": "latent"})
        for name, r in (("pixel", pixel), ("latent", latent)):
            if "error" in r:
                print(f"| {size} | {name} | error: {r['error']} | | | | | |")
                continue
            ratio_t = ratio_m = ""
            if name == "latent" and "error" not in pixel:
                ratio_t = f"{pixel['step_s'] / r['step_s']:.1f}x"
                ratio_m = f"{pixel['peak_mb'] / max(r['peak_mb'], 1e-3):.1f}x"
            encode = f"{r['encode_ms_per_image']:.1f}" if "encode_ms_per_image" in r else ""
            print(f"| {size} | {name} | {'x'.join(map(str, r['shape']))} | {r['step_s']:.3f} | {r['peak_mb']:.0f} | "
                  f"{ratio_t} | {ratio_m} | {encode} |", flush=True)
    if not args.no_large:
        r = run_child({"kind": "large", "size": args.large, "tile": args.tile, "vae": args.large_vae,
                       "device": args.device})
        print(f"\n# VAE round trip of one {args.large}x{args.large} image, tiles of {args.tile} px, "
              f"autoencoder preset {args.large_vae}")
        if "error" in r:
            print(f"error: {r['error']}")
        else:
            print(f"encode {r['encode_s']:.1f} s, decode {r['decode_s']:.1f} s, peak memory rise {r['peak_mb']:.0f} MB, "
                  f"latents {'x'.join(map(str, r['latent_shape']))}")


if __name__ == "__main__":
    main()
