"""Latent diffusion: `ddpm train --task autoencoder`, `ddpm encode` (and --decode), latents files,
and DDPM training and sampling in latent space, on real Fashion-MNIST images."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_cli.engine.io.latents import read_latents
from ddpm_cli.engine.models.vae import _guarded, decode_latents, encode_images, load_autoencoder
from ddpm_cli.data.sources import open_dataset
from ddpm_cli.training.presets import autoencoder_config, build_autoencoder
from tests.test_cli import ddpm

PSNR_BOUND = 19.0  # dB on held-out 32x32 Fashion-MNIST after the short training below
HELD_OUT = 64


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


@pytest.fixture(scope="session")
def trained_vae(tmp_path_factory):
    """A tiny AutoencoderKL (4x per side) trained briefly through the CLI on the Fashion-MNIST subset.
    Batches of 16: 21.2 dB round-trip PSNR after 150 steps on the held-out images below (batch 32: 21.9 dB,
    for 1.6x the time; the bound is 19 dB, an untrained VAE gets 6.7 dB)."""
    run = tmp_path_factory.mktemp("vae-run")
    result = ddpm("train", "fashion-mnist-subset", "--task", "autoencoder", "-o", run, "--max-steps", 150, "-b", 16,
                  "--lr", "2e-3", "--ema-decay", "0.99", "--checkpoint-every", 150, "--format", "json")
    assert result.returncode == 0, result.stderr
    return run


@pytest.fixture(scope="session")
def held_out_folder(tmp_path_factory):
    """Test-split images (never trained on) as PNG files."""
    folder = tmp_path_factory.mktemp("held-out")
    test = open_dataset("fashion-mnist-subset", 32, split="test")
    for i in range(HELD_OUT):
        Image.fromarray(test.images[i, 0].numpy()).save(folder / f"{i:03d}.png")
    return folder


def round_trip_psnr(vae_dir, folder, tmp_path, name: str) -> float:
    latents = tmp_path / f"{name}.safetensors"
    assert ddpm("encode", folder, "-m", vae_dir, "-o", latents, "-q").returncode == 0
    result = ddpm("encode", "--decode", latents, "-o", tmp_path / name, "-q")
    assert result.returncode == 0, result.stderr
    sources = read_latents(latents).sources
    decoded = [np.array(Image.open(tmp_path / name / f"{i:06d}.png").convert("L")) for i in range(len(sources))]
    originals = [np.array(Image.open(folder / source)) for source in sources]
    return psnr(np.stack(decoded), np.stack(originals))


@pytest.mark.slow
def test_trained_autoencoder_round_trips_held_out_images(trained_vae, held_out_folder, tmp_path):
    config = json.loads((trained_vae / "vae" / "config.json").read_text())
    untrained = tmp_path / "untrained"
    torch.manual_seed(0)
    build_autoencoder(autoencoder_config("tiny", 32, 1)).save_pretrained(untrained)
    trained_psnr = round_trip_psnr(trained_vae, held_out_folder, tmp_path, "trained")
    untrained_psnr = round_trip_psnr(untrained, held_out_folder, tmp_path, "untrained")
    print(f"round-trip PSNR on {HELD_OUT} held-out images: trained {trained_psnr:.2f} dB, untrained {untrained_psnr:.2f} dB")
    assert trained_psnr > PSNR_BOUND
    assert trained_psnr > untrained_psnr + 5
    assert 0.05 < config["scaling_factor"] < 50  # 1 / std of the training latents, set at export


@pytest.mark.slow
def test_latents_file_holds_shapes_scaling_and_sources(trained_vae, held_out_folder, tmp_path):
    out = tmp_path / "held.safetensors"
    result = ddpm("encode", held_out_folder, "-m", trained_vae, "-o", out, "--format", "json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    data = read_latents(out)
    vae = load_autoencoder(str(trained_vae), "cpu", torch.float32)
    assert data.latents.shape == (HELD_OUT, 4, 8, 8) and data.latents.dtype == torch.float32
    assert summary["latent_shape"] == [4, 8, 8] and summary["images"] == HELD_OUT
    assert data.scaling_factor == pytest.approx(vae.config.scaling_factor)
    assert data.image_size == (32, 32) and data.sources[0] == "000.png"
    assert data.vae == str(trained_vae.resolve())
    # the latents are the VAE's own: mean of q(z|x) times the scaling factor
    image = torch.from_numpy(np.array(Image.open(held_out_folder / "005.png"))).float()[None, None] / 127.5 - 1
    with torch.no_grad():
        direct = vae.encode(image).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(data.latents[5:6], direct, atol=1e-5, rtol=1e-4)
    # an existing output is refused before any work, and left as it was
    before = out.read_bytes()
    refused = ddpm("encode", held_out_folder, "-m", trained_vae, "-o", out)
    assert refused.returncode == 2 and "exists" in refused.stderr and out.read_bytes() == before


@pytest.mark.slow
def test_tiled_round_trip_is_close_to_the_whole_image(trained_vae):
    vae = load_autoencoder(str(trained_vae), "cpu", torch.float32)
    images = open_dataset("fashion-mnist-subset", 64, split="test").images[:4].float() / 127.5 - 1
    whole = decode_latents(vae, encode_images(vae, images, tile=None), tile=None)
    tiled_latents = encode_images(vae, images, tile=32)
    tiled = decode_latents(vae, tiled_latents, tile=32)
    assert tiled_latents.shape == (4, 4, 16, 16) and tiled.shape == images.shape
    to_uint8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).numpy()  # noqa: E731
    print(f"tiled vs whole: {psnr(to_uint8(tiled), to_uint8(whole)):.1f} dB")
    assert psnr(to_uint8(tiled), to_uint8(images)) > psnr(to_uint8(whole), to_uint8(images)) - 3


@pytest.mark.slow
def test_latent_ddpm_trains_and_samples_images_of_the_model_size(trained_vae, tmp_path):
    latents = tmp_path / "train.safetensors"
    result = ddpm("encode", "fashion-mnist-subset", "-m", trained_vae, "-o", latents, "-b", 256, "-q")
    assert result.returncode == 0, result.stderr
    data = read_latents(latents)
    assert data.labels is not None and len(data.labels) == len(data.sources) and data.class_names[7] == "Sneaker"
    run = tmp_path / "run"
    result = ddpm("train", latents, "-o", run, "--max-steps", 60, "-b", 32, "--lr", "2e-3", "--checkpoint-every", 60,
                  "--format", "json")
    assert result.returncode == 0, result.stderr
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.6 * losses[0]
    assert (run / "vae" / "config.json").is_file()
    assert json.loads((run / "unet" / "config.json").read_text())["sample_size"] == 8
    result = ddpm("sample", run, "-n", 2, "-o", tmp_path / "out", "--steps", 10)
    assert result.returncode == 0, result.stderr
    image = Image.open(result.stdout.split()[0])
    assert image.size == (32, 32) and image.mode == "L"


def test_encode_matches_diffusers_on_a_stable_diffusion_format_vae(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                        sample_size=32, scaling_factor=0.18215).eval()
    vae.save_pretrained(tmp_path / "sd" / "vae")
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    arrays = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(folder / f"{i}.png")
    out = tmp_path / "lat.safetensors"
    result = ddpm("encode", folder, "-m", tmp_path / "sd", "-o", out, "-b", 2)
    assert result.returncode == 0, result.stderr
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(read_latents(out).latents, expected, atol=1e-5, rtol=1e-4)


def test_encode_resumes_an_interrupted_run(tmp_path, monkeypatch):
    from ddpm_cli.training import latents as latents_module

    torch.manual_seed(0)
    vae = build_autoencoder(autoencoder_config("tiny", 32, 1)).eval()
    dataset = open_dataset("fashion-mnist-subset", 32, split="test")
    dataset.images = dataset.images[:40]
    sources = [str(i) for i in range(40)]
    calls, interrupted = [], []
    real = latents_module.encode_images

    def flaky(model, images, tile=None):  # the first run is interrupted in its third batch
        calls.append(len(images))
        if len(calls) == 3 and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        return real(model, images, tile)

    monkeypatch.setattr(latents_module, "encode_images", flaky)
    parts = tmp_path / ".out.parts"
    with pytest.raises(KeyboardInterrupt):
        latents_module.encode_set(dataset, sources, vae, "vae", None, 8, parts=parts)
    assert len(list(parts.glob("part-*.safetensors"))) == 2
    calls.clear()
    resumed = latents_module.encode_set(dataset, sources, vae, "vae", None, 8, parts=parts)
    assert calls == [8, 8, 8]  # only the three batches not yet done
    monkeypatch.setattr(latents_module, "encode_images", real)
    fresh = latents_module.encode_set(dataset, sources, vae, "vae", None, 8)
    torch.testing.assert_close(resumed.latents, fresh.latents)


def test_half_precision_failure_is_redone_in_fp32():
    class HalfVAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1, dtype=torch.float16))

        @property
        def dtype(self):
            return self.w.dtype

    def run(model, x):  # overflows in fp16 only
        return x * (float("inf") if model.dtype == torch.float16 else 2.0)

    out = _guarded(HalfVAE(), run, torch.ones(3))
    assert torch.equal(out, torch.full((3,), 2.0))


@pytest.mark.slow
def test_encode_refuses_bad_input_with_one_line(tmp_path, trained_vae):
    missing = ddpm("encode", tmp_path / "nope", "-m", trained_vae, "-o", tmp_path / "x.safetensors")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "not found" in missing.stderr
    wrong_suffix = ddpm("encode", "fashion-mnist-subset", "-m", trained_vae, "-o", tmp_path / "x.npz")
    assert wrong_suffix.returncode == 2 and ".safetensors" in wrong_suffix.stderr
    no_vae = ddpm("encode", "fashion-mnist-subset", "-m", tmp_path, "-o", tmp_path / "x.safetensors")
    assert no_vae.returncode == 3 and "VAE" in no_vae.stderr
    assert not (tmp_path / "x.safetensors").exists()
