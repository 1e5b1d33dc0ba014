"""`ddpm eval nll`: the variational bound of a pixel-space model on held-out images, in bits/dim.

The images default to the held-out split of the data the model was trained on, as recorded in its
ddpm_model.json (Fashion-MNIST's test set for a model trained on fashion-mnist). Each image is
put on the 8-bit grid the decoder term assumes. Conditional models are measured through their
unconditional branch (the null class, or the empty prompt).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ddpm_cli.engine.diffusion.bound import BoundEstimate, bound_bpd
from ddpm_cli.engine.errors import InputError
from ddpm_cli.engine.models.pipeline import KINDS, Condition, Pipeline
from ddpm_cli.engine.diffusion.samplers import make_timesteps
from ddpm_cli.evaluation.images import read_images

HELD_OUT_SPLITS = {"fashion-mnist": "test", "fashion-mnist-subset": "test"}


def held_out_images(pipeline: Pipeline, data: str | None, limit: int | None) -> tuple[torch.Tensor, str]:
    """(N×C×H×W uint8 images at the model's size, a description of where they came from)."""
    spec, split = data, "test"
    if spec is None:
        recorded = pipeline.info.get("data")
        if not recorded:
            raise InputError(f"{pipeline.name} does not record its training data; pass DATA (a folder or a built-in)")
        if recorded not in HELD_OUT_SPLITS:
            raise InputError(f"{pipeline.name} was trained on {recorded}, which has no held-out split; "
                             "pass DATA: a folder of images the model did not see")
        spec, split = recorded, HELD_OUT_SPLITS[recorded]
    height, width = pipeline.image_size
    if height != width:
        raise InputError(f"eval nll needs a square model; {pipeline.name} makes {width}x{height} images")
    images, name = read_images(spec, height, pipeline.image_channels, split, limit)
    return images, (f"{name} ({split} split)" if spec in HELD_OUT_SPLITS else name)


def check_pixel_model(pipeline: Pipeline) -> None:
    if pipeline.vae is not None:
        raise InputError(f"{pipeline.name} is a latent model; the bound in bits/dim is defined for pixel-space "
                         "models (its decoder term assumes 8-bit pixels)")
    if pipeline.kind != "image":
        raise InputError(f"{pipeline.name} is {KINDS[pipeline.kind][0]}; eval nll measures image models")


def unconditional(pipeline: Pipeline) -> Condition | None:
    return Condition(prompt="") if pipeline.text_encoder is not None else None


def bound_of(pipeline: Pipeline, images: torch.Tensor, batch_size: int, samples: int | None, seed: int,
             steps: int | None = None, variance: str | None = None,
             on_batch: Callable[[int], None] | None = None) -> BoundEstimate:
    """The bound of every image (uint8), batch by batch; with ``steps``, of the model respaced to
    that many steps ("leading" spacing, as the ddpm sampler), the chain it samples with."""
    check_pixel_model(pipeline)
    variance = variance or pipeline.variance
    schedule, to_model = pipeline.schedule, None
    if steps is not None and steps < schedule.num_train_timesteps:
        visited = sorted(make_timesteps(schedule.num_train_timesteps, steps, "leading"))
        schedule = schedule.respaced(visited)
        to_model = torch.tensor(visited, dtype=torch.long, device=pipeline.device)
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for start in range(0, images.shape[0], batch_size):
        x0 = images[start:start + batch_size].to(pipeline.device).float() / 127.5 - 1.0
        denoiser = pipeline.denoiser(x0.shape[0], unconditional(pipeline))

        def network(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return denoiser(xt, t if to_model is None else to_model[t])

        parts.append(bound_bpd(network, schedule, x0, variance, samples, generator))
        if on_batch is not None:
            on_batch(min(start + batch_size, images.shape[0]))
    return BoundEstimate(*(torch.cat([getattr(p, name) for p in parts]) for name in ("total", "prior", "decoder", "kl")),
                         parts[0].timesteps)
