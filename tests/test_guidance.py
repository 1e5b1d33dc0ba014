"""Classifier-free guidance and class conditioning on a tiny random class-conditional U-Net."""

import pytest
import torch
from diffusers import UNet2DModel

from ddpm_cli.engine.diffusion.denoiser import UNetDenoiser
from ddpm_cli.engine.errors import InputError
from ddpm_cli.engine.models.pipeline import Condition, from_unet
from ddpm_cli.engine.diffusion.schedule import NoiseSchedule
from tests.conftest import tiny_unet

NAMES = ["T-shirt/top", "Trouser", "Ankle boot"]


def tiny_class_unet(classes: int) -> UNet2DModel:
    """A tiny random class-conditional U-Net (with the null class) whose classes matter."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=classes + 1).eval()
    with torch.no_grad():
        unet.class_embedding.weight.mul_(5)  # make the classes matter
    return unet


@pytest.fixture
def pipeline():
    return from_unet(tiny_class_unet(len(NAMES)), NoiseSchedule.create(), class_names=NAMES)


def predict(pipeline, labels, x, t=500):
    with torch.no_grad():
        return pipeline.unet(x, torch.full((x.shape[0],), t), class_labels=torch.tensor(labels)).sample


def test_guidance_scales_0_and_1_and_the_batched_pass(pipeline):
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    uncond = predict(pipeline, [3, 3], x)
    cond = predict(pipeline, [1, 1], x)
    assert (cond - uncond).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(pipeline.denoiser(2, Condition(1), 0.0)(x, 500), uncond)
        torch.testing.assert_close(pipeline.denoiser(2, Condition(1), 1.0)(x, 500), cond)
        guided = pipeline.denoiser(2, Condition(1), 3.0)
        out = guided(x, 500)
    # One batched forward pass of both branches equals the two separate passes.
    torch.testing.assert_close(out, uncond + 3.0 * (cond - uncond), atol=1e-5, rtol=1e-5)
    assert guided.evaluations == 4  # 2 images x 2 branches, in one call


def test_per_image_classes_and_null_class(pipeline):
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mixed = pipeline.denoiser(3, Condition([0, 1, 2]), 1.0)(x, 100)
        unconditional = pipeline.denoiser(3, Condition(None), 7.0)(x, 100)
    torch.testing.assert_close(mixed, predict(pipeline, [0, 1, 2], x, 100))
    torch.testing.assert_close(unconditional, predict(pipeline, [3, 3, 3], x, 100))


def test_class_names_and_indices(pipeline):
    assert pipeline.num_classes == 3
    assert pipeline.class_index("2") == 2
    assert pipeline.class_index("ankle-boot") == 2
    assert pipeline.class_index("T-shirt") == 0
    with pytest.raises(InputError, match="choose an index 0-2"):
        pipeline.class_index("sneaker")
    with pytest.raises(InputError, match="not class-conditional"):
        from_unet(tiny_unet(), NoiseSchedule.create()).class_index("1")


def test_unconditional_denoiser_ignores_guidance():
    # A model with no unconditional branch has nothing to guide against: a guidance scale other
    # than 1 must leave its output, and its one forward pass per image, as they are.
    unet = tiny_unet()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = unet(x, torch.full((2,), 10)).sample
        for denoiser in (UNetDenoiser(unet, scale=3.0), from_unet(unet, NoiseSchedule.create()).denoiser(2, None, 3.0)):
            assert denoiser.scale == 3.0
            torch.testing.assert_close(denoiser(x, 10), plain)
            assert denoiser.evaluations == 2  # 2 images, one branch
