"""Image-to-image (SDEdit): `--init-image IMG|DIR --strength S` on sample and txt2img, against diffusers'
StableDiffusionImg2ImgPipeline and a hand-written diffusers scheduler loop, on the built-in model, and
its bad input."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_cli.engine.io.images import read_png_metadata
from tests.test_cli import ddpm

PROMPT, NEGATIVE, CFG, SEEDS = "a red cat", "blue dog", 4.0, (3, 4)


@pytest.fixture(scope="module")
def rgb16(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers' VAE posterior sample patched to its mean (ddpm encodes to the mean)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


def diffusers_img2img(sd_dir, image, scheduler, strength, steps):
    """StableDiffusionImg2ImgPipeline with one generator per seed, as np in [0, 1]."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionImg2ImgPipeline

    reference = StableDiffusionImg2ImgPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    if scheduler != "dpmpp-2m":  # same betas and spacing; no x_0 clipping, as the model's own config
        kind = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[scheduler]
        reference.scheduler = kind.from_config(reference.scheduler.config, clip_sample=False)
    return reference(PROMPT, image=image, strength=strength, negative_prompt=NEGATIVE, num_inference_steps=steps,
                     guidance_scale=CFG, generator=[torch.Generator().manual_seed(s) for s in SEEDS],
                     num_images_per_prompt=len(SEEDS), output_type="np").images


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "ddim", "ddpm"])
def test_engine_matches_stable_diffusion_img2img(sampler, sd_dir, rgb16, posterior_mean):
    """sample_batch(init=..., strength=0.6) equals diffusers to float rounding; the ancestral sampler
    shows the seeded draws come in diffusers' order (img2img noise first, then each step's)."""
    from ddpm_cli.engine.io.images import pil_to_tensor
    from ddpm_cli.engine.models.pipeline import Condition, load_pipeline
    from ddpm_cli.engine.tasks.generate import SamplerSettings, sample_batch
    from ddpm_cli.engine.tasks.img2img import to_model_space

    pipeline = load_pipeline(str(sd_dir), None, "cpu", "fp32", False, False)
    image = Image.open(rgb16)
    init = to_model_space(pipeline, pil_to_tensor(image))
    ours = sample_batch(pipeline, list(SEEDS), SamplerSettings(sampler, 10, spacing="trailing"), None,
                        Condition(prompt=PROMPT, negative_prompt=NEGATIVE), CFG, init=init, strength=0.6)
    ours = ((ours + 1) / 2).permute(0, 2, 3, 1).numpy()
    expected = diffusers_img2img(sd_dir, image, sampler, 0.6, 10)
    difference = np.abs(ours - expected).max()
    print(f"img2img {sampler}: max |ddpm - diffusers| = {difference:.2e}")
    assert difference < 1e-4
    assert np.abs(expected[0] - expected[1]).max() > 0.01  # the seeds differ
    assert np.abs(expected[0] - np.asarray(image) / 255).max() > 0.01  # and the image did change


def test_txt2img_init_image_matches_stable_diffusion_img2img(sd_dir, rgb16, posterior_mean, tmp_path):
    result = ddpm("txt2img", sd_dir, PROMPT, "--init-image", rgb16, "--strength", 0.6, "--steps", 10, "--cfg", CFG,
                  "--negative-prompt", NEGATIVE, "--seeds", ",".join(map(str, SEEDS)), "-o", tmp_path, "-q")
    assert result.returncode == 0, result.stderr
    expected = diffusers_img2img(sd_dir, Image.open(rgb16), "dpmpp-2m", 0.6, 10)
    for i, seed in enumerate(SEEDS):
        path = tmp_path / f"a-red-cat-{seed:06d}.png"
        ours = np.asarray(Image.open(path), dtype=float) / 255
        assert np.abs(ours - expected[i]).max() <= 1 / 255 + 1e-6
        meta = read_png_metadata(path)
        assert meta["init_image"] == str(rgb16) and meta["strength"] == 0.6 and meta["seed"] == seed
        assert meta["init_image_sha256"] == hashlib.sha256(rgb16.read_bytes()).hexdigest()


def reference_pixel_img2img(folder, init: torch.Tensor, seed: int, strength: float, steps: int) -> np.ndarray:
    """diffusers' img2img recipe by hand on a pixel model: DDPMScheduler from its config, timesteps
    [t_start:], add_noise with the generator's first draw, then the ancestral steps drawing from it."""
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(folder, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(steps)
    t_start = steps - min(int(steps * strength), steps)
    timesteps = scheduler.timesteps[t_start:]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(init.shape, generator=generator)
    x = scheduler.add_noise(init, noise, timesteps[:1])
    with torch.no_grad():
        for t in timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, generator=generator).prev_sample
    return ((x.clamp(-1, 1) + 1) / 2 * 255).round()[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_pixel_model_follows_diffusers_img2img_recipe(strength, tiny_pipeline_dir, rgb16, tmp_path):
    """strength 1 starts at the top timestep of the sampler's list (noised image, not pure noise)."""
    from diffusers import DDPMScheduler

    config = DDPMScheduler.from_pretrained(tiny_pipeline_dir, subfolder="scheduler").config
    result = ddpm("sample", tiny_pipeline_dir, "--init-image", rgb16, "--strength", strength, "--sampler", "ddpm",
                  "--steps", 8, "--spacing", config.timestep_spacing, "--variance", config.variance_type, "--seed", 5,
                  "-n", 1, "-o", tmp_path, "-q")
    assert result.returncode == 0, result.stderr
    ours = np.asarray(Image.open(tmp_path / "000005.png"), dtype=float)
    init = torch.from_numpy(np.asarray(Image.open(rgb16), dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    expected = reference_pixel_img2img(tiny_pipeline_dir, init, 5, strength, 8)
    assert np.abs(ours - expected).max() <= 1


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / ((a.astype(float) - b.astype(float)) ** 2).mean()))


@pytest.fixture(scope="module")
def fashion_folder(tmp_path_factory):
    """Two Fashion-MNIST test images at the built-in model's 32x32, as its data loader makes them."""
    from ddpm_cli.data.sources import open_dataset

    folder = tmp_path_factory.mktemp("fashion")
    test = open_dataset("fashion-mnist-subset", 32, 1, split="test")
    for i in (0, 1):
        item = test[i][0] if isinstance(test[i], tuple) else test[i]
        Image.fromarray(item[0].numpy()).save(folder / f"test{i}.png")
    return folder


def test_strength_decides_how_far_from_the_image_on_the_builtin_model(fashion_folder, tmp_path):
    outputs = {}
    for strength in (0.2, 0.9):
        result = ddpm("sample", "fashion-mnist", "--init-image", fashion_folder, "--strength", strength,
                      "--seeds", "0,1", "-o", tmp_path / str(strength), "-q")
        assert result.returncode == 0, result.stderr
        names = sorted(p.name for p in (tmp_path / str(strength)).iterdir())
        assert names == ["test0-000000.png", "test0-000001.png", "test1-000000.png", "test1-000001.png"]
        outputs[strength] = [psnr(np.asarray(Image.open(tmp_path / str(strength) / name)),
                                  np.asarray(Image.open(fashion_folder / f"{name[:5]}.png"))) for name in names]
    print("PSNR to the init image:", {s: [round(p, 1) for p in v] for s, v in outputs.items()})
    assert min(outputs[0.2]) > 18  # a light touch keeps the garment (measured 20.8-24.2 dB)
    assert max(outputs[0.9]) < min(outputs[0.2]) - 8  # a strong one redraws it (measured 6.7-8.4 dB)


def test_bad_init_input_is_one_line_exit_2_nothing_written(fashion_folder, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    Image.new("L", (28, 28)).save(tmp_path / "small.png")
    base = ["sample", "fashion-mnist", "-n", 1, "--steps", 4]
    cases = [
        (("--init-image", tmp_path / "missing.png"), "no such file"),
        (("--init-image", tmp_path / "broken.png"), "broken.png"),
        (("--init-image", fashion_folder / "test0.png", "--strength", 0), "(0, 1]"),
        (("--init-image", fashion_folder / "test0.png", "--strength", 1.5), "(0, 1]"),
        (("--strength", 0.5), "--strength goes with --init-image"),
        (("--resize",), "--resize goes with --init-image"),
        (("--init-image", tmp_path / "small.png"), "pass --resize"),
        (("--init-image", fashion_folder / "test0.png", "--strength", 0.1), "runs no step"),
    ]
    for extra, message in cases:
        result = ddpm(*base, *extra, "-o", tmp_path / "out")
        assert result.returncode == 2, (extra, result.stderr)
        assert result.stderr.count("\n") == 1 and message in result.stderr, (extra, result.stderr)
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    resized = ddpm(*base, "--init-image", tmp_path / "small.png", "--resize", "-o", tmp_path / "ok", "-q")
    assert resized.returncode == 0, resized.stderr
    assert Image.open(tmp_path / "ok" / "000000.png").size == (32, 32)


def test_txt2img_folder_of_init_images_names_each_output(sd_dir, rgb16, tmp_path):
    folder = tmp_path / "inits"
    folder.mkdir()
    (folder / "one.png").write_bytes(rgb16.read_bytes())
    Image.open(rgb16).transpose(Image.FLIP_LEFT_RIGHT).save(folder / "two.png")
    result = ddpm("txt2img", sd_dir, PROMPT, "--init-image", folder, "--steps", 4, "--seeds", "1,2", "-b", 4,
                  "-o", tmp_path / "out", "--grid", "-q")
    assert result.returncode == 0, result.stderr
    names = [f"a-red-cat-{stem}-{seed:06d}.png" for stem in ("one", "two") for seed in (1, 2)]
    assert result.stdout.splitlines() == [str(tmp_path / "out" / name) for name in names] + [str(tmp_path / "out" / "grid.png")]
    one, two = (np.asarray(Image.open(tmp_path / "out" / names[k])) for k in (0, 2))
    assert not np.array_equal(one, two)  # each image starts from its own init (in its own batch)
    assert read_png_metadata(tmp_path / "out" / names[2])["init_image"] == str(folder / "two.png")
