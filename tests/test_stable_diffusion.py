"""Stable Diffusion-format pipelines (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer):
`ddpm txt2img -m` on a tiny random one matches diffusers' StableDiffusionPipeline with the same
scheduler, seed and settings."""

import numpy as np
import torch
from PIL import Image

from tests.test_cli import ddpm


def test_txt2img_matches_stable_diffusion_pipeline(sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    result = ddpm("txt2img", "a red cat", "-m", sd_dir, "--steps", 6, "--cfg", 4, "--seed", 3, "-n", 2,
                  "--negative-prompt", "blue dog", "-o", tmp_path, "-q")
    assert result.returncode == 0, result.stderr
    reference = StableDiffusionPipeline.from_pretrained(sd_dir)
    expected = reference("a red cat", negative_prompt="blue dog", num_inference_steps=6, guidance_scale=4.0,
                         generator=[torch.Generator().manual_seed(s) for s in (3, 4)], num_images_per_prompt=2,
                         output_type="np").images
    for i, seed in enumerate((3, 4)):
        ours = np.asarray(Image.open(tmp_path / f"a-red-cat-{seed:06d}.png"), dtype=float) / 255
        assert ours.shape == (16, 16, 3)
        assert np.abs(ours - expected[i]).max() <= 1 / 255 + 1e-6
    assert np.abs(expected[0] - expected[1]).max() > 0.01  # the two seeds differ


def test_latent_size_follows_width_and_height(sd_dir, tmp_path):
    result = ddpm("txt2img", "a cat", "-m", sd_dir, "--steps", 2, "--width", 32, "--height", 16, "-o", tmp_path, "-q")
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "a-cat-000000.png").size == (32, 16)
    odd = ddpm("txt2img", "a cat", "-m", sd_dir, "--steps", 2, "--width", 18, "-o", tmp_path / "odd")
    assert odd.returncode == 2 and "multiples of 4" in odd.stderr
