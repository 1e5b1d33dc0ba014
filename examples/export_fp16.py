"""Export a model folder (a ddpm run or any DDPMPipeline folder, or a `--task autoencoder` run) with
fp16 weights, half the size.

    python examples/export_fp16.py RUN_DIR OUT_DIR [--info KEY=VALUE ...] [--class-names FILE]

This is how the built-in models under ddpm_cli/data/models/ were made from their training runs.
The U-Net (UNet2DModel or UNet2DConditionModel) and a latent model's or autoencoder run's VAE are
loaded in fp32 and saved in fp16 safetensors, with the scheduler, ddpm_model.json (class names,
text encoder; ``--info`` adds keys, e.g. ``prompt_prior=nearest``) and a text model's
captions.safetensors as they were; ddpm and diffusers load them in any dtype. ``--class-names FILE``
(one per line, in class order) renames a class model's classes and stores their sentence vectors
(captions.safetensors, for txt2img's prompt prior) so that txt2img need not encode them.
"""

import argparse
import json
import shutil
from pathlib import Path

import diffusers
import torch

from ddpm_cli.engine.models.captions import CAPTIONS_FILE, PRIOR_ENCODER, encode_captions
from ddpm_cli.engine.models.resolve import MODEL_INFO_FILE
from ddpm_cli.training.checkpoints import export_files, export_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--info", nargs="*", default=[], metavar="KEY=VALUE", help="keys added to ddpm_model.json")
    parser.add_argument("--class-names", type=Path, help="a class model's class names, one per line")
    args = parser.parse_args()
    info_path = args.run_dir / MODEL_INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info.update(item.split("=", 1) for item in args.info)
    if args.class_names:
        names, known = args.class_names.read_text().splitlines(), info.get("class_names") or []
        if len(names) != len(known):
            raise SystemExit(f"{args.class_names} names {len(names)} classes; the model has {len(known)}")
        info["class_names"] = names
    vae = None
    if (args.run_dir / "vae").is_dir():
        vae = diffusers.AutoencoderKL.from_pretrained(args.run_dir, subfolder="vae", use_safetensors=True).to(torch.float16)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if not (args.run_dir / "unet").is_dir():  # an autoencoder run: the VAE alone
        export_files(args.out_dir, {"vae": vae.save_pretrained,
                                    MODEL_INFO_FILE: lambda path: path.write_text(json.dumps(info, indent=2))})
    else:
        unet_class = json.loads((args.run_dir / "unet" / "config.json").read_text())["_class_name"]
        unet = getattr(diffusers, unet_class).from_pretrained(args.run_dir, subfolder="unet", use_safetensors=True)
        scheduler_config = json.loads((args.run_dir / "scheduler" / "scheduler_config.json").read_text())
        export_pipeline(args.out_dir, unet.to(torch.float16), scheduler_config, info, vae)
    if args.class_names:
        from ddpm_cli.engine.models.text import TextEncoder

        encode_captions(names, TextEncoder.load(PRIOR_ENCODER, embedding="sentence")).save(args.out_dir)
    elif (args.run_dir / CAPTIONS_FILE).is_file():
        shutil.copyfile(args.run_dir / CAPTIONS_FILE, args.out_dir / CAPTIONS_FILE)
    print(args.out_dir)


if __name__ == "__main__":
    main()
