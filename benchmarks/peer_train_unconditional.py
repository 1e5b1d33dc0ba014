"""The peer of benchmarks/recipe_proof.py: diffusers' examples/unconditional_image_generation/
train_unconditional.py recipe, on Fashion-MNIST, for a wall-time budget.

Its defaults, as that script sets them: DDPMScheduler (1,000 steps, linear betas, epsilon), AdamW
(betas 0.95/0.999, weight decay 1e-6, eps 1e-8), cosine learning rate after 500 warm-up steps over
100 epochs, gradient norm clipped at 1, EMAModel with warm-up (inv_gamma 1, power 3/4, max decay
0.9999), MSE on the noise, uniform timesteps; the EMA weights are saved as a DDPMPipeline. What
the issue fixes: lr 1e-4, batch 256, UNet2DModel (64, 128, 128) with 2 layers per block (attention
at the lowest resolution, as the script's default puts it in the deep levels). ``--network tiny``
runs the same loop on ddpm's tiny preset instead, to separate the network's size from the recipe.

The images are the ones `ddpm train fashion-mnist` reads (28x28 zero-padded to 32x32, in [-1, 1]).
Only the training steps count against the budget (data loading and saving do not), as in ddpm.

    python benchmarks/peer_train_unconditional.py --budget 600 -o runs/peer [--network tiny --batch 128]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from ddpm_cli.bench.training import diffusers_recipe
from ddpm_cli.data.sources import open_dataset
from ddpm_cli.training.presets import build_unet, unet_config

PEER_UNET = dict(sample_size=32, in_channels=1, out_channels=1, layers_per_block=2, block_out_channels=(64, 128, 128),
                 down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=600.0, help="seconds of training steps")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--network", choices=("peer", "tiny"), default="peer")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    images = open_dataset("fashion-mnist", 32, 1, split="train").images.float() / 127.5 - 1.0
    model = UNet2DModel(**PEER_UNET) if args.network == "peer" else build_unet(unet_config("tiny", 32, 1))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    steps_per_epoch = -(-len(images) // args.batch)
    optimizer, lr_scheduler, ema = diffusers_recipe(model, args.lr, steps_per_epoch * 100)  # the script's 100 epochs

    step, spent, losses = 0, 0.0, []
    while spent < args.budget:
        for batch in torch.randperm(len(images)).split(args.batch):
            started = time.perf_counter()
            clean = images[batch]
            noise = torch.randn_like(clean)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),))
            noisy = scheduler.add_noise(clean, noise, timesteps)
            loss = F.mse_loss(model(noisy, timesteps).sample.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            ema.step(model.parameters())
            step += 1
            losses.append(loss.item())
            spent += time.perf_counter() - started
            if spent >= args.budget:
                break

    ema.copy_to(model.parameters())
    DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(args.output)
    tail = losses[-10:]
    summary = {"steps": step, "wall_time_s": round(spent, 1), "final_loss": sum(tail) / len(tail),
               "parameters": sum(p.numel() for p in model.parameters()), "network": args.network,
               "batch": args.batch, "lr": args.lr}
    with open(f"{args.output}/peer_train.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
