"""Export a model folder (a ddpm run or any DDPMPipeline folder) with fp16 weights, half the size.

    python examples/export_fp16.py RUN_DIR OUT_DIR

This is how the built-in models under ddpm_cli/data/models/ were made from their training runs.
The U-Net (UNet2DModel or UNet2DConditionModel) and a latent model's VAE are loaded in fp32 and
saved in fp16 safetensors, with the scheduler and ddpm_model.json (class names, text encoder) as
they were; ddpm and diffusers load them in any dtype.
"""

import argparse
import json
from pathlib import Path

import diffusers
import torch

from ddpm_cli.training.checkpoints import export_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    unet_class = json.loads((args.run_dir / "unet" / "config.json").read_text())["_class_name"]
    unet = getattr(diffusers, unet_class).from_pretrained(args.run_dir, subfolder="unet", use_safetensors=True)
    vae = None
    if (args.run_dir / "vae").is_dir():
        vae = diffusers.AutoencoderKL.from_pretrained(args.run_dir, subfolder="vae", use_safetensors=True).to(torch.float16)
    scheduler_config = json.loads((args.run_dir / "scheduler" / "scheduler_config.json").read_text())
    info_path = args.run_dir / "ddpm_model.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    export_pipeline(args.out_dir, unet.to(torch.float16), scheduler_config, info, vae)
    print(args.out_dir)


if __name__ == "__main__":
    main()
