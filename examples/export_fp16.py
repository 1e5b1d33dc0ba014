"""Export a model folder (a ddpm run or any DDPMPipeline folder) with fp16 weights, half the size.

    python examples/export_fp16.py RUN_DIR OUT_DIR

This is how the built-in models under ddpm_cli/data/models/ were made from their training runs.
The U-Net is loaded in fp32 and saved in fp16 safetensors; ddpm and diffusers load it in any dtype.
"""

import argparse
import json
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    unet = UNet2DModel.from_pretrained(args.run_dir, subfolder="unet", use_safetensors=True)
    scheduler_config = json.loads((args.run_dir / "scheduler" / "scheduler_config.json").read_text())
    pipeline = DDPMPipeline(unet=unet.to(torch.float16), scheduler=DDPMScheduler.from_config(scheduler_config))
    pipeline.save_pretrained(args.out_dir)
    print(args.out_dir)


if __name__ == "__main__":
    main()
