"""Zero-shot inpainting: masks read deliberately, the known region kept exactly, RePaint's schedule,
and holes in held-out Fashion-MNIST filled closer to the truth than a mean fill."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_cli.engine.errors import InputError
from ddpm_cli.engine.tasks.generate import SamplerSettings
from ddpm_cli.engine.tasks.inpaint import inpaint_batch, read_mask, repaint_levels
from ddpm_cli.engine.models.pipeline import load_pipeline
from ddpm_cli.data.sources import open_dataset
from tests.test_cli import ddpm


def save(array, path, mode=None):
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path)
    return path


def test_masks_are_read_deliberately(tmp_path):
    grey = np.zeros((8, 8), np.uint8)
    grey[:, 4:] = 128
    grey[:, 3] = 127
    mask = read_mask(save(grey, tmp_path / "grey.png"), (8, 8))
    assert mask.shape == (1, 1, 8, 8) and mask[0, 0, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # threshold 128
    assert read_mask(tmp_path / "grey.png", (8, 8), invert=True)[0, 0, 0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:, :2, 3] = 255  # opaque white on the left; transparent white elsewhere: kept
    assert read_mask(save(rgba, tmp_path / "rgba.png", "RGBA"), (8, 8))[0, 0, 0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    palette = Image.fromarray(grey).convert("P")
    palette.save(tmp_path / "palette.png")
    assert torch.equal(read_mask(tmp_path / "palette.png", (8, 8)), mask)
    with pytest.raises(InputError, match="--resize-mask"):
        read_mask(tmp_path / "grey.png", (16, 16))
    assert read_mask(tmp_path / "grey.png", (16, 16), resize=True).shape == (1, 1, 16, 16)
    with pytest.raises(InputError, match="nothing to generate"):
        read_mask(save(np.zeros((8, 8)), tmp_path / "black.png"), (8, 8))


def test_repaint_levels_go_down_and_jump_back():
    assert repaint_levels(5, 2, 1) == [5, 4, 3, 2, 1, 0]
    path = repaint_levels(10, 2, 3)
    assert path[0] == 10 and path[-1] == 0
    assert all(abs(b - a) == 1 for a, b in zip(path, path[1:]))
    ups = sum(1 for a, b in zip(path, path[1:]) if b > a)
    assert ups == 2 * 2 * len(range(0, 10 - 2, 2))  # (jump_n_sample - 1) jumps of jump_length, per jump point


def test_known_region_is_kept_exactly_through_the_cli(tmp_path):
    test = open_dataset("fashion-mnist-subset", 32, split="test")
    image = save(test.images[3, 0].numpy(), tmp_path / "shirt.png")
    hole = np.zeros((32, 32), np.uint8)
    hole[10:22, 8:24] = 255
    mask = save(hole, tmp_path / "hole.png")
    for extra in ([], ["--sampler", "ddpm", "--steps", 20, "--jump-length", 5, "--jump-n-sample", 2]):
        out = tmp_path / f"out{len(extra)}"
        result = ddpm("inpaint", "fashion-mnist", "--image", image, "--mask", mask, "-n", 2, "-o", out, *extra)
        assert result.returncode == 0, result.stderr
        paths = result.stdout.split()
        assert [p.rsplit("/", 1)[1] for p in paths] == ["shirt-000000.png", "shirt-000001.png"]
        original = np.array(Image.open(image))
        for path in paths:
            filled = np.array(Image.open(path))
            assert np.array_equal(filled[hole == 0], original[hole == 0])
            assert not np.array_equal(filled[hole > 0], original[hole > 0])
    meta = json.loads(Image.open(paths[0]).info["ddpm"])
    assert meta["task"] == "inpaint" and meta["jump_n_sample"] == 2 and meta["mask"] == str(mask)
    # a mask of another size is refused with one line, before the model loads
    small = save(np.full((16, 16), 255), tmp_path / "small.png")
    refused = ddpm("inpaint", "fashion-mnist", "--image", image, "--mask", small, "-o", tmp_path / "x")
    assert refused.returncode == 2 and "--resize-mask" in refused.stderr and refused.stderr.count("\n") == 1


@pytest.mark.slow
def test_filled_holes_are_closer_to_the_truth_than_a_mean_fill(fashion_class_run):
    pipeline = load_pipeline(str(fashion_class_run), device="cpu")
    test = open_dataset("fashion-mnist", 16, split="test")
    images = test.images[:48].float() / 127.5 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 5:11, 4:12] = 1.0
    hole = mask[0, 0].bool()
    model_error, mean_error = [], []
    for i, image in enumerate(images):
        filled = inpaint_batch(pipeline, [i], SamplerSettings("dpmpp-2m", 20), image, mask)[0]
        truth = image[:, hole]
        mean_fill = image[:, ~hole].mean()
        model_error.append(((filled[:, hole] - truth) ** 2).mean().item())
        mean_error.append(((mean_fill - truth) ** 2).mean().item())
    model_mse, mean_mse = float(np.mean(model_error)), float(np.mean(mean_error))
    print(f"hole MSE on 48 held-out images: model {model_mse:.4f}, mean fill {mean_mse:.4f}")
    assert model_mse < 0.8 * mean_mse


def test_latent_model_inpaints_and_preserves_known_pixels(tmp_path):
    from diffusers import DDPMScheduler

    from ddpm_cli.training.checkpoints import export_pipeline
    from ddpm_cli.training.presets import autoencoder_config, build_autoencoder, build_unet, unet_config

    torch.manual_seed(0)
    vae = build_autoencoder(autoencoder_config("tiny", 32, 3)).eval()
    unet = build_unet(unet_config("tiny", 8, 4)).eval()
    export_pipeline(tmp_path / "latent", unet, DDPMScheduler().config, {}, vae)
    rng = np.random.default_rng(0)
    image = save(rng.integers(0, 256, (32, 32, 3)), tmp_path / "x.png")
    hole = np.zeros((32, 32), np.uint8)
    hole[8:20, 8:20] = 255
    mask = save(hole, tmp_path / "m.png")
    result = ddpm("inpaint", tmp_path / "latent", "--image", image, "--mask", mask, "--steps", 5, "--preserve-known",
                  "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    filled, original = np.array(Image.open(result.stdout.strip())), np.array(Image.open(image))
    assert filled.shape == (32, 32, 3)
    assert np.array_equal(filled[hole == 0], original[hole == 0])


def test_stable_diffusion_inpainting_checkpoint_matches_diffusers(tmp_path, monkeypatch):
    """A 9-channel inpainting U-Net (StableDiffusionInpaintPipeline format) through `ddpm inpaint`."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel)
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.conftest import clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=9, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                                num_hidden_layers=2, vocab_size=1000, max_position_embeddings=77))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)  # as Stable Diffusion inpainting's configs
    StableDiffusionInpaintPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(tmp_path / "tok"),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).save_pretrained(tmp_path / "sdi")
    rng = np.random.default_rng(0)
    picture = save(rng.integers(0, 256, (16, 16, 3)), tmp_path / "image.png")
    hole = np.zeros((16, 16), np.uint8)
    hole[4:12, 6:14] = 255
    mask = save(hole, tmp_path / "mask.png")
    settings = ["--prompt", "a red cat", "--negative-prompt", "blue dog", "--cfg", 5, "--sampler", "ddim",
                "--steps", 4, "--seed", 7]
    result = ddpm("inpaint", tmp_path / "sdi", "--image", picture, "--mask", mask, *settings, "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    ours = np.asarray(Image.open(result.stdout.strip()), dtype=float) / 255
    # diffusers samples the masked image's latents from the VAE's posterior; ddpm takes its mean
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    reference = StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "sdi")
    expected = reference("a red cat", image=Image.open(picture), mask_image=Image.open(mask), negative_prompt="blue dog",
                         num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(7),
                         output_type="np").images[0]
    assert ours.shape == expected.shape == (16, 16, 3)
    assert np.abs(ours - expected).max() <= 1 / 255 + 1e-6
    kept = ddpm("inpaint", tmp_path / "sdi", "--image", picture, "--mask", mask, *settings, "--preserve-known",
                "-o", tmp_path / "kept", "-q")
    assert kept.returncode == 0, kept.stderr
    outside = hole == 0
    assert np.array_equal(np.asarray(Image.open(kept.stdout.strip()))[outside], np.asarray(Image.open(picture))[outside])
    wrong = ddpm("txt2img", "a cat", "-m", tmp_path / "sdi", "-o", tmp_path / "x")
    assert wrong.returncode == 2 and "ddpm inpaint" in wrong.stderr
    repaint = ddpm("inpaint", tmp_path / "sdi", "--image", picture, "--mask", mask, "--prompt", "a cat",
                   "--sampler", "ddpm", "--jump-n-sample", 2, "-o", tmp_path / "y")
    assert repaint.returncode == 2 and "sees the mask itself" in repaint.stderr
