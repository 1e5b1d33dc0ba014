"""Super-resolution (SR3): a model trained here on Fashion-MNIST upscales held-out 14x14 images to
28x28 that are consistent with their input and as sharp as real ones, unlike bicubic upsampling."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_cli.engine.tasks.generate import SamplerSettings
from ddpm_cli.engine.models.pipeline import load_pipeline
from ddpm_cli.engine.tasks.superres import UpscaleSettings, degrade, upsample, upscale_batch
from ddpm_cli.data.sources import open_dataset
from tests.test_cli import ddpm

CONSISTENCY_BOUND = 0.05  # mean |degrade(upscaled) - input| in [-1, 1] units (~6 grey levels of 255)


@pytest.fixture(scope="session")
def superres_run(tmp_path_factory):
    """An SR3 model trained here for 100 steps. On the 32 images of the first test (EMA weights of one run):
    consistency 0.044 at step 50, 0.033 at 100, 0.031 at 150, 0.030 at 200 (bound 0.05; untrained: 0.26); edge
    energy 0.114, 0.079, 0.074, 0.063 from the real images' (bicubic: 0.123; untrained: 0.93)."""
    run = tmp_path_factory.mktemp("sr") / "run"
    result = ddpm("train", "fashion-mnist", "--task", "superres", "--scale", 2, "--resolution", 28, "-o", run,
                  "--max-steps", 100, "-b", 32, "--lr", "2e-3", "--checkpoint-every", 100, "-q")
    assert result.returncode == 0, result.stderr
    return run


def edge_energy(images: torch.Tensor) -> float:
    """Mean absolute difference between neighbouring pixels: what blur removes."""
    return float((images[..., 1:, :] - images[..., :-1, :]).abs().mean() + (images[..., 1:] - images[..., :-1]).abs().mean())


@pytest.mark.slow
def test_upscaled_held_out_images_are_consistent_and_as_sharp_as_real_ones(superres_run):
    pipeline = load_pipeline(str(superres_run), device="cpu")
    assert pipeline.upscale == 2 and pipeline.unet.config.in_channels == 2
    truth = open_dataset("fashion-mnist", 28, split="test").images[:32].float() / 127.5 - 1
    low = degrade(truth, 2)
    upscaled = torch.cat([upscale_batch(pipeline, [k], SamplerSettings("dpmpp-2m", 20), low[k]) for k in range(32)])
    bicubic = upsample(low, 2)
    consistency = float((degrade(upscaled, 2) - low).abs().mean())
    real, ours, blurred = edge_energy(truth), edge_energy(upscaled), edge_energy(bicubic)
    print(f"consistency {consistency:.4f}; edge energy: real {real:.4f}, upscaled {ours:.4f}, bicubic {blurred:.4f}; "
          f"MSE upscaled {float(((upscaled - truth) ** 2).mean()):.4f}, bicubic {float(((bicubic - truth) ** 2).mean()):.4f}")
    assert consistency < CONSISTENCY_BOUND
    assert abs(ours - real) < abs(blurred - real)  # edge energy closer to the real images than bicubic's


@pytest.mark.slow
def test_upscale_cli_tiles_large_images_and_refuses_other_models(superres_run, tmp_path):
    test = open_dataset("fashion-mnist", 28, split="test").images[:4, 0].numpy()
    quilt = np.concatenate([np.concatenate(test[:2], 1), np.concatenate(test[2:], 1)], 0)  # 56x56: tiles needed
    low = np.asarray(degrade(torch.from_numpy(quilt).float()[None, None], 2)[0, 0].round(), dtype=np.uint8)
    Image.fromarray(low).save(tmp_path / "quilt.png")
    result = ddpm("upscale", superres_run, tmp_path / "quilt.png", "--steps", 10, "-o", tmp_path / "out",
                  "--format", "json")
    assert result.returncode == 0, result.stderr
    written = json.loads(result.stdout)["images"]
    image = np.array(Image.open(written[0]["path"]))
    assert written[0]["path"].endswith("quilt-x2-000000.png") and image.shape == (56, 56)
    back = degrade(torch.from_numpy(image).float()[None, None], 2)[0, 0].numpy()
    assert np.abs(back - low).mean() < CONSISTENCY_BOUND * 127.5
    wrong = ddpm("upscale", superres_run, tmp_path / "quilt.png", "--scale", 4, "-o", tmp_path / "x")
    assert wrong.returncode == 2 and "upscales by 2" in wrong.stderr
    not_sr = ddpm("upscale", "fashion-mnist", tmp_path / "quilt.png", "-o", tmp_path / "x")
    assert not_sr.returncode == 2 and "not a super-resolution model" in not_sr.stderr
    sample = ddpm("sample", superres_run, "-o", tmp_path / "y")
    assert sample.returncode == 2 and "ddpm upscale" in sample.stderr


@pytest.mark.slow
def test_tiles_in_one_pass_equal_tiles_one_by_one(superres_run, monkeypatch):
    import ddpm_cli.engine.tasks.superres as superres

    pipeline = load_pipeline(str(superres_run), device="cpu")
    low = degrade(open_dataset("fashion-mnist", 28, split="test").images[:4].float() / 127.5 - 1, 2)
    quilt = torch.cat([torch.cat([low[0], low[1]], -1), torch.cat([low[2], low[3]], -1)], -2)  # 28x28: 9 tiles of 28
    together = upscale_batch(pipeline, [3, 4], SamplerSettings("dpmpp-2m", 4), quilt, options=UpscaleSettings(tile=28, overlap=14))
    monkeypatch.setattr(superres, "TILES_PER_PASS", 1)
    one_by_one = upscale_batch(pipeline, [3, 4], SamplerSettings("dpmpp-2m", 4), quilt, options=UpscaleSettings(tile=28, overlap=14))
    assert together.shape == (2, 1, 56, 56)
    torch.testing.assert_close(together, one_by_one, atol=1e-4, rtol=0)
    assert (together[0] - together[1]).abs().max() > 0.05  # the two seeds differ


def test_stable_diffusion_upscaler_matches_diffusers(tmp_path):
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.conftest import clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=7, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32, num_class_embeds=1000)
    vae = AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, scaling_factor=0.08333)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                                num_hidden_layers=2, vocab_size=1000, max_position_embeddings=77))
    pipeline = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(tmp_path / "tok"), unet=unet,
        low_res_scheduler=DDPMScheduler(), max_noise_level=350,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type="v_prediction", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1))  # as stable-diffusion-x4-upscaler's
    pipeline.save_pretrained(tmp_path / "sdx")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "low.png")
    result = ddpm("upscale", tmp_path / "sdx", tmp_path / "low.png", "--prompt", "a red cat", "--negative-prompt", "blue dog",
                  "--cfg", 5, "--noise-level", 40, "--sampler", "ddim", "--steps", 4, "--seed", 7, "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    ours = np.asarray(Image.open(result.stdout.strip()), dtype=float) / 255
    reference = StableDiffusionUpscalePipeline.from_pretrained(tmp_path / "sdx")
    expected = reference("a red cat", image=Image.open(tmp_path / "low.png"), negative_prompt="blue dog",
                         num_inference_steps=4, guidance_scale=5.0, noise_level=40,
                         generator=torch.Generator().manual_seed(7), output_type="np").images[0]
    assert ours.shape == expected.shape == (16, 16, 3)
    assert np.abs(ours - expected).max() <= 1 / 255 + 1e-6


def test_ldm_super_resolution_checkpoint_matches_diffusers(tmp_path):
    """LDMSuperResolutionPipeline format: a VQModel, and a U-Net that sees its latents and the low-resolution image."""
    from diffusers import DDIMScheduler, LDMSuperResolutionPipeline, UNet2DModel, VQModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=6, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    vqvae = VQModel(block_out_channels=(32, 64), latent_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0155, clip_sample=False)
    LDMSuperResolutionPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "ldm")
    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(low).save(tmp_path / "low.png")
    result = ddpm("upscale", tmp_path / "ldm", tmp_path / "low.png", "--sampler", "ddim", "--steps", 4, "--seed", 7,
                  "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("low-x2-000007.png")
    ours = np.asarray(Image.open(result.stdout.strip()), dtype=float) / 255
    reference = LDMSuperResolutionPipeline.from_pretrained(tmp_path / "ldm")
    image = torch.from_numpy(low).permute(2, 0, 1)[None].float() / 127.5 - 1  # a tensor skips its resize to 32s
    expected = reference(image, num_inference_steps=4, eta=0.0, generator=torch.Generator().manual_seed(7),
                         output_type="np").images[0]
    assert ours.shape == expected.shape == (16, 16, 3)
    assert np.abs(ours - expected).max() <= 1 / 255 + 1e-6
    prompt = ddpm("upscale", tmp_path / "ldm", tmp_path / "low.png", "--prompt", "a cat", "-o", tmp_path / "x")
    assert prompt.returncode == 2 and "--prompt applies to Stable Diffusion upscalers" in prompt.stderr
