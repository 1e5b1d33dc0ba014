"""The built-in VAE and upscaler run with no MODEL right after install and give results worth looking at
(their model cards give the full figures: benchmarks/builtin_models.py)."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from ddpm_cli.engine.models.resolve import builtin_models
from tests.cli_runner import run_ddpm

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "images"


def psnr(a, b) -> float:
    a, b = (np.asarray(Image.open(p).convert("RGB")).astype(np.float64) for p in (a, b))
    return float(10 * np.log10(255**2 / ((a - b) ** 2).mean()))


def test_encode_without_a_model_uses_the_builtin_vae(tmp_path):
    assert "emoji-vae" in builtin_models()
    encoded = run_ddpm("encode", EXAMPLES / "cat-face.png", "-o", tmp_path / "cat.safetensors", "-q")
    assert encoded.returncode == 0, encoded.stderr
    decoded = run_ddpm("encode", "--decode", tmp_path / "cat.safetensors", "-o", tmp_path / "back", "-q")
    assert decoded.returncode == 0, decoded.stderr
    # 25.8 dB measured; an untrained VAE of the same shape gives 7.3
    assert psnr(EXAMPLES / "cat-face.png", tmp_path / "back" / "000000.png") > 22


def test_models_lists_the_builtin_vae_and_upscaler(tmp_path):
    listed = run_ddpm("models", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    kinds = {row["name"]: row["kind"] for row in json.loads(listed.stdout)}
    assert (kinds["emoji-vae"], kinds["emoji-upscaler"]) == ("VAE", "upscaler x2")


def test_upscale_without_a_model_uses_the_builtin_upscaler(tmp_path):
    from ddpm_cli.data.captions import load_emoji

    assert "emoji-upscaler" in builtin_models()
    result = run_ddpm("upscale", EXAMPLES / "cat-face.png", "-o", tmp_path, "-q")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "cat-face-x2-000000.png"
    assert result.stdout.split() == [str(out)] and Image.open(out).size == (64, 64)
    images, names = load_emoji(64)
    Image.fromarray(images[names.index("cat face")].permute(1, 2, 0).numpy(), "RGB").save(tmp_path / "truth.png")
    Image.open(EXAMPLES / "cat-face.png").resize((64, 64), Image.BICUBIC).save(tmp_path / "bicubic.png")
    # measured: 25.7 dB against the font's 64x64 rendering, bicubic 24.4 dB
    assert psnr(out, tmp_path / "truth.png") > psnr(tmp_path / "bicubic.png", tmp_path / "truth.png") + 0.5
