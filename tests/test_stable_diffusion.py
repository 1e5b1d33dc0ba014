"""Stable Diffusion-format pipelines (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer):
`ddpm txt2img -m` on a tiny random one matches diffusers' StableDiffusionPipeline with the same
scheduler, seed and settings."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_cli import ddpm
from tests.test_text import _clip_tokenizer


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tmp_path_factory.mktemp("tiny-sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=32, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                                num_hidden_layers=2, vocab_size=1000, max_position_embeddings=77))
    tokenizer = _clip_tokenizer(tmp_path_factory.mktemp("vocab") / "tok")
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            timestep_spacing="trailing")
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    return folder


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
