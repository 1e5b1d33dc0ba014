"""Sampling throughput: this project's ancestral sampler against diffusers' DDPMPipeline.

Both run DDPM (Ho et al. 2020, Algorithm 2) for ``plan.sample_steps`` steps on a batch of
``plan.sample_batch`` and return images; the figure is U-Net evaluations per second. The project
runs through the path ``ddpm sample`` takes: ``Pipeline.accelerate`` (CUDA graphs on CUDA, torch.compile
when asked) and ``sample_batch`` with one noise generator per seed.
"""

from __future__ import annotations

import torch

from ddpm_cli.bench.common import Plan, Prepared, lever_names
from ddpm_cli.engine.runtime.acceleration import compile_mode

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def levers(implementation: str, device: torch.device, compile: bool) -> str:
    if implementation == "diffusers":
        return "DDPMPipeline"
    names = (["CUDA graphs"] if device.type == "cuda" else []) + lever_names(compile)
    return ", ".join(names + ([f"torch.compile {compile_mode() or 'default'}"] if compile else []))


def network(plan: Plan, device: torch.device, precision: str):
    """The plan's U-Net in ``precision`` for inference, with the same weights every time."""
    from ddpm_cli.training.presets import build_unet

    torch.manual_seed(0)
    return build_unet(plan.unet()).to(device, DTYPES[precision]).eval().requires_grad_(False)


def prepare(plan: Plan, device: torch.device, implementation: str, precision: str, compile: bool) -> Prepared:
    """A window of one ``plan.sample_steps``-step sampling run, after a warm-up run of 2 steps."""
    run, pipeline = (_ddpm if implementation == "ddpm" else _diffusers)(plan, device, precision, compile)
    run(2)

    def note() -> str:
        failed = getattr(getattr(pipeline, "forward", None), "failed", None)  # a CUDA graph not recorded
        return f"CUDA graphs off: {failed}" if failed else ""
    return Prepared(lambda: run(plan.sample_steps), plan.sample_batch * plan.sample_steps, note)


def _ddpm(plan: Plan, device: torch.device, precision: str, compile: bool):
    from ddpm_cli.engine.tasks.generate import SamplerSettings, sample_batch
    from ddpm_cli.engine.models.pipeline import from_unet
    from ddpm_cli.engine.diffusion.schedule import NoiseSchedule

    schedule = NoiseSchedule.create("linear", 1000, 1e-4, 0.02, clip_sample=True)
    pipeline = from_unet(network(plan, device, precision), schedule).accelerate(compile)
    seeds = list(range(plan.sample_batch))

    def run(steps: int):
        with torch.inference_mode():
            return sample_batch(pipeline, seeds, SamplerSettings("ddpm", steps))
    return run, pipeline


def _diffusers(plan: Plan, device: torch.device, precision: str, compile: bool):
    from diffusers import DDPMPipeline, DDPMScheduler

    pipe = DDPMPipeline(unet=network(plan, device, precision), scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)

    def run(steps: int):
        return pipe(batch_size=plan.sample_batch, num_inference_steps=steps, output_type="np")
    return run, pipe
