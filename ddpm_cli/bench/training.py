"""Training throughput: this project's ``Trainer.train_step`` against a train_unconditional-style loop.

The diffusers loop is the one of diffusers' ``examples/unconditional_image_generation``: DDPMScheduler
``add_noise``, the U-Net's forward in autocast, MSE on the noise, clipping, AdamW (its betas and
weight decay), a cosine schedule, ``EMAModel`` and the loss read every step for the log. It gets
its batches ready-made on the device (its best case: no data loader). Both train on the shipped
Fashion-MNIST images at 32x32 RGB.
"""

from __future__ import annotations

import tempfile
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ddpm_cli.bench.common import Plan, Prepared, lever_names
from ddpm_cli.engine.runtime.acceleration import compile_mode

DATA = "fashion-mnist"


def levers(implementation: str, device: torch.device, compile: bool) -> str:
    if implementation == "diffusers":
        return "train_unconditional loop"
    names = ["fused AdamW", "foreach EMA", "data on device", "no per-step sync"] + lever_names(compile)
    return ", ".join(names + ([f"torch.compile {compile_mode() or 'default'}"] if compile else []))


def prepare(plan: Plan, device: torch.device, implementation: str, precision: str, compile: bool) -> Prepared:
    """A window of ``plan.train_steps`` training steps, after ``plan.warmup`` untimed ones."""
    step = (_ddpm_step if implementation == "ddpm" else _diffusers_step)(plan, device, precision, compile)
    for _ in range(plan.warmup + (2 if compile else 0)):
        step()

    def work():
        for _ in range(plan.train_steps):
            step()
    return Prepared(work, plan.train_batch * plan.train_steps)


def _ddpm_step(plan: Plan, device: torch.device, precision: str, compile: bool):
    from ddpm_cli.training.config import TrainConfig
    from ddpm_cli.training.loop import Trainer

    folder = tempfile.mkdtemp(prefix="ddpm-bench-")
    config = TrainConfig.from_options({
        "data": DATA, "channels": 3, "resolution": 32, "model_size": plan.model_size, "output": folder,
        "batch_size": plan.train_batch, "max_steps": 10**6, "lr": 1e-4, "device": str(device),
        "mixed_precision": "no" if precision == "fp32" else precision, "compile": compile})
    trainer = Trainer(config)

    def step():
        trainer.pending.append(trainer.train_step())
        if len(trainer.pending) >= 10:  # what run() does: read the losses every 10 steps
            trainer._read_losses()
    return step


def diffusers_recipe(model: torch.nn.Module, lr: float, num_training_steps: int):
    """The optimiser, learning-rate schedule and EMA of diffusers' examples/unconditional_image_generation/
    train_unconditional.py, with its defaults: AdamW (betas 0.95/0.999, weight decay 1e-6, eps 1e-8),
    cosine after 500 warm-up steps, EMAModel with warm-up (inv_gamma 1, power 3/4, max decay 0.9999)."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500, num_training_steps=num_training_steps)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                   model_cls=type(model), model_config=model.config)
    return optimizer, lr_scheduler, ema


def _diffusers_step(plan: Plan, device: torch.device, precision: str, compile: bool):
    from diffusers import DDPMScheduler, UNet2DModel

    from ddpm_cli.data.sources import open_dataset

    images = open_dataset(DATA, 32, 3).images.to(device)
    torch.manual_seed(0)
    model = UNet2DModel(**plan.unet()).to(device).train()
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer, lr_scheduler, ema = diffusers_recipe(model, 1e-4, 10**6)
    ema.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    batch = plan.train_batch

    def step():
        index = torch.randint(0, len(images), (batch,), device=device)
        clean = images[index].float() / 127.5 - 1.0
        noise = torch.randn(clean.shape, device=device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), device=device).long()
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        with autocast:
            output = model(noisy, timesteps).sample
        loss = F.mse_loss(output.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        ema.step(model.parameters())
        return loss.detach().item()
    return step
